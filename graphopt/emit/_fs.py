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


MANIFEST_NAME = "manifest.json"


def read_manifest(folder: str | Path, *, fmt: str, version: int, what: str, emit_hint: str) -> dict:
    """The manifest of an artifact folder of format ``fmt``, with one-line errors for a missing
    folder, a missing or invalid manifest, another format, or a newer format version.

    ``what`` names the folder kind in messages ("pipeline folder"), ``emit_hint`` is the command
    that writes one (for the fix).
    """
    import json

    from graphopt.errors import ArtifactError

    folder = Path(folder)
    if not folder.exists():
        raise ArtifactError(f"{what} not found", where=str(folder), fix="check the path")
    if not folder.is_dir():
        raise ArtifactError("not a folder", where=str(folder), fix=f"give the folder `{emit_hint}` wrote")
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(f"{MANIFEST_NAME} is missing", where=str(folder), fix=f"give the folder `{emit_hint}` wrote")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{MANIFEST_NAME} is not valid JSON ({exc})", where=str(folder),
                            fix="re-emit the folder") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        kind = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArtifactError(f"not a {what} (manifest format {kind!r})", where=str(folder),
                            fix=f"give the folder `{emit_hint}` wrote")
    if manifest.get("format_version", 0) > version:
        raise ArtifactError(f"written by a newer graphopt (format {manifest.get('format_version')})",
                            where=str(folder), fix="upgrade graphopt")
    return manifest


def resolve_inputs(module, inputs, out) -> tuple:
    """Example inputs for an exporter: given ones, else those the graph was optimised with."""
    from torch import fx

    from graphopt.errors import EmitError

    if inputs is None:
        meta = module.meta.get("graphopt", {}) if isinstance(module, fx.GraphModule) else {}
        inputs = meta.get("example_inputs")
        if inputs is None:
            raise EmitError("no example inputs to export with", where=str(out),
                            fix="capture the model with graphopt.capture/optimize, or pass inputs=")
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def manifest_header(fmt: str, version: int, meta: dict, source: dict | None) -> dict:
    """The fields every artifact manifest starts with: format, versions, time, and where the model came from."""
    import datetime as _dt

    import torch

    from graphopt import __version__

    return {
        "format": fmt,
        "format_version": version,
        "graphopt_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"class": meta.get("source_class"), **(source or {})},
    }
