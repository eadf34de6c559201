"""The one JSON writer: every report, manifest, result file and ``--format json`` output goes through it.

The output is strict JSON (RFC 8259), which every parser accepts:

- Non-finite floats are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"``, never as the
  ``Infinity``/``NaN`` tokens Python's ``json`` module emits by default (an unlimited budget is
  ``"budget": "inf"``). :func:`number` turns such a value back into a float.
- Values JSON has no type for are converted: tensors and numpy arrays to (nested) lists, 0-d tensors
  and numpy scalars to numbers, ``torch.dtype``/``torch.device``/``Path`` to strings, ``Enum`` to its
  value, sets to sorted lists, tuples to lists, dataclasses field by field, objects with an
  ``as_dict()`` method to its result; dictionary keys to strings. Anything else is written as
  ``str(obj)``.

:func:`write_json` replaces the file atomically (a temporary file in the same folder, then a
rename): a reader never sees half a file. :func:`loads` / :func:`read_json` parse strictly by
default (``Infinity``/``NaN`` tokens are refused).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
import uuid
from pathlib import Path, PurePath
from typing import Any, Mapping

from graphopt.errors import ArtifactError, EmitError

__all__ = ["to_jsonable", "dumps", "write_json", "loads", "read_json", "number"]

_FROM_STRING = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _float(x: float) -> float | str:
    """A finite float as is; inf, -inf and nan as the strings "inf", "-inf", "nan"."""
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _key(k: Any) -> str:
    if isinstance(k, enum.Enum):
        k = k.value
    if isinstance(k, str):
        return str(k)
    if isinstance(k, bool) or k is None:
        return json.dumps(k)  # "true" / "false" / "null", as json.dumps writes such keys
    if isinstance(k, float):
        return str(_float(k))
    return str(k)


def _sort_key(v: Any) -> tuple[str, str]:
    return (type(v).__name__, json.dumps(v, sort_keys=True, allow_nan=False))


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (dict with str keys, list, str, int, finite float, bool, None)."""
    return _convert(obj, set())


def _convert(obj: Any, active: set[int]) -> Any:
    if isinstance(obj, enum.Enum):
        return _convert(obj.value, active)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return _float(float(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            value = obj.detach().cpu()
            return _convert(value.item() if value.dim() == 0 else value.tolist(), active)
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _convert(obj.tolist(), active)
        if isinstance(obj, np.generic):
            return _convert(obj.item(), active)
    if id(obj) in active:
        raise ValueError(f"circular reference to a {type(obj).__name__} while writing JSON")
    active.add(id(obj))
    try:
        if isinstance(obj, Mapping):
            return {_key(k): _convert(v, active) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_convert(v, active) for v in obj]
        if isinstance(obj, (set, frozenset)):
            items = [_convert(v, active) for v in obj]
            try:
                return sorted(items, key=_sort_key)
            except (TypeError, ValueError):
                return items
        as_dict = getattr(obj, "as_dict", None)
        if callable(as_dict) and not isinstance(obj, type):
            return _convert(as_dict(), active)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: _convert(getattr(obj, f.name), active) for f in dataclasses.fields(obj)}
    finally:
        active.discard(id(obj))
    return str(obj)


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = False, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (see the module docstring for conversions); ``kw`` go to ``json.dumps``."""
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, **kw)


def write_json(path: str | Path, obj: Any, **kw: Any) -> Path:
    """Write ``dumps(obj, **kw)`` plus a newline to ``path`` atomically (temporary file, then rename).

    The folder must exist; a missing one is an :class:`~graphopt.errors.EmitError`.
    """
    path = Path(path)
    text = dumps(obj, **kw) + "\n"  # convert first: a value that cannot be written leaves nothing behind
    folder = path.parent
    if not folder.is_dir():
        raise EmitError("folder does not exist", where=str(folder), fix=f"create it first or write {path.name} elsewhere")
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"'{token}' is not JSON (graphopt writes non-finite numbers as \"inf\", \"-inf\", \"nan\")")


def loads(text: str | bytes, *, strict: bool = True) -> Any:
    """Parse JSON; ``strict`` (default) refuses the ``Infinity``/``-Infinity``/``NaN`` tokens.

    ``strict=False`` also reads files written before graphopt wrote strict JSON.
    """
    if strict:
        return json.loads(text, parse_constant=_refuse_constant)
    return json.loads(text)


def read_json(path: str | Path, *, strict: bool = True) -> Any:
    """Parse the JSON file ``path`` (see :func:`loads`); unreadable or invalid: :class:`ArtifactError`."""
    path = Path(path)
    try:
        return loads(path.read_text(encoding="utf-8"), strict=strict)
    except FileNotFoundError:
        raise ArtifactError("file not found", where=str(path)) from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ArtifactError(f"not valid JSON: {exc}", where=str(path),
                            fix="the file is corrupt or was not written by graphopt") from None


def number(value: Any) -> Any:
    """A number read back from graphopt's JSON: ``"inf"``/``"-inf"``/``"nan"`` become floats, any
    other value is returned unchanged."""
    if isinstance(value, str) and value in _FROM_STRING:
        return _FROM_STRING[value]
    return value
