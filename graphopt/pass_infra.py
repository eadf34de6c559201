"""The pass contract, the registry and pipeline specs.

A pass is a class with a ``name``, declared ``semantics`` and typed ``options``; all its
configuration comes through ``__init__`` and it keeps no state across calls::

    class MyPass(Pass):
        name = "my_pass"
        semantics = Semantics.EXACT          # what the eval function does
        training = "same"                    # or "changes", with training_reason = "one line why"
        summary = "what it does, one line"
        options = {"min_channels": Option(int, 16, "skip convs with fewer channels", min=1)}

        def call(self, gm):
            ...
            return PassResult(gm, modified=True, rewrites=[Rewrite("layer1.0.conv1", "...")])

Passes are found through the entry-point group ``graphopt.passes`` (built-ins and user
packages alike) or registered at run time with :func:`register_pass`.
"""

from __future__ import annotations

import abc
import enum
import logging
import math
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import fx, nn

from graphopt.errors import PassConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Semantics", "Option", "Pass", "PassResult", "Rewrite", "Decline", "register_pass",
    "available_passes", "get_pass", "create_pass", "parse_pass_spec", "load_pipeline_file",
    "build_pipeline", "ENTRY_POINT_GROUP", "TRAINING",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "graphopt.passes"


class Semantics(str, enum.Enum):
    """What a rewrite promises about the function the graph computes."""

    EXACT = "exact"  # same function: outputs and input gradients equal (float32 tolerance)
    PRESERVING_AT_INIT = "at_init"  # same outputs right after the rewrite; trains differently
    APPROXIMATE = "approximate"  # changes outputs within the pass's stated error budget


TRAINING = ("same", "changes")
"""The second axis of a pass's semantics: what training does.

``"same"`` (default): in train mode (dropout, BatchNorm batch statistics and running-statistic
updates, parameter gradients) the rewrite keeps the same promise as in eval mode, and the
verifier checks it there too. ``"changes"``: training behaves differently by design (frozen
parameters, dropout removed, BatchNorm folded away); the pass says why in ``training_reason``
and only the eval function is held to ``semantics``.
"""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Option:
    """A typed pass option. ``type`` is bool, int, float, str or list (of ``item``)."""

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    item: type = str
    nullable: bool = False

    def describe(self) -> str:
        kind = f"list of {self.item.__name__}" if self.type is list else self.type.__name__
        if self.choices:
            kind = "|".join(str(c) for c in self.choices)
        return kind

    def _convert(self, raw: Any, typ: type, where: str) -> Any:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise PassConfigError(f"'{raw}' is not a boolean", where=where, fix="use true or false")
        if typ in (int, float):
            if isinstance(raw, bool):
                raise PassConfigError(f"'{raw}' is not a number", where=where)
            try:
                val = typ(raw) if not (typ is int and isinstance(raw, float) and not raw.is_integer()) else None
                if val is None:
                    raise ValueError
            except (TypeError, ValueError):
                raise PassConfigError(f"'{raw}' is not a valid {typ.__name__}", where=where,
                                      fix=f"give a {typ.__name__}") from None
            return val
        if typ is str:
            return str(raw)
        raise PassConfigError(f"unsupported option type {typ}", where=where)  # pragma: no cover

    def parse(self, raw: Any, where: str) -> Any:
        if raw is None or (self.nullable and isinstance(raw, str) and raw.lower() in ("none", "")):
            if self.nullable:
                return None
            raise PassConfigError("a value is required", where=where)
        if self.type is list:
            if isinstance(raw, str):
                items = [p for p in raw.split("|") if p != ""]
            elif isinstance(raw, (list, tuple)):
                items = list(raw)
            else:
                items = [raw]
            val: Any = [self._convert(i, self.item, where) for i in items]
            for v in val:
                self._check_finite(v, where)
                self._check_range(v, where)
            return val
        val = self._convert(raw, self.type, where)
        self._check_finite(val, where)
        self._check_range(val, where)
        return val

    def _check_finite(self, val: Any, where: str) -> None:
        """nan is never a value (it passes every range check); inf means "no limit" (a budget) and
        meets the option's min/max like any number."""
        if isinstance(val, float) and math.isnan(val):
            raise PassConfigError(f"'{val}' is not a number", where=where, fix="give a finite value")

    def _check_range(self, val: Any, where: str) -> None:
        if self.choices is not None and val not in self.choices:
            raise PassConfigError(f"'{val}' is not allowed", where=where,
                                  fix="choose one of " + ", ".join(str(c) for c in self.choices))
        if self.min is not None and isinstance(val, (int, float)) and val < self.min:
            raise PassConfigError(f"{val} is below the minimum {self.min}", where=where)
        if self.max is not None and isinstance(val, (int, float)) and val > self.max:
            raise PassConfigError(f"{val} is above the maximum {self.max}", where=where)


@dataclass
class Rewrite:
    """One rewrite a pass applied: where (a module path or node name) and what."""

    target: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "detail": self.detail, **({"data": self.data} if self.data else {})}


@dataclass
class Decline:
    """A candidate the pass looked at and did not rewrite, with the reason."""

    target: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"target": self.target, "reason": self.reason}


@dataclass
class PassResult:
    """What ``Pass.call`` returns.

    ``reference``: optional module the rewritten graph must match *exactly* (e.g. the
    original with pruned channels masked to zero), checked in addition to the semantics.
    ``reference_is_baseline``: the original is random in eval mode, so the semantics are
    checked against ``reference`` instead of the original.
    ``notes``: measurements for the report (per-layer errors, counts ...), JSON-serialisable.
    """

    gm: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    declined: list[Decline] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    reference: nn.Module | None = None
    # True when the original graph is not a deterministic function in eval mode (e.g. dropout
    # traced with training=True baked in): the semantic check then uses ``reference`` as baseline.
    reference_is_baseline: bool = False
    # rewritten parameter/buffer name -> the original's name it corresponds to (None: a new tensor
    # with no counterpart). Names not listed are matched by name. Used to compare parameter
    # gradients and BatchNorm running statistics.
    param_map: dict[str, str | None] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base class of every rewrite pass (see the module docstring)."""

    name: ClassVar[str]
    semantics: ClassVar[Semantics]
    training: ClassVar[str] = "same"  # "same" | "changes" (see TRAINING)
    training_reason: ClassVar[str] = ""  # one line, required when training = "changes"
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        if not isinstance(getattr(cls, "name", None), str):
            raise TypeError(f"{cls.__qualname__} must set a string class attribute 'name'")
        if not isinstance(getattr(cls, "semantics", None), Semantics):
            raise TypeError(f"{cls.__qualname__} must set 'semantics' to a Semantics member")
        if cls.semantics is Semantics.APPROXIMATE and "budget" not in cls.options:
            raise TypeError(f"{cls.__qualname__} is APPROXIMATE and must declare a 'budget' option")
        if cls.training not in TRAINING:
            raise TypeError(f"{cls.__qualname__}.training must be one of {', '.join(map(repr, TRAINING))}, "
                            f"not {cls.training!r}")
        reason = cls.training_reason
        if not isinstance(reason, str) or "\n" in reason.strip():
            raise TypeError(f"{cls.__qualname__}.training_reason must be one line of text")
        if cls.training == "changes" and not reason.strip():
            raise TypeError(f"{cls.__qualname__} declares training = 'changes' and must say why in "
                            "training_reason (one line)")

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k} ({o.describe()})" for k, o in self.options.items()) or "none"
            raise PassConfigError(f"unknown option '{unknown[0]}'", where=f"pass '{self.name}'",
                                  fix=f"valid options: {valid}")
        self.config: dict[str, Any] = {}
        for key, opt in self.options.items():
            raw = options.get(key, opt.default)
            if key in options:
                self.config[key] = opt.parse(raw, f"pass '{self.name}' option '{key}'")
            else:
                self.config[key] = list(opt.default) if isinstance(opt.default, list) else opt.default

    @property
    def budget(self) -> float | None:
        """The relative output error an APPROXIMATE pass may introduce."""
        return self.config.get("budget")

    def requires(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Raise :class:`PreconditionError` when the pass cannot run on ``gm``."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult:
        """Rewrite ``gm`` (in place or into a new GraphModule) and say what happened."""

    def ensures(self, gm: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Check the pass's postconditions on its output; raise AssertionError if violated."""

    def check(self, before: fx.GraphModule, after: fx.GraphModule,
              inputs: tuple[torch.Tensor, ...], result: PassResult) -> dict[str, Any]:
        """Extra pass-specific verification; return measurements, raise VerificationError."""
        return {}

    def spec(self) -> str:
        """The pipeline-string form of this configured pass."""
        parts = []
        for k, v in self.config.items():
            if v == self.options[k].default:
                continue
            parts.append(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"


# ----------------------------------------------------------------------------- registry

_registry: dict[str, type[Pass]] = {}
_broken: dict[str, str] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Register a pass class at run time (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError("register_pass expects a Pass subclass")
    _registry[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not break the others
            _broken[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("pass '%s' (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            _broken[ep.name] = f"{ep.value} is not a Pass subclass"
            continue
        _registry.setdefault(ep.name, cls)


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass, by name, sorted."""
    _load_entry_points()
    return dict(sorted(_registry.items()))


def get_pass(name: str) -> type[Pass]:
    passes = available_passes()
    if name not in passes:
        if name in _broken:
            raise PassConfigError(f"pass '{name}' is installed but failed to load: {_broken[name]}",
                                  fix="reinstall the package that provides it")
        raise PassConfigError(f"unknown pass '{name}'", fix="valid passes: " + ", ".join(passes))
    return passes[name]


def create_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    return get_pass(name)(**dict(options or {}))


# ----------------------------------------------------------------------------- pipelines


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"prune:ratio=0.5,mode=structured"`` -> ``("prune", {"ratio": "0.5", "mode": "structured"})``.

    List values are separated by ``|``: ``freeze:modules=layer1.*|layer2.*``.
    """
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise PassConfigError(f"empty pass name in '{spec}'", fix="write NAME or NAME:key=value,...")
    opts: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise PassConfigError(f"'{item}' is not key=value", where=f"pass spec '{spec}'",
                                      fix="write NAME:key=value,key=value")
            if key.strip() in opts:
                raise PassConfigError(f"option '{key.strip()}' given twice", where=f"pass spec '{spec}'")
            opts[key.strip()] = value.strip()
    return name, opts


def load_pipeline_file(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a TOML pipeline::

        [[pass]]
        name = "prune"
        ratio = 0.5
        mode = "structured"

        [[pass]]
        name = "mixed_precision"
        dtype = "bfloat16"
    """
    p = Path(path)
    if not p.is_file():
        raise PassConfigError("pipeline file not found", where=str(p), fix="check the --config path")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PassConfigError(f"invalid TOML: {exc}", where=str(p)) from exc
    entries = doc.get("pass", doc.get("passes"))
    if not isinstance(entries, list) or not entries:
        raise PassConfigError("no [[pass]] tables", where=str(p),
                              fix='write [[pass]] tables each with name = "PASS" and its options')
    unknown = sorted(set(doc) - {"pass", "passes"})
    if unknown:
        raise PassConfigError(f"unknown top-level key(s) {', '.join(repr(k) for k in unknown)}", where=str(p),
                              fix='a pipeline file holds only [[pass]] tables; put options inside them')
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PassConfigError(f"[[pass]] number {i + 1} has no name", where=str(p),
                                  fix='add name = "PASS"')
        opts = {k: v for k, v in entry.items() if k != "name"}
        out.append((entry["name"], opts))
    return out


def build_pipeline(specs: Iterable[str] = (), config: str | Path | None = None) -> list[Pass]:
    """Passes from a TOML file (first) and ``-p`` spec strings (after), in order."""
    items: list[tuple[str, Mapping[str, Any]]] = []
    if config is not None:
        items.extend(load_pipeline_file(config))
    items.extend(parse_pass_spec(s) for s in specs)
    return [create_pass(name, opts) for name, opts in items]


def as_passes(passes: Sequence[Pass | str] | Pass | str) -> list[Pass]:
    """Accept pass objects, spec strings or a mix (the Python API's convenience)."""
    if isinstance(passes, (Pass, str)):
        passes = [passes]
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, str):
            name, opts = parse_pass_spec(p)
            out.append(create_pass(name, opts))
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        else:
            raise PassConfigError(f"{p!r} is not a pass", fix="give Pass instances or 'name:k=v' strings")
    return out
