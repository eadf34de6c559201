"""The channel analysis: one pass over the graph in topological order that follows each tensor's
channel axis and records, per position of that axis, which *atom* (an output channel of a
producer: a conv or linear layer) it carries.

- layers (``call_module``) follow their channel rule (:mod:`graphopt.analysis.channels.rules`):
  coupled layers keep positions (BatchNorm, depthwise conv, activations), independent ones
  consume their input channels and produce new atoms (conv, linear), grouped ones add an
  "equal removal per group" constraint, GroupNorm a "whole groups" one;
- elementwise functions keep positions; when two tracked tensors meet in a binary op their atoms
  are *unified* position by position (residual adds, squeeze-excitation products);
- ``cat`` along the channel axis concatenates atom lists, ``split``/``chunk`` slice them;
- ``flatten``/``view``/``reshape``/``permute``/``transpose``/indexing move the channel axis;
  ``flatten`` of ``[N, C, H, W]`` makes each channel ``H*W`` consecutive features (``inner``).

Anything it does not understand (an op or a layer without a rule touching a tracked tensor, a
reduction over the channel axis, a reshape that splits it as a channel shuffle does, a channel
tensor reaching the model output) *blocks* the atoms involved, with the reason; a group with a
blocked channel is not pruned. A tensor the analysis cannot follow is never treated as a source
of new channels: a coupled layer (depthwise conv, BatchNorm) reading one is left whole.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
import torch.nn.functional as F

from graphopt.analysis.channels.graph import (
    ChanInfo, ChannelGraph, Constraint, MacEntry, Member, build_channel_graph,
)
from graphopt.analysis.channels.ops import (
    BINARY_FUNCTIONS, BINARY_METHODS, META_ATTRS, META_METHODS, POOL_FUNCTIONS, REDUCE_FUNCTIONS,
    REDUCE_METHODS, UNARY_FUNCTIONS, UNARY_METHODS, UNARY_NAMES, arg as _arg, describe as _describe,
    norm_dim as _norm_dim, shape_of as _shape,
)
from graphopt.analysis.channels.heads import Heads, head_constraints, split_heads, visit_heads
from graphopt.analysis.channels.rules import ChannelRule, Relation, channel_rule_for, channel_rule_for_name
from graphopt.analysis.channels.unionfind import UnionFind

__all__ = ["ChannelAnalysis", "analyze_channels"]

_ATEN_SLICE = torch.ops.aten.slice.Tensor
_ATEN_ALIAS = torch.ops.aten.alias.default
_ATEN_SELECT = torch.ops.aten.select.int
_ATEN_INDEX = torch.ops.aten.index.Tensor
_ATEN_LAYER_NORM = torch.ops.aten.layer_norm.default  # F.layer_norm as torch.export captures it
_ATEN_SAME = {"aten::to", "aten::_to_copy", "aten::alias", "aten::clone", "aten::contiguous"}  # dtype/device/copies
HIDDEN_HINT = "; prune:hidden=true slices it (approximate: the statistics are then over the kept channels)"


def _scalar(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


_UNTRACKED = object()  # a layer called on a tensor the analysis could not follow


@dataclass
class _Attr:
    """A parameter/buffer read by ``get_attr`` (may be sliced if it broadcasts on a channel axis)."""

    target: str
    view: bool = False  # an ``expand`` of it whose last axis is the parameter's last axis (a cls token)


@dataclass
class _Tuple:
    items: list[Any]


class ChannelAnalysis:
    """The state of one analysis run; rules with a custom :meth:`ChannelRule.propagate` get it
    (``val``, ``tracked``, ``block``, ``unknown``, ``new_atoms``, ``flatten`` ...)."""

    def __init__(self, gm: fx.GraphModule, hidden: bool = False):
        self.gm = gm
        # hidden width: normalisations over the channel axis (LayerNorm, RMSNorm's mean) are followed and
        # sliced (an approximate rewrite: their statistics are then over the kept channels) instead of
        # blocking the group; embeddings' output width becomes prunable
        self.hidden = hidden
        self.approx: list[tuple[np.ndarray, str]] = []  # atoms normalised over, and by what
        self.uf = UnionFind()
        self.values: dict[fx.Node, Any] = {}
        self.members: list[Member] = []
        self.constraints: list[Constraint] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.macs: list[MacEntry] = []
        self.mod_out: dict[str, np.ndarray] = {}
        self.mod_in: dict[str, Any] = {}  # target -> input atoms, or _UNTRACKED
        self.mod_coupled: dict[str, Any] = {}
        self.param_members: dict[tuple[str, int], Member] = {}
        self.atom_node: dict[str, np.ndarray] = {}  # node name -> atoms (for group node lists)
        self.head_splits: list[tuple[np.ndarray, str]] = []  # [H, D] atoms of each head split

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

    def new_atoms(self, n: int, blocked: str | None = None) -> np.ndarray:
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
        if node.op == "call_function" and node.target is torch.addmm and not any(isinstance(v, Heads) for v in tracked):
            layer = self.functional_layer(node)
            if layer is not NotImplemented:
                return layer
        if any(isinstance(v, Heads) for v in tracked):
            return visit_heads(self, node)
        if node.op == "call_module":
            return self.visit_module(node, tracked)
        if not tracked:
            return self.attr_view(node)  # nothing channel-carrying flows in: nothing to follow
        if node.op == "call_function":
            return self.visit_function(node, tracked)
        if node.op == "call_method":
            return self.visit_method(node, tracked)
        return self.unknown(node)

    # -- layers: through their channel rules
    def visit_module(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        target = str(node.target)
        mod = self.gm.get_submodule(target)
        rule = channel_rule_for(mod)
        if rule is None:
            if not tracked:
                return None
            return self.unknown(node, f"no channel rule for {type(mod).__name__}; "
                                      "graphopt.analysis.register_channel_rule adds one")
        custom = rule.propagate(self, node, mod)
        if custom is not NotImplemented:
            return custom
        rel = rule.relation(mod)
        if rel.kind == "blocked":
            self.block_inputs(node, rel.reason.replace("{name}", f"'{target}'"))
            return None
        x = self.val(node.args[0]) if node.args else None
        cost = node.meta.get("cost")
        macs = int(cost.macs) if cost is not None else 0
        if rel.kind == "independent":
            if len(node.args) != 1 or node.kwargs:
                return self.unknown(node, "unexpected arguments")
            return self.producer(node, mod, rule, rel, target, x, macs)
        if rel.kind != "coupled":
            return self.unknown(node, f"channel rule {type(rule).__name__} gave relation {rel.kind!r}")
        if not isinstance(x, ChanInfo) or len(node.args) != 1 or node.kwargs:
            if rule.slices(mod):
                self._untracked_call(self.mod_coupled, target, node)
            return self.unknown(node, "unexpected arguments") if tracked else None
        return self.coupled(node, mod, rule, rel, target, x, macs)

    def functional_layer(self, node: fx.Node) -> Any:
        """``torch.addmm(m.bias, x, m.weight)`` of a layer ``m`` whose rule says it is traced that way
        (``functional == "addmm"``: HF's Conv1D): the layer, with ``m``'s path as its name."""
        if len(node.args) != 3 or node.kwargs:
            return NotImplemented
        b, x, w = (self.val(a) for a in node.args)
        if not (isinstance(b, _Attr) and isinstance(w, _Attr)):
            return NotImplemented
        path, _, leaf = w.target.rpartition(".")
        if leaf != "weight" or b.target != (f"{path}.bias" if path else "bias"):
            return NotImplemented
        mod = self.gm.get_submodule(path)
        rule = channel_rule_for(mod)
        if rule is None:  # torch.export keeps only a plain container: the class is in the module stack
            cls = next((v[1] for v in (node.meta.get("nn_module_stack") or {}).values()
                        if isinstance(v, tuple) and len(v) == 2 and v[0] == path), None)
            rule = channel_rule_for_name(cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
                                         if isinstance(cls, type) else "")
        if rule is None or rule.functional != "addmm":
            return NotImplemented
        cost = node.meta.get("cost")
        return self.producer(node, mod, rule, rule.relation(mod), path, x, int(cost.macs) if cost is not None else 0)

    def _input_mismatch(self, rule: ChannelRule, mod: nn.Module, x: ChanInfo) -> str | None:
        if rule.in_axis is not None and x.dim != _norm_dim(rule.in_axis, x.ndim):
            return f"sees its input channels on an unexpected axis ({x.dim}, expects {rule.in_axis})"
        if x.inner != 1 and not rule.accepts_flattened:
            return "reads flattened channels"
        cin = rule.get_in_channels(mod)
        if cin is not None and len(x.atoms) * x.inner != cin:
            return f"expects {cin} input channels on the channel axis, sees {len(x.atoms) * x.inner}"
        return None

    def _untracked_call(self, seen: dict[str, Any], target: str, node: fx.Node) -> None:
        """A sliced layer also runs on a tensor the analysis cannot follow: its channels stay."""
        prev = seen.get(target)
        if isinstance(prev, np.ndarray):
            self.block(prev, f"{_describe(self.gm, node)} is also called on a tensor the analysis cannot follow")
        seen[target] = _UNTRACKED

    def _tracked_call(self, seen: dict[str, Any], target: str, node: fx.Node, atoms: np.ndarray) -> bool:
        """Record a call's channels; False if this layer was already seen (unified or blocked)."""
        prev = seen.get(target)
        if prev is None:
            seen[target] = atoms
            return True
        if prev is _UNTRACKED:
            self.block(atoms, f"{_describe(self.gm, node)} is also called on a tensor the analysis cannot follow")
        elif len(prev) == len(atoms):
            self.uf.union(prev, atoms)
        else:
            self.block(np.concatenate([prev, atoms]), f"{_describe(self.gm, node)} is called with different widths")
        return False

    def producer(self, node: fx.Node, mod: nn.Module, rule: ChannelRule, rel: Relation, target: str, x: Any,
                 macs: int) -> Any:
        """An independent layer: consumes its input channels, produces new ones."""
        kind = type(mod).__name__
        xin = x if isinstance(x, ChanInfo) else None
        if xin is not None:
            why = self._input_mismatch(rule, mod, xin) or rule.check(mod, xin)
            if why:
                self.block(xin.atoms, f"{kind} '{target}' {why}")
                xin = None
        out_shape = _shape(node)
        ndim = len(out_shape) if out_shape else (xin.ndim if xin is not None else 2)
        cout = rule.get_out_channels(mod)
        out_dim = _norm_dim(rule.out_axis if rule.out_axis is not None else 1, ndim)
        if cout is None or (out_shape is not None and (out_dim >= ndim or out_shape[out_dim] != cout)):
            if xin is not None:
                self.block(xin.atoms, f"{kind} '{target}': its output channels are not where its rule says")
            return None
        if xin is not None:
            if self._tracked_call(self.mod_in, target, node, xin.atoms):
                self.members.append(Member("in", target, node.name, xin.atoms, inner=xin.inner, rule=rule))
                if rel.groups > 1:
                    self.constraints.append(Constraint("blocks", xin.atoms, rel.groups,
                                                       f"grouped {kind} '{target}' input"))
        else:
            self._untracked_call(self.mod_in, target, node)
        atoms = self.mod_out.get(target)
        if atoms is None:
            atoms = self.uf.new(cout)
            self.mod_out[target] = atoms
            self.members.append(Member("out", target, node.name, atoms, rule=rule))
            if rel.groups > 1:
                self.constraints.append(Constraint("blocks", atoms, rel.groups, f"grouped {kind} '{target}' output"))
        self.macs.append(MacEntry(node.name, macs, xin.atoms if xin is not None else None, atoms))
        return ChanInfo(out_dim, atoms, ndim)

    def coupled(self, node: fx.Node, mod: nn.Module, rule: ChannelRule, rel: Relation, target: str, x: ChanInfo,
                macs: int) -> Any:
        """A coupled layer: output channel i is input channel i."""
        why = self._input_mismatch(rule, mod, x)
        if why:
            return self.unknown(node, why)
        out_shape = _shape(node)
        same = out_shape is not None and len(out_shape) == x.ndim and out_shape[x.dim] == len(x.atoms) * x.inner
        why = rule.check(mod, x)
        if why:
            self.block(x.atoms, f"{_describe(self.gm, node)} {why}")
            return x if same else None
        if not same:
            return self.unknown(node, "changes the width of the channel axis")
        if rule.slices(mod):
            if self._tracked_call(self.mod_coupled, target, node, x.atoms):
                self.members.append(Member("coupled", target, node.name, x.atoms, inner=x.inner, rule=rule))
            if rel.units:
                self.constraints.append(Constraint("units", x.atoms, rel.units, f"{type(mod).__name__} '{target}'"))
        if macs:
            self.macs.append(MacEntry(node.name, macs, x.atoms, x.atoms))
        return x

    # -- functions and methods
    # -- functions and methods
    def visit_function(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        fn = node.target
        name = getattr(fn, "__name__", "")
        x = self.val(node.args[0]) if node.args else None
        if fn in BINARY_FUNCTIONS:
            return self.binary(node, [_arg(node, 0, "input"), _arg(node, 1, "other")])
        if fn in UNARY_FUNCTIONS or name in UNARY_NAMES:
            return x if isinstance(x, ChanInfo) and len(tracked) == 1 else self.unknown(node)
        if fn is torch.pow and len(node.args) == 2 and not node.kwargs and _scalar(node.args[1]):
            return x if isinstance(x, ChanInfo) and len(tracked) == 1 else self.unknown(node)
        if fn is _ATEN_SLICE:
            return self.aten_slice(node, x)
        if fn is _ATEN_ALIAS or (isinstance(fn, torch._ops.OpOverload) and fn._schema.name in _ATEN_SAME):
            return x if isinstance(x, ChanInfo) and len(tracked) == 1 else self.unknown(node)
        if fn is _ATEN_SELECT:
            return self.select(node, x, _arg(node, 1, "dim"), len(tracked))
        if fn in POOL_FUNCTIONS:
            if not isinstance(x, ChanInfo) or x.dim >= x.ndim - (3 if "3d" in name else 1 if "1d" in name else 2):
                return self.unknown(node, "pools over the channel axis")
            return x
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is getattr:
            return None if node.args[1] in META_ATTRS else self.unknown(node)
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
        if fn in REDUCE_FUNCTIONS:
            return self.reduce(node, x, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))
        if fn in (torch.unsqueeze,):
            return self.unsqueeze(node, x, _arg(node, 1, "dim"))
        if fn in (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax):
            d = _arg(node, 1, "dim")
            if isinstance(x, ChanInfo) and d is not None and _norm_dim(d, x.ndim) != x.dim:
                return x
            return self.unknown(node, "softmax over the channel axis")
        if fn is F.layer_norm or fn is _ATEN_LAYER_NORM:
            return self.functional_layer_norm(node, x)
        if fn is F.batch_norm:
            return self.functional_bn(node, x)
        return self.unknown(node)

    def visit_method(self, node: fx.Node, tracked: list[ChanInfo]) -> Any:
        m = str(node.target)
        x = self.val(node.args[0]) if node.args else None
        if not isinstance(x, ChanInfo):
            return self.unknown(node, "channel tensor in an argument position the analysis does not follow")
        rest = node.args[1:]
        if m in BINARY_METHODS:
            return self.binary(node, [node.args[0], _arg(node, 1, "other")])
        if m in UNARY_METHODS or (m == "pow" and len(node.args) == 2 and not node.kwargs and _scalar(node.args[1])):
            return x if len(tracked) == 1 else self.unknown(node)
        if m in META_METHODS or m in ("new_ones", "new_zeros", "new_full", "new_empty"):
            return None  # reads only the shape/dtype/device (a causal mask from x.new_ones((T, T)))
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
        if m in REDUCE_METHODS:
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
            elif isinstance(v, _Attr) and ref.inner == 1 and shp[od] == len(ref.atoms) \
                    and self._param_member(v, od, len(shp), node, ref.atoms):
                pass
            else:
                self.block(ref.atoms, f"{_describe(self.gm, node)} combines the channels with a tensor of the "
                                      "same width the analysis cannot follow")
        return ref.moved(out_dim, n)

    def attr_view(self, node: fx.Node) -> Any:
        """``cls_token.expand(B, -1, -1)``: still the parameter along its last axis (sliced there when
        the channels it joins are); anything else reading no channels is not followed."""
        v = self.val(node.args[0]) if node.args else None
        if not isinstance(v, _Attr):
            return None
        if node.op == "call_method" and node.target == "expand":
            sizes = self._sizes(node, "method")
            if sizes and sizes[-1] == -1:
                return _Attr(v.target, view=True)
        if (node.op == "call_method" and node.target in ("to", "contiguous", "type_as")) or (
                isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name in _ATEN_SAME):
            return v
        if node.target is _ATEN_INDEX and len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
                and len(node.args[1]) == 1 and len(_shape(node.args[0]) or ()) == 2:
            return _Attr(v.target, view=True)  # weight[positions]: an embedding lookup written out (Whisper)
        return None

    def _param_member(self, v: _Attr, od: int, n: int, node: fx.Node, atoms: np.ndarray) -> bool:
        """Slice parameter ``v`` (seen with ``n`` dims, channels on ``od``) with ``atoms``; False if it
        cannot be (a view whose channels are not on its last axis)."""
        if v.view:
            if od != n - 1:
                return False
            od = self.gm.get_parameter(v.target).ndim - 1 if v.target in dict(self.gm.named_parameters()) \
                else self.gm.get_buffer(v.target).ndim - 1
        key = (v.target, od)
        if key in self.param_members:
            self.uf.union(self.param_members[key].atoms, atoms)
        else:
            mem = Member("param", v.target, node.name, atoms, axis=od)
            self.param_members[key] = mem
            self.members.append(mem)
        return True

    def select(self, node: fx.Node, x: Any, dim: Any, n_tracked: int) -> Any:
        """``aten.select(x, dim, index)`` (``x[:, 0]`` captured by torch.export): the channels stay
        unless it selects on the channel axis."""
        if not isinstance(x, ChanInfo) or not isinstance(dim, int) or n_tracked != 1:
            return self.unknown(node)
        d = _norm_dim(dim, x.ndim)
        if d == x.dim:
            return self.unknown(node, "indexes into the channel axis")
        return x.moved(x.dim - 1 if d < x.dim else x.dim, x.ndim - 1)

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
                if not (isinstance(i, slice) and (i == slice(None) or self._covers(i, len(v.atoms) * v.inner))):
                    return self.unknown(node, "indexes into the channel axis")
                new_dim = out_d
            if isinstance(i, slice):
                out_d += 1
            in_d += 1
        if new_dim is None:
            new_dim = out_d + (v.dim - in_d)
        out_shape = _shape(node)
        return v.moved(new_dim, len(out_shape) if out_shape else v.ndim)

    def aten_slice(self, node: fx.Node, x: Any) -> Any:
        """``aten.slice(x, dim, start, end, step)``: over another axis the channels stay; over the channel
        axis only when it keeps every channel (as ``getitem``)."""
        d, start, end, step = (_arg(node, 1, "dim", 0), _arg(node, 2, "start"), _arg(node, 3, "end"),
                               _arg(node, 4, "step", 1))
        if not isinstance(x, ChanInfo) or not isinstance(d, int) or len(self.tracked(node)) != 1:
            return self.unknown(node)
        if _norm_dim(d, x.ndim) != x.dim:
            return x
        if isinstance(start, fx.Node) or isinstance(end, fx.Node) or isinstance(step, fx.Node) \
                or not self._covers(slice(start, end, step), len(x.atoms) * x.inner):
            return self.unknown(node, "slices the channel axis")
        return x

    @staticmethod
    def _covers(i: slice, width: int) -> bool:
        """``x[:, :k]`` with literal ``k >= width``: every channel, and still every channel after
        pruning (Python slices clamp), as in GhostNet's ``cat([x1, x2])[:, :out_chs]``."""
        return (i.start in (None, 0) and i.step in (None, 1)
                and (i.stop is None or (isinstance(i.stop, int) and not isinstance(i.stop, bool) and i.stop >= width)))

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
            heads = split_heads(self, node, x, a, b, self._sizes(node, kind), "method" if kind == "method" else kind)
            if heads is not None:
                return heads
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

    @staticmethod
    def _sizes(node: fx.Node, kind: str) -> list[Any]:
        if kind == "method":
            if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
                return list(node.args[1])
            return list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", [])))
        return list(_arg(node, 1, "shape", []))

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
            mean = node.target in (torch.mean, "mean")
            if mean and keepdim and len(dims) == 1 and x.inner == 1:
                if self.hidden:  # RMSNorm written out (HF LlamaRMSNorm, T5LayerNorm): the mean of the kept channels
                    self.approx.append((x.atoms, f"mean over the channels (node {node.name}, a norm computed in "
                                                 "the graph) is taken over the kept channels"))
                    return None  # a per-position statistic: broadcasts against the channels
                return self.unknown(node, "reduces over the channel axis, as a norm computed in the graph (RMSNorm) "
                                          "does: removing channels changes its statistics" + HIDDEN_HINT)
            return self.unknown(node, "reduces over the channel axis, as a norm computed in the graph (RMSNorm) "
                                      "does: removing channels changes its statistics")
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
                    parts.append(self.new_atoms(shp[dim],
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
            elif isinstance(v, _Attr) and ref.inner == 1 and _shape(t) is not None and len(_shape(t)) == n \
                    and self._param_member(v, cdim, n, node, ref.atoms):
                pass  # a cls token joined to the patch embeddings: sliced with them
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
            # the literal is a piece size: it shrinks with the pieces (equal removal per piece)
            self.members.append(Member("split", node.name, node.name, x.atoms, extra={"sizes": sizes, "equal": True}))
        elif isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg):
            self.members.append(Member("split", node.name, node.name, x.atoms, extra={"sizes": sizes}))
        else:
            return self.unknown(node)
        items, start = [], 0
        for s in sizes:
            items.append(ChanInfo(dim, x.atoms[start:start + s], x.ndim))
            start += s
        return _Tuple(items)

    def functional_layer_norm(self, node: fx.Node, x: Any) -> Any:
        """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` (a hand-traced graph, timm's
        LayerNorm traced through; ``aten.layer_norm`` from torch.export): over other axes the channels
        pass; over the channel (last) axis alone, with the ``hidden`` option, sliced like the LayerNorm
        module (weight and bias, the ``get_attr`` parameters it reads, and the ``normalized_shape``
        literal), approximately."""
        ns = _arg(node, 1, "normalized_shape")
        if not isinstance(x, ChanInfo) or len(self.tracked(node)) != 1:
            return self.unknown(node)
        if isinstance(ns, int) and not isinstance(ns, bool):
            ns = (ns,)
        if isinstance(ns, (list, tuple)) and x.dim < x.ndim - len(ns):
            return x
        last_only = (isinstance(ns, (list, tuple)) and len(ns) == 1 and x.inner == 1 and x.dim == x.ndim - 1
                     and ns[0] == len(x.atoms))
        if not self.hidden:
            self.block(x.atoms, f"layer_norm (node {node.name}) normalizes over the channel axis: removing "
                                "channels changes its statistics, so the pruned model would not equal the "
                                "masked one" + (HIDDEN_HINT if last_only else ""))
            return x
        if not isinstance(ns, (list, tuple)) or not all(isinstance(d, int) for d in ns):
            self.block(x.atoms, f"layer_norm (node {node.name}): its normalized_shape is computed in the graph "
                                "(a literal is rewritten when pruning): not sliced")
            return x
        if not last_only:
            self.block(x.atoms, f"layer_norm (node {node.name}) normalizes over the channels and other axes "
                                f"(normalized_shape {tuple(ns)}): not sliced")
            return x
        params = []
        for i, key in ((2, "weight"), (3, "bias")):
            a = _arg(node, i, key)
            if a is None:
                continue
            v = self.val(a)
            t = self._tensor_of(v) if isinstance(v, _Attr) and not v.view else None
            if t is None or t.ndim != 1 or t.shape[0] != len(x.atoms):
                self.block(x.atoms, f"layer_norm (node {node.name}): its {key} is not a parameter of the model "
                                    f"of width {len(x.atoms)} (computed in the graph?): not sliced")
                return x
            params.append(v)
        for v in params:
            self._param_member(v, 0, 1, node, x.atoms)
        self.members.append(Member("norm_shape", node.name, node.name, x.atoms))
        self.approx.append((x.atoms, f"layer_norm (node {node.name}) normalizes over the kept channels"))
        return x

    def _tensor_of(self, v: _Attr) -> torch.Tensor | None:
        for get in (self.gm.get_parameter, self.gm.get_buffer):
            try:
                return get(v.target)
            except AttributeError:
                continue
        return None

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


def analyze_channels(gm: fx.GraphModule, hidden: bool = False) -> ChannelGraph:
    """Channel groups of ``gm`` (annotated with shapes, e.g. by :func:`graphopt.capture`).

    ``hidden``: follow normalisations over the channel axis (LayerNorm, RMSNorm) and embeddings, so
    the hidden width of a transformer (its residual stream) is one prunable group; such groups list
    what makes their pruning approximate in :attr:`ChannelGroup.approximate`."""
    an = ChannelAnalysis(gm, hidden=hidden)
    an.run()
    head_constraints(an)
    roots = an.uf.roots()
    cg = build_channel_graph(gm, roots, an.members, an.constraints, an.blocks, an.macs, an.atom_node)
    if an.approx:
        by_class = cg.group_of_class()
        for atoms, why in an.approx:
            for r in np.unique(roots[atoms]):
                g = by_class.get(int(r))
                if g is not None and why not in g.approximate:
                    g.approximate.append(why)
    return cg
