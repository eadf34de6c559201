"""Knowledge distillation: the model as loaded before the rewrite teaches the rewritten one.

The loss (Hinton et al. 2015) is ``(1 - alpha) * task_loss(student, target)
+ alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, plus, optionally,
``beta * MSE`` between named intermediate features of the two models where their shapes match
(feature matching; layers whose channels were pruned are skipped, with a note).

:class:`Distilled` wraps the student so the training loop needs no change: its forward runs
the student (and the frozen teacher, in eval mode, without gradients) and its loss reads the
teacher's output of the same batch. :func:`distill_fit` is the library entry point (used by
``graphopt train --distill``, ``prune-iterative --distill`` and available to the automatic mode).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import GraphoptError

__all__ = ["DistillConfig", "Distilled", "kd_loss", "distill_fit", "check_teacher", "DistillError"]

log = logging.getLogger(__name__)


class DistillError(GraphoptError):
    """The teacher cannot teach this student (outputs that do not match)."""


@dataclass
class DistillConfig:
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the KL term; 1 - alpha on the task loss
    features: list[str] = field(default_factory=list)  # module paths matched by MSE (same shape only)
    beta: float = 1.0  # weight of the feature term

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.log_softmax(teacher.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise DistillError(f"cannot find logits in a {type(out).__name__} output",
                       fix="make the model return a logits tensor (or a tuple starting with it)")


def check_teacher(teacher: nn.Module, student: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """One line, exit 2, when the teacher's outputs do not match the student's (shape, dtype kind)."""
    from graphopt.ir import eval_mode

    with torch.no_grad(), eval_mode(teacher), eval_mode(student):
        t = _first(teacher(*inputs))
        s = _first(student(*inputs))
    if t.shape != s.shape:
        raise DistillError(f"the teacher's outputs {tuple(t.shape)} do not match the student's {tuple(s.shape)}",
                           where="--distill",
                           fix="distil from a model with the same output (number of classes), or drop --distill")
    if t.dim() < 1 or not t.is_floating_point():
        raise DistillError(f"the teacher's output is not logits ({t.dtype}, {tuple(t.shape)})", where="--distill",
                           fix="distillation needs a classifier's logits")


class Distilled(nn.Module):
    """Student wrapper: forward returns the student's output; the teacher's output of the same
    batch (and matched features) are kept for :meth:`loss`. The teacher is not a submodule (its
    parameters are neither trained nor counted)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig | None = None,
                 task_loss: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.config = config or DistillConfig()
        if task_loss is None:
            from graphopt.bench.torch_backend import default_loss

            task_loss = default_loss
        self.task_loss = task_loss
        self._t: torch.Tensor | None = None
        self._feat: dict[str, list[torch.Tensor | None]] = {}
        self.skipped_features: list[str] = []
        self._hooks = []
        for name in self.config.features:
            try:
                sm, tm = student.get_submodule(name), teacher.get_submodule(name)
            except AttributeError:
                self.skipped_features.append(f"{name}: not in both models")
                continue
            slot: list[torch.Tensor | None] = [None, None]
            self._feat[name] = slot
            self._hooks.append(sm.register_forward_hook(lambda m, a, o, s=slot: s.__setitem__(0, o)))
            self._hooks.append(tm.register_forward_hook(lambda m, a, o, s=slot: s.__setitem__(1, o)))

    def forward(self, *inputs: torch.Tensor) -> Any:
        if not self.training:  # evaluation: the student alone (its loss is the task loss)
            self._t = None
            return self.student(*inputs)
        teacher = self.__dict__["teacher"]
        dev = inputs[0].device if inputs else None
        if dev is not None and next(teacher.parameters(), torch.empty(0)).device != dev:
            teacher.to(dev)
        with torch.no_grad():
            self._t = _first(teacher(*inputs)).detach()
        return self.student(*inputs)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.config
        out = _first(output)
        total = (1 - c.alpha) * self.task_loss(output, target) if c.alpha < 1 else out.new_zeros(())
        if self._t is not None and self.training:
            total = total + c.alpha * kd_loss(out, self._t, c.temperature)
            for name, (s, t) in self._feat.items():
                if s is not None and t is not None and s.shape == t.shape:
                    total = total + c.beta * F.mse_loss(s.float(), t.float())
        elif not self.training:  # evaluation reports the task loss
            total = self.task_loss(output, target)
        return total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def distill_fit(student: nn.Module, teacher: nn.Module, data: Any, config: Any = None, *,
                distill: DistillConfig | None = None, name: str = "distilled",
                loss: Callable[..., torch.Tensor] | None = None,
                example_inputs: tuple[torch.Tensor, ...] | None = None) -> Any:
    """Train ``student`` in place on ``data`` with ``teacher``'s logits (:func:`graphopt.bench.train.fit`
    with a distillation loss). Returns the :class:`~graphopt.bench.train.TrainResult`, with the
    distillation settings in ``result.extra["distill"]``."""
    from graphopt.bench.train import fit

    if example_inputs is not None:
        check_teacher(teacher, student, example_inputs)
    wrapped = Distilled(student, teacher, distill, loss)
    for n in wrapped.skipped_features:
        log.warning("feature matching skipped for %s", n)
    try:
        res = fit(wrapped, data, config, name=name, loss=wrapped.loss, example_inputs=example_inputs)
    finally:
        wrapped.close()
    res.extra["distill"] = {**wrapped.config.as_dict(), "skipped_features": wrapped.skipped_features}
    res.params, res.trainable_params = (sum(p.numel() for p in student.parameters()),
                                        sum(p.numel() for p in student.parameters() if p.requires_grad))
    return res
