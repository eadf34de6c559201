"""drop_regularization: dropout / stochastic depth / drop-path removed, EXACT in eval mode."""

from __future__ import annotations

import json
import textwrap


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.cli import main
from passes.drop_regularization import DropRegularization
from graphopt.testing import assert_idempotent, count_calls, count_modules, run_pass

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class Regularised(nn.Module):
    """conv -> Dropout2d -> relu -> F.dropout (traced: training flag baked in) -> pool -> Dropout -> fc."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.alpha = nn.AlphaDropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.drop2d(self.conv(x)))
        x = F.dropout(x, 0.3, self.training)
        x = self.drop(torch.flatten(self.pool(x), 1))
        return self.fc(self.alpha(x))


def _deterministic_in_train_mode(gm, x) -> bool:
    gm.train()
    with torch.no_grad():
        a, b = gm(*x), gm(*x)
    return torch.equal(a, b)


@pytest.fixture
def regularised():
    torch.manual_seed(0)
    return Regularised().eval(), (torch.randn(2, 3, 16, 16),)


def test_removes_modules_and_functional_dropout(regularised):
    model, x = regularised
    gm0 = graphopt.capture(model, x)
    assert count_modules(gm0, DROPOUTS) == 3 and count_calls(gm0, F.dropout) == 1
    gm, rec = run_pass("drop_regularization", model, x)
    assert rec.modified
    assert count_modules(gm, DROPOUTS) == 0 and count_calls(gm, F.dropout) == 0
    gm.graph.lint()
    assert rec.notes["removed"] == {"Dropout2d": 1, "dropout": 1, "Dropout": 1, "AlphaDropout": 1}
    assert {r["target"] for r in rec.rewrites} >= {"drop2d", "drop", "alpha"}
    # EXACT: outputs and input gradients verified by the manager
    assert rec.verification.status == "passed" and rec.semantics == "exact"
    assert "input_grad_error" in rec.verification.details
    torch.testing.assert_close(gm.eval()(*x), model(*x))
    # nothing random left: two train-mode passes agree (the original's do not)
    assert _deterministic_in_train_mode(gm, x)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(*x), model(*x))


def test_functional_dropout_follows_the_module_mode():
    """capture reads F.dropout's training=self.training at run time, so it is off in eval mode."""
    torch.manual_seed(0)
    model = Regularised().train()
    x = (torch.randn(4, 3, 16, 16),)
    gm, rec = run_pass("drop_regularization", model, x)
    fn = [r for r in rec.rewrites if r["data"]["kind"] == "dropout"]
    assert fn and fn[0]["data"]["active_in_eval"] is False
    assert rec.verification.status == "passed" and "baseline" not in rec.verification.details


def test_baked_in_train_mode_dropout_is_active_in_eval_and_verified_against_reference():
    """Code whose mode cannot be recovered (training=True fixed in the graph) is random even in
    eval mode: the pass verifies against its exact reference instead of the random original."""
    torch.manual_seed(0)
    model = Regularised().train()
    x = (torch.randn(4, 3, 16, 16),)
    gm0 = graphopt.capture(model, x)
    node = next(n for n in gm0.graph.nodes if n.target is F.dropout)
    node.args = node.args[:2] + (True,) + node.args[3:] if len(node.args) > 2 else node.args
    node.kwargs = {**node.kwargs, "training": True} if "training" in node.kwargs else node.kwargs
    gm0.graph.eliminate_dead_code()
    gm0.recompile()
    gm, rec = run_pass("drop_regularization", gm0, x)
    fn = [r for r in rec.rewrites if r["data"]["kind"] == "dropout"]
    assert fn and fn[0]["data"]["active_in_eval"] is True
    assert rec.notes["active_in_eval_mode"] == 1
    assert rec.verification.status == "passed"
    assert "reference" in rec.verification.details["baseline"]
    assert rec.verification.details["reference_max_rel_error"] == 0.0


def test_negative_no_regularisation(small_cnn):
    model, x = small_cnn
    gm0 = graphopt.capture(model, x)
    gm, rec = run_pass("drop_regularization", model, x)
    assert not rec.modified and rec.rewrites == [] and rec.declined == []
    assert gm.code == gm0.code


def test_idempotent(regularised):
    model, x = regularised
    gm, _ = run_pass("drop_regularization", model, x)
    assert_idempotent("drop_regularization", gm, x)


def test_attention_dropout_zeroed_and_leaf_dropout_declined():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)

        def forward(self, x):
            return self.layer(self.mha(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 16),)
    gm, rec = run_pass("drop_regularization", Attn().eval(), x)
    assert rec.modified
    assert gm.mha.dropout == 0.0
    assert [r["target"] for r in rec.rewrites] == ["mha"]
    assert len(rec.declined) == 1 and rec.declined[0]["target"] == "layer"
    assert "leaf" in rec.declined[0]["reason"]


def test_emitted_module_reloads(regularised, tmp_path):
    model, x = regularised
    gm, report = graphopt.optimize(model, x, ["drop_regularization"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    net = graphopt.load(tmp_path / "out")
    assert not any(isinstance(m, DROPOUTS) for m in net.modules())
    assert "dropout" not in (tmp_path / "out" / "module.py").read_text()
    torch.testing.assert_close(net.eval()(*x), model(*x))


def test_cli(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def model():
            return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))

        def example_inputs():
            return (torch.randn(2, 3, 2, 2),)
    """))
    out, rep = tmp_path / "out", tmp_path / "r.json"
    code = main(["optimize", str(f), "-p", "drop_regularization", "-o", str(out), "--report", str(rep)])
    assert code == 0
    report = json.loads(rep.read_text())
    rec = report["passes"][0]
    assert rec["name"] == "drop_regularization" and rec["notes"]["removed"] == {"Dropout": 1}
    assert rec["verification"]["status"] == "passed"
    assert (out / "module.py").is_file()
    assert main(["optimize", str(f), "-p", "drop_regularization:p=1", "-o", str(tmp_path / "o2")]) == 2


@pytest.mark.zoo
@pytest.mark.parametrize("spec,kwargs,train,front_end,expect", [
    pytest.param("vgg11", {}, False, "auto", {"Dropout": 2}, marks=pytest.mark.slow),  # 130 M params
    ("mobilenet_v2", {}, False, "auto", {"Dropout": 1}),
    ("efficientnet_b0", {}, True, "auto", {"stochastic_depth": 9, "Dropout": 1}),   # captured in train mode
    pytest.param("convnext_tiny", {}, False, "auto", {"stochastic_depth": 18}, marks=pytest.mark.slow),
    # timm's DropPath: fx traces it in train mode (its eval output then differs from eager), so auto
    # captures with torch.export, which keeps DropPath modules whole; the traced form through fx
    ("timm:efficientnet_b0", {"drop_path_rate": 0.1}, True, "auto", {"DropPath": 9}),
    ("timm:efficientnet_b0", {"drop_path_rate": 0.1}, True, "fx", {"drop_path": 9}),
    ("densenet121", {}, False, "auto", {}),
    ("resnet18", {}, False, "auto", {}),
])
def test_real_architectures(zoo, spec, kwargs, train, front_end, expect):
    model = zoo(spec, **kwargs).train(train)
    x = (torch.randn(2, 3, 64, 64),)
    captured = graphopt.capture(model, x, capture=front_end)
    if spec.startswith("timm:"):
        assert captured.meta["graphopt"]["front_end"]["used"] == ("export" if front_end == "auto" else "fx")
    gm, rec = run_pass(DropRegularization(), captured, x)
    assert rec.notes["removed"] == expect
    assert rec.modified == bool(expect)
    if expect:
        assert rec.verification.status == "passed"
        assert rec.verification.value < 1e-5
        gm.graph.lint()
        assert _deterministic_in_train_mode(gm, x)
        assert not any("bernoulli" in str(n.target) for n in gm.graph.nodes)  # method (fx) or ATen (export)


@pytest.mark.zoo
@pytest.mark.slow
def test_vit_b_16(zoo):
    model = zoo("vit_b_16", image_size=64, dropout=0.1, attention_dropout=0.1)
    x = (torch.randn(1, 3, 64, 64),)
    gm, rec = run_pass("drop_regularization", model, x)
    assert rec.notes["removed"]["Dropout"] == 3 * 12 + 1  # per encoder block: after attention + 2 in the MLP; + input
    assert rec.notes["removed"]["MultiheadAttention.dropout"] == 12
    assert rec.verification.status == "passed"


class DropPath(nn.Module):
    """A user's own drop-path (timm's form): acts only in training mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        return x * x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep).div_(keep)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = DropPath(0.5)

    def forward(self, x):
        return x + self.drop(self.conv(x))


@pytest.mark.parametrize("train", [False, True])
def test_export_keeps_drop_path_modules_whole_in_either_mode(train):
    """Captured in eval mode, drop-path leaves no op to trace, and in train mode export would bake the
    mask in: the export front end keeps the module as a call_module node, which follows the mode."""
    torch.manual_seed(0)
    model, x = _Residual().train(train), (torch.randn(8, 4, 6, 6),)
    gm = graphopt.capture(model, x, capture="export")
    assert count_modules(gm, DropPath) == 1 and gm.meta["graphopt"]["eager_check"]["ok"]
    for mode in (True, False):
        model.train(mode)
        gm.train(mode)
        torch.manual_seed(1)
        expected = model(*x)
        torch.manual_seed(1)
        torch.testing.assert_close(gm(*x), expected)
    out, rec = run_pass(DropRegularization(), gm, x)
    assert rec.notes["removed"] == {"DropPath": 1} and rec.verification.status == "passed"
