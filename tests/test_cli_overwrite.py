"""What a command may overwrite: a run folder only if it is new, empty or marked; a single-file
output only if it is new or reidkit's own (its mark); never one of the command's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import attention_maps as attention_module
from reidkit.engine import compare as compare_module
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine import export as export_module
from reidkit.engine import search as search_module
from reidkit.engine import train as train_module
from reidkit.engine.evaluate import EvaluationReport
from reidkit.retrieval.metrics import cmc_map

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def no_work(monkeypatch) -> None:
    """Every heavy call fails the test: a refused output is refused before any of them."""

    def work(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(train_module, "read_manifest", work)
    monkeypatch.setattr(evaluate_module, "run_evaluation", work)
    monkeypatch.setattr(search_module, "search_index", work)
    monkeypatch.setattr(attention_module, "attention_maps", work)
    monkeypatch.setattr(export_module, "load_model", work)
    monkeypatch.setattr(compare_module, "summarise_run", work)


# ------------------------------------------------------------------ a run folder


def test_train_out_over_a_folder_of_user_files_is_refused_before_any_work(
    tiny_overrides, tmp_path: Path, no_work
):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "config.toml").write_text("[mine]\n")
    (docs / "metrics.csv").write_text("x,y\n")
    before = snapshot(tmp_path)
    settings = [arg for item in tiny_overrides for arg in ("--set", item)]
    result = invoke("train", "--out", docs, *settings)
    one_line_error(result, f"--out {docs}", "without reidkit's .reidkit-run marker")
    assert snapshot(tmp_path) == before


def test_a_run_folder_is_marked_first_and_a_stopped_run_can_start_again_in_it(
    tiny_config, tiny_checkpoint: Path, tmp_path: Path, monkeypatch
):
    assert (tiny_checkpoint.parent / ".reidkit-run").is_file()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # stopped in its first epoch, a run leaves the marker and config.toml (nothing else);
    # the same command again is accepted: the folder is marked and holds no last.pt
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "_train_one_epoch", ctrl_c)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            train_module.fit(tiny_config("train.epochs=1"), run, progress=False)
        assert sorted(p.name for p in run.iterdir()) == [".reidkit-run", "config.toml"]


# ------------------------------------------------------------------ an output that is an input


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    checkpoint = tmp_path / "copy.pt"
    checkpoint.write_bytes(b"97 MB of weights")
    (tmp_path / "hard.json").hardlink_to(checkpoint)
    (tmp_path / "soft.onnx").symlink_to(checkpoint)
    photo = tmp_path / "q.jpg"
    Image.new("RGB", (32, 96), (10, 20, 30)).save(photo)
    return {"checkpoint": checkpoint, "photo": photo}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("evaluate", "copy.pt", "--json", "copy.pt"), "--json {}/copy.pt is the checkpoint"),
        (("evaluate", "copy.pt", "--json", "hard.json"), "is the checkpoint ({}/copy.pt) by"),
        (("evaluate", "copy.pt", "--cmc-plot", "copy.pt"), "--cmc-plot {}/copy.pt is the"),
        (("export", "copy.pt", "--out", "copy.pt"), "--out {}/copy.pt is the checkpoint"),
        (("export", "copy.pt", "--out", "soft.onnx"), "--out {}/soft.onnx is the checkpoint"),
        (("search", "q.jpg", "--save", "q.jpg"), "--save {}/q.jpg is the query image"),
        (("attention", "copy.pt", "q.jpg", "--out", "q.jpg"), "--out {}/q.jpg is the image"),
        (("attention", "copy.pt", "q.jpg", "--out", "copy.pt"), "is the checkpoint"),
    ],
)
def test_an_output_that_is_an_input_is_refused_by_any_name(
    tmp_path: Path, inputs, no_work, args, fragment
):
    before = snapshot(tmp_path)
    named = [
        str(tmp_path / a) if a.endswith((".pt", ".jpg", ".json", ".onnx")) else a for a in args
    ]
    one_line_error(invoke(*named), fragment.format(tmp_path), "choose another path")
    assert snapshot(tmp_path) == before


def test_the_same_path_for_two_outputs_is_refused(tmp_path: Path, inputs, no_work):
    out = tmp_path / "r.out"
    result = invoke("evaluate", inputs["checkpoint"], "--json", out, "--cmc-plot", out)
    one_line_error(result, f"--cmc-plot {out} is the --json output")


# ------------------------------------------------------------------ a user's single file


def users_png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 0, 0)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    ("args", "mine"),
    [
        (("evaluate", "{ck}", "--json", "{mine}"), "results.json"),
        (("evaluate", "{ck}", "--cmc-plot", "{mine}"), "cmc.png"),
        (("search", "{photo}", "--save", "{mine}"), "ranked.png"),
        (("attention", "{ck}", "{photo}", "--out", "{mine}"), "attention.png"),
        (("export", "{ck}", "--out", "{mine}"), "model.onnx"),
        (("compare", "{run}", "--out", "{prefix}"), "table.md"),
        (("compare", "{run}", "--out", "{prefix}"), "table.csv"),
        (("compare", "{run}", "--out", "{prefix}"), "table.png"),
    ],
)
def test_a_users_file_at_a_single_file_output_is_refused_before_any_work(
    tmp_path: Path, inputs, no_work, args, mine
):
    pytest.importorskip("onnx")
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    path = tmp_path / mine
    if mine.endswith(".png"):
        users_png(path)  # a real PNG: only reidkit's mark in it would make it replaceable
    else:
        path.write_text('{"mine": true}\n' if mine.endswith(".json") else "mine\n")
    before = snapshot(tmp_path)
    values = {
        "ck": inputs["checkpoint"],
        "photo": inputs["photo"],
        "mine": path,
        "run": run,
        "prefix": tmp_path / "table",
    }
    result = invoke(*(a.format(**values) for a in args))
    one_line_error(result, f"{path} exists and was not written by reidkit")
    assert snapshot(tmp_path) == before


def fake_report() -> EvaluationReport:
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2])
    metrics = cmc_map(
        np.array([[0.1, 0.9], [0.8, 0.2]]), q_pids, g_pids, np.zeros(2), np.ones(2), max_rank=2
    )
    return EvaluationReport("tiny", "smoke", metrics, 2, 2, "g", False, False, None)


def test_reidkit_replaces_the_results_it_wrote(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda *a, **k: fake_report())
    json_out, plot = tmp_path / "results.json", tmp_path / "cmc.png"
    for _ in range(2):  # the second run replaces the first run's files
        result = invoke("evaluate", tmp_path / "last.pt", "--json", json_out, "--cmc-plot", plot)
        assert result.exit_code == 0, result.output
    assert '"written_by": "reidkit' in json_out.read_text()
    with Image.open(plot) as png:
        assert png.info["written_by"].startswith("reidkit ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmc.png", "results.json"]
