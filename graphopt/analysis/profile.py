"""Measured per-node cost: forward + backward time of every node, on a chosen device.

Each compute node (``call_module`` / ``call_function`` / ``call_method``) is timed in
isolation on the values it sees when the graph runs on its example inputs: a forward call,
then ``torch.autograd.grad`` of its output (with a random cotangent) with respect to its
module's trainable parameters and those of its inputs that carry gradients in a training step
(values that depend on a trainable parameter: not the model's inputs). Warm-up first, then the median
of ``repeats`` runs. On CUDA the device is synchronised around every timed region.

This is what ``partition:by=time`` balances. It measures eager per-op time, so it includes
the per-op Python/dispatcher overhead that a real training step pays too; it does not see
cross-op effects (caching, kernel fusion by a compiler).
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Iterable

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from graphopt.ir import node_values

__all__ = ["profile_node_times", "COMPUTE_OPS"]

COMPUTE_OPS = ("call_module", "call_function", "call_method")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    self_obj, *rest = args
    return getattr(self_obj, str(node.target))(*rest, **kwargs)


def _needs_grad(gm: fx.GraphModule) -> dict[str, bool]:
    """Which values carry gradients in a training step: those that depend on a trainable
    parameter (the model's inputs do not; their gradient is never computed)."""
    flags: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            flags[node.name] = False
        elif node.op == "get_attr":
            try:
                flags[node.name] = gm.get_parameter(str(node.target)).requires_grad
            except AttributeError:
                flags[node.name] = False
        else:
            dep = any(flags.get(a.name, False) for a in node.all_input_nodes)
            if node.op == "call_module":
                dep = dep or any(p.requires_grad for p in gm.get_submodule(str(node.target)).parameters())
            flags[node.name] = dep
    return flags


def _time_node(gm: fx.GraphModule, node: fx.Node, values: dict[str, Any], device: torch.device,
               repeats: int, gen: torch.Generator, needs_grad: dict[str, bool]) -> tuple[float, float]:
    params = []
    if node.op == "call_module":
        params = [p for p in gm.get_submodule(str(node.target)).parameters() if p.requires_grad]

    def one() -> tuple[float, float]:
        leaves: list[torch.Tensor] = []

        def materialise(a: Any) -> Any:
            v = values[a.name]
            if isinstance(v, torch.Tensor) and v.is_floating_point() and needs_grad.get(a.name, False):
                leaf = v.detach().requires_grad_(True)
                leaves.append(leaf)
                return leaf.clone()  # in-place ops (ReLU(inplace=True)) must not touch a leaf
            return v

        args = fx.node.map_arg(node.args, materialise)
        kwargs = fx.node.map_arg(node.kwargs, materialise)
        _sync(device)
        t0 = time.perf_counter()
        out = _call(gm, node, args, kwargs)
        _sync(device)
        t1 = time.perf_counter()
        flat, _ = tree_flatten(out)
        outs = [o for o in flat if isinstance(o, torch.Tensor) and o.requires_grad]
        wrt = leaves + params
        if not outs or not wrt:
            return t1 - t0, 0.0
        cots = [torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
                for o in outs]
        _sync(device)
        t2 = time.perf_counter()
        torch.autograd.grad(outs, wrt, cots, allow_unused=True)
        _sync(device)
        return t1 - t0, time.perf_counter() - t2

    one()  # warm-up (lazy init, allocator, oneDNN/cuDNN primitive creation)
    runs = [one() for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def profile_node_times(gm: fx.GraphModule, inputs: Iterable[torch.Tensor], *, device: str | torch.device = "cpu",
                       repeats: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Forward and backward seconds of every compute node of ``gm`` on ``device``.

    Returns ``{node_name: {"forward": s, "backward": s, "total": s}}`` (medians of ``repeats``).
    ``gm`` itself is not modified (a copy is moved to the device); training mode is used so
    that BatchNorm/Dropout do what they do in training.
    """
    device = torch.device(device)
    work = copy.deepcopy(gm).to(device)
    work.train()
    xs = tuple(x.to(device) for x in inputs)
    values = node_values(work, xs)
    # BatchNorm running stats moved during recording and will move again: irrelevant on a copy.
    gen = torch.Generator().manual_seed(seed)
    needs_grad = _needs_grad(work)
    out: dict[str, dict[str, float]] = {}
    for node in work.graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        fwd, bwd = _time_node(work, node, values, device, repeats, gen, needs_grad)
        out[node.name] = {"forward": fwd, "backward": bwd, "total": fwd + bwd}
    return out
