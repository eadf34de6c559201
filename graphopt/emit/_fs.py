"""Deprecated alias of :mod:`graphopt.emit.fs` (kept so older imports keep working)."""

from __future__ import annotations

from graphopt.emit.fs import *  # noqa: F401,F403
from graphopt.emit.fs import __all__  # noqa: F401
