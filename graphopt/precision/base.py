"""What the precision passes (``mixed_precision``, ``cast``) have in common, as a base class."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
from torch import fx

from graphopt.ir import example_inputs
from graphopt.pass_infra import PassResult
from graphopt.precision.compare import compare_with_references
from graphopt.precision.ops import cleanup_casts, count_casts
from graphopt.precision.policy import check_existing_policy, low_dtype, make_policy, set_policy
from graphopt.precision.sweep import PrecisionSweep, SweepResult

__all__ = ["PrecisionPass"]


class PrecisionPass:
    """Mixin of a pass that rewrites a float32 graph to ``mode`` ("mixed" | "half") in ``config["dtype"]``:
    ``class MixedPrecision(PrecisionPass, Pass)``.

    Subclasses declare ``mode`` and the options ``dtype`` and ``autocast_factor``; they get the
    precondition (no other precision policy, no float64 parameters), :meth:`sweep` (run a
    :class:`PrecisionSweep` on the example inputs, then remove redundant casts), :meth:`finish`
    (record the policy, recompile, the PassResult) and the check against a float64 reference next
    to torch.autocast (:func:`compare_with_references`).
    """

    mode: ClassVar[str]
    config: dict[str, Any]

    @property
    def dtype(self) -> torch.dtype:
        return low_dtype(self.config["dtype"])

    def requires(self, gm: fx.GraphModule) -> None:
        check_existing_policy(gm, self.mode, self.config["dtype"])

    def sweep(self, gm: fx.GraphModule, sweep: PrecisionSweep) -> tuple[SweepResult, dict[str, Any], bool]:
        """Run ``sweep`` and the cast cleanup: ``(result, cast counts for the notes, modified)``."""
        before = count_casts(gm)
        res = sweep.run(example_inputs(gm))
        removed = cleanup_casts(gm, sweep.env)
        casts = {"before": before, "inserted": res.inserted, "removed": sum(removed.values()),
                 "removed_by_rule": {k: v for k, v in removed.items() if v}, "after": count_casts(gm)}
        return res, casts, bool(res.rewrites) or casts["removed"] > 0

    def finish(self, gm: fx.GraphModule, res: SweepResult, modified: bool, fp32_ops: Iterable[str], record: bool,
               notes: dict[str, Any]) -> PassResult:
        """The end of a precision pass: its policy (``mode``, dtype, ``fp32_ops``) recorded on the graph
        when ``record``, a modified graph recompiled, and the PassResult of the sweep's rewrites and
        declines with the notes ``dtype``, ``policy`` and then ``notes``."""
        policy = make_policy(self.mode, self.dtype, fp32_ops)
        if record:
            set_policy(gm, policy)
        if modified:
            gm.recompile()
        return PassResult(gm, modified, res.rewrites, res.declined,
                          {"dtype": self.config["dtype"], "policy": policy.as_dict(), **notes})

    def check(self, before: fx.GraphModule, after: fx.GraphModule, inputs: tuple[torch.Tensor, ...],
              result: PassResult) -> dict[str, Any]:
        return {"precision": compare_with_references(before, after, inputs, self.dtype,
                                                     self.config["autocast_factor"])}
