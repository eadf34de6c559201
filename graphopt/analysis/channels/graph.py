"""The channel graph: channel groups, the members sliced when channels go, constraints, and the MAC
model that predicts a graph's MACs after a removal (without slicing anything).

A *group* is a connected set of producers whose channels are unified (a networkx component over
the producer/channel-class graph); pruning class ``i`` removes it from every member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
from torch import fx

from graphopt.analysis.graph import to_networkx

if TYPE_CHECKING:
    from graphopt.analysis.channels.rules import ChannelRule

__all__ = ["ChanInfo", "Member", "Constraint", "ChannelGroup", "MacEntry", "ChannelGraph", "build_channel_graph"]


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
class Member:
    """Something sliced when channels go.

    Layer members (``rule`` set, ``target`` a module path): ``out`` (the output channels a layer
    produces), ``in`` (the input channels it consumes; ``inner`` elements per channel, e.g. a
    Linear after flatten), ``coupled`` (one channel set for input and output: BatchNorm,
    depthwise conv). Graph members (no rule): ``param`` (a get_attr tensor along ``axis``),
    ``bn_f`` (``F.batch_norm`` parameters and statistics), ``reshape`` (a literal size in a
    view/reshape), ``split`` (the sizes of a split), ``slice`` (literal bounds of a channel slice),
    ``norm_shape`` (the ``normalized_shape`` of an ``F.layer_norm`` over the hidden width).
    ``atoms``: the atom at each position of the sliced axis.
    """

    kind: str
    target: str
    node: str
    atoms: np.ndarray
    inner: int = 1
    axis: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    rule: "ChannelRule | None" = None


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
    every member. ``modules``: every layer whose output channels are these (producers and
    coupled layers such as BatchNorm or depthwise convs)."""

    id: int
    classes: np.ndarray  # class roots, in a canonical order (the first producer's channel order)
    producers: list[str]
    nodes: list[str]
    blocked: list[str] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    # why pruning this group is not exact against the masked original (a norm over its channels)
    approximate: list[str] = field(default_factory=list)

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
class MacEntry:
    """MACs of one node that scale with the kept share of its input and output channels."""

    node: str
    macs: int
    in_atoms: np.ndarray | None
    out_atoms: np.ndarray | None


@dataclass
class ChannelGraph:
    """The analysis result. ``root[atom]`` is the atom's class; ``members`` are what to slice."""

    groups: list[ChannelGroup]
    members: list[Member]
    root: np.ndarray
    macs: list[MacEntry]
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


def build_channel_graph(gm: fx.GraphModule, root: np.ndarray, members: list[Member], constraints: list[Constraint],
                        blocks: list[tuple[np.ndarray, str]], macs: list[MacEntry],
                        atom_node: dict[str, np.ndarray]) -> ChannelGraph:
    """Groups (components over producers and channel classes), their blocks and constraints."""
    blocked_reasons: dict[int, str] = {}
    for atoms, reason in blocks:
        for r in np.unique(root[atoms]):
            blocked_reasons.setdefault(int(r), reason)
    producers = [m for m in members if m.kind == "out"]
    order = list(nx.topological_sort(to_networkx(gm)))  # node names, producers first
    comp = nx.Graph()
    for m in producers:
        comp.add_node(("p", m.target))
        for r in np.unique(root[m.atoms]):
            comp.add_edge(("p", m.target), ("c", int(r)))
    node_classes: dict[str, set[int]] = {}
    for name, atoms in atom_node.items():
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
        groups.append(ChannelGroup(len(groups), classes, prods, nodes))
    by_class = {int(c): g for g in groups for c in g.classes}
    for m in members:
        if m.kind in ("out", "coupled"):
            for r in np.unique(root[m.atoms]):
                g = by_class.get(int(r))
                if g is not None and m.target not in g.modules:
                    g.modules.append(m.target)
    for atoms, reason in blocks:  # every reason, in graph order, once per group
        for r in np.unique(root[atoms]):
            g = by_class.get(int(r))
            if g is not None and reason not in g.blocked:
                g.blocked.append(reason)
    for con in constraints:
        rs = np.unique(root[con.atoms])
        gs = {id(by_class[int(r)]): by_class[int(r)] for r in rs if int(r) in by_class}
        for g in gs.values():
            g.constraints.append(con)
    for g in groups:
        if not g.blocked and g.constraints:
            _check_constraints(g, root)
    total = sum(int(n.meta["cost"].macs) for n in gm.graph.nodes if n.meta.get("cost") is not None)
    return ChannelGraph(groups, members, root, macs, total, blocked_reasons)


def _check_constraints(g: ChannelGroup, root: np.ndarray) -> None:
    """Block ``g`` when its constraints cannot all hold with one removal."""
    cls = set(int(c) for c in g.classes)
    # equal removal per block holds by itself when every block carries the same classes once (a fused
    # q/k/v projection split in three whose thirds are unified head by head through the attention)
    g.constraints = [c for c in g.constraints if not _same_class_blocks(c, root)]
    if not g.constraints:
        return
    for con in g.constraints:
        seq = root[con.atoms]
        if len(set(seq.tolist())) != len(seq) or set(seq.tolist()) != cls:
            g.blocked.append(f"{con.where} covers only part of the coupled channels (or repeats them)")
            return
        if len(seq) % con.g:
            g.blocked.append(f"{con.where}: {len(seq)} channels do not split into {con.g} groups")
            return
    if len({c.kind for c in g.constraints}) > 1:
        g.blocked.append("grouped-conv and GroupNorm constraints on the same channels are not supported")
        return
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
                    return


def _same_class_blocks(con: Constraint, root: np.ndarray) -> bool:
    if con.kind != "blocks" or con.g < 2 or len(con.atoms) % con.g:
        return False
    blocks = root[con.atoms].reshape(con.g, -1)
    first = set(blocks[0].tolist())
    return len(first) == blocks.shape[1] and all(set(b.tolist()) == first for b in blocks[1:])
