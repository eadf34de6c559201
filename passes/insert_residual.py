"""insert_residual: add skip connections around shape-preserving blocks that have none.

Blocks are found on the graph's linear chains (ops with one tensor input whose producer has no
other user; chains end at merges and branches). On each chain, from each parametrised layer
(Conv/Linear) on, the shortest run of ``min_layers`` .. ``max_layers`` layers (plus trailing
normalisations: conv-bn-relu-conv-**bn**) whose output has the input's shape (``tensor_meta``)
is a block; blocks do not overlap. A block whose input already reaches the block output's
consumer by another path (an existing skip or a parallel branch; checked on the
``graphopt.to_networkx`` view) is declined, so ResNet/MobileNet residual blocks are left alone.

Combination (``gate``), with ``a`` a learnable scalar (``nn.Parameter`` at ``residual.<block>_gate``,
read by ``get_attr`` and applied with ``torch.mul`` / ``operator.add``, so emitted code is plain):

- ``preserve`` (default): ``y = f(x) + a*x``, ``a = 0``: the function is unchanged at init
  (PRESERVING_AT_INIT, verified); training grows the skip from ``a``'s gradient ``<dL/dy, x>``.
- ``rezero``: ``y = x + a*f(x)``, ``a = 0``: at init every block is the identity (for training
  from scratch, Bachlechner et al. 2020).
- ``none``: ``y = f(x) + x``.

``rezero`` and ``none`` change the function by design: the pass is then APPROXIMATE with
``budget`` (the relative L2 change of the outputs; default unbounded: measured and reported, the
rule for passes whose purpose is to change the function and whose recovery is training), and the
rewrite must equal, exactly, a reference that runs the original graph through an
``fx.Interpreter`` applying the same combination at each block output.

``projection=true`` also covers blocks whose channels and/or resolution change (4-D NCHW, the
output size ``ceil(H / s)`` for an integer stride ``s``): the skip is ``AvgPool2d(s, ceil_mode)``
(when ``s > 1``) then a 1x1 conv, zero-initialised, and the combination is ``y = f(x) + P(x)``
(a scalar gate on top of a zero projection would leave both without gradient); with
``gate=rezero`` it is ``y = P(x) + a*f(x)`` with a default-initialised ``P``.

Declined, with the reason: blocks with an existing skip/branch, runs with no shape-preserving
block (shape given; try ``projection=true``), projections that are not 4-D or not an integer
downsampling, chains with fewer than ``min_layers`` layers, excluded layers.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassConfigError, PassResult, Rewrite, Semantics
from graphopt.analysis import to_networkx
from graphopt.ir import copy_graph, glob_decline, is_module, module_of, output_shape, unique_attr_name

__all__ = ["InsertResidual", "find_chains"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCTIONS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm}
CONTAINER = "residual"


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op != "get_attr" and output_shape(node) is not None


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _is_tensor(a)]


def find_chains(gm: fx.GraphModule) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Maximal linear chains as (input node, [nodes]): each node has one tensor input, and each
    node but the last has exactly one user (the next)."""
    chains: list[tuple[fx.Node, list[fx.Node]]] = []
    where: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or not _is_tensor(node):
            continue
        ins = _tensor_inputs(node)
        if len(ins) != 1:
            continue
        prev = ins[0]
        if prev in where and len(prev.users) == 1:
            idx = where[prev]
            chains[idx][1].append(node)
        else:
            chains.append((prev, [node]))
            idx = len(chains) - 1
        where[node] = idx
    return chains


class _Combine(fx.Interpreter):
    """Runs the original graph, replacing each block output ``f`` by ``combine(f, x)``."""

    def __init__(self, gm: fx.GraphModule, blocks: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]):
        super().__init__(gm, garbage_collect_values=False)
        self.blocks = blocks
        self.by_name = {n.name: n for n in gm.graph.nodes}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.blocks:
            x_name, combine = self.blocks[n.name]
            out = combine(out, self.env[self.by_name[x_name]])
        return out


class _Reference(nn.Module):
    """The original graph with each block's output combined as specified (independent of the rewrite)."""

    def __init__(self, original: fx.GraphModule, blocks: dict[str, tuple[str, Callable]], skips: nn.ModuleDict):
        super().__init__()
        self.original = original
        self.skips = skips
        self._blocks = blocks

    def forward(self, *args: Any) -> Any:
        return _Combine(self.original, self._blocks).run(*args)


def _stride_for(hin: int, win: int, hout: int, wout: int) -> int | None:
    for s in range(1, max(hin, win) + 1):
        if math.ceil(hin / s) == hout and math.ceil(win / s) == wout:
            return s
    return None


class InsertResidual(Pass):
    name = "insert_residual"
    training = "same"
    semantics = Semantics.PRESERVING_AT_INIT  # gate=preserve; rezero/none are APPROXIMATE (see __init__)
    summary = "add skip connections around shape-preserving blocks without one (zero-init gate: same function)"
    options = {
        "gate": Option(str, "preserve", "y = f(x) + a*x (a=0) | y = x + a*f(x) (a=0) | y = f(x) + x",
                       choices=("preserve", "rezero", "none")),
        "projection": Option(bool, False, "also blocks whose channels/stride change, with a zero-init 1x1 conv skip"),
        "min_layers": Option(int, 2, "fewest conv/linear layers in a block", min=1),
        "max_layers": Option(int, 3, "most conv/linear layers in a block", min=1),
        "include": Option(list, [], "globs on a block's first layer path (empty: all)"),
        "exclude": Option(list, [], "globs on a block's first layer path to skip"),
        "budget": Option(float, float("inf"), "gate=rezero|none: relative L2 output change allowed (default: "
                                              "measured and reported; they change the function by design)", min=0.0),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.config["max_layers"] < self.config["min_layers"]:
            raise PassConfigError(f"max_layers={self.config['max_layers']} is below min_layers="
                                  f"{self.config['min_layers']}", where=f"pass '{self.name}'",
                                  fix="give max_layers >= min_layers")
        if self.config["gate"] != "preserve":
            self.semantics = Semantics.APPROXIMATE  # type: ignore[misc]

    # ------------------------------------------------------------------ detection

    @staticmethod
    def _layer(gm: fx.GraphModule, node: fx.Node) -> bool:
        return is_module(gm, node, _LAYERS)

    @staticmethod
    def _norm(gm: fx.GraphModule, node: fx.Node) -> bool:
        if node.op == "call_module":
            return is_module(gm, node, _NORMS)
        return node.op == "call_function" and node.target in _NORM_FUNCTIONS

    def _blocks(self, gm: fx.GraphModule) -> tuple[list[dict[str, Any]], list[Decline]]:
        lo, hi = self.config["min_layers"], self.config["max_layers"]
        blocks: list[dict[str, Any]] = []
        declined: list[Decline] = []
        graph = to_networkx(gm)
        for chain_input, chain in find_chains(gm):
            pos = [i for i, n in enumerate(chain) if self._layer(gm, n)]
            bypass: list[set[str]] = []  # computed once per chain, on first use
            j = 0
            while j < len(pos):
                start = pos[j]
                first = str(chain[start].target)
                x = chain[start - 1] if start > 0 else chain_input
                if len(pos) - j < lo:
                    declined.append(Decline(first, f"only {len(pos) - j} conv/linear layer(s) left on this chain "
                                                   f"before a merge or branch; min_layers={lo}"))
                    break

                def end_of(k: int) -> int:
                    e = pos[j + k - 1]
                    while e + 1 < len(chain) and self._norm(gm, chain[e + 1]):
                        e += 1
                    return e

                found = None
                for k in range(lo, min(hi, len(pos) - j) + 1):
                    e = end_of(k)
                    if output_shape(chain[e]) == output_shape(x):
                        found = (k, e, False)
                        break
                if found is None and self.config["projection"]:
                    e = end_of(lo)
                    why = self._projection_problem(x, chain[e])
                    if why is None:
                        found = (lo, e, True)
                    else:
                        declined.append(Decline(first, f"no shape-preserving block of {lo}-{hi} layers from here "
                                                       f"and no projection: {why}"))
                        j += 1
                        continue
                if found is None:
                    e = end_of(lo)
                    declined.append(Decline(first, (
                        f"no shape-preserving block of {lo}-{hi} layers from here: {tuple(output_shape(x) or ())} -> "
                        f"{tuple(output_shape(chain[e]) or ())} after {lo} (projection=true adds a 1x1 conv skip)")))
                    j += 1
                    continue
                k, e, proj = found
                nodes = chain[start:e + 1]
                layers = [str(n.target) for n in nodes if self._layer(gm, n)]
                j += k
                excluded = glob_decline(first, self.config["include"], self.config["exclude"])
                if excluded is not None:
                    declined.append(excluded)
                    continue
                joined = self._joined(graph, chain_input, chain, nodes[-1], bypass)
                if joined:
                    declined.append(Decline(first, f"already inside a skip or branch: the chain's input "
                                                   f"{chain_input.name} reaches {joined} without passing through it"))
                    continue
                blocks.append({"x": x, "end": nodes[-1], "nodes": nodes, "layers": layers, "first": first,
                               "projection": proj})
        return blocks, declined

    @staticmethod
    def _joined(graph: nx.DiGraph, chain_input: fx.Node, chain: list[fx.Node], end: fx.Node,
                bypass: list[set[str]]) -> str | None:
        """A node after ``end`` that the chain's input also reaches by a path avoiding the chain
        (an existing skip around, or a branch beside, the block), else None. The graph output,
        where every path meets, does not count."""
        if not bypass:
            names = {n.name for n in chain}
            rest = graph.subgraph([v for v in graph.nodes if v not in names])
            reach = nx.descendants(rest, chain_input.name) if chain_input.name in rest else set()
            bypass.append({v for v in reach if graph.nodes[v]["op"] != "output"})
        if not bypass[0]:
            return None
        after = nx.descendants(graph, end.name)
        common = bypass[0] & after
        if not common:
            return None
        order = {name: i for i, name in enumerate(graph.nodes)}
        return min(common, key=order.__getitem__)

    @staticmethod
    def _projection_problem(x: fx.Node, end: fx.Node) -> str | None:
        a, b = output_shape(x), output_shape(end)
        if a is None or b is None or len(a) != 4 or len(b) != 4:
            return f"projection needs 4-D NCHW tensors, got {a} -> {b}"
        if a[0] != b[0]:
            return f"batch size changes ({a} -> {b})"
        if _stride_for(a[2], a[3], b[2], b[3]) is None:
            return f"{a[2]}x{a[3]} -> {b[2]}x{b[3]} is not an integer downsampling"
        return None

    # ------------------------------------------------------------------ rewrite

    def call(self, gm: fx.GraphModule) -> PassResult:
        blocks, declined = self._blocks(gm)
        if not blocks:
            return PassResult(gm, False, [], declined)
        gate = self.config["gate"]
        original = copy_graph(gm) if gate != "preserve" else None
        root = CONTAINER
        existing = getattr(gm, root, None)
        called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        if existing is not None and (type(existing) is not nn.Module or root in called):
            root = unique_attr_name(gm, CONTAINER)  # the model has its own `residual`
        if not hasattr(gm, root):
            gm.add_submodule(root, nn.Module())
        container = gm.get_submodule(root)
        ref_blocks: dict[str, tuple[str, Callable]] = {}
        ref_skips = nn.ModuleDict()
        rewrites: list[Rewrite] = []
        graph = gm.graph
        for b in blocks:
            x, end = b["x"], b["end"]
            base = b["first"].replace(".", "_")
            shape_in, shape_out = output_shape(x), output_shape(end)
            ref = end.meta.get("tensor_meta")
            dtype = ref.dtype if ref is not None else torch.float32
            new_nodes: list[fx.Node] = []
            with graph.inserting_after(end):
                anchor = end
                skip = x
                proj_desc = ""
                skip_mods: list[nn.Module] = []
                if b["projection"]:
                    s = _stride_for(shape_in[2], shape_in[3], shape_out[2], shape_out[3])
                    assert s is not None
                    conv = nn.Conv2d(shape_in[1], shape_out[1], 1, bias=False).to(dtype)
                    if gate != "rezero":
                        nn.init.zeros_(conv.weight)
                    pool = nn.AvgPool2d(s, s, ceil_mode=True, count_include_pad=False) if s > 1 else None
                    for suffix, mod in (("pool", pool), ("proj", conv)):
                        if mod is None:
                            continue
                        mname = _fresh(container, f"{base}_{suffix}")
                        container.add_module(mname, mod)
                        skip_mods.append(mod)
                        with graph.inserting_after(anchor):
                            skip = graph.call_module(f"{root}.{mname}", (skip,))
                        new_nodes.append(skip)
                        anchor = skip
                    proj_desc = (f"AvgPool2d({s}) + " if s > 1 else "") + (
                        "default-init" if gate == "rezero" else "zero-init") + f" 1x1 conv {shape_in[1]}->{shape_out[1]}"
                gate_name = None
                if (gate == "preserve" and not b["projection"]) or gate == "rezero":
                    # preserve gates the skip (y = f(x) + a*x), rezero the block (y = x + a*f(x)); a = 0
                    gated, other = (skip, end) if gate == "preserve" else (end, skip)
                    gate_name = _fresh_param(container, f"{base}_gate", dtype)
                    with graph.inserting_after(anchor):
                        g = graph.get_attr(f"{root}.{gate_name}")
                    with graph.inserting_after(g):
                        m = graph.call_function(torch.mul, (g, gated))
                    with graph.inserting_after(m):
                        y = graph.call_function(operator.add, (other, m))
                    new_nodes += [g, m, y]
                    if gate == "preserve":
                        formula = "y = f(x) + a*x, a = 0"
                    else:
                        formula = "y = P(x) + a*f(x), a = 0" if b["projection"] else "y = x + a*f(x), a = 0"
                else:
                    with graph.inserting_after(anchor):
                        y = graph.call_function(operator.add, (end, skip))
                    new_nodes.append(y)
                    formula = "y = f(x) + P(x)" if b["projection"] else "y = f(x) + x"
            keep = set(new_nodes)
            end.replace_all_uses_with(y, delete_user_cb=lambda u: u not in keep)
            for n in new_nodes:
                if n.op != "get_attr":
                    n.meta["tensor_meta"] = end.meta.get("tensor_meta")
            if original is not None:
                ref_blocks[end.name] = (x.name, self._ref_combine(gate, b["projection"], skip_mods, ref_skips, base))
            kinds = [type(module_of(gm, n)).__name__ if n.op == "call_module" else
                     getattr(n.target, "__name__", str(n.target)) for n in b["nodes"]]
            last = end.target if end.op == "call_module" else end.name
            rewrites.append(Rewrite(b["first"], (
                f"skip around {b['first']} .. {last} ({', '.join(kinds)}): {formula}"
                + (f", skip = {proj_desc}" if proj_desc else "")), {
                "layers": b["layers"], "input": x.name, "output": end.name, "shape_in": list(shape_in),
                "shape_out": list(shape_out), "gate": f"{root}.{gate_name}" if gate_name else None,
                "projection": b["projection"]}))
        gm.recompile()
        reference = None
        if original is not None:
            reference = _Reference(original, ref_blocks, ref_skips)
        notes = {"blocks": len(rewrites), "projections": sum(1 for b in blocks if b["projection"]),
                 "gate": gate, "declined": len(declined)}
        return PassResult(gm, True, rewrites, declined, notes=notes, reference=reference)

    @staticmethod
    def _ref_combine(gate: str, projection: bool, skip_mods: list[nn.Module], store: nn.ModuleDict,
                     base: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        import copy

        mods = [copy.deepcopy(m) for m in skip_mods]
        for i, m in enumerate(mods):
            store[f"{base}_{i}"] = m

        def proj(x: torch.Tensor) -> torch.Tensor:
            for m in mods:
                x = m(x)
            return x

        if gate == "rezero":  # a = 0 at init: the block's output is its (projected) input
            return lambda f, x: proj(x) if projection else x
        return lambda f, x: f + (proj(x) if projection else x)  # gate=none


def _fresh(container: nn.Module, base: str) -> str:
    names = {n for n, _ in container.named_children()} | {n for n, _ in container.named_parameters(recurse=False)}
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def _fresh_param(container: nn.Module, base: str, dtype: torch.dtype) -> str:
    name = _fresh(container, base)
    container.register_parameter(name, nn.Parameter(torch.zeros((), dtype=dtype)))
    return name
