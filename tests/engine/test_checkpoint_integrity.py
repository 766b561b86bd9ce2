"""Damaged checkpoints and interrupted saves: a checksum over every tensor, checked at load;
non-finite weights and features refused in one line; Ctrl-C or a full disk while last.pt is
written end in one line, the previous last.pt intact."""

from __future__ import annotations

import errno
import shutil
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reidkit.api import GalleryIndex, load_model
from reidkit.cli import app
from reidkit.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from reidkit.engine.search import search_index
from reidkit.errors import CheckpointError, NumericalError
from reidkit.models.net import build_model

runner = CliRunner()


def one_line(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def built(tiny_config, tmp_path_factory) -> Path:
    """A checkpoint of a built (untrained) tiny model without attention: cheap to evaluate."""
    config = tiny_config("attention.kind=none")
    path = tmp_path_factory.mktemp("built") / "last.pt"
    save_checkpoint(path, Checkpoint(config, build_model(config, 8).state_dict(), 8, 1, "pcb"))
    return path


@pytest.fixture(scope="module")
def overflowing(built: Path) -> Path:
    """Finite weights whose features are not: the last BatchNorm scales by 3e38, so its
    output overflows to infinity and every unit-length feature becomes NaN."""
    state = load_checkpoint(built)
    weights = dict(state.model)
    weights["trunk.layer4.1.bn2.weight"] = torch.full_like(
        weights["trunk.layer4.1.bn2.weight"], 3e38
    )
    path = built.with_name("overflow.pt")
    save_checkpoint(path, replace(state, model=weights))
    return path


def flip_bytes(path: Path, count: int, *, largest: bool) -> str:
    """XOR `count` bytes at the start of one tensor's data inside the zip (the largest tensor,
    or the smallest that holds `count` bytes) with 0x55; returns the entry's name."""
    with zipfile.ZipFile(path) as archive:
        entries = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= count]
        info = (max if largest else min)(entries, key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0x55 for b in data))
    return info.filename


@pytest.mark.parametrize(("count", "largest"), [(400_000, True), (2, False)])
def test_flipped_bytes_inside_a_tensor_are_refused_at_load(built, tmp_path, count, largest):
    path = tmp_path / "copy.pt"
    path.write_bytes(built.read_bytes())
    flip_bytes(path, count, largest=largest)
    payload = torch.load(path, weights_only=True)  # torch itself notices nothing
    if not largest:  # two low mantissa bytes: a wrong weight, still finite
        assert all(
            torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point()
        )
    with pytest.raises(CheckpointError, match="do not match the checksum stored in it"):
        load_checkpoint(path)
    # and from the command line, one line naming the file, before any work
    one_line(runner.invoke(app, ["evaluate", str(path)]), str(path), "damaged")


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_weight(built, tmp_path):
    state = load_checkpoint(built)
    weights = dict(state.model)
    weights["head.classifier.weight"] = weights["head.classifier.weight"].clone()
    key = next(k for k in weights if k.endswith("conv1.weight"))
    weights[key] = weights[key].clone()
    weights[key][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(path, replace(state, model=weights))  # a valid checksum: it is the values
    with pytest.raises(CheckpointError, match=f"1 of the .* values of {key} are NaN or infinite"):
        load_checkpoint(path)


def test_non_finite_features_are_refused_by_evaluate_extract_search_and_the_api(
    overflowing, tiny_root, tmp_path
):
    query = sorted((tiny_root / "tiny" / "query").glob("*.jpg"))[0]
    one_line(runner.invoke(app, ["evaluate", str(overflowing)]), "NaN or infinite features")
    result = runner.invoke(
        app, ["extract", str(overflowing), "--dataset", "tiny", "--out", str(tmp_path / "i")]
    )
    one_line(result, "NaN or infinite features for image ")
    assert not (tmp_path / "i").exists()
    model = load_model(overflowing)
    with pytest.raises(NumericalError, match="NaN or infinite features"):
        model.embed([query])
    # an index whose checkpoint gives NaN for the query: search refuses instead of ranking
    index = GalleryIndex.build(np.eye(3, dtype=np.float32), paths=["a.jpg", "b.jpg", "c.jpg"])
    index.info["checkpoint"] = str(overflowing)
    index.save(tmp_path / "index")
    with pytest.raises(NumericalError, match=f"features for image {query}"):
        search_index([query], tmp_path / "index")
    with pytest.raises(NumericalError, match="NaN or infinite values in 1 of 3 rows"):
        GalleryIndex.build(np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 1.0]]))


def test_export_of_a_model_with_non_finite_features_fails_its_check(
    overflowing, tmp_path, monkeypatch
):
    pytest.importorskip("onnxruntime")
    from reidkit.engine.export import export_onnx

    traced = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: traced.append(1))
    out = tmp_path / "model.onnx"
    with pytest.raises(
        NumericalError,
        match=f"PyTorch gives NaN or infinite features.*nothing was written to {out}",
    ):
        export_onnx(overflowing, out)
    assert list(tmp_path.iterdir()) == []
    assert traced == []  # refused on PyTorch's features, before the exporter's long trace


# ------------------------------------------------------------------ interrupted saves


def failing_save(monkeypatch, error: BaseException) -> None:
    """torch.save stops after 4 kB with `error`, as Ctrl-C or a full disk does: torch's zip
    writer then fails on its own while it unwinds."""
    real_save = torch.save

    class Stopping:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise error
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, Stopping(f), *a, **k))


@pytest.mark.parametrize(
    ("error", "code", "fragments"),
    [
        (KeyboardInterrupt(), 130, ("interrupted in epoch 3", "keeps epoch 2", "--resume")),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            1,
            ("cannot save epoch 3 to", "No space left on device; free some disk space", "epoch 2"),
        ),
    ],
)
def test_a_checkpoint_save_cut_short_is_one_line_and_keeps_the_previous_last_pt(
    tiny_checkpoint, tmp_path, monkeypatch, error, code, fragments
):
    run = tmp_path / "run"  # a copy of the two-epoch run, extended by one epoch
    shutil.copytree(tiny_checkpoint.parent, run)
    failing_save(monkeypatch, error)
    result = runner.invoke(app, ["train", "--out", str(run), "--resume", "--set", "train.epochs=3"])
    line = one_line(result, *fragments, code=code)
    assert str(run / "last.pt") in line and "unexpected pos" not in line
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt").epoch == 2
    assert not [p for p in run.iterdir() if "reidkit-tmp" in p.name]
