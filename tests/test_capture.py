"""Capture: fx tracing, opaque-leaf fallback with coverage, root failures, metadata on every node."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import CaptureError


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: not traceable
            return self.lin(x)
        return -self.lin(x)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.dd = DataDependent()
        self.ok = nn.Linear(8, 8)

    def forward(self, x):
        return self.ok(self.dd(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.inner(x)))


def test_every_node_has_shape_dtype_and_cost(small_cnn):
    module, inputs = small_cnn
    gm = graphopt.capture(module, inputs)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        assert "cost" in node.meta
        assert node.meta["tensor_meta"].dtype == torch.float32
    out_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "fc")
    assert tuple(out_node.meta["tensor_meta"].shape) == (2, 10)
    torch.testing.assert_close(gm(*inputs), module(*inputs))


def test_capture_does_not_touch_the_callers_model(small_cnn):
    module, inputs = small_cnn
    gm = graphopt.capture(module, inputs)
    assert gm.conv1 is not module.conv1
    with torch.no_grad():
        gm.conv1.weight.zero_()
    assert module.conv1.weight.abs().sum() > 0


def test_smallest_failing_submodule_becomes_opaque():
    torch.manual_seed(0)
    model = Outer().eval()
    x = torch.randn(4, 8)
    gm = graphopt.capture(model, (x,))
    opaque = gm.meta["graphopt"]["opaque"]
    assert list(opaque) == ["inner.dd"]  # the smallest failing module, not "inner"
    assert opaque["inner.dd"]["class"] == "DataDependent"
    assert "control flow" in opaque["inner.dd"]["reason"] and "test_capture.py" in opaque["inner.dd"]["reason"]
    # inner.ok and head are inside the graph
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert targets == {"inner.dd", "inner.ok", "head"}
    cov = gm.meta["graphopt"]["cost"].coverage
    total_macs = 4 * (64 + 64 + 16)
    assert cov["macs"] == pytest.approx(1 - 4 * 64 / total_macs)
    assert cov["params"] == pytest.approx(1 - 72 / (72 + 72 + 18))
    torch.testing.assert_close(gm(x), model(x))


def test_root_forward_untraceable_names_line():
    with pytest.raises(CaptureError) as info:
        graphopt.capture(DataDependent(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg and "\n" not in msg


def test_capture_keeps_training_flag_and_bn_stats(small_cnn):
    module, inputs = small_cnn
    module.train()
    before = module.bn1.running_mean.clone()
    gm = graphopt.capture(module, inputs)
    assert gm.training
    torch.testing.assert_close(gm.bn1.running_mean, before)  # shape propagation ran in eval mode


def test_networkx_view(small_cnn):
    module, inputs = small_cnn
    gm = graphopt.capture(module, inputs)
    g = graphopt.to_networkx(gm)
    assert g.number_of_nodes() == len(gm.graph.nodes)
    assert g.nodes["conv1"]["kind"] == "Conv2d" and g.nodes["conv1"]["macs"] == 2 * 8 * 16 * 16 * 3 * 9
    assert g.has_edge("conv1", "bn1") and g.edges["conv1", "bn1"]["bytes"] == 2 * 8 * 16 * 16 * 4


class ModeDependent(nn.Module):
    """Functional dropout and batch norm written with self.training, as torchvision/timm do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def forward(self, x):
        x = nn.functional.dropout(self.lin(x), 0.5, training=self.training)
        x = nn.functional.batch_norm(x, self.mean, self.var, training=self.training, momentum=0.1)
        return x * (not self.training) + x


def test_training_flag_is_read_at_run_time_not_baked_in():
    torch.manual_seed(0)
    model = ModeDependent()  # train mode, as model files usually return it
    x = torch.randn(16, 8)
    gm = graphopt.capture(model, (x,))
    info = gm.meta["graphopt"]["training_mode"]
    assert info["captured_mode"] == "train" and info["unresolved"] == []
    assert {p["target"] for p in info["made_mode_aware"]} >= {"dropout", "batch_norm"}
    assert "training = self.training" in gm.code
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))  # no dropout, running statistics: as eval() promises
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    b = gm(x)
    assert not torch.allclose(a, b)  # dropout is active again in training
    torch.testing.assert_close(a.mean(0), torch.zeros(8), atol=1e-5, rtol=0)  # batch statistics in training


def test_real_model_stochastic_depth_follows_eval(zoo):
    """torchvision ConvNeXt's stochastic depth used to be baked in as training=True."""
    model = zoo("convnext_tiny").train()
    x = torch.randn(1, 3, 32, 32)
    gm = graphopt.capture(model, (x,))
    assert gm.meta["graphopt"]["training_mode"]["made_mode_aware"]
    gm.eval()
    model.eval()
    torch.testing.assert_close(gm(x), model(x))


class _WritesItsInput(nn.Module):
    """Writes its input in place four ways, then a conv: what issue 12 reported failing under channels_last."""

    def __init__(self, setitem: bool):
        super().__init__()
        self.setitem = setitem
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        x.add_(1)
        x.mul_(0.5)
        x += 0.25
        if self.setitem:  # torch.fx cannot trace item assignment: export only
            x[:, 0] = 0.5
        x = self.act(x)
        return self.bn(self.conv(x)).flatten(1)


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_inplace_ops_on_inputs_are_captured_on_a_copy(front_end):
    torch.manual_seed(0)
    model = _WritesItsInput(setitem=front_end == "export")
    x = torch.randn(2, 3, 8, 8)
    x_before = x.clone()
    gm = graphopt.capture(model, (x,), capture=front_end)
    assert torch.equal(x, x_before)  # capture leaves the caller's tensor alone
    meta = gm.meta["graphopt"]
    assert meta["eager_check"]["ok"], meta["eager_check"]
    note = " ".join(meta["capture_notes"])
    assert "input 'x' is modified in place" in note and "add_" in note and "mul_" in note
    if front_end == "export":
        assert "test_capture.py:" in note  # the model's source line
    model.eval()
    expected = model(x.clone())
    for passes in (["channels_last"], ["mixed_precision"], ["cleanup"], ["channels_last", "cleanup"]):
        out, report = graphopt.optimize(gm, (x,), passes)
        assert report.verified and (passes == ["cleanup"] or report.records[0].modified)  # a failure raises
        out.eval()
        got = out(x)
        assert torch.equal(x, x_before)
        tol = 1e-2 if passes == ["mixed_precision"] else 1e-5
        torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    # trains with inputs that require grad (the verifier's input gradients)
    xg = x.clone().requires_grad_(True)
    out.train()
    out(xg).sum().backward()
    assert xg.grad is not None and torch.equal(xg.detach(), x_before)


class _BNAct(nn.BatchNorm2d):
    """A BatchNorm2d subclass with an activation inside its own forward, as timm's BatchNormAct2d."""

    def __init__(self, c: int):
        super().__init__(c)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(super().forward(x))


class _ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.conv2, self.bn2 = nn.Conv2d(3, 8, 3), _BNAct(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x)))).mean((2, 3))


def test_export_keeps_batchnorm_subclass_with_its_own_forward_whole():
    """The export front end used to map the batch_norm op inside such a subclass to a call of the whole
    module (activation applied twice; the eager check caught it). It is kept as one call_module; a plain
    BatchNorm2d still maps to its module; the training flag and running statistics stay live."""
    model, x = _ConvBNAct().eval(), torch.randn(2, 3, 10, 10)
    gm = graphopt.capture(model, (x,), capture="export")
    assert gm.meta["graphopt"]["eager_check"]["ok"]
    calls = {str(n.target): type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes
             if n.op == "call_module"}
    assert calls == {"conv": "Conv2d", "bn": "_BNAct", "conv2": "Conv2d", "bn2": "BatchNorm2d"}
    assert not [n for n in gm.graph.nodes if "silu" in str(n.target)]  # the activation is inside bn
    torch.testing.assert_close(gm(x), model(x))
    gm.train()
    model.train()
    torch.testing.assert_close(gm(x), model(x))
    torch.testing.assert_close(gm.get_submodule("bn").running_mean, model.bn.running_mean)
    pytest.importorskip("graphopt_fold_bn")  # the example plugin: folds bn2, not the subclass
    from graphopt.testing import run_pass

    out, rec = run_pass("fold_bn", gm.eval(), (x,))
    assert rec.verification.status == "passed" and [r["target"] for r in rec.rewrites] == ["bn2"]
    assert any("forward of its own" in d["reason"] for d in rec.declined if d["target"] == "bn")


@pytest.mark.zoo
def test_timm_batchnormact_model_is_captured_by_export_and_prunes(zoo):
    """timm's efficientnet_b0 (BatchNormAct2d everywhere) through ``--capture export``: equal to eager,
    its BatchNormAct2d layers are call_module nodes the BatchNorm channel rule slices."""
    from graphopt.testing import run_pass

    model, x = zoo("timm:efficientnet_b0"), torch.randn(2, 3, 64, 64)
    gm = graphopt.capture(model, (x,), capture="export")
    assert gm.meta["graphopt"]["eager_check"]["ok"], gm.meta["graphopt"]["eager_check"]
    kinds = [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds.count("BatchNormAct2d") == 49
    out, rec = run_pass("prune:ratio=0.25", gm, (x,))
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    assert out.get_submodule("bn1").weight.shape == (24,) and out.get_submodule("bn1").num_features == 24
