"""What the command line says to a new user: suggested commands that run, paths named for what
they are, help that lists choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from reidkit.cli import app

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
