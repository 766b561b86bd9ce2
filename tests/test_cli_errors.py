"""Bad input at the command line: one red line naming the thing and the fix, no traceback,
no half-written file; file-system failures included."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import RunConfig
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine import search as search_module
from reidkit.engine import train as train_module
from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.engine.evaluate import EvaluationReport
from reidkit.models.net import build_model
from reidkit.retrieval.metrics import cmc_map

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    """The exit code, one line on stderr that starts with `error:`, and no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def fake_report() -> EvaluationReport:
    """A finished evaluation, so output options are tested without extracting anything."""
    metrics = cmc_map(
        np.array([[0.1, 0.9], [0.8, 0.2]]),
        np.array([1, 2]),
        np.array([1, 2]),
        np.array([0, 0]),
        np.array([1, 1]),
        max_rank=2,
    )
    return EvaluationReport("tiny", "smoke", metrics, 2, 2, "g", False, False, None)


@pytest.fixture
def evaluations(monkeypatch) -> list:
    """Replace the evaluation with `fake_report`; the list records each call."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(args)
        return fake_report()

    monkeypatch.setattr(evaluate_module, "run_evaluation", fake)
    return calls


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ evaluate --json / --cmc-plot


def test_json_under_a_file_is_refused_before_evaluating(tmp_path: Path, evaluations):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    target = tmp_path / "notes.txt" / "r.json"
    result = invoke("evaluate", tmp_path / "last.pt", "--json", target)
    one_line_error(result, f"cannot write --json {target}", "notes.txt is a file, not a folder")
    assert evaluations == []  # refused before the long part


def test_json_that_is_a_folder_is_refused(tmp_path: Path, evaluations):
    result = invoke("evaluate", tmp_path / "last.pt", "--json", tmp_path)
    one_line_error(result, f"--json {tmp_path} is a folder; give a file path")
    assert evaluations == []


def test_outputs_go_into_new_folders(tmp_path: Path, evaluations):
    report, curve = tmp_path / "out" / "r.json", tmp_path / "plots" / "deep" / "cmc.png"
    result = invoke("evaluate", tmp_path / "last.pt", "--json", report, "--cmc-plot", curve)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["dataset"] == "tiny"
    assert curve.read_bytes().startswith(b"\x89PNG")
    assert leftovers(report.parent) == [] and leftovers(curve.parent) == []


def test_failed_json_write_leaves_neither_file_nor_temporary(
    tmp_path: Path, evaluations, monkeypatch
):
    real_write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[:10], *args, **kwargs)  # half of it reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    target = tmp_path / "r.json"
    result = invoke("evaluate", tmp_path / "last.pt", "--json", target)
    one_line_error(result, f"cannot write --json {target}: No space left", "free some disk")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_cmc_plot_write_is_one_line(tmp_path: Path, evaluations, monkeypatch):
    from reidkit.retrieval import visualize

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(visualize, "_write_png", denied)
    target = tmp_path / "cmc.png"
    result = invoke("evaluate", tmp_path / "last.pt", "--cmc-plot", target)
    one_line_error(result, f"cannot write --cmc-plot {target}: Permission denied", "permissions")


# ------------------------------------------------------------------ search --save / --top


@pytest.fixture
def searches(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(search_module, "search_index", lambda *a, **k: calls.append(a) or [])
    return calls


def test_save_that_is_a_folder_is_refused_before_searching(tmp_path: Path, searches):
    result = invoke("search", tmp_path / "q.jpg", "--save", tmp_path)
    one_line_error(result, f"--save {tmp_path} is a folder; give a file path")
    assert searches == []


def test_unwritable_save_is_one_line(tmp_path: Path, searches, monkeypatch):
    def denied(results, out):
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(search_module, "save_results_montage", denied)
    target = tmp_path / "ranked.png"
    result = invoke("search", tmp_path / "q.jpg", "--save", target)
    one_line_error(result, f"cannot write --save {target}: Permission denied", "permissions")


@pytest.mark.parametrize("top", ["0", "-3"])
def test_top_below_one_is_a_usage_error(tmp_path: Path, searches, top):
    result = invoke("search", tmp_path / "q.jpg", "--top", top)
    assert result.exit_code == 2 and "--top" in result.stderr
    assert searches == []


# ------------------------------------------------------------------ prepare, train, extract


def test_unreadable_source_folder_is_one_line(tmp_path: Path, monkeypatch):
    from reidkit.data import prepare as prepare_module

    source = tmp_path / "my-set"
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (source / folder).mkdir(parents=True)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(prepare_module.os, "scandir", denied)
    result = invoke("prepare", "custom", tmp_path / "root", "--source", source)
    one_line_error(
        result,
        f"{source / 'bounding_box_train'}: Permission denied",
        "check its permissions or choose another path",
    )


def test_train_out_under_a_file_is_one_line(tiny_overrides, tmp_path: Path):
    (tmp_path / "file").write_text("in the way")
    settings = [arg for item in tiny_overrides for arg in ("--set", item)]
    result = invoke("train", "--out", tmp_path / "file" / "run", *settings)
    target = tmp_path / "file" / "run"
    one_line_error(result, f"cannot write --out {target}", "is a file, not a folder")


def test_section_names_in_a_message_are_printed_not_swallowed_as_markup(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text('[paper.market1501]\nrank1 = "abc"\nrank5 = 1\nrank10 = 1\nmAP = 1\n')
    line = one_line_error(invoke("train", "--preset", path))
    assert "[paper.market1501] rank1 = 'abc' must be a number" in line


def test_extract_without_index_option_leaves_the_kind_to_the_checkpoint(
    tmp_path: Path, monkeypatch
):
    seen = {}

    def fake_build(checkpoint, out, **kwargs):
        seen.update(kwargs)
        return search_module.ExtractResult(out, None, 3, 1, 0, 3, 1.0, 1)

    monkeypatch.setattr(search_module, "build_gallery_index", fake_build)
    assert invoke("extract", tmp_path / "last.pt", "--dataset", "tiny").exit_code == 0
    assert seen["index_kind"] is None
    assert (
        invoke("extract", tmp_path / "last.pt", "--dataset", "x", "--index", "hnsw").exit_code == 0
    )
    assert seen["index_kind"] == "hnsw"


# ------------------------------------------------------------------ runs that cannot proceed


def untrained_checkpoint(config: RunConfig, path: Path, num_ids: int = 8) -> Path:
    model = build_model(config, num_ids)
    save_checkpoint(path, Checkpoint(config, model.state_dict(), num_ids, 0, "pcb"))
    return path


def test_rerank_on_too_few_images_says_how_many_are_needed(tiny_config, tmp_path: Path):
    checkpoint = untrained_checkpoint(tiny_config(), tmp_path / "last.pt")
    small = tmp_path / "data" / "small"
    small.mkdir(parents=True)
    rows = "".join(
        f"img{i}.jpg,{i % 2 + 1},{i % 2},{'query' if i < 2 else 'gallery'}\n" for i in range(6)
    )
    (small / "manifest.csv").write_text("path,pid,camid,split\n" + rows)
    result = invoke(
        "evaluate", checkpoint, "--dataset", "small", "--data-root", tmp_path / "data", "--rerank"
    )
    one_line_error(
        result, "re-ranking needs at least 21 query and gallery images", "'small' has 6", "--rerank"
    )


def singular_solve(*args, **kwargs):
    raise torch.linalg.LinAlgError("The solver failed because the input matrix is singular.")


def test_failure_in_the_first_epoch_says_nothing_was_saved(
    tiny_overrides, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(torch.linalg, "solve", singular_solve)
    settings = [arg for item in tiny_overrides for arg in ("--set", item)]
    run = tmp_path / "run"
    line = one_line_error(invoke("train", "--out", run, *settings), "epoch 1, step 1")
    assert "no epoch completed, so no checkpoint was saved; train again with" in line
    assert "--set attention.landmark_weight=2" in line
    assert "last.pt keeps" not in line and not (run / "last.pt").exists()


def test_failure_after_an_epoch_names_the_epoch_last_pt_keeps(
    tiny_config, tiny_overrides, tmp_path: Path, monkeypatch
):
    # a run stopped after epoch 1 of 2 (the tiny set has 8 training identities), resumed
    config = tiny_config("train.epochs=2")
    model = build_model(config, 8)
    optimizer = train_module._build_optimizer(model, config)
    run = tmp_path / "run"
    save_checkpoint(
        run / "last.pt",
        Checkpoint(config, model.state_dict(), 8, 1, "pcb", optimizer=optimizer.state_dict()),
    )
    monkeypatch.setattr(torch.linalg, "solve", singular_solve)
    settings = [arg for item in (*tiny_overrides, "train.epochs=2") for arg in ("--set", item)]
    line = one_line_error(invoke("train", "--out", run, "--resume", *settings))
    assert "singular at epoch 2, step 1" in line
    assert "last.pt keeps epoch 1, the last completed one; start a new run (another --out)" in line
