"""Every pass on transformers: hand-written GPT (causal), LLaMA-style (GQA), BERT-style (padding mask),
torchvision ViT / Swin (zoo). Structured pruning of attention heads and MLP width; the other passes
apply and verify, or decline what they cannot handle with the reason (never crash)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.testing import assert_exact, count_modules, run_pass
from tests.transformer_models import Attention, bert, bert_inputs, gpt, llama, lm_inputs


def _lm_loss_steps(module: nn.Module, x: tuple[torch.Tensor, ...], steps: int = 6, lr: float = 3e-3) -> list[float]:
    """Next-token loss over a few AdamW steps on one batch (it should fall)."""
    torch.manual_seed(0)
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    ids = x[0]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = module(*x)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _view_literals(gm) -> list[tuple]:
    return [tuple(n.args[1:]) for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]


# ----------------------------------------------------------------------------- structured pruning


def test_prune_attention_heads_and_mlp_width_gpt(tmp_path):
    model, x = gpt(dropout=0.0).eval(), lm_inputs()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    for i in range(2):
        a = gm.get_submodule(f"blocks.{i}.attn")
        # 4 heads of 16 -> 2 heads: q/k/v rows and o columns shrink together
        assert a.q.weight.shape == (32, 64) and a.k.weight.shape == (32, 64) and a.v.weight.shape == (32, 64)
        assert a.o.weight.shape == (64, 32) and a.q.bias.shape == (32,)
        mlp = gm.get_submodule(f"blocks.{i}.mlp")
        assert mlp.fc1.weight.shape == (128, 64) and mlp.fc2.weight.shape == (64, 128)
    # the head count used by the reshapes is rewritten: view(B, T, 2, 16)
    heads = [lit[2] for lit in _view_literals(gm)]
    assert heads == [2] * 6
    merged = [n.args[-1] for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert merged == [32, 32]
    # the report names each group: q/k/v of a block is one group, MLP fc1 another
    names = [r["detail"] for r in rec.rewrites]
    assert any("blocks.0.attn.q" in n and "blocks.0.attn.k" in n for n in names)
    assert any("blocks.1.mlp.fc1" in n for n in names)
    # residual stream and embeddings are not pruned (LayerNorm over the channels, the output)
    assert gm.get_submodule("tok").weight.shape == (96, 64)
    # exact against the masked reference (checked by the pass), and it trains
    losses = _lm_loss_steps(gm, x)
    assert losses[-1] < losses[0] * 0.9
    out = tmp_path / "pruned"
    graphopt.emit_torch_folder(gm, out)
    loaded = graphopt.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*x), gm.eval()(*x))
    assert loaded.get_submodule("blocks.0.attn.q").weight.shape == (32, 64)


def test_prune_gqa_removes_key_value_heads_by_group():
    model, x = llama().eval(), lm_inputs()  # 8 query heads, 2 key/value heads of 8
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed"
    a = gm.get_submodule("blocks.0.attn")
    # one key/value head of two goes, with the 4 query heads that read it
    assert a.k.weight.shape == (8, 64) and a.v.weight.shape == (8, 64)
    assert a.q.weight.shape == (32, 64) and a.o.weight.shape == (64, 32)
    lits = _view_literals(gm)[:3]
    assert [lit[2] for lit in lits] == [4, 1, 1]
    # the gated MLP (gate * fc1) is one group
    m = gm.get_submodule("blocks.0.mlp")
    assert m.gate.weight.shape[0] == m.fc1.weight.shape[0] == m.fc2.weight.shape[1] < 172
    losses = _lm_loss_steps(gm, x)
    assert losses[-1] < losses[0]


class _ComputedHeads(nn.Module):
    """The head count is computed in the graph (``x.shape[-1] // 16``): not rewritable."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.attn = Attention(64, 4, dropout=0.0)
        self.out = nn.Linear(64, 4)

    def forward(self, x):
        h = self.inp(x)
        q = self.attn.q(h)
        B, T, C = q.shape
        q = q.view(B, T, C // 16, 16).transpose(1, 2)
        k = self.attn.k(h).view(B, T, 4, 16).transpose(1, 2)
        v = self.attn.v(h).view(B, T, 4, 16).transpose(1, 2)
        y = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
        return self.out(self.attn.o(y.transpose(1, 2).reshape(B, T, 64)))


def test_computed_head_count_declines_the_group_with_the_reason():
    torch.manual_seed(0)
    model, x = _ComputedHeads().eval(), (torch.randn(2, 5, 32),)
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    reasons = " | ".join(d["reason"] for d in rec.declined)
    assert "head count" in reasons and "computed in the graph" in reasons
    assert gm.get_submodule("attn.q").weight.shape[0] == 64  # its heads stay (its input width may go)


def test_prune_heads_after_sdpa_and_bert_padding():
    model, x = bert(dropout=0.0).eval(), bert_inputs()
    gm, report = graphopt.optimize(model, x, ["sdpa", "prune:ratio=0.5"])
    assert all(r.verification.status == "passed" for r in report.records)
    a = gm.get_submodule("blocks.0.attn")
    assert a.q.weight.shape == (32, 64) and a.o.weight.shape == (64, 32)
    with torch.no_grad():
        assert torch.isfinite(gm.eval()(*x)).all()


# ----------------------------------------------------------------------------- other passes


def test_freeze_embeddings_blocks_and_globs():
    model, x = gpt().eval(), lm_inputs()
    gm, rec = run_pass("freeze:mode=modules,modules=tok|pos", model, x)
    assert rec.modified and not gm.get_submodule("tok").weight.requires_grad
    assert gm.get_submodule("blocks.0.attn.q").weight.requires_grad
    gm, rec = run_pass("freeze:mode=modules,modules=tok|pos|blocks.0.*", model, x)
    frozen = {n for n, p in gm.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.q.weight" in frozen and "blocks.1.attn.q.weight" not in frozen
    gm, rec = run_pass("freeze:mode=stages,stages=1", model, x)
    assert rec.verification.status == "passed"
    assert any(not p.requires_grad for p in gm.parameters())
    losses = _lm_loss_steps(gm, x)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("build", ["gpt", "bert"])
def test_drop_regularization_removes_attention_and_hidden_dropout(build):
    model, x = (gpt(), lm_inputs()) if build == "gpt" else (bert(), bert_inputs())
    gm, rec = run_pass("drop_regularization", model.eval(), x)
    assert rec.modified and count_modules(gm, nn.Dropout) == 0
    n_drop = sum(1 for m in model.modules() if isinstance(m, nn.Dropout))
    assert len(rec.rewrites) == n_drop
    # after sdpa, the attention dropout lives in the SDPA layer and is switched off there
    gm2, report = graphopt.optimize(model, x, ["sdpa", "drop_regularization"])
    from graphopt.ir import ScaledDotProductAttention
    assert all(m.dropout_p == 0 for m in gm2.modules() if isinstance(m, ScaledDotProductAttention))
    gm2.train()
    with torch.no_grad():
        torch.testing.assert_close(gm2(*x), gm2(*x))


@pytest.mark.parametrize("spec", ["mixed_precision:dtype=bfloat16", "cast:dtype=bfloat16"])
def test_precision_passes_on_transformers(spec):
    for model, x in ((gpt().eval(), lm_inputs()), (bert().eval(), bert_inputs())):
        gm, rec = run_pass(spec, model, x)
        assert rec.modified and rec.verification.status == "passed", rec.verification.summary()


def test_prune_2_4_on_linear_layers_not_the_head():
    model, x = gpt().eval(), lm_inputs()
    gm, rec = run_pass("prune:mode=2:4,exclude=head", model, x)
    assert rec.modified
    w = gm.get_submodule("blocks.0.mlp.fc1").weight.detach()
    groups = (w.reshape(-1, 4) != 0).sum(1)
    assert (groups <= 2).all()
    assert (gm.get_submodule("head").weight != 0).all()


def test_partition_cuts_between_blocks():
    model, x = gpt(n_layers=4).eval(), lm_inputs()
    gm, rec = run_pass("partition:stages=2", model, x)
    assert rec.modified and rec.verification.status == "passed"
    notes = rec.notes
    assert notes["stages"] == 2
    assert_exact(gm, model, x)


def test_emit_onnx_and_ort_on_gpt(tmp_path):
    pytest.importorskip("onnxruntime")
    from graphopt.cli import main

    f = tmp_path / "gpt_model.py"
    f.write_text(GPT_FILE.format(root=str(Path(__file__).resolve().parents[1])))
    assert main(["optimize", str(f), "-p", "sdpa", "--emit", "onnx", "-o", str(tmp_path / "onnx")]) == 0
    assert list((tmp_path / "onnx").glob("*.onnx"))


GPT_FILE = '''
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from tests.transformer_models import gpt, lm_inputs

def model():
    return gpt(n_layers=2, dropout=0.0)

def example_inputs():
    return lm_inputs(batch=4, T=16)

def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (64, 17), generator=g)
    ds = torch.utils.data.TensorDataset(ids[:, :-1], ids[:, 1:])
    return ds, ds

def loss(output, target):
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
'''


def _model_file(tmp_path) -> Path:
    f = tmp_path / "gpt_model.py"
    f.write_text(GPT_FILE.format(root=str(Path(__file__).resolve().parents[1])))
    return f


@pytest.mark.ort
def test_ort_trains_layernorm_graphs(tmp_path, capsys):
    """ONNX Runtime 1.19's gradient builder needs LayerNormalization's optional Mean/InvStdDev outputs,
    which torch.onnx leaves out; the artifacts add them, and the emit-time check compares ORT's
    training step with PyTorch's (the op-naming error without them: tests/test_ort.py)."""
    pytest.importorskip("onnxruntime.training")
    import json

    from graphopt.cli import main

    code = main(["optimize", str(_model_file(tmp_path)), "-p", "drop_regularization", "--emit", "ort",
                 "--emit-option", "loss=cross_entropy", "-o", str(tmp_path / "ort")])
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = json.loads((tmp_path / "ort" / "manifest.json").read_text())
    assert manifest["check"]["passed"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_causal_lm_two_stages_runs_under_launch(tmp_path, capfd):
    from graphopt.cli import main

    out = tmp_path / "pipe"
    assert main(["optimize", str(_model_file(tmp_path)), "-p", "sdpa", "-p", "partition:stages=2",
                 "--emit", "pipeline", "-o", str(out)]) == 0
    save = tmp_path / "trained"
    code = main(["launch", str(out), "--microbatches", "2", "--steps", "2", "--lr", "0.01", "--save", str(save),
                 "--timeout", "240"])
    text = capfd.readouterr().out
    assert code == 0, text
    import json
    metrics = json.loads((save / "metrics.json").read_text())
    assert len(metrics["losses"]) == 2 and all(math.isfinite(v) for v in metrics["losses"])
    assert metrics["losses"][0] == pytest.approx(math.log(96), rel=0.2)  # random init: ~log(vocab)


VISION_PASSES = ["sdpa", "prune:ratio=0.3", "prune:mode=2:4,exclude=heads.*|head", "freeze:mode=stages,stages=1",
                 "drop_regularization", "mixed_precision:dtype=bfloat16", "partition:stages=2"]


@pytest.mark.zoo
@pytest.mark.parametrize("spec", VISION_PASSES)
def test_every_pass_on_torchvision_vit_and_swin(spec, zoo):
    """Each pass applies and verifies, or declines with reasons; none crashes."""
    from tests.transformer_models import small_vit

    for name, model, x in (("vit", small_vit(), (torch.randn(2, 3, 32, 32),)),
                           ("swin_t", zoo("swin_t"), (torch.randn(1, 3, 64, 64),))):
        gm, rec = run_pass(spec, model, x)
        assert rec.verification.status in ("passed", "skipped"), (name, rec.verification.summary())
        assert rec.modified or rec.declined or spec.startswith("drop_regularization"), (name, spec)
        if spec == "sdpa":
            assert not rec.modified  # attention is inside nn.MultiheadAttention / shifted_window_attention
        if spec.startswith("prune:ratio") and name == "vit":
            reasons = " | ".join(d["reason"] for d in rec.declined)
            assert "MultiheadAttention" in reasons  # its heads cannot go without the residual width


# ----------------------------------------------------------------------------- hidden width (prune:hidden=true)


def _hidden_rewrite(rec) -> dict:
    hidden = [r for r in rec.rewrites if r["data"].get("hidden_width")]
    assert len(hidden) == 1, [r["detail"] for r in rec.rewrites]
    return hidden[0]


def test_prune_hidden_width_gpt_shrinks_trains_and_reloads(tmp_path):
    """Pre-LN GPT: token and position embeddings, every residual add, LayerNorms (weight, bias,
    normalized_shape), q/k/v/fc1 inputs, o/fc2 outputs and the head's input are one group."""
    model, x = gpt(dropout=0.0).eval(), lm_inputs()
    gm, rec = run_pass("prune:ratio=0.25,hidden=true", model, x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    hid = _hidden_rewrite(rec)
    assert "hidden width" in hid["detail"] and {"tok", "pos", "blocks.0.attn.o", "blocks.1.mlp.fc2"} <= set(
        hid["data"]["producers"])
    assert hid["data"]["before"] == 64 and hid["data"]["after"] == 48
    assert rec.notes["hidden_width"][0]["approximate"]  # says why it is not exact (the norms)
    assert gm.get_submodule("tok").weight.shape == (96, 48) and gm.get_submodule("tok").embedding_dim == 48
    assert gm.get_submodule("pos").weight.shape == (64, 48)
    for i in range(2):
        b = gm.get_submodule(f"blocks.{i}")
        assert b.ln1.weight.shape == (48,) and b.ln2.bias.shape == (48,) and b.ln1.normalized_shape == (48,)
        assert b.attn.q.weight.shape[1] == 48 and b.attn.o.weight.shape[0] == 48
        assert b.mlp.fc1.weight.shape[1] == 48 and b.mlp.fc2.weight.shape[0] == 48
    assert gm.get_submodule("ln_f").weight.shape == (48,) and gm.get_submodule("head").weight.shape == (96, 48)
    losses = _lm_loss_steps(gm, x)
    assert losses[-1] < losses[0]
    out = tmp_path / "pruned"
    graphopt.emit_torch_folder(gm, out)
    loaded = graphopt.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(*x), gm.eval()(*x))
    assert loaded.get_submodule("tok").weight.shape == (96, 48)


def test_prune_hidden_width_is_opt_in_and_declined_with_the_reason():
    """Without hidden=true the residual stream stays (heads and MLP width are pruned exactly against
    the masked original); the decline says why and how to opt in."""
    model, x = bert(dropout=0.0).eval(), bert_inputs()
    gm, rec = run_pass("prune:ratio=0.25", model, x)
    assert rec.modified and gm.get_submodule("tok").weight.shape == (96, 64)
    reasons = [d["reason"] for d in rec.declined if "tok" in d["target"]]
    assert reasons and "hidden=true" in reasons[0]
    with pytest.raises(graphopt.errors.PassConfigError, match="needs mode=structured"):
        run_pass("prune:mode=2:4,hidden=true", model, x)
    gm2, rec2 = run_pass("prune:ratio=0.25,hidden=true", bert(dropout=0.0).eval(), x)  # post-LN BERT-style
    assert rec2.verification.status == "passed" and gm2.get_submodule("tok").weight.shape == (96, 48)
    assert gm2.get_submodule("cls").weight.shape == (3, 48) and gm2.get_submodule("ln_e").weight.shape == (48,)


class _HiddenAsLiteral(nn.Module):
    """Reads the hidden width as a shape constant the analysis can follow (``view(B * T, 64)``, rewritten)
    and a pooled sum over the hidden axis it cannot (declined, with the reason)."""

    def __init__(self, pool: bool):
        super().__init__()
        self.emb, self.ln, self.fc, self.head = nn.Embedding(32, 64), nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.pool = pool

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.ln(h))
        if self.pool:
            return self.head(h) + h.sum(-1, keepdim=True)
        return self.head(h.view(ids.shape[0] * ids.shape[1], 64))


def test_prune_hidden_width_rewrites_literal_sizes_and_declines_what_it_cannot_follow():
    ids = (torch.randint(0, 32, (2, 5)),)
    gm, rec = run_pass("prune:ratio=0.25,hidden=true", _HiddenAsLiteral(False).eval(), ids)
    assert rec.verification.status == "passed" and gm.get_submodule("emb").weight.shape == (32, 48)
    views = [n.args for n in gm.graph.nodes if n.op == "call_method" and n.target == "view"]
    assert views and views[0][-1] == 48
    gm, rec = run_pass("prune:ratio=0.25,hidden=true", _HiddenAsLiteral(True).eval(), ids)
    assert gm.get_submodule("emb").weight.shape == (32, 64)
    reasons = " | ".join(d["reason"] for d in rec.declined if "emb" in d["target"])
    assert "reduces over the channel axis" in reasons


class _FunctionalNorms(nn.Module):
    """A hand-written pre-LN model whose norms are ``F.layer_norm`` calls over its own parameters
    (what torch.fx gives for a LayerNorm subclass that calls it, as timm's does): one with weight and
    bias, a final one with a weight only (keywords). ``norm``: "other_axes" normalizes over the
    positions and the channels, "computed" passes ``h.shape[-1:]``."""

    def __init__(self, norm: str = "last", vocab: int = 32, dim: int = 64, T: int = 5):
        super().__init__()
        self.emb, self.fc1, self.fc2, self.head = (nn.Embedding(vocab, dim), nn.Linear(dim, 128),
                                                   nn.Linear(128, dim), nn.Linear(dim, vocab))
        g = torch.Generator().manual_seed(0)
        self.ln_w = nn.Parameter(1 + 0.1 * torch.randn(dim, generator=g))
        self.ln_b = nn.Parameter(0.1 * torch.randn(dim, generator=g))
        self.norm_w = nn.Parameter(1 + 0.1 * torch.randn(dim, generator=g))
        self.norm, self.dim, self.T = norm, dim, T

    def forward(self, ids):
        h = self.emb(ids)
        if self.norm == "other_axes":
            shape = (self.T, self.dim)
            w, b = None, None
        else:
            shape = h.shape[-1:] if self.norm == "computed" else (self.dim,)
            w, b = self.ln_w, self.ln_b
        h = h + self.fc2(torch.relu(self.fc1(F.layer_norm(h, shape, w, b, 1e-5))))
        return self.head(F.layer_norm(h, (self.dim,), weight=self.norm_w, eps=1e-6))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_prune_hidden_width_slices_functional_layer_norm(tmp_path, capture):
    """``F.layer_norm`` over the last axis (``aten.layer_norm`` through torch.export) is sliced like the
    LayerNorm module: its weight and bias (get_attr parameters) and the ``normalized_shape`` literal;
    declined without hidden=true (with the opt-in hint), over other axes too, or with a computed shape
    (with those reasons)."""
    ids = (torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1)),)
    torch.manual_seed(0)
    model = _FunctionalNorms().eval()
    captured = graphopt.capture(model, ids, capture=capture)
    gm, rec = run_pass("prune:ratio=0.25,hidden=true,exclude=fc1", captured, ids)  # the MLP width stays
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    hid = _hidden_rewrite(rec)
    assert (hid["data"]["before"], hid["data"]["after"]) == (64, 48)
    assert any("layer_norm" in why for why in rec.notes["hidden_width"][0]["approximate"])
    assert gm.ln_w.shape == gm.ln_b.shape == gm.norm_w.shape == (48,)
    assert gm.emb.weight.shape == (32, 48) and gm.fc1.weight.shape == (128, 48) and gm.head.weight.shape == (32, 48)
    norms = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (F.layer_norm, torch.ops.aten.layer_norm.default)]
    assert [tuple(n.args[1]) for n in norms] == [(48,), (48,)]
    # every tensor was sliced with the same kept channels: the original computed over them alone
    keep = torch.isin(model.emb.weight[0], gm.emb.weight[0]).nonzero().flatten()
    assert len(keep) == 48
    with torch.no_grad():
        m = model
        h = m.emb.weight[:, keep][ids[0]]
        y = F.layer_norm(h, (48,), m.ln_w[keep], m.ln_b[keep], 1e-5)
        mlp = torch.relu(F.linear(y, m.fc1.weight[:, keep], m.fc1.bias))
        h = h + F.linear(mlp, m.fc2.weight[keep], m.fc2.bias[keep])
        ref = F.linear(F.layer_norm(h, (48,), m.norm_w[keep], eps=1e-6), m.head.weight[:, keep], m.head.bias)
        torch.testing.assert_close(gm(*ids), ref)
    losses = _lm_loss_steps(gm, ids)
    assert losses[-1] < losses[0]
    out = tmp_path / "pruned"
    graphopt.emit_torch_folder(gm, out)
    loaded = graphopt.load(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*ids), gm.eval()(*ids))
    assert loaded.ln_w.shape == (48,)

    gm, rec = run_pass("prune:ratio=0.25", captured, ids)  # not opted in
    assert gm.ln_w.shape == (64,)
    reasons = " | ".join(d["reason"] for d in rec.declined if "emb" in d["target"])
    assert "layer_norm (node layer_norm) normalizes over the channel axis" in reasons and "hidden=true" in reasons
    cases = [("other_axes", "normalizes over the channels and other axes (normalized_shape (5, 64))")]
    if capture == "fx":  # torch.export makes h.shape[-1:] a literal
        cases.append(("computed", "its normalized_shape is computed in the graph"))
    for norm, why in cases:
        gm, rec = run_pass("prune:ratio=0.25,hidden=true",
                           graphopt.capture(_FunctionalNorms(norm).eval(), ids, capture=capture), ids)
        assert gm.emb.weight.shape == (32, 64), norm
        reasons = " | ".join(d["reason"] for d in rec.declined if "emb" in d["target"])
        assert why in reasons, reasons


def _trains_and_reloads(gm, x, out):
    """A pruned timm ViT: one AdamW step in train mode (every parameter gets a finite gradient), then
    emitted and reloaded (trust_code: the graph calls a timm function, its attention mask) with equal
    eval outputs. Returns the reloaded module."""
    gm.train()
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
    F.cross_entropy(gm(*x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters())
    opt.step()
    graphopt.emit_torch_folder(gm, out)
    loaded = graphopt.load(out, trust_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), gm.eval()(*x))
    return loaded


@pytest.mark.zoo
def test_prune_hidden_width_on_timm_vit(tmp_path):
    """timm ViT (its LayerNorm traced to ``F.layer_norm``): the hidden width is pruned (cls token,
    position embeddings, patch embedding, every norm), trains and reloads."""
    from tests.transformer_models import timm_vit

    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    gm, rec = run_pass("prune:ratio=0.25,hidden=true", timm_vit(), x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    hid = _hidden_rewrite(rec)
    assert (hid["data"]["before"], hid["data"]["after"]) == (192, 144)
    shapes = {k: tuple(p.shape) for k, p in gm.named_parameters()}
    assert shapes["cls_token"] == (1, 1, 144) and shapes["pos_embed"] == (1, 17, 144)
    assert shapes["patch_embed.proj.weight"] == (144, 3, 8, 8) and shapes["blocks.1.norm2.bias"] == (144,)
    # the heads of the fused q/k/v go too (3 -> 2 at this ratio): test_prune_heads_on_timm_vit_fused_qkv
    assert shapes["blocks.0.attn.qkv.weight"] == (384, 144) and shapes["norm.weight"] == (144,)
    assert shapes["blocks.0.attn.proj.weight"] == (144, 128)
    assert shapes["head.weight"] == (1000, 144)
    assert {tuple(n.args[1]) for n in gm.graph.nodes if n.target is F.layer_norm} == {(144,)}
    loaded = _trains_and_reloads(gm, x, tmp_path / "timm_vit")
    assert loaded.get_parameter("cls_token").shape == (1, 1, 144)


def _kept_heads(orig: torch.Tensor, pruned: torch.Tensor, H: int, D: int) -> list[int]:
    """The heads of ``orig``'s fused q/k/v rows ([3, H, D] of them) whose rows are ``pruned``'s."""
    o, p = orig.reshape(3, H, D, -1), pruned.reshape(3, -1, D, orig.shape[-1])
    kept = [next(h for h in range(H) if torch.equal(o[0, h], p[0, i])) for i in range(p.shape[1])]
    assert torch.equal(p, o[:, kept])  # q, k and v lose the same heads
    return kept


@pytest.mark.zoo
@pytest.mark.parametrize("capture,fused", [("fx", False), ("fx", True), ("export", False), ("export", True)])
def test_prune_heads_on_timm_vit_fused_qkv(tmp_path, capture, fused):
    """timm ViT's fused q/k/v (``qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``,
    hand-written attention or ``scaled_dot_product_attention``): whole heads go from the qkv rows
    (q, k and v alike, with the bias) and the proj columns; the head-count and width literals are
    rewritten; exact against the masked original, trains and reloads."""
    from tests.transformer_models import timm_vit

    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    model = timm_vit(fused)  # 3 heads of 64
    gm, rec = run_pass("prune:ratio=0.5", graphopt.capture(model, x, capture=capture), x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    assert rec.verification.details["reference_max_rel_error"] < 1e-4
    names = [r["detail"] for r in rec.rewrites]
    for i in range(2):
        assert f"kept 128/192 channels of blocks.{i}.attn.qkv" in names, names
        a, ref = gm.get_submodule(f"blocks.{i}.attn"), model.blocks[i].attn
        assert a.qkv.weight.shape == (384, 192) and a.qkv.bias.shape == (384,)
        assert a.proj.weight.shape == (192, 128) and a.proj.bias.shape == (192,)
        kept = _kept_heads(ref.qkv.weight, a.qkv.weight, 3, 64)
        assert torch.equal(a.qkv.bias, ref.qkv.bias.reshape(3, 3, 64)[:, kept].reshape(-1))
        cols = torch.cat([torch.arange(h * 64, (h + 1) * 64) for h in kept])
        assert torch.equal(a.proj.weight, ref.proj.weight[:, cols])
    reshapes = [n for n in gm.graph.nodes if n.target in ("reshape", torch.reshape)]
    sizes = [tuple(n.args[1]) if n.op == "call_function" else tuple(n.args[1:]) for n in reshapes]
    assert [s[2:] for s in sizes if len(s) == 5] == [(3, 2, 64)] * 2
    assert [s[-1] for s in sizes if len(s) == 3 and s[-1] != 192] == [128, 128]
    loaded = _trains_and_reloads(gm, x, tmp_path / "timm_vit_heads")
    assert loaded.get_submodule("blocks.0.attn.qkv").weight.shape == (384, 192)


@pytest.mark.zoo
def test_prune_heads_and_hidden_width_on_timm_vit():
    """Heads of the fused q/k/v and the hidden width together (fx capture)."""
    from tests.transformer_models import timm_vit

    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    gm, rec = run_pass("prune:ratio=0.5,hidden=true", timm_vit(), x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    shapes = {k: tuple(p.shape) for k, p in gm.named_parameters()}
    assert shapes["blocks.0.attn.qkv.weight"] == (384, 96) and shapes["blocks.1.attn.proj.weight"] == (96, 128)
    with torch.no_grad():
        assert torch.isfinite(gm(*x)).all()


class _FusedQKV(nn.Module):
    """timm-style fused q/k/v attention; ``variant`` picks how q, k and v are taken apart."""

    def __init__(self, variant: str = "index", dim: int = 32, heads: int = 4):
        super().__init__()
        self.qkv, self.proj, self.head = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.h, self.d, self.variant = heads, dim // heads, variant

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        if self.variant == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.variant == "sum":  # not a split into q, k, v
            q = k = v = qkv.sum(0)
        else:  # a slice of the q/k/v axis
            q, k = qkv[:2].unbind(0)
            v = qkv[2]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.head(self.proj(y.transpose(1, 2).reshape(B, N, self.h * self.d)))


def test_prune_heads_fused_qkv_index_and_declined_variants():
    """``q, k, v = qkv[0], qkv[1], qkv[2]`` is followed; a fused q/k/v tensor used otherwise (summed
    over q/k/v, its q/k/v axis sliced) is declined with the reason, never a crash."""
    x = (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)),)
    torch.manual_seed(0)
    model = _FusedQKV().eval()
    gm, rec = run_pass("prune:ratio=0.5", model, x)
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    assert gm.qkv.weight.shape == (48, 32) and gm.proj.weight.shape[1] == 16  # 2 heads of 8 kept
    _kept_heads(model.qkv.weight, gm.qkv.weight, 4, 8)
    for variant, why in (("sum", "on a fused q/k/v tensor"), ("slice", "indexing of a fused q/k/v tensor")):
        torch.manual_seed(0)
        gm, rec = run_pass("prune:ratio=0.5", _FusedQKV(variant).eval(), x)
        assert gm.qkv.weight.shape == (96, 32), variant
        reasons = " | ".join(d["reason"] for d in rec.declined if "qkv" in d["target"])
        assert why in reasons, (variant, reasons)


@pytest.mark.zoo
def test_prune_hidden_width_declined_on_torchvision_vit_and_swin(zoo):
    """torchvision ViT and Swin decline the hidden width with the reason: nn.MultiheadAttention's
    embed_dim is its input and output width too; Swin's shifted_window_attention is a function the
    analysis does not see into."""
    from tests.transformer_models import small_vit

    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
    gm, rec = run_pass("prune:ratio=0.25,hidden=true", small_vit(), x)
    assert gm.get_submodule("conv_proj").weight.shape[0] == 64 and not any(
        r["data"].get("hidden_width") for r in rec.rewrites)
    reasons = " | ".join(d["reason"] for d in rec.declined if "conv_proj" in d["target"])
    assert "nn.MultiheadAttention" in reasons and "nor the residual stream (prune:hidden=true)" in reasons

    gm, rec = run_pass("prune:ratio=0.25,hidden=true", zoo("swin_t"), (torch.randn(1, 3, 64, 64),))
    assert gm.get_submodule("features.0.0").weight.shape[0] == 96 and not any(
        r["data"].get("hidden_width") for r in rec.rewrites)
    reasons = " | ".join(d["reason"] for d in rec.declined if "features.0.0" in d["target"])
    assert "shifted_window_attention() (node shifted_window_attention) is not understood" in reasons
