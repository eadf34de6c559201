"""The torch-folder emitter and graphopt.load: readable code, safetensors, manifest, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import ArtifactError, EmitError
from graphopt.testing import train_steps


def emit(module, inputs, out, passes=("channels_last",), **kw):
    gm, report = graphopt.optimize(module, inputs, list(passes))
    return gm, graphopt.emit_torch_folder(gm, out, report=report, **kw)


def test_folder_contents_and_reload(small_cnn, tmp_path):
    module, inputs = small_cnn
    gm, out = emit(module, inputs, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "manifest.json", "module.py", "weights.safetensors"]
    src = (out / "module.py").read_text()
    assert "import torch\n" in src and "nn.Conv2d(in_channels=3, out_channels=8, kernel_size=(3, 3)" in src
    assert "import pickle" not in src and " torch.load(" not in src
    assert not (out / "weights.safetensors").read_bytes().startswith(b"\x80")  # not a pickle stream
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "graphopt.torch_folder" and manifest["torch_version"] == torch.__version__
    assert manifest["passes"][0]["name"] == "channels_last" and manifest["verified"] is True
    assert manifest["passes"][0]["verification"]["status"] == "passed"
    assert manifest["cost"]["macs"] == manifest["cost_before"]["macs"] > 0
    assert manifest["memory_format"] == "channels_last" and manifest["imports"] == []
    loaded = graphopt.load(out)
    assert loaded.training and loaded.graphopt_manifest["class_name"] == "OptimizedSmallCNN"
    assert loaded.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    loaded.eval()
    torch.testing.assert_close(loaded(*inputs), module(*inputs), rtol=1e-5, atol=1e-6)


def test_reloaded_module_trains(small_cnn, tmp_path):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    loaded = graphopt.load(out)
    losses = train_steps(loaded, inputs, torch.tensor([1, 2]), steps=5)
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in loaded.parameters())


def test_existing_folder_refused_then_forced(small_cnn, tmp_path):
    module, inputs = small_cnn
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(EmitError, match="output folder exists and is not empty"):
        emit(module, inputs, out)
    assert (out / "mine.txt").read_text() == "user data"
    # issue 16: --force replaces only a folder graphopt wrote (or an empty one), never the user's files
    with pytest.raises(EmitError, match="--force replaces only a folder graphopt wrote"):
        emit(module, inputs, out, force=True)
    assert (out / "mine.txt").read_text() == "user data"
    (out / "mine.txt").unlink()
    emit(module, inputs, out, force=True)  # empty: written
    (out / "stale.txt").write_text("left by an earlier run")
    emit(module, inputs, out, force=True)  # graphopt's own folder: replaced
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left behind


def test_failed_emit_leaves_nothing(tmp_path):
    class Custom(nn.Module):  # defined in a test module: cannot be rebuilt standalone
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Custom()

        def forward(self, x):
            return self.c(x)

    from graphopt.capture import GraphoptTracer  # make Custom a leaf, as an opaque module would be
    net = Net()
    gm = graphopt.capture(net, (torch.randn(2, 3),))
    gm2 = torch.fx.GraphModule(net, GraphoptTracer(opaque={"c"}).trace(net))
    gm2.meta["graphopt"] = gm.meta["graphopt"]
    with pytest.raises(EmitError, match="module 'c' .*Custom"):
        graphopt.emit_torch_folder(gm2, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_tied_frozen_nonpersistent_and_half_parameters(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 4, bias=False)
            self.out = nn.Linear(4, 4, bias=False)
            self.out.weight = self.emb.weight  # tied
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
            self.half_bias = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x):
            return self.out(self.emb(self.frozen(x))) * self.scale + self.half_bias.float()

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4)
    gm = graphopt.capture(net, (x,))
    out = graphopt.emit_torch_folder(gm, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tied"] == {"out.weight": "emb.weight"}
    assert manifest["frozen"] == ["frozen.weight", "frozen.bias"]
    assert manifest["dtypes"] == {"half_bias": "torch.float64"}
    loaded = graphopt.load(out).eval()
    assert loaded.out.weight is loaded.emb.weight
    assert not loaded.frozen.weight.requires_grad and loaded.emb.weight.requires_grad
    assert loaded.half_bias.dtype == torch.float64
    torch.testing.assert_close(loaded.scale, torch.full((4,), 2.0))
    torch.testing.assert_close(loaded(x), net(x))


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{nope"), "manifest.json is not valid JSON"),
    (lambda d: (d / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    (lambda d: (d / "weights.safetensors").write_bytes((d / "weights.safetensors").read_bytes()[:100]),
     "weights.safetensors does not match the manifest's checksum"),
    (lambda d: (d / "module.py").write_text((d / "module.py").read_text() + "\n# edited\n"),
     "module.py does not match the manifest's checksum"),
])
def test_damaged_folders_get_clear_errors(small_cnn, tmp_path, damage, fragment):
    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    damage(out)
    with pytest.raises(ArtifactError) as info:
        graphopt.load(out)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_weights_that_do_not_match_the_code(small_cnn, tmp_path):
    from safetensors.torch import load_file, save_file

    module, inputs = small_cnn
    _, out = emit(module, inputs, tmp_path / "out")
    w = load_file(str(out / "weights.safetensors"))
    w["conv1.weight"] = torch.zeros(2, 3, 3, 3)
    save_file(w, str(out / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="weights do not match the code: size mismatch for conv1.weight"):
        graphopt.load(out, verify_checksums=False)
    del w["conv1.weight"]
    save_file(w, str(out / "weights.safetensors"))
    with pytest.raises(ArtifactError, match=r"weights do not match the code: 1 missing \(e.g. conv1.weight\)"):
        graphopt.load(out, verify_checksums=False)


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match="folder not found"):
        graphopt.load(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        graphopt.load(tmp_path / "f")


class _Recurrent(nn.Module):
    def __init__(self, cls, bidirectional):
        super().__init__()
        self.rnn = cls(6, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(8 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


@pytest.mark.parametrize("cls,bidirectional,pass_name", [
    (nn.LSTM, False, "cleanup"), (nn.LSTM, True, "mixed_precision"),
    (nn.GRU, True, "freeze"), (nn.GRU, False, "cleanup")])
def test_recurrent_modules_emit_reload_and_train(tmp_path, cls, bidirectional, pass_name):
    torch.manual_seed(0)
    module, inputs = _Recurrent(cls, bidirectional), (torch.randn(3, 5, 6),)
    gm, out = emit(module, inputs, tmp_path / "out", passes=(pass_name,))
    src = (out / "module.py").read_text()
    assert f"nn.{cls.__name__}(input_size=6, hidden_size=8, num_layers=2, batch_first=True" in src
    gm.eval()
    expected = gm(*inputs).detach()
    for trust_code in (False, True):
        loaded = graphopt.load(out, trust_code=trust_code)
        rnn = loaded.get_submodule("rnn")
        assert type(rnn) is cls and rnn.bidirectional is bidirectional and rnn.num_layers == 2
        loaded.eval()
        torch.testing.assert_close(loaded(*inputs), expected, rtol=1e-5, atol=1e-6)
        before = {n: p.detach().clone() for n, p in loaded.named_parameters()}
        train_steps(loaded, inputs, torch.tensor([0, 1, 2]), steps=1, lr=0.5)
        changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, before[n])]
        assert "head.weight" in changed
        if pass_name != "freeze":  # freeze keeps only the head trainable
            assert "rnn.weight_hh_l1" in changed
        # the recurrent kernel reads the updated weights (its flat weight list is the parameters)
        assert all(w is p for w, p in zip(rnn._flat_weights, [getattr(rnn, n) for n in rnn._flat_weights_names]))
        loaded.eval()
        assert not torch.allclose(loaded(*inputs), expected)
