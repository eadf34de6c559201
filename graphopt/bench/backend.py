"""The training-backend interface shared by the PyTorch harness and the ONNX Runtime runner.

The training loop (schedules, early stopping, metrics, progress) is written once against this
interface; a backend only knows how to take one optimizer step and evaluate one batch.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

__all__ = ["TrainBackend"]


class TrainBackend(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def train_step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, lr: float) -> float:
        """One optimizer step on one batch at learning rate ``lr``; returns the batch loss."""

    @abc.abstractmethod
    def evaluate(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Eval-mode loss and outputs (a CPU tensor) for one batch; no parameter update."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current (trained) weights under the torch module's parameter/buffer names."""
