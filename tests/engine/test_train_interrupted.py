"""Interrupted runs: temporaries of a killed writer are cleaned up, Ctrl-C says what was kept,
and `--resume` continues a run with its own settings (only safe ones may change)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import train as train_module
from reidkit.engine.checkpoint import load_checkpoint
from reidkit.engine.train import fit

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


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


# ------------------------------------------------------------------ Ctrl-C


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_ctrl_c_in_training_keeps_the_last_complete_epoch_and_says_how_to_resume(
    tiny_overrides, tmp_path: Path, monkeypatch
):
    real_epoch = train_module._train_one_epoch

    def stopped_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train_module, "_train_one_epoch", stopped_in_epoch_2)
    run = tmp_path / "run"
    settings = [a for item in (*tiny_overrides, "train.epochs=3") for a in ("--set", item)]
    result = invoke("train", "--out", run, *settings)
    assert result.exit_code == 130, result.output
    (line,) = stderr_lines(result)
    assert "interrupted in epoch 2" in line
    assert f"{run / 'last.pt'} keeps epoch 1, the last complete one" in line
    assert "epoch 2 was cut short and dropped" in line
    assert line.endswith(f"resume with: reidkit train --out {run} --resume")
    assert "Traceback" not in result.output
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert not [p for p in run.iterdir() if "reidkit-tmp" in p.name]
    monkeypatch.undo()
    command = line.split("resume with: reidkit ", 1)[1].split()  # the printed command works
    resumed = invoke(*command)
    assert resumed.exit_code == 0, resumed.output
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2, 3]


def test_ctrl_c_in_the_first_epoch_says_no_checkpoint_was_saved(
    tiny_overrides, tmp_path: Path, monkeypatch
):
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_train_one_epoch", stopped)
    run = tmp_path / "run"
    settings = [a for item in tiny_overrides for a in ("--set", item)]
    result = invoke("train", "--out", run, *settings)
    assert result.exit_code == 130
    (line,) = stderr_lines(result)
    assert "no epoch completed, so no checkpoint was saved" in line
    assert not (run / "last.pt").exists()


def test_ctrl_c_in_extract_leaves_no_index_and_gives_the_command(
    tmp_path: Path, monkeypatch, tiny_checkpoint
):
    from reidkit.engine import shards as shards_module  # where extraction embeds

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "extract_features", stopped)
    out = tmp_path / "index"
    result = invoke("extract", tiny_checkpoint, "--dataset", "tiny", "--out", out)
    assert result.exit_code == 130, result.output
    (line,) = stderr_lines(result)
    assert f"{out} was not written" in line
    assert f"run again with: reidkit extract {tiny_checkpoint} --dataset tiny" in line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_saving_the_index_keeps_the_previous_one(
    tmp_path: Path, monkeypatch, tiny_checkpoint
):
    from reidkit.retrieval import index as index_module

    out = tmp_path / "index"
    assert invoke("extract", tiny_checkpoint, "--dataset", "tiny", "--out", out).exit_code == 0
    before = (out / "features.npy").read_bytes()
    real_save = index_module.np.save

    def stopped(*args, **kwargs):
        real_save(*args, **kwargs)
        if Path(str(args[0])).name == "features.npy":  # the index's, not a feature shard's
            raise KeyboardInterrupt

    monkeypatch.setattr(index_module.np, "save", stopped)
    result = invoke("extract", tiny_checkpoint, "--dataset", "tiny", "--out", out)
    assert result.exit_code == 130
    (line,) = stderr_lines(result)
    assert f"{out} was not written (an index already there is unchanged)" in line
    assert (out / "features.npy").read_bytes() == before
    # the embedding had finished: its shards are kept, so running again only saves the index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "index.shards"]
    assert f"finished feature shard(s) are kept in {out}.shards" in line


# ------------------------------------------------------------------ --resume


def first_run(tiny_overrides, run: Path, *extra: str) -> None:
    settings = [a for item in (*tiny_overrides, *extra) for a in ("--set", item)]
    result = invoke("train", "--out", run, *settings)
    assert result.exit_code == 0, result.output


def test_bare_resume_extends_a_run_with_its_own_settings(
    tiny_overrides, tiny_root: Path, tmp_path: Path, monkeypatch
):
    run = tmp_path / "run"
    # a data root given relative to the folder the run was started from
    monkeypatch.chdir(tiny_root.parent)
    first_run(tiny_overrides, run, "train.epochs=1", "train.lr=0.02", f"data.root={tiny_root.name}")
    assert load_checkpoint(run / "last.pt").config.data.root == str(tiny_root)  # stored absolute
    # none of the first run's --set repeated: they come from the checkpoint, whose data root
    # still names the dataset from another working folder
    monkeypatch.chdir(tmp_path)
    result = invoke("train", "--out", run, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert "resumed from epoch 1 of 2" in result.stdout
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    assert list(metrics["lr"]) == [0.02, 0.02]  # the run's own rate, not the preset's
    state = load_checkpoint(run / "last.pt")
    assert state.epoch == 2 and state.config.train.epochs == 2
    assert state.config.model.arch == "resnet18"


def test_resume_refuses_a_changed_setting_naming_the_key(tiny_overrides, tmp_path: Path):
    run = tmp_path / "run"
    first_run(tiny_overrides, run, "train.epochs=1")
    before = (run / "last.pt").read_bytes()
    result = invoke("train", "--out", run, "--resume", "--set", "train.lr=0.5")
    assert result.exit_code == 1
    (line,) = stderr_lines(result)
    assert "--set train.lr cannot change" in line and "train.epochs" in line
    assert (run / "last.pt").read_bytes() == before


def test_resume_accepts_repeating_the_runs_own_value(tiny_overrides, tmp_path: Path):
    run = tmp_path / "run"
    first_run(tiny_overrides, run, "train.epochs=1")
    settings = [a for item in (*tiny_overrides, "train.epochs=2") for a in ("--set", item)]
    result = invoke("train", "--out", run, "--resume", *settings)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "last.pt").epoch == 2


def test_resume_may_not_shorten_a_run(tiny_overrides, tmp_path: Path):
    run = tmp_path / "run"
    first_run(tiny_overrides, run, "train.epochs=3")
    result = invoke("train", "--out", run, "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 1
    assert "may only be extended" in result.stderr


def test_extending_an_rpp_run_keeps_its_pcb_stage(tiny_config, tmp_path: Path):
    run = tmp_path / "run"
    rpp = ("model.head=rpp", "train.rpp_epochs=1", "train.rpp_classifier_epochs=1")
    fit(tiny_config("train.epochs=2", *rpp), run, progress=False, stop_after=1)
    result = invoke("train", "--out", run, "--resume", "--set", "train.epochs=3")
    assert result.exit_code == 0, result.output
    # one PCB epoch, as planned; the added epoch goes to the RPP stage
    assert list(pd.read_csv(run / "metrics.csv")["stage"]) == ["pcb", "rpp-classifier", "rpp"]
    assert load_checkpoint(run / "last.pt").config.train.rpp_epochs == 2
