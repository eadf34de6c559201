"""Learning-rate schedules as a learning rate per optimizer step.

The formulas are not re-implemented here: every schedule is a ``torch.optim.lr_scheduler``
stepped on a throw-away optimizer, once per training step, and the learning rate it sets is
recorded. Any backend (PyTorch, ONNX Runtime) then follows exactly the same schedule by
setting ``lr(step)`` before each step.

- ``constant``: ``base_lr`` throughout (``ConstantLR`` with factor 1).
- ``cosine``: ``CosineAnnealingLR`` from ``base_lr`` down to ``min_lr`` over the steps after warm-up.
- ``onecycle``: ``OneCycleLR`` with ``max_lr = base_lr``; its rising phase is the warm-up
  (``pct_start = warmup_steps / total`` when a warm-up is given, else 0.3). Only the learning
  rate is scheduled (not OneCycle's momentum cycle).
- ``step``: ``StepLR`` (multiply by ``gamma`` every ``step_size`` steps).
- ``warmup_steps > 0`` (not onecycle): ``LinearLR`` from ``warmup_start_factor * base_lr`` to
  ``base_lr``, then the main schedule (``SequentialLR``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from graphopt.errors import PassConfigError

__all__ = ["SCHEDULES", "Schedule", "lr_schedule"]

SCHEDULES = ("constant", "cosine", "onecycle", "step")


@dataclass(frozen=True)
class Schedule:
    """Learning rate for each step ``0 .. total_steps-1`` (steps past the end keep the last value)."""

    name: str
    lrs: tuple[float, ...]

    def __call__(self, step: int) -> float:
        if not self.lrs:
            raise IndexError("empty schedule")
        return self.lrs[min(max(step, 0), len(self.lrs) - 1)]

    def __len__(self) -> int:
        return len(self.lrs)


def lr_schedule(name: str, base_lr: float, total_steps: int, *, warmup_steps: int = 0,
                warmup_start_factor: float = 0.1, min_lr: float = 0.0, step_size: int | None = None,
                gamma: float = 0.1, pct_start: float | None = None) -> Schedule:
    """Build the per-step learning rates of schedule ``name`` (see the module docstring)."""
    if name not in SCHEDULES:
        raise PassConfigError(f"unknown learning-rate schedule '{name}'", fix="choose one of " + ", ".join(SCHEDULES))
    if total_steps < 1:
        raise PassConfigError(f"a schedule needs at least one step (got {total_steps})")
    if base_lr <= 0:
        raise PassConfigError(f"learning rate must be > 0 (got {base_lr})")
    if not 0 <= warmup_steps < total_steps:
        raise PassConfigError(f"warm-up of {warmup_steps} steps does not fit in {total_steps} steps",
                              fix="use fewer warm-up steps or more epochs")
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = torch.optim.lr_scheduler
    main_steps = total_steps - (0 if name == "onecycle" else warmup_steps)
    if name == "onecycle":
        pct = pct_start if pct_start is not None else (warmup_steps / total_steps if warmup_steps else 0.3)
        scheduler = sched.OneCycleLR(opt, max_lr=base_lr, total_steps=total_steps, pct_start=pct,
                                     cycle_momentum=False)
    elif warmup_steps:
        warm = sched.LinearLR(opt, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
        main = _main(name, opt, main_steps, min_lr, step_size, gamma)
        scheduler = sched.SequentialLR(opt, [warm, main], milestones=[warmup_steps])
    else:
        scheduler = _main(name, opt, main_steps, min_lr, step_size, gamma)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SequentialLR's "epoch parameter" deprecation noise
        for _ in range(total_steps):
            lrs.append(float(opt.param_groups[0]["lr"]))
            opt.step()
            scheduler.step()
    return Schedule(name + (f"+warmup{warmup_steps}" if warmup_steps and name != "onecycle" else ""), tuple(lrs))


def _main(name: str, opt: torch.optim.Optimizer, steps: int, min_lr: float, step_size: int | None,
             gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    sched = torch.optim.lr_scheduler
    if name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=min_lr)
    if name == "step":
        if not step_size or step_size < 1:
            raise PassConfigError("the step schedule needs step_size >= 1 (steps between decays)")
        return sched.StepLR(opt, step_size=step_size, gamma=gamma)
    return sched.ConstantLR(opt, factor=1.0, total_iters=0)
