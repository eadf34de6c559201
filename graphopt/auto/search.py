"""The search: candidates from the pass registry, each decided by a measured training step.

1. Every registered EXACT pass whose training is "same" is a candidate, unless it cannot speed up
   one device (``NOT_A_SPEEDUP``). Mixed precision is a candidate only on a device with fast half
   kernels (CUDA); elsewhere it is declined with the known reason.
2. Candidates are tried in order; each one is applied *on top of the current best pipeline* by
   re-running the whole pipeline from the captured graph through the PassManager (verified once it
   measured faster, see 3). If that combination fails verification, the candidate is tried *first* in the
   pipeline (order matters: e.g. mixed precision before channels_last); if that fails too, it is
   declined with the verifier's message: nothing is combined unverified.
3. A combination is measured against the current best in paired alternated rounds, sequentially
   (:meth:`graphopt.bench.measure.StepMeasurer.compare`: a confidence interval on the ratio, more
   rounds only while undecided) and kept only when faster with confidence. It is built without the
   numeric checks for the measurement; only a combination that measured faster is verified (and
   declined, or tried in the other order, when that fails): rejected candidates cost no verification,
   and nothing unverified is ever kept.
4. Per-layer: once channels_last is kept, each top-level region holding convolutions is tried in
   NCHW (``channels_last:exclude=REGION.*``), kept when measured faster.
5. ``target_time`` (accuracy-changing, opt-in): :mod:`graphopt.auto.halp` prunes by measured latency.
6. Final: the result is compared with the original, sequentially, for non-inferiority (each kept
   pass already measured faster with confidence): emitted when its estimate is faster and its
   interval shows it at least ``FLOOR`` (0.98) x the original's speed; otherwise the original is
   returned (never slower). When nothing was kept there is nothing to compare: the original's time
   comes from the decisions' baselines.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx

from graphopt.bench.measure import StepMeasurer, environment
from graphopt.errors import GraphoptError
from graphopt.ir import copy_graph
from graphopt.pass_infra import Semantics, available_passes, create_pass

__all__ = ["auto_optimize", "AutoReport", "CandidateRecord", "exact_candidates", "NOT_A_SPEEDUP", "ORDER", "FLOOR"]

log = logging.getLogger(__name__)

NOT_A_SPEEDUP = {
    "partition": "splits the graph into pipeline stages for several devices; it does not speed up one device",
}
"""Exact passes that are never candidates on one device, with the reason (reported)."""

FLOOR = 0.98
"""The final check: the combined result is emitted when it measures faster than the original and, with
95% confidence, at least ``FLOOR`` x the original's speed (each kept pass already measured faster)."""

ORDER = ("cleanup", "sdpa", "mixed_precision", "channels_last")
"""Preferred order of the candidates (others follow by name): cheap graph cleanups first, layout last."""


@dataclass
class CandidateRecord:
    """One decision: a pass (with options, per layer where it has that granularity) measured
    against the best so far."""

    pass_: str
    options: dict[str, Any] = field(default_factory=dict)
    layer: str | None = None
    measured_ms: float | None = None
    baseline_ms: float | None = None
    kept: bool = False
    reason: str = ""
    margin: float | None = None
    comparison: dict[str, Any] | None = None  # the measurement behind the decision (ratio, interval, rounds...)

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_, "options": self.options, "layer": self.layer, "measured_ms": self.measured_ms,
                "baseline_ms": self.baseline_ms, "kept": self.kept, "reason": self.reason, "margin": self.margin,
                "comparison": self.comparison}

    def measured(self, cmp: Any) -> None:
        """Fill the times from a :class:`graphopt.bench.measure.Comparison`."""
        self.measured_ms, self.baseline_ms, self.margin = cmp.candidate_ms, cmp.baseline_ms, cmp.margin
        self.comparison = cmp.as_dict()


@dataclass
class AutoReport:
    candidates: list[CandidateRecord] = field(default_factory=list)
    pipeline: list[str] = field(default_factory=list)  # the kept pass specs, in order
    original_ms: float | None = None
    final_ms: float | None = None
    speedup: float = 1.0
    final_margin: float | None = None
    clock: str = "wall"  # the decision clock: "thread_cpu" (CPU, one thread) or "wall"; *_ms are in it
    original_wall_ms: float | None = None
    final_wall_ms: float | None = None
    final_comparison: dict[str, Any] | None = None
    kept_original: bool = False
    not_tried: list[str] = field(default_factory=list)
    budget_s: float | None = None
    search_s: float = 0.0
    device: str = "cpu"
    target_time: float | None = None
    pruning: dict[str, Any] | None = None
    env: dict[str, Any] = field(default_factory=dict)
    pipeline_report: Any = None  # the PassManager report of the final pipeline
    prune_plan: Any = None  # target_time: the channel analysis and removal of the kept pruning (for reconstruction)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "pipeline": self.pipeline, "original_ms": self.original_ms,
                "final_ms": self.final_ms, "speedup": self.speedup, "final_margin": self.final_margin,
                "clock": self.clock, "original_wall_ms": self.original_wall_ms, "final_wall_ms": self.final_wall_ms,
                "wall_speedup": (self.original_wall_ms / self.final_wall_ms
                                 if self.original_wall_ms and self.final_wall_ms else None),
                "final_comparison": self.final_comparison,
                "kept_original": self.kept_original, "not_tried": self.not_tried, "budget_s": self.budget_s,
                "search_s": self.search_s, "target_time": self.target_time, "pruning": self.pruning,
                "candidates": [c.as_dict() for c in self.candidates], "env": self.env}


def _fast_half(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, (f"no fast half-precision kernels on {device.type}: bf16/fp16 training steps measured "
                       "9-13x slower than float32 on this kind of CPU (declined without measuring)")
    return True, ""


def exact_candidates(gm: fx.GraphModule, device: torch.device | str) -> tuple[list[tuple[str, dict[str, Any]]],
                                                                               list[CandidateRecord]]:
    """(name, options) of the candidates to measure, and records for those declined up front."""
    device = torch.device(device)
    todo: list[tuple[str, dict[str, Any]]] = []
    declined: list[CandidateRecord] = []
    passes = available_passes()
    names = [n for n in ORDER if n in passes] + sorted(n for n in passes if n not in ORDER)
    for name in names:
        cls = passes[name]
        if name == "mixed_precision":
            ok, why = _fast_half(device)
            if not ok:
                declined.append(CandidateRecord(name, reason=why))
                continue
            for dtype in ("bfloat16", "float16"):
                todo.append((name, {"dtype": dtype}))
            continue
        if cls.semantics is not Semantics.EXACT:
            why = ("accuracy-changing: only with --target-time (pruning by measured time)" if name == "prune"
                   else f"not exact ({cls.semantics.value}): never chosen automatically")
            declined.append(CandidateRecord(name, reason=why))
            continue
        if cls.training != "same":
            declined.append(CandidateRecord(name, reason=f"changes training ({cls.training_reason}): "
                                                         "never chosen automatically"))
            continue
        if name in NOT_A_SPEEDUP:
            declined.append(CandidateRecord(name, reason=NOT_A_SPEEDUP[name]))
            continue
        todo.append((name, {}))
    return todo, declined


def _spec(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}"
                                 for k, v in options.items())


def _regions(gm: fx.GraphModule) -> list[str]:
    """Top-level child modules holding Conv2d layers (the per-region layout granularity)."""
    out: list[str] = []
    for name, child in gm.named_children():
        if any(isinstance(m, torch.nn.Conv2d) for m in child.modules()):
            out.append(name)
    return out


class _Search:
    def __init__(self, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], measurer: StepMeasurer,
                 budget: float | None, clock: Callable[[], float],
                 progress: Callable[[CandidateRecord], None] | None) -> None:
        self.original = gm
        self.inputs = inputs
        self.m = measurer
        self.clock = clock
        self.t0 = clock()
        self.budget = budget
        self.progress = progress
        self.report = AutoReport()
        self.original_cmp: Any = None  # the last comparison whose baseline was the original

    def out_of_time(self) -> bool:
        return self.budget is not None and self.clock() - self.t0 >= self.budget

    def build(self, specs: Sequence[tuple[str, dict[str, Any]]], verify: bool = True) -> tuple[fx.GraphModule, Any]:
        from graphopt.manager import PassManager

        passes = [create_pass(n, o) for n, o in specs]
        return PassManager(passes, verify=verify).run(copy_graph(self.original), self.inputs)

    def record(self, rec: CandidateRecord) -> None:
        self.report.candidates.append(rec)
        if self.progress:
            self.progress(rec)

    def compare(self, gm: fx.GraphModule, best: fx.GraphModule, per_layer: bool = False) -> Any:
        # a per-layer refinement gets half the measuring time of a whole pass (its gains are smaller)
        cap = self.m.max_s / 2 if per_layer and self.m.max_s is not None else -1.0
        cmp = self.m.compare(gm, best, stop=self.out_of_time, max_s=cap)
        if best is self.original:
            self.original_cmp = cmp
        return cmp

    def try_candidate(self, pipeline: list[tuple[str, dict[str, Any]]], best: fx.GraphModule,
                      name: str, options: dict[str, Any], layer: str | None = None
                      ) -> tuple[list[tuple[str, dict[str, Any]]], fx.GraphModule, Any] | None:
        """Apply and measure one candidate on top of ``pipeline``, verify it when it measured faster;
        the new state when kept. Orders: after the kept passes, else first (when the first order does
        not verify)."""
        rec = CandidateRecord(name, dict(options), layer)
        base = [(n, o) for n, o in pipeline if n != name]  # a per-layer variant replaces the pass's entry
        tries = [base + [(name, options)]] + ([[(name, options)] + base] if base else [])
        errors: list[str] = []
        for k, specs in enumerate(tries):
            try:
                gm, rep = self.build(specs, verify=False)
            except GraphoptError as exc:
                errors.append(str(exc))
                continue
            prec = rep.records[[s[0] for s in specs].index(name)]
            if not prec.modified:
                rec.reason = "nothing to rewrite in this model" + (
                    f" ({prec.declined[0]['reason']})" if prec.declined else "")
                self.record(rec)
                return None
            try:
                cmp = self.compare(gm, best, per_layer=layer is not None)
            except Exception as exc:  # the candidate's step does not run on the device
                rec.reason = f"its training step failed on {self.m.device}: {type(exc).__name__}: {str(exc)[:200]}"
                self.m.release(gm)
                self.record(rec)
                return None
            rec.measured(cmp)
            if not cmp.faster:
                self.m.release(gm)
                why = ("slower" if cmp.slower else "stopped by the time budget" if cmp.stopped
                       else "within noise" if cmp.verdict == "not faster" else
                       f"undecided after {cmp.rounds} rounds")
                if why.startswith("undecided"):
                    why += " (its measuring time or round cap)"
                extra = f", below the {self.m.min_gain:.0%} minimum gain" if why == "within noise" else ""
                rec.reason = f"{why}: {cmp.summary()}{extra}"
                if cmp.stopped:
                    self.report.not_tried.append(_spec(name, options) + (f" [{layer}]" if layer else "")
                                                 + f" (undecided when the time budget ran out, {cmp.rounds} rounds)")
                self.record(rec)
                return None
            measured = gm
            try:  # measured faster: now the numeric checks the passes' semantics promise
                gm, rep = self.build(specs, verify=True)
            except GraphoptError as exc:
                self.m.release(measured)
                errors.append(str(exc))  # the other order is a different graph: measured on its own
                continue
            self.m.adopt(gm, measured)  # the same pass output: its warm training copy is reused
            order = "" if k == 0 else " (placed first: the other order does not verify)"
            rec.kept = True
            rec.reason = f"faster: {cmp.summary()}; verified{order}"
            self.record(rec)
            if best is not self.original:  # the original stays warm for the final comparison
                self.m.release(best)
            return specs, gm, rep
        rec.reason = "not verifiable in any order with the kept passes: " + errors[-1][:300]
        self.record(rec)
        return None


def auto_optimize(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], *, device: str | torch.device | None = None,
                  loss: Callable[..., torch.Tensor] | None = None, target: torch.Tensor | None = None,
                  time_budget: float | None = None, target_time: float | None = None,
                  max_error: float | None = None, measurer: StepMeasurer | None = None,
                  candidates: Sequence[tuple[str, dict[str, Any]]] | None = None,
                  per_layer: bool = True, cache_dir: str | None = None,
                  clock: Callable[[], float] = time.monotonic,
                  progress: Callable[[CandidateRecord], None] | None = None,
                  ) -> tuple[fx.GraphModule, AutoReport]:
    """Choose and apply the rewrites that make ``gm``'s training step faster on ``device``
    (see the module docstring). Returns the (verified) graph and the decisions."""
    inputs = tuple(inputs)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = measurer or StepMeasurer(inputs, target, loss=loss, device=dev)
    s = _Search(gm, inputs, m, time_budget, clock, progress)
    s.report.clock = m.clock
    s.report.device, s.report.budget_s, s.report.target_time = str(dev), time_budget, target_time
    s.report.env = environment(dev)
    # the original's step must run on the device: a user error otherwise (one line, exit 2)
    try:
        m.warm(gm)
    except GraphoptError:
        raise
    except Exception as exc:
        raise GraphoptError(f"the model's training step cannot run on {dev}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
                            fix="choose another --device, or check the model file's loss()") from exc
    todo, declined = exact_candidates(gm, dev) if candidates is None else (list(candidates), [])
    for rec in declined:
        s.record(rec)
    pipeline: list[tuple[str, dict[str, Any]]] = []
    best: fx.GraphModule = gm
    best_rep = None
    queue: list[tuple[str, dict[str, Any], str | None]] = [(n, o, None) for n, o in todo]
    i = 0
    while i < len(queue):
        name, options, layer = queue[i]
        i += 1
        if s.out_of_time():
            s.report.not_tried.extend(_spec(n, o) + (f" [{lay}]" if lay else "") for n, o, lay in queue[i - 1:])
            break
        got = s.try_candidate(pipeline, best, name, options, layer)
        if got is None:
            continue
        pipeline, best, best_rep = got
        if name == "channels_last" and per_layer and layer is None:
            # per region: try each region's convs back in NCHW, right after the global decision
            queue[i:i] = [("channels_last", {"exclude": [r, f"{r}.*"]}, r) for r in _regions(gm)]
        elif name == "channels_last" and layer is not None:
            # a kept region exclusion: later region candidates build on it
            for j in range(i, len(queue)):
                n2, o2, l2 = queue[j]
                if n2 == "channels_last" and l2 is not None:
                    queue[j] = (n2, {"exclude": list(options["exclude"]) + [l2, f"{l2}.*"]}, l2)
    if target_time is not None and not s.out_of_time():
        from graphopt.auto.halp import prune_to_time

        best, best_rep, pipeline, info = prune_to_time(s, pipeline, best, target_time, max_error=max_error,
                                                       cache_dir=cache_dir)
        s.report.pruning = info
    elif target_time is not None:
        s.report.not_tried.append(f"pruning to --target-time {target_time}")
    # final: measured against the original, never slower
    s.report.search_s = clock() - s.t0
    rep_ = s.report
    if best is gm:  # nothing kept: nothing to compare; the original's time from the decisions' baselines
        ref = s.original_cmp
        if ref is None:
            c, w = m.measure_both({"original": gm}, rounds=m.min_rounds)
            rep_.original_ms = rep_.final_ms = statistics.median(c["original"]) * 1e3
            rep_.original_wall_ms = rep_.final_wall_ms = statistics.median(w["original"]) * 1e3
        else:
            rep_.original_ms = rep_.final_ms = ref.baseline_ms
            rep_.original_wall_ms = rep_.final_wall_ms = ref.baseline_wall_ms
        rep_.kept_original, rep_.speedup = True, 1.0
        pipeline, best_rep = [], None
    else:
        # every kept pass measured faster than the best before it; the combination is checked against the
        # original for non-inferiority: kept unless it may be slower than FLOOR x the original's speed
        cmp = m.compare(best, gm, floor=FLOOR)
        rep_.final_comparison = cmp.as_dict()
        rep_.original_ms, rep_.final_ms, rep_.final_margin = cmp.baseline_ms, cmp.candidate_ms, cmp.margin
        rep_.original_wall_ms, rep_.final_wall_ms = cmp.baseline_wall_ms, cmp.candidate_wall_ms
        rep_.kept_original = cmp.verdict not in ("faster", "not slower")
        if rep_.kept_original:
            why = ("slower" if cmp.verdict == "slower" else
                   f"not shown to be faster and at least {FLOOR}x as fast ({m.confidence:.0%} interval)")
            rec = CandidateRecord("combined", {"pipeline": [_spec(n, o) for n, o in pipeline]},
                                  reason=f"the combined result measured {cmp.summary()} vs the original: {why}: "
                                         "the original is kept")
            rec.measured(cmp)
            s.record(rec)
            best, pipeline, best_rep = gm, [], None
            rep_.final_ms, rep_.final_wall_ms = cmp.baseline_ms, cmp.baseline_wall_ms
            rep_.speedup = 1.0
        else:
            rep_.speedup = 1.0 / cmp.ratio
    s.report.pipeline = [_spec(n, o) for n, o in pipeline]
    s.report.pipeline_report = best_rep
    return best, s.report

