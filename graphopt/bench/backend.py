"""The training-backend interface shared by the PyTorch harness and the ONNX Runtime runner.

The training loop (schedules, early stopping, metrics, progress) is written once against this
interface; a backend only knows how to take one optimizer step and evaluate one batch.
"""

from __future__ import annotations

import abc
from importlib import metadata
from typing import Callable, ClassVar

import torch

__all__ = ["TrainBackend", "register_backend", "backend_names", "get_backend", "create_backend", "ENTRY_POINT_GROUP"]


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
_registry: dict[str, Callable[..., TrainBackend]] = {}


def register_backend(name: str, factory: Callable[..., TrainBackend]) -> Callable[..., TrainBackend]:
    """Register a training-backend factory at run time under ``name`` (overrides an entry point)."""
    if not callable(factory):
        raise TypeError("register_backend expects a callable factory")
    _registry[name] = factory
    return factory


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    """Names of every training backend, registered or installed, without importing any of them."""
    return sorted(set(_registry) | set(_entry_points()))


def get_backend(name: str) -> Callable[..., TrainBackend]:
    """The factory registered as ``name`` (imported on first use)."""
    from graphopt.errors import PassConfigError

    if name in _registry:
        return _registry[name]
    ep = _entry_points().get(name)
    if ep is None:
        names = backend_names()
        fix = ("choose one of " + ", ".join(names)) if names else \
            "no backend is installed: reinstall graphopt (pip install -e .) so its entry points exist"
        raise PassConfigError(f"unknown training backend '{name}'", fix=fix)
    try:
        factory = ep.load()
    except Exception as exc:  # a broken plug-in must not break the others
        raise PassConfigError(f"training backend '{name}' is installed but failed to load: "
                              f"{type(exc).__name__}: {exc}", fix="reinstall the package that provides it") from exc
    _registry[name] = factory
    return factory


def create_backend(name: str, module, config, *, loss=None, example_inputs=None) -> TrainBackend:
    """Build the backend registered as ``name`` for ``module`` with the training ``config``."""
    return get_backend(name)(module, config, loss=loss, example_inputs=example_inputs)
