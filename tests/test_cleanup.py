"""cleanup (EXACT): dead code, identities, unused modules; the full pass test template."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.testing import assert_idempotent, count_modules, run_pass


class Messy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ident = nn.Identity()
        self.drop0 = nn.Dropout(0.0)
        self.drop = nn.Dropout(0.3)
        self.unused = nn.Linear(3, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.ident(self.conv(x))
        torch.sigmoid(y) * 3  # dead code: result unused
        y = self.drop0(y) * 1
        y = y + 0
        y = y.float()  # already float32
        y = y.reshape(y.shape[0], 4, 8, 8)  # same shape
        y = torch.nn.functional.dropout(y, p=0.0, training=self.training)
        y = self.drop(y)
        return self.fc(y.mean((2, 3)))


def test_removes_identities_dead_code_and_unused_modules():
    torch.manual_seed(0)
    module = Messy().eval()
    x = torch.randn(2, 3, 8, 8)
    gm0 = graphopt.capture(module, (x,))
    assert count_modules(gm0, (nn.Identity, nn.Dropout)) == 3
    gm, rec = run_pass("cleanup", module, (x,))
    assert rec.modified
    assert count_modules(gm, nn.Identity) == 0
    assert count_modules(gm, nn.Dropout) == 1  # p=0.3 stays (declined)
    assert rec.declined == [{"target": "drop", "reason": "Dropout(p=0.3) is active in training; use the "
                             "drop_regularization pass to remove it"}]
    details = [r["detail"] for r in rec.rewrites]
    for expected in ("removed identity: nn.Identity", "removed identity: Dropout(p=0)", "removed identity: mul by 1",
                     "removed identity: add by 0", "removed identity: cast to float32 (already that dtype)",
                     "removed identity: reshape to the same shape", "removed identity: dropout(p=0)",
                     "removed dead code", "removed unused submodule"):
        assert expected in details, expected
    assert not hasattr(gm, "unused")
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.sigmoid not in ops
    gm.graph.lint()
    torch.testing.assert_close(gm(x), module(x))


def test_keeps_in_place_ops_without_users():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)  # result unused, but it mutates y
            return y

    x = torch.randn(3)
    gm, rec = run_pass("cleanup", InPlace(), (x,))
    assert not rec.modified
    torch.testing.assert_close(gm(x), x * 2 + 1)


def test_negative_clean_model_is_unchanged(small_cnn):
    module, inputs = small_cnn
    gm0 = graphopt.capture(module, inputs)
    gm, rec = run_pass("cleanup", module, inputs)
    assert not rec.modified and rec.rewrites == [] and gm.code == gm0.code


def test_idempotent():
    x = torch.randn(2, 3, 8, 8)
    gm, _ = run_pass("cleanup", Messy().eval(), (x,))
    assert_idempotent("cleanup", gm, (x,))


@pytest.mark.zoo
@pytest.mark.parametrize("name, size", [("timm:efficientnet_b0", 64), ("vit_b_16", 32)])
def test_real_architectures(zoo, name, size):
    kw = {"image_size": size} if name == "vit_b_16" else {}
    module = zoo(name, **kw)
    x = torch.randn(1, 3, size, size)
    gm, rec = run_pass("cleanup", module, (x,))
    assert rec.verification.status in ("passed", "skipped")
    assert count_modules(gm, nn.Identity) == 0
    torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)
