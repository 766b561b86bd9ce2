"""Writing outputs: every file reidkit writes goes through `atomic_write`; outputs are checked
with `check_writable` before the work that fills them starts.

A file is written under a temporary name beside its final path and renamed over it, so a
crash, a kill or a full disk leaves either the previous file or the new one, never a partial
one. The temporary name `.<name>.reidkit-tmp-<pid>-<random>` is reidkit's own: a kill -9 can
still leave one behind, and `remove_stale_temporaries` finds exactly those (of dead processes)
and nothing a user made.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
}


def temporary_path(path: Path) -> Path:
    """A fresh name beside `path` in reidkit's temporary pattern."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMPORARY_MARK}{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_write(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it is renamed onto `path`.

    On any failure (an exception, Ctrl-C) the temporary file or folder is removed and `path`
    is untouched. `durable` flushes the file to disk before the rename (checkpoints: a power
    cut must not leave a renamed but empty file). Parent folders are created.
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
    except BaseException:
        _remove(temporary)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` for a text file (UTF-8, newlines as given)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        raise ReidkitError(f"{option} {path} is a folder; give a file path")
    if folder and path.exists() and not path.is_dir():
        raise ReidkitError(f"{option} {path} is a file; give a folder path")
    existing = _nearest_existing(path if folder else path.parent)
    if not existing.is_dir():
        raise ReidkitError(f"cannot write {option} {path}: {existing} is a file, not a folder")
    probe = temporary_path(existing / "probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ReidkitError(
            f"cannot write {option} {path}: {existing} does not accept files ({reason}); "
            "choose another path"
        ) from None
    finally:
        probe.unlink(missing_ok=True)


@contextmanager
def writing(option: str, path: Path) -> Iterator[None]:
    """Name the option and its path when writing an output file fails."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        hint = OS_ERROR_HINTS.get(err.errno, "choose another path")
        raise ReidkitError(f"cannot write {option} {path}: {reason}; {hint}") from None
