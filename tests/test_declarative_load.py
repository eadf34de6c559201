"""graphopt.load runs no code from the folder (issue 16 item 14): the module is rebuilt from graph.json.

module.py stays in the folder for people to read; only ``trust_code=True`` imports it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt.emit.fs import sha256_file
from graphopt.errors import ArtifactError


def reseal(folder: Path, *names: str) -> None:
    """Update the manifest's checksums as a tamperer would (checksums catch corruption, not tampering)."""
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for name in names:
        manifest["files"][name] = sha256_file(folder / name)
    mpath.write_text(json.dumps(manifest))


def emit(module, inputs, out, passes=()):
    if passes:
        gm, report = graphopt.optimize(module, inputs, list(passes))
    else:
        gm, report = graphopt.capture(module, inputs), None
    return gm, graphopt.emit_torch_folder(gm, out, report=report)


EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("module.py ran")
import torch
import torch.nn as nn


class {cls}(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return torch.zeros(x.shape[0], 10)
'''


def test_a_replaced_module_py_is_not_run(small_cnn, tmp_path):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    marker = tmp_path / "marker.txt"
    cls = json.loads((out / "manifest.json").read_text())["class_name"]
    (out / "module.py").write_text(EVIL.format(marker=str(marker), cls=cls))
    reseal(out, "module.py")

    loaded = graphopt.load(out).eval()
    assert not marker.exists()  # nothing from the folder ran
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)

    # trust_code=True imports module.py: that is exactly what it does, for folders one trusts
    trusted = graphopt.load(out, trust_code=True).eval()
    assert marker.read_text() == "module.py ran"
    assert torch.count_nonzero(trusted(*inputs)) == 0


def test_trust_code_still_loads_the_emitted_source(small_cnn, tmp_path):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out", passes=["channels_last"])
    a = graphopt.load(out).eval()
    b = graphopt.load(out, trust_code=True).eval()
    assert type(a).__name__ == type(b).__name__ == "OptimizedSmallCNN"
    assert isinstance(a, torch.fx.GraphModule) and not isinstance(b, torch.fx.GraphModule)
    assert a.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), rtol=0, atol=0)
    assert a.state_dict().keys() == b.state_dict().keys()


def _node(name, target, args, op="call_function"):
    return {"op": op, "name": name, "target": target, "args": {"tuple": args}, "kwargs": {}}


@pytest.mark.parametrize("edit, fragment", [
    # a call of eval/exec/open or of a non-tensor function of torch
    (lambda d, m: d["nodes"].insert(1, _node("evil", "builtins.eval", [f"open({m!r}, 'w')"])),
     "'builtins.eval' is not on the allowlist"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "torch.load", [m])), "'torch.load' is not on the allowlist"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "operator.call", [m])), "'operator.call' is not on the allowlist"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "os.system", [f"touch {m}"])), "'os.system' is not on the"),
    # a module class outside torch.nn / graphopt
    (lambda d, m: d["modules"].append({"path": "evil", "class": "subprocess.Popen", "kwargs": {"args": ["true"]}}),
     "module class 'subprocess.Popen' is not on the allowlist"),
    # private attributes and methods (the way to reach __globals__ / __builtins__)
    (lambda d, m: d["nodes"].insert(1, _node("evil", "builtins.getattr", [{"node": "x"}, "__class__"])),
     "getattr of a private or computed attribute"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "__reduce_ex__", [{"node": "x"}, 2], op="call_method")),
     "'__reduce_ex__' is not a public tensor method"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "apply_", [{"node": "x"}], op="call_method")),
     "'apply_' is not a public tensor method"),
    # code smuggled into names that end up in generated source
    (lambda d, m: d["nodes"].insert(1, _node("x; import os", "torch.relu", [{"node": "x"}])),
     "is not a fresh identifier"),
    (lambda d, m: d["nodes"].insert(1, _node("evil", "conv1.__class__", [{"node": "x"}], op="call_module")),
     "is not a module path"),
])
def test_a_tampered_graph_json_is_refused_without_running_anything(small_cnn, tmp_path, edit, fragment):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    marker = str(tmp_path / "marker.txt")
    doc = json.loads((out / "graph.json").read_text())
    edit(doc, marker)
    (out / "graph.json").write_text(json.dumps(doc))
    reseal(out, "graph.json")
    with pytest.raises(ArtifactError) as info:
        graphopt.load(out)
    msg = str(info.value)
    assert fragment in msg and "trust_code=True" in msg and "\n" not in msg
    assert not Path(marker).exists()


def test_an_older_folder_without_graph_json_needs_trust_code(small_cnn, tmp_path):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    (out / "graph.json").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["graph.json"], manifest["declarative"], manifest["needs_code"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError) as info:
        graphopt.load(out)
    assert str(info.value) == (f"{out}: rebuilding this model needs code (the folder was written by a graphopt "
                               "without graph.json); the default load runs none (pass trust_code=True (CLI: "
                               "--trust-code) if you trust the folder's module.py, or re-emit the folder)")
    loaded = graphopt.load(out, trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)


def test_a_graph_outside_the_allowlist_is_emitted_but_needs_trust_code(zoo, tmp_path):
    """An opaque (untraced) module of another package: module.py imports it, graph.json cannot name it."""
    zoo("resnet18")  # sets up the torchvision stub timm imports
    timm_layers = pytest.importorskip("timm.layers")
    GELU = timm_layers.GELU

    from graphopt.capture import GraphoptTracer

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = GELU()

        def forward(self, x):
            return self.act(self.fc(x))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4)
    gm0 = graphopt.capture(net, (x,))
    gm = torch.fx.GraphModule(net, GraphoptTracer(opaque={"act"}).trace(net))
    gm.meta["graphopt"] = gm0.meta["graphopt"]
    out = graphopt.emit_torch_folder(gm, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["declarative"] is False and "timm.layers" in manifest["needs_code"]
    assert not (out / "graph.json").exists() and (out / "module.py").exists()
    with pytest.raises(ArtifactError, match=r"needs code \(module class timm\.layers.* is not on the allowlist"):
        graphopt.load(out)
    loaded = graphopt.load(out, trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


# ----------------------------------------------------------------------------- real architectures

def _same_training_step(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    """Train-mode outputs and parameter gradients (same seed: same dropout masks) are equal."""
    grads = []
    for m in (a, b):
        m.train()
        m.zero_grad()
        torch.manual_seed(1)
        y = m(x)
        y.float().square().mean().backward()
        grads.append((y.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    # element-wise relative error is meaningless on near-zero gradient elements: a train-mode BatchNorm
    # backward over 2x32x32 inputs amplifies float32 rounding (a different conv algorithm for a different
    # gradient layout is enough); each tensor is judged against its own scale
    for k in grads[0][1]:
        g0, g1 = grads[0][1][k], grads[1][1][k]
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-4 * float(g0.abs().max()) + 1e-8, msg=k)


def _case(name, kw=None, passes=(), slow=False):
    return pytest.param(name, kw or {}, passes, id=f"{name}-{'+'.join(passes) or 'captured'}",
                        marks=[pytest.mark.slow] if slow else [])


REAL = [_case("resnet18"), _case("mobilenet_v2"), _case("timm:vit_tiny_patch16_224", {"img_size": 32}),
        _case("efficientnet_b0", slow=True),  # torchvision's stochastic_depth -> graphopt.emit.graph_ops
        _case("resnet18", passes=("channels_last",)), _case("resnet18", passes=("prune:ratio=0.5",)),
        _case("resnet18", passes=("mixed_precision",))]


@pytest.mark.zoo
@pytest.mark.parametrize("name, kw, passes", REAL)
def test_real_models_round_trip_without_code(zoo, tmp_path, name, kw, passes):
    module = zoo(name, num_classes=10, **kw)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    gm, out = emit(module, (x,), tmp_path / "out", passes=passes)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["declarative"] is True and manifest["files"]["graph.json"] == sha256_file(out / "graph.json")
    loaded = graphopt.load(out)
    assert isinstance(loaded, torch.fx.GraphModule) and loaded.training
    ref = copy.deepcopy(gm)
    ref_sd, got_sd = ref.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert ref_sd[k].dtype == got_sd[k].dtype and torch.equal(ref_sd[k], got_sd[k]), k
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), ref.eval()(x), rtol=0, atol=0)
    _same_training_step(ref, loaded, x)


# ----------------------------------------------------------------------------- pipelines (graphopt launch)

PIPELINE_MODEL = '''
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def example_inputs():
    return (torch.randn(8, 16),)
'''


def test_pipeline_stages_load_without_code_and_launch_asks_for_trust_code(tmp_path, capsys):
    from graphopt.cli import main
    from graphopt.dist.pipeline import load_pipeline
    from graphopt.dist.train import parse_args

    f = tmp_path / "m.py"
    f.write_text(PIPELINE_MODEL)
    out = tmp_path / "pipe"
    assert main(["optimize", str(f), "-p", "partition:stages=2", "--emit", "pipeline", "-o", str(out)]) == 0
    assert all((out / s / "graph.json").is_file() for s in ("stage0", "stage1"))
    x = torch.randn(8, 16)
    from graphopt.modelfile import load_model_file

    ref = load_model_file(str(f)).module.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_pipeline(out).eval()(x), ref(x))
    capsys.readouterr()
    # a stage folder without graph.json (an older graphopt): refused before torchrun starts, one line
    stage = out / "stage1"
    (stage / "graph.json").unlink()
    manifest = json.loads((stage / "manifest.json").read_text())
    del manifest["files"]["graph.json"]
    (stage / "manifest.json").write_text(json.dumps(manifest))
    assert main(["launch", str(out), "--print-command"]) == 2
    err = capsys.readouterr().err
    assert "stage 1 needs code to load" in err and "--trust-code" in err and err.count("\n") == 1
    assert main(["launch", str(out), "--print-command", "--trust-code"]) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[-1] == "--trust-code" and parse_args([str(out), "--trust-code"]).trust_code
    with pytest.raises(ArtifactError, match="needs code"):
        load_pipeline(out)
    with torch.no_grad():
        torch.testing.assert_close(load_pipeline(out, trust_code=True).eval()(x), ref(x))


@pytest.mark.zoo
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_graphopt_stochastic_depth_is_torchvisions(zoo, mode):
    """The equivalent graph.json names must compute what torchvision computes, random draws included."""
    import sys

    from graphopt.emit.graph_ops import stochastic_depth

    zoo("resnet18")  # imports torchvision (with the CPU stub)
    tv = sys.modules["torchvision.ops.stochastic_depth"].stochastic_depth
    x = torch.randn(8, 4, 3, 3)
    for p, training in ((0.3, True), (0.0, True), (0.5, False), (1.0, True)):
        torch.manual_seed(3)
        want = tv(x, p, mode, training)
        torch.manual_seed(3)
        got = stochastic_depth(x, p, mode, training)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(stochastic_depth(x, 0.5, mode, True), x)  # it does drop (or rescale)
