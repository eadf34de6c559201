"""Tests of the fold_bn plugin, written with graphopt.testing (the template every pass follows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.testing import (
    assert_exact, assert_graph_equal, assert_idempotent, count_modules, randomize_state, run_pass, write_model_file,
)
from graphopt_fold_bn import FoldBatchNorm


class Net(nn.Module):
    """conv-bn-relu x2 and a conv whose output feeds two users (declined)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        y = self.conv3(x)
        x = self.bn3(y) + y
        return self.fc(x.mean((2, 3)))


class Expected(nn.Module):
    """What the rewrite should look like: bn1 and bn2 gone, conv2 with a bias, bn3 kept."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        y = self.conv3(x)
        x = self.bn3(y) + y
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(2, 3, 16, 16),)


def test_registered_through_its_entry_point():
    cls = graphopt.available_passes()["fold_bn"]
    assert cls is FoldBatchNorm
    assert (cls.semantics, cls.training) == (graphopt.Semantics.EXACT, "changes")


def test_folds_conv_bn_pairs_and_declines_the_rest(net):
    model, x = net
    randomize_state(model, seed=1)  # trained-looking BatchNorm statistics: folding must use them
    gm, rec = run_pass("fold_bn", model, x)
    assert rec.modified and rec.notes == {"folded": 2}
    assert count_modules(gm, nn.BatchNorm2d) == 1
    assert rec.declined == [{"target": "bn3", "reason": "the conv's output has 2 users"}]
    gm.graph.lint()
    assert_graph_equal(gm, Expected(), x)
    assert_exact(gm, model, x)  # outputs and input gradients, eval mode
    ver = rec.verification
    assert ver.status == "passed" and ver.training == "changes"
    checks = {c["check"]: c for c in ver.checks}
    assert checks["eval, randomized state, second batch: outputs"]["value"] < 1e-5
    assert "re-run" in ver.details["randomized_state"]  # the pass transforms weights


def test_training_changes(net):
    """In train mode the folded graph no longer normalises with batch statistics."""
    model, x = net
    randomize_state(model, seed=1)
    gm, _ = run_pass("fold_bn", model, x)
    with pytest.raises(AssertionError, match="train: outputs"):
        assert_exact(gm, model, x, train=True)


def test_idempotent_and_excluded(net):
    model, x = net
    gm, _ = run_pass("fold_bn", model, x)
    assert_idempotent("fold_bn", gm, x)
    gm2, rec = run_pass("fold_bn:exclude=bn1", model, x)
    assert rec.notes == {"folded": 1} and {"target": "bn1", "reason": "excluded"} in rec.declined


def test_no_batchnorm_no_change():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm, rec = run_pass(FoldBatchNorm(), model, (torch.randn(1, 3, 8, 8),))
    assert not rec.modified and rec.verification.status == "skipped"


def test_cli_with_a_model_file(tmp_path, capsys):
    from graphopt.cli import main

    path = write_model_file(tmp_path)
    code = main(["optimize", str(path), "-p", "fold_bn", "-o", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "fold_bn" in out and "verified" in out


@pytest.mark.zoo
@pytest.mark.parametrize("name, folded", [("resnet18", 20), ("mobilenet_v2", 52)])
def test_real_architectures(name, folded):
    from graphopt import zoo

    torch.manual_seed(0)
    model = zoo.build(name).eval()
    randomize_state(model, seed=0)
    x = (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass("fold_bn", model, x)
    assert rec.notes["folded"] == folded and count_modules(gm, nn.BatchNorm2d) == 0
    assert rec.verification.status == "passed", rec.verification.message
    assert_exact(gm, model, x)
    assert sum(p.numel() for p in gm.parameters()) < sum(p.numel() for p in model.parameters())
