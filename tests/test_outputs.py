"""The one write-by-rename helper and the clean-up of temporaries left by a killed process."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from reidkit.outputs import atomic_write, remove_stale_temporaries, temporary_path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path: Path):
    path = tmp_path / "metrics.csv"
    path.write_text("old\n")
    with pytest.raises(OSError, match="disk full"), atomic_write(path) as temporary:
        temporary.write_text("half")
        raise OSError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


def test_interrupted_write_removes_its_temporary(tmp_path: Path):
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "a.png") as temporary:
        temporary.write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_only_reidkit_temporaries_of_dead_processes_are_removed(tmp_path: Path):
    pid = dead_pid()
    stale = tmp_path / f".last.pt.reidkit-tmp-{pid}-0123abcd"
    stale.write_bytes(b"\0" * 1000)
    stale_folder = tmp_path / f".index.reidkit-tmp-{pid}-89abcdef"
    stale_folder.mkdir()
    (stale_folder / "features.npy").write_bytes(b"x")
    live = tmp_path / f".last.pt.reidkit-tmp-{os.getppid()}-0123abcd"  # a writer still running
    live.write_bytes(b"y")
    # near misses, with the dead writer's pid, that a user or another tool could have made
    users = [
        f".last.pt.tmp-{pid}",
        f"notes.reidkit-tmp-{pid}-0123abcd",
        f".x.reidkit-tmp-{pid}",
        f".x.reidkit-tmp-{pid}-0123abcd.bak",
        "last.pt",
    ]
    for name in users:
        (tmp_path / name).write_text("keep")
    assert remove_stale_temporaries(tmp_path) == sorted([stale_folder, stale])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, *users])


def test_temporary_names_follow_the_pattern_the_cleanup_knows(tmp_path: Path):
    temporary = temporary_path(tmp_path / "last.pt")
    temporary.write_text("x")
    assert temporary.name.startswith(f".last.pt.reidkit-tmp-{os.getpid()}-")
    assert remove_stale_temporaries(tmp_path) == []  # this process is alive
