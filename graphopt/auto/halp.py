"""Pruning to a measured time target, allocated by measured latency (after HALP, NeurIPS 2022).

HALP removes the channels that save the most *measured* latency per unit of importance, with a
per-layer latency lookup table measured on the target device, instead of ranking by MACs. Here:

1. **Latency table.** Every Conv2d/Linear layer is timed on the device alone at its real input shape,
   as it trains: forward, backward and its SGD-with-momentum update, with the BatchNorm that follows it
   in the graph (a memory-bound cost that scales with the channels). Widths: a grid per channel group
   (about 12, on the alignments oneDNN's blocked kernels favour: multiples of 16/32/64 by size),
   varying one side at a time. On a CPU with one intra-op thread the layer's cost is its **thread CPU
   time** (``time.thread_time``), which other processes on a loaded machine do not inflate; wall-clock
   samples there were several-fold off and non-monotonic in the width, and steered the allocation to the
   wrong layers. Cached on disk (``cache_dir/latency-<device>.json``, keyed by layer shape).
2. **Latency model.** A layer with both widths changed is modelled from the two measured one-width
   curves, ``T(wi, co) * T(ci, wo) / T(ci, co)`` (separable); the model's total is what is reduced.
3. **Allocation** (:func:`allocate_widths`). From full widths, a greedy knapsack repeatedly takes the
   group and smaller grid width with the most modelled seconds saved per unit of importance lost, until
   the modelled latency drops by the share the target needs. Importance (:func:`keep_cost`):
   ``-log(share of the group's L1 mass kept)``: comparable across groups of any width, and dearer the
   narrower a group already is, so the allocation only departs from uniform where time says so.
4. **Fastest widths.** Each group's width is then raised to the largest grid width that measures no
   slower (tables are not monotonic: some widths hit faster kernels), keeping channels for free.
5. **Measured iteration.** The pruned graph (with the kept exact rewrites on top, verified) is
   measured against the original training step; the share to remove is interpolated on the measured
   ``(share, ratio)`` points (:func:`next_share`, a secant), aiming ``AIM_MARGIN`` under the target,
   for at most ``iterations`` tries; the least-pruned result that meets the target is kept.
   ``max_error`` bounds the relative L2 output error vs the original (eval mode): an allocation that
   exceeds it is not taken.

Approximations (stated): latency is measured one width at a time (the separable model combines them);
elementwise ops other than the following BatchNorm are not in the table (the measured iteration
absorbs them); groups with shape constraints (attention heads, splits) are left unpruned.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
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
    """Candidate widths of a group, about ``points`` of them, on the alignments oneDNN's blocked
    kernels favour: multiples of 8 under 64 channels, of 16 under 256, of 32 under 1024, else of 64
    (of 1 under 16 channels). The full width is always a candidate."""
    align = 1 if size < 16 else 8 if size < 64 else 16 if size < 256 else 32 if size < 1024 else 64
    step = max(align, int(math.ceil(size / points / align)) * align)
    widths = {size}
    w = (size // step) * step
    while w >= max(min_keep, 1):
        widths.add(w)
        w -= step
    return sorted(widths)


def keep_cost(scores: Any) -> Callable[[int], float]:
    """The importance lost by keeping ``w`` channels of a group (its highest-scoring ones):
    ``-log(kept share of the group's L1 mass)``. Comparable across groups of any size (halving a group
    costs about log 2 whatever its width or scale) and convex, so shrinking a group gets dearer the
    narrower it already is: the allocation spreads over groups unless the measured time says otherwise."""
    sc = np.sort(np.abs(np.asarray(scores, dtype=float)))[::-1]
    mass = np.concatenate([[0.0], np.cumsum(sc)])
    total = float(mass[-1])

    def cost(w: int) -> float:
        if total <= 0:
            return -math.log(max(w, 1) / max(len(sc), 1))
        return -math.log(max(float(mass[w]) / total, 1e-12))

    return cost


def allocate_widths(sizes: dict[Any, int], grids: dict[Any, list[int]], latency: Callable[[dict[Any, int]], float],
                    cost: dict[Any, Callable[[int], float]], need_frac: float,
                    touch: Callable[[Any, dict[Any, int]], float] | None = None) -> dict[Any, int]:
    """Greedy latency-per-importance allocation (HALP's knapsack, solved greedily).

    ``latency(width)``: the modelled seconds of all layers at these group widths (from the measured
    table); ``touch(g, width)``: the same restricted to the layers group ``g`` reads or writes (a
    faster equivalent; optional). Starting from full widths, repeatedly take the group and smaller
    grid width with the most seconds saved per unit of importance lost (``cost[g]``), until the
    saving reaches ``need_frac`` of the total. Then each group is raised to the largest grid width
    that measures no slower than the allocated one (tables are not monotonic: some widths hit
    faster kernels), keeping channels for free."""
    part = touch or (lambda g, wd: latency(wd))
    width = dict(sizes)
    total = latency(width)
    need = need_frac * total
    saved = 0.0
    while saved < need:
        best: tuple[float, Any, int, float] | None = None
        for g in sizes:
            cur = part(g, width)
            c0 = cost[g](width[g])
            for w2 in (w for w in grids[g] if w < width[g]):
                dl = cur - part(g, {**width, g: w2})
                if not (dl > 0 and math.isfinite(dl)):
                    continue  # measures no faster
                val = dl / max(cost[g](w2) - c0, 1e-9)
                if best is None or val > best[0]:
                    best = (val, g, w2, dl)
        if best is None:
            break
        _, g, w2, dl = best
        width[g] = w2
        saved += dl
    for g in sizes:  # fastest widths: keep more channels where that measures no slower
        cur = part(g, width)
        width[g] = max(w for w in grids[g] if w >= width[g] and part(g, {**width, g: w}) <= cur * (1 + 1e-9))
    return width


class LatencyTable:
    """Measured forward+backward seconds of single layers, cached on disk."""

    def __init__(self, device: torch.device, cache_dir: str | os.PathLike | None = None, reps: int = 3,
                 timer: Callable[[str, dict[str, Any]], float] | None = None, threads: int | None = 1) -> None:
        self.device = device
        self.reps = reps
        self.threads = threads
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
        """One layer's training cost: forward, backward and (``sgd``) its SGD-with-momentum update;
        a convolution the graph follows with BatchNorm (``bn``) is timed with it."""
        from graphopt.bench.measure import StepTimer, thread_settings

        dev = self.device
        if kind == "conv":
            layer: nn.Module = nn.Conv2d(s["cin"], s["cout"], s["k"], s["stride"], s["pad"], s["dil"],
                                         groups=s["groups"], bias=s["bias"])
            if s.get("bn"):
                layer = nn.Sequential(layer, nn.BatchNorm2d(s["cout"]))
            x = torch.randn(s["n"], s["cin"], s["h"], s["w"])
        else:
            layer = nn.Linear(s["cin"], s["cout"], bias=s["bias"])
            x = torch.randn(*s["lead"], s["cin"])
        layer, x = layer.to(dev), x.to(dev).requires_grad_(True)
        opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9) if s.get("sgd") else None

        def step() -> None:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            layer(x).sum().backward()
            if opt is not None:
                opt.step()

        with thread_settings(dev, self.threads):
            step()  # warm-up: allocation, kernel choice
            if dev.type == "cpu" and torch.get_num_threads() == 1:
                # one intra-op thread: the work runs on this thread, so its CPU time is the layer's
                # cost, which other processes on a loaded machine do not inflate (wall time does)
                samples = []
                for _ in range(self.reps):
                    t0 = time.thread_time()
                    step()
                    samples.append(time.thread_time() - t0)
            else:
                timer = StepTimer(dev)
                for _ in range(self.reps):
                    with timer.time():
                        step()
                samples = timer.samples()
        return float(np.median(samples))


def _layers(gm: fx.GraphModule) -> dict[str, tuple[nn.Module, tuple[int, ...], bool]]:
    """Conv2d/Linear call_module nodes: name -> (module, input shape, followed by a BatchNorm2d)."""
    from graphopt.ir import output_shape

    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and n.args and isinstance(n.args[0], fx.Node):
            shape = output_shape(n.args[0])
            users = list(n.users)
            bn = (isinstance(mod, nn.Conv2d) and len(users) == 1 and users[0].op == "call_module"
                  and isinstance(gm.get_submodule(str(users[0].target)), nn.BatchNorm2d))
            if shape is not None:
                out[n.name] = (mod, tuple(int(v) for v in shape), bn)
    return out


def _shape(mod: nn.Module, in_shape: tuple[int, ...], cin: int, cout: int, bn: bool = False
           ) -> tuple[str, dict[str, Any]]:
    if isinstance(mod, nn.Conv2d):
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels
        groups = cin if depthwise else mod.groups
        return "conv", {"n": in_shape[0], "cin": cin, "cout": cout, "h": in_shape[2], "w": in_shape[3],
                        "k": list(mod.kernel_size), "stride": list(mod.stride), "pad": list(mod.padding)
                        if not isinstance(mod.padding, str) else mod.padding, "dil": list(mod.dilation),
                        "groups": groups, "bias": mod.bias is not None, "bn": bn, "sgd": True}
    return "linear", {"lead": list(in_shape[:-1]), "cin": cin, "cout": cout, "bias": mod.bias is not None,
                      "sgd": True}


def _rel_error(a: nn.Module, b: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    from graphopt.ir import eval_mode

    with torch.no_grad(), eval_mode(a), eval_mode(b):
        ya, yb = a(*inputs).float(), b(*inputs).float()
    return float((ya - yb).norm() / ya.norm().clamp_min(1e-12))


AIM_MARGIN = 0.02
"""The allocation aims this much under ``target_time`` (the final comparison re-measures the result)."""
OVERSHOOT = 0.06
"""A measured ratio this far under the target still stops the iteration; further under, the share to
remove is interpolated back up (while iterations remain)."""


def next_share(points: list[tuple[float, float]], aim: float, cap: float = 0.95) -> float | None:
    """The next share of modelled latency to remove, from the measured ``(share, ratio)`` points: linear
    interpolation between the two points that bracket ``aim`` (secant), else extrapolation from the
    last two. ``None`` when no further share is meaningful."""
    pts = sorted(points)
    under = [p for p in pts if p[1] > aim]  # not yet fast enough
    over = [p for p in pts if p[1] <= aim]
    if under and over:
        lo, hi = max(under), min(over)
    elif len(under) >= 2:
        lo, hi = under[-2], under[-1]
    else:
        return None
    if hi[1] == lo[1]:
        nxt = hi[0] + 0.1 if not over else (lo[0] + hi[0]) / 2
    else:
        nxt = lo[0] + (aim - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
    if not over:
        nxt = max(nxt, hi[0] + 0.02)
    else:
        nxt = min(max(nxt, lo[0] + 1e-3), hi[0] - 1e-3)
    return min(cap, max(0.0, nxt))


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
    table = latency or LatencyTable(m.device, cache_dir, timer=getattr(m, "latency_timer", None),
                                    threads=getattr(m, "threads", 1))
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
    cost = {g.id: keep_cost(scores[g.id]) for g in groups}
    min_keep = {g.id: max(1, int(math.ceil(g.size * 0.1))) for g in groups}
    grids = {g.id: width_grid(g.size, min_keep[g.id]) for g in groups}
    sides: dict[str, dict[str, int]] = {}  # layer -> {"in": group, "out": group}
    for gid, lst in affects.items():
        for node, side in lst:
            sides.setdefault(node, {})[side] = gid
    touching: dict[int, list[str]] = {g.id: sorted({node for node, _ in affects[g.id]}) for g in groups}

    def dims(node: str) -> tuple[int, int]:
        mod = layers[node][0]
        return (mod.in_channels, mod.out_channels) if isinstance(mod, nn.Conv2d) else (mod.in_features, mod.out_features)

    def measured(node: str, cin: int, cout: int) -> float:
        mod, shape, bn = layers[node]
        if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not (mod.groups == mod.in_channels) and (
                cin % mod.groups or cout % mod.groups):
            return float("inf")
        shp = list(shape)
        if isinstance(mod, nn.Conv2d):
            shp[1] = cin
        kind, s = _shape(mod, tuple(shp), cin, cout, bn)
        return table.latency(kind, s)

    def layer_latency(node: str, width: dict[int, int]) -> float:
        """Measured seconds of one layer at the groups' widths. Both widths changed: the separable
        model T(wi, co) * T(ci, wo) / T(ci, co) from the two measured one-width curves."""
        mod = layers[node][0]
        ci, co = dims(node)
        sd = sides.get(node, {})
        wi = width[sd["in"]] if "in" in sd else ci
        wo = width[sd["out"]] if "out" in sd else co
        if isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels:
            w = min(wi, wo)
            return measured(node, w, w)
        if wi == ci or wo == co:
            return measured(node, wi, wo)
        full = measured(node, ci, co)
        return measured(node, wi, co) * measured(node, ci, wo) / full if full > 0 else 0.0

    def allocate(need_frac: float) -> dict[int, int]:
        """Shrink the groups where the measured table says the most seconds are saved per unit of
        importance, until the modelled latency drops by ``need_frac`` (:func:`allocate_widths`)."""
        width = allocate_widths(
            {g.id: g.size for g in groups}, grids,
            lambda wd: sum(layer_latency(n, wd) for n in sides), cost, need_frac,
            touch=lambda gid, wd: sum(layer_latency(n, wd) for n in touching[gid]))
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
    aim = max(0.01, target_time - AIM_MARGIN)  # aim a little under the target: the final run re-measures it
    need = 1.0 - aim  # share of the layers' modelled latency to remove
    history: list[dict[str, Any]] = []
    points: list[tuple[float, float]] = [(0.0, 1.0)]  # (share removed, measured ratio)
    results: list[tuple[float, fx.GraphModule, Any, dict[int, int], float, Any]] = []
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
        results.append((cmp.ratio, gm, rep, width, err, last_removed))
        points.append((need, cmp.ratio))
        if target_time - OVERSHOOT <= cmp.ratio <= target_time:
            break  # met, without pruning much more than needed
        nxt = next_share(points, aim)
        if nxt is None or abs(nxt - need) < 1e-3:
            break
        need = nxt
    chosen = None
    if results:
        met_ = [r for r in results if r[0] <= target_time]
        pick = max(met_, key=lambda r: r[0]) if met_ else min(results, key=lambda r: r[0])
        for r in results:
            if r is not pick:
                m.release(r[1])
        chosen = pick[1:5]
        # what reconstruction needs to map kept channels (graphopt.recover.reconstruct_structured)
        search.report.prune_plan = SimpleNamespace(analysis=cg, plan=SimpleNamespace(removed=pick[5]))
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
                met=bool(any(r[0] <= target_time for r in results)))
    return gm, rep, [("prune", {"allocation": "measured_latency", "target_time": target_time})] + pipeline, info
