"""`reidkit evaluate` end to end on the tiny set: what its table and `--json` say, and where
its settings come from."""

from __future__ import annotations

import json
from pathlib import Path

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
