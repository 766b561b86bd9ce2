"""`compare`: finished runs side by side, evaluated once and remembered."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from reidkit.config import PaperRow
from reidkit.engine.checkpoint import load_checkpoint, save_checkpoint
from reidkit.engine.compare import (
    EVALUATION_NAME,
    comparison_frame,
    save_comparison_plot,
    summarise_run,
    to_markdown,
)
from reidkit.engine.evaluate import run_evaluation
from reidkit.engine.train import fit
from reidkit.errors import CheckpointError


@pytest.fixture(scope="module")
def runs(tiny_config, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    folders = {}
    for name, sets in (("csalr", ()), ("pcb", ("attention.kind=none",))):
        fit(tiny_config("train.epochs=2", *sets), base / name, progress=False)
        folders[name] = base / name
    # a paper row for the tiny dataset, as a paper preset carries for market1501
    path = folders["pcb"] / "last.pt"
    state = load_checkpoint(path)
    paper = {"tiny": PaperRow(rank1=92.3, rank5=97.2, rank10=98.2, mAP=77.4)}
    save_checkpoint(path, replace(state, config=replace(state.config, paper=paper)))
    return folders


def counting(calls: list):
    def evaluate(checkpoint, **kwargs):
        calls.append((checkpoint, kwargs["ap_mode"]))
        return run_evaluation(checkpoint, **kwargs)

    return evaluate


def test_summary_holds_the_evaluation_and_the_training_costs(runs):
    summary = summarise_run(runs["csalr"], progress=False)
    report = run_evaluation(runs["csalr"] / "last.pt", progress=False).as_dict()
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert getattr(summary, key) == pytest.approx(report[key])
    history = load_checkpoint(runs["csalr"] / "last.pt").history
    assert summary.train_seconds == pytest.approx(sum(row["seconds"] for row in history))
    assert summary.epoch == summary.epochs == 2 and summary.dataset == "tiny"
    assert summary.peak_memory_mib == max(row["peak_memory_mib"] for row in history) > 0
    assert summary.paper is None


def test_evaluation_is_kept_and_redone_only_when_the_run_or_mode_changes(
    runs, tiny_config, tmp_path
):
    calls: list = []
    folder = tmp_path / "run"
    fit(tiny_config("train.epochs=2"), folder, progress=False, stop_after=1)
    summarise_run(folder, evaluate=counting(calls), progress=False)
    saved = json.loads((folder / EVALUATION_NAME).read_text())
    assert saved["epoch"] == 1 and saved["ap_mode"] == "torchreid"
    summarise_run(folder, evaluate=counting(calls), progress=False)
    assert len(calls) == 1  # reused
    summarise_run(folder, ap_mode="official", evaluate=counting(calls), progress=False)
    assert calls[-1][1] == "official" and len(calls) == 2
    fit(tiny_config("train.epochs=2"), folder, resume=True, progress=False)  # epoch 2
    assert summarise_run(folder, ap_mode="official", evaluate=counting(calls)).epoch == 2
    assert len(calls) == 3  # a newer checkpoint is evaluated again


def test_table_markdown_and_plot(runs, tmp_path):
    summaries = [summarise_run(runs[name], progress=False) for name in ("csalr", "pcb")]
    frame = comparison_frame(summaries)
    assert list(frame["run"]) == ["csalr", "pcb"]
    assert frame.loc[1, "paper R1"] == 92.3 and frame.loc[1, "paper mAP"] == 77.4
    assert pd.isna(frame.loc[0, "paper R1"])  # no paper row for that preset
    markdown = to_markdown(frame)
    lines = markdown.splitlines()
    assert lines[0].startswith("| run | preset | dataset | rank1 |") and len(lines) == 4
    out = save_comparison_plot(summaries, tmp_path / "compare.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["compare.png"]


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        summarise_run(tmp_path)
