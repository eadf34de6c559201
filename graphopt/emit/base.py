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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

from torch import fx

from graphopt.errors import PassConfigError
from graphopt.pass_infra import Option
from graphopt.plugins import PluginRegistry

__all__ = ["Emitter", "EmitResult", "register_emitter", "available_emitters", "emitter_names", "get_emitter",
           "create_emitter", "ENTRY_POINT_GROUP"]

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

def _not_an_emitter(cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Emitter)):
        return "not an Emitter subclass"
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        return f"{cls.__qualname__} has no name"
    return None


_registry: PluginRegistry[type[Emitter]] = PluginRegistry(ENTRY_POINT_GROUP, "emitter", "unknown --emit format '{name}'",
                                                          _not_an_emitter)


def register_emitter(cls: type[Emitter]) -> type[Emitter]:
    """Register an emitter class at run time (usable as a decorator); it overrides an entry point."""
    return _registry.register(getattr(cls, "name", ""), cls)


def unregister_emitter(name: str) -> None:
    """Remove a run-time registration (tests)."""
    _registry.unregister(name)


def emitter_names() -> list[str]:
    """Names of every emitter, registered or installed, without importing any of them."""
    return _registry.names()


def get_emitter(name: str) -> type[Emitter]:
    """The emitter class registered as ``name`` (imported on first use)."""
    return _registry.get(name)


def available_emitters() -> dict[str, type[Emitter]]:
    """Every emitter that loads, by name (broken plug-ins are logged and left out)."""
    return _registry.available()


def create_emitter(name: str, options: Mapping[str, Any] | None = None) -> Emitter:
    """``get_emitter(name)(**options)``: options are parsed and checked here."""
    return get_emitter(name)(**dict(options or {}))
