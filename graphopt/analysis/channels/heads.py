"""Attention heads in the channel analysis: whole heads of q/k/v/o are pruned together.

A ``view``/``reshape`` that splits a channel axis of width ``H*D`` into ``[H, D]`` (the usual
``q.view(B, T, H, D)``) turns the tensor into :class:`Heads`: ``rows[h, j]`` is the atom of head
``h``, feature ``j``. Heads keeps its meaning through transposes, scalar scales, masks that do
not vary over heads, softmax over another axis, dropout, ``repeat_interleave`` over the head axis
(grouped-query attention: each key/value head feeds ``rep`` query heads) and:

- ``q @ k^T``: ``q.rows[h, j]`` and ``k.rows[h, j]`` are unified (the scores keep the head axis);
- ``scores @ v`` and ``scaled_dot_product_attention(q, k, v)``: the head rows of the scores (or
  of q) are unified with those of v, so a head is one set of classes across q, k, v;
- a reshape that merges ``[H, D]`` back into one axis gives ordinary channels again (o's input);
- rotary embeddings: slices and ``cat`` over the head-feature axis, ``neg``, and the sum of two
  tensors with the same atoms in each head (``q * cos + rotate_half(q) * sin``);
- HuggingFace's ``repeat_kv``: ``unsqueeze`` after the head axis, ``expand`` of that axis and the
  ``reshape`` merging it (grouped-query attention, like ``repeat_interleave``; the literal key/value
  head count of the ``expand`` and the merged count of the ``reshape`` are rewritten);
- timm's fused q/k/v projection: ``qkv(x).reshape(B, N, 3, H, D)`` splits the channel axis into
  ``[S, H, D]`` (:class:`Stacked`: ``rows[s, h, j]`` is channel ``s*H*D + h*D + j``), followed
  through ``permute`` and taken apart by ``unbind`` (``aten.unbind`` + ``getitem`` from
  torch.export), ``select`` or an integer index over the stack axis into q, k and v heads; the
  head-count literal ``H`` is rewritten (``S`` and ``D`` stay). timm's ``resolve_self_attn_mask``
  (it reads only the scores' dtype) and ``maybe_add_mask`` (an add of a mask that does not vary
  over heads) are followed.

Every split adds a *heads* constraint (channels go in whole heads); after the analysis the rows
of each split are reduced to distinct heads (with GQA, the query heads of a group share their
key/value head's classes), so key/value heads are removed by group with their query heads. The
literal head count of each split is rewritten when heads go (``Member`` ``reshape`` with
``extra["per"] = D``); a head count computed in the graph blocks the group, with the reason.
Anything else that touches a Heads tensor blocks its channels (the op is named).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.analysis.channels.graph import ChanInfo, Constraint, Member
from graphopt.analysis.channels.ops import (
    UNARY_FUNCTIONS, arg as _arg, norm_dim as _norm_dim, shape_of as _shape,
)

if TYPE_CHECKING:
    from graphopt.analysis.channels.analyzer import ChannelAnalysis

__all__ = ["Heads", "Stacked", "split_heads", "visit_heads", "head_constraints"]

_MATMUL = {operator.matmul, torch.matmul}
_SCALE_FNS = {operator.mul, operator.truediv, torch.mul, torch.div}
_ATEN_SLICE = torch.ops.aten.slice.Tensor
_ATEN_SELECT = torch.ops.aten.select.int
_ATEN_UNBIND = torch.ops.aten.unbind.int
_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}  # fx, torch.export
_PASS_METHODS = {"contiguous", "float", "to", "type_as", "half", "bfloat16", "clone", "detach"}


@dataclass
class Heads(ChanInfo):
    """A tensor with a head axis ``dim`` (``atoms`` = ``rows`` flattened, for blocking) and, for
    q/k/v and attention outputs, a feature axis ``ddim`` (None for scores/probabilities)."""

    ddim: int | None = None
    rows: np.ndarray | None = None
    grp: int | None = None  # grouped-query ``repeat_kv``: the axis after the heads that repeats each one
    rep: int = 1  # its size (1 after the unsqueeze, ``rep`` after the expand)

    @classmethod
    def make(cls, hdim: int, ddim: int | None, rows: np.ndarray, ndim: int) -> "Heads":
        return cls(hdim, rows.reshape(-1), ndim, 1, ddim, rows)

    def moved2(self, hdim: int, ddim: int | None, ndim: int | None = None) -> "Heads":
        return Heads.make(hdim, ddim, self.rows, self.ndim if ndim is None else ndim)


@dataclass
class Stacked(Heads):
    """A fused q/k/v projection split into ``[S, H, D]`` (timm's ``reshape(B, N, 3, H, D)``):
    ``rows`` has shape ``(S, H, D)``; ``sdim`` is the stack axis (q, k, v), ``dim`` the heads,
    ``ddim`` the head features. Only moving the axes and taking the stack apart are followed."""

    sdim: int = 0

    def item(self, s: int, removed: bool) -> Heads:
        """Stack entry ``s`` as plain heads (``removed``: the stack axis is gone, as after ``unbind``)."""
        sh = (lambda a: a - 1 if a > self.sdim else a) if removed else (lambda a: a)  # noqa: E731
        return Heads.make(sh(self.dim), sh(self.ddim), self.rows[s], self.ndim - 1 if removed else self.ndim)


def split_heads(an: "ChannelAnalysis", node: fx.Node, x: ChanInfo, a: tuple[int, ...], b: tuple[int, ...],
                sizes: list[Any], kind: str) -> Heads | None:
    """``x`` (channels on ``x.dim`` of shape ``a``) reshaped to ``b`` splitting them into [H, D]."""
    d = x.dim
    if not isinstance(x, Heads) and x.inner == 1 and len(sizes) == len(b) and d == len(a) - 1 \
            and len(b) == len(a) + 2:
        return _split_stacked(an, node, x, a, b, sizes, kind)
    if isinstance(x, Heads) or x.inner != 1 or len(sizes) != len(b) or d != len(a) - 1 or len(b) != len(a) + 1:
        return None  # heads split the last (feature) axis; a conv's channel shuffle stays declined
    prefix = math.prod(a[:d])
    for j in range(len(b) - 1):
        if math.prod(b[:j]) == prefix and b[j] * b[j + 1] == a[d] and math.prod(b[j + 2:]) == math.prod(a[d + 1:]):
            H, D = b[j], b[j + 1]
            lit = sizes[j]
            if isinstance(lit, fx.Node) or not isinstance(lit, int):
                an.block(x.atoms, f"the head count of view/reshape (node {node.name}) is computed in the graph; "
                                  "it cannot be rewritten when heads are pruned")
                return None
            if lit != -1:
                an.members.append(Member("reshape", node.name, node.name, x.atoms, axis=j,
                                         extra={"kind": kind, "per": D}))
            rows = x.atoms.reshape(H, D)
            an.head_splits.append((rows, f"heads of view/reshape (node {node.name})"))
            return Heads.make(j, j + 1, rows, len(b))
    return None


def _split_stacked(an: "ChannelAnalysis", node: fx.Node, x: ChanInfo, a: tuple[int, ...], b: tuple[int, ...],
                   sizes: list[Any], kind: str) -> Stacked | None:
    """``qkv(x).reshape(B, N, S, H, D)`` (timm's fused attention): channel ``s*H*D + h*D + j`` is
    ``rows[s, h, j]``; each of the ``S`` parts is a head split, the literal ``H`` is rewritten."""
    d = x.dim
    prefix = math.prod(a[:d])
    for j in range(len(b) - 2):
        if math.prod(b[:j]) == prefix and b[j] * b[j + 1] * b[j + 2] == a[d] and b[j] > 1:
            S, H, D = b[j], b[j + 1], b[j + 2]
            lits = sizes[j:j + 3]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in lits) \
                    or lits[0] != S or (lits[1] == -1 and lits[2] == -1):
                an.block(x.atoms, f"the q/k/v or head count of view/reshape (node {node.name}) is computed in the "
                                  "graph; it cannot be rewritten when heads are pruned")
                return None
            if lits[1] != -1:
                an.members.append(Member("reshape", node.name, node.name, x.atoms, axis=j + 1,
                                         extra={"kind": kind, "per": S * D}))
            rows = x.atoms.reshape(S, H, D)
            for i in range(S):
                an.head_splits.append((rows[i], f"heads of view/reshape (node {node.name}, part {i} of {S})"))
            return Stacked(j + 1, x.atoms, len(b), 1, j + 2, rows, sdim=j)
    return None


def _stacked(an: "ChannelAnalysis", node: fx.Node, x: Stacked, name: str) -> Any:
    """A fused q/k/v tensor: ``permute``/``transpose`` move its axes; ``unbind``, ``select`` or an
    integer index over the stack axis give q, k and v heads; anything else blocks."""
    heads = [v for v in (an.val(a) for a in node.all_input_nodes) if isinstance(v, Heads)]
    if len(heads) != 1:
        return _block(an, node, "combines a fused q/k/v tensor with other attention heads")
    if name == "permute":
        rest = node.args[1:]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if len(dims) != x.ndim or not all(isinstance(v, int) for v in dims):
            return _block(an, node)
        dims = [_norm_dim(v, x.ndim) for v in dims]
        return Stacked(dims.index(x.dim), x.atoms, x.ndim, 1, dims.index(x.ddim), x.rows,
                       sdim=dims.index(x.sdim))
    if name == "transpose":
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return _block(an, node)
        swap = {_norm_dim(d0, x.ndim): _norm_dim(d1, x.ndim), _norm_dim(d1, x.ndim): _norm_dim(d0, x.ndim)}
        return Stacked(swap.get(x.dim, x.dim), x.atoms, x.ndim, 1, swap.get(x.ddim, x.ddim), x.rows,
                       sdim=swap.get(x.sdim, x.sdim))
    if name in _PASS_METHODS and node.op == "call_method":
        return x
    S = x.rows.shape[0]
    if name == "unbind" or (node.op == "call_function" and node.target in (torch.unbind, _ATEN_UNBIND)):
        dim = _arg(node, 1, "dim", 0)
        if isinstance(dim, int) and _norm_dim(dim, x.ndim) == x.sdim:
            from graphopt.analysis.channels.analyzer import _Tuple
            return _Tuple([x.item(i, removed=True) for i in range(S)])
        return _block(an, node, "unbind of a fused q/k/v tensor over an axis other than q/k/v")
    if node.op == "call_function" and node.target in (_ATEN_SELECT, torch.select):
        dim, idx = _arg(node, 1, "dim"), _arg(node, 2, "index")
        if isinstance(dim, int) and isinstance(idx, int) and _norm_dim(dim, x.ndim) == x.sdim and -S <= idx < S:
            return x.item(idx, removed=True)
        return _block(an, node, "select of a fused q/k/v tensor other than one of q/k/v")
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        if x.sdim == 0 and isinstance(idx, int) and not isinstance(idx, bool) and -S <= idx < S:
            return x.item(idx, removed=True)  # q, k, v = qkv[0], qkv[1], qkv[2]
        return _block(an, node, "indexing of a fused q/k/v tensor other than qkv[i] over its leading q/k/v axis")
    return _block(an, node, "on a fused q/k/v tensor (followed: permute, transpose, unbind/select over q/k/v)")


def _timm_fn(tgt: Any, name: str) -> bool:
    return getattr(tgt, "__name__", "") == name and str(getattr(tgt, "__module__", "")).startswith("timm.")


def _block(an: "ChannelAnalysis", node: fx.Node, why: str) -> None:
    an.unknown(node, why)


def visit_heads(an: "ChannelAnalysis", node: fx.Node) -> Any:
    """Analyse a node reading a :class:`Heads` tensor; unknown ops block its channels."""
    heads = [v for v in (an.val(a) for a in node.all_input_nodes) if isinstance(v, Heads)]
    x = an.val(node.args[0]) if node.args else None
    out = _shape(node)
    tgt = node.target
    if node.op == "call_module":
        mod = an.gm.get_submodule(str(tgt))
        if type(mod) in (nn.Dropout, nn.Identity) and isinstance(x, Heads) and len(heads) == 1:
            return x
        if isinstance(mod, nn.Softmax) and isinstance(x, Heads) and len(heads) == 1 and mod.dim is not None \
                and _norm_dim(mod.dim, x.ndim) not in (x.dim, x.ddim):
            return x
        return _block(an, node, "an attention-head tensor reaches a layer the head analysis does not follow")
    name = tgt if node.op == "call_method" else getattr(tgt, "__name__", "")
    if node.op == "call_function" and tgt in (torch.cat, torch.concat):
        return _cat(an, node)
    if node.op == "call_function" and tgt is operator.getitem and not isinstance(x, Heads):
        return an.getitem(node)  # q, k or v of an unbind
    if isinstance(x, Stacked):
        return _stacked(an, node, x, name)
    if node.op == "call_function" and _timm_fn(tgt, "resolve_self_attn_mask") and len(heads) == 1 \
            and heads[0] is an.val(_arg(node, 1, "attn")):
        return None  # timm: an additive mask built from the scores' dtype only (None, causal, or the given mask)
    if node.op == "call_function" and _timm_fn(tgt, "maybe_add_mask") and isinstance(x, Heads):
        return _elementwise(an, node, x, heads, out, none_ok=True)  # scores + mask (when there is one)
    if not isinstance(x, Heads):
        if node.op == "call_function" and tgt in _MATMUL | _SDPA:
            return _block(an, node, "heads as the right operand only")
        return _block(an, node, "attention heads in an argument position the analysis does not follow")
    if x.grp is not None:
        return _repeat_kv(an, node, x, name, out)
    if node.op == "call_function" and tgt is _ATEN_SLICE:
        return _slice(an, node, x, heads)
    if (node.op == "call_function" and tgt in UNARY_FUNCTIONS) or name in ("neg", "neg_"):
        return x if len(heads) == 1 else _block(an, node)
    if name == "unsqueeze" or (node.op == "call_function" and tgt is torch.unsqueeze):
        d = _arg(node, 1, "dim")
        if len(heads) != 1 or not isinstance(d, int):
            return _block(an, node)
        d = _norm_dim(d, x.ndim + 1)
        sh = lambda a: a if a is None or a < d else a + 1  # noqa: E731
        return Heads(sh(x.dim), x.atoms, x.ndim + 1, 1, sh(x.ddim), x.rows, x.dim + 1 if d == x.dim + 1 else None)
    if (node.op == "call_function" and tgt in (F.softmax, torch.softmax)) or name == "softmax":
        d = _arg(node, 1, "dim")
        if len(heads) == 1 and isinstance(d, int) and _norm_dim(d, x.ndim) not in (x.dim, x.ddim):
            return x
        return _block(an, node, "softmax over the head or head-feature axis")
    if node.op == "call_function" and tgt is F.dropout or name in _PASS_METHODS:
        return x if len(heads) == 1 else _block(an, node)
    if (node.op == "call_function" and tgt in _SCALE_FNS) or name in ("mul", "div", "add", "masked_fill"):
        return _elementwise(an, node, x, heads, out)
    if node.op == "call_function" and tgt in (operator.add, torch.add):
        return _elementwise(an, node, x, heads, out)
    if name in ("transpose",) or (node.op == "call_function" and tgt is torch.transpose):
        d0, d1 = _arg(node, 1, "dim0"), _arg(node, 2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return _block(an, node)
        d0, d1 = _norm_dim(d0, x.ndim), _norm_dim(d1, x.ndim)
        swap = {d0: d1, d1: d0}
        return x.moved2(swap.get(x.dim, x.dim), None if x.ddim is None else swap.get(x.ddim, x.ddim))
    if name == "permute":
        rest = node.args[1:]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if len(dims) != x.ndim or not all(isinstance(d, int) for d in dims):
            return _block(an, node)
        dims = [_norm_dim(d, x.ndim) for d in dims]
        return x.moved2(dims.index(x.dim), None if x.ddim is None else dims.index(x.ddim))
    if name == "repeat_interleave":
        rep, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(rep, int) and isinstance(dim, int) and _norm_dim(dim, x.ndim) == x.dim:
            return Heads.make(x.dim, x.ddim, np.repeat(x.rows, rep, axis=0), x.ndim)
        return _block(an, node, "repeat_interleave not over the head axis")
    if node.op == "call_function" and tgt in _MATMUL:
        return _matmul(an, node, x, an.val(node.args[1]))
    if node.op == "call_function" and tgt in _SDPA:
        q, k, v = (an.val(a) for a in node.args[:3])
        mask = _arg(node, 3, "attn_mask")
        ms = _shape(mask) if isinstance(mask, fx.Node) else None
        if not all(isinstance(t, Heads) and t.ddim == t.ndim - 1 and t.dim == q.dim for t in (q, k, v)) \
                or q.rows.shape != k.rows.shape or q.rows.shape[0] != v.rows.shape[0] or isinstance(
                    an.val(mask), ChanInfo) or (ms is not None and _varies_over(ms, x.dim, x.ndim)):
            return _block(an, node, "scaled_dot_product_attention with inputs the head analysis does not follow")
        an.uf.union(q.rows.reshape(-1), k.rows.reshape(-1))
        if q.rows.shape == v.rows.shape:
            an.uf.union(q.rows.reshape(-1), v.rows.reshape(-1))
        else:
            return _block(an, node, "value heads of another width than the query heads")
        return v
    if name in ("view", "reshape") or (node.op == "call_function" and tgt is torch.reshape):
        return _merge(an, node, x, name if node.op == "call_method" else "fn")
    return _block(an, node, "on attention heads")


def _varies_over(shape: tuple[int, ...], dim: int, ndim: int) -> bool:
    d = dim - (ndim - len(shape))
    return d >= 0 and shape[d] != 1


def _same_heads(a: Heads, b: Heads) -> bool:
    """``a`` and ``b`` carry the same atoms in each head (features possibly permuted within it, as
    rotary embeddings' ``rotate_half`` does): removing a head removes the same atoms from both."""
    return (a.dim == b.dim and a.ddim == b.ddim and a.ndim == b.ndim and a.grp is None and b.grp is None
            and a.rows.shape == b.rows.shape
            and bool((np.sort(a.rows, axis=1) == np.sort(b.rows, axis=1)).all()))


def _elementwise(an: "ChannelAnalysis", node: fx.Node, x: Heads, heads: list[Heads], out: Any,
                 none_ok: bool = False) -> Any:
    if len(heads) == 2 and out is not None and len(out) == x.ndim and _same_heads(*heads) and not [
            a for a in list(node.args[2:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]:
        return x  # q * cos + rotate_half(q) * sin: both operands are q's heads
    if len(heads) != 1 or out is None or len(out) != x.ndim:
        return _block(an, node, "combines two attention-head tensors")
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(a, fx.Node):
            s = _shape(a)
            if none_ok and s is None and not isinstance(an.val(a), ChanInfo) and "tensor_meta" in a.meta \
                    and a.meta["tensor_meta"] is None:
                continue  # a value that was None at capture (timm's maybe_add_mask without a mask)
            if isinstance(an.val(a), ChanInfo) or s is None or _varies_over(s, x.dim, x.ndim):
                return _block(an, node, "a per-head operand (it would need slicing with the heads)")
    return x


def _slice(an: "ChannelAnalysis", node: fx.Node, x: Heads, heads: list[Heads]) -> Any:
    """``aten.slice(x, dim, start, end, step)``: over the head-feature axis (rotary embeddings'
    halves) it keeps whole heads; over another axis nothing changes; over the heads it blocks."""
    d, start, end, step = (_arg(node, 1, "dim", 0), _arg(node, 2, "start"), _arg(node, 3, "end"),
                           _arg(node, 4, "step", 1))
    if len(heads) != 1 or not all(v is None or isinstance(v, int) for v in (d, start, end, step)):
        return _block(an, node, "a slice with bounds computed in the graph")
    d = _norm_dim(d, x.ndim)
    if d == x.ddim:
        return Heads.make(x.dim, x.ddim, x.rows[:, slice(start, end, step)], x.ndim)
    if d == x.dim:
        return _block(an, node, "a slice of the head axis")
    return x


def _cat(an: "ChannelAnalysis", node: fx.Node) -> Any:
    """``cat`` of attention-head tensors over their feature axis (``rotate_half``: the same heads)."""
    items = [an.val(t) for t in (_arg(node, 0, "tensors") or [])]
    d = _arg(node, 1, "dim", 0)
    if not items or not isinstance(d, int) or not all(isinstance(v, Heads) and v.grp is None for v in items):
        return _block(an, node, "cat of attention heads with other tensors")
    first = items[0]
    d = _norm_dim(d, first.ndim)
    if d != first.ddim or not all(v.dim == first.dim and v.ddim == first.ddim and v.ndim == first.ndim
                                  and v.rows.shape[0] == first.rows.shape[0] for v in items):
        return _block(an, node, "cat of attention heads over an axis other than the head features")
    return Heads.make(first.dim, first.ddim, np.concatenate([v.rows for v in items], axis=1), first.ndim)


def _repeat_kv(an: "ChannelAnalysis", node: fx.Node, x: Heads, name: str, out: Any) -> Any:
    """HF's ``repeat_kv``: ``k[:, :, None].expand(B, Hkv, rep, T, D).reshape(B, Hkv * rep, T, D)``
    (``repeat_interleave`` over the heads); the literal ``Hkv`` and ``Hkv * rep`` are rewritten."""
    a = _shape(node.args[0])
    if name == "expand" and a is not None and out is not None and len(out) == len(a) == x.ndim:
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else list(node.args[1:])
        if len(sizes) == len(a) and all(out[i] == a[i] for i in range(len(a)) if i != x.grp) and a[x.grp] == 1:
            lit = sizes[x.dim]
            if isinstance(lit, fx.Node) or not isinstance(lit, int):
                return _block(an, node, "the key/value head count of expand is computed in the graph")
            if lit != -1:
                an.members.append(Member("reshape", node.name, node.name, x.atoms, axis=x.dim,
                                         extra={"kind": "method", "per": x.rows.shape[1]}))
            return Heads(x.dim, x.atoms, x.ndim, 1, x.ddim, x.rows, x.grp, out[x.grp])
    if name in ("view", "reshape") and a is not None and out is not None and len(out) == x.ndim - 1 \
            and a[:x.dim] == out[:x.dim] and a[x.dim] * a[x.grp] == out[x.dim] and a[x.grp + 1:] == out[x.dim + 1:]:
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else list(node.args[1:])
        if len(sizes) == len(out):
            lit = sizes[x.dim]
            if isinstance(lit, fx.Node) or not isinstance(lit, int):
                return _block(an, node, "the repeated head count of reshape is computed in the graph")
            rows = np.repeat(x.rows, x.rep, axis=0)
            if lit != -1:
                an.members.append(Member("reshape", node.name, node.name, rows.reshape(-1), axis=x.dim,
                                         extra={"kind": "method" if node.op == "call_method" else "fn",
                                                "per": x.rows.shape[1]}))
            return Heads.make(x.dim, None if x.ddim is None else x.ddim - 1, rows, x.ndim - 1)
    return _block(an, node, "a new axis after the heads that is not a grouped-query repeat (expand, reshape)")


def _matmul(an: "ChannelAnalysis", node: fx.Node, a: Heads, b: Any) -> Any:
    n = a.ndim
    if not isinstance(b, Heads) or b.ndim != n or b.dim != a.dim or a.dim >= n - 2:
        return _block(an, node, "matmul of attention heads with something the head analysis does not follow")
    if a.ddim == n - 1 and b.ddim == n - 2 and a.rows.shape == b.rows.shape:  # q @ k^T
        an.uf.union(a.rows.reshape(-1), b.rows.reshape(-1))
        return Heads.make(a.dim, None, a.rows, n)
    if a.ddim is None and b.ddim == n - 1 and a.rows.shape == b.rows.shape:  # p @ v
        an.uf.union(a.rows.reshape(-1), b.rows.reshape(-1))
        return b
    return _block(an, node, "matmul over the head axis or of heads of different widths")


def _merge(an: "ChannelAnalysis", node: fx.Node, x: Heads, kind: str) -> Any:
    a, b = _shape(node.args[0]), _shape(node)
    if a is None or b is None or x.ddim != x.dim + 1:
        return _block(an, node, "reshape of attention heads the analysis does not follow")
    if kind in ("view", "reshape"):
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else list(node.args[1:])
        kind = "method"
    else:
        sizes = list(_arg(node, 1, "shape", []))
    H, D = a[x.dim], a[x.ddim]
    prefix = math.prod(a[:x.dim])
    for j in range(len(b)):
        if math.prod(b[:j]) == prefix and b[j] == H * D:
            if len(sizes) != len(b):
                break
            lit = sizes[j]
            if isinstance(lit, fx.Node) or not isinstance(lit, int):
                return _block(an, node, "the merged head width is computed in the graph")
            atoms = x.rows.reshape(-1)
            if lit != -1:
                an.members.append(Member("reshape", node.name, node.name, atoms, axis=j, extra={"kind": kind}))
            return ChanInfo(j, atoms, len(b))
    return _block(an, node, f"reshape {a} -> {b} of attention heads")


def head_constraints(an: "ChannelAnalysis") -> None:
    """One ``units`` constraint per head split, over its distinct heads (after all unions)."""
    roots = an.uf.roots()
    for rows, where in an.head_splits:
        seen: dict[tuple[int, ...], int] = {}
        for h in range(rows.shape[0]):
            seen.setdefault(tuple(roots[rows[h]].tolist()), h)
        keep = rows[sorted(seen.values())]
        an.constraints.append(Constraint("units", keep.reshape(-1), keep.shape[0], where))
