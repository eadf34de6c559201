"""A minimal epoch loop over :class:`OrtTrainBackend` (the full harness with schedules and early
stopping drives the same backend through ``graphopt train --backend ort``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from graphopt.ort.backend import OrtTrainBackend

__all__ = ["train", "TrainResult"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    backend: OrtTrainBackend
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: train_loss, test_loss, accuracy, time_s

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def _batches(data: Any, batch_size: int, shuffle: bool, seed: int) -> Iterable[tuple[Any, torch.Tensor]]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset):
        g = torch.Generator().manual_seed(seed)
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=False)
    return data


def _split(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    *xs, y = batch
    return tuple(xs), y


def evaluate(backend: OrtTrainBackend, data: Any, batch_size: int = 256) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for cross-entropy, accuracy over ``data``."""
    total, loss_sum, correct = 0, 0.0, 0
    for batch in _batches(data, batch_size, False, 0):
        x, y = _split(batch)
        loss, out = backend.evaluate(x, y)
        n = y.shape[0]
        total += n
        loss_sum += loss * n
        if backend.loss == "cross_entropy":
            correct += int((out.argmax(1) == y).sum())
    res = {"loss": loss_sum / max(total, 1)}
    if backend.loss == "cross_entropy":
        res["accuracy"] = correct / max(total, 1)
    return res


def train(artifacts: str | Path | OrtTrainBackend, data: Any, *, epochs: int = 1, lr: float | None = None,
          batch_size: int = 32, threads: int | None = None, shuffle: bool = True, seed: int = 0,
          lr_schedule: Callable[[int], float] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ORT artifacts for ``epochs`` on ``data``.

    ``data``: ``(train, test)`` (datasets yielding ``(x, y)``, or iterables of ``(x, y)`` batches;
    ``test`` may be None) or just ``train``. ``lr``: constant learning rate (default: the one
    recorded at emit time); ``lr_schedule(step) -> lr`` overrides it per optimizer step.
    """
    backend = artifacts if isinstance(artifacts, OrtTrainBackend) else OrtTrainBackend(artifacts, threads=threads)
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], torch.Tensor):
        train_data, test_data = data
    else:
        train_data, test_data = data, None
    base_lr = lr if lr is not None else float(backend.manifest["optimizer"]["lr"])
    result = TrainResult(backend)
    step = 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum, n = 0.0, 0
        for batch in _batches(train_data, batch_size, shuffle, seed + epoch):
            x, y = _split(batch)
            step_lr = lr_schedule(step) if lr_schedule else base_lr
            loss = backend.train_step(x, y, step_lr)
            loss_sum += loss * y.shape[0]
            n += y.shape[0]
            step += 1
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(n, 1), "steps": step,
                               "time_s": time.perf_counter() - t0}
        if test_data is not None:
            ev = evaluate(backend, test_data)
            rec["test_loss"] = ev["loss"]
            if "accuracy" in ev:
                rec["test_accuracy"] = ev["accuracy"]
        log.info("epoch %d: %s", epoch + 1, rec)
        result.history.append(rec)
        if on_epoch:
            on_epoch(rec)
    return result
