"""Every pass on the HuggingFace models themselves (small configs, random weights, nothing downloaded):
BERT, GPT-2 (Conv1D layers, fused q/k/v), LLaMA (rotary embeddings, grouped-query attention, RMSNorm)
and T5 (relative position bias, encoder-decoder); the hidden width (prune:hidden=true) also on
DistilBERT, RoBERTa, ViT and Whisper. Each pass applies and verifies, or declines what it cannot
handle with the reason; pruned models shrink, train a step and reload from the emitted folder.
"""

from __future__ import annotations

import fnmatch
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt.testing import count_calls, count_modules, run_pass

pytest.importorskip("transformers")
from graphopt import zoo  # noqa: E402

FAMILIES = ["bert", "gpt2", "llama", "t5"]


class _Captured(dict):
    """family -> (keyword inputs, captured graph), captured once (torch.export front end)."""

    def __missing__(self, name):
        inputs = zoo.hf_example_inputs(name)
        self[name] = (inputs, graphopt.capture(zoo.hf_model(name), inputs, capture="export"))
        return self[name]


@pytest.fixture(scope="module")
def hf():
    return _Captured()


def _run(hf, name, spec):
    inputs, gm = hf[name]
    out, rec = run_pass(spec, gm, tuple(inputs.values()))
    return inputs, out, rec


def _loss(gm, name, inputs):
    """A training loss on the model's logits (classification for BERT, next token otherwise)."""
    logits = gm(*inputs.values())["logits"].float()
    if name in ("bert", "distilbert", "roberta", "vit"):
        return F.cross_entropy(logits, torch.tensor([0, 1]))
    ids = inputs["decoder_input_ids"] if name in ("t5", "whisper") else inputs["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train_step(gm, name, inputs) -> float:
    """One AdamW step in train mode; every trainable parameter gets a finite gradient."""
    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
    loss = _loss(gm, name, inputs)
    loss.backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    gm.eval()
    return loss.item()


def _reloads(gm, inputs, tmp_path):
    out = tmp_path / "torch"
    graphopt.emit_torch_folder(gm, out)
    loaded = graphopt.load(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs.values()), gm.eval()(*inputs.values()))
    return loaded


def _w(gm, path):
    return tuple(gm.get_submodule(path).weight.shape)


# ----------------------------------------------------------------------------- structured pruning

# family -> {layer: weight shape after prune:ratio=0.5}; 4 heads of 16 -> 2, MLP 128 -> 64
# (GPT-2: Conv1D weights are [in, out]; q/k/v are one fused layer split in three)
PRUNED = {
    "bert": {"bert.encoder.layer.0.attention.self.query": (32, 64), "bert.encoder.layer.0.attention.self.key": (32, 64),
             "bert.encoder.layer.0.attention.self.value": (32, 64),
             "bert.encoder.layer.0.attention.output.dense": (64, 32),
             "bert.encoder.layer.1.intermediate.dense": (64, 64), "bert.encoder.layer.1.output.dense": (64, 64)},
    "gpt2": {"transformer.h.0.attn.c_attn": (64, 96), "transformer.h.0.attn.c_proj": (32, 64),
             "transformer.h.1.mlp.c_fc": (64, 128), "transformer.h.1.mlp.c_proj": (128, 64)},
    # grouped-query attention: 2 key/value heads of 16 for 4 query heads; one key/value head goes
    # with the 2 query heads that read it
    "llama": {"model.layers.0.self_attn.q_proj": (32, 64), "model.layers.0.self_attn.k_proj": (16, 64),
              "model.layers.0.self_attn.v_proj": (16, 64), "model.layers.0.self_attn.o_proj": (64, 32),
              "model.layers.1.mlp.gate_proj": (64, 64), "model.layers.1.mlp.up_proj": (64, 64),
              "model.layers.1.mlp.down_proj": (64, 64)},
    # heads declined (the relative position bias is one tensor for every layer's heads); MLP pruned
    "t5": {"encoder.block.0.layer.0.SelfAttention.q": (64, 64), "encoder.block.0.layer.1.DenseReluDense.wi": (64, 64),
           "encoder.block.0.layer.1.DenseReluDense.wo": (64, 64), "decoder.block.1.layer.2.DenseReluDense.wi": (64, 64)},
}
GROUPS = {  # a rewrite names each group: these layers are one group
    "bert": ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
             "bert.encoder.layer.0.attention.self.value"],
    "gpt2": ["transformer.h.1.attn.c_attn"],
    "llama": ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
    "t5": ["decoder.block.0.layer.2.DenseReluDense.wi"],
}


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_heads_and_mlp_width(hf, name, tmp_path):
    inputs, gm, rec = _run(hf, name, "prune:ratio=0.5")
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    assert rec.verification.checks  # exact against the masked reference, measured against the original
    for path, shape in PRUNED[name].items():
        assert _w(gm, path) == shape, path
    details = [r["detail"] for r in rec.rewrites]
    assert any(all(p in d for p in GROUPS[name]) for d in details), details
    reasons = " | ".join(d["reason"] for d in rec.declined)
    assert "reaches the model output" in reasons  # the classifier / LM head
    # the residual stream (embeddings, norms over the channels) is declined: prune:hidden=true prunes it
    residual = {"bert": "bert.embeddings.word_embeddings", "gpt2": "transformer.wte",
                "llama": "model.embed_tokens", "t5": "encoder.embed_tokens"}[name]
    assert any(residual in d["target"] and "hidden=true" in d["reason"] for d in rec.declined), rec.declined
    if name == "t5":
        assert "per-head operand" in reasons  # the shared relative position bias
    if name == "llama":  # repeat_kv's literal key/value head counts are rewritten: expand(B, 1, 2, T, D)
        expands = [n.args[1] for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"
                   and len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) and len(n.args[1]) == 5]
        assert expands and all(e[1] == 1 and e[2] == 2 for e in expands)
    if name == "gpt2":  # the fused q/k/v split sizes follow the heads
        splits = [n.args[1] for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.split]
        assert splits == [32, 32]
    before = sum(p.numel() for p in hf[name][1].parameters())
    assert sum(p.numel() for p in gm.parameters()) < before
    loaded = _reloads(gm, inputs, tmp_path)
    assert _w(loaded, next(iter(PRUNED[name]))) == next(iter(PRUNED[name].values()))
    assert torch.isfinite(torch.tensor(_train_step(loaded, name, inputs)))


# hidden width (prune:hidden=true): family -> {parameter: shape after ratio=0.25} (64 -> 48)
HIDDEN = {
    "bert": {"bert.embeddings.word_embeddings.weight": (128, 48), "bert.embeddings.position_embeddings.weight": (64, 48),
             "bert.embeddings.token_type_embeddings.weight": (2, 48), "bert.embeddings.LayerNorm.weight": (48,),
             "bert.encoder.layer.0.attention.self.query.weight": (48, 48),
             "bert.encoder.layer.1.output.dense.weight": (48, 96), "bert.encoder.layer.1.output.LayerNorm.bias": (48,),
             "bert.pooler.dense.weight": (48, 48)},
    # RMSNorm is written out in the graph (pow, mean, rsqrt, mul by its weight): the weight is sliced
    "llama": {"model.embed_tokens.weight": (128, 48), "model.layers.0.input_layernorm.weight": (48,),
              "model.layers.0.self_attn.k_proj.weight": (16, 48), "model.layers.1.mlp.down_proj.weight": (48, 96),
              "model.norm.weight": (48,), "lm_head.weight": (128, 48)},
    # Conv1D (weight [in, out]); the token embedding is tied to the LM head and stays tied
    "gpt2": {"transformer.wte.weight": (128, 48), "transformer.wpe.weight": (64, 48), "transformer.ln_f.weight": (48,),
             "transformer.h.0.attn.c_attn.weight": (48, 144), "transformer.h.1.mlp.c_proj.weight": (192, 48)},
    # no token type embedding; its own names for the norms (sa_layer_norm, output_layer_norm)
    "distilbert": {"distilbert.embeddings.word_embeddings.weight": (128, 48),
                   "distilbert.embeddings.position_embeddings.weight": (64, 48),
                   "distilbert.embeddings.LayerNorm.bias": (48,),
                   "distilbert.transformer.layer.0.attention.q_lin.weight": (48, 48),
                   "distilbert.transformer.layer.0.sa_layer_norm.weight": (48,),
                   "distilbert.transformer.layer.1.ffn.lin2.weight": (48, 96),
                   "distilbert.transformer.layer.1.output_layer_norm.weight": (48,),
                   "pre_classifier.weight": (48, 48), "classifier.weight": (2, 48)},
    # position ids computed from the padding (cumsum of the mask); the classifier's dense layer
    "roberta": {"roberta.embeddings.word_embeddings.weight": (128, 48),
                "roberta.embeddings.position_embeddings.weight": (66, 48),
                "roberta.embeddings.token_type_embeddings.weight": (2, 48),
                "roberta.embeddings.LayerNorm.weight": (48,),
                "roberta.encoder.layer.0.attention.self.key.weight": (48, 48),
                "roberta.encoder.layer.1.output.dense.weight": (48, 96),
                "roberta.encoder.layer.1.output.LayerNorm.bias": (48,),
                "classifier.dense.weight": (48, 48), "classifier.out_proj.weight": (2, 48)},
    # the decoder's stream (its cross-attention's q and o, not k/v, which read the encoder's);
    # the encoder's stream reaches the output (encoder_last_hidden_state) and stays 64 wide
    "whisper": {"model.decoder.embed_tokens.weight": (128, 48), "model.decoder.embed_positions.weight": (32, 48),
                "model.decoder.layers.0.self_attn_layer_norm.weight": (48,),
                "model.decoder.layers.0.encoder_attn.q_proj.weight": (48, 48),
                "model.decoder.layers.0.encoder_attn.k_proj.weight": (48, 64),
                "model.decoder.layers.1.fc2.weight": (48, 96), "model.decoder.layer_norm.bias": (48,),
                "proj_out.weight": (128, 48), "model.encoder.layers.0.self_attn_layer_norm.weight": (64,),
                "model.encoder.layers.1.fc2.weight": (64, 96), "model.encoder.embed_positions.weight": (32, 64)},
    # the cls token and the position embeddings (parameters added into the stream) are sliced
    "vit": {"vit.embeddings.cls_token": (1, 1, 48), "vit.embeddings.position_embeddings": (1, 17, 48),
            "vit.embeddings.patch_embeddings.projection.weight": (48, 3, 8, 8), "classifier.weight": (10, 48)},
}


@pytest.mark.parametrize("name", list(HIDDEN))
def test_prune_hidden_width(hf, name, tmp_path):
    inputs, gm, rec = _run(hf, name, "prune:ratio=0.25,hidden=true")
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    params = dict(gm.named_parameters(remove_duplicate=False))
    for path, shape in HIDDEN[name].items():
        assert tuple(params[path].shape) == shape, path
    hidden = [r for r in rec.rewrites if r["data"].get("hidden_width")]
    assert len(hidden) == 1 and "hidden width" in hidden[0]["detail"]
    assert (hidden[0]["data"]["before"], hidden[0]["data"]["after"]) == (64, 48)
    assert rec.notes["hidden_width"][0]["approximate"]
    if name == "gpt2":
        assert gm.get_parameter("lm_head.weight") is gm.get_parameter("transformer.wte.weight")
    if name == "whisper":
        assert gm.get_parameter("proj_out.weight") is gm.get_parameter("model.decoder.embed_tokens.weight")
    loaded = _reloads(gm, inputs, tmp_path)
    path, shape = next(iter(HIDDEN[name].items()))
    assert tuple(dict(loaded.named_parameters())[path].shape) == shape
    assert torch.isfinite(torch.tensor(_train_step(loaded, name, inputs)))


def test_prune_hidden_width_whisper_declines_the_encoder_stream_with_the_reason(hf):
    """Whisper's encoder stream (conv stem, position embedding, its layers) reaches the model output as
    ``encoder_last_hidden_state``: declined with that reason while the decoder's stream is pruned."""
    inputs, gm, rec = _run(hf, "whisper", "prune:ratio=0.25,hidden=true")
    encoder = [d for d in rec.declined if "model.encoder.embed_positions" in d["target"]]
    assert len(encoder) == 1 and "reaches the model output" in encoder[0]["reason"], rec.declined
    hidden = [r for r in rec.rewrites if r["data"].get("hidden_width")]
    assert len(hidden) == 1 and "model.decoder.embed_tokens" in hidden[0]["detail"]
    assert not any("model.encoder" in p for p in hidden[0]["data"]["producers"])
    assert gm(*inputs.values())["encoder_last_hidden_state"].shape == (2, 32, 64)


def test_prune_hidden_width_declines_weights_tied_across_groups(hf):
    """T5 shares one embedding between encoder, decoder and LM head, but the encoder's and the
    decoder's residual streams are different groups: the decoder's is declined with the reason
    (the encoder's reaches the model output); heads stay declined (relative position bias)."""
    inputs, gm, rec = _run(hf, "t5", "prune:ratio=0.25,hidden=true")
    assert rec.verification.status == "passed"
    reasons = " | ".join(d["reason"] for d in rec.declined if "decoder.embed_tokens" in d["target"])
    assert "tied weights" in reasons and "encoder.embed_tokens.weight" in reasons
    assert gm.get_parameter("decoder.embed_tokens.weight").shape == (128, 64)


# ----------------------------------------------------------------------------- exact passes


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa(hf, name):
    inputs, gm, rec = _run(hf, name, "sdpa")
    assert rec.modified and rec.verification.status == "passed" and not rec.declined, rec.declined
    n_attn = {"bert": 2, "gpt2": 2, "llama": 2, "t5": 6}[name]  # T5: 2 encoder, 2 x (self + cross) decoder
    assert count_calls(gm, F.scaled_dot_product_attention) == n_attn
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.softmax]
    if name == "gpt2":
        assert all(r["data"]["masks"] == 1 for r in rec.rewrites)  # causal + padding: one additive mask


def test_sdpa_keeps_attention_dropout_of_a_model_captured_in_train_mode():
    """HF's ``F.dropout(p, training=self.training)`` on the probabilities (export: the graph's own
    training flag) becomes the SDPA layer's ``dropout_p``, applied in train mode only."""
    from graphopt.ir import ScaledDotProductAttention

    inputs = zoo.hf_example_inputs("bert")
    gm = graphopt.capture(zoo.hf_model("bert").train(), inputs, capture="export")
    out, rec = run_pass("sdpa", gm, tuple(inputs.values()))
    assert rec.modified and rec.verification.status == "passed" and not rec.declined
    assert [m.dropout_p for m in out.modules() if isinstance(m, ScaledDotProductAttention)] == [0.1, 0.1]
    assert count_calls(out, F.dropout) == 0
    out.eval()
    with torch.no_grad():
        torch.testing.assert_close(out(*inputs.values()), out(*inputs.values()))


@pytest.mark.parametrize("name", FAMILIES)
def test_drop_regularization(hf, name):
    inputs, gm, rec = _run(hf, name, "drop_regularization")
    assert rec.modified and rec.verification.status == "passed"
    assert count_modules(gm, nn.Dropout) == 0 and count_calls(gm, F.dropout) == 0
    gm.train()  # train mode is now deterministic
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs.values()), gm(*inputs.values()))


FREEZE = {  # family -> (modules globs, a frozen parameter, one still trained)
    "bert": ("bert.embeddings.*|bert.encoder.layer.0.*", "bert.encoder.layer.0.attention.self.query.weight",
             "bert.encoder.layer.1.attention.self.query.weight"),
    "gpt2": ("transformer.wte|transformer.wpe|transformer.h.0.*", "transformer.h.0.attn.c_attn.weight",
             "transformer.h.1.attn.c_attn.weight"),
    "llama": ("model.embed_tokens|model.layers.0.*", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.1.self_attn.q_proj.weight"),
    "t5": ("encoder.embed_tokens|encoder.block.0.*", "encoder.block.0.layer.0.SelfAttention.q.weight",
           "encoder.block.1.layer.0.SelfAttention.q.weight"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_freeze_embeddings_first_block_and_globs(hf, name):
    globs, frozen, trained = FREEZE[name]
    inputs, gm, rec = _run(hf, name, f"freeze:mode=modules,modules={globs}")
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    params = dict(gm.named_parameters())
    assert not params[frozen].requires_grad and params[trained].requires_grad
    emb = {"bert": "bert.embeddings.word_embeddings.weight", "gpt2": "transformer.wte.weight",
           "llama": "model.embed_tokens.weight", "t5": "encoder.embed_tokens.weight"}[name]
    assert not params[emb].requires_grad  # GPT-2, T5: tied to the LM head (and T5's decoder embedding) too
    if name in ("bert", "llama"):
        assert all(not p.requires_grad for n, p in params.items() if fnmatch.fnmatch(n, globs.split("|")[-1]))
    _train_step(gm, name, inputs)
    # stages: the embeddings (and what comes before the first block) are the first stage
    inputs, gm, rec = _run(hf, name, "freeze:mode=stages,stages=1")
    assert rec.modified and rec.verification.status == "passed"
    assert not dict(gm.named_parameters())[emb].requires_grad


@pytest.mark.parametrize("name", FAMILIES)
def test_partition_two_stages(hf, name):
    inputs, gm0 = hf[name]
    if name == "t5":  # encoder and decoder share the embedding (and the LM head ties it): no cut keeps it whole
        with pytest.raises(graphopt.PreconditionError, match="shared module/parameter 'encoder.embed_tokens'"):
            run_pass("partition:stages=2", gm0, tuple(inputs.values()))
        return
    inputs, gm, rec = _run(hf, name, "partition:stages=2")
    assert rec.modified and rec.verification.status == "passed"
    assert rec.notes["stages"] == 2


# ----------------------------------------------------------------------------- numerics and sparsity


@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_precision_bf16(hf, name):
    inputs, gm, rec = _run(hf, name, "mixed_precision:dtype=bfloat16")
    assert rec.modified and rec.verification.status == "passed", rec.verification.summary()
    assert rec.verification.value <= 0.05
    _train_step(gm, name, inputs)


HEADS = {"bert": "classifier", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head"}


@pytest.mark.parametrize("name", FAMILIES)
def test_prune_2_4_on_linear_layers_not_the_head(hf, name):
    inputs, gm, rec = _run(hf, name, f"prune:mode=2:4,exclude={HEADS[name]}")
    assert rec.modified and rec.verification.status == "passed"
    layer = {"bert": "bert.encoder.layer.0.intermediate.dense", "gpt2": "transformer.h.0.mlp.c_fc",
             "llama": "model.layers.0.mlp.gate_proj", "t5": "encoder.block.0.layer.1.DenseReluDense.wi"}[name]
    w = gm.get_submodule(layer).weight.detach()
    if name == "gpt2":
        w = w.t()  # Conv1D: [in, out]; runs of 4 input channels per output channel
    assert ((w.reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert (gm.get_submodule(HEADS[name]).weight != 0).all()
    assert any(r["target"] == layer for r in rec.rewrites)


# ----------------------------------------------------------------------------- emitters


@pytest.mark.parametrize("name", FAMILIES)
def test_emit_onnx_after_sdpa(hf, name, tmp_path):
    pytest.importorskip("onnxruntime")
    from graphopt.emit import create_emitter

    inputs, gm, rec = _run(hf, name, "sdpa")
    res = create_emitter("onnx").emit(gm, tmp_path / "onnx")
    assert res.check["passed"], res.check
    assert list((tmp_path / "onnx").glob("*.onnx"))
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["outputs"][0] == "logits"  # keyword outputs keep their names (T5: + encoder_last_hidden_state)
    # torch.export bakes the example batch into view/reshape sizes: exported with a static batch, says so
    assert manifest["dynamic_batch"] is False and manifest["static_batch"] == 2
