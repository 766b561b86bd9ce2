"""The one write-by-rename helper, the clean-up of temporaries left by a killed process, and the
overwrite rule: folders new, empty or marked; files new or reidkit's; never an input."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from reidkit import outputs
from reidkit.outputs import (
    MARK,
    MARK_KEY,
    TEMPORARY_MARK,
    OutputError,
    atomic_write,
    check_output_file,
    check_output_folder,
    check_writable,
    is_reidkit_file,
    json_with_mark,
    mark_folder,
    markdown_mark,
    os_error_reason,
    output_file,
    remove_stale_temporaries,
    temporary_path,
    write_output_text,
)


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


# ------------------------------------------------------------------ the overwrite rule


def marked_and_users_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """(a file reidkit wrote, a user's file of the same kind) for every kind of output."""
    import json

    import numpy as np
    from PIL import Image

    from reidkit.retrieval.visualize import save_cmc_curve

    pairs = {}
    ours, theirs = folder / "ours.png", folder / "theirs.png"
    save_cmc_curve(np.array([0.5, 1.0]), ours, "run")
    Image.new("RGB", (4, 4)).save(theirs)  # a PNG, but not reidkit's
    pairs["png"] = (ours, theirs)
    ours, theirs = folder / "ours.json", folder / "theirs.json"
    write_output_text(ours, "json", json.dumps(json_with_mark({"mAP": 1.0})))
    theirs.write_text(json.dumps({"mAP": 1.0, "written_by": "me"}))
    pairs["json"] = (ours, theirs)
    ours, theirs = folder / "ours.csv", folder / "theirs.csv"
    write_output_text(ours, "csv", f"run,{MARK_KEY}\na,{MARK}\n")
    theirs.write_text("run,score\na,1\n")
    pairs["csv"] = (ours, theirs)
    ours, theirs = folder / "ours.md", folder / "theirs.md"
    write_output_text(ours, "markdown", "| a |\n" + markdown_mark())
    theirs.write_text("# my notes\n<!-- written_by: me -->\n")
    pairs["markdown"] = (ours, theirs)
    return pairs


def test_reidkit_replaces_its_own_files_and_refuses_anyone_elses(tmp_path: Path):
    for kind, (ours, theirs) in marked_and_users_files(tmp_path).items():
        assert is_reidkit_file(ours, kind) and not is_reidkit_file(theirs, kind), kind
        check_output_file("--out", ours, kind)  # replaceable
        before = theirs.read_bytes()
        with pytest.raises(OutputError, match=f"--out {theirs} exists and was not written by"):
            check_output_file("--out", theirs, kind)
        with pytest.raises(OutputError, match="not written by reidkit"), output_file(theirs, kind):
            raise AssertionError("output_file let a user's file be written")
        assert theirs.read_bytes() == before, kind
    # a reidkit file of another kind is not a file of this kind: never replaced by mistake
    with pytest.raises(OutputError, match="not written by reidkit"):
        check_output_file("--json", tmp_path / "ours.png", "json")


def test_an_output_that_is_an_input_by_any_name_is_refused(tmp_path: Path):
    checkpoint = tmp_path / "copy.pt"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "hard.json").hardlink_to(checkpoint)
    (tmp_path / "soft.json").symlink_to(checkpoint)
    inputs = [("the checkpoint", checkpoint)]
    for name, alias in (("copy.pt", ""), ("hard.json", " by another name"), ("soft.json", " by")):
        with pytest.raises(OutputError, match=f"is the checkpoint \\({checkpoint}\\){alias}"):
            check_output_file("--json", tmp_path / name, "json", inputs=inputs)
    # the same path spelled otherwise, before it exists (one output given twice)
    twice = [("the --json output", tmp_path / "r.out")]
    with pytest.raises(OutputError, match="is the --json output"):
        check_output_file("--cmc-plot", tmp_path / "sub" / ".." / "r.out", "png", inputs=twice)
    assert checkpoint.read_bytes() == b"weights"


def test_a_folder_is_written_into_only_when_new_empty_or_marked(tmp_path: Path):
    check_output_folder("--out", tmp_path / "new", ".reidkit-run", "a run folder")
    (tmp_path / "empty").mkdir()
    check_output_folder("--out", tmp_path / "empty", ".reidkit-run", "a run folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("[mine]")
    with pytest.raises(OutputError, match="without reidkit's .reidkit-run marker"):
        check_output_folder("--out", mine, ".reidkit-run", "a run folder")
    mark_folder(tmp_path / "ours", ".reidkit-run", "a run")
    (tmp_path / "ours" / "metrics.csv").write_text("epoch\n1\n")
    check_output_folder("--out", tmp_path / "ours", ".reidkit-run", "a run folder")
    assert (mine / "config.toml").read_text() == "[mine]"


def test_a_read_only_destination_is_named_by_the_option_not_the_probe(tmp_path: Path, monkeypatch):
    # what a read-only file system answers: no file can be made, and unlink fails too
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(outputs, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(OutputError) as err:
        check_writable("--json", tmp_path / "results.json")
    message = str(err.value)
    assert message.startswith(f"cannot write --json {tmp_path / 'results.json'}: ")
    assert "Read-only file system" in message and TEMPORARY_MARK not in message


def test_a_full_disk_is_reported_for_the_file_asked_for(tmp_path: Path):
    path = tmp_path / "features.npy"
    for error in (
        OSError(errno.ENOSPC, "No space left on device"),
        OSError("10 requested and 3 written"),
    ):
        with pytest.raises(OSError) as raised, atomic_write(path) as temporary:
            temporary.write_bytes(b"half")
            raise error
        assert raised.value.filename == str(path) and raised.value.errno == errno.ENOSPC
        assert os_error_reason(raised.value).endswith("free some disk space")
    assert list(tmp_path.iterdir()) == []
