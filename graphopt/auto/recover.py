"""Accuracy recovery after the automatic mode's pruning (``--target-time`` with a model file
``data()``): reconstruction on calibration batches, then a short distillation from the original.

1. **Reconstruction**: every layer whose input channels were removed is refit by least squares
   on its kept channels against the original's same layer (:func:`graphopt.recover.reconstruct_structured`,
   sequential, in graph order), then the model's outputs are regressed onto the original's on the
   same batches (:func:`graphopt.recover.refine_outputs`). No labels are used.
2. **Distillation**: ``epochs`` (default 1) of training with the original as teacher
   (:func:`graphopt.recover.distill_fit`: KL on logits at temperature 4, weight 0.9, plus 0.1 of
   the task loss), AdamW with a cosine learning rate over the run.

Accuracy (top-1 on ``data()``'s test set, up to ``eval_samples``) is measured for the original,
the pruned model, after reconstruction and after distillation; the rewritten module is changed in
place.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["recover_pruned", "top1"]

log = logging.getLogger(__name__)


def top1(module: nn.Module, test: Any, limit: int = 2048, batch: int = 256) -> float | None:
    """Top-1 accuracy of ``module`` on the first ``limit`` samples of ``test`` (None: no class labels)."""
    from graphopt.bench.data import as_tensors
    from graphopt.ir import eval_mode

    x, y = as_tensors(test, limit=limit)[:2]
    if y.dtype not in (torch.int64, torch.int32):
        return None
    hits = 0
    with torch.no_grad(), eval_mode(module):
        for i in range(0, int(y.shape[0]), batch):
            out = module(x[i:i + batch])
            out = out[0] if isinstance(out, (tuple, list)) else out
            hits += int((out.argmax(-1) == y[i:i + batch]).sum())
    return hits / max(int(y.shape[0]), 1)


def recover_pruned(original: nn.Module, pruned: nn.Module, prune_plan: Any, data: tuple[Any, Any], *,
                   calibration_batches: int = 8, batch_size: int = 64, epochs: int = 1, lr: float = 1e-3,
                   refine: int = 256, temperature: float = 4.0, alpha: float = 0.9,
                   loss: Callable[..., torch.Tensor] | None = None,
                   example_inputs: tuple[torch.Tensor, ...] | None = None, eval_samples: int = 2048,
                   seed: int = 0) -> dict[str, Any]:
    """Reconstruct ``pruned`` (in place) from ``original`` on calibration batches of ``data``'s
    training set, then distil for ``epochs`` (0: no distillation). Returns the report: accuracy at
    each step, reconstruction errors per layer, times."""
    from graphopt.bench.data import as_tensors
    from graphopt.bench.train import TrainConfig
    from graphopt.recover import distill_fit, reconstruct_structured, refine_outputs
    from graphopt.recover.distill import DistillConfig

    train, test = data
    out: dict[str, Any] = {"accuracy": {"original": top1(original, test, eval_samples),
                                        "pruned": top1(pruned, test, eval_samples)},
                           "test_samples": min(eval_samples, len(test))}
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x = as_tensors(train)[0]
    idx = torch.randperm(int(x.shape[0]), generator=g)[:calibration_batches * batch_size]
    calib = [(x[idx[i:i + batch_size]],) for i in range(0, len(idx), batch_size)]
    fits = []
    if prune_plan is not None:
        fits = reconstruct_structured(original, pruned, prune_plan, calib)
    if refine:
        fits.append(refine_outputs(original, pruned, calib, steps=refine))
    out["reconstruction"] = {"calibration_batches": len(calib), "layers": [f.as_dict() for f in fits],
                             "time_s": time.perf_counter() - t0}
    out["accuracy"]["reconstructed"] = top1(pruned, test, eval_samples)
    if epochs:
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr, schedule="cosine",
                          val_fraction=0.0, seed=seed)
        was = pruned.training
        res = distill_fit(pruned, original, (train, test), cfg, distill=DistillConfig(temperature=temperature,
                                                                                      alpha=alpha),
                          name="recover", loss=loss, example_inputs=example_inputs)
        pruned.train(was)
        out["distillation"] = {"epochs": epochs, "optimizer": "adamw", "lr": lr, "schedule": "cosine",
                               "temperature": temperature, "alpha": alpha, "train_time_s": res.train_time_s,
                               "steps": res.steps}
        out["accuracy"]["distilled"] = top1(pruned, test, eval_samples)
    log.info("recovery: %s", out["accuracy"])
    return out
