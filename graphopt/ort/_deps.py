"""Lazy imports of the optional ``ort`` extra (onnx + onnxruntime-training).

graphopt works without them; the features that need them call :func:`require_onnx` /
:func:`require_ort_training`, which raise a one-line :class:`MissingDependencyError` saying
exactly what to install.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from graphopt.errors import MissingDependencyError

__all__ = ["INSTALL_HINT", "require_onnx", "require_ort", "require_ort_training"]

INSTALL_HINT = ("pip install 'graphopt[ort]' (onnx 1.17 + onnxruntime-training-cpu 1.19; do not also install "
                "plain onnxruntime, it replaces the training build)")


def _import(name: str, feature: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependencyError(f"{feature} needs the optional package '{name.split('.')[0]}', which "
                                     f"cannot be imported ({exc})", fix=INSTALL_HINT) from exc


def require_onnx(feature: str = "ONNX export") -> ModuleType:
    """The ``onnx`` module, or a MissingDependencyError naming the install command."""
    return _import("onnx", feature)


def require_ort(feature: str = "ONNX Runtime inference") -> ModuleType:
    """The ``onnxruntime`` module (quiet: warnings and errors only)."""
    ort = _import("onnxruntime", feature)
    if not getattr(require_ort, "_quiet", False):
        ort.set_default_logger_severity(3)
        require_ort._quiet = True  # type: ignore[attr-defined]
    return ort


def require_ort_training(feature: str = "ONNX Runtime training") -> ModuleType:
    """``onnxruntime.training`` (artifacts + api), or a MissingDependencyError."""
    require_onnx(feature)
    require_ort(feature)
    training = _import("onnxruntime.training", feature)
    for sub in ("onnxruntime.training.artifacts", "onnxruntime.training.api"):
        try:
            importlib.import_module(sub)
        except ImportError as exc:  # e.g. plain onnxruntime installed over the training wheel
            raise MissingDependencyError(
                f"{feature} needs onnxruntime-training, but '{sub}' cannot be imported ({exc}); plain "
                "onnxruntime was probably installed over the training build",
                fix="pip uninstall -y onnxruntime onnxruntime-training-cpu && " + INSTALL_HINT) from exc
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    return training
