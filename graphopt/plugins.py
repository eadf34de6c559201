"""One entry-point registry for plug-ins (emitters, training backends): run-time registrations
first, then installed entry points, imported on first use; a broken plug-in is a one-line error
that does not break the others."""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any, Callable, Generic, TypeVar

from graphopt.errors import PassConfigError

__all__ = ["PluginRegistry"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class PluginRegistry(Generic[T]):
    """Plug-ins of one entry-point ``group``. ``kind`` names them in messages ("emitter");
    ``unknown`` is the message for a name nobody provides (``{name}`` is filled in); ``check``
    returns why a loaded object is not a valid plug-in, or None."""

    def __init__(self, group: str, kind: str, unknown: str, check: Callable[[Any], str | None]):
        self.group, self.kind, self.unknown, self.check = group, kind, unknown, check
        self._registered: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        why = self.check(obj)
        if why:
            raise TypeError(why)
        self._registered[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._registered.pop(name, None)

    def entry_points(self) -> dict[str, metadata.EntryPoint]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        """Every name, registered or installed, without importing any plug-in."""
        return sorted(set(self._registered) | set(self.entry_points()))

    def get(self, name: str) -> T:
        if name in self._registered:
            return self._registered[name]
        ep = self.entry_points().get(name)
        if ep is None:
            names = self.names()
            fix = ("choose one of " + ", ".join(names)) if names else \
                f"no {self.kind} is installed: reinstall graphopt (pip install -e .) so its entry points exist"
            raise PassConfigError(self.unknown.format(name=name), fix=fix)
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in must not break the others
            log.warning("%s '%s' (%s) failed to load: %s", self.kind, name, ep.value, exc)
            raise PassConfigError(f"{self.kind} '{name}' is installed but failed to load: {type(exc).__name__}: "
                                  f"{exc}", fix="reinstall the package that provides it") from exc
        why = self.check(obj)
        if why:
            raise PassConfigError(f"{self.kind} '{name}' ({ep.value}): {why}",
                                  fix=f"fix the package's {self.group} entry point")
        self._registered[name] = obj
        return obj

    def available(self) -> dict[str, T]:
        """Every plug-in that loads, by name (broken ones are logged and left out)."""
        out = {}
        for name in self.names():
            try:
                out[name] = self.get(name)
            except PassConfigError:
                continue
        return out
