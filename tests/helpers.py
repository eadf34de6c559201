"""Shared test utilities for the pass test template of DESIGN.md."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

import graphopt
from graphopt.manager import PassRecord


def run_pass(pass_or_spec: Any, module: nn.Module | fx.GraphModule, inputs: tuple[torch.Tensor, ...],
             verify: bool = True) -> tuple[fx.GraphModule, PassRecord]:
    """Capture (if needed) and run one pass through the PassManager; returns (gm, its record)."""
    gm, report = graphopt.optimize(module, inputs, [pass_or_spec], verify=verify)
    return gm, report.records[0]


def count_modules(gm: fx.GraphModule, types: type | tuple[type, ...]) -> int:
    """call_module nodes calling a module of ``types``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), types))


def count_calls(gm: fx.GraphModule, target: Any) -> int:
    """call_function nodes with ``target`` or call_method nodes named ``target``."""
    return sum(1 for n in gm.graph.nodes if (n.op == "call_function" and n.target is target)
               or (n.op == "call_method" and n.target == target))


def assert_idempotent(pass_or_spec: Any, gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    code = gm.code
    gm2, rec = run_pass(pass_or_spec, gm, inputs)
    assert not rec.modified, f"second run modified the graph: {rec.rewrites[:3]}"
    assert gm2.code == code


def outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return module(*inputs)


def train_steps(module: nn.Module, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, steps: int = 5,
                lr: float = 0.01) -> list[float]:
    """A few SGD steps on a fixed batch; returns the losses (they should fall)."""
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = module(*inputs)
        loss = nn.functional.cross_entropy(out, target) if target.dtype == torch.long else nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
