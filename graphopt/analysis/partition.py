"""Where a graph can be cut into sequential pipeline stages, and the cut that balances them.

The analysis behind the ``partition`` pass (its docstring explains the method): cut points
(:func:`analyze_cuts`: after which compute node a cut is allowed, which tensors cross it and why
a position is refused), per-node costs in the unit balanced (:func:`node_costs`), the choice of
cuts (:func:`choose_cuts`: bisection on the bottleneck, then fewest crossing bytes) and the
predicted pipeline bubble (:func:`predicted_bubble`).
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.analysis.graph import to_networkx
from graphopt.analysis.profile import COMPUTE_OPS, profile_node_times
from graphopt.errors import PassError
from graphopt.ir import example_inputs

__all__ = ["CutPoint", "analyze_cuts", "node_costs", "choose_cuts", "predicted_bubble", "format_cost",
           "modifies_in_place", "param_bytes_by_node", "UNITS", "MEMORY_PARAM_FACTOR"]


UNITS = {"macs": "MACs", "params": "parameters", "memory": "bytes", "time": "seconds"}
MEMORY_PARAM_FACTOR = 4  # weights + gradients + two Adam moments


@dataclass
class CutPoint:
    """A place the graph could be cut: after compute node ``index`` (named ``after``)."""

    index: int
    after: str
    tensors: list[str] = field(default_factory=list)
    bytes: int = 0
    reason: str | None = None  # None: a valid cut point

    @property
    def valid(self) -> bool:
        return self.reason is None


def _is_tensor_meta(tm: Any) -> bool:
    return isinstance(tm, TensorMetadata)


def _state_keys(gm: fx.GraphModule, node: fx.Node) -> set[tuple[str, Any]]:
    """Identities of the state (parameters, buffers) a node touches. A module without state
    (a ReLU called three times in a ResNet block) can be copied into every stage that calls it."""
    keys: set[tuple[str, Any]] = set()
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        keys.update(("tensor", id(t)) for t in list(mod.parameters()) + list(mod.buffers()))
    elif node.op == "get_attr":
        try:
            obj = gm.get_parameter(str(node.target))
        except AttributeError:
            try:
                obj = gm.get_buffer(str(node.target))
            except AttributeError:
                obj = None
        keys.add(("attr", str(node.target)) if obj is None else ("tensor", id(obj)))
    return keys


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def modifies_in_place(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` writes into ``value`` (its first argument) in place.

    A tensor received from another pipeline stage is a leaf that requires grad; autograd
    refuses in-place writes into it, so no cut may send a tensor that is modified in place
    afterwards (torchvision's ``ReLU(inplace=True)`` after a residual add, for example).
    """
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace"))
                or (name.endswith("_") and not name.endswith("__")))
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    return False


def analyze_cuts(gm: fx.GraphModule, g: nx.DiGraph | None = None, max_crossing: int = 2) -> tuple[list[str], list[CutPoint]]:
    """The compute nodes in order and every position between two of them, valid or not."""
    g = to_networkx(gm) if g is None else g
    if not nx.is_directed_acyclic_graph(g):  # pragma: no cover - fx graphs are DAGs
        raise PassError("the graph has a cycle")
    nodes = list(gm.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    compute = [n.name for n in nodes if n.op in COMPUTE_OPS]
    cidx = {name: k for k, name in enumerate(compute)}
    bounds = [pos[c] for c in compute]
    n_cuts = max(len(compute) - 1, 0)
    cuts = [CutPoint(k, compute[k]) for k in range(n_cuts)]

    # liveness: value u crosses cut k iff pos[u] <= bounds[k] < last use of u
    for u, data in g.nodes(data=True):
        if data["op"] in ("get_attr", "output"):
            continue  # attributes are copied into every stage that reads them
        users = list(g.successors(u))
        if not users:
            continue
        last = max(pos[v] for v in users)
        k_lo = bisect.bisect_left(bounds, pos[u])
        k_hi = bisect.bisect_left(bounds, last) - 1
        for k in range(k_lo, min(k_hi, n_cuts - 1) + 1):
            cuts[k].tensors.append(u)
            cuts[k].bytes += int(data["out_bytes"] or 0)

    # shared state: a module or parameter used on both sides of a cut
    spans: dict[tuple[str, Any], list[int]] = {}
    labels: dict[tuple[str, Any], str] = {}
    for node in nodes:
        if node.op == "call_module":
            where = [cidx[node.name]]
        elif node.op == "get_attr":
            where = [cidx[u.name] for u in node.users if u.name in cidx]
        else:
            continue
        for key in _state_keys(gm, node):
            spans.setdefault(key, []).extend(where)
            labels.setdefault(key, str(node.target))
    blocked: dict[int, str] = {}
    for key, where in spans.items():
        if len(where) < 2 or min(where) == max(where):
            continue
        for k in range(min(where), max(where)):
            blocked.setdefault(k, labels[key])

    inplace_after: dict[str, int] = {}  # value -> the last compute index that writes into it in place
    for node in nodes:
        if node.op in COMPUTE_OPS and node.args and isinstance(node.args[0], fx.Node) \
                and modifies_in_place(gm, node, node.args[0]):
            src = node.args[0].name
            inplace_after[src] = max(inplace_after.get(src, -1), cidx[node.name])

    for cut in cuts:
        written = [t for t in cut.tensors if inplace_after.get(t, -1) > cut.index]
        non_tensor = [t for t in cut.tensors if not _is_tensor_meta(g.nodes[t]["node"].meta.get("tensor_meta"))]
        if non_tensor:
            cut.reason = (f"non-tensor value '{non_tensor[0]}' would cross: only tensors can be sent between "
                          "pipeline stages")
        elif len(cut.tensors) > max_crossing:
            cut.reason = f"{len(cut.tensors)} tensors cross here (more than max_crossing={max_crossing})"
        elif not cut.tensors:
            cut.reason = "nothing crosses here (the rest of the graph does not depend on this part)"
        elif written:
            cut.reason = (f"'{written[0]}' is modified in place after this point (e.g. ReLU(inplace=True)): "
                          "a tensor received from another stage cannot be")
        elif cut.index in blocked:
            cut.reason = f"would split the uses of shared module/parameter '{blocked[cut.index]}' across stages"
    return compute, cuts


def param_bytes_by_node(gm: fx.GraphModule, compute: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter count and bytes per compute node; attributes read by get_attr are charged to
    their first compute user."""
    counts = dict.fromkeys(compute, 0)
    nbytes = dict.fromkeys(compute, 0)
    order = {name: k for k, name in enumerate(compute)}
    for node in gm.graph.nodes:
        tensors: list[torch.Tensor] = []
        target = node.name
        if node.op == "call_module":
            tensors = list(gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            users = sorted((u.name for u in node.users if u.name in order), key=order.__getitem__)
            if not users:
                continue
            target = users[0]
            try:
                tensors = [gm.get_parameter(str(node.target))]
            except AttributeError:
                continue
        else:
            continue
        counts[target] += sum(t.numel() for t in tensors)
        nbytes[target] += sum(t.numel() * t.element_size() for t in tensors)
    return counts, nbytes


def node_costs(gm: fx.GraphModule, compute: list[str], by: str, *, device: str = "cpu",
               repeats: int = 5) -> list[float]:
    """The cost of every compute node in the unit of ``by``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if by == "time":
        times = profile_node_times(gm, example_inputs(gm), device=device, repeats=repeats)
        return [times[name]["total"] for name in compute]
    counts, nbytes = param_bytes_by_node(gm, compute)
    out: list[float] = []
    for name in compute:
        cost = nodes[name].meta.get("cost")
        if by == "macs":
            out.append(float(cost.macs if cost else 0))
        elif by == "params":
            out.append(float(counts[name]))
        elif by == "memory":
            out.append(float((cost.out_bytes if cost else 0) + MEMORY_PARAM_FACTOR * nbytes[name]))
        else:  # pragma: no cover - Option choices guard this
            raise PassError(f"unknown cost '{by}'")
    return out


def _greedy(prefix: list[float], cands: list[int], end: int, limit: float) -> list[int] | None:
    """Fewest cuts (from ``cands``) so that every stage costs <= limit; None if impossible."""
    chosen: list[int] = []
    start = -1
    i = 0
    while prefix[end + 1] - prefix[start + 1] > limit:
        best = None
        while i < len(cands) and prefix[cands[i] + 1] - prefix[start + 1] <= limit:
            if cands[i] > start:
                best = cands[i]
            i += 1
        if best is None:
            return None
        chosen.append(best)
        start = best
    return chosen


def choose_cuts(costs: list[float], cuts: list[CutPoint], stages: int, slack: float) -> tuple[list[int], float]:
    """Cut indices for ``stages`` stages and the best achievable bottleneck B*.

    Minimises the most expensive stage (B*), then, among splits within ``(1 + slack) * B*``,
    the activation bytes crossing the cuts (layered-DAG shortest path with networkx).
    """
    valid = [c for c in cuts if c.valid]
    if stages == 1:
        return [], float(sum(costs))
    end = len(costs) - 1
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    total = prefix[-1]
    cands = [c.index for c in valid]

    def feasible(limit: float) -> list[int] | None:
        chosen = _greedy(prefix, cands, end, limit)
        return chosen if chosen is not None and len(chosen) + 1 <= stages else None

    lo, hi = 0.0, total
    for _ in range(200):
        if hi - lo <= max(abs(hi), 1e-30) * 1e-12:
            break
        mid = (lo + hi) / 2
        if feasible(mid) is not None:
            hi = mid
        else:
            lo = mid
    chosen = feasible(hi)
    assert chosen is not None
    bounds = [-1] + chosen + [end]
    best = max(prefix[b + 1] - prefix[a + 1] for a, b in zip(bounds, bounds[1:]))
    limit = best * (1.0 + slack) + 1e-12 * max(total, 1.0)

    by_index = {c.index: c for c in valid}
    points = [-1] + cands + [end]
    dag = nx.DiGraph()
    scale = total if total > 0 else 1.0
    for layer in range(stages):
        for ai, a in enumerate(points[:-1]):
            if (a == -1) != (layer == 0):
                continue
            for b in points[ai + 1:]:
                seg = prefix[b + 1] - prefix[a + 1]
                if seg > limit:
                    break
                last = layer == stages - 1
                if (b == end) != last:
                    continue
                weight = (by_index[b].bytes if b != end else 0) + 0.5 * (seg / scale) ** 2
                dag.add_edge((a, layer), (b, layer + 1), weight=weight)
    try:
        path = nx.shortest_path(dag, (-1, 0), (end, stages), weight="weight")
    except (nx.NetworkXNoPath, nx.NodeNotFound):  # pragma: no cover - the greedy split is in the DAG
        raise PassError("no split found within the bottleneck limit (a bug in the partition pass)") from None
    return [p for p, _ in path[1:-1]], best


def predicted_bubble(stage_costs: list[float], microbatches: int) -> dict[str, float]:
    """Idle fraction of a GPipe/1F1B pipeline step (communication not included).

    With per-stage costs ``t`` for the whole batch, each microbatch costs ``t/M``; one step
    takes ``sum(t)/M + (M-1) * max(t)/M``; the devices are busy ``sum(t)`` out of
    ``S * step``. Balanced stages give the textbook ``(S-1)/(M+S-1)``.
    """
    s, m = len(stage_costs), microbatches
    total = sum(stage_costs)
    step = (total + (m - 1) * max(stage_costs)) / m if stage_costs else 0.0
    predicted = 1.0 - total / (s * step) if step > 0 else 0.0
    return {"microbatches": m, "ideal": (s - 1) / (m + s - 1), "predicted": max(predicted, 0.0),
            "step_cost": step, "speedup_vs_one_device": (total / step) if step > 0 else 1.0}


def format_cost(value: float, by: str) -> str:
    """``value`` in the unit of ``by`` with an SI prefix (``3.2 GMACs``, ``12 ms``)."""
    if by == "time":
        return f"{value * 1000:.3g} ms"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g} {suffix}{UNITS[by]}"
    return f"{value:.0f} {UNITS[by]}"
