"""The cost model: MACs at the aten level, parameters once, totals on real architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt


def test_conv_linear_matmul_macs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.fc = nn.Linear(4 * 8 * 8, 5)

        def forward(self, x):
            y = self.dw(self.conv(x))
            z = y.flatten(1)
            return self.fc(z) + (z @ z.t()).sum()

    gm = graphopt.capture(M(), (torch.randn(2, 3, 8, 8),))
    by = {n.name: n.meta["cost"].macs for n in gm.graph.nodes}
    assert by["conv"] == 2 * 4 * 8 * 8 * 3 * 9
    assert by["dw"] == 2 * 4 * 8 * 8 * 1 * 9
    assert by["fc"] == 2 * 256 * 5
    assert by["matmul"] == 2 * 2 * 256
    cost = gm.meta["graphopt"]["cost"]
    assert cost.macs == sum(by.values())
    assert cost.params == sum(p.numel() for p in M().parameters())
    assert cost.backward_macs == 2 * cost.macs


def test_shared_parameters_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    gm = graphopt.capture(Tied(), (torch.randn(1, 4),))
    assert gm.meta["graphopt"]["cost"].params == 20


@pytest.mark.zoo
def test_resnet50_matches_published_costs(zoo):
    gm = graphopt.capture(zoo("resnet50"), (torch.randn(1, 3, 224, 224),))
    cost = gm.meta["graphopt"]["cost"]
    assert cost.macs == pytest.approx(4.1e9, rel=0.02)
    assert cost.params == pytest.approx(25.6e6, rel=0.02)
    assert cost.coverage["fraction"] == 1.0
