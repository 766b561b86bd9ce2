"""Output paths: `extract --out` deletes nothing it did not write, and every output option is
checked for writability before the work starts, naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine import demo as demo_module
from reidkit.engine import evaluate as evaluate_module
from reidkit.engine import search as search_module
from reidkit.engine import train as train_module
from reidkit.retrieval.index import INDEX_MARKER

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A user's folder of photos, inside a folder of other files."""
    folder = tmp_path / "album" / "photos"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 96), (40 * i, 80, 120)).save(folder / f"000{i}_c1_x.jpg")
    (tmp_path / "album" / "notes.txt").write_text("mine")
    return folder


@pytest.fixture
def no_model_loads(monkeypatch) -> list:
    """Record checkpoint loads: a refused --out must be refused before any of them."""
    calls = []

    def fake(path):
        calls.append(path)
        raise AssertionError("the checkpoint was read before --out was checked")

    monkeypatch.setattr(search_module, "load_model", fake)
    return calls


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("album/notes.txt", "is a file"),
        ("album", "holds the --images folder"),
        ("album/photos", "is the --images folder"),
        ("album/photos/index", "is inside the --images folder"),
    ],
)
def test_extract_out_over_user_files_or_the_images_is_refused_and_nothing_is_deleted(
    tmp_path: Path, photos: Path, no_model_loads, target, fragment
):
    before = snapshot(tmp_path)
    out = tmp_path / target
    result = invoke("extract", tmp_path / "last.pt", "--images", photos, "--out", out)
    one_line_error(result, f"--out {out}", fragment)
    assert snapshot(tmp_path) == before and no_model_loads == []


def test_extract_out_over_a_folder_of_user_files_is_refused(tmp_path: Path, no_model_loads):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = invoke("extract", tmp_path / "last.pt", "--dataset", "tiny", "--out", mine)
    one_line_error(result, f"--out {mine}", f"without reidkit's {INDEX_MARKER} marker")
    assert (mine / "thesis.tex").read_text() == "years of work" and no_model_loads == []


def test_extract_replaces_its_own_index_folder(tiny_checkpoint: Path, tmp_path: Path, photos):
    out = tmp_path / "index"
    first = invoke("extract", tiny_checkpoint, "--images", photos, "--out", out)
    assert first.exit_code == 0, first.output
    assert (out / INDEX_MARKER).is_file()
    (photos / "0003_c2_x.jpg").write_bytes((photos / "0000_c1_x.jpg").read_bytes())
    second = invoke("extract", tiny_checkpoint, "--images", photos, "--out", out)
    assert second.exit_code == 0, second.output
    assert len((out / "meta.csv").read_text().splitlines()) == 1 + 4  # the new index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["album", "index"]


# ------------------------------------------------------------------ writability, before work


UNWRITABLE = Path("/proc/reidkit-test/x")


def test_extract_out_that_cannot_be_written_names_the_option(tmp_path: Path, no_model_loads):
    result = invoke("extract", tmp_path / "last.pt", "--dataset", "tiny", "--out", UNWRITABLE)
    one_line_error(result, f"cannot write --out {UNWRITABLE}", "choose another path")
    assert no_model_loads == [] and "reidkit-tmp" not in result.stderr


def test_train_out_that_cannot_be_written_is_refused_before_reading_data(
    tiny_overrides, monkeypatch
):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before --out was checked")

    monkeypatch.setattr(train_module, "read_manifest", no_data)
    settings = [arg for item in tiny_overrides for arg in ("--set", item)]
    result = invoke("train", "--out", UNWRITABLE, *settings)
    one_line_error(result, f"cannot write --out {UNWRITABLE}")


@pytest.mark.parametrize("option", ["--json", "--cmc-plot"])
def test_evaluate_outputs_that_cannot_be_written_are_refused_first(
    tmp_path: Path, monkeypatch, option
):
    calls = []
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda *a, **k: calls.append(a))
    result = invoke("evaluate", tmp_path / "last.pt", option, UNWRITABLE / "r.out")
    one_line_error(result, f"cannot write {option} {UNWRITABLE / 'r.out'}")
    assert calls == []


def test_search_save_that_cannot_be_written_is_refused_first(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(search_module, "search_index", lambda *a, **k: calls.append(a) or [])
    result = invoke("search", tmp_path / "q.jpg", "--save", UNWRITABLE / "ranked.png")
    one_line_error(result, f"cannot write --save {UNWRITABLE / 'ranked.png'}")
    assert calls == []


def test_demo_out_that_cannot_be_written_is_refused_first(monkeypatch):
    calls = []
    monkeypatch.setattr(demo_module, "run_demo", lambda *a, **k: calls.append(a))
    one_line_error(invoke("demo", "--out", UNWRITABLE), f"cannot write --out {UNWRITABLE}")
    assert calls == []


def test_demo_out_that_is_a_file_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(demo_module, "run_demo", lambda *a, **k: None)
    (tmp_path / "f").write_text("x")
    one_line_error(invoke("demo", "--out", tmp_path / "f"), f"--out {tmp_path / 'f'} is a file")
