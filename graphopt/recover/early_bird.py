"""Early-bird tickets: prune during training, as soon as the channel mask settles.

You et al. (ICLR 2020, "Drawing Early-Bird Tickets") observed that the channels a network will
keep, ranked by BatchNorm scale, are decided early in training. After every evaluation
(``eval_every_steps``, or each epoch) :class:`EarlyBird` draws the global mask that keeps
the ``1 - ratio`` channels with the largest ``|gamma|`` (conv output-channel L1 norms, normalised
per layer, where a model has no BatchNorm) and compares it with the previous ``window - 1``
masks. When the largest normalised Hamming distance is below ``threshold``, the model is
physically pruned (:func:`graphopt.prune.prune_structured`, ``criterion=bn_scale``,
``scope=global``) and training continues on the smaller model from the same step, with the
same learning-rate schedule. The report says when it switched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["channel_mask", "mask_distance", "early_bird_fit", "EarlyBird"]

log = logging.getLogger(__name__)


def channel_mask(module: nn.Module, ratio: float) -> torch.Tensor:
    """Global keep-mask over all channels (BatchNorm scales, else conv output-channel L1 norms)."""
    scores = [m.weight.detach().abs().flatten().float() for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    if not scores:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                s = m.weight.detach().abs().flatten(1).sum(1).float()
                scores.append(s / s.mean().clamp_min(1e-12))
    if not scores:
        return torch.zeros(0, dtype=torch.bool)
    flat = torch.cat(scores)
    k = int(flat.numel() * ratio)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k:
        mask[flat.argsort()[:k]] = False
    return mask


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance of two masks."""
    return float((a != b).float().mean()) if a.numel() else 0.0


class EarlyBird:
    """The early-bird check, attached to a :class:`~graphopt.bench.train.Trainer` (``attach``):
    after each of its evaluations (each epoch, or every ``eval_every_steps``) the global mask is
    drawn and compared with the previous ``window - 1``; at the ticket the trainer's backend is
    replaced, mid-epoch if need be, by one training the physically pruned model (fresh optimizer
    state, same step, same learning-rate schedule). The pruning time is added to the trainer's
    training time. Attaching to a plain Trainer lets a benchmark interleave an early-bird run with
    other runs epoch by epoch."""

    def __init__(self, example_inputs: tuple[torch.Tensor, ...], *, ratio: float = 0.5, threshold: float = 0.1,
                 window: int = 3, round_to: int = 1, loss: Callable[..., torch.Tensor] | None = None):
        self.example_inputs = example_inputs
        self.ratio, self.threshold, self.window, self.round_to, self.loss = ratio, threshold, window, round_to, loss
        self.masks: deque[torch.Tensor] = deque(maxlen=window)
        self.info: dict[str, Any] = {"ratio": ratio, "threshold": threshold, "window": window, "distances": [],
                                     "switched": False}

    def attach(self, trainer: Any) -> Any:
        trainer.on_record = self
        trainer.result.extra["early_bird"] = self.info
        return trainer

    def __call__(self, trainer: Any, rec: Any) -> None:
        import graphopt
        from graphopt.bench.backend import create_backend

        if self.info["switched"] or trainer.done:
            return
        self.masks.append(channel_mask(trainer.backend.module, self.ratio))
        if len(self.masks) < 2:
            return
        dist = max(mask_distance(self.masks[-1], m) for m in list(self.masks)[:-1])
        self.info["distances"].append({"epoch": rec.epoch, "step": rec.step, "distance": dist})
        if len(self.masks) < self.window or dist >= self.threshold:
            return
        if trainer.step >= trainer.steps_per_epoch * trainer.config.epochs:
            return  # the last evaluation: nothing left to train on the smaller model
        t0 = time.perf_counter()
        current = trainer.backend.module
        was = current.training
        current.eval()
        pruned, report = graphopt.optimize(current, self.example_inputs, [
            f"prune:ratio={self.ratio},criterion=bn_scale,scope=global,round_to={self.round_to}"], verify=False)
        current.train(was)
        before, after = report.before.macs, report.after.macs
        pruned.train()
        trainer.backend = create_backend(trainer.config.backend, pruned, trainer.config, loss=self.loss,
                                         example_inputs=self.example_inputs)
        cost = time.perf_counter() - t0
        trainer._train_time += cost  # the switch is paid for in training time
        res = trainer.result
        res.backend = trainer.backend
        res.params, res.trainable_params = (sum(p.numel() for p in pruned.parameters()),
                                            sum(p.numel() for p in pruned.parameters() if p.requires_grad))
        self.info.update({"switched": True, "epoch": rec.epoch, "step": trainer.step,
                          "train_time_s": trainer._train_time, "switch_cost_s": cost, "distance": dist,
                          "macs_before": before, "macs_after": after,
                          "groups_pruned": len(report.records[0].rewrites)})
        log.info("early-bird ticket at epoch %s (mask distance %.3f): MACs %d -> %d", rec.epoch, dist, before, after)


def early_bird_fit(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], data: Any, config: Any, *,
                   ratio: float = 0.5, threshold: float = 0.1, window: int = 3, name: str = "early-bird",
                   loss: Callable[..., torch.Tensor] | None = None, round_to: int = 1) -> Any:
    """Train ``module`` with ``config``; switch to the physically pruned model at the early-bird
    ticket (checked at every evaluation: each epoch, or every ``config.eval_every_steps``).
    Returns the :class:`~graphopt.bench.train.TrainResult` (history across the switch;
    ``result.extra["early_bird"]`` says when it switched, the mask distances, MACs before/after);
    the trained model is ``result.backend.module``."""
    from graphopt.bench.train import Trainer, _progress

    progress = _progress(config.progress)
    try:
        trainer = Trainer(name, module, data, config, loss=loss, example_inputs=example_inputs, progress=progress)
        EarlyBird(example_inputs, ratio=ratio, threshold=threshold, window=window, round_to=round_to,
                  loss=loss).attach(trainer)
        while not trainer.done:
            trainer.run_epoch()
    finally:
        if progress is not None:
            progress.close()
    return trainer.result
