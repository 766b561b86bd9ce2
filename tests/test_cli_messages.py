"""What the command line says to a new user: suggested commands that run, paths named for what
they are, help that lists choices."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.terminal import invoked_as

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code: int = 1) -> str:
    """The one `error:` line of a refused command (no traceback)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (("train", "--preset", "pcb-csalr"), "reidkit prepare market1501 {root}`"),
        (("train", "--preset", "pcb-csalr", "--dataset", "duke"), "prepare dukemtmc-reid {root}`"),
        (("train", "--preset", "pcb-csalr", "--dataset", "msmt"), "reidkit prepare msmt17 {root}`"),
        (
            ("train", "--preset", "pcb-csalr", "--dataset", "cuhk03-np-labeled"),
            "reidkit prepare cuhk03-np {root} --variant labeled`",
        ),
    ],
)
def test_a_missing_dataset_suggests_a_prepare_command_that_exists(tmp_path: Path, args, command):
    line = error_line(invoke(*args, "--data-root", tmp_path))
    assert command.format(root=tmp_path) in line
    if "labeled" not in command:
        assert "--variant" not in line  # `--variant default` is refused by prepare


def untrained_checkpoint(config, path: Path, num_ids: int = 8) -> Path:
    from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
    from reidkit.models.net import build_model

    model = build_model(config, num_ids)
    save_checkpoint(path, Checkpoint(config, model.state_dict(), num_ids, 0, "pcb"))
    return path


def test_a_checkpoint_that_is_a_folder_is_named_as_a_folder(tiny_config, tmp_path: Path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    for command in ("evaluate", "extract"):
        line = error_line(invoke(command, empty, "--dataset", "tiny"))
        assert f"checkpoint {empty} is a folder" in line and "does not exist" not in line
        assert "runs/<name>/last.pt" in line
    run = tmp_path / "run"
    untrained_checkpoint(tiny_config(), run / "last.pt")
    line = error_line(invoke("evaluate", run))
    assert (
        f"checkpoint {run} is a folder, not a file; give the checkpoint file inside it, "
        f"{run}/last.pt" in line
    )


def test_a_query_that_is_a_folder_or_images_that_are_a_file_are_named_so(
    tiny_config, tiny_root: Path, tmp_path: Path
):
    from reidkit.engine.search import build_gallery_index

    checkpoint = untrained_checkpoint(tiny_config(), tmp_path / "last.pt")
    index = build_gallery_index(checkpoint, tmp_path / "index", dataset="tiny", progress=False).out
    queries = tiny_root / "tiny" / "query"
    line = error_line(invoke("search", queries, "--index", index))
    assert f"query image {queries} is a folder; give image files" in line
    assert "does not exist" not in line
    one_image = next(queries.iterdir())
    line = error_line(invoke("extract", checkpoint, "--images", one_image))
    assert f"--images {one_image} is a file; give the folder that holds the images" in line


def test_search_caps_the_montage_at_20_matches_and_says_so(
    tiny_config, tiny_root: Path, tmp_path: Path
):
    from PIL import Image

    from reidkit.engine.search import build_gallery_index

    checkpoint = untrained_checkpoint(tiny_config(), tmp_path / "last.pt")
    index = build_gallery_index(checkpoint, tmp_path / "index", dataset="tiny", progress=False).out
    query = sorted((tiny_root / "tiny" / "query").iterdir())[0]
    montage = tmp_path / "ranked.png"
    result = invoke("search", query, "--index", index, "--top", "1000", "--save", montage)
    assert result.exit_code == 0, result.output
    # the table lists all 22 gallery images
    assert all(f" {rank} " in result.stdout for rank in (1, 21, 22))
    assert "the montage shows the top 20 of the 22 matches per query" in result.stdout
    # 64-pixel tiles with 4-pixel borders (72) and 4-pixel gaps, 16 after the query: the query,
    # then 20 ranked tiles
    with Image.open(montage) as picture:
        assert picture.width == 4 + 72 + 16 + 20 * 72 + 19 * 4 + 4
    small = invoke("search", query, "--index", index, "--top", "20", "--save", montage)
    assert small.exit_code == 0 and "the montage shows" not in small.stdout


@pytest.mark.parametrize(
    ("command", "listed"),
    [
        ("prepare", ["[detected|labeled]"]),
        ("evaluate", ["[torchreid|official]", "[g|h]"]),
        ("extract", ["[query|gallery|train]", "[flat|ivf|hnsw]", "[g|h]"]),
    ],
)
def test_help_lists_the_choices_of_choice_options(command, listed):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for choices in listed:
        assert choices in result.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("evaluate", "x.pt", "--ap-mode", "mean"),
            "--ap-mode 'mean': choose torchreid or official",
        ),
        (("evaluate", "x.pt", "--feature", "z"), "--feature 'z': choose g or h"),
        (("extract", "x.pt", "--split", "test"), "--split 'test': choose query, gallery or train"),
        (("extract", "x.pt", "--index", "ann"), "--index 'ann': choose flat, ivf or hnsw"),
        (
            ("prepare", "cuhk03", "data", "--variant", "hand"),
            "--variant 'hand': choose detected or labeled",
        ),
    ],
)
def test_a_value_outside_the_choices_is_one_line_with_exit_code_2(args, line):
    assert line in error_line(invoke(*args), code=2)


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"reidkit {version('reidkit')}\n"


def test_a_preset_that_is_a_folder_and_an_index_that_is_a_file_are_named_so(tmp_path: Path):
    folder = tmp_path / "mine.toml"
    folder.mkdir()
    line = error_line(invoke("train", "--preset", folder))
    assert f"preset file {folder} is a folder; give a .toml file" in line
    index_file = tmp_path / "index.faiss"
    index_file.write_bytes(b"\0" * 16)
    line = error_line(invoke("search", tmp_path / "q.jpg", "--index", index_file))
    assert f"--index {index_file} is a file; give the folder `reidkit extract` wrote" in line


def test_suggested_commands_call_reidkit_as_this_shell_reaches_it(tmp_path: Path, monkeypatch):
    bin_folder = tmp_path / ".venv" / "bin"
    bin_folder.mkdir(parents=True)
    (bin_folder / "reidkit").write_text("#!/bin/sh\n")
    (bin_folder / "reidkit").chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/reidkit", "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert invoked_as() == ".venv/bin/reidkit"  # not activated: bare `reidkit` is not found
    monkeypatch.setenv("PATH", f"{bin_folder}:/usr/bin:/bin")
    assert invoked_as() == "reidkit"  # `source .venv/bin/activate` put it on PATH
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "reidkit" / "__main__.py"), "demo"])
    assert invoked_as() == f"{sys.executable} -m reidkit"
