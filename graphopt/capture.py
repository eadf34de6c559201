"""Capture an ``nn.Module`` into the IR: a ``torch.fx.GraphModule`` with metadata.

Tracing is ``torch.fx`` symbolic tracing. When a submodule cannot be traced (data-dependent
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
from typing import Any, Iterable

import torch
from torch import fx, nn

from graphopt.analysis.cost import GraphCost, annotate
from graphopt.errors import CaptureError
from graphopt.ir import tensor_specs
from graphopt.modelfile import user_frame

__all__ = ["capture", "GraphoptTracer", "MAX_LEAF_RETRIES"]

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


def capture(module: nn.Module, example_inputs: Iterable[torch.Tensor] | torch.Tensor, *,
            copy_module: bool = True) -> fx.GraphModule:
    """Capture ``module`` into a GraphModule with shapes, dtypes and costs on every node.

    The module is deep-copied first (``copy_module=False`` to skip), so rewrites never touch
    the caller's model. ``gm.meta["graphopt"]`` holds ``opaque`` (module -> class, reason),
    ``cost`` (a :class:`GraphCost`) and the example inputs' shapes.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    inputs = tuple(example_inputs)
    if isinstance(module, fx.GraphModule) and "graphopt" in module.meta:
        gm = copy.deepcopy(module) if copy_module else module
        gm.meta["graphopt"]["cost"] = annotate(gm, inputs)
        return gm
    src = copy.deepcopy(module) if copy_module else module
    opaque: dict[str, dict[str, str]] = {}
    gm = _trace(src, opaque)
    mode_info = _make_mode_aware(gm, src, opaque)
    gm.train(src.training)
    gm.meta["graphopt"] = {
        "opaque": opaque,
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "inputs": tensor_specs(inputs),
        "training_mode": mode_info,
    }
    extra = mode_info.get("only_in_train_mode") or mode_info.get("only_in_eval_mode")
    if extra or mode_info.get("unresolved"):
        log.warning("%s has code that runs only in %s mode (%s); it was captured in that mode and also runs "
                    "in the other", type(module).__name__, mode_info["captured_mode"],
                    ", ".join((extra or []) + mode_info.get("unresolved", []))[:300])
    cost: GraphCost = annotate(gm, inputs)
    gm.meta["graphopt"]["cost"] = cost
    return gm
