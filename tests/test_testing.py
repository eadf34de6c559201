"""graphopt.testing: the helpers shipped for pass authors behave as documented."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.testing import (
    assert_exact, assert_graph_equal, graph_structure, randomize_state, run_pass, write_model_file,
)


class A(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3)
        self.second = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.second(self.first(x)))


class SameStructureOtherNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.n = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.n(self.c(x)))


class OtherOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.n = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.n(torch.relu(self.c(x)))


X = (torch.randn(2, 3, 8, 8),)


def test_graph_structure_ignores_names_but_not_ops_or_hyperparameters():
    gm = graphopt.capture(A().eval(), X)
    assert_graph_equal(gm, SameStructureOtherNames(), X)
    with pytest.raises(AssertionError, match="graph structures differ") as info:
        assert_graph_equal(gm, OtherOrder(), X)
    assert "-%" in str(info.value) and "+%" in str(info.value)  # a unified diff
    wider = SameStructureOtherNames()
    wider.c = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(AssertionError):
        assert_graph_equal(gm, wider, X)
    assert graph_structure(gm)[0].startswith("%0 = placeholder")


def test_assert_exact_reports_what_differs():
    torch.manual_seed(0)
    a = A().eval()
    b = A().eval()
    b.load_state_dict(a.state_dict())
    assert_exact(b, a, X, params=True)
    assert_exact(b, a, X, params=True, train=True)
    with torch.no_grad():
        b.second.running_mean += 1.0  # eval mode only
    with pytest.raises(AssertionError, match="eval: outputs"):
        assert_exact(b, a, X)
    with pytest.raises(AssertionError, match="train: running statistics") as info:
        assert_exact(b, a, X, train=True)  # train-mode outputs use batch statistics: only the update differs
    assert "train: outputs" not in str(info.value)


def test_randomize_state_changes_every_float_tensor():
    m = A()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert randomize_state(m, seed=1) is m
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k, v in before.items() if v.is_floating_point()}


def test_write_model_file_and_run_pass(tmp_path):
    path = write_model_file(tmp_path / "proj")
    spec = graphopt.load_model_file(str(path))
    gm, rec = run_pass("channels_last", spec.module.eval(), spec.example_inputs)
    assert rec.modified and rec.verification.status == "passed"
