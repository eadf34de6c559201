"""The training-backend interface shared by the PyTorch harness and the ONNX Runtime runner.

The training loop (schedules, early stopping, metrics, progress) is written once against this
interface; a backend only knows how to take one optimizer step and evaluate one batch.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

__all__ = ["TrainBackend", "BACKENDS", "create_backend"]


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


# Backends by name: "module:callable", where the callable is a factory
#     factory(module: nn.Module, config: TrainConfig, *, loss, example_inputs) -> TrainBackend
# (TrainConfig: graphopt.bench.train). Adding a backend is one line here.
BACKENDS: dict[str, str] = {
    "torch": "graphopt.bench.torch_backend:TorchBackend.from_config",
    "ort": "graphopt.ort.backend:OrtTrainBackend.from_config",
}


def create_backend(name: str, module, config, *, loss=None, example_inputs=None) -> TrainBackend:
    """Build the backend registered as ``name`` for ``module`` with the training ``config``."""
    import importlib

    from graphopt.errors import PassConfigError

    if name not in BACKENDS:
        raise PassConfigError(f"unknown training backend '{name}'", fix="choose one of " + ", ".join(BACKENDS))
    mod_name, _, attr = BACKENDS[name].partition(":")
    obj = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj(module, config, loss=loss, example_inputs=example_inputs)
