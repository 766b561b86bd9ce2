"""`reidkit export`, `reidkit attention` and `reidkit compare` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data.loading import manifest_path, read_manifest
from reidkit.engine import export as export_module
from reidkit.engine.attention_maps import attention_maps
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.evaluate import run_evaluation
from reidkit.engine.train import fit

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def image(tiny_root) -> Path:
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    return tiny_root / frame[frame["split"] == "query"]["path"].iloc[0]


def test_export_writes_a_model_onnxruntime_runs_with_the_checkpoints_input(
    tiny_checkpoint, tmp_path
):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = tmp_path / "models" / "tiny.onnx"
    result = invoke("export", tiny_checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    assert "worst cosine" in result.stdout and str(out) in result.stdout
    config = load_checkpoint(tiny_checkpoint).config
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).normal(size=(3, 3, config.data.height, config.data.width))
    (features,) = session.run(None, {"images": images.astype(np.float32)})
    assert features.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    meta = session.get_modelmeta().custom_metadata_map
    assert f"{config.data.height} x {config.data.width}" in meta["input"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx"]


def test_export_without_onnx_is_one_line_naming_the_extra(tiny_checkpoint, tmp_path, monkeypatch):
    def missing():
        raise export_module.ExportMissingError("export needs: pip install 'reidkit[export]'")

    monkeypatch.setattr(export_module, "import_onnx", missing)
    result = invoke("export", tiny_checkpoint, "--out", tmp_path / "m.onnx")
    one_line_error(result, "reidkit[export]")
    assert not list(tmp_path.iterdir())


def test_export_refuses_an_output_it_cannot_write(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    one_line_error(invoke("export", tiny_checkpoint, "--out", blocker / "m.onnx"), "--out")
    assert blocker.read_text() == "mine"


def test_attention_points_stage_and_group_reach_the_figure(tiny_checkpoint, image, tmp_path):
    out = tmp_path / "fig.png"
    args = ("--stage", 2, "--group", 1, "--point", "10,5", "--point", "80,20", "--out", out)
    result = invoke("attention", tiny_checkpoint, image, *args)
    assert result.exit_code == 0, result.output
    expected = attention_maps(tiny_checkpoint, image, stage=2, group=1, points=[(10, 5), (80, 20)])
    assert expected.stage == 2 and len(expected.points) == 2
    for i, cell in enumerate(expected.points):
        assert f"{cell[0]}, {cell[1]}" in result.stdout
        assert f"{expected.errors[i]:.4f}" in result.stdout
    assert "after stage 2, group 1" in result.stdout
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]


@pytest.mark.parametrize(
    ("args", "fragment", "code"),
    [
        (("--point", "ten,5"), "--point 'ten,5'", 2),
        (("--stage", 4), "not 4", 1),
        (("--group", 7), "--group 0-1", 1),
    ],
)
def test_attention_bad_options_are_one_line(tiny_checkpoint, image, tmp_path, args, fragment, code):
    result = invoke("attention", tiny_checkpoint, image, *args, "--out", tmp_path / "f.png")
    one_line_error(result, fragment, code)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def two_runs(tiny_config, tiny_checkpoint, tmp_path_factory) -> list[Path]:
    other = tmp_path_factory.mktemp("runs") / "pcb"
    fit(tiny_config("train.epochs=1", "attention.kind=none"), other, progress=False)
    return [Path(tiny_checkpoint).parent, other]


def test_compare_writes_markdown_csv_and_png_with_each_runs_evaluation(two_runs, tmp_path):
    prefix = tmp_path / "out" / "table"
    result = invoke("compare", *two_runs, "--ap-mode", "official", "--out", prefix)
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(prefix.with_name("table.csv"))
    assert list(frame["run"]) == [run.name for run in two_runs]
    assert list(frame["epochs"]) == ["2/2", "1/1"]
    assert list(frame["AP mode"]) == ["official", "official"]
    for run, row in zip(two_runs, frame.itertuples(), strict=True):
        report = run_evaluation(run / "last.pt", ap_mode="official", progress=False)
        assert row.mAP == pytest.approx(report.as_dict()["mAP"], abs=0.01)
        saved = json.loads((run / "evaluation.json").read_text())
        assert saved["ap_mode"] == "official"
    markdown = prefix.with_name("table.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(two_runs) and table[0].startswith("| run | preset |")
    # below it, why neither run has a published row (smoke has none), then reidkit's mark (a
    # later --out may replace the file)
    notes = markdown.splitlines()[len(table) + 1 : -1]
    assert notes == [f"- {run.name}: no reference row: preset smoke has no published numbers"
                     for run in two_runs]  # fmt: skip
    assert markdown.splitlines()[-1].startswith("<!-- written_by: reidkit ")
    assert [line for line in result.stdout.splitlines() if "no reference row" in line] == [
        note[2:] for note in notes
    ]
    with Image.open(prefix.with_name("table.png")) as png:
        assert png.format == "PNG"


def test_compare_names_a_folder_that_is_not_a_run(two_runs, tmp_path):
    result = invoke("compare", two_runs[0], tmp_path, "--out", tmp_path / "t")
    one_line_error(result, "is not a run folder")
    assert not list(tmp_path.iterdir())
