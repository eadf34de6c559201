"""insert_residual: skips around shape-preserving blocks; gate=preserve is exact at init and trains."""

from __future__ import annotations

import json
import operator
import textwrap

import pytest
import torch
from torch import nn

import graphopt
from graphopt.cli import main
from graphopt.errors import PassConfigError
from passes.insert_residual import InsertResidual, find_chains
from graphopt.testing import assert_idempotent, count_calls, count_modules, run_pass, train_steps
from tests.test_insert_batchnorm import plain, vgg11_small_head  # noqa: F401  (plain: the fixture, a 10-conv PlainCNN)


def _gates(gm):
    return {n: p for n, p in gm.named_parameters() if n.startswith("residual.")}


def test_preserve_adds_gated_skips(plain):
    model, x = plain
    gm0 = graphopt.capture(model, x)
    assert count_calls(gm0, operator.add) == 0 and count_calls(gm0, torch.mul) == 0
    gm, rec = run_pass("insert_residual", model, x)
    assert rec.modified and rec.notes["blocks"] == 5  # 10 body convs in blocks of 2
    assert count_calls(gm, operator.add) == 5 and count_calls(gm, torch.mul) == 5
    assert count_modules(gm, nn.Conv2d) == 11
    gm.graph.lint()
    gates = _gates(gm)
    assert len(gates) == 5 and all(p.shape == () and p.item() == 0.0 and p.requires_grad for p in gates.values())
    assert rec.rewrites[0]["data"]["layers"] == ["body.0", "body.2"]
    assert "y = f(x) + a*x, a = 0" in rec.rewrites[0]["detail"]
    assert rec.semantics == "at_init" and rec.verification.status == "passed"
    torch.testing.assert_close(gm.eval()(*x), model(*x), rtol=0, atol=0)
    reasons = {d["target"]: d["reason"] for d in rec.declined}
    assert "no shape-preserving block" in reasons["stem"] and "only 1" in reasons["fc"]


def test_gate_gets_gradient_and_trains(plain):
    model, _ = plain
    torch.manual_seed(1)
    x, y = (torch.randn(16, 3, 16, 16),), torch.randint(0, 10, (16,))
    gm, _ = run_pass("insert_residual", model, x)
    gm.train()
    nn.functional.cross_entropy(gm(*x), y).backward()
    assert all(p.grad is not None and p.grad.abs().item() > 0 for p in _gates(gm).values())
    gm.zero_grad()
    losses = train_steps(gm, x, y, steps=8, lr=0.05)
    assert losses[-1] < losses[0]
    assert any(p.item() != 0.0 for p in _gates(gm).values())


@pytest.mark.parametrize("gate,formula", [("rezero", "y = x + a*f(x)"), ("none", "y = f(x) + x")])
def test_rezero_and_none_match_their_reference(plain, gate, formula):
    model, x = plain
    gm, rec = run_pass(f"insert_residual:gate={gate}", model, x)
    assert rec.semantics == "approximate" and formula in rec.rewrites[0]["detail"]
    ver = rec.verification
    assert ver.status == "passed" and ver.details["reference_max_rel_error"] < 1e-6
    # the function changes by design: measured 1.3-1.4 relative L2 on this network
    assert 0.1 < ver.value < rec.options["budget"]
    if gate == "rezero":  # every block is the identity at init: the network is stem -> pool -> fc
        with torch.no_grad():
            h = torch.relu(model.stem(x[0]))
            torch.testing.assert_close(gm.eval()(*x), model.fc(torch.flatten(model.pool(h), 1)))


def test_projection_blocks(plain):
    model, x = plain
    gm, rec = run_pass("insert_residual:projection=true", model, x)
    proj = [r for r in rec.rewrites if r["data"]["projection"]]
    assert len(proj) == 1 and proj[0]["data"]["layers"] == ["stem", "body.0"]
    assert "zero-init 1x1 conv 3->16" in proj[0]["detail"]
    conv = gm.get_submodule("residual.stem_proj")
    assert conv.kernel_size == (1, 1) and conv.weight.abs().sum() == 0
    assert rec.verification.status == "passed" and rec.verification.value == 0.0


def test_projection_with_downsampling(zoo):
    model = vgg11_small_head(zoo)
    x = (torch.randn(2, 3, 32, 32),)
    gm, rec = run_pass("insert_residual:projection=true", model, x)
    first = rec.rewrites[0]
    assert first["data"]["layers"] == ["features.0", "features.3"]  # 3x32x32 -> 128x16x16 (max-pool inside)
    assert "AvgPool2d(2)" in first["detail"]
    pool = gm.get_submodule("residual.features_0_pool")
    assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode
    assert rec.notes["blocks"] == 4 and rec.notes["projections"] == 3
    assert rec.verification.status == "passed"


def test_negative_existing_residuals(zoo):
    model = zoo("resnet18")
    x = (torch.randn(1, 3, 32, 32),)
    gm0 = graphopt.capture(model, x)
    gm, rec = run_pass("insert_residual", model, x)
    assert not rec.modified and gm.code == gm0.code
    already = [d for d in rec.declined if "already inside a skip" in d["reason"]]
    assert len(already) == 5  # the shape-preserving BasicBlocks
    assert sum("no shape-preserving block" in d["reason"] for d in rec.declined) == 3  # downsampling blocks
    gm, rec = run_pass("insert_residual:projection=true", model, x)
    assert not rec.modified and sum("already inside a skip" in d["reason"] for d in rec.declined) == 8


def test_idempotent(plain):
    model, x = plain
    for spec in ("insert_residual", "insert_residual:gate=rezero", "insert_residual:projection=true"):
        gm, _ = run_pass(spec, model, x)
        assert_idempotent(spec, gm, x)


def test_options_and_errors(plain):
    model, x = plain
    gm, rec = run_pass("insert_residual:min_layers=1,max_layers=1,exclude=body.0", model, x)
    assert rec.notes["blocks"] == 9 and any(d["target"] == "body.0" and "exclude" in d["reason"] for d in rec.declined)
    with pytest.raises(PassConfigError, match="max_layers"):
        InsertResidual(min_layers=3, max_layers=2)
    chains = find_chains(graphopt.capture(model, x))
    assert len(chains) == 1  # a plain CNN is one linear chain


def test_emitted_module_reloads_and_trains(plain, tmp_path):
    model, x = plain
    gm, report = graphopt.optimize(model, x, ["insert_residual:projection=true"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    src = (tmp_path / "out" / "module.py").read_text()
    assert "torch.mul(" in src and "residual_body_2_gate" in src.replace(".", "_")
    net = graphopt.load(tmp_path / "out")
    torch.testing.assert_close(net.eval()(*x), model(*x), rtol=0, atol=0)
    assert len([n for n, _ in net.named_parameters() if n.endswith("_gate")]) == 4
    losses = train_steps(net, x, torch.randint(0, 10, (8,)), steps=5, lr=0.05)
    assert losses[-1] < losses[0]


def test_cli(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def model():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2))

        def example_inputs():
            return (torch.randn(2, 3, 4, 4),)
    """))
    rep = tmp_path / "r.json"
    assert main(["optimize", str(f), "-p", "insert_residual", "-o", str(tmp_path / "o"), "--report", str(rep)]) == 0
    rec = json.loads(rep.read_text())["passes"][0]
    assert rec["notes"]["blocks"] == 1 and rec["rewrites"][0]["data"]["layers"] == ["2", "4"]
    assert main(["optimize", str(f), "-p", "insert_residual:gate=always", "-o", str(tmp_path / "o2")]) == 2


@pytest.mark.zoo
def test_vgg11_exact_at_init_and_trains(zoo):
    model = vgg11_small_head(zoo)
    torch.manual_seed(0)
    x, y = (torch.randn(8, 3, 32, 32),), torch.randint(0, 10, (8,))
    gm, rec = run_pass("insert_residual", model, x)
    assert rec.notes["blocks"] == 1 and rec.rewrites[0]["data"]["layers"] == ["features.16", "features.18"]
    assert rec.verification.status == "passed" and rec.verification.value == 0.0
    losses = train_steps(gm, x, y, steps=6, lr=0.02)
    assert losses[-1] < losses[0]


@pytest.mark.zoo
@pytest.mark.parametrize("spec,blocks", [
    ("mobilenet_v2", 0),          # inverted residuals already have skips; the rest change shape
    ("timm:efficientnet_b0", 0),
    ("densenet121", 0),           # dense connectivity: every chain is bypassed by a concatenation
    ("resnet50", 0),              # bottleneck interiors (conv1-conv2 keep the shape) lie inside the block's skip
    pytest.param("efficientnet_b0", 0, marks=pytest.mark.slow),
    pytest.param("convnext_tiny", 0, marks=pytest.mark.slow),   # its MLP (Linear-GELU-Linear) is inside the block skip
])
def test_real_architectures_decline_cleanly(zoo, spec, blocks):
    model = zoo(spec)
    x = (torch.randn(1, 3, 64, 64),)
    gm, rec = run_pass("insert_residual", model, x)
    assert rec.notes.get("blocks", 0) == blocks and not rec.modified
    assert rec.declined and all(d["reason"] for d in rec.declined)


@pytest.mark.zoo
@pytest.mark.slow
def test_full_vgg11_projection_trains(zoo):
    model = zoo("vgg11", num_classes=10)
    x, y = (torch.randn(4, 3, 32, 32),), torch.randint(0, 10, (4,))
    gm, rec = run_pass("insert_residual:projection=true", model, x)
    assert rec.verification.status == "passed" and rec.notes["blocks"] == 4
    losses = train_steps(gm, x, y, steps=4, lr=0.005)
    assert losses[-1] < losses[0]


def test_model_with_its_own_residual_attribute():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.residual = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(torch.relu(self.residual(x)))

    x = (torch.randn(2, 4, 6, 6),)
    gm, rec = run_pass("insert_residual", M().eval(), x)
    assert rec.modified and rec.rewrites[0]["data"]["gate"] == "residual_1.residual_gate"
    assert isinstance(gm.residual, nn.Conv2d) and len(list(gm.residual.parameters())) == 2
