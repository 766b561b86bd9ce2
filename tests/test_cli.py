"""The command line end to end on the tiny synthetic set: train, evaluate, extract, search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.data.loading import manifest_path, read_manifest
from reidkit.engine import train as train_module

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str, code: int = 1) -> None:
    """A user error: the given exit code, one red line naming the problem, no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_presets_lists_every_preset_with_its_description():
    result = invoke("presets")
    assert result.exit_code == 0
    for name in ("smoke", "pcb", "pcb-csalr", "pcb-rpp-csalr"):
        assert name in result.stdout
    assert "96 landmarks x 2 groups" in result.stdout


def test_train_passes_typed_overrides_and_the_canonical_dataset(monkeypatch, tmp_path: Path):
    seen = {}

    def fake_fit(config, out, *, resume):
        seen.update(config=config, out=out, resume=resume)
        return tmp_path / "last.pt"

    monkeypatch.setattr(train_module, "fit", fake_fit)
    result = invoke(
        "train",
        "--preset",
        "pcb-csalr",
        "--dataset",
        "duke",
        "--data-root",
        tmp_path,
        "--set",
        "attention.groups=4",
        "--set",
        "attention.grid=6,4",
        "--out",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.data.dataset == "dukemtmc-reid" and config.data.root == str(tmp_path)
    assert config.attention.groups == 4 and config.attention.grid == (6, 4)
    # --resume takes the run's own settings from its checkpoint (test_train_interrupted.py)
    assert seen["out"] == tmp_path / "run" and seen["resume"] is False


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--preset", "nonesuch"), "unknown preset 'nonesuch'"),
        (("--set", "train.epochz=2"), "unknown key train.epochz"),
        (("--set", "attention.grid=5,4"), "does not divide"),
    ],
)
def test_train_refuses_bad_settings_in_one_line(args, fragment):
    one_line_error(invoke("train", *args), fragment)


def test_train_without_a_prepared_dataset_says_to_prepare(tmp_path: Path):
    result = invoke("train", "--data-root", tmp_path, "--set", "train.epochs=1")
    one_line_error(result, "reidkit prepare")


def test_train_evaluate_extract_search_round_trip(tiny_overrides, tiny_root, tmp_path: Path):
    run = tmp_path / "run"
    settings = [arg for item in (*tiny_overrides, "train.epochs=2") for arg in ("--set", item)]
    trained = invoke("train", "--preset", "smoke", "--out", run, *settings)
    assert trained.exit_code == 0, trained.output
    assert {"last.pt", "metrics.csv", "curves.png", "config.toml"} <= {
        p.name for p in run.iterdir()
    }

    report = tmp_path / "report.json"
    cmc = tmp_path / "cmc.png"
    evaluated = invoke(
        "evaluate", run / "last.pt", "--json", report, "--cmc-plot", cmc, "--ap-mode", "official"
    )
    assert evaluated.exit_code == 0, evaluated.output
    for field in ("R1", "R5", "R10", "mAP", "mINP", "AP mode: official", "valid queries"):
        assert field in evaluated.stdout
    numbers = json.loads(report.read_text())
    assert numbers["ap_mode"] == "official" and numbers["dataset"] == "tiny"
    assert numbers["valid_queries"] + numbers["skipped_queries"] == numbers["num_query"]
    assert 0 <= numbers["mAP"] <= 100 and len(numbers["cmc"]) > 0
    assert cmc.read_bytes().startswith(b"\x89PNG")

    index = tmp_path / "index"
    extracted = invoke("extract", run / "last.pt", "--dataset", "tiny", "--out", index)
    assert extracted.exit_code == 0, extracted.output
    frame = read_manifest(manifest_path(tiny_root, "tiny"))
    queries = list(frame[frame["split"] == "query"]["path"][:2])
    montage = tmp_path / "ranked.png"
    searched = invoke("search", *queries, "--index", index, "--top", "3", "--save", montage)
    assert searched.exit_code == 0, searched.output
    assert montage.read_bytes().startswith(b"\x89PNG")
    for query in queries:
        assert Path(query).name in searched.stdout

    one_line_error(invoke("search", tmp_path / "nope.jpg", "--index", index), "nope.jpg")
    one_line_error(invoke("search", queries[0], "--index", tmp_path / "none"), "reidkit extract")


def test_evaluate_refuses_a_checkpoint_of_the_wrong_kind(tmp_path: Path):
    weights = tmp_path / "resnet50.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    one_line_error(invoke("evaluate", weights), "is a PyTorch file but not a reidkit checkpoint")
    one_line_error(invoke("evaluate", tmp_path / "missing.pt"), "does not exist")


def test_evaluate_on_an_unprepared_dataset_says_to_prepare(tiny_checkpoint, tmp_path: Path):
    result = invoke("evaluate", tiny_checkpoint, "--dataset", "duke", "--data-root", tmp_path)
    one_line_error(result, "reidkit prepare")


def test_bad_option_values_are_usage_errors(tiny_checkpoint):
    one_line_error(invoke("evaluate", tiny_checkpoint, "--ap-mode", "mean"), "--ap-mode", 2)
    one_line_error(invoke("extract", tiny_checkpoint, "--split", "test"), "--split", 2)


def test_bot_csalr_preset_trains_evaluates_and_extracts_through_the_cli(
    tiny_overrides, tmp_path: Path
):
    # the tiny set's overrides (ResNet-18 at 96x32, whose 24x8 / 12x4 / 6x2 maps the preset's
    # 8x8 grid does not divide; their 3x2 does), with P x K = 2 x 4 batches
    run = tmp_path / "run"
    sets = [*tiny_overrides, "train.epochs=1", "data.instances=4", "train.warmup_epochs=0"]
    settings = [arg for item in sets for arg in ("--set", item)]
    trained = invoke("train", "--preset", "bot-csalr", "--out", run, *settings)
    assert trained.exit_code == 0, trained.output
    metrics = (run / "metrics.csv").read_text().splitlines()
    assert "loss_triplet" in metrics[0].split(",") and metrics[1].split(",")[1] == "global"
    evaluated = invoke("evaluate", run / "last.pt", "--json", tmp_path / "eval.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "eval.json").read_text())["feature"] == "h"
    extracted = invoke("extract", run / "last.pt", "--dataset", "tiny", "--out", tmp_path / "index")
    assert extracted.exit_code == 0, extracted.output
    features = np_load(tmp_path / "index" / "features.npy")
    assert features.shape[1] == 512  # ResNet-18's one global feature, after BNNeck


def np_load(path: Path):
    import numpy as np

    return np.load(path)
