"""depthwise_separable: k x k conv -> depthwise + pointwise, SVD-factorised init, MACs/params reported."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.errors import VerificationError
from passes.depthwise_separable import factorize
from graphopt.testing import assert_idempotent, count_modules, run_pass


def _separable_weight(co: int, ci: int, k: int) -> torch.Tensor:
    """W[o, c] = P[o, c] * D[c]: exactly representable by a depthwise + pointwise pair."""
    return torch.randn(co, ci, 1, 1) * torch.randn(1, ci, k, k)


def _n_dw(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
               and gm.get_submodule(n.target).groups > 1)


class Mixed(nn.Module):
    """stem 3->16 (too few channels), 3x3 16->32 (rewritten), depthwise 3x3 (grouped), 1x1, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        x = self.pw(torch.relu(self.dw(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    return Mixed().eval(), (torch.randn(2, 3, 12, 12),)


def test_factorize_is_exact_for_separable_weights_and_optimal():
    torch.manual_seed(0)
    w = _separable_weight(8, 5, 3)
    d, p, err = factorize(w)
    torch.testing.assert_close(p * d.reshape(1, 5, 3, 3), w, rtol=1e-5, atol=1e-6)
    assert err.max() < 1e-6
    # for a general slice, the result is the rank-1 truncated SVD: error^2 = 1 - s1^2 / sum(s^2)
    w = torch.randn(8, 5, 3, 3)
    _, _, err = factorize(w)
    s = torch.linalg.svdvals(w[:, 2].reshape(8, 9).double())
    torch.testing.assert_close(err[2], (1 - s[0] ** 2 / (s ** 2).sum()).sqrt())


def test_rewrites_standard_conv_declines_the_rest(mixed):
    model, x = mixed
    gm0 = graphopt.capture(model, x)
    assert count_modules(gm0, nn.Conv2d) == 4 and _n_dw(gm0) == 1
    gm, rec = run_pass("depthwise_separable:budget=2", model, x)
    assert rec.modified
    assert count_modules(gm, nn.Conv2d) == 5 and _n_dw(gm) == 2
    gm.graph.lint()
    assert isinstance(gm.get_submodule("conv.dw"), nn.Conv2d) and gm.get_submodule("conv.dw").groups == 16
    torch.testing.assert_close(gm.get_submodule("conv.pw").bias, model.conv.bias)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert set(reasons) == {"stem", "dw", "pw"}
    assert "min_channels" in reasons["stem"] and "depthwise conv" in reasons["dw"] and "1x1" in reasons["pw"]
    (rw,) = rec.rewrites
    data = rw["data"]
    assert data["macs_before"] == 32 * 16 * 9 * 2 * 144 and data["macs_after"] == (16 * 9 + 32 * 16) * 2 * 144
    assert data["params_before"] == 32 * 16 * 9 + 32 and data["params_after"] == 16 * 9 + 32 * 16 + 32
    _, _, per_channel = factorize(model.conv.weight)
    assert 0 < data["reconstruction_error"] < 1
    assert per_channel.min() <= data["reconstruction_error"] <= per_channel.max()
    assert rec.notes["mac_reduction"] == round(data["macs_before"] / data["macs_after"], 3)
    # measured output error vs the budget, plus the random-init comparison from check()
    ver = rec.verification
    assert ver.metric == "rel_l2_error" and ver.value == pytest.approx(ver.details["output_rel_l2_error_factorize"])
    assert "output_rel_l2_error_random_init" in ver.details


@pytest.mark.parametrize("stride,padding,dilation,mode", [
    (1, 1, 1, "zeros"), (2, 1, 1, "zeros"), (1, 2, 2, "zeros"), (2, 0, 1, "zeros"), (1, 1, 1, "reflect"),
    (1, "same", 1, "zeros"),
])
def test_separable_weights_rewrite_exactly(stride, padding, dilation, mode):
    """When W is exactly separable the rewrite reproduces the conv to float precision: this checks
    stride/padding/dilation/padding-mode handling and the bias."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    with torch.no_grad():
        conv.weight.copy_(_separable_weight(24, 16, 3))
    model = nn.Sequential(conv, nn.ReLU()).eval()
    x = (torch.randn(2, 16, 11, 11),)
    gm, rec = run_pass("depthwise_separable:budget=1e-5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    assert rec.rewrites[0]["data"]["reconstruction_error"] < 1e-6
    assert rec.verification.value < 1e-6
    assert rec.verification.details["output_rel_l2_error_random_init"] > 0.5


@pytest.mark.parametrize("between", ["bn", "bn_relu", "bn_relu6"])
def test_between_mobilenet_style(between):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.copy_(_separable_weight(m.out_channels, 16, 3))
    x = (torch.randn(2, 16, 8, 8),)
    gm, rec = run_pass(f"depthwise_separable:budget=1e-4,between={between}", model, x)
    assert count_modules(gm, nn.BatchNorm2d) == 2
    acts = count_modules(gm, (nn.ReLU, nn.ReLU6))
    assert acts == 1 + (2 if between != "bn" else 0)
    # the activation sits in its linear region on the calibration data (the example inputs here)
    assert rec.verification.value < 1e-5
    if between != "bn":
        assert rec.notes["calibration_batches"] == 4
        # outside the calibrated range it clips: 10x larger inputs differ
        big = (10 * x[0],)
        with torch.no_grad():
            err = ((gm.eval()(*big) - model(*big)).norm() / model(*big).norm()).item()
        assert err > 1e-3


def test_init_random_and_budget(mixed):
    model, x = mixed
    gm, rec = run_pass("depthwise_separable:init=random,budget=10", model, x)
    assert rec.modified and rec.rewrites[0]["data"]["reconstruction_error"] is None
    assert "reconstruction_error" not in rec.notes
    with pytest.raises(VerificationError, match="depthwise_separable"):
        run_pass("depthwise_separable:budget=0.001", model, x)


def test_negative_nothing_to_separate():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 8, 1), nn.Conv1d(8, 8, 3)).eval()

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            y = self.m[1](self.m[0](x))
            return self.m[2](y.flatten(2))

    x = (torch.randn(1, 16, 6, 6),)
    gm0 = graphopt.capture(Flat().eval(), x)
    gm, rec = run_pass("depthwise_separable", Flat().eval(), x)
    assert not rec.modified and gm.code == gm0.code
    assert [d["reason"].split(":")[0] for d in rec.declined] == ["depthwise conv", "1x1 conv", "Conv1d"]


def test_idempotent(mixed):
    model, x = mixed
    gm, _ = run_pass("depthwise_separable:budget=2", model, x)
    assert_idempotent("depthwise_separable:budget=2", gm, x)


def test_globs_and_kernel_sizes(mixed):
    model, x = mixed
    _, rec = run_pass("depthwise_separable:budget=2,exclude=conv", model, x)
    assert not rec.modified and any("exclude" in d["reason"] for d in rec.declined)
    _, rec = run_pass("depthwise_separable:budget=2,kernel_sizes=5|7", model, x)
    assert not rec.modified and any("kernel 3x3 not in" in d["reason"] for d in rec.declined)
    _, rec = run_pass("depthwise_separable:budget=2,min_channels=3,include=stem|conv", model, x)
    assert [r["target"] for r in rec.rewrites] == ["stem", "conv"]


def test_emitted_module_reloads(mixed, tmp_path):
    model, x = mixed
    gm, report = graphopt.optimize(model, x, ["depthwise_separable:budget=2,between=bn_relu"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    net = graphopt.load(tmp_path / "out")
    torch.testing.assert_close(net.eval()(*x), gm.eval()(*x))
    assert net.get_submodule("conv.dw").groups == 16
    net.train()
    net(*x).sum().backward()
    assert net.get_submodule("conv.dw").weight.grad is not None


def test_cli(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def model():
            return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 2))

        def example_inputs():
            return (torch.randn(2, 16, 4, 4),)
    """))
    rep = tmp_path / "r.json"
    assert main(["optimize", str(f), "-p", "depthwise_separable:budget=5", "-o", str(tmp_path / "o"),
                 "--report", str(rep)]) == 0
    rec = json.loads(rep.read_text())["passes"][0]
    assert rec["notes"]["layers"] == 1 and rec["verification"]["metric"] == "rel_l2_error"
    # over budget: exit 1, nothing written
    assert main(["optimize", str(f), "-p", "depthwise_separable:budget=0", "-o", str(tmp_path / "o2")]) == 1
    assert not (tmp_path / "o2").exists()
    assert main(["optimize", str(f), "-p", "depthwise_separable:init=svd", "-o", str(tmp_path / "o3")]) == 2


@pytest.mark.zoo
@pytest.mark.parametrize("spec,layers", [
    ("resnet18", 16),                 # every 3x3 conv but the 7x7 stem (3 input channels)
    ("mobilenet_v2", 0),              # depthwise + 1x1 only
    ("timm:efficientnet_b0", 0),
    ("densenet121", 58),              # the 3x3 conv of each dense layer
    pytest.param("efficientnet_b0", 0, marks=pytest.mark.slow),
    pytest.param("convnext_tiny", 3, marks=pytest.mark.slow),   # the 2x2 stride-2 downsampling convs
    pytest.param("vit_b_16", 0, marks=pytest.mark.slow),        # conv_proj has 3 input channels
])
def test_real_architectures(zoo, spec, layers):
    kw = {"image_size": 64} if spec == "vit_b_16" else {}
    model = zoo(spec, **kw)
    x = (torch.randn(1, 3, 64, 64),)
    gm, rec = run_pass("depthwise_separable:budget=10", model, x)
    assert rec.notes.get("layers", 0) == layers and rec.modified == bool(layers)
    if layers:
        assert rec.verification.status == "passed"
        assert all(r["data"]["mac_reduction"] > 3 for r in rec.rewrites)
    assert all(d["reason"] for d in rec.declined)


@pytest.mark.zoo
def test_resnet50_macs_fall_at_least_5x(zoo):
    model = zoo("resnet50")
    x = (torch.randn(1, 3, 64, 64),)
    gm, rec = run_pass("depthwise_separable:budget=10", model, x)
    assert rec.notes["layers"] == 16
    assert rec.notes["macs_before"] / rec.notes["macs_after"] >= 5  # measured 8.49x
    assert all(r["data"]["mac_reduction"] >= 5 for r in rec.rewrites)
    assert rec.after["macs"] < rec.before["macs"]
    before = rec.before["macs"] - rec.after["macs"]
    assert before == rec.notes["macs_before"] - rec.notes["macs_after"]  # matches the cost model's count
