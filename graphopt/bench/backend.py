"""The training-backend interface shared by the PyTorch harness and the ONNX Runtime runner.

The training loop (schedules, early stopping, metrics, progress) is written once against this
interface; a backend only knows how to take one optimizer step and evaluate one batch.
"""

from __future__ import annotations

import abc
from typing import Callable, ClassVar

import torch

from graphopt.plugins import PluginRegistry

__all__ = ["TrainBackend", "register_backend", "unregister_backend", "backend_names", "get_backend", "create_backend", "ENTRY_POINT_GROUP"]


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


# Backends are found through the entry-point group ``graphopt.backends`` (built-ins ``torch`` and
# ``ort``, and user packages alike) or registered at run time with :func:`register_backend`. An entry
# point names a factory:
#     factory(module: nn.Module, config: TrainConfig, *, loss, example_inputs) -> TrainBackend
# (TrainConfig: graphopt.bench.train).
ENTRY_POINT_GROUP = "graphopt.backends"
_registry: PluginRegistry[Callable[..., TrainBackend]] = PluginRegistry(
    ENTRY_POINT_GROUP, "training backend", "unknown training backend '{name}'",
    lambda f: None if callable(f) else "not a callable factory")


def register_backend(name: str, factory: Callable[..., TrainBackend]) -> Callable[..., TrainBackend]:
    """Register a training-backend factory at run time under ``name`` (overrides an entry point)."""
    return _registry.register(name, factory)


def unregister_backend(name: str) -> None:
    """Remove a run-time registration (tests)."""
    _registry.unregister(name)


def backend_names() -> list[str]:
    """Names of every training backend, registered or installed, without importing any of them."""
    return _registry.names()


def get_backend(name: str) -> Callable[..., TrainBackend]:
    """The factory registered as ``name`` (imported on first use)."""
    return _registry.get(name)


def create_backend(name: str, module, config, *, loss=None, example_inputs=None) -> TrainBackend:
    """Build the backend registered as ``name`` for ``module`` with the training ``config``."""
    return get_backend(name)(module, config, loss=loss, example_inputs=example_inputs)
