"""Real architectures from torchvision, timm and HuggingFace transformers, built offline with random
weights (transformers models from small configs: ``build("hf:bert")``; nothing is downloaded).

The torchvision wheel on PyPI is a CUDA build. On a CPU-only torch its Python model
definitions work, but two private registration modules fail to import; they only register
C++ op metadata (nms, roi_align, ...) that classification models never call. When (and only
when) the plain import fails, they are replaced by empty modules and the import retried.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from torch import nn

from graphopt.errors import MissingDependencyError

__all__ = ["import_torchvision", "import_transformers", "torchvision_model", "timm_model", "hf_model",
           "hf_example_inputs", "HF_FAMILIES", "build"]

_STUBS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_torchvision() -> types.ModuleType:
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("torchvision is not installed",
                                     fix="pip install 'graphopt[zoo]'") from exc
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        for name in _STUBS:
            sys.modules.setdefault(name, types.ModuleType(name))
        return importlib.import_module("torchvision")


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    tv = import_torchvision()
    return tv.models.get_model(name, weights=None, **kwargs)


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    import_torchvision()  # timm imports torchvision
    try:
        import timm
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("timm is not installed", fix="pip install 'graphopt[zoo]'") from exc
    return timm.create_model(name, pretrained=False, **kwargs)


def import_transformers() -> types.ModuleType:
    """``import transformers`` (it imports torchvision when installed, hence the stub first)."""
    try:
        import_torchvision()
    except MissingDependencyError:
        pass
    try:
        return importlib.import_module("transformers")
    except ModuleNotFoundError as exc:
        raise MissingDependencyError("transformers is not installed", fix="pip install 'graphopt[zoo]'") from exc


# family -> (config class, model class, small config). Eager attention (the hand-written
# matmul/softmax form that passes such as ``sdpa`` rewrite); caches off (training needs none).
_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
HF_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", dict(_SMALL, vocab_size=128, max_position_embeddings=64)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=128, max_position_embeddings=64)),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(_SMALL, vocab_size=128, max_position_embeddings=66)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                                      bos_token_id=0, eos_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL, num_key_value_heads=2, vocab_size=128,
                                                      max_position_embeddings=64)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                         num_decoder_layers=2, num_heads=4, vocab_size=128)),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(_SMALL, image_size=32, patch_size=8, num_labels=10)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
                     num_mel_bins=16, max_source_positions=32, max_target_positions=32, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=0, suppress_tokens=None,
                     begin_suppress_tokens=None)),
}


def hf_model(name: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small HuggingFace model of family ``name`` (see :data:`HF_FAMILIES`), random weights."""
    if name not in HF_FAMILIES:
        raise ValueError(f"unknown transformers family '{name}' (known: {', '.join(HF_FAMILIES)})")
    tf = import_transformers()
    cfg_cls, model_cls, kw = HF_FAMILIES[name]
    cfg = getattr(tf, cfg_cls)(**{**kw, **overrides})
    cfg.use_cache = False
    cfg._attn_implementation = overrides.get("attn_implementation", "eager")
    import torch

    torch.manual_seed(seed)
    model = getattr(tf, model_cls)(cfg)
    return model.eval()


def hf_example_inputs(name: str, batch: int = 2, seq: int = 8, labels: bool = False) -> dict[str, Any]:
    """Keyword inputs for :func:`hf_model` (``input_ids`` with a padded ``attention_mask``, ...)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if name == "vit":
        out: dict[str, Any] = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
        if labels:
            out["labels"] = torch.randint(0, 10, (batch,), generator=g)
        return out
    if name == "whisper":
        out = {"input_features": torch.randn(batch, 16, 64, generator=g),
               "decoder_input_ids": torch.randint(0, 128, (batch, seq), generator=g)}
        if labels:
            out["labels"] = torch.randint(0, 128, (batch, seq), generator=g)
        return out
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq - 3:] = 0  # padding on every row but the first
    out = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        out["decoder_input_ids"] = torch.randint(0, 128, (batch, seq), generator=g)
    if labels:
        out["labels"] = (torch.randint(0, 2, (batch,), generator=g) if name in ("bert", "distilbert", "roberta")
                         else torch.randint(0, 128, (batch, seq), generator=g))
    return out


def build(spec: str, **kwargs: Any) -> nn.Module:
    """``torchvision:resnet50`` / ``timm:efficientnet_b0`` / ``hf:bert`` / a bare torchvision name."""
    lib, _, name = spec.rpartition(":")
    if lib in ("", "torchvision", "tv"):
        return torchvision_model(name, **kwargs)
    if lib == "timm":
        return timm_model(name, **kwargs)
    if lib in ("hf", "transformers"):
        return hf_model(name, **kwargs)
    raise ValueError(f"unknown model zoo '{lib}' (use torchvision:, timm: or hf:)")
