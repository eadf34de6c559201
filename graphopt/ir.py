"""The public API a pass is written against: helpers over the IR, and the pass contract.

The IR is plain torch.fx: a ``torch.fx.GraphModule`` whose nodes carry ``tensor_meta`` (shape,
dtype) and ``cost`` (:class:`graphopt.analysis.NodeCost`) after :func:`graphopt.analysis.annotate`.
Graph-level facts live in ``gm.meta["graphopt"]`` (:func:`graph_meta`): ``opaque`` modules (leaves
capture did not trace into), ``cost``, ``example_inputs``, ``calibration_data`` and any policy a
pass records for the emitter (``precision``, ``memory_format``, ``frozen``, ``partition`` ...).

The pass contract (built-in passes in ``passes/`` are written exactly as a plugin would be, with
``graphopt`` and this module only):

- **Who copies.** :class:`graphopt.PassManager` gives ``Pass.call`` a deep copy of the graph
  (:func:`copy_graph`) when it verifies (the default), so the original stays available as the
  reference; with ``verify=False`` ``call`` gets the graph itself. Either way a pass rewrites the
  ``gm`` it is given in place and returns it in its :class:`graphopt.PassResult`; a pass that needs
  a pristine copy of its own (a reference, a trial rewrite) calls :func:`copy_graph`.
- **What a pass may assume.** ``requires`` has passed; every node has ``tensor_meta`` and
  ``cost`` from the previous step; ``graph_meta(gm)["example_inputs"]`` holds the inputs;
  ``gm``'s training flag is whatever the user's model had (run code that must be deterministic
  under :func:`eval_mode`, which restores every submodule's flag).
- **What a pass must not do.** Keep state across calls (all configuration is in ``__init__``);
  modify the example inputs or calibration data (they are shared with the original, not copied);
  leave a module's training flags or buffers changed after a measurement of its own; skip a
  candidate silently (each one is a ``Rewrite`` or a ``Decline`` with its reason:
  :func:`candidate_sites` does this for the usual call_module sites); raise anything but a
  :class:`graphopt.errors.GraphoptError` for a problem it detected (any other exception is
  reported as a bug in the pass).
- **What happens afterwards (PassManager).** ``ensures(result.gm)``, then ``graph.lint()``,
  ``recompile()``, shape and cost re-annotation (new nodes need no ``tensor_meta`` of their own),
  then the numeric check the pass's ``semantics`` promise against the original graph (see
  ``graphopt.verify``). A pass may call ``gm.recompile()`` itself when it runs the rewritten graph
  inside ``call`` (a calibration, its own measurement).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import fx, nn

from graphopt.pass_infra import Decline

__all__ = [
    "graph_meta", "example_inputs", "calibration_batches", "copy_graph", "eval_mode", "train_mode", "module_of",
    "is_module", "add_module", "replace_module", "name_matches", "glob_decline", "Site", "candidate_sites",
    "output_shape", "output_dtype", "unique_attr_name", "run_calibration", "node_values", "tensor_specs",
    "ScaledDotProductAttention", "node_arg", "node_location",
]

_SHARED_META = ("example_inputs", "calibration_data")


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


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of a GraphModule (parameters, buffers, graph, ``meta``) that shares, does not
    copy, the example inputs and calibration data in ``gm.meta["graphopt"]``."""
    meta = graph_meta(gm)
    shared = {k: meta.pop(k) for k in _SHARED_META if k in meta}
    try:
        new = copy.deepcopy(gm)
    finally:
        meta.update(shared)
    graph_meta(new).update(shared)
    return new


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(m):`` runs ``m`` in eval mode and afterwards restores the training flag
    of ``m`` and of every submodule to what it was (a model may keep some parts in eval mode
    while training, e.g. frozen BatchNorms; ``m.train(was)`` would lose that)."""
    with _mode(module, False):
        yield module


@contextlib.contextmanager
def train_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``with train_mode(m):`` like :func:`eval_mode`, in train mode (buffers are not restored:
    BatchNorm statistics update as in any train-mode forward)."""
    with _mode(module, True):
        yield module


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def is_module(gm: fx.GraphModule, node: fx.Node, types: type | tuple[type, ...]) -> bool:
    """True when ``node`` calls a submodule that is an instance of ``types``."""
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


def glob_decline(path: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> Decline | None:
    """The :class:`Decline` for a site left out by a pass's ``include``/``exclude`` globs, else None
    (an empty ``include`` includes everything)."""
    include = list(include or ())
    if include and not name_matches(path, include):
        return Decline(path, "not matched by include globs")
    if name_matches(path, exclude):
        return Decline(path, "matched by exclude globs")
    return None


@dataclass
class Site:
    """One submodule a pass may rewrite, with every ``call_module`` node calling it (in graph order;
    more than one when the module is shared)."""
    path: str
    module: nn.Module
    nodes: list[fx.Node] = field(default_factory=list)


def candidate_sites(gm: fx.GraphModule, types: type | tuple[type, ...], *, include: Iterable[str] | None = None,
                    exclude: Iterable[str] | None = None,
                    reject: Callable[[str, nn.Module], str | None] | None = None) -> tuple[list[Site], list[Decline]]:
    """The ``call_module`` sites of ``gm`` whose module is an instance of ``types``, in graph order.

    Each site is either returned or declined with its reason: first ``reject(path, module)`` (a
    pass's structural reason not to rewrite, or None), then the ``include``/``exclude`` globs on the
    module path (:func:`glob_decline`). Returns ``(sites, declined)``.
    """
    by_path: dict[str, Site] = {}
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if mod is not None and isinstance(mod, types):
            by_path.setdefault(str(node.target), Site(str(node.target), mod)).nodes.append(node)
    sites: list[Site] = []
    declined: list[Decline] = []
    for path, site in by_path.items():
        why = reject(path, site.module) if reject is not None else None
        if why:
            declined.append(Decline(path, why))
            continue
        d = glob_decline(path, include, exclude)
        if d is not None:
            declined.append(d)
            continue
        sites.append(site)
    return sites, declined


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given by keyword or at position ``index``; else ``default``."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def node_location(node: fx.Node) -> str:
    """``module.path:node`` from the node's ``nn_module_stack`` (both front ends record it), else the
    node's name: where a report points a user."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        value = list(stack.values())[-1]
        path = value[0] if isinstance(value, tuple) else ""
        if path:
            return f"{path}:{node.name}"
    return node.name


def output_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ``node`` produces (from ``tensor_meta``), None when it is not one tensor."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def output_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype ``node`` produces (from ``tensor_meta``), None when it is not one tensor."""
    tm = node.meta.get("tensor_meta")
    return tm.dtype if hasattr(tm, "dtype") else None


def run_calibration(gm: fx.GraphModule, n: int) -> int:
    """Run ``gm`` on ``n`` :func:`calibration_batches` in eval mode without gradients (forward hooks
    the caller registered collect what they need); restores the training flag. Returns the number
    of batches run."""
    batches = 0
    with eval_mode(gm), torch.no_grad():
        for batch in calibration_batches(gm, n):
            gm(*batch)
            batches += 1
    return batches


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's output value."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def node_values(gm: fx.GraphModule, inputs: Iterable[Any]) -> dict[str, Any]:
    """The value every node of ``gm`` produces when the graph runs once on ``inputs`` (no grad, in
    the module's current training mode), by node name."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


def tensor_specs(value: Any) -> list[dict[str, Any]]:
    """``[{"shape": [...], "dtype": "float32"}, ...]`` for every tensor in ``value`` (any nesting):
    how manifests and reports describe inputs and outputs."""
    from torch.utils._pytree import tree_flatten

    flat, _ = tree_flatten(value)
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for t in flat if isinstance(t, torch.Tensor)]


class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a layer whose attention-probability dropout follows the
    module's training flag (``dropout_p`` in train mode, none in eval mode), as ``nn.Dropout`` does;
    rewrites that replace hand-written attention with dropout use it (``passes/sdpa.py``)."""

    def __init__(self, dropout_p: float = 0.0, scale: float | None = None, is_causal: bool = False):
        super().__init__()
        self.dropout_p, self.scale, self.is_causal = float(dropout_p), scale, bool(is_causal)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.is_causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}, scale={self.scale}, is_causal={self.is_causal}"
