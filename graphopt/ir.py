"""Helpers over the IR (a ``torch.fx.GraphModule`` plus ``gm.meta["graphopt"]``) for passes.

The IR is plain torch.fx: nodes carry ``tensor_meta`` (shape, dtype) and ``cost``
(:class:`graphopt.analysis.NodeCost`) after :func:`graphopt.analysis.annotate`. Graph-level
facts live in ``gm.meta["graphopt"]``: ``opaque`` modules, ``cost``, ``inputs`` and any
policy a pass records for the emitter (``precision``, ``memory_format``, ``frozen`` ...).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

__all__ = [
    "graph_meta", "example_inputs", "calibration_batches", "module_of", "is_module", "add_module",
    "replace_module", "name_matches", "output_shape", "output_dtype", "unique_attr_name", "run_calibration",
    "tensor_specs",
]


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The graph-level metadata dict (created if missing)."""
    return gm.meta.setdefault("graphopt", {})


def example_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """The example inputs the graph was captured with (set by ``graphopt.optimize``)."""
    inputs = graph_meta(gm).get("example_inputs")
    if inputs is None:
        raise KeyError("graph has no example inputs; capture it with graphopt.capture/optimize")
    return tuple(inputs)


def calibration_batches(gm: fx.GraphModule, n: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``n`` input batches for data-dependent passes.

    Batches from the model file's ``data()`` when the pipeline was given one (stored under
    ``gm.meta["graphopt"]["calibration_data"]`` as an iterable of input tuples); otherwise the
    example inputs, repeated.
    """
    source = graph_meta(gm).get("calibration_data")
    if source is not None:
        it = iter(source)
        for _ in range(n):
            try:
                batch = next(it)
            except StopIteration:
                return
            yield tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        return
    ex = example_inputs(gm)
    for _ in range(n):
        yield ex


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def is_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    mod = module_of(gm, node)
    return mod is not None and isinstance(mod, types)


def unique_attr_name(gm: fx.GraphModule, base: str) -> str:
    """A module path not used yet in ``gm`` derived from ``base`` (``a.b`` -> ``a.b_1`` ...)."""
    base = base.replace("-", "_")
    names = {n for n, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()} | {
        n for n, _ in gm.named_buffers()}
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def add_module(gm: fx.GraphModule, base: str, module: nn.Module) -> str:
    """Register ``module`` under a fresh path derived from ``base``; returns the path."""
    name = unique_attr_name(gm, base)
    gm.add_submodule(name, module)
    return name


def replace_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Swap the submodule at ``target`` (every call site now calls ``module``)."""
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def name_matches(name: str, globs: Iterable[str] | None) -> bool:
    """``fnmatch`` of a module path against glob patterns (empty/None matches nothing)."""
    return any(fnmatch.fnmatchcase(name, g) for g in (globs or ()))


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def output_dtype(node: fx.Node) -> torch.dtype | None:
    tm = node.meta.get("tensor_meta")
    return tm.dtype if hasattr(tm, "dtype") else None


def run_calibration(gm: fx.GraphModule, n: int) -> int:
    """Run ``gm`` on ``n`` :func:`calibration_batches` in eval mode without gradients (forward hooks
    the caller registered collect what they need); restores the training flag. Returns the number
    of batches run."""
    was = gm.training
    batches = 0
    try:
        gm.eval()
        with torch.no_grad():
            for batch in calibration_batches(gm, n):
                gm(*batch)
                batches += 1
    finally:
        gm.train(was)
    return batches


def tensor_specs(value: Any) -> list[dict[str, Any]]:
    """``[{"shape": [...], "dtype": "float32"}, ...]`` for every tensor in ``value`` (any nesting):
    how manifests and reports describe inputs and outputs."""
    from torch.utils._pytree import tree_flatten

    flat, _ = tree_flatten(value)
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for t in flat if isinstance(t, torch.Tensor)]
