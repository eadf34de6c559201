"""Atomic output folders: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from graphopt.errors import EmitError

__all__ = ["check_output_folder", "atomic_folder", "sha256_file"]


def check_output_folder(out: str | Path, force: bool) -> Path:
    """Refuse early (before any work) to write over an existing non-empty folder or a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmitError("output path exists and is not a folder", where=str(out),
                        fix="choose another -o path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EmitError("output folder exists and is not empty", where=str(out),
                        fix="choose another -o folder, or pass --force to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise EmitError("parent folder does not exist", where=str(parent), fix="create it first")
    if not os.access(parent, os.W_OK):
        raise EmitError("parent folder is not writable", where=str(parent))
    return out


@contextlib.contextmanager
def atomic_folder(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is untouched.
    """
    out = check_output_folder(out, force)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.graphopt-tmp-", dir=parent))
    try:
        yield tmp
        backup = None
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.graphopt-old-", dir=parent))
            os.rename(out, backup / "old")
        os.rename(tmp, out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
