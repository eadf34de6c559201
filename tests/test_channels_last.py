"""channels_last (EXACT): the full pass test template."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.testing import assert_idempotent, count_calls, run_pass


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


class _OpaqueBlock(nn.Module):
    """Data-dependent control flow keeps this block opaque; its conv's weight is computed at run time
    (a weight_norm parametrization) and its code assumes the NCHW memory it was written for."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(c, c, 3, padding=1))
        self.proj = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        b, c, h, w = x.shape
        if h % 2 == 0:
            x = self.conv(x)
        x = self.proj(x)
        return x.view(b, c * h * w)[:, :c]  # a view of the whole sample: needs NCHW-contiguous memory


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = _OpaqueBlock(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))))


def test_opaque_submodule_is_left_as_it_was_and_the_rewrite_stays_exact(monkeypatch):
    # the fx front end (auto would capture this model whole with torch.export): opaque modules are the point
    import sys

    monkeypatch.setattr(sys.modules["graphopt.capture"], "_DEFAULT_FRONT_END", "fx")
    torch.manual_seed(0)
    module, x = _WithOpaque().eval(), torch.randn(2, 3, 8, 8)
    gm0 = graphopt.capture(module, (x,))
    assert set(gm0.meta["graphopt"]["opaque"]) == {"block"}
    gm, rec = run_pass("channels_last", module, (x,))
    assert rec.modified and rec.verification.status == "passed"
    assert rec.verification.value == 0.0  # exact to the bit: the opaque block computes as before
    assert gm.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not gm.block.proj.weight.is_contiguous(memory_format=torch.channels_last)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "opaque" in reasons["block.conv"] and "opaque" in reasons["block.proj"]
    assert any(r["target"] == "block" and "NCHW" in r["detail"] for r in rec.rewrites)
    torch.testing.assert_close(gm(x), module(x), rtol=0, atol=0)
    assert_idempotent("channels_last", gm, (x,))


def test_declines_a_traced_conv_whose_weight_is_computed_at_run_time():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3))).eval()
    x = torch.randn(1, 3, 8, 8)
    gm, rec = run_pass("channels_last", module, (x,))
    assert rec.modified and rec.verification.status == "passed"
    assert gm.get_submodule("0").weight.is_contiguous(memory_format=torch.channels_last)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "computed at run time" in reasons["1"]


@pytest.mark.zoo
def test_real_architecture_with_opaque_blocks(zoo):
    """timm's MobileViT through torch.fx: its transformer blocks stay opaque (a shape check used as
    control flow), and channels_last declines the convs inside them. (The default front end takes it
    whole through torch.export: see test_real_architecture_taken_whole_by_export.)"""
    torch.manual_seed(0)
    module = zoo("timm:mobilevit_xxs").eval()
    x = torch.randn(1, 3, 64, 64)
    gm, rec = run_pass("channels_last", graphopt.capture(module, (x,), capture="fx"), (x,))
    opaque = set(gm.meta["graphopt"]["opaque"])
    assert opaque and rec.modified and rec.verification.status == "passed"
    inside = {n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)
              and any(n.startswith(o + ".") for o in opaque)}
    declined = {d["target"] for d in rec.declined}
    assert inside and inside <= declined
    assert all(not gm.get_submodule(n).weight.is_contiguous(memory_format=torch.channels_last)
               or gm.get_submodule(n).weight.shape[2:] == (1, 1) for n in inside)
    torch.testing.assert_close(gm(x), module(x), rtol=1e-4, atol=1e-5)


@pytest.mark.zoo
def test_real_architecture_taken_whole_by_export(zoo):
    """The same MobileViT with the default front end: torch.fx would leave 74% of it opaque, so
    torch.export captures it whole and channels_last reaches every conv."""
    torch.manual_seed(0)
    module = zoo("timm:mobilevit_xxs").eval()
    x = torch.randn(1, 3, 64, 64)
    gm, rec = run_pass("channels_last", module, (x,))
    meta = gm.meta["graphopt"]
    assert meta["front_end"]["used"] == "export" and meta["cost"].coverage["fraction"] == 1.0
    assert rec.modified and rec.verification.status == "passed" and not rec.declined
    torch.testing.assert_close(gm(x), module(x), rtol=1e-4, atol=1e-5)
