"""Precision: the policies a half-precision graph records and the machinery the precision passes share.

- :mod:`graphopt.precision.policy`: :class:`PrecisionPolicy` (what a graph's numerics need from
  whoever trains it: loss scaling, master weights), :func:`get_policy` / :func:`set_policy`,
  :class:`MasterWeights`;
- :mod:`graphopt.precision.ops`: op policy tables (which ops run in the low dtype, which stay
  float32), cast recognition and :func:`cleanup_casts`;
- :mod:`graphopt.precision.sweep`: :class:`PrecisionSweep`, the executed forward sweep that decides
  every node's dtype and inserts the casts (``mixed_precision``, ``cast``);
- :mod:`graphopt.precision.compare`: :func:`compare_with_references`, the error against a float64
  reference next to torch.autocast's;
- :class:`PrecisionPass`: the base class of the precision passes (precondition, sweep + cleanup,
  the recorded policy and result, the check against float64 and torch.autocast).
"""

from __future__ import annotations

from graphopt.precision.policy import (MasterWeights, PrecisionPolicy, check_existing_policy, get_policy, low_dtype,
                                       make_policy, needs_grad_scaler, set_policy)
from graphopt.precision.ops import FP32_FUNCS, LOW_FUNCS, cast_target, cleanup_casts, count_casts, is_norm_module
from graphopt.precision.sweep import PrecisionSweep, SweepResult
from graphopt.precision.compare import compare_with_references
from graphopt.precision.base import PrecisionPass

__all__ = ["PrecisionPolicy", "get_policy", "set_policy", "needs_grad_scaler", "MasterWeights", "make_policy",
           "check_existing_policy", "low_dtype", "LOW_FUNCS", "FP32_FUNCS", "is_norm_module", "cast_target",
           "count_casts", "cleanup_casts", "PrecisionSweep", "SweepResult", "compare_with_references", "PrecisionPass"]
