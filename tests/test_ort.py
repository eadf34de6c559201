"""ONNX / ORT training emitters, the ORT training backend, and parity with PyTorch.

Tolerances (measured values in comments, this CPU, torch 2.13, onnxruntime-training 1.19.2):
- inference ONNX vs PyTorch: max abs err / max abs output <= 1e-4 (measured ~1e-7 .. 2e-6);
- small conv-bn CNN, N steps: losses equal to 1e-5 relative (measured 1e-7), SGD weights to 1e-5;
- resnet18 / mobilenet_v2 (64x64): see the parity tests; float32 training drifts from exact
  arithmetic in both runtimes, so losses are also compared with a float64 torch run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.errors import EmitError, MissingDependencyError, OrtConfigError

pytest.importorskip("onnxruntime.training")
pytestmark = pytest.mark.ort

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import graphopt.ort as go  # noqa: E402
from graphopt.ort.spec import OptimizerSpec, resolve_loss  # noqa: E402


def batches(n, shape=(4, 3, 16, 16), classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def ort_session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture
def cnn_gm(small_cnn):
    model, _ = small_cnn
    x = torch.randn(4, 3, 16, 16)
    gm, report = graphopt.optimize(model, (x,), ["cleanup"])
    return gm, report, x


# ----------------------------------------------------------------------------- --emit onnx

def test_emit_onnx_checked_and_matches_torch(cnn_gm, tmp_path):
    gm, report, x = cnn_gm
    out = go.emit_onnx_model(gm, tmp_path / "onnx", report=report)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "graphopt.onnx" and manifest["check"]["passed"]
    assert manifest["check"]["max_rel_error"] <= 1e-4
    assert [c["inputs"][0][0] for c in manifest["check"]["ort_vs_torch"]] == [4, 1]  # dynamic batch checked
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    x3 = torch.randn(3, 3, 16, 16)  # another batch size than exported
    got = ort_session(out / "model.onnx").run(None, {"input": x3.numpy()})[0]
    gm.eval()
    with torch.no_grad():
        ref = gm(x3)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- --emit ort

def test_emit_ort_folder_manifest(cnn_gm, tmp_path):
    gm, report, _ = cnn_gm
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", report=report)
    for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "torch/module.py"):
        assert (out / f).exists(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "graphopt.ort_training" and m["loss"] == "cross_entropy"
    assert m["optimizer"] == {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                              "momentum": 0.0, "ort_adam_mode": 0}
    assert sorted(m["trainable"]) == sorted(n for n, _ in gm.named_parameters())
    assert [b["mean"] for b in m["batchnorm"]] == ["bn1.running_mean", "bn2.running_mean"]
    assert all(b["per_sample"] == 256 for b in m["batchnorm"])  # 16x16 per sample
    check = m["check"]
    assert check["passed"] and check["train_check"] == "compared"
    assert check["eval_outputs_max_rel_error"] <= 1e-4 and check["train_loss_rel_error"] <= 1e-4
    assert check["gradients_compared"] == 10 and check["gradients_rel_l2_error"] < 1e-5  # measured 5e-7
    ev = onnx.load(str(out / "eval_model.onnx"))
    assert all(len(n.output) == 1 for n in ev.graph.node if n.op_type == "BatchNormalization")
    assert graphopt.load(out / "torch").graphopt_manifest["format"] == "graphopt.torch_folder"


def test_emit_ort_refuses_non_empty_folder(cnn_gm, tmp_path):
    gm, _, _ = cnn_gm
    (tmp_path / "ort").mkdir()
    (tmp_path / "ort" / "keep.txt").write_text("mine")
    with pytest.raises(EmitError, match="not empty"):
        go.emit_ort_artifacts(gm, tmp_path / "ort")
    assert (tmp_path / "ort" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("opt", [OptimizerSpec.create("sgd", lr=0.1), OptimizerSpec.create("adamw", lr=1e-2)],
                         ids=["sgd", "adamw"])
def test_parity_small_cnn(small_cnn, opt):
    model, _ = small_cnn
    r = go.compare_training(model, batches(5), optimizer=opt)
    assert r.max_rel_loss_diff <= 1e-5, (r.ort_losses, r.torch_losses)  # measured ~1e-7
    assert r.notes["int_buffers_equal"]  # num_batches_tracked advanced like torch's
    if opt.name == "sgd":
        # every weight and BatchNorm running statistic (unbiased variance, as torch) follows torch
        assert r.weights_max_abs_diff <= 1e-5
    # (AdamW here: the conv biases feeding a BatchNorm have an exactly-zero true gradient; Adam
    # turns either runtime's rounding noise in it into +-lr steps, so those biases and the running
    # means drift apart; see the bias-free test below)


def test_adamw_trains_like_torch_without_zero_gradient_params(small_cnn, tmp_path):
    """The usual conv(bias=False)-BN layout: AdamW weights, running stats and eval outputs follow torch."""
    model, _ = small_cnn
    model.conv1.bias = None  # what resnets/mobilenets do: no bias in front of a BatchNorm
    model.conv2.bias = None
    data = batches(6)
    r = go.compare_training(model, data, optimizer=OptimizerSpec.create("adamw", lr=1e-2))
    assert r.max_rel_loss_diff <= 1e-5 and r.weights_max_abs_diff <= 1e-4, r.as_dict()  # measured ~1e-6
    x0 = data[0][0]
    gm = graphopt.capture(model, (x0,))
    opt = OptimizerSpec.create("adamw", lr=1e-2)
    go.emit_ort_artifacts(gm, tmp_path / "ort", optimizer=opt, inputs=(x0,))
    be = go.OrtTrainBackend(tmp_path / "ort", threads=1)
    ref = gm.train()
    topt = opt.torch_optimizer(ref.parameters())
    for x, y in data:
        be.train_step((x,), y, 1e-2)
        topt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        topt.step()
    xt, yt = batches(1, seed=7)[0]
    _, out = be.evaluate((xt,), yt)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, ref(xt), rtol=1e-4, atol=1e-5)


def test_frozen_parameters_stay_frozen(small_cnn, tmp_path):
    model, _ = small_cnn
    for p in list(model.conv1.parameters()) + list(model.bn1.parameters()):
        p.requires_grad_(False)
    data = batches(3)
    r = go.compare_training(model, data, optimizer=OptimizerSpec.create("sgd", lr=0.1))
    assert r.max_rel_loss_diff <= 1e-5 and r.weights_max_abs_diff <= 1e-5
    gm = graphopt.capture(model, (data[0][0],))
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", optimizer=OptimizerSpec.create("sgd", lr=0.1),
                                inputs=(data[0][0],))
    m = json.loads((out / "manifest.json").read_text())
    assert m["frozen"] == ["bn1.bias", "bn1.weight", "conv1.bias", "conv1.weight"]
    assert not set(m["frozen"]) & set(m["trainable"])
    be = go.OrtTrainBackend(out, threads=1)
    before = be.state_dict()
    for x, y in data:
        be.train_step((x,), y, 0.1)
    after = be.state_dict()
    for name in m["frozen"]:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["conv2.weight"], after["conv2.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # stats still track
    # the torch folder keeps them frozen
    net = graphopt.load(out / "torch")
    assert not net.conv1.weight.requires_grad and net.conv2.weight.requires_grad


def test_train_write_back_and_export_inference(small_cnn, tmp_path):
    model, _ = small_cnn
    x0 = torch.randn(4, 3, 16, 16)
    gm = graphopt.capture(model, (x0,))
    art = go.emit_ort_artifacts(gm, tmp_path / "ort", optimizer=OptimizerSpec.create("sgd", lr=0.05), inputs=(x0,))
    train_set = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches(8))])
    test_set = torch.utils.data.TensorDataset(*[torch.cat(t) for t in zip(*batches(2, seed=3))])
    result = go.train(art, (train_set, test_set), epochs=2, batch_size=8, threads=1)
    assert [h["epoch"] for h in result.history] == [1, 2] and result.history[-1]["steps"] == 8
    assert 0.0 <= result.final["test_accuracy"] <= 1.0
    be = result.backend
    trained = be.write_torch_folder(tmp_path / "trained")
    net = graphopt.load(trained)
    assert net.graphopt_manifest["trained"]["steps"] == 8
    assert int(net.bn1.num_batches_tracked) == 8
    sd = be.state_dict()
    for name, t in net.state_dict().items():
        torch.testing.assert_close(t, sd[name].to(t.dtype), rtol=0, atol=0)
    inf = be.export_inference(tmp_path / "model.onnx")
    x, y = batches(1, seed=11)[0]
    net.eval()
    with torch.no_grad():
        ref = net(x)
    got = ort_session(inf).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)
    _, ev = be.evaluate((x,), y)
    torch.testing.assert_close(ev, ref, rtol=1e-4, atol=1e-5)
    # resume from a saved checkpoint: same weights, step count kept
    be.save_checkpoint(tmp_path / "ckpt")
    be2 = go.OrtTrainBackend(art, checkpoint=tmp_path / "ckpt")
    assert be2.steps == 8
    torch.testing.assert_close(be2.state_dict()["conv2.weight"], sd["conv2.weight"], rtol=0, atol=0)


def test_hardtanh_relu6_gradient_mask_matches_torch(tmp_path):
    """ORT differentiates ONNX Clip inclusively at its bounds; torch's relu6/hardtanh do not."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 8)
            self.act = nn.ReLU6()

        def forward(self, x):
            h = self.l(x)
            return torch.cat([self.act(h[:, :4]), F.hardtanh(h[:, 4:], -1.0, 1.0)], 1)

    m = M()
    with torch.no_grad():
        m.l.weight.zero_()
        m.l.bias.copy_(torch.tensor([0.0, 6.0, 3.0, -1.0, -1.0, 1.0, 0.5, 2.0]))  # exactly on the bounds
    x, y = torch.randn(2, 4), torch.randn(2, 8)
    gm = graphopt.capture(m, (x,))
    go.emit_ort_artifacts(gm, tmp_path / "ort", loss="mse", inputs=(x,))
    be = go.OrtTrainBackend(tmp_path / "ort")
    be.module.train()
    be.module(*be._feeds((x,), y))
    F.mse_loss(gm.train()(x), y).backward()
    torch.testing.assert_close(torch.from_numpy(be.state.parameters["l.bias"].grad.copy()), gm.l.bias.grad)
    assert gm.l.bias.grad[[0, 1, 3, 4, 5, 7]].abs().sum() == 0  # the bounds pass no gradient


def test_mixed_precision_graph_trains(tmp_path):
    class Mixed(nn.Module):  # float32 weights, half compute inside
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).half()
            h = F.adaptive_avg_pool2d(h, 1).flatten(1)
            return F.linear(h, self.fc.weight.half(), self.fc.bias.half()).float()

    torch.manual_seed(0)
    m = Mixed()
    x = torch.randn(4, 3, 16, 16)
    out = go.emit_ort_artifacts(m, tmp_path / "ort", inputs=(x,), optimizer=OptimizerSpec.create("sgd", lr=0.1))
    man = json.loads((out / "manifest.json").read_text())
    assert man["half"] and man["check"]["passed"]
    assert man["check"]["eval_outputs_max_rel_error"] < 2e-2  # measured 7e-4 (half rounding)
    r = go.compare_training(m, batches(4, classes=5), optimizer=OptimizerSpec.create("sgd", lr=0.1))
    assert r.max_rel_loss_diff <= 1e-3  # measured 3e-5


def test_pure_half_weights_refused(tmp_path):
    m = nn.Sequential(nn.Linear(4, 3)).half()
    with pytest.raises(EmitError, match="float32"):
        go.emit_ort_artifacts(m, tmp_path / "ort", inputs=(torch.randn(2, 4).half(),))
    assert not (tmp_path / "ort").exists()


class _DictOut(nn.Module):
    """Returns its logits in a dict, as a HuggingFace model returns a ``ModelOutput``."""

    def __init__(self, extra: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.extra = nn.Linear(6, 16), nn.Linear(16, 3), extra

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return {"logits": self.fc2(h), "hidden": h} if self.extra else {"logits": self.fc2(h)}


def test_dict_output_trains_on_its_one_tensor(tmp_path):
    """``{"logits": t}`` trains in ORT as ``t`` (the manifest says so); several tensors are refused, named."""
    x = (torch.randn(4, 6),)
    gm = graphopt.capture(_DictOut().eval(), x)
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", inputs=x)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["output_flattened"] == {"from": "dict", "key": "logits"}
    assert manifest["check"]["passed"] and manifest["check"]["train_check"] == "compared"
    assert isinstance(gm(*x), dict)  # the captured graph itself is unchanged
    with pytest.raises(EmitError, match=r"single tensor output; this one returns dict of 2 tensors \(logits, hidden\)"):
        go.emit_ort_artifacts(graphopt.capture(_DictOut(extra=True).eval(), x), tmp_path / "ort2", inputs=x)


@pytest.mark.slow
def test_hf_bert_trains_in_ort(tmp_path):
    """HuggingFace BERT (small config, dropout off so the training step is compared): its
    ``{"logits": ...}`` output is flattened; ORT's loss and gradients match PyTorch's."""
    pytest.importorskip("transformers")
    from graphopt import zoo

    inputs = zoo.hf_example_inputs("bert")
    model = zoo.hf_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gm = graphopt.capture(model, inputs, capture="export")
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", inputs=tuple(inputs.values()))
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["passed"] and check["train_check"] == "compared" and check["gradients_rel_l2_error"] < 1e-4


@pytest.mark.parametrize("fn,op", [(lambda y: torch.cumsum(y, 1), "CumSum"), (torch.erfinv, "aten::erfinv")],
                         ids=["no-gradient", "no-export"])
def test_untrainable_graph_names_the_operator(tmp_path, fn, op):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            return fn(torch.tanh(self.l(x)) * 0.5)

    with pytest.raises(EmitError, match=op) as info:
        go.emit_ort_artifacts(M(), tmp_path / "ort", inputs=(torch.randn(4, 8),), loss="mse")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ort").exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- losses, optimizers

def test_loss_mapping_from_model_file():
    out = torch.randn(4, 10)
    assert resolve_loss(None, lambda o, t: F.cross_entropy(o, t), out) == "cross_entropy"
    assert resolve_loss("auto", lambda o, t: ((o - t) ** 2).mean(), out) == "mse"
    assert resolve_loss(None, nn.L1Loss(), out) == "l1"
    assert resolve_loss(None, None, out) == "cross_entropy"
    assert resolve_loss("mse", F.cross_entropy, out) == "mse"  # explicit wins
    with pytest.raises(OrtConfigError, match="none of the losses"):
        resolve_loss(None, lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), out)
    with pytest.raises(OrtConfigError, match="unknown loss"):
        resolve_loss("hinge", None, out)


def test_optimizer_specs():
    assert OptimizerSpec.create("adamw").as_dict()["eps"] == 1e-8  # torch's default, not ORT's 1e-6
    with pytest.raises(OrtConfigError, match="momentum"):
        OptimizerSpec.create("sgd", momentum=0.9)
    with pytest.raises(OrtConfigError, match="weight decay"):
        OptimizerSpec.create("sgd", weight_decay=1e-4)
    with pytest.raises(OrtConfigError, match="unknown optimizer"):
        OptimizerSpec.create("lamb")
    assert OptimizerSpec.create("adamw", betas="0.8|0.99").betas == (0.8, 0.99)


# ----------------------------------------------------------------------------- packaging

def test_missing_ort_says_how_to_install(monkeypatch):
    for name in ("onnx", "onnxruntime", "onnxruntime.training", "onnxruntime.training.artifacts",
                 "onnxruntime.training.api"):
        monkeypatch.setitem(sys.modules, name, None)
    from graphopt.ort._deps import require_ort_training

    with pytest.raises(MissingDependencyError) as info:
        require_ort_training("--emit ort")
    assert "pip install 'graphopt[ort]'" in str(info.value)


def test_graphopt_imports_without_onnx():
    code = textwrap.dedent("""
        import sys
        for n in ("onnx", "onnxruntime"):
            sys.modules[n] = None
        import graphopt, graphopt.ort, graphopt.ort.onnx_emit, graphopt.ort.training_emit, graphopt.cli
        from graphopt.emit import available_emitters, create_emitter
        assert {"onnx", "ort"} <= set(available_emitters())
        try:
            create_emitter("ort").preflight()
        except graphopt.errors.MissingDependencyError as e:
            print(e)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install 'graphopt[ort]'" in res.stdout


TINY = """
import torch
import torch.nn.functional as F
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1), 1))

def model():
    return Net()

def example_inputs():
    return (torch.randn(4, 3, 16, 16),)

def loss(output, target):
    return F.mse_loss(output, target)
"""


def test_cli_emit_ort_and_onnx(tmp_path, monkeypatch):
    from graphopt.cli import main

    f = tmp_path / "tiny.py"
    f.write_text(TINY)
    rc = main(["optimize", str(f), "-p", "cleanup", "--emit", "ort", "-o", str(tmp_path / "o1"),
               "--emit-option", "optimizer=sgd", "--emit-option", "lr=0.05", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert m["loss"] == "mse"  # mapped from the model file's loss()
    assert m["optimizer"]["name"] == "sgd" and m["optimizer"]["lr"] == 0.05
    assert m["passes"] == ["cleanup"]
    assert json.loads((tmp_path / "r.json").read_text())["emit"]["check"]["passed"]
    assert main(["optimize", str(f), "-p", "cleanup", "--emit", "onnx", "-o", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o2" / "model.onnx").is_file()
    assert main(["optimize", str(f), "-p", "cleanup", "--emit", "ort", "-o", str(tmp_path / "o3"),
                 "--emit-option", "optimizer=sgd", "--emit-option", "momentum=0.9"]) == 2
    assert main(["optimize", str(f), "-p", "cleanup", "--emit", "ort", "-o", str(tmp_path / "o4"),
                 "--emit-option", "nope=1"]) == 2
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()
    # without the extra: exit 2, the install command, nothing written
    for name in ("onnx", "onnxruntime", "onnxruntime.training", "onnxruntime.training.artifacts",
                 "onnxruntime.training.api"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["optimize", str(f), "-p", "cleanup", "--emit", "ort", "-o", str(tmp_path / "o5")]) == 2
    assert not (tmp_path / "o5").exists()


# ----------------------------------------------------------------------------- real architectures

def _real(zoo, name):
    m = zoo(name, num_classes=10)
    for mod in m.modules():  # dropout masks are random and differ between runtimes
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return m


REAL = {
    # name: (input HxW, batch) chosen so float32 training is well-conditioned enough to compare
    "resnet18": (64, 4),
    "mobilenet_v2": (64, 8),
}


def _real_parity(zoo, name, opt):
    hw, b = REAL[name]
    r = go.compare_training(_real(zoo, name), batches(3, (b, 3, hw, hw)), optimizer=opt)
    # step 1 (same weights, same batch): identical up to float32 rounding
    assert abs(r.ort_losses[0] - r.torch_losses[0]) / r.torch_losses[0] <= 1e-5
    # later steps: within 2e-3 of torch, or (ill-conditioned: a few float32 steps of BatchNorm
    # training at batch 8 diverge chaotically from exact arithmetic in both runtimes) no further from
    # exact float64 training than 3x torch's own float32 drift or 2.5e-2. Measured: resnet18 sgd
    # 2.5e-4, adamw 1.0e-3; mobilenet_v2 adamw 1.7e-3; mobilenet_v2 sgd on an AVX2 Xeon: torch drift
    # 1.2e-2, ORT 2.3e-2; on an AVX-512 Xeon (Sapphire Rapids): torch 4.3e-3, ORT 1.7e-2 (its
    # step-1 gradients there are 1.5e-3 from float64, closer than torch float32's 3.6e-3). A wrong
    # gradient kernel moves the loss by far more (AveragePoolGrad: gradients 4.4e+02 off).
    drift = r.notes["ort_float32_drift"]
    assert r.max_rel_loss_diff <= 2e-3 or drift <= max(3 * r.notes["torch_float32_drift"], 2.5e-2), \
        (r.ort_losses, r.torch_losses, r.notes)
    return r


@pytest.mark.zoo
@pytest.mark.parametrize("name,opt", [("resnet18", "adamw"), ("mobilenet_v2", "sgd")])
def test_real_parity(zoo, name, opt):
    _real_parity(zoo, name, OptimizerSpec.create(opt, lr=1e-3 if opt == "adamw" else 0.01))


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name,opt", [("resnet18", "sgd"), ("mobilenet_v2", "adamw")])
def test_real_parity_slow(zoo, name, opt):
    _real_parity(zoo, name, OptimizerSpec.create(opt, lr=1e-3 if opt == "adamw" else 0.01))


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_real_inference_onnx_matches(zoo, name, tmp_path):
    hw, _ = REAL[name]
    m = _real(zoo, name)
    out = go.emit_onnx_model(m, tmp_path / "onnx", inputs=(torch.randn(2, 3, hw, hw),))
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["passed"] and check["max_rel_error"] <= 1e-4


@pytest.mark.parametrize("spec,tol", [("prune:ratio=0.5,mode=structured", 1e-5), ("mixed_precision", 1e-3),
                                      ("depthwise_separable", 1e-5), ("freeze:mode=head", 1e-5)])
def test_pass_variants_train_in_ort(spec, tol, tmp_path):
    """Rewritten graphs (pruned; float32 weights with half compute) emit, check and train like torch."""
    from tests.conftest import SmallCNN

    if spec.split(":")[0] not in graphopt.available_passes():
        pytest.skip(f"pass {spec} not in this tree")
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    gm, report = graphopt.optimize(SmallCNN(c=16).eval(), (x,), [spec])
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", report=report)
    check = json.loads((out / "manifest.json").read_text())["check"]
    assert check["passed"] and check["train_check"] == "compared"
    r = go.compare_training(gm, batches(3), optimizer=OptimizerSpec.create("sgd", lr=0.05))
    assert r.max_rel_loss_diff <= tol, (r.ort_losses, r.torch_losses)  # measured: prune ~1e-7, mixed ~1e-4


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("spec", ["prune:ratio=0.5,mode=structured", "depthwise_separable:budget=2",
                                  "freeze:mode=stages,stages=2"])
def test_real_pass_variants_train_in_ort(zoo, name, spec, tmp_path):
    """resnet18 / mobilenet_v2 pruned, depthwise-separable and frozen: emit ORT artifacts (the emit-time
    comparison with PyTorch must pass) and train like torch from the same weights and batches."""
    hw, b = REAL[name]
    x = torch.randn(b, 3, hw, hw)
    gm, report = graphopt.optimize(_real(zoo, name), (x,), [spec])
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", report=report)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"]
    if spec.startswith("freeze"):
        assert manifest["frozen"], "frozen parameters must be frozen in ORT too"
    r = go.compare_training(gm, batches(3, (b, 3, hw, hw)), optimizer=OptimizerSpec.create("adamw", lr=1e-3))
    assert abs(r.ort_losses[0] - r.torch_losses[0]) / r.torch_losses[0] <= 1e-4  # same weights, same batch
    # later steps: resnet18 within 2e-3; mobilenet_v2 carries ORT's known ~1e-2 gradient gap (README,
    # "Limits"): measured 1.1e-2 for the pruned variant after 3 AdamW steps
    bound = 2e-2 if name == "mobilenet_v2" else 2e-3
    assert r.max_rel_loss_diff <= bound or r.notes["ort_float32_drift"] <= 3 * r.notes["torch_float32_drift"]


# -- the ORT backend inside the training harness (graphopt train --backend ort) -------------------------
HARNESS_MODEL = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

def example_inputs():
    return (torch.randn(4, 1, 8, 8),)

def loss(output, target):
    return nn.functional.cross_entropy(output, target)
'''


@pytest.mark.ort
def test_harness_trains_with_the_ort_backend_like_the_torch_backend():
    """Same data, schedule and initial weights: ORT and torch follow the same loss curve."""
    from graphopt.bench import TrainConfig, fit
    from graphopt.bench.data import load_builtin

    train, test = load_builtin("digits")
    data = (torch.utils.data.Subset(train, range(256)), torch.utils.data.Subset(test, range(128)))
    results = {}
    for backend in ("torch", "ort"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        cfg = TrainConfig(epochs=2, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0.01,
                          schedule="cosine", val_fraction=0.0, backend=backend)
        results[backend] = fit(net, data, cfg, example_inputs=(torch.randn(4, 1, 8, 8),))
    t, o = results["torch"], results["ort"]
    assert type(o.backend).__name__ == "OrtTrainBackend"
    tl = [h.train_loss for h in t.history]
    ol = [h.train_loss for h in o.history]
    assert ol[-1] < ol[0]
    for a, b in zip(ol, tl):
        assert abs(a - b) <= 2e-3 * max(1.0, abs(b)), (ol, tl)


@pytest.mark.ort
def test_cli_train_backend_ort_writes_torch_folder_and_onnx(tmp_path):
    import onnxruntime as ort

    import graphopt
    from graphopt.cli import main

    mf = tmp_path / "m.py"
    mf.write_text(HARNESS_MODEL)
    out = tmp_path / "run"
    assert main(["train", str(mf), "--backend", "ort", "--optimizer", "adamw", "--lr", "0.003", "--data", "digits",
                 "--epochs", "1", "--batch-size", "64", "--progress", "none", "-o", str(out)]) == 0
    trained = graphopt.load(out / "model").eval()
    x = torch.randn(3, 1, 8, 8)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), trained(x), rtol=1e-4, atol=1e-4)


@pytest.mark.ort
def test_cli_train_backend_ort_rejects_momentum_sgd(tmp_path, capsys):
    from graphopt.cli import main

    mf = tmp_path / "m.py"
    mf.write_text(HARNESS_MODEL)
    assert main(["train", str(mf), "--backend", "ort", "--optimizer", "sgd", "--data", "digits", "--epochs", "1",
                 "--progress", "none"]) == 2
    assert "has no momentum" in capsys.readouterr().err


@pytest.mark.ort
def test_a_native_onnxruntime_crash_becomes_a_one_line_error(tmp_path, monkeypatch):
    """Some graphs crash onnxruntime-training natively in a training step; the emitter probes one step
    in a child process so the user's process lives. The crash is simulated (the probe child kills
    itself with SIGSEGV): whether a given onnxruntime build crashes on a given graph is not
    deterministic enough for a test to depend on."""
    import graphopt.ort.parity as parity
    from graphopt.ort.training_emit import emit_ort_artifacts

    monkeypatch.setattr(parity, "_CRASH_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(EmitError) as info:
        emit_ort_artifacts(net, tmp_path / "a", inputs=(torch.randn(4, 1, 8, 8),))
    msg = str(info.value)
    assert "\n" not in msg and "crashed (SIGSEGV)" in msg and "ConvGrad" in msg
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_ort_that_trains_a_graph_wrongly_is_refused_in_one_line(tmp_path):
    """onnxruntime-training 1.19 gets AveragePoolGrad wrong for an adaptive average pool with output
    2x2 (on some machines it crashes instead): either way the user gets one line and no folder; an
    onnxruntime that trains it correctly yields a checked folder."""
    from graphopt.ort.training_emit import emit_ort_artifacts

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    try:
        emit_ort_artifacts(net, tmp_path / "a", inputs=(torch.randn(4, 1, 8, 8),))
    except EmitError as exc:
        msg = str(exc)
        assert "\n" not in msg
        assert ("crashed (SIGSEGV)" in msg and "AveragePoolGrad" in msg) or "does not compute what the graph" in msg
        assert list(tmp_path.iterdir()) == []  # nothing left behind
    else:  # an onnxruntime that trains it correctly
        manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
        assert manifest["check"]["passed"]


# ----------------------------------------------------------------------------- transformers (LayerNorm)

TRANSFORMER_MODEL = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(32, 16)
        self.ln1 = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.ln2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        x = self.tok(ids)
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))

def model():
    torch.manual_seed(0)
    return Tiny()

def example_inputs():
    return (torch.randint(0, 32, (4, 6), generator=torch.Generator().manual_seed(0)),)

def data():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (64, 6), generator=g)
    y = (ids[:, 0] % 3).long()
    ds = torch.utils.data.TensorDataset(ids, y)
    return ds, ds
'''


def test_transformer_with_layernorm_trains_in_ort(tmp_path):
    """onnxruntime-training 1.19's LayerNormalization gradient needs the node's Mean/InvStdDev outputs,
    which torch.onnx leaves out: the artifacts give the nodes those outputs, and the emit-time check
    compares ORT's training step with PyTorch's."""
    from tests.transformer_models import bert, bert_inputs

    inputs = bert_inputs()
    gm, report = graphopt.optimize(bert(dropout=0.0), inputs, ["cleanup"])  # no dropout: gradients compared
    out = go.emit_ort_artifacts(gm, tmp_path / "ort", inputs=inputs, report=report)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] and manifest["check"]["train_check"] == "compared"
    model = onnx.load(str(out / "training_model.onnx"))
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 5 and all(len(n.output) == 3 for n in norms)


def test_cli_train_backend_ort_on_a_transformer(tmp_path):
    from graphopt.cli import main

    mf = tmp_path / "m.py"
    mf.write_text(TRANSFORMER_MODEL)
    out = tmp_path / "run"
    assert main(["train", str(mf), "--backend", "ort", "--optimizer", "adamw", "--lr", "0.01", "--data", "model",
                 "--epochs", "2", "--batch-size", "16", "--progress", "none", "-o", str(out)]) == 0
    history = json.loads((out / "train.json").read_text())["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_ort_gradient_that_needs_missing_outputs_names_the_op(tmp_path, monkeypatch):
    """Without the statistics outputs, onnxruntime-training fails with an assertion that names no node
    (``GradientBuilderBase::O ... i < node_->OutputDefs().size() was false``): the error names it."""
    import graphopt.ort.artifacts as artifacts

    monkeypatch.setattr(artifacts, "_expose_norm_statistics", lambda model: [])
    ns: dict = {}
    exec(TRANSFORMER_MODEL, ns)
    with pytest.raises(EmitError) as info:
        go.emit_ort_artifacts(ns["model"](), tmp_path / "ort", inputs=ns["example_inputs"]())
    msg = str(info.value)
    assert "\n" not in msg and "cannot differentiate LayerNormalization" in msg
    assert "(op at node /ln1/LayerNormalization)" in msg and "torch backend" in msg
    assert list(tmp_path.iterdir()) == []
