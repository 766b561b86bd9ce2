"""Interrupted runs: temporaries of a killed writer are cleaned up, Ctrl-C says what was kept,
and `--resume` continues a run with its own settings (only safe ones may change)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.train import fit


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_resume_removes_the_temporary_a_killed_checkpoint_write_left(
    tiny_config, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    config = tiny_config("train.epochs=2")
    fit(config, run, progress=False, stop_after=1)
    stale = run / f".last.pt.reidkit-tmp-{dead_pid()}-0123abcd"
    stale.write_bytes(b"\0" * 4096)  # what a kill -9 during torch.save leaves
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    fit(config, run, progress=False, resume=True)
    assert not stale.exists() and (run / "notes.txt").read_text() == "mine"
    lines = [line for line in capsys.readouterr().err.splitlines() if "temporary" in line]
    assert len(lines) == 1 and stale.name in lines[0] and str(run) in lines[0]
    assert load_checkpoint(run / "last.pt").epoch == 2
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]
