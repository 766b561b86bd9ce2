"""Output that is not a terminal (CliRunner's, like a file, a pipe or CI): no blank lines
where progress bars were, and no path, table row or command folded onto two lines."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from reidkit.cli import app
from reidkit.engine.checkpoint import Checkpoint, save_checkpoint
from reidkit.models.net import build_model

runner = CliRunner()


def invoke(*args: str | Path):
    # no COLUMNS: what a pipe gets (a set $COLUMNS still decides the width)
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": None})
    assert result.exit_code == 0, result.output
    return result


def no_blank_lines(text: str) -> None:
    lines = text.splitlines()
    assert all(line.strip() for line in lines), lines


def deep(tmp_path: Path) -> Path:
    """A folder whose path is far longer than 80 columns."""
    folder = tmp_path / ("a-folder-with-a-long-name-" * 4) / "and-another-one-below-it"
    folder.mkdir(parents=True)
    return folder


def test_piped_evaluate_extract_and_search_print_no_blank_or_folded_lines(
    tiny_config, tiny_root: Path, tmp_path: Path
):
    folder = deep(tmp_path)
    config = tiny_config()
    checkpoint = folder / "last.pt"
    save_checkpoint(
        checkpoint, Checkpoint(config, build_model(config, 8).state_dict(), 8, 0, "pcb")
    )

    report = folder / "results.json"
    evaluated = invoke("evaluate", checkpoint, "--json", report)
    no_blank_lines(evaluated.stdout)
    no_blank_lines(evaluated.stderr)
    assert f"results: {report}" in evaluated.stdout.splitlines()

    index = folder / "index"
    extracted = invoke("extract", checkpoint, "--dataset", "tiny", "--out", index)
    no_blank_lines(extracted.stdout)
    no_blank_lines(extracted.stderr)
    assert f"index: {index} (index.faiss, features.npy, meta.csv, info.json)" in (
        extracted.stdout.splitlines()
    )

    query = sorted((tiny_root / "tiny" / "query").iterdir())[0]
    montage = folder / "ranked.png"
    searched = invoke("search", query, "--index", index, "--top", "3", "--save", montage)
    no_blank_lines(searched.stdout)
    assert f"montage: {montage}" in searched.stdout.splitlines()
    # every ranked gallery path is whole on its table row
    matched = pd.read_csv(index / "meta.csv")["path"]
    rows = [line for line in searched.stdout.splitlines() if "/bounding_box_test/" in line]
    assert len(rows) == 3 and all(any(path in row for path in matched) for row in rows)


def test_piped_prepare_prints_no_blank_lines(tiny_root: Path, tmp_path: Path):
    frame = pd.read_csv(tiny_root / "tiny" / "manifest.csv")
    frame["path"] = [str(tiny_root / "tiny" / p) for p in frame["path"]]
    csv = tmp_path / "people.csv"
    frame.to_csv(csv, index=False)
    root = deep(tmp_path)
    prepared = invoke("prepare", "custom", root, "--source", csv, "--name", "people")
    no_blank_lines(prepared.stdout)
    no_blank_lines(prepared.stderr)
    assert any(
        str(root / "people" / "manifest.csv") in line for line in prepared.stdout.splitlines()
    )


def test_piped_attention_table_keeps_its_title_whole_and_takes_percent_points(
    tiny_checkpoint, tiny_root: Path, tmp_path: Path
):
    # a long image name makes the title wider than the table's columns
    query = sorted((tiny_root / "tiny" / "query").iterdir())[0]
    image = tmp_path / ("a-person-photographed-at-the-station-entrance-" * 2 + ".jpg")
    image.write_bytes(query.read_bytes())
    out = tmp_path / "fig.png"
    # 96x32 input: stage 1's map is 24x8; 50%,50% is its centre cell, 96%,0% its bottom-left
    result = invoke("attention", tiny_checkpoint, image, "--point", "50%,50%", "--point",
                    "96%,0%", "--out", out)  # fmt: skip
    no_blank_lines(result.stdout)
    title = f"{image.name}: CSALR after stage 1, group 0"
    assert any(line.strip() == title for line in result.stdout.splitlines()), result.stdout
    rows = [line for line in result.stdout.splitlines() if "12, 4" in line or "23, 0" in line]
    assert len(rows) == 2
    assert f"figure: {out}" in result.stdout.splitlines()


def test_a_point_mixing_pixels_and_percent_is_a_usage_error(tiny_checkpoint):
    result = runner.invoke(app, ["attention", str(tiny_checkpoint), "x.jpg", "--point", "50%,32"])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --point '50%,32': give a point as y,x in pixels")
    assert "(e.g. 30%,50%)" in line
