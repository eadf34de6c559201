"""Hand-written transformers that torch.fx symbolic tracing captures whole (test/benchmark models).

Attention is written out as people write it: q/k/v/o ``nn.Linear``, ``q @ k.transpose(-2, -1)``,
a scale, a causal mask (``masked_fill(new_ones((T, T)).triu(1), -inf)``) and/or an additive padding
mask, softmax, attention-probability dropout, ``@ v``. ``n_kv_heads < n_heads`` is grouped-query
attention (LLaMA style: key/value heads repeated with ``repeat_interleave``).

- :class:`GPT`: causal LM (token + position embeddings, pre-LN blocks, GELU MLP, tied-free head);
- :class:`Llama`: causal LM with GQA, RMS-free (LayerNorm) pre-LN blocks and a SiLU-gated MLP;
- :class:`Bert`: encoder with a padding mask (``attention_mask`` input of 1/0), post-LN blocks,
  a classifier on the first token.
"""

# no `from __future__ import annotations`: torch.fx keeps string annotations of forward as types

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "GPT", "Llama", "Bert", "HeadMixing", "gpt", "llama", "bert", "lm_inputs", "bert_inputs"]


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, dropout: float = 0.1,
                 causal: bool = False, max_len: int = 64, scale_q: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.q = nn.Linear(dim, n_heads * self.head_dim)
        self.k = nn.Linear(dim, self.n_kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.n_kv_heads * self.head_dim)
        self.o = nn.Linear(n_heads * self.head_dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.causal, self.scale_q = causal, scale_q

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if self.scale_q:  # timm style: the scale on q before the product
            att = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if self.causal:  # True above the diagonal: future positions
            future = x.new_ones((T, T), dtype=torch.bool).triu(1)
            att = att.masked_fill(future, float("-inf"))
        if mask is not None:
            att = att + mask
        att = F.softmax(att, dim=-1)
        att = self.attn_drop(att)
        y = att @ v
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o(y)


class HeadMixing(Attention):
    """Talking-heads style: the probabilities are mixed across heads between softmax and ``@ v``
    (not expressible as SDPA; the pass must decline it)."""

    def __init__(self, dim: int, n_heads: int, **kw):
        super().__init__(dim, n_heads, **kw)
        self.mix = nn.Parameter(torch.eye(n_heads) + 0.1 * torch.randn(n_heads, n_heads))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        att = F.softmax(att, dim=-1)
        att = torch.einsum("bhqk,hg->bgqk", att, self.mix)
        y = att @ v
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.1, gated: bool = False):
        super().__init__()
        self.gated = gated
        self.fc1 = nn.Linear(dim, hidden)
        if gated:
            self.gate = nn.Linear(dim, hidden)
        self.act = nn.SiLU() if gated else nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.fc1(x) if self.gated else self.act(self.fc1(x))
        return self.drop(self.fc2(h))


class Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, mlp: int, dropout: float, causal: bool,
                 pre_ln: bool, gated: bool, max_len: int, attn_cls: type = Attention):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(dim)
        self.attn = attn_cls(dim, n_heads, n_kv_heads=n_kv_heads, dropout=dropout, causal=causal, max_len=max_len)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp, dropout, gated)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), mask))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x, mask)))
        return self.ln2(x + self.mlp(x))


class GPT(nn.Module):
    """Causal LM: ``forward(idx [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, vocab: int = 96, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                 n_kv_heads: int | None = None, mlp: int = 256, max_len: int = 64, dropout: float = 0.1,
                 gated: bool = False, attn_cls: type = Attention):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, n_heads, n_kv_heads, mlp, dropout, True, True, gated, max_len,
                                           attn_cls) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class Llama(GPT):
    """LLaMA-style: grouped-query attention (``n_kv_heads`` < ``n_heads``) and a gated SiLU MLP."""

    def __init__(self, vocab: int = 96, dim: int = 64, n_layers: int = 2, n_heads: int = 8, n_kv_heads: int = 2,
                 mlp: int = 172, max_len: int = 64, dropout: float = 0.0):
        super().__init__(vocab, dim, n_layers, n_heads, n_kv_heads, mlp, max_len, dropout, gated=True)


class Bert(nn.Module):
    """Encoder: ``forward(input_ids [B, T], attention_mask [B, T] of 1/0) -> logits [B, classes]``."""

    def __init__(self, vocab: int = 96, dim: int = 64, n_layers: int = 2, n_heads: int = 4, mlp: int = 256,
                 max_len: int = 64, classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.ln_e = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, n_heads, None, mlp, dropout, False, False, False, max_len)
                                     for _ in range(n_layers)])
        self.cls = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.ln_e(self.tok(input_ids) + self.pos(pos)))
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for b in self.blocks:
            x = b(x, ext)
        return self.cls(x[:, 0])


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(**kw)


def llama(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(**kw)


def bert(**kw) -> Bert:
    torch.manual_seed(0)
    return Bert(**kw)


def lm_inputs(batch: int = 2, T: int = 16, vocab: int = 96, seed: int = 0) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (batch, T), generator=g),)


def bert_inputs(batch: int = 2, T: int = 16, vocab: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[0, T // 2:] = 0  # padding in the first sequence
    return ids, mask


def small_vit(**kw):
    """torchvision's VisionTransformer at 32x32, 2 layers (vit_b_16's code, small sizes)."""
    from graphopt.zoo import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    cfg.update(kw)
    return tv.models.vision_transformer.VisionTransformer(**cfg).eval()


def timm_vit(fused: bool = False):
    """timm's vit_tiny at 32x32, its hand-written attention path (fused attention off)."""
    from graphopt.zoo import import_torchvision

    import_torchvision()
    import timm
    from timm.layers import set_fused_attn

    set_fused_attn(fused)
    try:
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    finally:
        set_fused_attn(True)
