"""Output folders: the safety rules for writing one, atomic writes, manifests and checksums.

Rules (checked before any work, each refusal one line):

- an existing non-empty folder is replaced only with ``force``, and only if graphopt wrote it
  (its ``manifest.json`` names a ``graphopt.*`` format, or it has the marker file graphopt leaves
  in folders without a manifest);
- never replaced, even with ``force``: the filesystem root, the home folder, the current folder or
  a folder above it, a repository (``.git`` inside), and the folder holding an input file (the
  model file) or any folder above it (``protect=``);
- writes go to a temporary sibling folder (``.NAME.graphopt-tmp-PID-XXXX``) that replaces ``out``
  in one rename; on any exception (Ctrl-C included) the temporary folder is removed and the
  previous folder is left as it was. Temporary siblings of a process that no longer runs (a
  killed run) are removed by the next write into the same parent folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from graphopt.errors import EmitError

__all__ = ["check_output_folder", "atomic_folder", "sha256_file", "read_manifest", "manifest_header",
           "resolve_inputs", "written_by_graphopt", "remove_stale_temporaries", "MANIFEST_NAME", "MARKER_NAME"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MARKER_NAME = ".graphopt-folder.json"  # left in folders graphopt writes that have no manifest (bench, sweep)
_TMP_TAG = ".graphopt-tmp-"
_OLD_TAG = ".graphopt-old-"
_TEMP_RE = re.compile(r"^\..*\.graphopt-(?:tmp|old)-(\d+)-[a-z0-9_]+$")


def written_by_graphopt(folder: str | Path) -> bool:
    """Whether ``folder`` is one graphopt wrote: a ``graphopt.*`` manifest, or graphopt's marker file."""
    folder = Path(folder)
    for name, key, ok in ((MANIFEST_NAME, "format", lambda v: isinstance(v, str) and v.startswith("graphopt.")),
                          (MARKER_NAME, "written_by", lambda v: v == "graphopt")):
        path = folder / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and ok(doc.get(key)):
                return True
    return False


def _never_replace(out: Path, protect: Sequence[str | Path]) -> str | None:
    """Why ``out`` must never be replaced, or None."""
    r = out.resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if r == Path(r.anchor):
        return "it is the filesystem root"
    if r == home or r in home.parents:
        return "it is your home folder" if r == home else "it holds your home folder"
    if r == cwd:
        return "it is the current folder"
    if r in cwd.parents:
        return "it holds the current folder"
    for p in protect:
        pr = Path(p).resolve()
        if pr == r or r in pr.parents:
            return f"it holds the input file {p}"
    if (r / ".git").exists():
        return "it is a repository (.git inside)"
    return None


def check_output_folder(out: str | Path, force: bool, *, protect: Sequence[str | Path] = ()) -> Path:
    """Refuse early (before any work) to write where the rules above forbid; returns ``Path(out)``.

    ``protect``: input files (the model file) whose folder, and every folder above it, is never replaced.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmitError("output path exists and is not a folder", where=str(out),
                        fix="choose another -o path")
    reason = _never_replace(out, protect) if out.exists() else None
    if reason is not None:
        raise EmitError(f"graphopt never replaces this folder: {reason}", where=str(out),
                        fix="give a new or empty sub-folder with -o, e.g. -o out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise EmitError("output folder exists and is not empty", where=str(out),
                            fix="choose another -o folder, or pass --force to replace it")
        if not written_by_graphopt(out):
            raise EmitError("--force replaces only a folder graphopt wrote (with its manifest.json) or an empty "
                            "one, and this folder holds other files", where=str(out),
                            fix="choose another -o folder, or move its files away yourself")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise EmitError("parent folder does not exist", where=str(parent), fix="create it first")
    if not os.access(parent, os.W_OK):
        raise EmitError("parent folder is not writable", where=str(parent))
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(parent: str | Path) -> list[Path]:
    """Remove graphopt's temporary sibling folders in ``parent`` whose process no longer runs."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                log.info("removed %s, left by an interrupted graphopt run (pid %s)", entry, m.group(1))
                removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_folder(out: str | Path, force: bool = False, *, protect: Sequence[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``out`` is as
    it was. A folder written without a ``manifest.json`` gets graphopt's marker file, so a later
    ``--force`` may replace it.
    """
    out = check_output_folder(out, force, protect=protect)
    parent = out.resolve().parent
    remove_stale_temporaries(parent)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_TAG}{pid}-", dir=parent))
    backup: Path | None = None
    try:
        yield tmp
        if not (tmp / MANIFEST_NAME).exists() and not (tmp / MARKER_NAME).exists():
            from graphopt import __version__

            (tmp / MARKER_NAME).write_text(json.dumps({"written_by": "graphopt", "graphopt_version": __version__}))
        if out.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}{_OLD_TAG}{pid}-", dir=parent))
            os.rename(out, backup / "old")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None and (backup / "old").exists() and not out.exists():
            os.rename(backup / "old", out)  # put the previous folder back
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()



def read_manifest(folder: str | Path, *, fmt: str, version: int, what: str, emit_hint: str) -> dict:
    """The manifest of an artifact folder of format ``fmt``, with one-line errors for a missing
    folder, a missing or invalid manifest, another format, or a newer format version.

    ``what`` names the folder kind in messages ("pipeline folder"), ``emit_hint`` is the command
    that writes one (for the fix).
    """
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
