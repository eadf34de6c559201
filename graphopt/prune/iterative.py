"""Iterative pruning: prune a share per round, fine-tune between rounds."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from graphopt.errors import PassConfigError

__all__ = ["prune_iterative", "removed_nothing"]

log = logging.getLogger(__name__)


def removed_nothing(record: Any) -> str | None:
    """Why a prune round (its PassRecord) removed nothing, or None if it removed something."""
    if record.modified:
        return None
    reasons = list(dict.fromkeys(d["reason"] for d in record.declined))
    if not reasons:
        return "no channel group or weight to prune"
    return "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")


def prune_iterative(module: nn.Module, inputs: Iterable[torch.Tensor] | torch.Tensor, *, rounds: int,
                    ratio_per_round: float, finetune: Callable[[nn.Module], Any] | None = None,
                    verify: bool = True, calibration_data: Iterable[Any] | None = None,
                    **prune_opts: Any) -> tuple[fx.GraphModule, list[Any]]:
    """Run the ``prune`` pass ``rounds`` times, calling ``finetune(model)`` after each round.

    ``ratio_per_round``: structured mode removes this share of the *remaining* channels of each
    group (or globally) per round, so ``rounds`` rounds keep about ``(1 - r) ** rounds``;
    unstructured/2:4 sparsity targets ``1 - (1 - r) ** round`` zeros after each round (2:4 is
    one pattern, so more rounds only fine-tune more). ``finetune`` trains the GraphModule in
    place (e.g. a few epochs with the training harness); masks from ``keep_zero`` stay applied.
    ``prune_opts``: the pass's other options (mode, criterion, scope, round_to, ...).
    A round whose ratio cannot remove anything (every group at its minimum after rounding to
    ``round_to``) says so: a logged warning and ``notes["round"]["removed_nothing"]`` on its record.
    Returns the final GraphModule and one PipelineReport per round.
    """
    from graphopt.manager import optimize
    from graphopt.pass_infra import create_pass

    if rounds < 1:
        raise PassConfigError(f"rounds={rounds} must be at least 1", where="prune_iterative")
    if not 0.0 < ratio_per_round < 1.0:
        raise PassConfigError(f"ratio_per_round={ratio_per_round} must be in (0, 1)", where="prune_iterative")
    for bad in ("ratio", "macs"):
        if bad in prune_opts:
            raise PassConfigError(f"'{bad}' is set per round by prune_iterative", where="prune_iterative",
                                  fix="give ratio_per_round instead")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    inputs = tuple(inputs)
    mode = prune_opts.get("mode", "structured")
    current: nn.Module = module
    reports = []
    for r in range(1, rounds + 1):
        ratio = ratio_per_round if mode == "structured" else 1.0 - (1.0 - ratio_per_round) ** r
        p = create_pass("prune", {**prune_opts, "ratio": ratio})
        gm, report = optimize(current, inputs, [p], verify=verify, calibration_data=calibration_data)
        rec = report.records[0]
        log.info("prune round %d/%d: %s", r, rounds, rec.after)
        why = removed_nothing(rec)
        rec.notes["round"] = {"round": r, "of": rounds, "ratio": ratio, "removed_nothing": why is not None,
                              **({"why": why} if why else {})}
        if why:
            log.warning("prune round %d/%d removed nothing: %s", r, rounds, why)
        reports.append(report)
        if finetune is not None:
            finetune(gm)
        current = gm
    return current, reports  # type: ignore[return-value]
