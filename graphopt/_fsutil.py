"""Small file-system helpers shared by the command line and the result writers."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

__all__ = ["made_parents"]


@contextlib.contextmanager
def made_parents(out: str | Path) -> Iterator[None]:
    """Create the missing parent folders of ``out`` (``-o runs/bn`` without ``runs/``) for the
    body; if the body fails, the folders made here are removed again (nothing is left behind)."""
    made: list[Path] = []
    p = Path(out).absolute().parent
    while not p.exists():
        made.append(p)
        p = p.parent
    for d in reversed(made):
        d.mkdir()
    try:
        yield
    except BaseException:
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty
        raise
