"""`compare`: finished runs side by side, evaluated once and remembered."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import tomli_w
from PIL import Image

from reidkit.config import PaperRow, config_to_dict
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine.checkpoint import load_checkpoint, save_checkpoint
from reidkit.engine.compare import (
    EVALUATION_NAME,
    comparison_figure,
    comparison_frame,
    reference_notes,
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


def test_evaluation_is_kept_and_redone_only_when_the_run_mode_or_dataset_changes(
    runs, tiny_config, tiny_root, tmp_path
):
    calls: list = []
    folder = tmp_path / "run"
    data = tmp_path / "data"  # a copy of the tiny set, so that it can be re-prepared
    shutil.copytree(tiny_root / "tiny", data / "tiny")
    fit(tiny_config("train.epochs=2", f"data.root={data}"), folder, progress=False, stop_after=1)
    summarise_run(folder, evaluate=counting(calls), progress=False)
    saved = json.loads((folder / EVALUATION_NAME).read_text())
    assert saved["epoch"] == 1 and saved["ap_mode"] == "torchreid"
    summarise_run(folder, evaluate=counting(calls), progress=False)
    assert len(calls) == 1  # reused
    summarise_run(folder, ap_mode="official", evaluate=counting(calls), progress=False)
    assert calls[-1][1] == "official" and len(calls) == 2
    fit(tiny_config("train.epochs=2", f"data.root={data}"), folder, resume=True, progress=False)
    assert summarise_run(folder, ap_mode="official", evaluate=counting(calls)).epoch == 2
    assert len(calls) == 3  # a newer checkpoint is evaluated again
    summarise_run(folder, ap_mode="official", evaluate=counting(calls), progress=False)
    assert len(calls) == 3
    # the dataset changes under the run (one gallery image fewer): its evaluation is stale
    manifest = data / "tiny" / "manifest.csv"
    frame = pd.read_csv(manifest)
    frame.drop(index=frame.index[frame["split"] == "gallery"][-1]).to_csv(manifest, index=False)
    summary = summarise_run(folder, ap_mode="official", evaluate=counting(calls), progress=False)
    assert len(calls) == 4
    saved = json.loads((folder / EVALUATION_NAME).read_text())
    assert saved["num_gallery"] == int((frame["split"] == "gallery").sum()) - 1
    assert saved["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert summary.epoch == 2


def test_table_markdown_and_plot(runs, tmp_path):
    summaries = [summarise_run(runs[name], progress=False) for name in ("csalr", "pcb")]
    frame = comparison_frame(summaries)
    assert list(frame["run"]) == ["csalr", "pcb"]
    # two runs of preset smoke: the settings that tell them apart, as --set writes them
    assert list(frame["preset"]) == ["smoke", "smoke"]
    assert list(frame["settings"]) == ["attention.kind=csalr", "attention.kind=none"]
    # the pcb run carries a row for "tiny", but tiny is synthetic: not shown, and said why
    assert frame["paper R1"].isna().all() and frame["paper mAP"].isna().all()
    notes = reference_notes(summaries)
    assert notes == [
        "csalr: no reference row: preset smoke has no published numbers",
        "pcb: no reference row: tiny is a synthetic dataset, not an official benchmark",
    ]
    # minutes, not a fraction of an hour
    minutes = sum(row["seconds"] for row in load_checkpoint(runs["pcb"] / "last.pt").history) / 60
    assert frame.loc[1, "train min"] == round(minutes, 1) and "train hours" not in frame
    markdown = to_markdown(frame, notes)
    lines = markdown.splitlines()
    assert lines[0].startswith("| run | preset | settings | dataset | rank1 |")
    assert lines[4:] == ["", *(f"- {note}" for note in notes)]
    out = save_comparison_plot(summaries, tmp_path / "compare.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["compare.png"]


def test_a_comparable_run_shows_its_row_and_the_plot_labels_every_bar(
    runs, tiny_root, tmp_path, monkeypatch
):
    # The tiny set stands in for a verified official one: its record says so, and a preset
    # file with the run's own model, input and epochs stands in for a shipped one.
    data = tmp_path / "data"
    shutil.copytree(tiny_root / "tiny", data / "market1501")
    record = data / "market1501" / "dataset.json"
    record.write_text(json.dumps({"dataset": "market1501", "variant": None, "verified": True}))
    state = load_checkpoint(runs["pcb"] / "last.pt")
    config = replace(
        state.config,
        name="tiny-paper",
        data=replace(state.config.data, root=str(data), dataset="market1501"),
        paper={"market1501": PaperRow(rank1=92.3, rank5=None, rank10=None, mAP=77.4)},
    )
    preset = tmp_path / "tiny-paper.toml"
    preset.write_text(tomli_w.dumps(config_to_dict(replace(config, paper={}))))
    monkeypatch.setattr(evaluate_module, "available_presets", lambda: {"tiny-paper": preset})
    run = tmp_path / "paper-run"
    run.mkdir()
    save_checkpoint(run / "last.pt", replace(state, config=config))
    summaries = [summarise_run(run, progress=False), summarise_run(runs["csalr"], progress=False)]
    frame = comparison_frame(summaries)
    assert frame.loc[0, "paper R1"] == 92.3 and frame.loc[0, "paper mAP"] == 77.4
    assert reference_notes(summaries) == [
        "csalr: no reference row: preset smoke has no published numbers"
    ]
    (ax,) = comparison_figure(summaries).axes
    # every bar carries its value, above the bar and above its published mark, so that a bar
    # at 0 reads as a score of 0, not as missing data
    values = [(s.rank1, s.paper and s.paper.rank1) for s in summaries]
    values += [(s.mAP, s.paper and s.paper.mAP) for s in summaries]
    bars = [bar for container in ax.containers for bar in container]
    assert len(ax.texts) == len(bars) == len(values)
    for text, bar, (value, published) in zip(ax.texts, bars, values, strict=True):
        assert text.get_text() == f"{value:.1f}"
        x, y = text.xy
        assert x == bar.get_x() + bar.get_width() / 2 and y == max(value, published or 0)
        assert bar.get_height() == value


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        summarise_run(tmp_path)
