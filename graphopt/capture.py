"""Capture an ``nn.Module`` into the IR: a ``torch.fx.GraphModule`` with metadata.

Two front ends produce the one IR every pass works on:

- ``fx``: ``torch.fx`` symbolic tracing (below);
- ``export``: ``torch.export.export(strict=False)`` for what symbolic tracing cannot follow
  (HuggingFace transformers: decorated forwards, shape checks as control flow, iterated proxies),
  normalised into the same IR by :mod:`graphopt.capture_export` (standard layers become
  ``call_module`` nodes again, parameters keep their names).

``capture(..., capture="auto")`` tries fx first and uses export when fx fails or leaves part of the
model opaque; ``gm.meta["graphopt"]["front_end"]`` says which and why. After capture the graph's eval
outputs are compared with the eager model's (``gm.meta["graphopt"]["eager_check"]``): capture is a
rewrite too, and a graph that differs from eager is reported loudly.

fx details: When a submodule cannot be traced (data-dependent
control flow, unsupported Python), the *smallest* submodule whose forward failed is retried
as an opaque leaf, until the trace succeeds. Coverage (share of MACs and parameters inside
the IR) and each opaque module with its reason are recorded in ``gm.meta["graphopt"]``.
If the failure is in the root module's own forward, nothing can be captured and
:class:`CaptureError` names the construct and its source line.
"""

from __future__ import annotations

import copy
import difflib
import logging
import operator
import re
from typing import Any, Iterable

import torch
from torch import fx, nn

from graphopt.analysis.cost import GraphCost, annotate, annotated_outputs
from graphopt.errors import CaptureError
from graphopt.ir import tensor_specs
from graphopt.modelfile import KeywordInputs, plain_outputs, user_frame

__all__ = ["capture", "GraphoptTracer", "KeywordInputs", "plain_outputs", "MAX_LEAF_RETRIES", "FRONT_ENDS",
           "EAGER_RTOL", "set_default_front_end", "capture_lines", "capture_summary"]

log = logging.getLogger(__name__)
MAX_LEAF_RETRIES = 32


class GraphoptTracer(fx.Tracer):
    """An fx tracer that treats chosen submodules as opaque leaves and remembers which
    module's forward was running when tracing failed."""

    def __init__(self, opaque: Iterable[str] = ()):
        super().__init__()
        self.opaque = set(opaque)
        self._stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.opaque:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self._stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, "_graphopt_module"):
                exc._graphopt_module = name  # innermost failing module wins
            raise
        finally:
            self._stack.pop()


def _reason(exc: BaseException, with_location: bool = True) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(msg) > 160:
        msg = msg[:157] + "..."
    loc = user_frame(exc) if with_location else None
    return f"{type(exc).__name__}: {msg}" + (f" at {loc}" if loc else "")


def _trace(module: nn.Module, opaque: dict[str, dict[str, str]]) -> fx.GraphModule:
    for _ in range(MAX_LEAF_RETRIES + 1):
        tracer = GraphoptTracer(opaque)
        try:
            graph = tracer.trace(module)
        except Exception as exc:
            failing = getattr(exc, "_graphopt_module", None)
            if not failing or failing in opaque:
                loc = user_frame(exc)
                raise CaptureError(
                    f"torch.fx cannot trace {type(module).__name__}.forward: {_reason(exc, False)}",
                    where=loc,
                    fix="move the data-dependent code into a submodule (it is then kept opaque), "
                        "or make it independent of tensor values",
                ) from exc
            sub = module.get_submodule(failing)
            opaque[failing] = {"class": type(sub).__name__, "reason": _reason(exc)}
            log.info("treating %s (%s) as an opaque leaf: %s", failing, type(sub).__name__,
                     opaque[failing]["reason"])
            continue
        name = type(module).__name__
        gm = fx.GraphModule(tracer.root, graph, name)
        return gm
    raise CaptureError(f"more than {MAX_LEAF_RETRIES} submodules of {type(module).__name__} "
                       "cannot be traced", fix="simplify the model's control flow")


# ----------------------------------------------------------------------------- in-place ops on inputs

# ops whose result may share memory with their (first) input: an in-place op on the result writes the input
_VIEW_NAMES = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "swapaxes",
               "swapdims", "permute", "movedim", "moveaxis", "t", "squeeze", "unsqueeze", "expand", "expand_as",
               "narrow", "select", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "contiguous",
               "detach", "as_strided", "diagonal", "unfold", "real", "imag", "view_as_real", "view_as_complex",
               "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "alias",
               "getitem", "_unsafe_view", "slice", "flatten_dense_tensors"}
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad", "record_stream"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul}


def _op_name(node: fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _written_args(gm: fx.GraphModule, node: fx.Node) -> list[Any]:
    """The arguments ``node`` writes in place (empty for a functional op)."""
    args = list(node.args)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target)) if isinstance(node.target, str) else None
        return args[:1] if getattr(mod, "inplace", False) is True else []
    if node.op == "call_method":
        name = str(node.target)
        return args[:1] if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING else []
    if node.op != "call_function":
        return []
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # an ATen overload says which arguments it writes
        written = []
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                written.append(args[i] if i < len(args) else node.kwargs.get(a.name))
        return written
    if node.target in _INPLACE_OPERATORS or node.target is operator.setitem:
        return args[:1]
    if node.kwargs.get("inplace") is True or node.kwargs.get("out") is not None:
        return [node.kwargs["out"]] if node.kwargs.get("out") is not None else args[:1]
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and name not in _NOT_MUTATING:
        return args[:1]
    return []


def _view_source(node: fx.Node) -> fx.Node | None:
    """The tensor ``node`` may be a view of, or None when its result is a fresh tensor."""
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is not None and node.op == "call_function":
        return node.args[0] if any(r.alias_info is not None for r in schema.returns) else None
    return node.args[0] if _op_name(node) in _VIEW_NAMES else None


def _source_line(node: fx.Node) -> str | None:
    trace = node.meta.get("stack_trace") or ""
    frames = [m for m in re.finditer(r'File "([^"]+)", line (\d+)', trace)]
    user = [m for m in frames if "/torch/" not in m.group(1)] or frames  # the model's line, not torch's
    return f"{user[-1].group(1).rsplit('/', 1)[-1]}:{user[-1].group(2)}" if user else None


def _copy_mutated_inputs(gm: fx.GraphModule) -> list[str]:
    """Graph inputs that the forward writes in place (``x.add_(1)``, ``x.relu_()``, ``x[:, 0] = 0``, an
    inplace activation module on the input, directly or through a view) are copied at the start of the
    graph and the in-place ops act on the copy: the outputs are those of the eager model, the graph can
    run any number of times on the same tensors (verification, training with inputs that require grad)
    and the caller's tensor is no longer modified. Returns one note per copied input."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    writes: dict[fx.Node, list[str]] = {}
    for node in graph.nodes:
        for arg in _written_args(gm, node):
            base = arg
            while isinstance(base, fx.Node) and base.op != "placeholder":
                base = _view_source(base)
            if isinstance(base, fx.Node) and base.op == "placeholder":
                where = _source_line(node)
                writes.setdefault(base, []).append(_op_name(node) + (f" at {where}" if where else ""))
    notes = []
    if not writes:
        return notes
    with graph.inserting_after(placeholders[-1]):
        for ph in reversed(placeholders):
            if ph not in writes:
                continue
            copy_ = graph.call_method("clone", (ph,))
            ph.replace_all_uses_with(copy_, delete_user_cb=lambda user: user is not copy_)
            ops = writes[ph]
            notes.append(f"input '{ph.target}' is modified in place by the model ({', '.join(ops[:3])}"
                         f"{', ...' if len(ops) > 3 else ''}): the graph works on a copy of it, so outputs "
                         "are the same and the caller's tensor is left unchanged")
    graph.lint()
    gm.recompile()
    return list(reversed(notes))


def _signature(node: fx.Node) -> tuple[str, str]:
    tgt = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
    return node.op, str(tgt)


class _Unresolved(Exception):
    pass


def _merge_args(a: Any, b: Any, mode: bool, flag: fx.Node, negated: fx.Node | None, fixes: list[str],
                make_not: Any) -> Any:
    """``a`` (captured trace) with each bool that differs from ``b`` (the other mode's trace) replaced
    by the run-time training flag (or its negation)."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a
    if isinstance(a, bool) and isinstance(b, bool):
        if a == b:
            return a
        fixes.append(f"{a}->self.training" if a == mode else f"{a}->not self.training")
        return flag if a == mode else make_not()
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return type(a)(_merge_args(x, y, mode, flag, negated, fixes, make_not) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _merge_args(a[k], b[k], mode, flag, negated, fixes, make_not) for k in a}
    if a != b:
        raise _Unresolved(f"{a!r} vs {b!r}")
    return a


def _make_mode_aware(gm: fx.GraphModule, module: nn.Module, opaque: dict[str, Any]) -> dict[str, Any]:
    """torch.fx bakes ``self.training`` into traced code (``F.dropout(..., training=self.training)``,
    torchvision's stochastic depth, timm's BatchNormAct). Trace the other mode too; where the two
    traces differ only by such a bool, read the flag at run time instead (``self.training`` of the
    graph module), so ``.train()``/``.eval()`` keep working. Remaining differences (code that only
    runs in one mode) are reported."""
    modes = {m: m.training for m in module.modules()}
    mode = module.training
    try:
        module.train(not mode)
        other = GraphoptTracer(opaque).trace(module)
    except Exception as exc:  # the other mode does not trace: nothing to compare
        return {"checked": False, "reason": f"{type(exc).__name__}: {exc}"[:200]}
    finally:
        for m, t in modes.items():
            m.training = t
    a_nodes, b_nodes = list(gm.graph.nodes), list(other.nodes)
    sm = difflib.SequenceMatcher(None, [_signature(n) for n in a_nodes], [_signature(n) for n in b_nodes],
                                 autojunk=False)
    graph = gm.graph
    first = next(n for n in a_nodes if n.op != "placeholder")
    flag: fx.Node | None = None
    made: dict[str, fx.Node] = {}

    def training_flag() -> fx.Node:
        nonlocal flag
        if flag is None:
            with graph.inserting_before(first):
                flag = graph.create_node("get_attr", "training")
        return flag

    def make_not() -> fx.Node:
        if "not" not in made:
            f = training_flag()
            with graph.inserting_after(f):
                made["not"] = graph.call_function(operator.not_, (f,))
        return made["not"]

    patched: list[dict[str, Any]] = []
    only_captured: list[str] = []
    unresolved: list[str] = []
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            for a, b in zip(a_nodes[i1:i2], b_nodes[j1:j2]):
                if a.op in ("placeholder", "output"):
                    continue
                fixes: list[str] = []
                try:
                    args = _merge_args(a.args, b.args, mode, training_flag(), None, fixes, make_not)
                    kwargs = _merge_args(a.kwargs, b.kwargs, mode, training_flag(), None, fixes, make_not)
                except _Unresolved as exc:
                    unresolved.append(f"{a.name}: {exc}")
                    continue
                if fixes:
                    a.args, a.kwargs = args, kwargs
                    patched.append({"node": a.name, "target": _signature(a)[1], "args": fixes})
        else:
            only_captured += [n.name for n in a_nodes[i1:i2] if n.op not in ("placeholder", "output")]
    if flag is not None and not flag.users:
        graph.erase_node(flag)
    if patched:
        gm.recompile()
    return {"checked": True, "captured_mode": "train" if mode else "eval", "made_mode_aware": patched,
            f"only_in_{'train' if mode else 'eval'}_mode": only_captured,
            "unresolved": unresolved}



FRONT_ENDS = ("auto", "fx", "export")
_DEFAULT_FRONT_END = "auto"


def set_default_front_end(name: str) -> None:
    """The front end ``capture()`` uses when none is passed (the CLI's ``--capture`` sets it for every
    capture a command makes, including those inside benchmarks and training)."""
    global _DEFAULT_FRONT_END
    if name not in FRONT_ENDS:
        raise CaptureError(f"unknown capture front end '{name}'", fix=f"use one of {', '.join(FRONT_ENDS)}")
    _DEFAULT_FRONT_END = name

# relative error (norm of the difference / norm of the eager outputs) above which the captured graph
# is reported as differing from the eager model (float32 reordering stays far below it)
EAGER_RTOL = 1e-3


def _disable_cache(module: nn.Module) -> bool:
    """``use_cache=False`` on a transformers config (training needs no KV cache, and a cache object in
    the outputs is not a tensor). Returns whether anything was changed."""
    changed = False
    for m in module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", False):
            cfg.use_cache = False
            changed = True
    return changed


def _fx_capture(src: nn.Module, names: tuple[str, ...] | None) -> tuple[fx.GraphModule, dict[str, Any]]:
    opaque: dict[str, dict[str, str]] = {}
    if names is None:
        gm = _trace(src, opaque)
    else:
        gm = _trace_keywords(src, names, opaque)
    return gm, opaque


def _trace_keywords(src: nn.Module, names: tuple[str, ...], opaque: dict[str, Any]) -> fx.GraphModule:
    """fx-trace ``src`` called with keyword inputs ``names``: other forward parameters keep their
    defaults; placeholders are put in the order of ``names``."""
    import inspect

    sig = inspect.signature(src.forward)
    concrete = {p.name: p.default for p in sig.parameters.values()
                if p.name not in names and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is not inspect.Parameter.empty}
    missing = [n for n in names if n not in sig.parameters]
    if missing:
        raise CaptureError(f"{type(src).__name__}.forward has no parameter {missing[0]!r}",
                           fix="use forward()'s parameter names as example_inputs() keys")
    for _ in range(MAX_LEAF_RETRIES + 1):
        tracer = GraphoptTracer(opaque)
        try:
            graph = tracer.trace(src, concrete_args=concrete)
        except Exception as exc:
            failing = getattr(exc, "_graphopt_module", None)
            if not failing or failing in opaque:
                raise CaptureError(
                    f"torch.fx cannot trace {type(src).__name__}.forward: {_reason(exc, False)}",
                    where=user_frame(exc), fix="use --capture export, or make the code independent of tensor values",
                ) from exc
            sub = src.get_submodule(failing)
            opaque[failing] = {"class": type(sub).__name__, "reason": _reason(exc)}
            continue
        # concrete args left placeholders behind that nothing uses; drop them, order the rest
        phs = {n.name: n for n in graph.nodes if n.op == "placeholder"}
        for name, node in list(phs.items()):
            if name not in names and not node.users:
                graph.erase_node(node)
        first = next(iter(graph.nodes))
        for name in reversed(names):
            node = phs[name]
            if node is not first:
                first.prepend(node)
            first = node
        return fx.GraphModule(tracer.root, graph, type(src).__name__)
    raise CaptureError(f"more than {MAX_LEAF_RETRIES} submodules of {type(src).__name__} cannot be traced",
                       fix="simplify the model's control flow")


def _described(src: nn.Module, opaque: dict[str, Any]) -> bool:
    """Every opaque module has a registered channel rule: the user described it to the passes as a
    layer, so auto keeps it as one (fx) instead of tracing through it (export)."""
    from graphopt.analysis.channels.rules import channel_rule_for

    return bool(opaque) and all(channel_rule_for(src.get_submodule(name)) is not None for name in opaque)


def _coverage_of(gm: fx.GraphModule) -> float:
    return float(gm.meta["graphopt"]["cost"].coverage["fraction"])


def _fresh(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """Copies of the tensor inputs: a model that writes its inputs in place must not change the next run's."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)


def _eager_check(src: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                 names: tuple[str, ...] | None) -> dict[str, Any]:
    """Eval-mode outputs of the graph against the eager model's, on the example inputs."""
    from torch.utils._pytree import tree_flatten

    from graphopt.ir import eval_mode

    try:
        with torch.random.fork_rng(), torch.no_grad(), eval_mode(src), eval_mode(gm):  # caller's RNG untouched
            torch.manual_seed(0)
            ref = src(**dict(zip(names, _fresh(inputs)))) if names is not None else src(*_fresh(inputs))
            got = annotated_outputs(gm, inputs)  # the annotation run's (same seed), when still valid
            if got is None:
                torch.manual_seed(0)
                got = gm(*_fresh(inputs))
    except Exception as exc:  # the graph does not run where eager does: the loudest mismatch
        return {"checked": True, "ok": False, "rel_error": None,
                "reason": f"the captured graph fails where the eager model runs: {_reason(exc)}"}
    ref_flat = [t for t in tree_flatten(plain_outputs(ref))[0] if isinstance(t, torch.Tensor)]
    got_flat = [t for t in tree_flatten(got)[0] if isinstance(t, torch.Tensor)]
    if len(ref_flat) != len(got_flat) or any(a.shape != b.shape for a, b in zip(ref_flat, got_flat)):
        return {"checked": True, "ok": False, "rel_error": None,
                "reason": f"the captured graph returns {[tuple(t.shape) for t in got_flat]}, the eager model "
                          f"{[tuple(t.shape) for t in ref_flat]}"}
    diff = ref_norm = 0.0
    for a, b in zip(ref_flat, got_flat):
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return {"checked": True, "ok": False, "rel_error": None,
                        "reason": "integer outputs of the captured graph differ from the eager model's"}
            continue
        a64, b64 = a.double(), b.double()
        if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
            if not torch.equal(a64.nan_to_num(), b64.nan_to_num()):
                return {"checked": True, "ok": False, "rel_error": None, "reason": "non-finite outputs differ"}
            continue
        diff += float((a64 - b64).pow(2).sum())
        ref_norm += float(a64.pow(2).sum())
    rel = (diff ** 0.5) / max(ref_norm ** 0.5, 1e-12)
    ok = rel <= EAGER_RTOL
    out = {"checked": True, "ok": ok, "rel_error": rel, "tolerance": EAGER_RTOL}
    if not ok:
        out["reason"] = (f"the captured graph differs from the eager model by {rel:.2%} (relative, eval mode): "
                         "tracing froze Python control flow or state; exact passes will then fail against "
                         "the graph, not the model")
    return out


def capture(module: nn.Module, example_inputs: Iterable[torch.Tensor] | torch.Tensor | dict[str, Any], *,
            copy_module: bool = True, capture: str | None = None, check_eager: bool = True) -> fx.GraphModule:
    """Capture ``module`` into a GraphModule with shapes, dtypes and costs on every node.

    ``example_inputs``: a tensor, a tuple of tensors, or a dict of keyword inputs (HuggingFace
    style; the graph's placeholders are then named and ordered like the dict). ``capture``: the
    front end, ``"fx"``, ``"export"`` or ``"auto"`` (fx first; export when fx fails or leaves part of
    the model opaque; default: :func:`set_default_front_end`, "auto"). The module is deep-copied first (``copy_module=False`` to skip), so rewrites
    never touch the caller's model. ``gm.meta["graphopt"]`` holds ``opaque`` (module -> class,
    reason), ``cost`` (a :class:`GraphCost`), ``front_end`` (which and why), ``eager_check`` (the
    graph's eval outputs against the eager model's) and the example inputs' shapes.
    """
    capture = capture or _DEFAULT_FRONT_END
    if capture not in FRONT_ENDS:
        raise CaptureError(f"unknown capture front end '{capture}'", fix=f"use one of {', '.join(FRONT_ENDS)}")
    names: tuple[str, ...] | None = None
    if isinstance(example_inputs, dict):
        names = tuple(example_inputs)
        inputs = tuple(example_inputs.values())
    elif isinstance(example_inputs, torch.Tensor):
        inputs = (example_inputs,)
    else:
        inputs = tuple(example_inputs)
    if isinstance(module, fx.GraphModule) and "graphopt" in module.meta:
        gm = copy.deepcopy(module) if copy_module else module
        gm.meta["graphopt"]["cost"] = annotate(gm, inputs)
        return gm
    outer = module
    if isinstance(module, KeywordInputs):
        names, module = module.names, module.model
    src = copy.deepcopy(module) if copy_module else module
    notes: list[str] = []
    if _disable_cache(src):
        notes.append("use_cache=False set on the model config (training needs no KV cache)")
    tried: list[str] = []
    gm: fx.GraphModule | None = None
    reason = ""
    fx_error: CaptureError | None = None
    fx_gm: fx.GraphModule | None = None
    fx_check: dict[str, Any] | None = None
    if capture in ("auto", "fx"):
        try:
            gm, opaque = _fx_capture(src, names)
            _finish(gm, src, inputs, opaque, fx_mode=True)
            cov = _coverage_of(gm)
            reason = "asked for (--capture fx)" if capture == "fx" else "torch.fx traced the whole model"
            if check_eager and cov >= 1.0:
                fx_check = _eager_check(src, gm, inputs, names)
            if capture == "auto" and ((cov < 1.0 and not _described(src, opaque))
                                      or (fx_check is not None and not fx_check["ok"])):
                tried.append(f"fx: coverage {cov:.0%}" if cov < 1.0 else "fx: graph differs from eager")
                fx_gm, gm = gm, None
        except CaptureError as exc:
            if capture == "fx":
                raise
            fx_error, fx_gm = exc, None
            tried.append(f"fx: {getattr(exc, 'what', exc)}")
    if gm is None:
        from graphopt.capture_export import export_capture

        try:
            gm = export_capture(src, inputs, names)
            _finish(gm, src, inputs, {}, fx_mode=False)
            if check_eager and fx_gm is not None:  # auto: keep fx when export's graph is the one that differs
                ex_check = _eager_check(src, gm, inputs, names)
                if not ex_check["ok"]:
                    fx_check = fx_check or _eager_check(src, fx_gm, inputs, names)
                    if fx_check["ok"]:
                        err = ex_check.get("rel_error")
                        raise CaptureError("captured a graph that differs from the eager model"
                                           + (f" by {err:.0%}" if err is not None else ""))
            reason = ("asked for (--capture export)" if capture == "export"
                      else "torch.fx " + ("left part of the model opaque" if fx_gm is not None else "failed")
                      + f" ({tried[-1][4:]}); torch.export captured it")
        except CaptureError as exc:
            if capture == "export" or (fx_gm is None and fx_error is None):
                raise
            if fx_gm is None:
                fx_what = getattr(fx_error, "what", str(fx_error))
                raise CaptureError(f"neither torch.fx nor torch.export can capture {type(module).__name__}: "
                                   f"{fx_what}"[:300], where=getattr(fx_error, "where", None) or exc.where,
                                   fix="make forward()'s control flow independent of tensor values") from exc
            tried.append(f"export: {exc}")
            gm = fx_gm
            reason = f"torch.export {getattr(exc, 'what', str(exc))[:160]}; kept the fx capture with opaque modules"
    assert gm is not None
    meta = gm.meta["graphopt"]
    meta["source_class"] = f"{type(module).__module__}.{type(module).__qualname__}"
    meta["inputs"] = tensor_specs(inputs)
    if names is not None:
        meta["input_names"] = list(names)
    meta["front_end"] = {"used": meta.pop("_front_end"), "asked": capture, "reason": reason, "tried": tried}
    notes += meta.pop("_input_copies", [])
    if notes:
        meta["capture_notes"] = notes
    if not check_eager:
        check: dict[str, Any] = {"checked": False}
    elif meta["front_end"]["used"] == "fx" and fx_check is not None:
        check = fx_check
    else:
        check = _eager_check(src, gm, inputs, names)
    meta["eager_check"] = check
    if check.get("checked") and not check["ok"]:
        log.warning("capture of %s does not match the eager model: %s", type(module).__name__, check["reason"])
    del outer
    return gm


def capture_summary(gm: fx.GraphModule) -> dict[str, Any]:
    """What a report says about the capture: front end and why, notes, the eager check."""
    meta = gm.meta.get("graphopt", {})
    out = {k: meta[k] for k in ("front_end", "eager_check", "capture_notes", "input_names") if k in meta}
    return out


def capture_lines(gm: fx.GraphModule) -> list[tuple[str, bool]]:
    """Human lines about the capture, ``(text, is_warning)``: front end and why, notes, eager check."""
    meta = gm.meta.get("graphopt", {})
    lines: list[tuple[str, bool]] = []
    fe = meta.get("front_end")
    if fe:
        lines.append((f"capture: {fe['used']} ({fe['reason']})", False))
    for note in meta.get("capture_notes", []):
        lines.append((f"capture: {note}", False))
    check = meta.get("eager_check", {})
    if check.get("checked"):
        if check["ok"]:
            lines.append((f"capture matches the eager model (relative error {check['rel_error']:.1e})", False))
        else:
            lines.append((f"WARNING: {check['reason']}", True))
    return lines


def _finish(gm: fx.GraphModule, src: nn.Module, inputs: tuple[Any, ...], opaque: dict[str, Any],
            fx_mode: bool) -> None:
    mode_info = _make_mode_aware(gm, src, opaque) if fx_mode else {"checked": True, "captured_mode":
                                                                    "train" if src.training else "eval",
                                                                    "made_mode_aware": "dropout"}
    gm.train(src.training)
    input_copies = _copy_mutated_inputs(gm)
    gm.meta["graphopt"] = {"opaque": opaque, "training_mode": mode_info,
                           "_front_end": "fx" if fx_mode else "export", "_input_copies": input_copies}
    extra = mode_info.get("only_in_train_mode") or mode_info.get("only_in_eval_mode")
    if extra or mode_info.get("unresolved"):
        log.warning("%s has code that runs only in %s mode (%s); it was captured in that mode and also runs "
                    "in the other", type(src).__name__, mode_info["captured_mode"],
                    ", ".join((extra or []) + mode_info.get("unresolved", []))[:300])
    cost: GraphCost = annotate(gm, inputs)
    gm.meta["graphopt"]["cost"] = cost
