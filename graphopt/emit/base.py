"""The emitter protocol and its registry.

An emitter turns a rewritten graph into artifacts on disk. It is a class with a ``name``, typed
``options`` (:class:`graphopt.Option`, the same type passes use), a :meth:`~Emitter.preflight`
check that runs before any pass, :meth:`~Emitter.emit` and a one-line :meth:`~Emitter.summary`::

    from graphopt.emit import Emitter, EmitResult, register_emitter

    @register_emitter
    class Stats(Emitter):
        name = "stats"
        description = "node counts as JSON"
        options = {"indent": Option(int, 2, "JSON indentation", min=0)}

        def emit(self, gm, out, *, report=None, force=False, source=None, spec=None):
            with atomic_folder(out, force) as tmp:
                (tmp / "stats.json").write_text(json.dumps({"nodes": len(gm.graph.nodes)},
                                                           indent=self.config["indent"]))
            return EmitResult(Path(out), self.name)

Emitters are found through the entry-point group ``graphopt.emitters`` (built-ins ``torch``,
``onnx``, ``ort``, ``pipeline`` and user packages alike) or registered at run time with
:func:`register_emitter`. The CLI knows emitters only through this registry.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from torch import fx

from graphopt.errors import PassConfigError
from graphopt.pass_infra import Option

__all__ = ["Emitter", "EmitResult", "register_emitter", "available_emitters", "emitter_names", "get_emitter",
           "create_emitter", "ENTRY_POINT_GROUP"]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "graphopt.emitters"


@dataclass
class EmitResult:
    """What an emitter wrote: the folder, its format name, and the emit-time check (if any)."""

    path: Path
    format: str
    check: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Emitter(abc.ABC):
    """An artifact format. All configuration comes through ``__init__`` (typed ``options``).

    Call order in ``graphopt optimize``: ``Emitter(**options)`` and :meth:`preflight` before the
    model is loaded or any pass runs (missing packages, impossible pipelines, bad options: all
    refused here), then :meth:`emit` once, then :meth:`summary` for the one line the CLI prints.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    def __init__(self, **options: Any) -> None:
        self.config: dict[str, Any] = {}
        for key, value in options.items():
            if key not in self.options:
                known = ", ".join(f"{k} ({o.help})" for k, o in self.options.items()) or "none"
                raise PassConfigError(f"unknown --emit-option '{key}' for --emit {self.name}",
                                      fix=f"known options: {known}")
            self.config[key] = self.options[key].parse(value, f"--emit-option {key} (--emit {self.name})")
        for key, opt in self.options.items():
            self.config.setdefault(key, opt.default)

    def preflight(self, passes: Sequence[Any] = ()) -> None:
        """Everything that can be checked before any pass runs (``passes``: the pipeline's Pass
        instances). Raise a :class:`graphopt.errors.GraphoptError` with a one-line reason."""

    @abc.abstractmethod
    def emit(self, gm: fx.GraphModule, out: str | Path, *, report: Any = None, force: bool = False,
             source: dict[str, Any] | None = None, spec: Any = None) -> EmitResult:
        """Write the artifacts of ``gm`` to the folder ``out`` (atomically) and say what was written.

        ``report``: the PipelineReport; ``source``: where the model came from (for the manifest);
        ``spec``: the model file's ModelSpec (``loss``, ``data``) when the CLI emits.
        """

    def summary(self, result: EmitResult) -> str:
        """One line for the CLI about what :meth:`emit` wrote and checked ("" prints nothing)."""
        return ""


# ----------------------------------------------------------------------------- registry

_registry: dict[str, type[Emitter]] = {}
_broken: dict[str, str] = {}


def register_emitter(cls: type[Emitter]) -> type[Emitter]:
    """Register an emitter class at run time (usable as a decorator); it overrides an entry point."""
    if not (isinstance(cls, type) and issubclass(cls, Emitter)):
        raise TypeError("register_emitter expects an Emitter subclass")
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    _registry[cls.name] = cls
    _broken.pop(cls.name, None)
    return cls


def unregister_emitter(name: str) -> None:
    """Remove a run-time registration (tests)."""
    _registry.pop(name, None)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def emitter_names() -> list[str]:
    """Names of every emitter, registered or installed, without importing any of them."""
    return sorted(set(_registry) | set(_entry_points()))


def get_emitter(name: str) -> type[Emitter]:
    """The emitter class registered as ``name`` (imported on first use)."""
    if name in _registry:
        return _registry[name]
    ep = _entry_points().get(name)
    if ep is None:
        names = emitter_names()
        fix = ("choose one of " + ", ".join(names)) if names else \
            "no emitter is installed: reinstall graphopt (pip install -e .) so its entry points exist"
        raise PassConfigError(f"unknown --emit format '{name}'", fix=fix)
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plug-in must not break the others
        _broken[name] = f"{type(exc).__name__}: {exc}"
        log.warning("emitter '%s' (%s) failed to load: %s", name, ep.value, exc)
        raise PassConfigError(f"emitter '{name}' is installed but failed to load: {_broken[name]}",
                              fix="reinstall the package that provides it") from exc
    if not (isinstance(cls, type) and issubclass(cls, Emitter)):
        raise PassConfigError(f"emitter '{name}' ({ep.value}) is not an Emitter subclass",
                              fix="fix the package's graphopt.emitters entry point")
    _registry[name] = cls
    return cls


def available_emitters() -> dict[str, type[Emitter]]:
    """Every emitter that loads, by name (broken plug-ins are logged and left out)."""
    out = {}
    for name in emitter_names():
        try:
            out[name] = get_emitter(name)
        except PassConfigError:
            continue
    return out


def create_emitter(name: str, options: Mapping[str, Any] | None = None) -> Emitter:
    """``get_emitter(name)(**options)``: options are parsed and checked here."""
    return get_emitter(name)(**dict(options or {}))
