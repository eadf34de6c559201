"""Early-bird tickets: prune during training, as soon as the channel mask settles.

You et al. (ICLR 2020, "Drawing Early-Bird Tickets") observed that the channels a network will
keep, ranked by BatchNorm scale, are decided early in training. After every evaluation
(``eval_every_steps``, or each epoch) :func:`early_bird_fit` draws the global mask that keeps
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

__all__ = ["channel_mask", "mask_distance", "early_bird_fit"]

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


def early_bird_fit(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], data: Any, config: Any, *,
                   ratio: float = 0.5, threshold: float = 0.1, window: int = 3, name: str = "early-bird",
                   loss: Callable[..., torch.Tensor] | None = None, round_to: int = 1) -> Any:
    """Train ``module`` with ``config``; switch to the physically pruned model at the early-bird
    ticket. Returns the :class:`~graphopt.bench.train.TrainResult` (history across the switch;
    ``result.extra["early_bird"]`` says when it switched, the mask distances, MACs before/after);
    the trained model is ``result.backend.module``."""
    import graphopt
    from graphopt.bench.train import Trainer, _progress

    progress = _progress(config.progress)
    masks: deque[torch.Tensor] = deque(maxlen=window)
    info: dict[str, Any] = {"ratio": ratio, "threshold": threshold, "window": window, "distances": [],
                            "switched": False}
    try:
        trainer = Trainer(name, module, data, config, loss=loss, example_inputs=example_inputs, progress=progress)
        while not trainer.done:
            recs = trainer.run_epoch()
            if info["switched"] or trainer.done or not recs:
                continue
            masks.append(channel_mask(trainer.backend.module, ratio))
            if len(masks) < 2:
                continue
            dist = max(mask_distance(masks[-1], m) for m in list(masks)[:-1])
            info["distances"].append({"epoch": recs[-1].epoch, "distance": dist})
            if len(masks) < window or dist >= threshold:
                continue
            t0 = time.perf_counter()
            current = trainer.backend.module
            current.eval()
            pruned, report = graphopt.optimize(current, example_inputs, [
                f"prune:ratio={ratio},criterion=bn_scale,scope=global,round_to={round_to}"], verify=False)
            before, after = report.before.macs, report.after.macs
            pruned.train()
            new = Trainer(name, pruned, trainer.splits, config, loss=loss, example_inputs=example_inputs,
                          progress=progress)
            cost = time.perf_counter() - t0
            for attr in ("step", "epoch", "done", "stopper", "_wall_start"):
                setattr(new, attr, getattr(trainer, attr))
            new._train_time = trainer._train_time + cost  # the switch is paid for in training time
            res = trainer.result
            res.backend = new.backend
            res.params, res.trainable_params = (sum(p.numel() for p in pruned.parameters()),
                                                sum(p.numel() for p in pruned.parameters() if p.requires_grad))
            new.result = res
            info.update({"switched": True, "epoch": recs[-1].epoch, "step": trainer.step,
                         "train_time_s": new._train_time, "switch_cost_s": cost, "distance": dist,
                         "macs_before": before, "macs_after": after,
                         "groups_pruned": len(report.records[0].rewrites)})
            log.info("early-bird ticket at epoch %s (mask distance %.3f): MACs %d -> %d", recs[-1].epoch, dist,
                     before, after)
            trainer = new
    finally:
        if progress is not None:
            progress.close()
    trainer.result.extra["early_bird"] = info
    return trainer.result
