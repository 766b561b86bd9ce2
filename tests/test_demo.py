"""`reidkit demo`: the whole pipeline on the tiny synthetic set."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.config import available_presets, load_preset
from reidkit.data.loading import read_manifest
from reidkit.engine import demo as demo_module
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.demo import demo_config, run_demo


def demo_settings(tiny_overrides: list[str]) -> tuple[str, ...]:
    """The tiny model and one epoch; the demo itself names the dataset and its root."""
    keep = [o for o in tiny_overrides if not o.startswith(("data.dataset=", "data.root="))]
    return (*keep, "train.epochs=1")


def test_the_demo_trains_smoke_without_stripe_dropout_while_every_preset_keeps_it(tmp_path):
    demo = demo_config(tmp_path / "data")
    smoke = load_preset("smoke")
    assert demo.model.dropout == 0
    # the one change: the same preset, data, input, schedule and epochs otherwise
    assert demo.name == smoke.name and demo.train == smoke.train
    assert demo.data.dataset == "synthetic" and demo.data.root == str(tmp_path / "data")
    assert (demo.data.height, demo.data.width) == (smoke.data.height, smoke.data.width)
    # the paper presets (and smoke itself) keep PCB's dropout 0.5 on the pooled stripes
    assert {name: load_preset(name).model.dropout for name in available_presets()} == dict.fromkeys(
        available_presets(), 0.5
    )
    # a value the user sets wins over the demo's
    assert demo_config(tmp_path, ("model.dropout=0.3",)).model.dropout == 0.3


def test_demo_runs_the_pipeline_then_reuses_the_finished_run(
    tiny_spec, tiny_overrides, tmp_path: Path, monkeypatch
):
    out = tmp_path / "demo"
    settings = demo_settings(tiny_overrides)
    first = run_demo(out, overrides=settings, spec=tiny_spec, progress=False)

    assert first.trained and not first.dataset.reused
    assert first.checkpoint == out / "run" / "last.pt"
    trained = load_checkpoint(first.checkpoint)
    assert trained.epoch == 1
    assert trained.config.model.dropout == 0  # what demo_config sets is what was trained
    for picture in (first.curves_png, first.ranked_png):
        assert picture.read_bytes().startswith(b"\x89PNG"), picture
    assert {"index.faiss", "features.npy", "meta.csv", "info.json"} <= {
        p.name for p in first.index.iterdir()
    }
    # 4 test identities, each queried once in one of 2 cameras: 3 x 2 - 1 images of each stay
    # in the gallery, plus 2 distractors
    assert (first.report.num_query, first.report.num_gallery) == (4, 22)
    assert first.report.dataset == "synthetic"
    # a query keeps 20 of the 22 (its 2 same-camera twins go) and 3 of them are true matches
    assert first.chance_rank1 == pytest.approx(3 / 20)
    frame = read_manifest(first.dataset.manifest)
    assert first.search.query == Path(frame[frame["split"] == "query"]["path"].iloc[0])
    assert [m.rank for m in first.search.matches] == list(range(1, 11))

    # the second run, through the command line, must not train again
    def no_training(*args, **kwargs):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr(demo_module, "fit", no_training)
    checkpoint_bytes = first.checkpoint.read_bytes()
    results, steps = [], []

    def tiny_demo(out, *, step, **kwargs):
        def shown_step(text: str) -> None:
            steps.append(text)
            step(text)

        kwargs.update(overrides=settings, spec=tiny_spec, progress=False)
        results.append(run_demo(out, step=shown_step, **kwargs))
        return results[-1]

    monkeypatch.setattr(demo_module, "run_demo", tiny_demo)
    # the README's set-up runs `.venv/bin/reidkit demo` without activating the environment
    monkeypatch.setattr(sys, "argv", [".venv/bin/reidkit", "demo"])
    monkeypatch.setenv("PATH", os.defpath)
    shown = CliRunner().invoke(app, ["demo", "--out", str(out)], env={"COLUMNS": None})
    assert shown.exit_code == 0, shown.output
    (second,) = results
    assert not second.trained and second.dataset.reused
    assert first.checkpoint.read_bytes() == checkpoint_bytes
    assert f"2/5 reusing the finished run in {out / 'run'}" in steps
    printed = "".join(shown.stdout.split())  # Rich wraps long paths at the console's width
    assert "".join(steps[1].split()) in printed
    # rank-1 over 4 valid queries is a multiple of 1/4, and the printed table carries it
    rank1 = second.report.metrics.rank(1)
    assert rank1 == first.report.metrics.rank(1)
    assert 4 * rank1 == int(4 * rank1)
    printed_rank1 = re.search(r"reidkit\W+(\d+\.\d)", shown.stdout)  # the table's first cell
    assert printed_rank1 and float(printed_rank1.group(1)) == pytest.approx(100 * rank1)
    assert "chance rank-1 (random ranking): 15.0%" in shown.stdout
    assert f"ranked{second.ranked_png}" in printed
    # the suggested search runs in that shell: bare `reidkit` would be "command not found"
    try_line = f"try: .venv/bin/reidkit search {second.search.query} --index {second.index}"
    assert shown.stdout.splitlines()[-1] == try_line
