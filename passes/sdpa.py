"""sdpa: hand-written attention rewritten to ``F.scaled_dot_product_attention`` (EXACT).

Matched, per softmax over the last axis (``F.softmax``, ``torch.softmax``, ``.softmax``,
``nn.Softmax``)::

    scores = q' @ kT                 q' = q, or q * s / q / s (the scale applied to q, timm style)
    scores = scores * s | / s        any number of scalar scales, right after the product
    scores = scores + bias           additive masks (padding, ALiBi, relative position bias ...);
                                     timm's maybe_add_mask(scores, mask) (mask may be None)
    scores = scores.masked_fill(m, -inf)   boolean masks (a lower-triangular buffer -> is_causal)
    p = softmax(scores, dim=-1)      a dtype only if it is the scores' (HF: dtype=float32 in float32)
    p = p.to(dtype)                  optional, only casts to the dtype p already has
    p = dropout(p)                   optional: nn.Dropout, or F.dropout on the graph's training flag
                                     (torch.export capture of HF's functional attention dropout)
    out = p @ v

becomes ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale)`` with the scale folded
into SDPA's ``scale`` (SDPA computes ``softmax(q @ k^T * scale + mask) @ v``, so any additive bias that
broadcasts to the scores is exactly its float ``attn_mask``; ``masked_fill`` with ``-inf`` is exactly a boolean
``attn_mask``; ``ones(T, T, dtype=bool).triu(1)`` (or a ``tril`` buffer sliced ``[..., :T, :T] == 0``) is
exactly ``is_causal=True``, which lets GPUs use the flash kernel). ``kT`` that is ``k.transpose(-2, -1)`` gives
``k``; any other ``kT`` is transposed back. Grouped-query attention stays as written (the repeated key/value
heads feed SDPA).

With attention-probability dropout the call is a :class:`graphopt.ir.ScaledDotProductAttention` layer that
applies ``dropout_p`` in train mode only, as ``nn.Dropout`` did. Training is the same *in distribution*: SDPA
draws its own dropout masks, so train mode cannot be compared element-wise with dropout on; the verifier
compares train mode (outputs, input and parameter gradients) with the dropout of both graphs disabled, as it
does for every dropout (the record says so).

Declined, with the reason: softmax over another axis or with a ``dtype``; probabilities used twice or mixed
across heads (any op between softmax and ``@ v`` other than dropout: talking-heads attention); the probabilities
as the right operand; scores used elsewhere; a scale applied after a mask; ``masked_fill`` with a finite value
(it replaces scores, not an additive mask); a bias that does not broadcast to the scores; dropout traced with
``training=True`` (active in eval mode); attention inside leaf modules or wrapped functions
(``nn.MultiheadAttention`` already dispatches to SDPA; torchvision's ``shifted_window_attention`` is one opaque
call).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt import Decline, Option, Pass, PassResult, Rewrite, Semantics
from graphopt.ir import (ScaledDotProductAttention, add_module, module_of, node_arg, node_location, output_dtype,
                         output_shape)

__all__ = ["Sdpa"]

_MATMUL, _ADD = {operator.matmul, torch.matmul}, {operator.add, torch.add}
_MUL, _DIV = {operator.mul, torch.mul}, {operator.truediv, torch.div}
_SOFTMAX_FNS, _TRANSPOSE_FNS = {F.softmax, torch.softmax}, {torch.transpose, torch.swapaxes}


class NoMatch(Exception):  # a reason the pattern does not match at this softmax
    pass


@dataclass
class Match:
    softmax: fx.Node
    out: fx.Node  # the `p @ v` node
    q: Any
    kt: fx.Node
    v: Any
    scale: float = 1.0
    biases: list[Any] = field(default_factory=list)
    fills: list[Any] = field(default_factory=list)  # boolean masks: True = masked out
    causal: bool = False
    dropout_p: float = 0.0
    nodes: list[fx.Node] = field(default_factory=list)  # the nodes the call replaces


def _is(node: Any, fns: set, method: str | None = None) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in fns)
                                         or (method is not None and node.op == "call_method" and node.target == method))


def _number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _scalar_scale(node: Any) -> tuple[Any, float] | None:
    """``x * s``, ``s * x``, ``x / s`` with a Python number ``s``: (x, factor)."""
    if _is(node, _MUL, "mul") and len(node.args) == 2:
        a, b = node.args
        if _number(b) and isinstance(a, fx.Node):
            return a, float(b)
        if _number(a) and isinstance(b, fx.Node):
            return b, float(a)
    if _is(node, _DIV, "div") and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if _number(b) and isinstance(a, fx.Node) and b != 0:
            return a, 1.0 / float(b)
    return None


def _single_user(node: fx.Node, what: str) -> None:
    if len(node.users) != 1:
        raise NoMatch(f"{what} (node {node.name}) is used {len(node.users)} times; the rewrite would have to "
                      "keep computing it")


def _softmax_dim(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any] | None:
    """(input, dim) of a softmax node, or None if ``node`` is not one."""
    if node.op == "call_function" and node.target in _SOFTMAX_FNS:
        return node.args[0], node_arg(node, 1, "dim")
    if node.op == "call_method" and node.target == "softmax":
        return node.args[0], node_arg(node, 1, "dim")
    mod = module_of(gm, node)
    if isinstance(mod, nn.Softmax):
        return node.args[0], mod.dim
    return None


def _is_causal_mask(gm: fx.GraphModule, m: Any, shape: tuple[int, ...] | None) -> bool:
    """A mask that is True exactly above the diagonal of square scores: ``ones(T, T).triu(1)`` (bool)
    or ``buf[..., :T, :T] == 0`` with ``buf`` a constant lower-triangular 0/1 buffer."""
    if shape is None or len(shape) < 2 or shape[-1] != shape[-2]:
        return False
    if _is(m, {torch.triu}, "triu") and node_arg(m, 1, "diagonal", 0) == 1:
        ones = m.args[0]
        if (_is(ones, {torch.ones}) or _is(ones, set(), "new_ones")) and ones.kwargs.get("dtype") is torch.bool:
            args = ones.args[1:] if ones.op == "call_method" else ones.args
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            return len(size) == 2 and (size[0] is size[1] or size[0] == size[1])
        return False
    if not (_is(m, {operator.eq, torch.eq}, "eq") and len(m.args) == 2 and m.args[1] in (0, 0.0, False)):
        return False
    sl = m.args[0]
    if not (_is(sl, {operator.getitem}) and isinstance(sl.args[0], fx.Node) and sl.args[0].op == "get_attr"):
        return False
    idx = sl.args[1] if isinstance(sl.args[1], tuple) else (sl.args[1],)
    if len(idx) < 2 or not all(isinstance(i, slice) and i.start is None and i.step is None for i in idx):
        return False
    if not all(i.stop is None for i in idx[:-2]) or idx[-1].stop is not idx[-2].stop and idx[-1].stop != idx[-2].stop:
        return False
    try:
        buf = gm.get_buffer(str(sl.args[0].target))
    except AttributeError:
        return False
    if buf.dim() < 2 or buf.shape[-1] != buf.shape[-2] or any(s != 1 for s in buf.shape[:-2]):
        return False
    n = buf.shape[-1]
    return bool(torch.equal(buf.reshape(n, n).float(), torch.tril(torch.ones(n, n))))


def _broadcasts(a: tuple[int, ...] | None, to: tuple[int, ...] | None) -> bool:
    if a is None or to is None:
        return False
    try:
        return tuple(torch.broadcast_shapes(a, to)) == tuple(to)
    except RuntimeError:
        return False


def match(gm: fx.GraphModule, sm: fx.Node) -> Match:
    """The attention pattern ending at softmax ``sm`` (raises :class:`NoMatch` with the reason)."""
    x, dim = _softmax_dim(gm, sm)
    shape = output_shape(sm)
    if shape is None or len(shape) < 3:
        raise NoMatch("softmax over a tensor of fewer than 3 dimensions (not attention scores)")
    if not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        raise NoMatch(f"softmax over dim {dim}, not the last (key) axis")
    extra = {k for k, v in sm.kwargs.items() if k not in ("dim", "_stacklevel", "dtype") and v is not None}
    if sm.op != "call_module" and extra:
        raise NoMatch(f"softmax with {sorted(extra)}: not what SDPA computes")
    dtype = node_arg(sm, 2, "dtype") if sm.op != "call_module" else None
    if dtype is not None and dtype != output_dtype(x):
        raise NoMatch(f"softmax with dtype {dtype} on {output_dtype(x)} scores: not what SDPA computes")
    m = Match(sm, sm, None, sm, None, nodes=[sm])
    # forward: [no-op cast] [dropout] [no-op cast] -> matmul with the values
    _single_user(sm, "the softmax output")
    user = _skip_noop_casts(sm, m)
    mod = module_of(gm, user)
    if isinstance(mod, nn.Dropout) and type(mod) is nn.Dropout:
        m.dropout_p = float(mod.p)
        m.nodes.append(user)
        _single_user(user, "the attention dropout output")
        user = _skip_noop_casts(user, m)
    elif _is(user, {F.dropout}):
        training = node_arg(user, 2, "training", True)
        if training is True and float(node_arg(user, 1, "p", 0.5)) > 0:
            raise NoMatch("F.dropout traced with training=True is active in eval mode too; run "
                          "drop_regularization first or capture in eval mode")
        if isinstance(training, fx.Node) and not (training.op == "get_attr" and training.target == "training"):
            raise NoMatch(f"F.dropout whose training flag is computed in the graph (node {training.name})")
        if isinstance(training, fx.Node):  # the graph's own flag (export capture): dropout in train mode only
            m.dropout_p = float(node_arg(user, 1, "p", 0.5))
        m.nodes.append(user)
        _single_user(user, "the attention dropout output")
        user = _skip_noop_casts(user, m)
    prob = m.nodes[-1]  # what the matmul must read: the softmax, or the last cast / dropout after it
    if not _is(user, _MATMUL) or len(user.args) != 2:
        what = (f"{type(module_of(gm, user)).__name__} '{user.target}'" if user.op == "call_module"
                else f"{getattr(user.target, '__name__', user.target)} (node {user.name})")
        raise NoMatch(f"the probabilities reach {what} before the product with the values (head mixing or "
                      "another op between softmax and matmul)")
    if user.args[0] is not prob:
        raise NoMatch("the probabilities are the right operand of the matmul")
    m.out, m.v = user, user.args[1]
    m.nodes.append(user)
    # backward: masks, then scales, then q @ kT
    cur, seen_scale = x, False
    while True:
        if not isinstance(cur, fx.Node):
            raise NoMatch("the scores are not computed in the graph")
        _single_user(cur, "the attention scores")
        scaled = _scalar_scale(cur)
        if scaled is not None:
            m.scale *= scaled[1]
            m.nodes.append(cur)
            seen_scale, cur = True, scaled[0]
            continue
        if seen_scale and (_is(cur, _ADD, "add") or _is(cur, {torch.masked_fill}, "masked_fill")):
            raise NoMatch("a scale is applied after a mask (the mask would be scaled too)")
        if _is(cur, _ADD, "add") and len(cur.args) == 2 and not cur.kwargs:
            a, b = cur.args
            chain, bias = (a, b) if _chainlike(a) else (b, a) if _chainlike(b) else (None, None)
            if chain is None or not isinstance(bias, fx.Node):
                raise NoMatch("an addition to the scores whose operands are not scores + a bias tensor")
            if not _broadcasts(output_shape(bias), output_shape(cur)):
                raise NoMatch(f"the additive bias {bias.name} {output_shape(bias)} does not broadcast to the scores "
                              f"{output_shape(cur)}")
            m.biases.append(bias)
            m.nodes.append(cur)
            cur = chain
            continue
        if cur.op == "call_function" and getattr(cur.target, "__name__", "") == "maybe_add_mask" \
                and len(cur.args) == 2 and not cur.kwargs:
            # timm: ``scores + mask if mask is not None else scores`` -- SDPA's attn_mask does the same
            bias = cur.args[1]
            if seen_scale:
                raise NoMatch("a scale is applied after a mask (the mask would be scaled too)")
            if isinstance(bias, fx.Node) and not (bias.op == "placeholder" or _broadcasts(
                    output_shape(bias), output_shape(cur))):
                raise NoMatch(f"the mask of maybe_add_mask {bias.name} does not broadcast to the scores")
            if bias is not None:
                m.biases.append(bias)
            m.nodes.append(cur)
            cur = cur.args[0]
            continue
        if _is(cur, {torch.masked_fill}, "masked_fill"):
            mask, value = node_arg(cur, 1, "mask"), node_arg(cur, 2, "value")
            if not (_number(value) and math.isinf(value) and value < 0):
                raise NoMatch(f"masked_fill with {value!r} replaces the scores (only -inf is exactly a mask)")
            if not _broadcasts(output_shape(mask), output_shape(cur)):
                raise NoMatch("the masked_fill mask does not broadcast to the scores")
            m.fills.append(mask)
            m.nodes.append(cur)
            cur = cur.args[0]
            continue
        break
    if not _is(cur, _MATMUL) or len(cur.args) != 2:
        raise NoMatch(f"the softmax input is not q @ k^T (it is {cur.op} {getattr(cur.target, '__name__', cur.target)})")
    m.nodes.append(cur)
    q, kt = cur.args
    qs = _scalar_scale(q)
    if qs is not None and len(q.users) == 1:
        m.nodes.append(q)
        q, m.scale = qs[0], m.scale * qs[1]
    m.q, m.kt = q, kt
    sq, sk, sv = output_shape(q), output_shape(kt), output_shape(m.v)
    if sq is None or sk is None or sv is None or not (len(sq) == len(sk) == len(sv) >= 3):
        raise NoMatch("q, k^T and v are not tensors of the same rank >= 3")
    if not (sq[:-2] == sk[:-2] == sv[:-2]):
        raise NoMatch(f"q {sq}, k^T {sk}, v {sv} differ in their batch/head dimensions (broadcast)")
    fill_causal = [f for f in m.fills if _is_causal_mask(gm, f, output_shape(sm))]
    if len(fill_causal) == 1 and len(m.fills) == 1 and not m.biases:
        m.causal, m.fills = True, []
    return m


def _skip_noop_casts(node: fx.Node, m: Match) -> fx.Node:
    """The user of ``node`` past ``.to(dtype)`` casts that keep the dtype (HF's
    ``softmax(..., dtype=float32).to(q.dtype)`` in float32); the casts join ``m.nodes``."""
    user = next(iter(node.users))
    while (user.op == "call_method" and user.target == "to" and len(user.args) == 2 and not user.kwargs
           and isinstance(user.args[1], torch.dtype) and output_dtype(user) == output_dtype(user.args[0])
           and user.args[1] == output_dtype(user)):
        m.nodes.append(user)
        _single_user(user, "the cast attention probabilities")
        user = next(iter(user.users))
    return user


def _chainlike(a: Any) -> bool:
    """Could ``a`` be the scores (as opposed to the bias): computed by a product/scale/mask op."""
    return isinstance(a, fx.Node) and (_is(a, _MATMUL | _MUL | _DIV | _ADD, None)
                                       or (a.op == "call_method" and a.target in ("mul", "div", "add", "masked_fill"))
                                       or _is(a, {torch.masked_fill}))


def _key(graph: fx.Graph, kt: fx.Node) -> Any:
    """``k`` for ``kT`` (the transpose's input, or a new transpose back)."""
    nd = len(output_shape(kt) or ())
    if kt.op in ("call_method", "call_function") and (kt.target == "transpose" or kt.target in _TRANSPOSE_FNS):
        d = {node_arg(kt, 1, "dim0") % nd, node_arg(kt, 2, "dim1") % nd} if nd else set()
        if d == {nd - 2, nd - 1}:
            return kt.args[0]
    return graph.call_method("transpose", (kt, -2, -1))


class Sdpa(Pass):
    name = "sdpa"
    semantics = Semantics.EXACT
    training = "same"  # in distribution: SDPA draws its own dropout masks (train mode verified with dropout off)
    summary = ("hand-written attention (q@k^T, scale, masks, softmax, dropout, @v) -> scaled_dot_product_attention; "
               "training same in distribution (SDPA draws its own dropout masks: train mode checked with dropout off)")
    options = {"causal": Option(bool, True, "turn a lower-triangular mask buffer into is_causal=True")}

    def call(self, gm: fx.GraphModule) -> PassResult:
        rewrites: list[Rewrite] = []
        declined: list[Decline] = []
        g = gm.graph
        for node in list(g.nodes):
            if node.op == "call_module" and isinstance(module_of(gm, node), nn.MultiheadAttention):
                declined.append(Decline(str(node.target), "nn.MultiheadAttention is a leaf module; it already "
                                                          "dispatches to scaled_dot_product_attention"))
            elif node.op == "call_function" and "attention" in getattr(node.target, "__name__", "") \
                    and node.target is not F.scaled_dot_product_attention:
                declined.append(Decline(node_location(node), f"attention inside {node.target.__name__}, one opaque call "
                                                      "(not in the graph)"))
        for sm in [n for n in g.nodes if _softmax_dim(gm, n) is not None]:
            try:
                mt = match(gm, sm)
            except NoMatch as exc:
                declined.append(Decline(node_location(sm), str(exc)))
                continue
            if mt.causal and not self.config["causal"]:
                mt.causal, mt.fills = False, [f for f in [self._fill_of(mt)] if f is not None]
            rewrites.append(self._rewrite(gm, mt))
        if rewrites:
            gm.delete_all_unused_submodules()
            gm.recompile()
        calls = sum(1 for n in g.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention
                    or isinstance(module_of(gm, n), ScaledDotProductAttention))
        return PassResult(gm, bool(rewrites), rewrites, declined,
                          notes={"rewritten": len(rewrites), "sdpa_calls": calls,
                                 "causal": sum(1 for r in rewrites if r.data.get("is_causal"))})

    @staticmethod
    def _fill_of(mt: Match) -> Any:
        n = next((x for x in mt.nodes if _is(x, {torch.masked_fill}, "masked_fill")), None)
        return node_arg(n, 1, "mask") if n is not None else None

    def _rewrite(self, gm: fx.GraphModule, mt: Match) -> Rewrite:
        g = gm.graph
        where = node_location(mt.softmax)
        with g.inserting_before(mt.out):
            k = _key(g, mt.kt)
            mask = None
            for b in mt.biases:
                mask = b if mask is None else g.call_function(operator.add, (mask, b))
            fill = None
            for f in mt.fills:
                fill = f if fill is None else g.call_function(torch.logical_or, (fill, f))
            if fill is not None:
                mask = (g.call_function(torch.logical_not, (fill,)) if mask is None
                        else g.call_function(torch.where, (fill, float("-inf"), mask)))
            if mt.dropout_p > 0:
                stack = mt.softmax.meta.get("nn_module_stack") or {}
                base = (list(stack.values())[-1][0] + ".sdpa") if stack and isinstance(
                    list(stack.values())[-1], tuple) and list(stack.values())[-1][0] else "sdpa"
                path = add_module(gm, base, ScaledDotProductAttention(mt.dropout_p, mt.scale, mt.causal))
                new = g.call_module(path, (mt.q, k, mt.v), {"attn_mask": mask} if mask is not None else {})
            else:
                new = g.call_function(F.scaled_dot_product_attention, (mt.q, k, mt.v),
                                      {"attn_mask": mask, "dropout_p": 0.0, "is_causal": mt.causal, "scale": mt.scale})
        new.meta["nn_module_stack"] = dict(mt.out.meta.get("nn_module_stack") or {})
        mt.out.replace_all_uses_with(new)
        _erase_dead(g, mt.nodes)
        kinds = (["causal"] if mt.causal else []) + (["boolean mask"] if mt.fills else []) + (
            [f"additive mask x{len(mt.biases)}"] if mt.biases else [])
        return Rewrite(where, f"attention -> scaled_dot_product_attention (scale {mt.scale:.4g}"
                              + (f", {', '.join(kinds)}" if kinds else "")
                              + (f", dropout_p {mt.dropout_p}" if mt.dropout_p else "") + ")",
                       data={"scale": mt.scale, "is_causal": mt.causal, "dropout_p": mt.dropout_p,
                             "masks": len(mt.biases) + len(mt.fills)})


def _erase_dead(g: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` and then whatever only they used (mask slices, comparisons), newest first."""
    todo = set(nodes)
    while todo:
        dead = [n for n in reversed(list(g.nodes)) if n in todo and not n.users]
        if not dead:
            return
        todo -= set(dead)
        for n in dead:
            inputs = [a for a in n.all_input_nodes if a.op in ("call_function", "call_method", "get_attr")]
            g.erase_node(n)
            todo.update(a for a in inputs if not a.users and not (a.op != "get_attr" and a.is_impure()))
