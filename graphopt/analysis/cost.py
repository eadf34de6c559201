"""Shape, dtype and cost metadata on every node.

One interpreter run over the example inputs records, for each node, the output's
``tensor_meta`` (shape, dtype, strides: torch.fx's own ``TensorMetadata``) and a
:class:`NodeCost`: forward multiply-accumulates, parameters and output bytes.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (aten-level: conv, mm,
addmm, bmm, baddbmm, scaled-dot-product attention, ...), so the count is the same whatever
Python-level op produced the matmul, and opaque (untraced) modules are counted too.
Elementwise ops, norms and pooling count as 0 MACs, as in the usual "GMACs" tables.
The backward pass is estimated at 2x the forward MACs (grad wrt inputs and wrt weights).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from graphopt.ir import eval_mode

__all__ = ["NodeCost", "GraphCost", "annotate", "annotate_run", "annotated_outputs", "graph_cost", "BACKWARD_FACTOR"]

BACKWARD_FACTOR = 2.0


@dataclass
class NodeCost:
    macs: int = 0
    params: int = 0
    out_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"macs": self.macs, "params": self.params, "out_bytes": self.out_bytes}


@dataclass
class GraphCost:
    """Totals over a captured graph (parameters counted once even if shared)."""

    macs: int
    params: int
    trainable_params: int
    activation_bytes: int
    nodes: int
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def backward_macs(self) -> int:
        return int(self.macs * BACKWARD_FACTOR)

    @property
    def train_step_flops(self) -> int:
        """FLOPs of forward + backward (2 FLOPs per MAC)."""
        return int(2 * (self.macs + self.backward_macs))

    def as_dict(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "backward_macs_estimate": self.backward_macs,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "activation_bytes": self.activation_bytes,
            "nodes": self.nodes,
            "coverage": self.coverage,
        }


def _tensor_bytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _tensor_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _extract_tensor_metadata(value)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_tensor_meta(v) for v in value)
    return None


def _node_params(gm: fx.GraphModule, node: fx.Node) -> int:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return sum(p.numel() for p in mod.parameters())
    if node.op == "get_attr":
        try:
            obj = gm.get_parameter(node.target)
        except AttributeError:
            return 0
        return obj.numel()
    return 0


class _CostInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        flops = self.counter.get_total_flops() - before
        n.meta["tensor_meta"] = _tensor_meta(result)
        n.meta["cost"] = NodeCost(
            macs=int(flops // 2), params=_node_params(self.module, n), out_bytes=_tensor_bytes(result)
        )
        if isinstance(result, torch.Tensor):
            n.meta["val_shape"] = tuple(result.shape)
        return result


def annotate(gm: fx.GraphModule, example_inputs: Iterable[torch.Tensor]) -> GraphCost:
    """Run ``gm`` once on ``example_inputs`` (eval mode, no grad) and annotate every node.

    The module's training flag and buffers (BatchNorm statistics) are left as they were.
    """
    return annotate_run(gm, example_inputs)[0]


def annotate_run(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> tuple[GraphCost, Any]:
    """:func:`annotate`, also returning the graph's outputs. The run is seeded (``torch.manual_seed(0)``
    inside a forked RNG: the caller's random state is untouched), as the verifier's runs are, and its
    outputs are remembered for :func:`annotated_outputs`."""
    inputs = tuple(example_inputs)
    key = _fingerprint(gm, inputs)
    counter = FlopCounterMode(display=False)
    with torch.random.fork_rng(devices=[]), eval_mode(gm), torch.no_grad(), counter:
        torch.manual_seed(0)
        out = _CostInterpreter(gm, counter).run(*inputs)
    if _fingerprint(gm, inputs) == key:  # the run wrote nothing it read (inputs, parameters, buffers)
        _LAST_RUN[gm] = (key, out)
    else:
        _LAST_RUN.pop(gm, None)
    return graph_cost(gm), out


# the outputs of each graph's last annotation run, while neither its code, its tensors nor the inputs changed
_LAST_RUN: "weakref.WeakKeyDictionary[fx.GraphModule, tuple[Any, Any]]" = weakref.WeakKeyDictionary()


def _fingerprint(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    def tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
        return (t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype)

    return (gm.code,
            tuple(tensor_key(x) if isinstance(x, torch.Tensor) else id(x) for x in inputs),
            tuple(tensor_key(t) for t in itertools.chain(gm.parameters(), gm.buffers())))


def annotated_outputs(gm: nn.Module, example_inputs: Iterable[Any]) -> Any | None:
    """The eval-mode outputs of ``gm``'s last :func:`annotate` run on these very inputs (same tensors,
    unmodified), when its code and tensors are unchanged since; else None. The capture's eager check
    and the verifier's own-weights check reuse them instead of running the graph again."""
    entry = _LAST_RUN.get(gm) if isinstance(gm, fx.GraphModule) else None
    if entry is None or entry[0] != _fingerprint(gm, tuple(example_inputs)):
        return None
    return entry[1]


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    """Totals from the metadata :func:`annotate` left on the nodes."""
    macs = act = 0
    opaque = gm.meta.get("graphopt", {}).get("opaque", {}) if hasattr(gm, "meta") else {}
    opaque_macs = 0
    n_nodes = 0
    for node in gm.graph.nodes:
        n_nodes += 1
        cost: NodeCost | None = node.meta.get("cost")
        if cost is None:
            continue
        macs += cost.macs
        if node.op not in ("placeholder", "get_attr", "output"):
            act += cost.out_bytes
        if node.op == "call_module" and node.target in opaque:
            opaque_macs += cost.macs
    params = {id(p): p for p in gm.parameters()}
    n_params = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    # over what exists: each parameter once (tied or inside nested opaque modules), fractions in [0, 1]
    opaque_ids: dict[int, int] = {}
    for name in opaque:
        try:
            opaque_ids.update((id(p), p.numel()) for p in gm.get_submodule(name).parameters() if id(p) in params)
        except AttributeError:
            pass
    opaque_params = sum(opaque_ids.values())
    coverage = {
        "macs": min(1.0, max(0.0, 1.0 - (opaque_macs / macs if macs else 0.0))),
        "params": min(1.0, max(0.0, 1.0 - (opaque_params / n_params if n_params else 0.0))),
        "opaque": [{"module": k, **v} for k, v in opaque.items()],
    }
    coverage["fraction"] = min(coverage["macs"], coverage["params"])
    return GraphCost(macs=macs, params=n_params, trainable_params=trainable,
                     activation_bytes=act, nodes=n_nodes, coverage=coverage)


def module_summary(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human label for a node's operation (used by reports and the inspect table)."""
    if node.op == "call_module":
        mod: nn.Module = gm.get_submodule(node.target)
        return type(mod).__name__
    if node.op in ("call_function", "call_method"):
        tgt = node.target
        return getattr(tgt, "__name__", str(tgt)) if node.op == "call_function" else f".{tgt}"
    return node.op
