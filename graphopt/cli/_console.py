"""The command line's rich console: terminal width on a terminal, wide lines in logs.

rich assumes 80 columns when its output is not a terminal (CI logs, ``nohup``, a pipe) and then
shortens table cells to "origin…"; a log has no width limit, so there the console is at least
``LOG_WIDTH`` columns wide (``COLUMNS`` still wins when set).
"""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions

__all__ = ["make_console", "LOG_WIDTH"]

LOG_WIDTH = 200


class _LogFriendlyConsole(Console):
    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if not self.is_terminal and "COLUMNS" not in os.environ and size.width < LOG_WIDTH:
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def make_console(stderr: bool = False) -> Console:
    """A console for stdout (or stderr): highlighting off (numbers keep their colour-free look)."""
    return _LogFriendlyConsole(highlight=False, stderr=stderr)
