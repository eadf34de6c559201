"""mixed_precision: low-precision compute inside the graph, float32 master weights (APPROXIMATE)."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import graphopt
from graphopt.cli import main
from graphopt.errors import PreconditionError, VerificationError
from graphopt.precision import get_policy
from graphopt.testing import assert_idempotent, count_calls, count_modules, run_pass
from graphopt.precision import cleanup_casts, compare_with_references, count_casts
from passes.mixed_precision import MixedPrecision
from precision_models import Block, NoHeavy, SdpaBlock, Tiny, UserCasts, calibrate_bn, small_vit


def _to_calls(gm: fx.GraphModule, dtype: torch.dtype) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "to" and n.args[1] == dtype)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------- fixture: SmallCNN

def test_small_cnn_counts_and_policy(small_cnn):
    model, inputs = small_cnn
    # before: 2 Conv2d + 1 Linear modules, no casts
    assert count_modules(graphopt.capture(model, inputs), (nn.Conv2d, nn.Linear)) == 3
    gm, rec = run_pass("mixed_precision", model, inputs)
    gm.graph.lint()
    assert rec.modified
    assert count_modules(gm, (nn.Conv2d, nn.Linear)) == 0  # now functional on cast weights
    assert count_calls(gm, torch.conv2d) == 2 and count_calls(gm, F.linear) == 1
    assert count_modules(gm, nn.BatchNorm2d) == 2  # BatchNorm stays a float32 module
    # 1 input cast + 6 parameter casts (2x conv w/b, fc w/b) down, 1 output cast up
    assert _to_calls(gm, torch.float16) == 7 and _to_calls(gm, torch.float32) == 1
    casts = rec.notes["casts"]
    assert casts == {"before": 0, "inserted": 8, "removed": 0, "removed_by_rule": {}, "after": 8,
                     "parameter_casts": 6}
    assert rec.notes["low_precision_ops"] == {"conv2d": 2, "linear": 1}
    assert rec.notes["batchnorm_mixed"] == 2
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # master weights stay float32
    pol = get_policy(gm)
    assert (pol.mode, pol.dtype, pol.loss_scaling, pol.master_weights) == ("mixed", "float16", "dynamic", False)
    assert len(rec.rewrites) == 4 and not rec.declined  # 3 ops lowered + the output cast


def test_small_cnn_numbers_against_float64_and_autocast(small_cnn):
    model, inputs = small_cnn
    gm, rec = run_pass("mixed_precision", model, inputs)
    ver = rec.verification
    assert ver.status == "passed" and ver.metric == "rel_l2_error"
    d = ver.details["precision"]
    assert d["reference"] == "float64"
    # measured here: graphopt 2.5e-4 on outputs and gradients, identical to autocast
    assert d["graphopt"]["outputs"] < 1e-3 and d["graphopt"]["grads"] < 1e-3
    assert d["ratio_to_autocast"]["outputs"] <= 2.0 and d["ratio_to_autocast"]["grads"] <= 2.0
    assert d["float32"]["outputs"] < 1e-6  # the float32 graph itself is ~1e-7 from float64
    with torch.no_grad():
        out, ref = gm(*inputs), model(*inputs)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3 * ref.abs().max().item())
    # gradients reach the float32 parameters as float32
    gm.train()
    gm(*inputs).sum().backward()
    assert gm.get_parameter("conv1.weight").grad.dtype == torch.float32


def test_bfloat16_needs_no_loss_scaling(small_cnn):
    model, inputs = small_cnn
    gm, rec = run_pass("mixed_precision:dtype=bfloat16", model, inputs)
    assert _to_calls(gm, torch.bfloat16) == 7
    pol = get_policy(gm)
    assert pol.dtype == "bfloat16" and pol.loss_scaling is None
    assert rec.verification.details["precision"]["graphopt"]["outputs"] < 1e-2  # measured 3.4e-3


def test_batchnorm_float32_option(small_cnn):
    model, inputs = small_cnn
    gm, rec = run_pass("mixed_precision:batchnorm=float32", model, inputs)
    # each BN gets its half input cast up; ReLU (and pooling) then run in float32 and the next
    # conv/linear casts down again: 2 more up-casts and 2 more down-casts than the default
    assert _to_calls(gm, torch.float32) == 1 + 2
    assert _to_calls(gm, torch.float16) == 7 + 2
    assert rec.notes["float32_ops"] == {"BatchNorm2d": 2} and rec.notes["batchnorm_mixed"] == 0


def test_exclude_keeps_module_float32(small_cnn):
    model, inputs = small_cnn
    gm, rec = run_pass("mixed_precision:exclude=fc", model, inputs)
    assert count_modules(gm, nn.Linear) == 1 and count_calls(gm, F.linear) == 0
    assert {"target": "fc", "reason": "excluded by the 'exclude' option: runs in float32"} in rec.declined
    assert rec.notes["low_precision_ops"] == {"conv2d": 2}


def test_idempotent(small_cnn):
    model, inputs = small_cnn
    gm, _ = run_pass("mixed_precision", model, inputs)
    assert_idempotent("mixed_precision", gm, inputs)


def test_negative_no_heavy_ops():
    model, inputs = NoHeavy(), (torch.randn(2, 3, 4),)
    before = graphopt.capture(model, inputs).code
    gm, rec = run_pass("mixed_precision", model, inputs)
    assert not rec.modified and gm.code == before
    assert rec.declined[0]["target"] == "graph" and "nothing gains" in rec.declined[0]["reason"]
    assert get_policy(gm) is None
    assert rec.verification.status == "skipped"


def test_refuses_a_graph_with_another_policy(small_cnn):
    model, inputs = small_cnn
    gm, _ = run_pass("cast:dtype=bfloat16", model, inputs)
    with pytest.raises(PreconditionError, match="already has a half bfloat16 precision policy"):
        run_pass("mixed_precision", gm, inputs)


# ----------------------------------------------------------------------------- op policy

def test_transformer_block_policy():
    torch.manual_seed(0)
    model, inputs = Block().eval(), (torch.randn(2, 6, 32),)
    gm, rec = run_pass("mixed_precision", model, inputs)
    assert count_modules(gm, (nn.Linear, nn.MultiheadAttention)) == 0
    assert count_calls(gm, F.multi_head_attention_forward) == 1
    assert count_modules(gm, nn.LayerNorm) == 2  # float32, fed the float32 residual stream
    assert rec.notes["low_precision_ops"] == {"linear": 2, "multi_head_attention": 1}
    assert rec.notes["float32_ops"] == {"LayerNorm": 2}
    # casts: 2 LN outputs down, 8 parameters down (in_proj w/b, out_proj w/b, fc1 w/b, fc2 w/b)
    assert rec.notes["casts"]["after"] == 10 and rec.notes["casts"]["parameter_casts"] == 8
    env = {}
    # the residual stream (every add) stays float32, as under autocast
    interp = fx.Interpreter(gm)
    orig_run = interp.run_node

    def run_node(n):
        env[n] = orig_run(n)
        return env[n]

    interp.run_node = run_node
    interp.run(*inputs)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert adds and all(env[n].dtype == torch.float32 for n in adds)
    lows = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert all(env[n].dtype == torch.float16 for n in lows)
    d = rec.verification.details["precision"]
    assert d["graphopt"]["outputs"] < 1e-3 and d["ratio_to_autocast"]["grads"] <= 2.0  # measured 1.6e-4, 1.0x


def test_functional_attention_softmax_stays_float32():
    torch.manual_seed(0)
    model, inputs = SdpaBlock().eval(), (torch.randn(2, 6, 32),)
    gm, rec = run_pass("mixed_precision", model, inputs)
    assert rec.notes["low_precision_ops"] == {"linear": 2, "matmul": 2, "scaled_dot_product_attention": 1}
    assert rec.notes["float32_ops"] == {"LayerNorm": 1, "softmax": 1}  # `int ** -0.5` is not counted
    softmax = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax")
    assert softmax.args[0].op == "call_method" and softmax.args[0].args[1] == torch.float32  # cast up
    assert rec.verification.details["precision"]["ratio_to_autocast"]["outputs"] <= 2.0


def test_user_casts_cleaned_up():
    torch.manual_seed(0)
    model, inputs = UserCasts().eval(), (torch.randn(2, 3, 8, 8),)
    gm, rec = run_pass("mixed_precision", model, inputs)
    casts = rec.notes["casts"]
    # x.float() on a float32 input and .to(float32) of a float32 log_softmax are now no-ops;
    # the user's logits.float() is kept (it is the up-cast the fp32 log_softmax needs)
    assert casts["before"] == 3 and casts["removed_by_rule"] == {"same_dtype": 2}
    assert casts["after"] == casts["before"] + casts["inserted"] - casts["removed"] == count_casts(gm)
    assert count_calls(gm, "float") == 1


def test_cleanup_rules_on_a_handmade_graph():
    g = fx.Graph()
    x = g.placeholder("x")
    h = g.placeholder("h")
    down = g.call_method("to", (x, torch.float16))
    lossy = g.call_method("to", (down, torch.float32))  # f32 -> f16 -> f32: use x
    up = g.call_method("to", (h, torch.float32))
    lossless = g.call_method("to", (up, torch.float16))  # f16 -> f32 -> f16: use h exactly
    via = g.call_method("to", (up, torch.bfloat16))  # f16 -> f32 -> bf16 == f16 -> bf16
    dup1 = g.call_method("to", (x, torch.bfloat16))
    dup2 = g.call_method("to", (x, torch.bfloat16))  # duplicate of dup1
    g.call_method("to", (x, torch.float64))  # dead
    g.output((lossy, lossless, via, dup1, dup2))
    gm = fx.GraphModule(nn.Module(), g)
    xv, hv = torch.randn(5), torch.randn(5).half()
    env = {x: xv, h: hv}
    counts = cleanup_casts(gm, env)
    assert counts == {"same_dtype": 0, "round_trip_lossless": 1, "round_trip_lossy": 1, "cast_of_cast": 1,
                      "duplicate": 1, "dead": 3}  # dead: the f64 cast, then `down` and `up` once unused
    gm.graph.lint()
    gm.recompile()
    a, b, c, d, e = gm(xv, hv)
    assert torch.equal(a, xv) and torch.equal(b, hv) and torch.equal(c, hv.to(torch.bfloat16))
    assert count_casts(gm) == 2  # h -> bf16, x -> bf16


# ----------------------------------------------------------------------------- verification can fail

def test_float16_underflow_fails_the_budget():
    torch.manual_seed(0)
    model, inputs = Tiny().eval(), (torch.randn(2, 16),)  # outputs ~1e-9 flush to zero in float16
    with pytest.raises(VerificationError, match="mixed_precision.*rel_l2_error 1.00e\\+00"):
        run_pass("mixed_precision", model, inputs)
    gm, rec = run_pass("mixed_precision:dtype=bfloat16", model, inputs)  # float32's exponent range
    assert rec.verification.status == "passed"


class _SloppyMixed(MixedPrecision):
    """A broken variant: also rounds the float32 master weights to bfloat16."""

    name = "sloppy_mixed"

    def call(self, gm):
        result = super().call(gm)
        with torch.no_grad():
            for p in gm.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        return result


def test_autocast_factor_check_fails_a_worse_graph(small_cnn):
    model, inputs = small_cnn
    with pytest.raises(VerificationError, match="x torch.autocast") as exc:
        graphopt.optimize(model, inputs, [_SloppyMixed(autocast_factor=2.0, budget=0.5)])
    ver = exc.value.report.records[0].verification
    assert ver.status == "failed" and "torch.autocast" in ver.message


def test_compare_with_references_direct(small_cnn):
    model, inputs = small_cnn
    worse = graphopt.capture(model, inputs)
    with torch.no_grad():
        for p in worse.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # bfloat16 weights vs a float16 autocast
    with pytest.raises(VerificationError, match="torch.autocast"):
        compare_with_references(model, worse, inputs, torch.float16, factor=2.0)
    d = compare_with_references(model, model, inputs, torch.float16, factor=2.0)
    assert d["graphopt"]["outputs"] < 1e-6  # the float32 model itself


@torch.fx.wrap
def needs_float32(x):
    if x.dtype != torch.float32:
        raise RuntimeError(f"\"needs_float32\" not implemented for '{x.dtype}'")
    return x * 2


class _NoHalfKernel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(needs_float32(self.a(x)))


def test_op_without_half_kernel_is_demoted_and_declined():
    torch.manual_seed(0)
    gm, rec = run_pass("mixed_precision", _NoHalfKernel().eval(), (torch.randn(2, 8),))
    assert rec.verification.status == "passed"
    why = [d for d in rec.declined if "needs_float32" in d["target"]]
    assert why and "no float16 kernel on this device" in why[0]["reason"] and "runs in float32" in why[0]["reason"]


# ----------------------------------------------------------------------------- emit / reload / CLI

def test_emit_reload_keeps_policy(tmp_path, small_cnn):
    model, inputs = small_cnn
    gm, report = graphopt.optimize(model, inputs, ["mixed_precision:dtype=bfloat16"])
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["precision"]["dtype"] == "bfloat16" and manifest["precision"]["mode"] == "mixed"
    assert manifest["dtypes"] == {}  # parameters stay float32
    assert "x.to(torch.bfloat16)" in (tmp_path / "out" / "module.py").read_text()
    loaded = graphopt.load(tmp_path / "out").eval()
    assert get_policy(loaded) == get_policy(gm)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), gm(*inputs))  # measured: bit-identical on CPU


def test_mha_dropout_follows_train_eval_after_reload(tmp_path):
    torch.manual_seed(0)
    model, inputs = Block(dropout=0.5).eval(), (torch.randn(2, 6, 32),)
    gm, report = graphopt.optimize(model, inputs, ["mixed_precision:dtype=bfloat16"])
    assert "attn.training" in gm.code  # dropout reads the module's flag at run time
    graphopt.emit_torch_folder(gm, tmp_path / "out", report=report)
    loaded = graphopt.load(tmp_path / "out")
    with torch.no_grad():
        loaded.train()
        assert not torch.equal(loaded(*inputs), loaded(*inputs))  # attention dropout active
        loaded.eval()
        assert torch.equal(loaded(*inputs), loaded(*inputs))


MODEL_FILE = """
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()

def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
"""


def test_cli(tmp_path):
    mf = tmp_path / "m.py"
    mf.write_text(MODEL_FILE)
    out = tmp_path / "out"
    rc = main(["optimize", str(mf), "-p", "mixed_precision:dtype=float16", "-o", str(out),
               "--report", str(tmp_path / "r.json")])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert rep["name"] == "mixed_precision" and rep["verification"]["status"] == "passed"
    assert rep["verification"]["details"]["precision"]["reference"] == "float64"
    assert get_policy(graphopt.load(out)).loss_scaling == "dynamic"
    assert main(["optimize", str(mf), "-p", "mixed_precision:dtype=int8", "-o", str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- real architectures

def _check_real(model, inputs, spec, heavy_modules):
    gm, rec = run_pass(spec, model, inputs)
    gm.graph.lint()
    assert rec.modified and rec.verification.status == "passed"
    assert count_modules(gm, heavy_modules) == 0
    d = rec.verification.details["precision"]
    assert d["reference"] == "float64"
    assert d["ratio_to_autocast"]["outputs"] <= 2.0 and d["ratio_to_autocast"]["grads"] <= 2.0
    assert all(p.dtype == torch.float32 for p in gm.parameters())
    return gm, rec


@pytest.mark.zoo
def test_resnet18_float16(zoo):
    x = torch.randn(2, 3, 32, 32)
    model = calibrate_bn(zoo("resnet18"), x)
    gm, rec = _check_real(model, (x,), "mixed_precision", (nn.Conv2d, nn.Linear))
    assert rec.notes["low_precision_ops"] == {"conv2d": 20, "linear": 1}
    assert rec.notes["batchnorm_mixed"] == 20
    # input, 20 conv weights, fc weight + bias down; logits up (convs have no bias)
    assert rec.notes["casts"]["after"] == 24 and rec.notes["casts"]["parameter_casts"] == 22


@pytest.mark.zoo
def test_mobilenet_v2_bfloat16(zoo):
    x = torch.randn(2, 3, 32, 32)
    model = calibrate_bn(zoo("mobilenet_v2"), x)
    gm, rec = _check_real(model, (x,), "mixed_precision:dtype=bfloat16", (nn.Conv2d, nn.Linear))
    assert rec.notes["low_precision_ops"] == {"conv2d": 52, "linear": 1}


@pytest.mark.zoo
def test_small_torchvision_vit():
    model = small_vit()
    gm, rec = _check_real(model, (torch.randn(2, 3, 32, 32),), "mixed_precision",
                          (nn.Conv2d, nn.Linear, nn.MultiheadAttention))
    assert rec.notes["low_precision_ops"] == {"conv2d": 1, "linear": 5, "multi_head_attention": 2}
    assert rec.notes["float32_ops"] == {"LayerNorm": 5}


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name,spec", [
    ("resnet18", "mixed_precision:dtype=bfloat16"),
    ("mobilenet_v2", "mixed_precision"),
    ("vit_b_16", "mixed_precision"),
    ("vit_b_16", "mixed_precision:dtype=bfloat16"),
])
def test_real_architectures_slow(zoo, name, spec):
    if name == "vit_b_16":
        model = zoo("vit_b_16", image_size=32)
        nn.init.normal_(model.heads.head.weight, std=0.02)
    else:
        model = calibrate_bn(zoo(name), torch.randn(2, 3, 64, 64))
    x = torch.randn(2, 3, 32 if name == "vit_b_16" else 64, 32 if name == "vit_b_16" else 64)
    gm, rec = _check_real(model, (x,), spec, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))
    if name == "vit_b_16":
        assert rec.notes["low_precision_ops"]["multi_head_attention"] == 12
    assert_idempotent(spec, gm, (x,))


class _WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.lstm(self.inp(x))
        return self.out(h)


def test_leaf_with_heavy_internals_is_declined_and_runs_float32():
    torch.manual_seed(0)
    gm, rec = run_pass("mixed_precision", _WithLSTM().eval(), (torch.randn(2, 5, 8),))
    assert {"target": "lstm", "reason": "LSTM is a leaf module whose internals the rewrite does not reach: "
                                        "runs in float32"} in rec.declined
    lstm = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "lstm")
    assert lstm.args[0].op == "call_method" and lstm.args[0].args[1] == torch.float32  # half input cast up
    assert rec.notes["low_precision_ops"] == {"linear": 2}
    assert rec.verification.status == "passed"


@pytest.mark.zoo
@pytest.mark.parametrize("name,kw", [
    # global-average-pool ViT (trained at 256 px), DeiT-III (384 px), ViT-Base variants: built small.
    ("timm:vit_base_patch16_gap_224", dict(img_size=32, patch_size=8)),
    ("timm:deit3_small_patch16_384", dict(img_size=32, patch_size=8)),
    ("timm:vit_base_patch16_224", dict(img_size=32, patch_size=8)),
    ("timm:vit_base_patch32_clip_224", dict(img_size=32, patch_size=16)),
])
def test_timm_vits_with_optional_forward_arguments(zoo, name, kw):
    """timm's ViT forward has optional arguments (``attn_mask=None``, ``is_causal=False``) that the
    captured graph keeps as placeholders with defaults: the sweep runs them at their defaults."""
    torch.manual_seed(0)
    model = zoo(name, embed_dim=32, depth=2, num_heads=2, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    placeholders = [n for n in graphopt.capture(model, (x,)).graph.nodes if n.op == "placeholder"]
    assert len(placeholders) > 1  # the defaulted arguments are in the graph
    gm, rec = run_pass("mixed_precision", model, (x,))
    assert rec.modified and rec.verification.status == "passed"
    assert rec.notes["low_precision_ops"]["linear"] >= 2 * 4 + 1  # qkv, proj, fc1, fc2 per block + head
    assert rec.verification.value < 0.05
    torch.testing.assert_close(gm(x), model(x), rtol=0.05, atol=0.05)
