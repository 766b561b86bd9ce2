"""A wrong file given as a checkpoint: one line saying what it is not, never a traceback, and
pickle named only where a pickle holding objects is what the file is."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from reidkit.cli import app

runner = CliRunner()


def random_bytes(length: int, first: bytes = b"") -> Callable[[Path, Path], bytes]:
    def make(run: Path, tmp: Path) -> bytes:
        data = np.random.default_rng(length).bytes(length)
        return first + data[len(first) :] if first else data.replace(b"PK", b"pk")

    return make


def truncated(fraction: float) -> Callable[[Path, Path], bytes]:
    def make(run: Path, tmp: Path) -> bytes:
        data = (run / "last.pt").read_bytes()
        return data[: max(8, int(len(data) * fraction))]

    return make


def state_dict(run: Path, tmp: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), buffer)
    return buffer.getvalue()


def torch_file_with_objects(run: Path, tmp: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": "reidkit-checkpoint", "model": np.zeros(3)}, buffer)
    return buffer.getvalue()


def faiss_index(run: Path, tmp: Path) -> bytes:
    import faiss

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def npy(run: Path, tmp: Path) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ones((3, 8), dtype=np.float32))
    return buffer.getvalue()


def zip_of_text(run: Path, tmp: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    return buffer.getvalue()


NOT_PYTORCH = "is not a PyTorch file"
NOT_REIDKIT = "is a PyTorch file but not a reidkit checkpoint"
TRUNCATED = "is truncated or damaged"
OBJECTS = "holds Python objects that only pickle can load"

CASES = {
    "random 1 byte": (random_bytes(1), NOT_PYTORCH),
    "random 7 bytes": (random_bytes(7), NOT_PYTORCH),
    "random 100 bytes": (random_bytes(100), NOT_PYTORCH),
    "random 5000 bytes": (random_bytes(5000), NOT_PYTORCH),
    "random 200 bytes after a pickle header": (random_bytes(200, b"\x80\x02"), NOT_PYTORCH),
    "random 300 bytes after a zip header": (random_bytes(300, b"PK\x03\x04"), TRUNCATED),
    "empty file": (lambda run, tmp: b"", "is empty"),
    "text file": (lambda run, tmp: b"hello, this is not a model\n", NOT_PYTORCH),
    "the run's metrics.csv": (lambda run, tmp: (run / "metrics.csv").read_bytes(), NOT_PYTORCH),
    "the run's config.toml": (lambda run, tmp: (run / "config.toml").read_bytes(), NOT_PYTORCH),
    "the run's curves.png": (lambda run, tmp: (run / "curves.png").read_bytes(), NOT_PYTORCH),
    "features.npy": (npy, NOT_PYTORCH),
    "index.faiss": (faiss_index, NOT_PYTORCH),
    "a zip archive of text": (zip_of_text, "is a zip archive, not a PyTorch file"),
    "checkpoint cut to 50%": (truncated(0.5), TRUNCATED),
    "checkpoint cut to 99%": (truncated(0.99), TRUNCATED),
    "checkpoint cut to 8 bytes": (truncated(0.0), TRUNCATED),
    "a plain state dict": (state_dict, NOT_REIDKIT),
    "a pickle of plain data": (
        lambda run, tmp: pickle.dumps({"a": 1}),
        "is a pickle of plain data, not a PyTorch file",
    ),
    "a pickle holding an object": (lambda run, tmp: pickle.dumps(Fraction(1, 2)), OBJECTS),
    "a PyTorch file holding an object": (torch_file_with_objects, OBJECTS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_file_as_checkpoint_is_one_line_saying_what_it_is_not(
    tiny_checkpoint: Path, tmp_path: Path, case: str
):
    make, expected = CASES[case]
    path = tmp_path / "given.pt"
    path.write_bytes(make(tiny_checkpoint.parent, tmp_path))
    result = runner.invoke(app, ["evaluate", str(path), "--data-root", str(tmp_path)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and str(path) in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    if expected not in (OBJECTS, "is a pickle of plain data, not a PyTorch file"):
        assert "pickle" not in lines[0], lines[0]


def test_a_folder_as_checkpoint_says_it_is_a_folder(tiny_checkpoint: Path):
    result = runner.invoke(app, ["evaluate", str(tiny_checkpoint.parent)])
    assert result.exit_code == 1
    assert "is a folder, not a file" in result.stderr and "does not exist" not in result.stderr
