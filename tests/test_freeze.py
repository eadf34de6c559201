"""freeze: frozen parameters get no gradient, frozen BN becomes a fixed affine op, EXACT."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import graphopt
from graphopt.cli import main
from graphopt.errors import PreconditionError
from passes.freeze import Freeze, stages_of
from graphopt.testing import assert_idempotent, count_calls, count_modules, run_pass, train_steps


def _backward_flops(module: nn.Module, x: tuple[torch.Tensor, ...]) -> int:
    module.train()
    out = module(*x)
    counter = FlopCounterMode(display=False)
    with counter:
        out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def test_head_only_small_cnn(small_cnn):
    model, x = small_cnn
    gm0 = graphopt.capture(model, x)
    assert count_modules(gm0, nn.BatchNorm2d) == 2 and count_calls(gm0, F.batch_norm) == 0
    gm, rec = run_pass("freeze", model, x)
    assert rec.modified
    gm.graph.lint()
    assert count_modules(gm, nn.BatchNorm2d) == 0 and count_calls(gm, F.batch_norm) == 2
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    fc = 8 * 10 + 10
    total = sum(p.numel() for p in model.parameters())
    assert rec.before["trainable_params"] == total and rec.after["trainable_params"] == fc
    assert rec.notes["trainable_params_after"] == fc and rec.notes["head"] == ["fc"]
    assert rec.notes["bn_to_affine"] == 2
    assert rec.verification.status == "passed" and rec.verification.value == 0.0  # bitwise in eval mode
    # state-dict keys kept (minus num_batches_tracked)
    assert set(gm.state_dict()) == {k for k in model.state_dict() if "num_batches_tracked" not in k}


def test_training_leaves_frozen_parts_untouched(small_cnn):
    model, x = small_cnn
    gm, _ = run_pass("freeze", model, x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    losses = train_steps(gm, x, torch.tensor([1, 3]), steps=5, lr=0.1)
    assert losses[-1] < losses[0]
    for name, p in gm.named_parameters():
        if name.startswith("fc."):
            assert p.grad is not None and not torch.equal(p, before[name])
        else:
            assert p.grad is None, name
            assert torch.equal(p, before[name])
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean"):
        assert torch.equal(gm.state_dict()[name], before[name]), "frozen BN statistics must not update"


def test_bn_keep_updates_running_stats(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("freeze:bn=keep", model, x)
    assert count_modules(gm, nn.BatchNorm2d) == 2 and rec.notes["bn_to_affine"] == 0
    rm = gm.bn1.running_mean.clone()
    train_steps(gm, x, torch.tensor([1, 3]), steps=1)
    assert gm.bn1.weight.grad is None and not torch.equal(gm.bn1.running_mean, rm)


def test_backward_does_less_work(zoo):
    model = zoo("resnet18", num_classes=10)
    x = (torch.randn(2, 3, 32, 32),)
    full = _backward_flops(graphopt.capture(model, x), x)
    gm, _ = run_pass("freeze:mode=stages,stages=2", model, x)
    stages2 = _backward_flops(gm, x)
    gm, _ = run_pass("freeze", model, x)
    head = _backward_flops(gm, x)
    # freezing the stem + layer1 removes their weight gradients and the input gradients below layer2
    assert head < 0.01 * full
    assert stages2 < 0.85 * full


def test_negative_nothing_to_freeze():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))  # the whole model is its head
    x = (torch.randn(2, 3, 2, 2),)
    gm0 = graphopt.capture(model, x)
    gm, rec = run_pass("freeze", model, x)
    assert not rec.modified and rec.rewrites == []
    assert gm.code == gm0.code and all(p.requires_grad for p in gm.parameters())


def test_idempotent(small_cnn):
    model, x = small_cnn
    gm, _ = run_pass("freeze", model, x)
    assert_idempotent("freeze", gm, x)
    gm, _ = run_pass("freeze:mode=modules,modules=conv1|bn1", model, x)
    assert_idempotent("freeze:mode=modules,modules=conv1|bn1", gm, x)


def test_modules_and_exclude_globs(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("freeze:mode=modules,modules=conv*|bn*,exclude=bn2", model, x)
    frozen = {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "bn1.weight", "bn1.bias"}
    assert count_modules(gm, nn.BatchNorm2d) == 1 and count_calls(gm, F.batch_norm) == 1  # bn1 only


def test_stages_resnet(zoo):
    model = zoo("resnet18", num_classes=10)
    x = (torch.randn(1, 3, 32, 32),)
    gm0 = graphopt.capture(model, x)
    depth, groups = stages_of(gm0)
    assert depth == 1 and [k for k, _ in groups] == ["stem(conv1+bn1)", "layer1", "layer2", "layer3", "layer4", "fc"]
    gm, rec = run_pass("freeze:mode=stages,stages=3", model, x)
    assert rec.notes["frozen_stages"] == ["stem(conv1+bn1)", "layer1", "layer2"]
    assert all(not p.requires_grad for n, p in gm.named_parameters() if n.startswith(("conv1", "layer1", "layer2")))
    assert all(p.requires_grad for n, p in gm.named_parameters() if n.startswith(("layer3", "layer4", "fc")))
    with pytest.raises(PreconditionError, match="would freeze everything"):
        run_pass("freeze:mode=stages,stages=6", model, x)
    with pytest.raises(PreconditionError, match="no module matches"):
        run_pass("freeze:mode=modules,modules=nothing*", model, x)


def test_emitted_module_stays_frozen(small_cnn, tmp_path):
    model, x = small_cnn
    gm, report = graphopt.optimize(model, x, ["freeze"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    src = (tmp_path / "out" / "module.py").read_text()
    assert "FROZEN" in src and "batch_norm" in src
    net = graphopt.load(tmp_path / "out")
    assert set(net.graphopt_manifest["frozen"]) == {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(net.eval()(*x), model(*x))
    rm = net.get_buffer("bn1.running_mean").clone()
    losses = train_steps(net, x, torch.tensor([0, 1]), steps=4, lr=0.1)
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith("fc."))
    assert torch.equal(net.get_buffer("bn1.running_mean"), rm)


def test_cli(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def model():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))

        def example_inputs():
            return (torch.randn(2, 3, 4, 4),)
    """))
    rep = tmp_path / "r.json"
    assert main(["optimize", str(f), "-p", "freeze", "-o", str(tmp_path / "o"), "--report", str(rep)]) == 0
    rec = json.loads(rep.read_text())["passes"][0]
    assert rec["before"]["trainable_params"] == 4 * 27 + 4 + 8 + 34 and rec["after"]["trainable_params"] == 34
    assert rec["notes"]["head"] == ["4"]
    assert main(["optimize", str(f), "-p", "freeze:mode=modules", "-o", str(tmp_path / "o2")]) == 2
    assert main(["optimize", str(f), "-p", "freeze:mode=everything", "-o", str(tmp_path / "o3")]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


ARCHS = [
    ("resnet18", ["fc"]),
    ("mobilenet_v2", ["classifier.1"]),
    ("efficientnet_b0", ["classifier.1"]),
    ("timm:efficientnet_b0", ["classifier"]),
    ("densenet121", ["classifier"]),
    pytest.param("resnet50", ["fc"], marks=pytest.mark.slow),
    pytest.param("convnext_tiny", ["classifier.2"], marks=pytest.mark.slow),
    pytest.param("vgg11", ["classifier.6"], marks=pytest.mark.slow),
]


@pytest.mark.zoo
@pytest.mark.parametrize("spec,head", ARCHS)
def test_real_architectures(zoo, spec, head):
    model = zoo(spec, num_classes=10)
    x = (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass(Freeze(), model, x)
    assert rec.notes["head"] == head
    head_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(head[0] + "."))
    assert rec.after["trainable_params"] == head_params
    assert rec.verification.status == "passed"
    assert count_modules(gm, (nn.BatchNorm2d,)) == 0
    if spec.startswith("timm:"):  # BatchNormAct2d traced through: made fixed affine
        bns = [n for n in gm.graph.nodes if n.target is F.batch_norm]
        assert bns and all(n.kwargs["training"] is False for n in bns)
    gm.train()
    gm(*x).sum().backward()
    for n, p in gm.named_parameters():
        assert (p.grad is not None) == n.startswith(head[0] + "."), n


def test_traced_batchnorm_captured_in_train_mode_becomes_fixed_affine(zoo):
    """timm's BatchNormAct2d is traced through; capture reads its training flag at run time, and
    freezing fixes it: running statistics stop updating in train mode."""
    model = zoo("timm:efficientnet_b0", num_classes=10).train()
    x = (torch.randn(2, 3, 32, 32),)
    gm, rec = run_pass("freeze:mode=modules,modules=bn1|conv_stem", model, x)
    assert "bn1" in {r["target"] for r in rec.rewrites} and rec.declined == []
    assert not gm.bn1.weight.requires_grad and gm.get_parameter("blocks.0.0.bn1.weight").requires_grad
    before = gm.bn1.running_mean.clone()
    other = gm.get_buffer("blocks.0.0.bn1.running_mean").clone()
    gm.train()
    gm(*x)
    torch.testing.assert_close(gm.bn1.running_mean, before)  # frozen: not updated
    assert not torch.equal(gm.get_buffer("blocks.0.0.bn1.running_mean"), other)  # not frozen: updated


@pytest.mark.zoo
@pytest.mark.slow
def test_vit_b_16_head(zoo):
    model = zoo("vit_b_16", image_size=64, num_classes=10)
    x = (torch.randn(1, 3, 64, 64),)
    gm, rec = run_pass("freeze", model, x)
    assert rec.notes["head"] == ["heads.head"]
    assert rec.after["trainable_params"] == 768 * 10 + 10
    assert rec.verification.status == "passed"
