"""partition: split the graph into N cost-balanced sequential pipeline stages (EXACT).

The pass does not change the function: it records a stage on every node
(``node.meta["stage"]``) and the plan in ``gm.meta["graphopt"]["partition"]``; the graph still
runs as one module. ``--emit pipeline`` writes one module per stage, and ``graphopt launch``
trains them with ``torch.distributed.pipelining``.

How the cut is chosen (the graph algorithms run on the networkx view, ``graphopt.to_networkx``):

1. **Cut points.** A cut after compute node *k* (in the graph's topological order) sends every
   value defined at or before *k* and used after it to the next stage. A position is a cut
   point only if at most ``max_crossing`` values cross, all of them tensors, and it does not
   separate two uses of one module or parameter (shared/tied weights must live in one stage).
   With ``max_crossing=1`` only block boundaries qualify; with 2 (default) a residual block may
   also be cut, and its skip tensor is carried to the next stage with the branch's tensor.
   Values crossing several cuts are passed through the stages in between.
2. **Bottleneck.** Stage cost = sum of its nodes' cost (``by``: forward MACs, parameters,
   memory = activation bytes + 4x parameter bytes [weights, gradients, two Adam moments], or
   measured forward+backward time on ``device``). The smallest possible cost of the most
   expensive stage, B*, is found by bisection with a greedy feasibility test (optimal for
   contiguous splits of non-negative costs).
3. **Bytes.** Among the splits whose most expensive stage costs at most ``(1 + slack) * B*``,
   the one with the fewest activation bytes crossing its cuts is taken: a shortest path in a
   layered DAG of (cut point, stages used) whose edges are the stages that fit the limit.

Reported (``notes`` and the plan): each stage's cost, nodes, parameters, inputs/outputs; the
balance max/mean; the tensors and bytes crossing each cut; and the predicted pipeline bubble
for ``microbatches`` microbatches: ``(S-1)/(M+S-1)`` for perfectly balanced stages, and the
prediction with these stage costs (step time ``sum(t)/M + (M-1) max(t)/M``), communication
not included.
"""

from __future__ import annotations

import bisect
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from graphopt.analysis.graph import to_networkx
from graphopt.analysis.profile import COMPUTE_OPS, profile_node_times
from graphopt.errors import PassError, PreconditionError
from graphopt.ir import example_inputs, graph_meta
from graphopt.pass_infra import Decline, Option, Pass, PassResult, Rewrite, Semantics

__all__ = ["Partition", "CutPoint", "analyse_cuts", "node_costs", "choose_cuts", "predicted_bubble"]

log = logging.getLogger(__name__)

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


def analyse_cuts(gm: fx.GraphModule, g: nx.DiGraph | None = None, max_crossing: int = 2) -> tuple[list[str], list[CutPoint]]:
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


def _param_bytes_by_node(gm: fx.GraphModule, compute: list[str]) -> tuple[dict[str, int], dict[str, int]]:
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
    counts, nbytes = _param_bytes_by_node(gm, compute)
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


def _fmt(value: float, by: str) -> str:
    if by == "time":
        return f"{value * 1000:.3g} ms"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.3g} {suffix}{UNITS[by]}"
    return f"{value:.0f} {UNITS[by]}"


def _shape(node: fx.Node) -> dict[str, Any]:
    tm = node.meta.get("tensor_meta")
    cost = node.meta.get("cost")
    return {"name": node.name, "shape": list(tm.shape) if hasattr(tm, "shape") else None,
            "dtype": str(tm.dtype).replace("torch.", "") if hasattr(tm, "dtype") else None,
            "bytes": cost.out_bytes if cost else 0}


class Partition(Pass):
    name = "partition"
    semantics = Semantics.EXACT
    training = "same"
    summary = ("split into N cost-balanced sequential pipeline stages (annotates the graph; "
               "emit with --emit pipeline, train with `graphopt launch`)")
    options = {
        "stages": Option(int, 2, "number of sequential pipeline stages", min=1, max=4096),
        "by": Option(str, "macs", "cost to balance: forward MACs, parameters, memory (activation bytes + "
                     "4x parameter bytes) or measured forward+backward time",
                     choices=("macs", "params", "memory", "time")),
        "max_crossing": Option(int, 2, "cut only where at most this many tensors cross (1: between blocks "
                               "only; 2: a residual block may be cut, its skip tensor is carried)", min=1),
        "slack": Option(float, 0.05, "accept a most-expensive stage up to this fraction above the best "
                        "possible if that cuts fewer bytes", min=0.0, max=1.0),
        "microbatches": Option(int, 4, "microbatches for the predicted pipeline bubble (and the launcher's "
                               "default)", min=1),
        "device": Option(str, "cpu", "by=time: device to profile on (cpu, cuda, cuda:N)"),
        "repeats": Option(int, 5, "by=time: timed runs per node (the median is used)", min=1),
    }

    def requires(self, gm: fx.GraphModule) -> None:
        if self.config["by"] == "time":
            dev = self.config["device"]
            try:
                device = torch.device(dev)
            except RuntimeError as exc:
                raise PreconditionError(f"device '{dev}' is not a torch device ({exc})",
                                        fix="use device=cpu or device=cuda") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise PreconditionError("device=cuda but CUDA is not available", fix="use device=cpu")

    def call(self, gm: fx.GraphModule) -> PassResult:
        cfg = self.config
        stages: int = cfg["stages"]
        g = to_networkx(gm)
        compute, cuts = analyse_cuts(gm, g, cfg["max_crossing"])
        if not compute:
            raise PreconditionError("the graph has no compute nodes to partition")
        valid = [c for c in cuts if c.valid]
        if stages - 1 > len(valid):
            raise PreconditionError(
                f"{stages} stages need {stages - 1} cut points, but the graph has only {len(valid)} places "
                f"where at most {cfg['max_crossing']} tensor(s) cross ({len(compute)} compute nodes)",
                fix=f"use stages<={len(valid) + 1}" + (", or raise max_crossing" if len(valid) < len(cuts) else ""))
        costs = node_costs(gm, compute, cfg["by"], device=cfg["device"], repeats=cfg["repeats"])
        if sum(costs) <= 0 and stages > 1:
            raise PreconditionError(f"the graph has no {cfg['by']} cost to balance (all nodes cost 0)",
                                    fix="use by=memory or by=time")
        chosen, best = choose_cuts(costs, cuts, stages, cfg["slack"])

        # stage of every node
        stage_of_compute: list[int] = []
        s = 0
        chosen_set = set(chosen)
        for k in range(len(compute)):
            stage_of_compute.append(s)
            if k in chosen_set:
                s += 1
        cstage = dict(zip(compute, stage_of_compute))
        assignment: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op in COMPUTE_OPS:
                assignment[node.name] = cstage[node.name]
            elif node.op == "placeholder":
                assignment[node.name] = 0
            elif node.op == "get_attr":
                users = [cstage[u.name] for u in node.users if u.name in cstage]
                assignment[node.name] = min(users) if users else 0
            else:
                assignment[node.name] = stages - 1

        nodes = {n.name: n for n in gm.graph.nodes}
        by_index = {c.index: c for c in cuts}
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        ordered = {name: i for i, name in enumerate(nodes)}
        stage_inputs = [placeholders] + [sorted(by_index[k].tensors, key=ordered.__getitem__) for k in chosen]
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        final_outputs = [a.name for a in out_node.all_input_nodes]
        stage_outputs = stage_inputs[1:] + [final_outputs]

        counts, nbytes = _param_bytes_by_node(gm, compute)
        stage_costs = [0.0] * stages
        detail: list[dict[str, Any]] = []
        for i in range(stages):
            names = [c for c in compute if cstage[c] == i]
            macs = sum((nodes[c].meta["cost"].macs if nodes[c].meta.get("cost") else 0) for c in names)
            act = sum((nodes[c].meta["cost"].out_bytes if nodes[c].meta.get("cost") else 0) for c in names)
            stage_costs[i] = float(sum(costs[k] for k, c in enumerate(compute) if cstage[c] == i))
            detail.append({
                "index": i, "cost": stage_costs[i], "nodes": len(names), "first": names[0], "last": names[-1],
                "macs": macs, "params": sum(counts[c] for c in names), "param_bytes": sum(nbytes[c] for c in names),
                "activation_bytes": act, "inputs": stage_inputs[i], "outputs": stage_outputs[i],
            })
        mean = sum(stage_costs) / stages
        balance = max(stage_costs) / mean if mean > 0 else 1.0
        cut_report = [{"after": by_index[k].after, "index": k, "bytes": by_index[k].bytes,
                       "tensors": [_shape(nodes[t]) for t in sorted(by_index[k].tensors, key=ordered.__getitem__)]}
                      for k in chosen]
        plan: dict[str, Any] = {
            "stages": stages, "by": cfg["by"], "unit": UNITS[cfg["by"]], "max_crossing": cfg["max_crossing"],
            "slack": cfg["slack"], "device": cfg["device"] if cfg["by"] == "time" else None,
            "stage_costs": stage_costs, "balance": balance, "best_bottleneck": best,
            "total_cost": float(sum(costs)), "cuts": cut_report,
            "cut_bytes_total": sum(c["bytes"] for c in cut_report),
            "bubble": predicted_bubble(stage_costs, cfg["microbatches"]),
            "stage_detail": detail,
            "cut_points": {"positions": len(cuts), "valid": len(valid)},
            "assignment": assignment,
        }

        previous = graph_meta(gm).get("partition")
        unchanged = (previous is not None and previous.get("assignment") == assignment
                     and all(n.meta.get("stage") == assignment[n.name] for n in gm.graph.nodes))
        for node in gm.graph.nodes:
            node.meta["stage"] = assignment[node.name]
        graph_meta(gm)["partition"] = plan

        rewrites: list[Rewrite] = []
        total = plan["total_cost"] or 1.0
        for i, d in enumerate(detail):
            rewrites.append(Rewrite(f"stage {i}", f"{d['first']} .. {d['last']} ({d['nodes']} nodes): "
                                    f"{_fmt(d['cost'], cfg['by'])} ({d['cost'] / total * 100:.1f}%), "
                                    f"{d['params']} params", data={"cost": d["cost"]}))
            if i < len(cut_report):
                c = cut_report[i]
                rewrites.append(Rewrite(f"cut after {c['after']}",
                                        f"stage {i} | {i + 1}: {len(c['tensors'])} tensor(s), {c['bytes']} bytes "
                                        f"cross ({', '.join(t['name'] for t in c['tensors'])})",
                                        data={"tensors": [t["name"] for t in c["tensors"]], "bytes": c["bytes"]}))
        b = plan["bubble"]
        rewrites.append(Rewrite("plan", f"balance max/mean {balance:.3f}; {plan['cut_bytes_total']} bytes cross; "
                                f"predicted bubble {b['predicted'] * 100:.1f}% at {b['microbatches']} microbatches "
                                f"(balanced {b['ideal'] * 100:.1f}%)"))
        declined = [Decline(f"cut after {c.after}", c.reason if c.reason else
                            f"valid cut ({len(c.tensors)} tensor(s), {c.bytes} bytes), not needed for the best split")
                    for c in cuts if c.index not in chosen_set]
        notes = {k: v for k, v in plan.items() if k != "assignment"}
        log.info("partition: %d stages by %s, balance %.3f, %d bytes cross", stages, cfg["by"], balance,
                 plan["cut_bytes_total"])
        return PassResult(gm, modified=not unchanged, rewrites=rewrites, declined=declined, notes=notes)

    def ensures(self, gm: fx.GraphModule) -> None:
        plan = graph_meta(gm)["partition"]
        last = 0
        for node in gm.graph.nodes:
            s = node.meta.get("stage")
            assert s is not None and 0 <= s < plan["stages"], f"node {node.name} has no valid stage"
            if node.op in COMPUTE_OPS:
                assert s >= last, f"stage assignment is not sequential at {node.name}"
                last = s
