"""`evaluate` and `extract` find datasets the same way: --data-root, else $REIDKIT_DATA, else
the root the checkpoint was trained from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data.loading import manifest_path, read_manifest
from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.models.net import build_model

runner = CliRunner()


def invoke(*args: str | Path):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def smaller_copy(tiny_root: Path, root: Path, gallery: int) -> Path:
    """Another data root whose `tiny` has the same queries and only `gallery` gallery images."""
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    rows = pd.concat(
        [frame[frame["split"] == "query"], frame[frame["split"] == "gallery"].head(gallery)]
    )
    (root / "tiny").mkdir(parents=True)
    rows.to_csv(root / "tiny" / "manifest.csv", index=False)
    return root


def gallery_sizes(checkpoint: Path, tmp_path: Path, *options: str | Path) -> tuple[int, int]:
    """(gallery images `evaluate` ranked, images `extract --dataset tiny` indexed)."""
    report = tmp_path / "report.json"
    invoke("evaluate", checkpoint, "--dataset", "tiny", "--json", report, *options)
    index = tmp_path / "index"
    invoke("extract", checkpoint, "--dataset", "tiny", "--out", index, *options)
    indexed = len(pd.read_csv(index / "meta.csv"))
    return json.loads(report.read_text())["num_gallery"], indexed


def test_data_root_option_then_environment_then_the_checkpoints_root(
    tiny_config, tiny_root: Path, tmp_path: Path, monkeypatch
):
    config = tiny_config()  # trained with data.root = tiny_root, 22 gallery images
    assert config.data.root == str(tiny_root)
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(
        checkpoint, Checkpoint(config, build_model(config, 8).state_dict(), 8, 0, "pcb")
    )
    environment = smaller_copy(tiny_root, tmp_path / "env-data", gallery=7)
    option = smaller_copy(tiny_root, tmp_path / "option-data", gallery=5)

    monkeypatch.delenv("REIDKIT_DATA", raising=False)
    assert gallery_sizes(checkpoint, tmp_path) == (22, 22)
    monkeypatch.setenv("REIDKIT_DATA", str(environment))
    assert gallery_sizes(checkpoint, tmp_path) == (7, 7)
    assert gallery_sizes(checkpoint, tmp_path, "--data-root", option) == (5, 5)
