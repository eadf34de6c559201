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

from collections import Counter

import logging
from typing import Any

import torch
from torch import fx

from graphopt import Decline, Option, Pass, PassResult, PreconditionError, Rewrite, Semantics
from graphopt.analysis import to_networkx
from graphopt.analysis.partition import (UNITS, analyze_cuts, choose_cuts, format_cost, node_costs,
                                         param_bytes_by_node, predicted_bubble)
from graphopt.analysis.profile import COMPUTE_OPS
from graphopt.ir import graph_meta

__all__ = ["Partition"]

log = logging.getLogger(__name__)


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
        compute, cuts = analyze_cuts(gm, g, cfg["max_crossing"])
        if not compute:
            raise PreconditionError("the graph has no compute nodes to partition")
        valid = [c for c in cuts if c.valid]
        if stages - 1 > len(valid):
            # why the cuts that are narrow enough are not valid either (e.g. a tied embedding/output weight)
            narrow = Counter(c.reason for c in cuts if not c.valid and len(c.tensors) <= cfg["max_crossing"]
                             and c.tensors)
            why = (f"; {narrow.most_common(1)[0][1]} narrower cut(s) are not valid: {narrow.most_common(1)[0][0]}"
                   if narrow else "")
            raise PreconditionError(
                f"{stages} stages need {stages - 1} cut points, but the graph has only {len(valid)} places "
                f"where at most {cfg['max_crossing']} tensor(s) cross ({len(compute)} compute nodes){why}",
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

        counts, nbytes = param_bytes_by_node(gm, compute)
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
                                    f"{format_cost(d['cost'], cfg['by'])} ({d['cost'] / total * 100:.1f}%), "
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
