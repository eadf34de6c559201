"""Tests of the prune pass: channel analysis, structured pruning, sparsity, iterative pruning."""

from __future__ import annotations

import operator


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.analysis import ChannelRule, analyze_channels, register_channel_rule, unregister_channel_rule
from graphopt.errors import PassConfigError
from graphopt.prune import prune_iterative, sparsity_of, to_semi_structured
from graphopt.testing import count_calls, count_modules, outputs, run_pass, train_steps


# ----------------------------------------------------------------------------- fixtures


class GroupedNet(nn.Module):
    """Grouped conv, GroupNorm, residual add, flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 32)
        self.proj = nn.Conv2d(32, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.gn(self.gconv(x)))
        x = x + self.bn1(self.proj(y))           # residual: stem and proj channels tied
        return self.fc(torch.flatten(self.pool(x), 1))   # each channel = 4 features


class ConcatNet(nn.Module):
    """cat, chunk, split with sizes, depthwise conv, view/permute to tokens, token linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 3, padding=1)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20)
        self.bn = nn.BatchNorm2d(20)
        self.c = nn.Conv2d(20, 16, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.tok = nn.Linear(16, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = F.relu(self.bn(self.dw(x)))
        x = self.c(x)
        p, q = x.chunk(2, dim=1)
        x = torch.cat([self.d(p), q], 1)
        u, v = torch.split(x, [10, 6], dim=1)
        x = torch.cat([v, u], 1)
        n, ch, h, w = x.shape
        t = x.view(n, 16, h * w).permute(0, 2, 1)      # tokens [N, HW, C]
        t = F.gelu(self.tok(t))
        return self.head(t.mean(1))


class SEBlock(nn.Module):
    def __init__(self, c: int = 16, r: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + y * s


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(SEBlock(), SEBlock())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class Unprunable(nn.Module):
    """Every channel group meets something the analysis must refuse."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.cumsum(self.conv(x), dim=1)       # mixes channels: not understood
        return self.conv2(y).softmax(1)              # reaches the output


def _inputs(n: int = 2, s: int = 16):
    torch.manual_seed(1)
    return (torch.randn(n, 3, s, s),)


def _shapes(gm):
    return {k: tuple(v.shape) for k, v in gm.state_dict().items()}


def _emit_load_train(gm, tmp_path, x, classes=10):
    graphopt.emit_torch_folder(gm, tmp_path / "out")
    m2 = graphopt.load(tmp_path / "out")
    torch.testing.assert_close(outputs(m2, x), outputs(gm, x))
    losses = train_steps(m2, x, torch.arange(x[0].shape[0]) % classes, steps=4, lr=0.05)
    assert all(torch.isfinite(torch.tensor(losses)))
    return m2, losses


# ----------------------------------------------------------------------------- analysis


def test_analysis_groups_small_cnn(small_cnn):
    model, x = small_cnn
    gm = graphopt.capture(model, x)
    cg = analyze_channels(gm)
    by = {tuple(g.producers): g for g in cg.groups}
    assert set(by) == {("conv1",), ("conv2",), ("fc",)}
    assert by[("conv1",)].prunable and by[("conv2",)].prunable
    assert not by[("fc",)].prunable and "model output" in by[("fc",)].blocked[0]


def test_analysis_residual_and_grouped_constraints():
    gm = graphopt.capture(GroupedNet().eval(), _inputs())
    cg = analyze_channels(gm)
    groups = {tuple(g.producers): g for g in cg.groups}
    assert ("stem", "proj") in groups, list(groups)       # residual add ties stem and proj
    assert groups[("stem", "proj")].prunable
    assert groups[("stem", "proj")].constraints[0].kind == "blocks"  # grouped conv input
    gconv = groups[("gconv",)]
    # gconv's outputs: equal removal per conv group and whole GroupNorm groups cannot be combined
    assert not gconv.prunable and "GroupNorm" in gconv.blocked[0]


def test_analysis_declines_unknown_ops_with_reason():
    gm = graphopt.capture(Unprunable().eval(), _inputs())
    cg = analyze_channels(gm)
    reasons = {g.producers[0]: g.blocked for g in cg.groups}
    assert "not understood" in reasons["conv"][0] and "cumsum" in reasons["conv"][0]
    assert "softmax over the channel axis" in " ".join(reasons["conv2"])


# ----------------------------------------------------------------------------- structured


def test_structured_small_cnn_counts_numbers_and_reference(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.semantics == "approximate"
    gm.graph.lint()
    s = _shapes(gm)
    assert s["conv1.weight"] == (4, 3, 3, 3) and s["bn1.weight"] == (4,) and s["bn1.running_var"] == (4,)
    assert s["conv2.weight"] == (4, 4, 3, 3) and s["fc.weight"] == (10, 4)
    assert gm.conv2.in_channels == 4 and gm.bn2.num_features == 4 and gm.fc.in_features == 4
    assert count_modules(gm, nn.Conv2d) == 2 and count_modules(gm, nn.Linear) == 1
    assert rec.after["params"] < rec.before["params"] and rec.after["macs"] < rec.before["macs"]
    ver = rec.verification
    assert ver.status == "passed" and ver.details["reference_max_rel_error"] < 1e-5
    assert [d["target"] for d in rec.declined] == ["fc"]
    # the largest-L1 channels survived: conv1 keeps the 4 rows with the largest group scores
    assert len(rec.rewrites) == 2 and rec.rewrites[0]["data"]["after"] == 4


def test_structured_is_exact_against_masked_original(small_cnn):
    """Independently of the verifier: pruned == original with the removed channels' weights zero."""
    model, x = small_cnn
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    ref = graphopt.capture(model, x)
    kept1 = [i for i in range(8) if any(torch.equal(model.conv1.weight[i], w) for w in gm.conv1.weight)]
    kept2 = [i for i in range(8) if any(torch.equal(model.conv2.weight[i, kept1], w) for w in gm.conv2.weight)]
    assert len(kept1) == 4 and len(kept2) == 4
    with torch.no_grad():
        for i in set(range(8)) - set(kept1):
            ref.conv2.weight[:, i] = 0
        for i in set(range(8)) - set(kept2):
            ref.fc.weight[:, i] = 0
    torch.testing.assert_close(outputs(gm, x), outputs(ref, x), rtol=1e-5, atol=1e-6)


def test_structured_grouped_residual_flatten_linear(tmp_path):
    model, x = GroupedNet().eval(), _inputs()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    assert gm.stem.out_channels == 8 and gm.proj.out_channels == 8 and gm.bn0.num_features == 8
    assert gm.gconv.in_channels == 8 and gm.gconv.out_channels == 32 and gm.gconv.groups == 4
    assert gm.gconv.weight.shape == (32, 2, 3, 3)      # 2 of 4 input channels kept in every conv group
    assert gm.fc.in_features == 8 * 4                  # flatten: 4 features per channel
    assert any("GroupNorm" in d["reason"] for d in rec.declined)
    _emit_load_train(gm, tmp_path, x)


def test_structured_concat_chunk_split_depthwise_tokens(tmp_path):
    model, x = ConcatNet().eval(), _inputs()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.message
    # a and b are one group through the cat + depthwise conv: 10 of their 20 channels go, by score
    assert gm.a.out_channels + gm.b.out_channels == 10 and 0 < gm.a.out_channels < 8
    assert gm.dw.in_channels == gm.dw.out_channels == gm.dw.groups == 10 and gm.bn.num_features == 10
    assert gm.c.out_channels == 8 and gm.d.in_channels == 4   # chunk: both halves keep 4
    assert gm.tok.in_features == 8 and gm.tok.out_features == 12 and gm.head.in_features == 12
    split = next(n for n in gm.graph.nodes if n.target is torch.split)
    assert sum(split.args[1]) == 8
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert view.args[2] == 8                            # literal channel count rewritten
    _emit_load_train(gm, tmp_path, x, classes=5)


def test_structured_se_blocks(tmp_path):
    model, x = SENet().eval(), _inputs()
    gm, rec = run_pass("prune:ratio=0.5,criterion=l2", model, x)
    assert rec.verification.status == "passed"
    # stem, both block convs and both SE expansions share the residual stream's channels
    assert gm.stem.out_channels == 8
    for b in ("0", "1"):
        blk = gm.blocks.get_submodule(b)
        assert blk.conv.out_channels == 8 and blk.fc2.out_channels == 8 and blk.fc1.in_channels == 8
        assert blk.fc1.out_channels == 2                    # SE bottleneck 4 -> 2
    assert gm.fc.in_features == 8
    _emit_load_train(gm, tmp_path, x)


def test_negative_nothing_prunable_graph_unchanged():
    model, x = Unprunable().eval(), _inputs()
    gm0 = graphopt.capture(model, x)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert not rec.modified and rec.verification.status == "skipped"
    assert gm.code == gm0.code and _shapes(gm) == _shapes(gm0)
    assert len(rec.declined) == 2 and all("not prunable" in d["reason"] for d in rec.declined)


def test_ratio_zero_changes_nothing_and_second_run_prunes_further(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    gm2, rec2 = run_pass("prune:ratio=0.0", gm, x)
    assert not rec2.modified and gm2.code == gm.code and _shapes(gm2) == _shapes(gm)
    gm3, rec3 = run_pass("prune:ratio=0.5", gm, x)   # structured pruning is not idempotent by design
    assert gm3.conv1.out_channels == 2


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor"])
def test_criteria_choose_expected_channels(small_cnn, criterion):
    model, x = small_cnn
    with torch.no_grad():  # make channels 0..3 of conv1 obviously unimportant under every criterion
        model.conv1.weight[:4] *= 1e-3
        model.conv1.bias[:4] *= 1e-3
        model.bn1.weight[:4] = 1e-3
        model.bn1.bias[:4] = 0
        model.conv2.weight[:, :4] *= 1e-3
    gm, rec = run_pass(f"prune:ratio=0.5,criterion={criterion}", model, x)
    kept = [i for i in range(8) if any(torch.allclose(model.bn1.running_mean[i:i + 1], v.view(1))
                                        and torch.equal(model.conv1.weight[i], w)
                                        for v, w in zip(gm.bn1.running_mean, gm.conv1.weight))]
    assert kept == [4, 5, 6, 7]


@pytest.mark.zoo
def test_global_scope_and_macs_target_and_round_to(zoo):
    model, x = zoo("resnet18"), (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass("prune:macs=0.5,scope=global,round_to=8", model, x)
    assert rec.verification.status == "passed"
    frac = rec.after["macs"] / rec.before["macs"]
    assert 0.40 <= frac <= 0.5, frac        # within the target, close to it
    assert rec.notes["target"]["reached"]
    for name, mod in gm.named_modules():
        if isinstance(mod, nn.Conv2d) and name != "conv1" or isinstance(mod, nn.BatchNorm2d):
            n = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.num_features
            assert n % 8 == 0, (name, n)
    # global ranking prunes groups unevenly
    kept = {r["target"]: r["data"]["after"] / r["data"]["before"] for r in rec.rewrites}
    assert max(kept.values()) - min(kept.values()) > 0.1


def test_ignore_and_min_channels(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("prune:ratio=0.9,ignore=conv1,min_channels=3", model, x)
    assert gm.conv1.out_channels == 8 and gm.conv2.out_channels == 3
    assert any(d["target"] == "conv1" and "ignore" in d["reason"] for d in rec.declined)


def test_budget_is_enforced(small_cnn):
    model, x = small_cnn
    with pytest.raises(graphopt.VerificationError, match="prune"):
        run_pass("prune:ratio=0.5,budget=0.01", model, x)


def test_bad_options_are_one_line_errors():
    with pytest.raises(PassConfigError):
        graphopt.create_pass("prune", {"mode": "3:4"})
    with pytest.raises(PassConfigError):
        graphopt.create_pass("prune", {"ratio": "1.5"})
    model, x = nn.Sequential(nn.Conv2d(3, 4, 1)), _inputs()
    with pytest.raises(PassConfigError, match="bn_scale"):
        run_pass("prune:mode=unstructured,criterion=bn_scale", model, x)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_real_models_small(zoo, tmp_path, name):
    model, x = zoo(name), (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    assert rec.verification.details["reference_max_rel_error"] < 1e-5
    assert rec.after["params"] < 0.45 * rec.before["params"]
    assert len(rec.declined) == 1      # only the classifier
    _emit_load_train(gm, tmp_path, x, classes=1000)


SLOW_MODELS = ["resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
               "vgg11", "convnext_tiny", "vit_b_16", "resnext50_32x4d", "timm:mobilenetv3_small_100"]


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_real_models(zoo, tmp_path, name):
    size = 224 if name == "vit_b_16" else 64
    model, x = zoo(name), (torch.randn(1 if size == 224 else 2, 3, size, size),)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    assert rec.verification.details["reference_max_rel_error"] < 1e-5
    assert rec.after["params"] < rec.before["params"] and rec.after["macs"] < rec.before["macs"]
    if name == "vit_b_16":
        assert gm.get_submodule("encoder.layers.encoder_layer_0.mlp.0").out_features == 1536
        stream = next(g for g in analyze_channels(gm).groups if "conv_proj" in g.producers)
        assert any("MultiheadAttention" in r for r in stream.blocked)
        assert any(d["target"].startswith("conv_proj") and "not prunable" in d["reason"] for d in rec.declined)
    if name == "convnext_tiny":
        assert any("LayerNorm" in d["reason"] or "layer_norm" in d["reason"] for d in rec.declined)
    _emit_load_train(gm, tmp_path, x, classes=1000)


class ShuffleNet(nn.Module):
    """A channel shuffle (view splitting the channel axis) feeding a depthwise conv: the depthwise
    conv must stay whole (its input width is fixed), the convs after it are still pruned."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)  # channel shuffle
        y = self.c(F.relu(self.b(self.bn(self.dw(x)))))
        z = y[:, :8] + y[:, :4].repeat(1, 2, 1, 1)   # a full slice is followed, a partial one is not
        return self.fc(z.mean((2, 3)))


def test_shuffle_then_depthwise_keeps_the_depthwise_conv_whole():
    model, x = ShuffleNet().eval(), _inputs()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    gm.graph.lint()
    assert rec.verification.status == "passed", rec.verification.message
    assert gm.dw.in_channels == gm.dw.out_channels == 8 and gm.bn.num_features == 8
    assert gm.b.in_channels == 8 and gm.b.out_channels == 4 and gm.c.in_channels == 4 and gm.c.out_channels == 8
    reasons = " ".join(d["reason"] for d in rec.declined)
    assert "splits the channel axis" in reasons and "indexes into the channel axis" in reasons


class MixedKernels(nn.Module):
    """MixNet's mixed depthwise conv: split the channels, a depthwise conv per piece, cat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.dw3 = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.dw5 = nn.Conv2d(14, 14, 5, padding=2, groups=14)
        self.b = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        p, q = torch.split(self.a(x), [2, 14], 1)
        x = torch.cat([self.dw3(p), self.dw5(q)], 1)
        return self.fc(self.b(x).mean((2, 3)))


def test_no_split_piece_or_layer_is_emptied():
    """The two channels of the small piece score lowest; removing both would leave dw3 with no
    channels (an invalid graph, as on timm's MixNet): the piece keeps its best channel and the
    next-lowest channel elsewhere goes instead, so 8 of 16 still go."""
    model, x = MixedKernels().eval(), _inputs()
    with torch.no_grad():
        for t in (model.a.weight[:2], model.a.bias[:2], model.dw3.weight, model.dw3.bias, model.b.weight[:, :2]):
            t.mul_(1e-3)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.verification.status == "passed" and not any("does not run" in d["reason"] for d in rec.declined)
    assert gm.a.out_channels == 8 and gm.dw3.out_channels == 1 and gm.dw5.out_channels == 7
    split = next(n for n in gm.graph.nodes if n.target is torch.split)
    assert list(split.args[1]) == [1, 7]


# ----------------------------------------------------------------------------- channel rule registry


class ChannelAffine(nn.Module):
    """A layer of the user's own: a per-channel affine map. Its shape check is control flow on a
    traced value, so capture keeps it whole (an opaque leaf): the analysis sees a module call."""

    def __init__(self, c: int):
        super().__init__()
        self.c = c
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.shift = nn.Parameter(torch.randn(c))
        self.register_buffer("calls", torch.zeros(()))  # an unsliced buffer rides along

    def forward(self, x):
        if x.shape[1] != self.c:
            raise ValueError(f"expected {self.c} channels, got {x.shape[1]}")
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class ChannelAffineRule(ChannelRule):
    """Coupled (channel i in is channel i out) on axis 1; scale and shift are sliced."""

    in_axis = 1

    def get_in_channels(self, module):
        return module.c

    def out_params(self, module):
        return {"scale": 0, "shift": 0}

    def set_out_channels(self, module, n):
        module.c = n


class AffineNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.affine = ChannelAffine(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.affine(self.conv1(x)))
        return self.fc(F.relu(self.conv2(y)).mean((2, 3)))


@pytest.fixture
def affine_rule():
    register_channel_rule(ChannelAffine, ChannelAffineRule())
    yield
    unregister_channel_rule(ChannelAffine)


def test_custom_layer_without_rule_is_declined_with_reason():
    model, x = AffineNet().eval(), _inputs()
    # fx keeps the layer whole (its shape check is control flow on a traced value): an opaque leaf
    gm, rec = run_pass("prune:ratio=0.5", graphopt.capture(model, x, capture="fx"), x)
    assert isinstance(gm.get_submodule("affine"), ChannelAffine)      # kept whole by capture
    declined = {d["target"]: d["reason"] for d in rec.declined}
    assert "no channel rule for ChannelAffine" in declined["conv1"]
    assert "register_channel_rule" in declined["conv1"]
    assert gm.conv1.out_channels == 8 and gm.affine.c == 8 and gm.conv2.out_channels == 4  # the rest is pruned
    # auto: fx leaves part of the model opaque and the layer has no rule, so torch.export captures it
    # whole and inlines the layer: its parameter product keeps conv1's channels, the rest is pruned
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert gm.meta["graphopt"]["front_end"]["used"] == "export"
    assert not isinstance(gm.get_submodule("affine"), ChannelAffine)
    declined = {d["target"]: d["reason"] for d in rec.declined}
    assert "not prunable" in declined["conv1"] and rec.verification.status == "passed"
    assert gm.conv1.out_channels == 8 and gm.conv2.out_channels == 4


def test_export_keeps_a_layer_with_a_registered_rule_whole(affine_rule):
    """torch.export (auto's fallback, or asked for) brackets a layer with a registered channel rule and
    keeps it a call_module node, so prune slices it through its rule as with fx."""
    model, x = AffineNet().eval(), _inputs()
    captured = graphopt.capture(model, x, capture="export")
    assert isinstance(captured.get_submodule("affine"), ChannelAffine)
    assert [n.target for n in captured.graph.nodes if n.op == "call_module"] == ["conv1", "affine", "conv2", "fc"]
    assert not any("graphopt" in str(n.target) for n in captured.graph.nodes)  # no marker left behind
    assert len(captured.graph.nodes) == 9  # nor the layer's inlined parameter views
    gm, rec = run_pass("prune:ratio=0.5", captured, x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.message
    assert gm.conv1.out_channels == 4 and gm.affine.c == 4 and gm.affine.scale.shape == (4,)


def test_custom_layer_with_registered_rule_is_pruned(affine_rule):
    model, x = AffineNet().eval(), _inputs()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    gm.graph.lint()
    assert rec.modified and rec.verification.status == "passed", rec.verification.message
    assert gm.conv1.out_channels == 4 and gm.conv2.in_channels == 4
    assert gm.affine.c == 4 and gm.affine.scale.shape == (4,) and gm.affine.shift.shape == (4,)
    assert isinstance(gm.affine.scale, nn.Parameter) and gm.affine.calls.shape == ()
    # independently of the verifier: the pruned model equals the original with the removed channels'
    # columns of conv2 zeroed, and the kept channels keep their own scale/shift
    kept = [i for i in range(8) if any(torch.equal(model.conv1.weight[i], w) for w in gm.conv1.weight)]
    assert len(kept) == 4
    torch.testing.assert_close(gm.affine.scale, model.affine.scale[kept])
    ref = graphopt.capture(model, x)
    with torch.no_grad():
        for i in set(range(8)) - set(kept):
            ref.conv2.weight[:, i] = 0
        gone2 = [i for i in range(8) if not any(torch.equal(ref.conv2.weight[i, kept], w) for w in gm.conv2.weight)]
        for i in gone2:
            ref.fc.weight[:, i] = 0
    torch.testing.assert_close(outputs(gm, x), outputs(ref, x), rtol=1e-5, atol=1e-6)
    # the rule scores too: its parameters join the group importance
    assert rec.after["params"] < rec.before["params"]


class _Forgetful(ChannelAffineRule):
    def set_out_channels(self, module, n):
        pass  # ChannelAffine.c stays 8: its forward refuses the 4-channel input


class _Raising(ChannelAffineRule):
    def prune_out_channels(self, module, keep):
        raise RuntimeError("expected 8 channels: this rule cannot slice")


@pytest.mark.parametrize("rule", [_Forgetful, _Raising])
def test_a_rule_that_slices_wrongly_is_declined_not_an_invalid_graph(rule):
    """Defence in depth: a rule that slices its layer wrongly (the graph no longer runs) or cannot
    slice it (raises) must not yield a broken graph or an internal error: that group is declined
    with the error, the others are still pruned, and the result verifies."""
    register_channel_rule(ChannelAffine, rule())
    try:
        model, x = AffineNet().eval(), _inputs()
        gm, rec = run_pass("prune:ratio=0.5", model, x)
    finally:
        unregister_channel_rule(ChannelAffine)
    gm.graph.lint()
    assert rec.modified and rec.verification.status == "passed"
    declined = {d["target"]: d["reason"] for d in rec.declined}
    assert "does not run" in declined["conv1"] and "expected 8 channels" in declined["conv1"], declined
    assert gm.conv1.out_channels == 8 and gm.affine.c == 8 and gm.conv2.out_channels == 4
    assert gm(*x).shape == (2, 4)


def test_rule_registry_api():
    from graphopt.analysis import channel_rule_for
    from graphopt.prune import register_channel_rule as via_prune

    assert via_prune is register_channel_rule
    assert channel_rule_for(ChannelAffine(2)) is None
    assert type(channel_rule_for(nn.Conv2d(2, 2, 1))).__name__ == "ConvRule"

    class MyConv(nn.Conv2d):
        pass

    assert channel_rule_for(MyConv) is channel_rule_for(nn.Conv2d)     # by MRO
    with pytest.raises(PassConfigError, match="ChannelRule"):
        register_channel_rule(ChannelAffine, object())
    with pytest.raises(PassConfigError, match="nn.Module"):
        register_channel_rule(int, ChannelAffineRule())


def test_exclude_option_and_old_name_ignore(small_cnn, caplog):
    model, x = small_cnn
    gm, rec = run_pass("prune:ratio=0.9,exclude=conv1,min_channels=3", model, x)
    assert gm.conv1.out_channels == 8 and gm.conv2.out_channels == 3
    assert "renamed_options" not in rec.notes
    with caplog.at_level("WARNING"):
        gm2, rec2 = run_pass("prune:ratio=0.9,ignore=conv1,min_channels=3", model, x)
    assert gm2.conv1.out_channels == 8 and gm2.conv2.out_channels == 3
    assert rec2.notes["renamed_options"] == ["'ignore' is now 'exclude'"]
    assert any("'ignore' was renamed to 'exclude'" in r.getMessage() for r in caplog.records)
    assert graphopt.create_pass("prune", {"ignore": ["a*"]}).spec() == "prune:exclude=a*"
    with pytest.raises(PassConfigError, match="renamed"):
        graphopt.create_pass("prune", {"ignore": ["a"], "exclude": ["b"]})


# ----------------------------------------------------------------------------- sparsity


def test_unstructured_global_keep_zero_survives_emit_load_and_training(small_cnn, tmp_path):
    model, x = small_cnn
    gm, rec = run_pass("prune:mode=unstructured,ratio=0.6,scope=global", model, x)
    assert rec.modified and rec.verification.status == "passed"
    assert rec.verification.details["reference_max_rel_error"] < 1e-6
    # conv1, conv2 now functional with masks; fc (the output layer) stays a dense module
    assert count_modules(gm, nn.Conv2d) == 0 and count_calls(gm, F.conv2d) == 2
    assert count_calls(gm, operator.mul) == 2 and count_modules(gm, nn.Linear) == 1
    total = sum(gm.get_submodule(m).weight.numel() for m in ("conv1", "conv2"))
    zeros = sum(int((gm.get_submodule(m).weight == 0).sum()) for m in ("conv1", "conv2"))
    assert zeros == int(0.6 * total)
    m2, losses = _emit_load_train(gm, tmp_path, x)
    assert losses[-1] < losses[0]
    sd = dict(m2.named_parameters())
    masks = dict(m2.named_buffers())
    for m in ("conv1", "conv2"):
        eff = sd[f"{m}.weight"] * masks[f"prune_masks.{m}__weight"]
        assert int((eff == 0).sum()) >= int((~masks[f"prune_masks.{m}__weight"]).sum()) > 0


def test_unstructured_idempotent_and_per_layer(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("prune:mode=unstructured,ratio=0.5,scope=per_layer", model, x)
    for m in ("conv1", "conv2"):
        w = gm.get_submodule(m).weight
        assert int((w == 0).sum()) == int(0.5 * w.numel())
    gm2, rec2 = run_pass("prune:mode=unstructured,ratio=0.5,scope=per_layer", gm, x)
    assert not rec2.modified and gm2.code == gm.code
    gm3, rec3 = run_pass("prune:mode=unstructured,ratio=0.75,scope=per_layer", gm, x)  # masks grow
    assert rec3.modified and count_calls(gm3, F.conv2d) == 2
    w = gm3.conv2.weight
    assert int((w == 0).sum()) == int(0.75 * w.numel())
    assert int((~gm3.prune_masks.conv2__weight).sum()) == int(0.75 * w.numel())


def test_unstructured_without_keep_zero_keeps_modules(small_cnn):
    model, x = small_cnn
    gm, rec = run_pass("prune:mode=unstructured,ratio=0.5,keep_zero=false", model, x)
    assert count_modules(gm, nn.Conv2d) == 2 and not hasattr(gm, "prune_masks")
    assert sparsity_of(gm)["conv2.weight"] == pytest.approx(0.5, abs=0.01)


def test_two_four_pattern_and_declines(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 12 * 12, 32),
                          nn.ReLU(), nn.Linear(32, 4)).eval()
    x = _inputs()
    gm, rec = run_pass("prune:mode=2:4", model, x)
    assert rec.modified and rec.verification.status == "passed"
    declined = {d["target"]: d["reason"] for d in rec.declined}
    assert "not a multiple of 4" in declined["0"] and "model output" in declined["6"]
    w = gm.get_submodule("2").weight                 # [16, 8, 3, 3]: runs of 4 input channels
    nz = (w != 0).movedim(1, -1).reshape(-1, 4).sum(-1)
    assert bool((nz <= 2).all()) and float((w == 0).float().mean()) >= 0.5
    lw = gm.get_submodule("4").weight
    assert bool(((lw != 0).reshape(32, -1, 4).sum(-1) <= 2).all())
    assert "CUDA" in rec.notes["sparse_kernels"]
    _emit_load_train(gm, tmp_path, x, classes=4)


def test_to_semi_structured_on_cpu_says_why():
    assert "CUDA" in to_semi_structured(nn.Linear(64, 64))["*"]


@pytest.mark.gpu
def test_to_semi_structured_cuda():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    x = (torch.randn(64, 128),)
    gm, rec = run_pass("prune:mode=2:4,keep_zero=false", model, x)
    gm = gm.cuda().half()
    ref = gm(x[0].cuda().half())
    status = to_semi_structured(gm)
    assert status["0"] == "converted", status
    torch.testing.assert_close(gm(x[0].cuda().half()), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- iterative + CLI


def test_prune_iterative_with_finetuning(small_cnn):
    model, x = small_cnn
    calls = []

    def finetune(m):
        calls.append(m.conv1.out_channels)
        train_steps(m, x, torch.tensor([0, 1]), steps=2)

    gm, reports = prune_iterative(model, x, rounds=2, ratio_per_round=0.5, finetune=finetune)
    assert calls == [4, 2] and gm.conv1.out_channels == 2 and len(reports) == 2
    assert all(r.verified for r in reports)
    sparse, reps = prune_iterative(model, x, rounds=2, ratio_per_round=0.5, mode="unstructured",
                                   finetune=lambda m: train_steps(m, x, torch.tensor([0, 1]), steps=2))
    w = sparse.conv2.weight * sparse.prune_masks.conv2__weight   # zeros kept through fine-tuning
    assert float((w == 0).float().mean()) >= 0.74
    with pytest.raises(PassConfigError):
        prune_iterative(model, x, rounds=2, ratio_per_round=0.5, ratio=0.3)


def _mnist_cnn(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def test_prune_iterative_round_to_removes_every_round():
    """Issue 16 item 7: with round_to=8 every round removes its share of the current widths; rounding
    never turns a wanted removal into nothing while a multiple of 8 can still go."""
    model, x = _mnist_cnn(32), (torch.randn(4, 1, 8, 8),)
    widths = []
    gm, reports = prune_iterative(model, x, rounds=3, ratio_per_round=0.3, round_to=8,
                                  finetune=lambda m: widths.append(m.get_submodule("0").out_channels))
    macs = [reports[0].records[0].before["macs"]] + [r.records[0].after["macs"] for r in reports]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    assert widths == [24, 16, 8]                      # 30% of 32, 24, 16 rounded to one multiple of 8
    assert all(r.records[0].modified and not r.records[0].notes["round"]["removed_nothing"] for r in reports)


def test_prune_iterative_says_when_a_round_removes_nothing(caplog):
    model, x = _mnist_cnn(16), (torch.randn(4, 1, 8, 8),)
    with caplog.at_level("WARNING"):
        gm, reports = prune_iterative(model, x, rounds=2, ratio_per_round=0.3, round_to=8)
    assert gm.get_submodule("0").out_channels == 8
    note = reports[1].records[0].notes["round"]
    assert note["removed_nothing"] and "nothing to remove after rounding" in note["why"]
    assert any("round 2/2 removed nothing" in r.getMessage() for r in caplog.records)


def test_cli_prune(tmp_path):
    from graphopt.cli import main

    mf = tmp_path / "m.py"
    mf.write_text("import torch\nfrom torch import nn\n"
                  "def model():\n    torch.manual_seed(0)\n"
                  "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),"
                  " nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))\n"
                  "def example_inputs():\n    return (torch.randn(2, 3, 16, 16),)\n")
    rc = main(["optimize", str(mf), "-p", "prune:ratio=0.5,round_to=2", "-o", str(tmp_path / "out"),
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    m = graphopt.load(tmp_path / "out")
    assert m.get_submodule("0").out_channels == 4
    assert main(["optimize", str(mf), "-p", "prune:mode=5:8", "-o", str(tmp_path / "o2")]) == 2


def _mnist_model_file(tmp_path):
    """A model file: a 16-channel CNN for 1-channel 8x8 digits."""
    mf = tmp_path / "m.py"
    mf.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))\n\n"
        "def example_inputs():\n    return (torch.randn(4, 1, 8, 8),)\n")
    return mf


def test_cli_prune_iterative_fine_tunes_between_rounds(tmp_path):
    """Issue 4 item 5: k% per round over N rounds, fine-tuned with the training harness in between."""
    import json

    import graphopt
    from graphopt.cli import main

    mf = _mnist_model_file(tmp_path)
    out = tmp_path / "run"
    assert main(["prune-iterative", str(mf), "--rounds", "2", "--ratio-per-round", "0.5", "--data", "digits",
                 "--epochs-per-round", "1", "--optimizer", "adam", "--lr", "0.01", "--progress", "none",
                 "-o", str(out)]) == 0
    doc = json.loads((out / "prune.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["macs"] > rounds[1]["macs"] > rounds[2]["macs"]
    assert all(r["test_accuracy"] is not None for r in rounds)
    model = graphopt.load(out / "model")
    assert model.get_submodule("0").out_channels == 4  # 16 -> 8 -> 4 channels


# ----------------------------------------------------------------------------- models the rules cannot fully follow


HARD_MODELS = {  # model -> the construct its declines must name
    "shufflenet_v2_x0_5": "splits the channel axis",       # channel shuffle: view(N, g, C/g, H, W)
    "shufflenet_v2_x1_0": "splits the channel axis",
    "shufflenet_v2_x1_5": "splits the channel axis",
    "shufflenet_v2_x2_0": "splits the channel axis",
    "timm:ghostnet_100": "linear() (node linear)",          # cat + channel slice followed; F.linear head is not
    "timm:cs3darknet_focus_s": "model output",              # focus stem on the input; split(k) pieces shrink
}


_FAST_HARD = ("shufflenet_v2_x0_5", "timm:cs3darknet_focus_s")  # the others take 5-15 s here: slow


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n if n in _FAST_HARD else pytest.param(n, marks=pytest.mark.slow) for n in HARD_MODELS])
def test_prune_never_breaks_models_it_cannot_fully_follow(zoo, name):
    """Issue 16 item 9: groups the rules cannot follow are declined with the reason; the graph stays
    valid, verifies against the masked original, and whatever can be pruned still is."""
    model, x = zoo(name), (torch.randn(2, 3, 64, 64),)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    gm.graph.lint()
    assert rec.modified and rec.verification.status == "passed", rec.verification.message
    assert rec.verification.details["reference_max_rel_error"] < 1e-4
    assert rec.after["macs"] < 0.9 * rec.before["macs"]
    assert gm(*x).shape == (2, 1000)
    assert any(HARD_MODELS[name] in d["reason"] for d in rec.declined), [d["reason"] for d in rec.declined]
    if name.startswith("shufflenet"):      # the branch convs between shuffles are pruned, the stream is not
        assert gm.get_submodule("stage2.1.branch2.0").out_channels < model.get_submodule("stage2.1.branch2.0").out_channels
        assert gm.get_submodule("stage2.1.branch2.3").out_channels == gm.get_submodule("stage2.1.branch2.0").out_channels
        assert gm.get_submodule("stage2.1.branch2.5").out_channels == model.get_submodule("stage2.1.branch2.5").out_channels
    if name == "timm:ghostnet_100":        # the ghost module's slice out[:, :out_chs] keeps every channel: followed
        ghost = "blocks.1.0.ghost1"
        assert gm.get_submodule(f"{ghost}.primary_conv.0").out_channels < model.get_submodule(
            f"{ghost}.primary_conv.0").out_channels
        assert gm.get_submodule(f"{ghost}.cheap_operation.0").out_channels == gm.get_submodule(
            f"{ghost}.primary_conv.0").out_channels
    if name == "timm:cs3darknet_focus_s":  # x.split(k, dim=1): the literal piece size follows the pruning
        split = next(n for n in gm.graph.nodes if n.target == "split")
        assert split.args[1] == 16 and gm.get_submodule("stages.0.conv_exp.conv").out_channels == 32  # was 32, 64


def test_cli_prune_iterative_warns_when_a_round_removes_nothing(tmp_path, capsys):
    """Issue 16 item 7: the table, prune.json/prune.md and a warning say when a round removed nothing."""
    import json

    from graphopt.cli import main

    mf = _mnist_model_file(tmp_path)
    out = tmp_path / "run"
    assert main(["prune-iterative", str(mf), "--rounds", "2", "--ratio-per-round", "0.3", "--prune", "round_to=8",
                 "--data", "digits", "--epochs-per-round", "1", "--progress", "none", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: round 2 removed nothing" in captured.err and "round 1 removed" not in captured.err
    assert "nothing" in captured.out   # the table's "pruned" column (may wrap)
    rounds = json.loads((out / "prune.json").read_text())["rounds"]
    assert rounds[1]["pruned"] and not rounds[2]["pruned"]
    assert rounds[0]["macs"] > rounds[1]["macs"] == rounds[2]["macs"]
    assert "nothing to remove after rounding" in rounds[2]["removed_nothing"]
    assert "nothing removed" in (out / "prune.md").read_text()
