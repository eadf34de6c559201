"""channels_last (EXACT): the full pass test template."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from tests.helpers import assert_idempotent, count_calls, run_pass


def test_rewrites_inputs_and_conv_weights(small_cnn):
    module, inputs = small_cnn
    gm0 = graphopt.capture(module, inputs)
    assert count_calls(gm0, "contiguous") == 0
    gm, rec = run_pass("channels_last", module, inputs)
    assert rec.modified
    assert count_calls(gm, "contiguous") == 1
    assert rec.notes == {"inputs_converted": 1, "weights_converted": 2}
    assert gm.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert gm.meta["graphopt"]["memory_format"] == "channels_last"
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)
    assert rec.verification.status == "passed"
    assert rec.verification.details["input_grad_metric"] == "rel_l2_error"
    assert rec.verification.details["input_grad_error"] < 1e-5


def test_gradient_check_falls_back_to_float64_when_relu_masks_flip():
    """Two graphs computing the same function, but rounding differently in float32, so that
    ReLU masks near zero flip: the float32 gradient check fails, float64 settles it."""
    from graphopt.verify import Verification, _check_grads

    class A(nn.Module):
        def forward(self, x):
            return torch.relu((x + 0.7) - 1.0).sum(1)

    class B(nn.Module):
        def forward(self, x):
            return torch.relu(x - 0.3).sum(1)

    torch.manual_seed(0)
    x = 0.3 + 1e-6 * torch.randn(4, 256)  # right at the kink: float32 rounding flips ~100 masks
    ver = Verification("passed", "exact")
    details = _check_grads(A(), B(), (x,), ver, 1e-4)
    assert details["input_grad_metric"] == "max_rel_error (float64)"
    assert ver.status == "passed"


def test_declines_models_without_convolutions():
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    gm, rec = run_pass("channels_last", module, (torch.randn(2, 4),))
    assert not rec.modified
    assert rec.declined == [{"target": "graph", "reason": rec.declined[0]["reason"]}]
    assert "no 2-D convolution" in rec.declined[0]["reason"]
    assert count_calls(gm, "contiguous") == 0


def test_declines_non_4d_inputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x, scale):
            return self.conv(x) * scale.view(1, -1, 1, 1)

    gm, rec = run_pass("channels_last", M().eval(), (torch.randn(1, 3, 8, 8), torch.randn(4)))
    assert rec.modified
    assert [d["target"] for d in rec.declined] == ["scale"]
    assert "1-D" in rec.declined[0]["reason"]


def test_idempotent(small_cnn):
    module, inputs = small_cnn
    gm, _ = run_pass("channels_last", module, inputs)
    assert_idempotent("channels_last", gm, inputs)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "timm:efficientnet_b0"])
def test_real_architectures(zoo, name):
    module = zoo(name)
    x = torch.randn(2, 3, 64, 64)
    gm, rec = run_pass("channels_last", module, (x,))
    assert rec.modified and rec.verification.status == "passed"
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
