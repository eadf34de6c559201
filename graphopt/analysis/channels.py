"""Channel dependency analysis: which channels must be pruned together, and where they live.

Every output channel of a convolution or linear layer (a *producer*) is an *atom*. One pass over
the graph in topological order follows each tensor's channel axis and records, per position of
that axis, which atom it carries:

- elementwise ops (activations, dropout, pooling, ``x + y``, ``x * s`` incl. broadcasting
  squeeze-excitation scales) keep positions; when two tracked tensors meet in a binary op their
  atoms are *unified* position by position (residual adds, SE products tie channels together);
- ``cat`` along the channel axis concatenates atom lists, ``split``/``chunk`` slice them
  (chunk adds an "equal removal per piece" constraint, split sizes are rewritten);
- ``flatten``/``view``/``reshape``/``permute``/``transpose``/indexing move the channel axis;
  ``flatten`` of ``[N, C, H, W]`` makes each channel ``H*W`` consecutive features (``inner``),
  so a following ``Linear`` drops whole column blocks;
- depthwise convolutions tie their input and output channels; grouped convolutions add an
  "equal removal per group" constraint; GroupNorm adds a "remove whole groups" constraint;
  BatchNorm and parameters broadcast against the channel axis (layer scale) are sliced along.

Consumers (convolution/linear inputs) drop the matching weight columns. Anything the analysis
does not understand (an unknown op or module touching a tracked tensor, a reduction or
LayerNorm over the channel axis, a channel tensor reaching the model output, a tensor of the
same width it cannot follow) *blocks* the atoms involved, with the reason; a group with a
blocked channel is not pruned. A *group* is a connected set of producers whose channels are
unified (a networkx component over the producer/channel graph).

The result is a :class:`ChannelGraph`: groups, the members to slice, constraints and a MAC model.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import numpy as np
import torch
from torch import fx, nn
import torch.nn.functional as F

from graphopt.analysis.graph import to_networkx

__all__ = ["ChanInfo", "Member", "Constraint", "ChannelGroup", "ChannelGraph", "analyze_channels"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_UNARY_FUNCTIONS = {
    F.relu, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid, F.hardsigmoid,
    F.hardswish, torch.tanh, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, operator.neg, torch.neg, torch.abs,
    torch.exp, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.erf,
}
_UNARY_NAMES = {"stochastic_depth", "drop_path"}  # per-sample scaling: channel-wise identity
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "neg", "abs", "exp", "sqrt", "rsqrt", "square", "clamp", "clamp_",
    "clip", "detach", "requires_grad_",
}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.max_pool2d, torch.avg_pool1d,
}
_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_REDUCE_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_META_METHODS = {"size", "dim", "numel", "nelement", "element_size", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


# ----------------------------------------------------------------------------- values


@dataclass
class ChanInfo:
    """The channel axis of a tensor value: ``dim``, the atom per channel, elements per channel."""

    dim: int
    atoms: np.ndarray
    ndim: int
    inner: int = 1

    def moved(self, dim: int, ndim: int, inner: int | None = None) -> "ChanInfo":
        return ChanInfo(dim, self.atoms, ndim, self.inner if inner is None else inner)


@dataclass
class _Attr:
    """A parameter/buffer read by ``get_attr`` (may be sliced if it broadcasts on a channel axis)."""

    target: str


@dataclass
class _Tuple:
    items: list[Any]


@dataclass
class Member:
    """Something sliced when channels go.

    kind: ``conv_out``/``linear_out`` (producers: weight rows), ``conv_in``/``linear_in``
    (consumers: weight columns), ``dw`` (depthwise conv: rows, groups), ``bn``/``gn``/``bn_f``
    (norm parameters and statistics), ``param`` (a get_attr tensor along ``axis``),
    ``reshape`` (a literal size in a view/reshape), ``split`` (the sizes of a split).
    ``atoms``: the atom at each position of the sliced axis; ``inner``: elements per position.
    """

    kind: str
    target: str
    node: str
    atoms: np.ndarray
    inner: int = 1
    axis: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Constraint:
    """``blocks``: equal removal in each of ``g`` equal consecutive blocks of ``atoms`` (grouped
    convs, chunk); ``units``: remove whole consecutive units of ``len(atoms) // g`` (GroupNorm)."""

    kind: str
    atoms: np.ndarray
    g: int
    where: str


@dataclass
class ChannelGroup:
    """Coupled channels of one or more producers: pruning channel ``i`` removes class ``i`` from
    every member."""

    id: int
    classes: np.ndarray  # class roots, in a canonical order (the first producer's channel order)
    producers: list[str]
    nodes: list[str]
    blocked: list[str] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.classes)

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def name(self) -> str:
        head = ", ".join(self.producers[:3])
        return head + (f" (+{len(self.producers) - 3} more)" if len(self.producers) > 3 else "")


@dataclass
class _MacEntry:
    node: str
    macs: int
    in_atoms: np.ndarray | None
    out_atoms: np.ndarray | None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: Iterable[int], b: Iterable[int]) -> None:
        for x, y in zip(a, b):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                if rx < ry:
                    self.parent[ry] = rx
                else:
                    self.parent[rx] = ry

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


# ----------------------------------------------------------------------------- result


@dataclass
class ChannelGraph:
    """The analysis result. ``root[atom]`` is the atom's class; ``members`` are what to slice."""

    groups: list[ChannelGroup]
    members: list[Member]
    root: np.ndarray
    macs: list[_MacEntry]
    total_macs: int
    blocked_reasons: dict[int, str]

    def group_of_class(self) -> dict[int, ChannelGroup]:
        return {int(c): g for g in self.groups for c in g.classes}

    def predicted_macs(self, removed: np.ndarray) -> int:
        """MACs after removing the classes flagged in ``removed`` (bool per atom id, by root):
        conv/linear MACs scale with the kept fraction of their input and output channels."""
        total = self.total_macs
        for e in self.macs:
            f = 1.0
            if e.in_atoms is not None and len(e.in_atoms):
                f *= 1.0 - removed[self.root[e.in_atoms]].mean()
            if e.out_atoms is not None and len(e.out_atoms) and e.out_atoms is not e.in_atoms:
                f *= 1.0 - removed[self.root[e.out_atoms]].mean()
            total -= int(round(e.macs * (1.0 - f)))
        return total

    def keep_positions(self, atoms: np.ndarray, removed: np.ndarray) -> np.ndarray:
        return np.nonzero(~removed[self.root[atoms]])[0]

    def summary(self) -> dict[str, Any]:
        return {"groups": len(self.groups), "prunable_groups": sum(g.prunable for g in self.groups),
                "channels": int(sum(g.size for g in self.groups)),
                "prunable_channels": int(sum(g.size for g in self.groups if g.prunable))}


# ----------------------------------------------------------------------------- analysis


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f"method .{node.target}() (node {node.name})"
    return f"{getattr(node.target, '__name__', node.target)}() (node {node.name})"


class _Analyzer:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.values: dict[fx.Node, Any] = {}
        self.members: list[Member] = []
        self.constraints: list[Constraint] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.macs: list[_MacEntry] = []
        self.mod_out: dict[str, np.ndarray] = {}
        self.mod_in: dict[str, np.ndarray] = {}
        self.param_members: dict[tuple[str, int], Member] = {}
        self.producer_of: dict[int, str] = {}  # first atom id -> producer target
        self.atom_node: dict[str, np.ndarray] = {}  # node name -> atoms (for group node lists)

    # -- helpers
    def block(self, atoms: np.ndarray, reason: str) -> None:
        if len(atoms):
            self.blocks.append((atoms, reason))

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for info in self.tracked(node):
            self.block(info.atoms, reason)

    def tracked(self, node: fx.Node) -> list[ChanInfo]:
        out: list[ChanInfo] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                v = self.values.get(a)
                if isinstance(v, ChanInfo):
                    out.append(v)
                elif isinstance(v, _Tuple):
                    out.extend(x for x in v.items if isinstance(x, ChanInfo))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return out

    def val(self, a: Any) -> Any:
        return self.values.get(a) if isinstance(a, fx.Node) else None

    def unknown(self, node: fx.Node, why: str = "") -> None:
        self.block_inputs(node, f"{_describe(self.gm, node)} is not understood by the channel analysis"
                          + (f" ({why})" if why else ""))
        return None

    def new_atoms(self, n: int, producer: str, blocked: str | None = None) -> np.ndarray:
        atoms = self.uf.new(n)
        if blocked:
            self.block(atoms, blocked)
        return atoms

    # -- main
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                v = self.visit(node)
            except Exception as exc:  # analysis must never crash a pipeline: block and go on
                v = self.unknown(node, f"analysis error {type(exc).__name__}: {exc}")
            self.values[node] = v
            if isinstance(v, ChanInfo):
                self.atom_node[node.name] = v.atoms

    def visit(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            return _Attr(str(node.target))
        if node.op == "output":
            for info in self.tracked(node):
                self.block(info.atoms, "reaches the model output (the classifier/output layer is never pruned)")
            return None
        tracked = self.tracked(node)
        if node.op == "call_module":
            return self.visit_module(node, tracked)
        if not tracked:
            return None  # nothing channel-carrying flows in: nothing to follow
        if node.op == "call_function":
            return self.visit_function(node, tracked)
        if node.op == "call_method":
            return self.visit_method(node, tracked)
        return self.unknown(node)

    # -- modules
    def visit_module(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        gm, target = self.gm, str(node.target)
        mod = gm.get_submodule(target)
        x = self.val(node.args[0]) if node.args else None
        out_shape = _shape(node)
        cost = node.meta.get("cost")
        macs = int(cost.macs) if cost is not None else 0
        if isinstance(mod, _CONVS):
            return self.conv(node, mod, target, x, macs)
        if isinstance(mod, nn.Linear):
            return self.linear(node, mod, target, x, macs)
        if not tracked:
            return None
        if isinstance(mod, nn.MultiheadAttention):
            self.block_inputs(node, f"attention heads of nn.MultiheadAttention '{target}' are not pruned: its "
                                    "embed_dim is both the head width sum and its input/output width, so heads "
                                    "cannot go without narrowing the residual stream")
            return None
        if len(node.args) != 1 or node.kwargs or not isinstance(x, ChanInfo):
            return self.unknown(node, "unexpected arguments")
        if isinstance(mod, _BNS):
            if x.dim != 1 or x.inner != 1:
                return self.unknown(node, "channel axis is not dim 1")
            self.members.append(Member("bn", target, node.name, x.atoms))
            return x
        if isinstance(mod, nn.GroupNorm):
            if x.dim != 1 or x.inner != 1:
                return self.unknown(node, "channel axis is not dim 1")
            self.members.append(Member("gn", target, node.name, x.atoms))
            self.constraints.append(Constraint("units", x.atoms, mod.num_groups, f"GroupNorm '{target}'"))
            return x
        if isinstance(mod, nn.LayerNorm):
            nd = len(mod.normalized_shape)
            if x.dim >= x.ndim - nd:
                self.block(x.atoms, f"LayerNorm '{target}' normalizes over the channel axis: removing channels "
                                    "changes its statistics, so the pruned model would not equal the masked one")
            return x
        if isinstance(mod, _UNARY_MODULES):
            return x
        if isinstance(mod, _POOL_MODULES):
            spatial = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
                       nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool3d: 3}.get(
                type(mod), 2)
            if x.dim >= x.ndim - spatial or out_shape is None or len(out_shape) != x.ndim:
                return self.unknown(node, "pools over the channel axis")
            return x
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, x, mod.start_dim, mod.end_dim)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            d = _norm_dim(mod.dim, x.ndim) if mod.dim is not None else None
            if d is None or d == x.dim:
                self.block(x.atoms, f"{type(mod).__name__} '{target}' normalizes over the channel axis")
            return x
        return self.unknown(node)

    def conv(self, node: fx.Node, mod: nn.Module, target: str, x: Any, macs: int) -> Any:
        if len(node.args) != 1 or node.kwargs:
            return self.unknown(node, "unexpected arguments")
        cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
        xin = x if isinstance(x, ChanInfo) else None
        if xin is not None and (xin.dim != 1 or xin.inner != 1 or len(xin.atoms) != cin):
            self.block(xin.atoms, f"conv '{target}' sees its input channels on an unexpected axis")
            xin = None
        first_call = target not in self.mod_out
        if g == cin == cout and g > 1:  # depthwise, multiplier 1: out channel i reads in channel i
            if xin is None:
                atoms = self.mod_out.get(target)
                if atoms is None:
                    atoms = self.new_atoms(cout, target)
                    self.members.append(Member("dw", target, node.name, atoms))
                    self.producer_of[int(atoms[0])] = target
            else:
                atoms = xin.atoms
                if first_call:
                    self.members.append(Member("dw", target, node.name, atoms))
                else:
                    self.uf.union(self.mod_out[target], atoms)
            self.mod_out[target] = atoms
            self.macs.append(_MacEntry(node.name, macs, atoms, atoms))
            return ChanInfo(1, atoms, len(_shape(node) or (0, 0, 0, 0)))
        if g > 1 and g == cin:  # depthwise with a channel multiplier
            if xin is not None:
                self.block(xin.atoms, f"depthwise conv '{target}' has a channel multiplier "
                                      f"({cout // cin}); not supported")
            atoms = self.mod_out.get(target)
            if atoms is None:
                atoms = self.new_atoms(cout, target, f"depthwise conv '{target}' has a channel multiplier")
                self.mod_out[target] = atoms
            return ChanInfo(1, atoms, len(_shape(node) or (0, 0, 0, 0)))
        # ordinary or grouped conv: a consumer of its input, a producer of its output
        if xin is not None:
            if target in self.mod_in:
                self.uf.union(self.mod_in[target], xin.atoms)
            else:
                self.mod_in[target] = xin.atoms
                self.members.append(Member("conv_in", target, node.name, xin.atoms, extra={"groups": g}))
                if g > 1:
                    self.constraints.append(Constraint("blocks", xin.atoms, g, f"grouped conv '{target}' input"))
        atoms = self.mod_out.get(target)
        if atoms is None:
            atoms = self.new_atoms(cout, target)
            self.mod_out[target] = atoms
            self.producer_of[int(atoms[0])] = target
            self.members.append(Member("conv_out", target, node.name, atoms, extra={"groups": g}))
            if g > 1:
                self.constraints.append(Constraint("blocks", atoms, g, f"grouped conv '{target}' output"))
        self.macs.append(_MacEntry(node.name, macs, xin.atoms if xin is not None else None, atoms))
        return ChanInfo(1, atoms, len(_shape(node) or (0, 0, 0, 0)))

    def linear(self, node: fx.Node, mod: nn.Linear, target: str, x: Any, macs: int) -> Any:
        if len(node.args) != 1 or node.kwargs:
            return self.unknown(node, "unexpected arguments")
        xin = x if isinstance(x, ChanInfo) else None
        if xin is not None and (xin.dim != xin.ndim - 1 or len(xin.atoms) * xin.inner != mod.in_features):
            self.block(xin.atoms, f"linear '{target}' reads its input channels on an axis other than the last")
            xin = None
        if xin is not None:
            if target in self.mod_in:
                self.uf.union(self.mod_in[target], xin.atoms)
            else:
                self.mod_in[target] = xin.atoms
                self.members.append(Member("linear_in", target, node.name, xin.atoms, inner=xin.inner))
        atoms = self.mod_out.get(target)
        if atoms is None:
            atoms = self.new_atoms(mod.out_features, target)
            self.mod_out[target] = atoms
            self.producer_of[int(atoms[0])] = target
            self.members.append(Member("linear_out", target, node.name, atoms))
        shape = _shape(node)
        self.macs.append(_MacEntry(node.name, int(node.meta["cost"].macs) if node.meta.get("cost") else 0,
                                   xin.atoms if xin is not None else None, atoms))
        nd = len(shape) if shape else 2
        return ChanInfo(nd - 1, atoms, nd)

    # -- functions and methods
    def visit_function(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        fn = node.target
        name = getattr(fn, "__name__", "")
        x = self.val(node.args[0]) if node.args else None
        if fn in _BINARY_FUNCTIONS:
            return self.binary(node, [_arg(node, 0, "input"), _arg(node, 1, "other")])
        if fn in _UNARY_FUNCTIONS or name in _UNARY_NAMES:
            return x if isinstance(x, ChanInfo) and len(tracked) == 1 else self.unknown(node)
        if fn in _POOL_FUNCTIONS:
            if not isinstance(x, ChanInfo) or x.dim >= x.ndim - (3 if "3d" in name else 1 if "1d" in name else 2):
                return self.unknown(node, "pools over the channel axis")
            return x
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is getattr:
            return None if node.args[1] in _META_ATTRS else self.unknown(node)
        if fn is torch.flatten:
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if fn is torch.reshape:
            return self.reshape(node, x, "fn")
        if fn is torch.permute:
            return self.permute(node, x, list(_arg(node, 1, "dims")))
        if fn is torch.transpose:
            return self.transpose(node, x, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if fn in (torch.cat, torch.concat):
            return self.cat(node, _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0))
        if fn in (torch.split, torch.chunk):
            return self.split(node, x, fn is torch.chunk, _arg(node, 1, "split_size_or_sections"
                              if fn is torch.split else "chunks"), _arg(node, 2, "dim", 0))
        if fn in _REDUCE_FUNCTIONS:
            return self.reduce(node, x, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if fn in (torch.unsqueeze,):
            return self.unsqueeze(node, x, _arg(node, 1, "dim"))
        if fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            d = _arg(node, 1, "dim")
            if isinstance(x, ChanInfo) and d is not None and _norm_dim(d, x.ndim) != x.dim:
                return x
            return self.unknown(node, "softmax over the channel axis")
        if fn is F.layer_norm:
            ns = _arg(node, 1, "normalized_shape")
            if isinstance(x, ChanInfo) and isinstance(ns, (list, tuple)) and x.dim < x.ndim - len(ns):
                return x
            if isinstance(x, ChanInfo):
                self.block(x.atoms, f"layer_norm (node {node.name}) normalizes over the channel axis: removing "
                                    "channels changes its statistics, so the pruned model would not equal the "
                                    "masked one")
                return x
            return self.unknown(node)
        if fn is F.batch_norm:
            return self.functional_bn(node, x)
        return self.unknown(node)

    def visit_method(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        m = str(node.target)
        x = self.val(node.args[0]) if node.args else None
        if not isinstance(x, ChanInfo):
            return self.unknown(node, "channel tensor in an argument position the analysis does not follow")
        rest = node.args[1:]
        if m in _BINARY_METHODS:
            return self.binary(node, [node.args[0], _arg(node, 1, "other")])
        if m in _UNARY_METHODS:
            return x if len(tracked) == 1 else self.unknown(node)
        if m in _META_METHODS:
            return None
        if m in ("view", "reshape"):
            return self.reshape(node, x, "method")
        if m == "flatten":
            return self.flatten(node, x, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
        if m == "permute":
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            return self.permute(node, x, dims or list(node.kwargs.get("dims", [])))
        if m == "transpose":
            return self.transpose(node, x, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        if m in ("split", "chunk"):
            return self.split(node, x, m == "chunk", _arg(node, 1, "split_size" if m == "split" else "chunks"),
                              _arg(node, 2, "dim", 0))
        if m in _REDUCE_METHODS:
            return self.reduce(node, x, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if m == "unsqueeze":
            return self.unsqueeze(node, x, _arg(node, 1, "dim"))
        if m in ("softmax", "log_softmax"):
            d = _arg(node, 1, "dim")
            if d is not None and _norm_dim(d, x.ndim) != x.dim:
                return x
            return self.unknown(node, "softmax over the channel axis")
        return self.unknown(node)

    # -- rules
    def binary(self, node: fx.Node, operands: list[Any]) -> Any:
        out_shape = _shape(node)
        if out_shape is None:
            return self.unknown(node)
        n = len(out_shape)
        ref = next((self.val(a) for a in operands if isinstance(self.val(a), ChanInfo)), None)
        if ref is None:
            return self.unknown(node)
        out_dim = ref.dim + (n - ref.ndim)
        width = len(ref.atoms) * ref.inner
        if out_shape[out_dim] != width:
            return self.unknown(node, "broadcasts the channel axis")
        for a in operands:
            if not isinstance(a, fx.Node):
                if isinstance(a, (int, float, bool)) or a is None:
                    continue
                return self.unknown(node)
            v = self.val(a)
            if v is ref:
                continue
            shp = _shape(a)
            if shp is None:
                if isinstance(v, ChanInfo):
                    return self.unknown(node)
                continue  # a Python number computed in the graph
            od = out_dim - (n - len(shp))
            if od < 0 or shp[od] == 1:
                if isinstance(v, ChanInfo):  # a 1-channel tracked tensor broadcast against ours
                    self.block(v.atoms, f"broadcast against {width} channels in node {node.name}")
                continue
            if isinstance(v, ChanInfo):
                if v.dim + (n - v.ndim) != out_dim or v.inner != ref.inner or len(v.atoms) != len(ref.atoms):
                    return self.unknown(node, "operands carry channels on different axes")
                self.uf.union(v.atoms, ref.atoms)
            elif isinstance(v, _Attr) and ref.inner == 1 and shp[od] == len(ref.atoms):
                key = (v.target, od)
                if key in self.param_members:
                    self.uf.union(self.param_members[key].atoms, ref.atoms)
                else:
                    mem = Member("param", v.target, node.name, ref.atoms, axis=od)
                    self.param_members[key] = mem
                    self.members.append(mem)
            else:
                self.block(ref.atoms, f"{_describe(self.gm, node)} combines the channels with a tensor of the "
                                      "same width the analysis cannot follow")
        return ref.moved(out_dim, n)

    def getitem(self, node: fx.Node) -> Any:
        src, idx = node.args[0], node.args[1]
        v = self.val(src)
        if isinstance(v, _Tuple):
            return v.items[idx] if isinstance(idx, int) and -len(v.items) <= idx < len(v.items) else self.unknown(node)
        if not isinstance(v, ChanInfo):
            return self.unknown(node)
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, fx.Node) or isinstance(i, (list, torch.Tensor)) for i in items):
            return self.unknown(node, "advanced indexing")
        n_consume = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for i in items:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (v.ndim - n_consume))
            else:
                expanded.append(i)
        in_d = out_d = 0
        new_dim = None
        for i in expanded:
            if i is None:
                out_d += 1
                continue
            if in_d == v.dim:
                if not (isinstance(i, slice) and i == slice(None)):
                    return self.unknown(node, "indexes into the channel axis")
                new_dim = out_d
            if isinstance(i, slice):
                out_d += 1
            in_d += 1
        if new_dim is None:
            new_dim = out_d + (v.dim - in_d)
        out_shape = _shape(node)
        return v.moved(new_dim, len(out_shape) if out_shape else v.ndim)

    def flatten(self, node: fx.Node, x: Any, start: int, end: int) -> Any:
        shape = _shape(node.args[0]) if node.args else None
        if not isinstance(x, ChanInfo) or shape is None or not isinstance(start, int) or not isinstance(end, int):
            return self.unknown(node)
        s, e = _norm_dim(start, len(shape)), _norm_dim(end, len(shape))
        if x.dim < s:
            return x.moved(x.dim, len(shape) - (e - s))
        if x.dim > e:
            return x.moved(x.dim - (e - s), len(shape) - (e - s))
        if math.prod(shape[s:x.dim]) != 1:
            return self.unknown(node, "flattens dimensions before the channel axis into it")
        return x.moved(s, len(shape) - (e - s), x.inner * math.prod(shape[x.dim + 1:e + 1]))

    def reshape(self, node: fx.Node, x: Any, kind: str) -> Any:
        a, b = _shape(node.args[0]), _shape(node)
        if not isinstance(x, ChanInfo) or a is None or b is None:
            return self.unknown(node)
        d = x.dim
        prefix = math.prod(a[:d])
        new_d = new_inner = None
        for j in range(len(b)):
            if math.prod(b[:j]) != prefix:
                continue
            if b[j] == a[d]:
                new_d, new_inner = j, x.inner
                break
            acc = a[d]
            for e in range(d + 1, len(a)):
                acc *= a[e]
                if acc == b[j]:
                    new_d, new_inner = j, x.inner * (acc // a[d])
                    break
            if new_d is not None:
                break
        if new_d is None:
            return self.unknown(node, f"reshape {a} -> {b} splits the channel axis")
        # the size at new_d must be a literal (rewritten when pruning) or -1
        if kind == "method":
            sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
                else list(node.args[1:])
            if not sizes:
                sizes = list(node.kwargs.get("shape", node.kwargs.get("size", [])))
        else:
            sizes = list(_arg(node, 1, "shape", []))
        if len(sizes) != len(b):
            return self.unknown(node, "shape arguments not understood")
        lit = sizes[new_d]
        if isinstance(lit, fx.Node) or not isinstance(lit, int):
            return self.unknown(node, "the channel size is computed in the graph")
        if lit != -1:
            self.members.append(Member("reshape", node.name, node.name, x.atoms, inner=new_inner,
                                       axis=new_d, extra={"kind": kind}))
        return x.moved(new_d, len(b), new_inner)

    def permute(self, node: fx.Node, x: Any, dims: list[Any]) -> Any:
        if not isinstance(x, ChanInfo) or not all(isinstance(d, int) for d in dims) or len(dims) != x.ndim:
            return self.unknown(node)
        dims = [_norm_dim(d, x.ndim) for d in dims]
        return x.moved(dims.index(x.dim), x.ndim)

    def transpose(self, node: fx.Node, x: Any, d0: Any, d1: Any) -> Any:
        if not isinstance(x, ChanInfo) or not isinstance(d0, int) or not isinstance(d1, int):
            return self.unknown(node)
        d0, d1 = _norm_dim(d0, x.ndim), _norm_dim(d1, x.ndim)
        d = d1 if x.dim == d0 else d0 if x.dim == d1 else x.dim
        return x.moved(d, x.ndim)

    def unsqueeze(self, node: fx.Node, x: Any, dim: Any) -> Any:
        if not isinstance(x, ChanInfo) or not isinstance(dim, int):
            return self.unknown(node)
        d = _norm_dim(dim, x.ndim + 1)
        return x.moved(x.dim + 1 if d <= x.dim else x.dim, x.ndim + 1)

    def reduce(self, node: fx.Node, x: Any, dim: Any, keepdim: Any) -> Any:
        if not isinstance(x, ChanInfo) or dim is None:
            return self.unknown(node, "reduces over all axes")
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
        if dims is None or not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
            return self.unknown(node)
        dims = [_norm_dim(d, x.ndim) for d in dims]
        if x.dim in dims:
            return self.unknown(node, "reduces over the channel axis")
        if keepdim:
            return x
        return x.moved(x.dim - sum(1 for d in dims if d < x.dim), x.ndim - len(dims))

    def cat(self, node: fx.Node, tensors: Any, dim: Any) -> Any:
        out_shape = _shape(node)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or out_shape is None:
            return self.unknown(node)
        n = len(out_shape)
        dim = _norm_dim(dim, n)
        infos = [self.val(t) for t in tensors]
        refs = [v for v in infos if isinstance(v, ChanInfo)]
        if any(v.ndim != n for v in refs):
            return self.unknown(node)
        chan_dims = {v.dim for v in refs}
        if len(chan_dims) != 1:
            return self.unknown(node, "inputs carry channels on different axes")
        cdim = chan_dims.pop()
        if cdim == dim:  # concatenating channels
            if any(v.inner != 1 for v in refs):
                return self.unknown(node, "concatenates flattened channels")
            parts = []
            for t, v in zip(tensors, infos):
                if isinstance(v, ChanInfo):
                    parts.append(v.atoms)
                else:
                    shp = _shape(t)
                    if shp is None:
                        return self.unknown(node)
                    parts.append(self.new_atoms(shp[dim], node.name,
                                                f"input {getattr(t, 'name', t)} of cat (node {node.name}) is not "
                                                "produced by a prunable layer"))
            return ChanInfo(dim, np.concatenate(parts), n)
        ref = refs[0]
        for t, v in zip(tensors, infos):
            if v is ref:
                continue
            if isinstance(v, ChanInfo):
                if v.inner != ref.inner or len(v.atoms) != len(ref.atoms):
                    return self.unknown(node)
                self.uf.union(v.atoms, ref.atoms)
            else:
                self.block(ref.atoms, f"cat (node {node.name}) joins the channels with a tensor the analysis "
                                      "cannot follow")
        return ref

    def split(self, node: fx.Node, x: Any, is_chunk: bool, arg: Any, dim: Any) -> Any:
        out = node.meta.get("tensor_meta")
        if not isinstance(x, ChanInfo) or not isinstance(dim, int) or not isinstance(out, tuple):
            return self.unknown(node)
        dim = _norm_dim(dim, x.ndim)
        if dim != x.dim:
            return _Tuple([x for _ in out])
        if x.inner != 1:
            return self.unknown(node, "splits flattened channels")
        sizes = [tuple(t.shape)[dim] for t in out]
        if is_chunk:
            if len(set(sizes)) != 1 or sizes[0] * len(sizes) != len(x.atoms):
                return self.unknown(node, "uneven chunks")
            self.constraints.append(Constraint("blocks", x.atoms, len(sizes), f"chunk (node {node.name})"))
        elif isinstance(arg, int):
            if len(set(sizes)) != 1 or sizes[0] * len(sizes) != len(x.atoms):
                return self.unknown(node, "uneven split")
            self.constraints.append(Constraint("blocks", x.atoms, len(sizes), f"split (node {node.name})"))
        elif isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg):
            self.members.append(Member("split", node.name, node.name, x.atoms, extra={"sizes": sizes}))
        else:
            return self.unknown(node)
        items, start = [], 0
        for s in sizes:
            items.append(ChanInfo(dim, x.atoms[start:start + s], x.ndim))
            start += s
        return _Tuple(items)

    def functional_bn(self, node: fx.Node, x: Any) -> Any:
        params = [_arg(node, i, k) for i, k in enumerate(("input", "running_mean", "running_var", "weight", "bias"))]
        attrs = [self.val(p) for p in params[1:]]
        if not isinstance(x, ChanInfo) or x.dim != 1 or x.inner != 1 or not all(
                isinstance(a, _Attr) or p is None for a, p in zip(attrs, params[1:])):
            return self.unknown(node)
        roles = {k: a.target for k, a in zip(("running_mean", "running_var", "weight", "bias"), attrs)
                 if isinstance(a, _Attr)}
        self.members.append(Member("bn_f", node.name, node.name, x.atoms,
                                   extra={"targets": roles, "weight": roles.get("weight")}))
        return x


def analyze_channels(gm: fx.GraphModule) -> ChannelGraph:
    """Channel groups of ``gm`` (annotated with shapes, e.g. by :func:`graphopt.capture`)."""
    an = _Analyzer(gm)
    an.run()
    root = an.uf.roots()
    blocked_reasons: dict[int, str] = {}
    for atoms, reason in an.blocks:
        for r in np.unique(root[atoms]):
            blocked_reasons.setdefault(int(r), reason)

    # groups: networkx components over producers and channel classes
    producers = [m for m in an.members if m.kind in ("conv_out", "linear_out", "dw") and
                 int(m.atoms[0]) in an.producer_of]
    order = list(nx.topological_sort(to_networkx(gm)))  # node names, producers first
    comp = nx.Graph()
    for m in producers:
        comp.add_node(("p", m.target))
        for r in np.unique(root[m.atoms]):
            comp.add_edge(("p", m.target), ("c", int(r)))
    node_classes: dict[str, set[int]] = {}
    for name, atoms in an.atom_node.items():
        for r in np.unique(root[atoms]):
            node_classes.setdefault(name, set()).add(int(r))
    groups: list[ChannelGroup] = []
    order_of_producer = {m.target: i for i, m in enumerate(producers)}
    for cc in nx.connected_components(comp):
        prods = sorted((t for k, t in cc if k == "p"), key=order_of_producer.get)
        classes_set = {c for k, c in cc if k == "c"}
        first = next(m for m in producers if m.target == prods[0])
        ordered = list(dict.fromkeys(int(r) for r in root[first.atoms]))
        rest = sorted(classes_set - set(ordered))
        classes = np.array(ordered + rest, dtype=np.int64)
        nodes = [n for n in order if node_classes.get(n, set()) & classes_set]
        grp = ChannelGroup(len(groups), classes, prods, nodes)
        groups.append(grp)
    by_class = {int(c): g for g in groups for c in g.classes}
    for atoms, reason in an.blocks:  # every reason, in graph order, once per group
        for r in np.unique(root[atoms]):
            g = by_class.get(int(r))
            if g is not None and reason not in g.blocked:
                g.blocked.append(reason)
    for con in an.constraints:
        rs = np.unique(root[con.atoms])
        gs = {id(by_class[int(r)]): by_class[int(r)] for r in rs if int(r) in by_class}
        for g in gs.values():
            g.constraints.append(con)
    for g in groups:
        if g.blocked or not g.constraints:
            continue
        cls = set(int(c) for c in g.classes)
        for con in g.constraints:
            seq = root[con.atoms]
            if len(set(seq.tolist())) != len(seq) or set(seq.tolist()) != cls:
                g.blocked.append(f"{con.where} covers only part of the coupled channels (or repeats them)")
                break
            if len(seq) % con.g:
                g.blocked.append(f"{con.where}: {len(seq)} channels do not split into {con.g} groups")
                break
        kinds = {c.kind for c in g.constraints}
        if not g.blocked and len(kinds) > 1:
            g.blocked.append("grouped-conv and GroupNorm constraints on the same channels are not supported")
        if not g.blocked:
            seqs = {tuple(root[c.atoms].tolist()) for c in g.constraints}
            gs_ = sorted({c.g for c in g.constraints})
            if len(seqs) > 1 and not all(gs_[-1] % x == 0 for x in gs_):
                g.blocked.append("grouped constraints with different channel orders and group counts")
            elif len(seqs) > 1:
                # different orders: only safe if each constraint's blocks are the same class sets
                base = max(g.constraints, key=lambda c: c.g)
                bsz = len(base.atoms) // base.g
                bset = [set(root[base.atoms[i * bsz:(i + 1) * bsz]].tolist()) for i in range(base.g)]
                for c in g.constraints:
                    csz = len(c.atoms) // c.g
                    for i in range(c.g):
                        cs = set(root[c.atoms[i * csz:(i + 1) * csz]].tolist())
                        if not all(b <= cs or not (b & cs) for b in bset):
                            g.blocked.append(f"{c.where} groups channels differently from {base.where}")
                            break
                    if g.blocked:
                        break
    total = sum(int(n.meta["cost"].macs) for n in gm.graph.nodes if n.meta.get("cost") is not None)
    return ChannelGraph(groups, an.members, root, an.macs, total, blocked_reasons)
