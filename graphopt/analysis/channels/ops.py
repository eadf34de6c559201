"""Op tables for the channel analysis: which functions and methods keep, combine, reduce or only
read the channel axis, and small helpers to read an fx node's shape and arguments.

Layer types (``nn.Module`` subclasses) are not listed here: they have channel rules
(:mod:`graphopt.analysis.channels.rules`), so a plugin can add one.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

__all__ = ["UNARY_FUNCTIONS", "UNARY_NAMES", "UNARY_METHODS", "POOL_FUNCTIONS", "BINARY_FUNCTIONS",
           "BINARY_METHODS", "REDUCE_FUNCTIONS", "REDUCE_METHODS", "META_METHODS", "META_ATTRS",
           "shape_of", "norm_dim", "arg", "describe"]

UNARY_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, F.hardsigmoid,
    F.hardswish, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, operator.neg, torch.neg, torch.abs,
    torch.exp, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf,
}
UNARY_NAMES = {"stochastic_depth", "drop_path"}  # per-sample scaling: channel-wise identity
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "clamp", "clamp_",
    "clip", "detach", "requires_grad_",
}
POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.max_pool2d, torch.avg_pool1d,
}
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
META_METHODS = {"size", "dim", "numel", "nelement", "element_size", "get_device"}
META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The recorded output shape of an fx node (``tensor_meta``), or None."""
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional argument ``i`` or keyword ``name`` of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name of a call node for decline reasons."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}() (node {node.name})"
    return f"{getattr(node.target, '__name__', node.target)}() (node {node.name})"
