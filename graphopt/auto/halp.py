"""Pruning to a measured time target, allocated by measured latency (after HALP, NeurIPS 2022).

HALP removes the channels that save the most *measured* latency per unit of importance, with a
per-layer latency lookup table measured on the target device, instead of ranking by MACs. Here:

1. **Latency table.** Every Conv2d/Linear layer is timed on the device alone (forward + backward,
   its real input shape) at a grid of widths for each channel group it reads or writes (about 12
   widths per group, the other dimension at its current width). Results are cached on disk
   (``cache_dir/latency-<device>.json``, keyed by layer shape), so later runs measure nothing twice.
2. **Allocation.** Starting from full widths, a greedy knapsack repeatedly shrinks the group whose
   next grid width saves the most measured milliseconds per unit of importance lost (L1 norms of the
   removed channels, normalised by the group mean; any smaller grid width may be chosen) until
   the layers' measured latency drops by the share the target needs (``1 - F`` at first).
3. **Fastest widths.** Each group's width is then raised to the largest grid width that measures no
   slower (latency tables are not monotonic: some widths hit faster kernels), keeping more channels
   for free.
4. **Measured iteration.** The pruned graph (with the kept exact rewrites on top, verified) is
   measured against the original training step; while the target is not met, the measured
   shortfall (ratio - F) is added to the share to remove and the allocation repeats (at most ``iterations`` times).
   ``max_error`` bounds the relative L2 output error vs the original (eval mode): an allocation that
   exceeds it is not taken.

Approximation (stated): a layer's latency is measured varying one width at a time, the other at
its current width; groups with shape constraints (attention heads, splits) are left unpruned.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from torch import fx, nn

from graphopt.auto.search import CandidateRecord

__all__ = ["LatencyTable", "prune_to_time", "width_grid"]

log = logging.getLogger(__name__)


def width_grid(size: int, min_keep: int, points: int = 12) -> list[int]:
    """Candidate widths of a group: multiples of 8 (of 1 under 16 channels), about ``points`` of them."""
    step = 8 if size >= 16 else 1
    step = max(step, int(math.ceil(size / points / step)) * step)
    widths = {size}
    w = (size // step) * step
    while w >= max(min_keep, 1):
        widths.add(w)
        w -= step
    return sorted(widths)


class LatencyTable:
    """Measured forward+backward seconds of single layers, cached on disk."""

    def __init__(self, device: torch.device, cache_dir: str | os.PathLike | None = None, reps: int = 3,
                 timer: Callable[[str, dict[str, Any]], float] | None = None) -> None:
        self.device = device
        self.reps = reps
        self.timer = timer
        self.path = Path(cache_dir) / f"latency-{device.type}.json" if cache_dir else None
        self.data: dict[str, float] = {}
        self.measured = 0
        if self.path and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.data = {}

    def save(self) -> None:
        if self.path:
            from graphopt.serialize import write_json

            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, self.data)

    def latency(self, kind: str, shape: dict[str, Any]) -> float:
        key = kind + ":" + ",".join(f"{k}={shape[k]}" for k in sorted(shape))
        if key in self.data:
            return self.data[key]
        self.measured += 1
        t = self.timer(kind, shape) if self.timer else self._measure(kind, shape)
        self.data[key] = t
        return t

    def _measure(self, kind: str, s: dict[str, Any]) -> float:
        from graphopt.bench.measure import StepTimer

        dev = self.device
        if kind == "conv":
            layer: nn.Module = nn.Conv2d(s["cin"], s["cout"], s["k"], s["stride"], s["pad"], s["dil"],
                                         groups=s["groups"], bias=s["bias"])
            x = torch.randn(s["n"], s["cin"], s["h"], s["w"])
        else:
            layer = nn.Linear(s["cin"], s["cout"], bias=s["bias"])
            x = torch.randn(*s["lead"], s["cin"])
        layer, x = layer.to(dev), x.to(dev).requires_grad_(True)
        timer = StepTimer(dev)
        for i in range(self.reps + 1):
            if i == 0:
                layer(x).sum().backward()
                continue
            with timer.time():
                layer(x).sum().backward()
        return float(np.median(timer.samples()))


def _layers(gm: fx.GraphModule) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Conv2d/Linear call_module nodes: name -> (module, input shape)."""
    from graphopt.ir import output_shape

    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and n.args and isinstance(n.args[0], fx.Node):
            shape = output_shape(n.args[0])
            if shape is not None:
                out[n.name] = (mod, tuple(int(v) for v in shape))
    return out


def _shape(mod: nn.Module, in_shape: tuple[int, ...], cin: int, cout: int) -> tuple[str, dict[str, Any]]:
    if isinstance(mod, nn.Conv2d):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        groups = cin if depthwise else mod.groups
        return "conv", {"n": in_shape[0], "cin": cin, "cout": cout, "h": in_shape[2], "w": in_shape[3],
                        "k": list(mod.kernel_size), "stride": list(mod.stride), "pad": list(mod.padding)
                        if not isinstance(mod.padding, str) else mod.padding, "dil": list(mod.dilation),
                        "groups": groups, "bias": mod.bias is not None}
    return "linear", {"lead": list(in_shape[:-1]), "cin": cin, "cout": cout, "bias": mod.bias is not None}


def _rel_error(a: nn.Module, b: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    from graphopt.ir import eval_mode

    with torch.no_grad(), eval_mode(a), eval_mode(b):
        ya, yb = a(*inputs).float(), b(*inputs).float()
    return float((ya - yb).norm() / ya.norm().clamp_min(1e-12))


def prune_to_time(search: Any, pipeline: list[tuple[str, dict[str, Any]]], best: fx.GraphModule,
                  target_time: float, *, max_error: float | None = None, cache_dir: str | None = None,
                  iterations: int = 4, latency: LatencyTable | None = None
                  ) -> tuple[fx.GraphModule, Any, list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Prune the search's original graph until its measured step is at most ``target_time`` x the
    original's (see the module docstring); the kept exact ``pipeline`` is applied on top."""
    from graphopt.analysis.channels import analyze_channels
    from graphopt.analysis.cost import annotate
    from graphopt.manager import PassManager
    from graphopt.pass_infra import create_pass
    from graphopt.prune import apply_pruning, channel_scores
    from graphopt.prune.structured import copy_graph_module

    original: fx.GraphModule = search.original
    inputs = search.inputs
    m = search.m
    table = latency or LatencyTable(m.device, cache_dir, timer=getattr(m, "latency_timer", None))
    cg = analyze_channels(original)
    scores, _ = channel_scores(original, cg, "l1")
    groups = []
    declined: dict[str, str] = {}
    for g in cg.groups:
        if not g.prunable:
            declined[g.name] = "not prunable: " + "; ".join(g.blocked[:2])
        elif g.constraints:
            declined[g.name] = "has shape constraints (heads, splits): left to the prune pass"
        elif g.size <= 1:
            declined[g.name] = "a single channel"
        else:
            groups.append(g)
    layers = _layers(original)
    by_class = {int(c): g.id for g in groups for c in g.classes}
    affects: dict[int, list[tuple[str, str]]] = {g.id: [] for g in groups}  # group -> (layer, "in"|"out")
    for e in cg.macs:
        if e.node not in layers:
            continue
        for side, atoms in (("in", e.in_atoms), ("out", e.out_atoms)):
            if atoms is None or not len(atoms):
                continue
            gid = by_class.get(int(cg.root[atoms[0]]))
            if gid is not None and (e.node, side) not in affects[gid]:
                affects[gid].append((e.node, side))
    norm = {}
    for g in groups:
        sc = np.asarray(scores[g.id], dtype=float)
        mean = sc.mean() if len(sc) else 1.0
        norm[g.id] = np.sort(sc / mean if mean > 0 else sc)
    min_keep = {g.id: max(1, int(math.ceil(g.size * 0.1))) for g in groups}
    grids = {g.id: width_grid(g.size, min_keep[g.id]) for g in groups}

    def dims(node: str) -> tuple[int, int]:
        mod = layers[node][0]
        return (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features, mod.out_features)

    def group_latency(gid: int, w: int) -> float:
        total = 0.0
        for node, side in affects[gid]:
            mod, shape = layers[node]
            cin, cout = dims(node)
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            if depthwise:
                cin = cout = w
            elif side == "in":
                cin = w
            else:
                cout = w
            if isinstance(mod, nn.Conv2d) and not depthwise and mod.groups > 1 and (cin % mod.groups or cout % mod.groups):
                return float("inf")
            shp = list(shape)
            if isinstance(mod, nn.Conv2d):
                shp[1] = cin
            kind, s = _shape(mod, tuple(shp), cin, cout)
            total += table.latency(kind, s)
        return total

    def allocate(need_frac: float) -> dict[int, int]:
        """Greedy: shrink the group whose best smaller grid width saves the most measured seconds per
        unit of importance, until the layers' measured latency drops by ``need_frac`` of their total."""
        width = {g.id: g.size for g in groups}
        lat = {g.id: group_latency(g.id, g.size) for g in groups}
        total = sum(lat.values())
        need = need_frac * total
        saved = 0.0
        while saved < need:
            best_gid, best_val, best_w, best_dl = None, -1.0, 0, 0.0
            for g in groups:
                for w2 in (w for w in grids[g.id] if w < width[g.id]):
                    dl = lat[g.id] - group_latency(g.id, w2)
                    if dl <= 0 or not math.isfinite(dl):
                        continue  # measures no faster (tables are not monotonic)
                    imp = float(norm[g.id][g.size - width[g.id]: g.size - w2].sum()) + 1e-6
                    if dl / imp > best_val:
                        best_gid, best_val, best_w, best_dl = g.id, dl / imp, w2, dl
            if best_gid is None:
                break
            width[best_gid] = best_w
            lat[best_gid] -= best_dl
            saved += best_dl
        for g in groups:  # fastest widths: keep more channels where that measures no slower
            cur = group_latency(g.id, width[g.id])
            width[g.id] = max(w for w in grids[g.id] if w >= width[g.id] and group_latency(g.id, w) <= cur)
        table.save()
        return width

    def build(width: dict[int, int]) -> tuple[fx.GraphModule, Any, float]:
        nonlocal last_removed
        removed = np.zeros(len(cg.root), dtype=bool)
        for g in groups:
            k = g.size - width[g.id]
            if k > 0:
                order = np.argsort(np.asarray(scores[g.id]), kind="stable")[:k]
                removed[g.classes[order]] = True
        pruned = copy_graph_module(original)
        apply_pruning(pruned, cg, removed)
        last_removed = removed
        pruned.recompile()
        with torch.no_grad():
            pruned.eval()
            pruned(*inputs)
            pruned.train()
        pruned.meta.setdefault("graphopt", {})["cost"] = annotate(pruned, inputs)
        err = _rel_error(original, pruned, inputs)
        gm, rep = pruned, None
        if pipeline:
            passes = [create_pass(n, o) for n, o in pipeline]
            gm, rep = PassManager(passes, verify=True).run(pruned, inputs)
        return gm, rep, err

    last_removed: Any = None
    need = 1.0 - target_time  # share of the layers' measured latency to remove
    history: list[dict[str, Any]] = []
    chosen: tuple[fx.GraphModule, Any, dict[int, int], float] | None = None
    for it in range(iterations):
        if search.out_of_time():
            search.report.not_tried.append(f"pruning iteration {it + 1} (time budget)")
            break
        width = allocate(need)
        try:
            gm, rep, err = build(width)
        except Exception as exc:  # slicing that breaks the graph: stop with what we have
            history.append({"iteration": it + 1, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            break
        if max_error is not None and err > max_error:
            history.append({"iteration": it + 1, "output_error": err,
                            "stopped": f"output error {err:.4f} above --max-error {max_error}"})
            break
        cmp = m.compare(gm, original)
        kept_ch = int(sum(width.values()))
        history.append({"iteration": it + 1, "layer_latency_share_removed": need, "measured_ms": cmp.candidate_ms,
                        "original_ms": cmp.baseline_ms, "ratio": cmp.ratio, "output_error": err,
                        "channels_kept": kept_ch})
        search.record(CandidateRecord("prune", {"target_time": target_time, "iteration": it + 1,
                                                "channels_kept": kept_ch}, measured_ms=cmp.candidate_ms,
                                      baseline_ms=cmp.baseline_ms, margin=cmp.margin, kept=True,
                                      reason=f"measured {cmp.ratio:.3f}x of the original step (target {target_time})"))
        if chosen is not None:
            m.release(chosen[0])
        chosen = (gm, rep, width, err)
        # what reconstruction needs to map kept channels (graphopt.recover.reconstruct_structured)
        search.report.prune_plan = SimpleNamespace(analysis=cg, plan=SimpleNamespace(removed=last_removed))
        if cmp.ratio <= target_time:
            break
        need = min(0.95, need + (cmp.ratio - target_time))  # add the measured shortfall
    info: dict[str, Any] = {"method": "latency-aware channel allocation (HALP)", "target_time": target_time,
                            "iterations": history,
                            "latency_table": {"entries": len(table.data), "measured_now": table.measured,
                                              "cache": str(table.path) if table.path else None},
                            "declined_groups": declined, "max_error": max_error}
    if chosen is None:
        info["result"] = "no pruned graph was accepted"
        return best, search.report.pipeline_report, pipeline, info
    gm, rep, width, err = chosen
    info.update(result="pruned", output_error=err, widths={g.name: [g.size, width[g.id]] for g in groups
                                                           if width[g.id] != g.size},
                met=bool(history and history[-1].get("ratio", 9) <= target_time))
    return gm, rep, [("prune", {"allocation": "measured_latency", "target_time": target_time})] + pipeline, info
