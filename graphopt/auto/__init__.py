"""Automatic mode: candidate rewrites decided by measuring the training step on the device.

    from graphopt.auto import auto_optimize
    gm, report = auto_optimize(gm, inputs, device="cpu", time_budget=120)
    report.as_dict()["auto"]["speedup"]

Exact rewrites by default (found through the pass registry); structured pruning allocated by
measured per-layer latency (HALP) only with ``target_time``.
"""

from __future__ import annotations

from graphopt.auto.search import AutoReport, CandidateRecord, auto_optimize, exact_candidates

__all__ = ["auto_optimize", "AutoReport", "CandidateRecord", "exact_candidates"]
