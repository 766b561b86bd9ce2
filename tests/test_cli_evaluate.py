"""`reidkit evaluate` end to end on the tiny set: what its table and `--json` say, and where
its settings come from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import RunConfig
from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.models.net import build_model

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def untrained_checkpoint(config: RunConfig, path: Path, num_ids: int = 8) -> Path:
    model = build_model(config, num_ids)
    save_checkpoint(path, Checkpoint(config, model.state_dict(), num_ids, 0, "pcb"))
    return path


def evaluate_json(*args: str | Path, out: Path) -> dict:
    result = invoke("evaluate", *args, "--json", out)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


CHECKPOINT_EVAL = ("eval.ap_mode=official", "eval.rerank=true", "eval.flip=true", "eval.feature=h")


def test_every_evaluate_option_defaults_to_the_checkpoints_eval_settings(
    tiny_config, tmp_path: Path
):
    plain = untrained_checkpoint(tiny_config(), tmp_path / "plain.pt")
    changed = untrained_checkpoint(tiny_config(*CHECKPOINT_EVAL), tmp_path / "changed.pt")
    keys = ("ap_mode", "rerank", "flip", "feature")

    report = evaluate_json(plain, out=tmp_path / "plain.json")
    assert {k: report[k] for k in keys} == {
        "ap_mode": "torchreid",
        "rerank": False,
        "flip": False,
        "feature": "g",
    }
    report = evaluate_json(changed, out=tmp_path / "changed.json")
    assert {k: report[k] for k in keys} == {
        "ap_mode": "official",
        "rerank": True,
        "flip": True,
        "feature": "h",
    }
    # and an option given on the command line wins over the checkpoint's setting
    args = ("--ap-mode", "torchreid", "--no-rerank", "--no-flip", "--feature", "g")
    report = evaluate_json(changed, *args, out=tmp_path / "overridden.json")
    assert {k: report[k] for k in keys} == {
        "ap_mode": "torchreid",
        "rerank": False,
        "flip": False,
        "feature": "g",
    }


def custom_csv(tiny_root: Path, path: Path, *, with_cameras: bool) -> Path:
    """The tiny set's images as a custom CSV, with or without its camid column."""
    frame = pd.read_csv(tiny_root / "tiny" / "manifest.csv")
    frame["path"] = [str(tiny_root / "tiny" / p) for p in frame["path"]]
    columns = ["path", "pid", "camid", "split"] if with_cameras else ["path", "pid", "split"]
    frame[columns].to_csv(path, index=False)
    return path


@pytest.mark.parametrize("with_cameras", [True, False], ids=["camid", "no-camid"])
def test_without_camera_ids_evaluate_says_the_camera_rule_was_off(
    tiny_config, tiny_root: Path, tmp_path: Path, with_cameras: bool
):
    root = tmp_path / "data"
    csv = custom_csv(tiny_root, tmp_path / "people.csv", with_cameras=with_cameras)
    prepared = invoke("prepare", "custom", root, "--source", csv, "--name", "people")
    assert prepared.exit_code == 0, prepared.output
    checkpoint = untrained_checkpoint(tiny_config(), tmp_path / "last.pt")
    out = tmp_path / "r.json"
    result = invoke(
        "evaluate", checkpoint, "--dataset", "people", "--data-root", root, "--json", out
    )
    assert result.exit_code == 0, result.output
    printed = " ".join(result.stdout.split())
    report = json.loads(out.read_text())
    if with_cameras:
        assert "protocol: single query; same pid and camera removed; AP mode" in printed
        assert "camera rule off" not in printed and "not comparable" not in printed
        assert report["camera_rule"] is True and report["comparable_with_published"] is True
        assert report["protocol"] == "single query; same pid and camera removed"
    else:
        assert "protocol: single query; camera rule off: the dataset has no camera ids" in printed
        assert "the scores are not comparable with published results; AP mode" in printed
        assert report["camera_rule"] is False and report["comparable_with_published"] is False
        assert "camera rule off" in report["protocol"]
        assert "not comparable with published results" in report["protocol"]


def test_evaluate_prints_the_chance_rank1_and_its_json_traces_what_was_evaluated(
    tiny_config, tiny_root: Path, tmp_path: Path
):
    checkpoint = untrained_checkpoint(tiny_config("eval.ap_mode=official"), tmp_path / "c.pt")
    out = tmp_path / "r.json"
    result = invoke("evaluate", checkpoint, "--json", out)
    assert result.exit_code == 0, result.output
    # 4 queries, each in one of 2 cameras: of the 22 gallery images a query keeps 20 (its 2
    # same-camera twins go), 3 of them its own identity: 3/20 at random
    assert "chance rank-1 (random ranking): 15.0%" in result.stdout
    report = json.loads(out.read_text())
    assert report["chance_rank1"] == pytest.approx(15.0)

    manifest = pd.read_csv(tiny_root / "tiny" / "manifest.csv")
    query, gallery = (manifest[manifest["split"] == s] for s in ("query", "gallery"))
    assert report["checkpoint"] == str(checkpoint.resolve())
    assert report["dataset"] == "tiny" and report["preset"] == "smoke"
    assert (report["num_query"], report["num_gallery"]) == (len(query), len(gallery)) == (4, 22)
    assert report["query_ids"] == query["pid"].nunique() == 4
    assert report["gallery_ids"] == gallery["pid"].nunique()
    assert report["protocol"] == "single query; same pid and camera removed"
    assert report["camera_rule"] is True
    assert report["ap_mode"] == "official" and report["averaged_queries"] == 4
    assert (report["rerank"], report["flip"], report["feature"]) == (False, False, "g")


@pytest.mark.parametrize(
    ("ap_mode", "chance"),
    # 4 queries at 3/20 each (see above), and a fifth whose identity is not in the gallery:
    # skipped by torchreid's average, a 0 in the official one
    [("torchreid", "15.0%"), ("official", "12.0%")],
)
def test_the_chance_rank1_is_averaged_as_the_ap_mode_averages(
    tiny_config, tiny_root: Path, tmp_path: Path, ap_mode: str, chance: str
):
    frame = pd.read_csv(tiny_root / "tiny" / "manifest.csv")
    frame["path"] = [str(tiny_root / "tiny" / p) for p in frame["path"]]
    stranger = frame[frame["split"] == "train"].head(1).assign(split="query")
    root = tmp_path / "data"
    (root / "plus").mkdir(parents=True)
    pd.concat([frame, stranger]).to_csv(root / "plus" / "manifest.csv", index=False)
    checkpoint = untrained_checkpoint(tiny_config(), tmp_path / "last.pt")
    result = invoke(
        "evaluate", checkpoint, "--dataset", "plus", "--data-root", root, "--ap-mode", ap_mode
    )
    assert result.exit_code == 0, result.output
    assert f"chance rank-1 (random ranking): {chance}" in result.stdout
