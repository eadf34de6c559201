"""Transformers captured whole: HuggingFace families (small configs, offline) and a hand-written GPT,
through capture (front end, coverage, eager check), `graphopt optimize -p cleanup`, emit and reload."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import graphopt
from graphopt.capture import capture, plain_outputs
from graphopt.cli import main

pytest.importorskip("transformers")
from graphopt import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["bert", "distilbert", "roberta", "gpt2", "llama", "t5", "vit", "whisper"]


def _flat(value):
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


class _Captured(dict):
    """family -> (model, keyword inputs, graph), captured on first use (``capture="export"``; auto is
    covered by the inspect test)."""

    def __missing__(self, name):
        model = zoo.hf_model(name)
        inputs = zoo.hf_example_inputs(name)
        self[name] = (model, inputs, capture(model, inputs, capture="export"))
        return self[name]


@pytest.fixture(scope="module")
def captured():
    return _Captured()


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_family_is_captured_whole_and_equals_eager(captured, name):
    model, inputs, gm = captured[name]
    meta = gm.meta["graphopt"]
    assert meta["front_end"]["used"] == "export"
    assert meta["cost"].coverage["fraction"] == 1.0
    assert meta["eager_check"]["ok"] and meta["eager_check"]["rel_error"] < 1e-5
    # placeholders named and ordered like the keyword inputs
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == list(inputs)
    with torch.no_grad():
        ref = plain_outputs(model(**inputs))
        got = gm(*inputs.values())
    assert isinstance(got, dict) and list(got) == list(ref)
    for a, b in zip(_flat(ref), _flat(got)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # parameters keep their original names; standard layers are call_module nodes again
    own = dict(model.named_parameters(remove_duplicate=False))
    names = dict(gm.named_parameters())
    assert set(names) <= set(own)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert nn.Linear in kinds or nn.Conv1d in kinds
    assert nn.Embedding in kinds or name == "vit"
    assert not any(n.target == torch.ops.aten.linear.default for n in gm.graph.nodes if n.op == "call_function"
                   if name != "gpt2")  # GPT-2 uses Conv1D (x @ W + b), not nn.Linear


def test_hf_capture_is_mode_aware_and_trains(captured):
    model, inputs, gm = captured["bert"]
    gm.train()
    torch.manual_seed(0)
    a = gm(*inputs.values())["logits"]
    torch.manual_seed(1)
    b = gm(*inputs.values())["logits"]
    assert not torch.allclose(a, b)  # dropout is active in train mode
    a.sum().backward()
    assert gm.get_submodule("bert.encoder.layer.0.attention.self.query").weight.grad is not None
    gm.eval()
    torch.testing.assert_close(gm(*inputs.values())["logits"], gm(*inputs.values())["logits"])


def test_use_cache_is_disabled_and_reported():
    model = zoo.hf_model("gpt2")
    model.config.use_cache = True
    gm = capture(model, zoo.hf_example_inputs("gpt2"))
    assert any("use_cache=False" in n for n in gm.meta["graphopt"]["capture_notes"])
    assert model.config.use_cache is True  # the caller's model is untouched


def test_hand_written_gpt_is_captured_whole():
    spec = graphopt.modelfile.load_model_file(ROOT / "examples" / "gpt.py")
    fx_only = capture(spec.module, spec.example_inputs, capture="fx")
    cov = fx_only.meta["graphopt"]["cost"].coverage
    assert 0.0 < cov["fraction"] < 1.0  # `b, t, c = x.shape` iterates a Proxy: attention stays opaque
    assert {o["class"] for o in cov["opaque"]} == {"CausalSelfAttention"}
    gm = capture(spec.module, spec.example_inputs)  # auto
    meta = gm.meta["graphopt"]
    assert meta["front_end"]["used"] == "export" and "left part of the model opaque" in meta["front_end"]["reason"]
    assert meta["cost"].coverage["fraction"] == 1.0 and meta["eager_check"]["ok"]
    # every layer fx saw as a module is still a call_module node, with the same name
    mods = lambda g: {n.target for n in g.graph.nodes if n.op == "call_module"}  # noqa: E731
    assert mods(fx_only) - {o["module"] for o in cov["opaque"]} <= mods(gm)
    assert "blocks.0.attn.qkv" in mods(gm) and "tok" in mods(gm) and "blocks.1.ln2" in mods(gm)
    assert gm.get_submodule("head").weight is gm.get_submodule("tok").weight  # tied weights stay tied


class Counter(nn.Module):
    """Python state read in forward: tracing freezes its value, eager does not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


def test_graph_that_differs_from_eager_is_reported(caplog):
    gm = capture(Counter(), (torch.randn(2, 4),), capture="fx")
    check = gm.meta["graphopt"]["eager_check"]
    assert check["checked"] and not check["ok"] and check["rel_error"] > 0.1
    assert "differs from the eager model" in check["reason"]
    assert "does not match the eager model" in caplog.text


def test_inspect_says_front_end_and_eager_mismatch(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(f"import torch\nfrom torch import nn\n\n\n{inspect.getsource(Counter)}" + textwrap.dedent("""

        def model():
            return Counter()

        def example_inputs():
            return (torch.randn(2, 4),)
    """))
    assert main(["inspect", str(f), "--capture", "fx"]) == 0
    out = capsys.readouterr()
    assert "capture: fx (asked for (--capture fx))" in out.out
    assert "WARNING: the captured graph differs from the eager model" in out.err


def test_inspect_json_names_front_end_for_hf(capsys):
    assert main(["inspect", str(ROOT / "examples" / "hf_bert.py"), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["coverage"] == 1.0
    assert doc["capture"]["front_end"]["used"] == "export"
    assert "torch.fx failed" in doc["capture"]["front_end"]["reason"]
    assert doc["capture"]["input_names"] == ["input_ids", "attention_mask"]


def test_model_no_front_end_can_capture_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Branchy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                if x.sum() > 0:
                    return self.fc(x)
                return x

        def model():
            return Branchy()

        def example_inputs():
            return (torch.ones(2, 4),)
    """))
    code = main(["inspect", str(f)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "m.py:11" in err and "if x.sum() > 0" in err


@pytest.mark.parametrize("example", ["hf_bert.py", "gpt.py"])
def test_optimize_cleanup_emits_and_reloads_with_same_structure(example, tmp_path, capsys):
    out = tmp_path / "out"
    report = tmp_path / "r.json"
    code = main(["optimize", str(ROOT / "examples" / example), "-p", "cleanup", "-o", str(out),
                 "--report", str(report)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "capture matches the eager model" in text.out and "verified" in text.out
    doc = json.loads(report.read_text())
    assert doc["capture"]["coverage"] == 1.0 and doc["capture"]["eager_check"]["ok"]
    spec = graphopt.modelfile.load_model_file(ROOT / "examples" / example)
    loaded = graphopt.load(out)  # declarative loader: no code from the folder runs
    with torch.no_grad():
        ref = spec.module.eval()(*spec.example_inputs)
        got = loaded.eval()(*spec.example_inputs)
    assert type(got) is type(ref)
    if isinstance(ref, dict):
        assert list(got) == list(ref) == ["logits"]
    for a, b in zip(_flat(ref), _flat(got)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_emitted_hf_folder_trains_without_transformers(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(ROOT / "examples" / "hf_bert.py"), "-p", "cleanup", "-o", str(out)]) == 0
    capsys.readouterr()
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch, graphopt
        m = graphopt.load({str(out)!r}).train()
        ids = torch.randint(3, 128, (2, 8)); mask = torch.ones(2, 8, dtype=torch.long)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(m(ids, mask)["logits"], torch.tensor([0, 1]))
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert "transformers" not in sys.modules
        print("ok", losses)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok")


class _Branch(nn.Module):
    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # not traceable: this module is kept opaque
            y = y * 2
        return y


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.inner = _Branch(self.a)  # the same parameters under two names
        self.inner2 = nn.Sequential(_Branch(self.a))  # nested: opaque inside another name

    def forward(self, x):
        return self.inner2(self.inner(self.a(x)))


def test_coverage_is_a_fraction_over_what_exists():
    gm = capture(_Shared(), (torch.randn(2, 4),), capture="fx")
    cov = gm.meta["graphopt"]["cost"].coverage
    assert len(cov["opaque"]) == 2
    assert cov["params"] == 0.0  # every parameter is used inside an opaque module, counted once
    assert 0.0 <= cov["macs"] <= 1.0 and cov["fraction"] == min(cov["macs"], cov["params"])
