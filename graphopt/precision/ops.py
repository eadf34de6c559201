"""Op policy tables and the cast analysis the precision passes share.

Which ops run in the low dtype, which stay float32 (torch.autocast's CUDA lists: see
:mod:`graphopt.precision.sweep`), how a cast node is recognised (:func:`cast_target`), counted
(:func:`count_casts`) and how redundant casts are removed (:func:`cleanup_casts`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.ir import output_dtype

__all__ = ["HALF", "SHORT", "UNIT_ROUNDOFF", "LOW_FUNCS", "LOW_METHODS", "FP32_FUNCS", "FP32_METHODS", "NORM_FUNCS",
           "is_norm_module", "cast_target", "count_casts", "cleanup_casts", "first_line"]

HALF = (torch.float16, torch.bfloat16)
SHORT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}

# ----------------------------------------------------------------------------- op policy

LOW_FUNCS: dict[Any, str] = {
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d", F.linear: "linear", torch.matmul: "matmul",
    operator.matmul: "matmul", torch.mm: "mm", torch.bmm: "bmm", torch.baddbmm: "baddbmm",
    torch.addmm: "addmm", torch.addbmm: "addbmm", torch.addmv: "addmv", torch.mv: "mv",
    torch.einsum: "einsum", F.prelu: "prelu", torch.prelu: "prelu", torch.chain_matmul: "chain_matmul",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.multi_head_attention_forward: "multi_head_attention",
}
LOW_METHODS = {"matmul", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "__matmul__"}

FP32_FUNCS: dict[Any, str] = {
    torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax", F.softmin: "softmin", F.layer_norm: "layer_norm",
    torch.layer_norm: "layer_norm", F.group_norm: "group_norm", torch.group_norm: "group_norm",
    F.instance_norm: "instance_norm", F.normalize: "normalize", torch.norm: "norm",
    torch.linalg.vector_norm: "norm", torch.linalg.norm: "norm", torch.sum: "sum", torch.prod: "prod",
    torch.cumsum: "cumsum", torch.cumprod: "cumprod", torch.exp: "exp", torch.expm1: "expm1",
    torch.log: "log", torch.log10: "log10", torch.log1p: "log1p", torch.log2: "log2",
    torch.pow: "pow", operator.pow: "pow", torch.rsqrt: "rsqrt", torch.reciprocal: "reciprocal",
    F.softplus: "softplus", F.cosine_similarity: "cosine_similarity", torch.cosine_similarity: "cosine_similarity",
    torch.cdist: "cdist", torch.dist: "dist", torch.erfinv: "erfinv", torch.acos: "acos", torch.asin: "asin",
    torch.cosh: "cosh", torch.sinh: "sinh", torch.tan: "tan", torch.renorm: "renorm",
    F.cross_entropy: "cross_entropy", F.nll_loss: "nll_loss", F.mse_loss: "mse_loss", F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss", F.huber_loss: "huber_loss", F.kl_div: "kl_div",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.poisson_nll_loss: "poisson_nll_loss", F.cosine_embedding_loss: "cosine_embedding_loss",
    F.hinge_embedding_loss: "hinge_embedding_loss", F.margin_ranking_loss: "margin_ranking_loss",
    F.multilabel_margin_loss: "multilabel_margin_loss", F.multi_margin_loss: "multi_margin_loss",
    F.soft_margin_loss: "soft_margin_loss", F.triplet_margin_loss: "triplet_margin_loss",
}
if hasattr(F, "rms_norm"):
    FP32_FUNCS[F.rms_norm] = "rms_norm"
FP32_METHODS = {"softmax", "log_softmax", "norm", "sum", "prod", "cumsum", "cumprod", "exp", "expm1",
                "log", "log10", "log1p", "log2", "pow", "rsqrt", "reciprocal", "erfinv", "acos", "asin",
                "cosh", "sinh", "tan", "renorm", "__pow__", "__rpow__", "__rtruediv__", "__rdiv__"}
NORM_FUNCS = {"layer_norm", "group_norm", "instance_norm", "rms_norm"}

_NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                                   nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_FP32_MODULES: tuple[type, ...] = _NORM_MODULES + (
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softplus, nn.CosineSimilarity, nn.PairwiseDistance,
    nn.modules.loss._Loss)
_BN = nn.modules.batchnorm._BatchNorm
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d}
_CONV_T_FN = {nn.ConvTranspose1d: torch.conv_transpose1d, nn.ConvTranspose2d: torch.conv_transpose2d,
              nn.ConvTranspose3d: torch.conv_transpose3d}
# modules that hold compute-heavy ops the rewrite does not reach inside
_OPAQUE_HEAVY: tuple[type, ...] = (nn.RNNBase, nn.RNNCellBase, nn.Transformer, nn.TransformerEncoder,
                                   nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16}


def is_norm_module(mod: nn.Module) -> bool:
    return isinstance(mod, (_BN,) + _NORM_MODULES)


def torch_nn_class(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn")


def cast_target(node: fx.Node) -> torch.dtype | None:
    """The dtype a cast node converts to (``x.to(dt)``, ``x.float()``, ``x.type(dt)``), else None."""
    if node.op != "call_method":
        return None
    if node.target in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return _CAST_METHODS[node.target]
    if node.target in ("to", "type") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) \
            and set(node.kwargs) <= {"copy", "non_blocking"} and not node.kwargs.get("copy", False):
        return node.args[1]
    return None


def count_casts(gm: fx.GraphModule) -> int:
    """Cast nodes (``.to(dtype)``/``.float()``/``.half()``/...) in the graph."""
    return sum(1 for n in gm.graph.nodes if cast_target(n) is not None)


def lossless(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of ``src`` is exactly representable in ``dst``."""
    if src == dst:
        return True
    if dst == torch.float64:
        return src in (torch.float32,) + HALF
    if dst == torch.float32:
        return src in HALF
    return False


def is_ftensor(v: Any) -> bool:
    """A floating-point tensor."""
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, at most 140 characters."""
    s = str(exc).strip().splitlines()
    msg = s[0] if s else type(exc).__name__
    return (msg[:140] + "...") if len(msg) > 140 else msg


def cleanup_casts(gm: fx.GraphModule, env: dict[fx.Node, Any] | None = None) -> dict[str, int]:
    """Remove redundant casts; returns counts by rule. ``env``: node values (for dtypes); the
    graph's ``tensor_meta`` is used where a value is missing."""
    env = env or {}

    def dtype_of(n: fx.Node) -> torch.dtype | None:
        v = env.get(n)
        if isinstance(v, torch.Tensor):
            return v.dtype
        return output_dtype(n)

    counts = {"same_dtype": 0, "round_trip_lossless": 0, "round_trip_lossy": 0, "cast_of_cast": 0,
              "duplicate": 0, "dead": 0}
    g = gm.graph
    changed = True
    while changed:
        changed = False
        seen: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
        for node in list(g.nodes):
            dt = cast_target(node)
            if dt is None or not isinstance(node.args[0], fx.Node):
                continue
            src = node.args[0]
            sdt = dtype_of(src)
            if not node.users:
                g.erase_node(node)
                counts["dead"] += 1
                changed = True
                continue
            if sdt == dt:
                node.replace_all_uses_with(src)
                g.erase_node(node)
                counts["same_dtype"] += 1
                changed = True
                continue
            inner = cast_target(src)
            if inner is not None and isinstance(src.args[0], fx.Node):
                orig = src.args[0]
                odt = dtype_of(orig)
                if odt == dt:  # x -> inner -> back to x's dtype
                    node.replace_all_uses_with(orig)
                    g.erase_node(node)
                    counts["round_trip_lossless" if lossless(odt, inner) else "round_trip_lossy"] += 1
                    changed = True
                    continue
                if odt is not None and lossless(odt, inner):  # x -> wider -> dt == x -> dt
                    node.args = (orig,) + tuple(node.args[1:])
                    counts["cast_of_cast"] += 1
                    changed = True
                    src = orig
            key = (src, dt)
            if key in seen:
                node.replace_all_uses_with(seen[key])
                g.erase_node(node)
                counts["duplicate"] += 1
                changed = True
                continue
            seen[key] = node
        for node in list(g.nodes):  # get_attr nodes orphaned by the rewrite
            if node.op == "get_attr" and not node.users:
                g.erase_node(node)
    return counts

