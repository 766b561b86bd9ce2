"""Writing outputs: every file reidkit writes goes through `atomic_write`; what a user names as
an output is checked before the work that fills it starts, and replaced only if it is reidkit's.

A file is written under a temporary name beside its final path and renamed over it, so a
crash, a kill or a full disk leaves either the previous file or the new one, never a partial
one. The temporary name `.<name>.reidkit-tmp-<pid>-<random>` is reidkit's own: a kill -9 can
still leave one behind, and `remove_stale_temporaries` finds exactly those (of dead processes)
and nothing a user made.

The overwrite rule (README, "Commands"), so that no command deletes what it did not create:

- A folder reidkit writes into (a run, an index) must be new, empty, or carry that kind of
  folder's marker file, which reidkit writes into it before anything else (`mark_folder`).
- A single file is written where there is none, or over a file that carries reidkit's mark:
  a `written_by` entry starting `reidkit` (a PNG text chunk, a JSON key, a CSV column, ONNX
  metadata, a closing Markdown comment; `is_reidkit_file`). The mark is in the file, so it
  survives a copy or a move, and any other file, whatever its name, is refused.
- No output may be one of the command's inputs: the same path, a hard link or a symlink to it.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from reidkit import __version__
from reidkit.errors import ReidkitError

TEMPORARY_MARK = ".reidkit-tmp-"
# .<name>.reidkit-tmp-<pid>-<8 hex>: the pid says whether its writer can still be running
_TEMPORARY_NAME = re.compile(r"^\..+\.reidkit-tmp-(\d+)-[0-9a-f]{8}$")

# What to do about an operating-system error, by its errno.
OS_ERROR_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file path, not a folder",
    errno.ENOTDIR: "part of the path is a file, not a folder",
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space (the disk quota is used up)",
}

# The mark every single-file output carries: key and value (the value's first word is reidkit).
MARK_KEY = "written_by"
MARK = f"reidkit {__version__}"
FileKind = Literal["png", "json", "csv", "markdown", "onnx"]
# What each input of a command is ("the checkpoint", "--json") and its path (None: not given).
Inputs = Iterable[tuple[str, "str | Path | None"]]


class OutputError(ReidkitError):
    """An output path that reidkit may not or cannot write."""


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path` in reidkit's temporary pattern."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}")


# numpy's words for a short write (`array.tofile`, as `np.save` uses), which a full disk causes
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def named_os_error(err: OSError, path: str | Path) -> OSError:
    """The same error naming `path` (the file the user knows, not a temporary name), with a
    short write given the errno of the full disk that causes it."""
    code, reason = err.errno, err.strerror or str(err) or type(err).__name__
    if code is None and _SHORT_WRITE.match(str(err)):
        code, reason = errno.ENOSPC, f"No space left on device (only part was written: {err})"
    return OSError(code, reason, str(path))


def os_error_reason(err: OSError) -> str:
    """`reason; what to do` for an operating-system error, without its path."""
    if err.errno is None and _SHORT_WRITE.match(str(err)):
        err = named_os_error(err, "")
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}; {OS_ERROR_HINTS.get(err.errno, 'choose another path')}"


@contextmanager
def atomic_write(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`.

    On any failure (an exception, Ctrl-C) the temporary file or folder is removed and `path`
    is untouched. `durable` flushes the file to disk before the rename (checkpoints: a power
    cut must not leave a renamed but empty file). Parent folders are created. An OSError
    comes out naming `path`, never the temporary name nobody asked for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        if durable:
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        _remove(temporary)
        if err.filename is None or str(err.filename) == str(temporary):
            raise named_os_error(err, path) from None
        raise
    except BaseException:
        _remove(temporary)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` for a text file (UTF-8, newlines as given)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:  # e.g. a read-only file system: nothing was written there either
        pass


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove reidkit's temporary files in `folder` whose writing process is gone.

    Only names in reidkit's own pattern are touched, and only those of processes that no
    longer run (a concurrent writer's file is left alone). Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or _is_running(int(match.group(1))):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if os.path.lexists(p))  # the root exists


def check_writable(option: str, path: str | Path, *, folder: bool = False) -> None:
    """Refuse, naming `option`, an output that cannot be written, before any long work.

    `folder` says the output is a folder (e.g. `train --out`), else a file. Nothing is
    created: the nearest existing folder is probed with a temporary file of reidkit's
    pattern, which is removed at once (permission bits alone do not tell, e.g. for root or
    on /proc).
    """
    path = Path(path)
    if not folder and path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file path")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a folder path")
    existing = _nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise OutputError(f"cannot write {option} {path}: {existing} is a file, not a folder")
    probe = temporary_path(existing / "probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputError(
            f"cannot write {option} {path}: {existing} does not accept files ({reason}); "
            "choose another path"
        ) from None
    # removed only once made; a failed removal must not hide the answer (read-only: none made)
    _remove(probe)


@contextmanager
def writing(option: str, path: Path) -> Iterator[None]:
    """Name the option and its path when writing an output file fails."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write {option} {path}: {os_error_reason(err)}") from None


# ------------------------------------------------------------------ the overwrite rule


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same path, a hard link or a symlink to it."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return os.path.samefile(a, b)  # st_dev and st_ino, symlinks followed
    except OSError:  # one of them does not exist (yet): compare where they lead
        return os.path.realpath(a) == os.path.realpath(b)


def _inputs_hit(option: str, path: Path, inputs: Inputs | None) -> OutputError | None:
    for what, given in inputs or ():
        if given is not None and same_file(path, given):
            alias = "" if os.path.abspath(path) == os.path.abspath(given) else " by another name"
            return OutputError(
                f"{option} {path} is {what} ({given}){alias}; writing there would overwrite it: "
                "choose another path"
            )
    return None


def check_output_file(
    option: str,
    path: str | Path,
    kind: FileKind,
    *,
    inputs: Inputs | None = None,
) -> None:
    """Refuse, before any work, a single-file output reidkit may not or cannot write.

    `inputs` pairs what each input is ("the checkpoint", "--json") with its path: the output
    may be none of them. An existing file is replaced only if it carries reidkit's mark for
    `kind`; the folder must accept files.
    """
    path = Path(path)
    hit = _inputs_hit(option, path, inputs)
    if hit is not None:
        raise hit
    check_writable(option, path)
    check_replaceable_file(path, kind, option)


def check_replaceable_file(path: str | Path, kind: FileKind, option: str | None = None) -> None:
    """Refuse to replace an existing file that reidkit did not write (or anything not a file)."""
    path = Path(path)
    if not os.path.lexists(path) or (path.is_file() and is_reidkit_file(path, kind)):
        return
    named = f"{option} {path}" if option else str(path)
    if path.is_dir():
        raise OutputError(f"{named} is a folder; give a file path")
    if not path.is_file():
        what = "a broken symlink" if path.is_symlink() else "not a regular file"
        raise OutputError(
            f"{named} exists and is {what}; reidkit writes only new paths or its own files: "
            "choose another path"
        )
    raise OutputError(
        f"{named} exists and was not written by reidkit (it lacks reidkit's '{MARK_KEY}' mark); "
        "reidkit replaces only its own files: choose another path, or remove it yourself"
    )


@contextmanager
def output_file(
    path: str | Path,
    kind: FileKind,
    *,
    inputs: Inputs | None = None,
) -> Iterator[Path]:
    """`atomic_write` for a file a user names: refused unless the overwrite rule allows it.

    The caller writes the file at the temporary path it is given, with reidkit's mark in it
    (`png_mark`, `json_with_mark`, ...), as the next run's check will look for it.
    """
    path = Path(path)
    hit = _inputs_hit("output", path, inputs)
    if hit is not None:
        raise hit
    check_replaceable_file(path, kind)
    with atomic_write(path) as temporary:
        yield temporary


def write_output_text(path: str | Path, kind: FileKind, text: str) -> Path:
    """`output_file` for a text file (UTF-8); `text` carries reidkit's mark (`json_with_mark`,
    `markdown_mark`, a `written_by` CSV column)."""
    with output_file(path, kind) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def png_mark() -> dict[str, str]:
    """The PNG text chunk that marks a figure as reidkit's (matplotlib's `metadata=`)."""
    return {MARK_KEY: MARK}


def json_with_mark(data: dict) -> dict:
    """`data` with reidkit's mark as its first key."""
    return {MARK_KEY: MARK, **{k: v for k, v in data.items() if k != MARK_KEY}}


def markdown_mark() -> str:
    """The last line of a Markdown file reidkit writes."""
    return f"<!-- {MARK_KEY}: {MARK} -->\n"


def is_reidkit_file(path: str | Path, kind: FileKind) -> bool:
    """Whether the file at `path` carries reidkit's mark as a file of `kind` holds it."""
    try:
        return bool(_MARK_READERS[kind](Path(path)))
    except Exception:  # anything unreadable as that kind is not reidkit's file of that kind
        return False


def _is_mark(value: object) -> bool:
    return isinstance(value, str) and value.split(" ", 1)[0] == "reidkit"


def _png_marked(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:  # reads the header and the text chunks before the pixels
        return image.format == "PNG" and _is_mark(image.info.get(MARK_KEY))


# `json_with_mark` puts the mark first, so the file's head tells (a big JSON is not parsed)
_JSON_MARK = re.compile(rf'^\s*\{{\s*"{MARK_KEY}"\s*:\s*"reidkit[ "]')


def _json_marked(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return _JSON_MARK.match(f.read(4096)) is not None


def _csv_marked(path: Path) -> bool:
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        first = next(rows, None)
    if MARK_KEY not in header:
        return False
    return first is None or _is_mark(first[header.index(MARK_KEY)])


def _markdown_marked(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 4096))
        tail = f.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return bool(lines) and lines[-1].startswith(f"<!-- {MARK_KEY}: reidkit")


def _onnx_marked(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(p.key == MARK_KEY and _is_mark(p.value) for p in model.metadata_props)


_MARK_READERS = {
    "png": _png_marked,
    "json": _json_marked,
    "csv": _csv_marked,
    "markdown": _markdown_marked,
    "onnx": _onnx_marked,
}


def check_output_folder(
    option: str, folder: str | Path, marker: str, what: str, *, adopt: bool = False
) -> None:
    """Refuse, before any work, a folder to write into that cannot be written or is not
    reidkit's to write into (`check_owned_folder`)."""
    check_writable(option, folder, folder=True)
    if not adopt:
        check_owned_folder(option, folder, marker, what)


def check_owned_folder(option: str, folder: str | Path, marker: str, what: str) -> None:
    """Refuse a folder that exists and is neither empty nor carries `marker` (the file that
    marks `what`, e.g. ".reidkit-run" for "a run folder"); a file in its place too."""
    folder = Path(folder)
    if not os.path.lexists(folder) or is_marked_folder(folder, marker):
        return
    if not folder.is_dir():
        raise OutputError(f"{option} {folder} exists and is a file; give a folder path")
    try:
        empty = not any(folder.iterdir())
    except OSError as err:
        raise OutputError(f"cannot read {option} {folder}: {os_error_reason(err)}") from None
    if not empty:
        raise OutputError(
            f"{option} {folder} exists and is a folder without reidkit's {marker} marker, so "
            f"not {what} reidkit wrote; reidkit writes only into a new or empty folder or one "
            "of its own: choose a new path"
        )


def is_marked_folder(folder: str | Path, marker: str) -> bool:
    """True for a folder that carries `marker` (a file), so reidkit wrote it."""
    folder = Path(folder)
    return folder.is_dir() and (folder / marker).is_file()


def mark_folder(folder: str | Path, marker: str, text: str) -> None:
    """Create `folder` if needed and write its marker, before anything else goes into it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / marker).is_file():
        write_text(folder / marker, text.rstrip("\n") + "\n")
