"""Checkpoints: round trip without pickle, atomic replacement, clear refusals."""

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from reidkit.config import apply_overrides, load_preset
from reidkit.engine.checkpoint import (
    Checkpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from reidkit.errors import CheckpointError


def small_checkpoint(epoch: int = 3) -> Checkpoint:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    config = apply_overrides(load_preset("smoke"), ["train.epochs=9"])
    return Checkpoint(
        config=config,
        model=model.state_dict(),
        num_ids=2,
        epoch=epoch,
        head="pcb",
        optimizer=optimizer.state_dict(),
        rng=capture_rng(),
        history=[{"epoch": 1.0, "loss": 2.5}],
    )


def test_round_trip_keeps_weights_config_and_state(tmp_path: Path):
    original = small_checkpoint()
    save_checkpoint(tmp_path / "last.pt", original)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded.config == original.config
    assert loaded.epoch == 3 and loaded.num_ids == 2 and loaded.head == "pcb"
    for key, value in original.model.items():
        assert torch.equal(loaded.model[key], value)
    momentum = original.optimizer["state"][0]["momentum_buffer"]
    assert torch.equal(loaded.optimizer["state"][0]["momentum_buffer"], momentum)
    assert loaded.history == [{"epoch": 1.0, "loss": 2.5}]
    # the file needs no pickle: the strict loader reads it on its own
    assert torch.load(tmp_path / "last.pt", weights_only=True)["format"] == "reidkit-checkpoint"


def test_rng_capture_restores_every_generator():
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_save_leaves_no_temporary_file(tmp_path: Path):
    save_checkpoint(tmp_path / "last.pt", small_checkpoint())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_checkpoint(epoch=1))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, small_checkpoint(epoch=2))
    monkeypatch.undo()
    assert load_checkpoint(path).epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_process_killed_mid_save_leaves_previous_checkpoint_loadable(tmp_path: Path):
    """A real SIGKILL while a large checkpoint is being written."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_checkpoint(epoch=1))
    script = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from reidkit.config import load_preset
        from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
        big = {{f"w{{i}}": torch.randn(1_000_000) for i in range(75)}}  # 300 MB
        print("ready", flush=True)
        save_checkpoint(Path({str(path)!r}), Checkpoint(load_preset("smoke"), big, 2, 2, "pcb"))
        print("saved", flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    # wait until the temporary file is being written, then kill the writer
    while not list(tmp_path.glob(".last.pt.reidkit-tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".last.pt.reidkit-tmp-*")), "the child never started writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(path).epoch == 1


def test_missing_checkpoint_names_the_file_and_the_fix(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"nothing\.pt does not exist; train one"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_pickled_object_is_refused_without_running_it(tmp_path: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "reidkit-checkpoint", "x": Payload()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="only pickle can load"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_plain_state_dict_is_not_a_reidkit_checkpoint(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="is a PyTorch file but not a reidkit checkpoint"):
        load_checkpoint(path)


def test_truncated_file_is_reported(tmp_path: Path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, small_checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or damaged"):
        load_checkpoint(path)


def edited_payload(path: Path, **changes) -> Path:
    """A checkpoint that keeps the marker but has `changes` applied (None deletes a key)."""
    save_checkpoint(path, small_checkpoint())
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del payload[key]
        else:
            payload[key] = value
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"config": None}, "it lacks config"),
        ({"model": None, "epoch": None}, "it lacks model, epoch"),
        ({"num_ids": None}, "it lacks num_ids"),
        ({"format_version": "1"}, "format_version '1' is not an integer"),
        ({"config": [1, 2]}, "config is not a table"),
        ({"model": [1, 2]}, "model is not a state dict"),
        ({"model": {"weight": 3}}, "model is not a state dict"),
        ({"num_ids": "many"}, "num_ids 'many' is not a positive integer"),
        ({"num_ids": 0}, "num_ids 0 is not a positive integer"),
        ({"epoch": 2.5}, "epoch 2.5 is not a count"),
        ({"head": "svm"}, "head 'svm' is none of pcb, rpp, global"),
        ({"optimizer": [1]}, "optimizer is not a table"),
        ({"history": 5}, "history is not a list"),
    ],
)
def test_edited_checkpoint_is_refused_naming_the_key(tmp_path: Path, changes, fragment):
    path = edited_payload(tmp_path / "last.pt", **changes)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "damaged reidkit checkpoint" in message
    assert fragment in message


def test_load_model_refuses_a_checkpoint_whose_model_is_not_a_state_dict(tmp_path: Path):
    from reidkit.engine.checkpoint import load_model

    path = edited_payload(tmp_path / "last.pt", model=[torch.zeros(2)])
    with pytest.raises(CheckpointError, match="model is not a state dict"):
        load_model(path)
