"""Output that reads right in a terminal and in a log: Rich consoles and progress bars that
behave when the output is a file, a pipe or CI instead of a terminal."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

import rich
import rich.console
from rich.cells import cell_len
from rich.console import ConsoleDimensions
from rich.table import Table

# Width given to output that is not a terminal: wide enough that no line, table row or command
# is ever folded (a folded path or command cannot be copied back); tables keep their natural
# width, so nothing is padded to it.
PIPED_WIDTH = 10_000


class OutputConsole(rich.console.Console):
    """A Rich console that wraps and squeezes only on a terminal.

    Elsewhere Rich would lay everything out at 80 columns (or the width of a terminal the
    output is not going to), folding long paths, table cells and suggested commands.
    $COLUMNS, when set, still decides.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or "COLUMNS" in self._environ:
            return size
        return ConsoleDimensions(PIPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


def draws_bars(progress: bool, console: rich.console.Console | None = None) -> bool:
    """Whether to show a progress bar: asked for, and a terminal to draw it on.

    On anything else a bar cannot move: Rich leaves a blank line where a transient one was,
    so none is drawn. `console` defaults to Rich's global one (standard output).
    """
    return progress and (console or rich.get_console()).is_terminal


def titled_table(title: str, **options) -> Table:
    """A table at least as wide as its title, so that the title (a path) is never folded.

    The width counts terminal cells, not characters: a CJK character takes two.
    """
    return Table(title=title, min_width=cell_len(title), **options)


def invoked_as() -> str:
    """How to run this reidkit again from the same shell, for commands it suggests.

    `reidkit` when that name on PATH is this program (an activated environment); otherwise
    the path it was started by (`.venv/bin/reidkit`), or `python -m reidkit` for the module.
    """
    started = sys.argv[0] if sys.argv else ""
    if os.path.basename(started) == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m reidkit"
    found = shutil.which("reidkit")
    if not started or os.sep not in started:
        return "reidkit"  # found on PATH by that name
    if found and os.path.realpath(found) == os.path.realpath(started):
        return "reidkit"
    return shlex.quote(started)
