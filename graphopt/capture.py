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
import logging
from typing import Any, Iterable

import torch
from torch import fx, nn

from graphopt.analysis.cost import GraphCost, annotate
from graphopt.errors import CaptureError
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
    gm.train(src.training)
    gm.meta["graphopt"] = {
        "opaque": opaque,
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in inputs],
    }
    cost: GraphCost = annotate(gm, inputs)
    gm.meta["graphopt"]["cost"] = cost
    return gm
