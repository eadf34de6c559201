"""Real architectures from torchvision and timm, built offline with random weights.

The torchvision wheel on PyPI is a CUDA build. On a CPU-only torch its Python model
definitions work, but two private registration modules fail to import; they only register
C++ op metadata (nms, roi_align, ...) that classification models never call. When (and only
when) the plain import fails, they are replaced by empty modules and the import retried.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from torch import nn

from graphopt.errors import MissingDependencyError

__all__ = ["import_torchvision", "torchvision_model", "timm_model", "build"]

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> types.ModuleType:
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("torchvision is not installed",
                                     fix="pip install 'graphopt[zoo]'") from exc
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _STUBS:
            sys.modules.setdefault(name, types.ModuleType(name))
        return importlib.import_module("torchvision")


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    tv = import_torchvision()
    return tv.models.get_model(name, weights=None, **kwargs)


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    import_torchvision()  # timm imports torchvision
    try:
        import timm
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("timm is not installed", fix="pip install 'graphopt[zoo]'") from exc
    return timm.create_model(name, pretrained=False, **kwargs)


def build(spec: str, **kwargs: Any) -> nn.Module:
    """``torchvision:resnet50`` / ``timm:efficientnet_b0`` / a bare torchvision name."""
    lib, _, name = spec.rpartition(":")
    if lib in ("", "torchvision", "tv"):
        return torchvision_model(name, **kwargs)
    if lib == "timm":
        return timm_model(name, **kwargs)
    raise ValueError(f"unknown model zoo '{lib}' (use torchvision: or timm:)")
