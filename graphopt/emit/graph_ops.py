"""graphopt's own versions of functions that torch.fx keeps as opaque calls in common models.

``graph.json`` may name only allowlisted functions. A few library functions that torch.fx
records as single calls (``torch.fx.wrap``) appear in popular architectures; for those, the
description names the graphopt function here instead, which computes the same thing with the
same random-number use (checked in tests against the original). :data:`EQUIVALENTS` maps the
library function's qualified name to ours.
"""

from __future__ import annotations

import torch

__all__ = ["stochastic_depth", "EQUIVALENTS"]


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth (BSD-3-Clause), without its API-usage logging."""
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


# library function (module.qualname) -> graphopt's equivalent (module.qualname)
EQUIVALENTS = {
    "torchvision.ops.stochastic_depth.stochastic_depth": "graphopt.emit.graph_ops.stochastic_depth",
}
