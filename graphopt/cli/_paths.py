"""Checks of the paths a command will write, made before any work (a user error costs nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from graphopt._fsutil import made_parents
from graphopt.errors import EmitError

__all__ = ["check_out_folder", "check_out_file", "write_text", "made_parents"]

_VIRTUAL = ("/proc", "/sys")  # kernel file systems: nothing graphopt writes can live there


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_place(path: Path, option: str) -> None:
    resolved = str(_existing_ancestor(path).resolve())
    for root in _VIRTUAL:
        if resolved == root or resolved.startswith(root + "/"):
            raise EmitError(f"{root} is a virtual kernel file system, not storage", where=str(path),
                            fix=f"choose a {option} path on a disk")


def check_out_folder(out: str | Path, force: bool, *, create_parents: bool = False,
                     protect: Sequence[str | Path] = ()) -> Path:
    """An output folder ``-o``: not under /proc or /sys, a writable place; an existing non-empty
    folder only with ``--force``; its parent must exist unless ``create_parents`` (then the
    nearest existing ancestor must be a writable folder; the parents are made when writing)."""
    from graphopt.emit.fs import check_output_folder

    out = Path(out)
    _check_writable_place(out, "-o")
    parent = out.absolute().parent
    if parent.is_dir() or not create_parents:
        return check_output_folder(out, force, protect=protect)
    anc = _existing_ancestor(parent)
    if not anc.is_dir():
        raise EmitError("a part of the output path is a file, not a folder", where=str(anc),
                        fix="choose another -o path")
    if not os.access(anc, os.W_OK):
        raise EmitError("folder is not writable", where=str(anc), fix="choose another -o path")
    return out


def check_out_file(path: str | Path, option: str) -> Path:
    """A file the command writes at the end (``--report``, ``--draw``): its folder must exist and
    be writable, checked before any work, so nothing else is written first."""
    p = Path(path)
    _check_writable_place(p, option)
    if p.is_dir():
        raise EmitError("is a folder", where=str(p), fix=f"give {option} a file path")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise EmitError(f"folder of {option} does not exist", where=str(parent),
                        fix=f"create it first, or choose another {option} path")
    if not os.access(parent, os.W_OK):
        raise EmitError(f"folder of {option} is not writable", where=str(parent),
                        fix=f"choose another {option} path")
    return p


def write_text(path: str | Path, text: str, option: str) -> None:
    """Write a file the user asked for; an OSError (disk full, ...) is one line naming the file."""
    p = Path(path)
    try:
        p.write_text(text)
    except OSError as exc:
        raise EmitError(f"could not write {option}: {exc.strerror or exc}", where=str(p),
                        fix="free some space or choose another path") from None

