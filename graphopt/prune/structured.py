"""Structured channel pruning: choose channels per group, slice the tensors, build the reference.

:func:`plan_pruning` turns group scores into a removal plan (per-layer ratio, global ranking,
or a MACs target found by bisection on the analysis's MAC model) respecting ``round_to``,
``min_channels``, ``max_ratio`` and the groups' constraints (equal removal per conv group,
whole GroupNorm groups; no producer or split piece emptied). :func:`apply_pruning` slices every
layer through its channel rule (:class:`graphopt.analysis.ChannelRule`: weights, biases, norm
statistics, constructor attributes such as ``in_channels`` or ``num_features``) and rewrites the
graph's own members (broadcast parameters, literal sizes in ``view``/``reshape``/``split``), so
the emitted module has smaller tensors. :func:`masked_reference` is the original with the same
channels masked: the consumers' input channels of removed channels zeroed by their rules (so
removed channels contribute nothing wherever channels mix); the pruned graph must equal it
exactly. :func:`prune_structured` runs the sliced graph on the example inputs: groups whose
slicing breaks it are declined with the error, never returned broken.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from graphopt.analysis.channels import ChannelGraph, ChannelGroup, Member
from graphopt.analysis.channels.rules import replace_tensor

__all__ = ["PruningPlan", "plan_pruning", "apply_pruning", "masked_reference", "copy_graph_module"]

log = logging.getLogger(__name__)


@dataclass
class PruningPlan:
    removed: np.ndarray  # bool, indexed by class root (atom id)
    kept: dict[int, int] = field(default_factory=dict)  # group id -> channels kept
    skipped: dict[int, str] = field(default_factory=dict)  # prunable group id -> why nothing removed
    target: dict[str, Any] = field(default_factory=dict)

    def removed_in(self, group: ChannelGroup) -> int:
        return int(self.removed[group.classes].sum())


class _GroupRule:
    """How many channels a group may lose and which ones, given its constraints."""

    def __init__(self, g: ChannelGroup, cg: ChannelGraph, round_to: int, min_channels: int, max_ratio: float):
        self.g = g
        n = g.size
        self.n = n
        self.pos = {int(c): i for i, c in enumerate(g.classes)}
        self.blocks: list[np.ndarray] | None = None
        self.units: list[np.ndarray] | None = None
        base = 1
        if g.constraints:
            con = max(g.constraints, key=lambda c: c.g)
            idx = np.array([self.pos[int(r)] for r in cg.root[con.atoms]])
            size = n // con.g
            parts = [idx[i * size:(i + 1) * size] for i in range(con.g)]
            if con.kind == "blocks":
                self.blocks, base = parts, con.g
            else:
                self.units, base = parts, size
        step = base
        if round_to > 1:
            lcm = math.lcm(base, round_to)
            if n % lcm == 0 or n >= lcm:
                step = lcm
        self.step = step
        min_keep = max(1, min_channels, n - int(math.floor(n * max_ratio + 1e-9)))
        self.min_keep = min(n, math.ceil(min_keep / step) * step) if step <= n else n
        self._smallest: int | None = None
        self.pieces: list[np.ndarray] = []

    def adjust(self, r: int, never_zero: bool = False) -> int:
        """The nearest allowed removal not above ``r`` (kept channels rounded up). ``never_zero``:
        when that rounds a wanted removal (``r > 0``) down to nothing, the smallest allowed
        removal instead (e.g. one multiple of ``round_to``), if the group can lose any."""
        got = self._adjust(r)
        if got == 0 and r > 0 and never_zero:
            if self._smallest is None:
                self._smallest = next((a for a in (self._adjust(x) for x in range(r + 1, self.n + 1)) if a > 0), 0)
            return self._smallest
        return got

    def _adjust(self, r: int) -> int:
        n, step = self.n, self.step
        k = n - max(0, min(r, n))
        k = max(k, self.min_keep)
        if self.units is not None:
            u = len(self.units[0])
            k = math.ceil(k / u) * u
        if step > 1 and k < n:
            k = math.ceil(k / step) * step
            if self.blocks is not None and k % len(self.blocks):
                k = math.ceil(k / len(self.blocks)) * len(self.blocks)
        return max(0, n - min(k, n))

    def choose(self, scores: np.ndarray, r: int) -> np.ndarray:
        """Local indices (into the group's classes) of the ``r`` channels to remove."""
        if r <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.blocks is not None:
            per = r // len(self.blocks)
            out = [b[np.argsort(scores[b], kind="stable")[:per]] for b in self.blocks]
            return np.concatenate(out)
        if self.units is not None:
            u = len(self.units[0])
            us = np.array([scores[x].sum() for x in self.units])
            order = np.argsort(us, kind="stable")[: r // u]
            return np.concatenate([self.units[i] for i in order]) if len(order) else np.zeros(0, dtype=np.int64)
        return self._keep_pieces(scores, np.argsort(scores, kind="stable")[:r])

    def _keep_pieces(self, scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Every piece (a producer's channels, a split's piece) keeps a channel: a layer or a split
        piece with none left is not a valid graph. An emptied piece keeps its best channel; the
        lowest-scored channel whose piece can spare it goes instead (same count)."""
        if not self.pieces or not len(idx):
            return idx
        gone = np.zeros(self.n, dtype=bool)
        gone[idx] = True
        for piece in self.pieces:
            if not gone[piece].all():
                continue
            gone[piece[np.argmax(scores[piece])]] = False
            for c in np.argsort(scores, kind="stable"):
                if gone[c]:
                    continue
                gone[c] = True
                if any(gone[p].all() for p in self.pieces if c in p):
                    gone[c] = False
                    continue
                break
        return np.nonzero(gone)[0]


def _add_pieces(rules: dict[int, "_GroupRule"], cg: ChannelGraph, groups: list[ChannelGroup]) -> None:
    """Tell each group's rule which channel sets must not be emptied (producers, split pieces)."""
    group_of = {int(c): g.id for g in groups for c in g.classes}
    for m in cg.members:
        if m.kind == "out":
            parts = [m.atoms]
        elif m.kind == "split":
            bounds = np.cumsum([0] + list(m.extra["sizes"]))
            parts = [m.atoms[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            continue
        for atoms in parts:
            roots = cg.root[atoms]
            gid = group_of.get(int(roots[0])) if len(roots) else None
            if gid is None or any(group_of.get(int(r)) != gid for r in roots):
                continue
            rule = rules[gid]
            piece = np.unique([rule.pos[int(r)] for r in roots])
            if len(piece) < rule.n:
                rule.pieces.append(piece)


def plan_pruning(cg: ChannelGraph, scores: dict[int, np.ndarray], groups: list[ChannelGroup], *,
                 ratio: float, macs: float | None = None, scope: str = "per_layer", round_to: int = 1,
                 min_channels: int = 1, max_ratio: float = 0.9) -> PruningPlan:
    """Choose the channels to remove from ``groups`` (the prunable, not ignored ones).

    ``ratio``: per_layer = share of each group's channels; global = share of all their
    channels, ranked by score normalized by each group's mean. ``macs``: keep this share of
    the graph's MACs instead (bisection on the ratio or the global threshold).
    """
    n_atoms = len(cg.root)
    rules = {g.id: _GroupRule(g, cg, round_to, min_channels, max_ratio) for g in groups}
    _add_pieces(rules, cg, groups)
    norm = {}
    for g in groups:
        s = scores[g.id]
        m = float(s.mean()) if len(s) else 0.0
        norm[g.id] = s / m if m > 0 else s

    def build_ratio(r: float, never_zero: bool = False) -> tuple[np.ndarray, dict[int, int]]:
        removed = np.zeros(n_atoms, dtype=bool)
        counts = {}
        for g in groups:
            rule = rules[g.id]
            k = rule.adjust(int(math.floor(g.size * r + 1e-9)), never_zero)
            idx = rule.choose(scores[g.id], k)
            removed[g.classes[idx]] = True
            counts[g.id] = len(idx)
        return removed, counts

    def build_threshold(t: float) -> tuple[np.ndarray, dict[int, int]]:
        removed = np.zeros(n_atoms, dtype=bool)
        counts = {}
        for g in groups:
            rule = rules[g.id]
            k = rule.adjust(int((norm[g.id] < t).sum()))
            idx = rule.choose(scores[g.id], k)
            removed[g.classes[idx]] = True
            counts[g.id] = len(idx)
        return removed, counts

    total = sum(g.size for g in groups)
    target: dict[str, Any] = {"scope": scope}
    if macs is None:
        if scope == "per_layer":  # a ratio > 0 removes something from every group that can lose channels
            removed, counts = build_ratio(ratio, never_zero=True)
        else:
            want = ratio * total
            hi = max((float(v.max()) for v in norm.values() if len(v)), default=0.0) + 1.0
            lo = 0.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if sum(build_threshold(mid)[1].values()) >= want:
                    hi = mid
                else:
                    lo = mid
            removed, counts = build_threshold(hi)
            if sum(counts.values()) > want * 1.02 + 8:  # overshoot from rounding: take the lower side
                alt = build_threshold(lo)
                if sum(alt[1].values()) > 0:
                    removed, counts = alt
        target.update(ratio=ratio)
    else:
        goal = macs * cg.total_macs
        build = build_ratio if scope == "per_layer" else build_threshold
        if scope == "per_layer":
            lo, hi = 0.0, max_ratio
        else:
            lo, hi = 0.0, max((float(v.max()) for v in norm.values() if len(v)), default=0.0) + 1.0
        best = build(hi)
        if cg.predicted_macs(best[0]) > goal:
            removed, counts = best
            target["reached"] = False
        else:
            for _ in range(50):
                mid = (lo + hi) / 2
                cand = build(mid)
                if cg.predicted_macs(cand[0]) <= goal:
                    hi, best = mid, cand
                else:
                    lo = mid
            removed, counts = best
            target["reached"] = True
        target.update(macs=macs, goal_macs=int(goal))
    target["predicted_macs"] = int(cg.predicted_macs(removed))
    plan = PruningPlan(removed, target=target)
    for g in groups:
        plan.kept[g.id] = g.size - counts[g.id]
        if counts[g.id] == 0:
            rule = rules[g.id]
            plan.skipped[g.id] = (f"nothing to remove after rounding (size {g.size}, minimum kept "
                                  f"{rule.min_keep}, step {rule.step})" if scope == "per_layer" or macs is None
                                  else "all its channels rank above the global threshold")
    return plan


# ----------------------------------------------------------------------------- slicing


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy without the graph-level metadata (inputs, calibration data, costs)."""
    meta = gm.meta.pop("graphopt", None)
    try:
        new = copy.deepcopy(gm)
    finally:
        if meta is not None:
            gm.meta["graphopt"] = meta
    return new


def _owner(gm: fx.GraphModule, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), leaf


def _idx(keep: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(keep, dtype=torch.long)


def _cols(keep: np.ndarray, inner: int) -> np.ndarray:
    """Channel positions -> feature positions when each channel is ``inner`` consecutive features."""
    return keep if inner == 1 else (keep[:, None] * inner + np.arange(inner)[None, :]).reshape(-1)


# graph members (no layer rule): what a removal rewrites in the graph itself

def _slice_param(gm: fx.GraphModule, nodes: dict[str, fx.Node], m: Member, keep: np.ndarray) -> None:
    owner, leaf = _owner(gm, m.target)
    replace_tensor(owner, leaf, getattr(owner, leaf).detach().index_select(m.axis, _idx(keep)))


def _slice_bn_f(gm: fx.GraphModule, nodes: dict[str, fx.Node], m: Member, keep: np.ndarray) -> None:
    for path in m.extra["targets"].values():
        owner, leaf = _owner(gm, path)
        replace_tensor(owner, leaf, getattr(owner, leaf).detach()[_idx(keep)])


def _rewrite_reshape(gm: fx.GraphModule, nodes: dict[str, fx.Node], m: Member, keep: np.ndarray) -> None:
    node = nodes[m.node]
    new_size = len(keep) * m.inner // m.extra.get("per", 1)  # per: features per head (a head-count literal)
    args = list(node.args)
    if m.extra["kind"] == "method" and not (len(args) == 2 and isinstance(args[1], (list, tuple))):
        args[1 + m.axis] = new_size
    else:
        sizes = list(args[1])
        sizes[m.axis] = new_size
        args[1] = type(args[1])(sizes)
    node.args = tuple(args)


def _rewrite_split(gm: fx.GraphModule, nodes: dict[str, fx.Node], m: Member, keep: np.ndarray) -> None:
    node = nodes[m.node]
    sizes, start, new = m.extra["sizes"], 0, []
    for s in sizes:
        new.append(int(((keep >= start) & (keep < start + s)).sum()))
        start += s
    if m.extra.get("equal"):  # split(size): one piece size, equal removal per piece (a group constraint)
        if len(set(new)) != 1:
            raise RuntimeError(f"uneven removal across the pieces of split node {m.node}: {new}")
        new = new[0]
    if len(node.args) > 1:
        args = list(node.args)
        args[1] = new
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs["split_size_or_sections" if node.op == "call_function" else "split_size"] = new
        node.kwargs = kwargs


def _rewrite_norm_shape(gm: fx.GraphModule, nodes: dict[str, fx.Node], m: Member, keep: np.ndarray) -> None:
    """``F.layer_norm(x, (C,), ...)`` (or ``aten.layer_norm``) over the hidden width: ``normalized_shape``
    becomes ``(kept,)``."""
    node = nodes[m.node]
    if len(node.args) > 1:
        args = list(node.args)
        args[1] = type(args[1])([len(keep)]) if isinstance(args[1], (list, tuple)) else (len(keep),)
        node.args = tuple(args)
    else:
        old = node.kwargs["normalized_shape"]
        node.kwargs = {**node.kwargs, "normalized_shape": type(old)([len(keep)]) if isinstance(old, (list, tuple))
                       else (len(keep),)}


_GRAPH_MEMBERS = {"param": _slice_param, "bn_f": _slice_bn_f, "reshape": _rewrite_reshape, "split": _rewrite_split,
                  "norm_shape": _rewrite_norm_shape}


def apply_pruning(gm: fx.GraphModule, cg: ChannelGraph, removed: np.ndarray) -> dict[str, Any]:
    """Slice ``gm`` in place to drop the removed classes; returns counts of what changed.

    Layers are sliced by their channel rules (:class:`graphopt.analysis.ChannelRule`), given the
    kept output/input positions; graph members (sliced parameters, literal sizes) are rewritten here.
    """
    keep_of = {id(m): cg.keep_positions(m.atoms, removed) for m in cg.members}
    tied = _tied_tensors(gm)
    layers: dict[str, dict[str, Member]] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    sliced = 0
    for m in cg.members:
        if m.rule is not None:
            layers.setdefault(m.target, {})[m.kind] = m
        elif len(keep_of[id(m)]) != len(m.atoms):
            _GRAPH_MEMBERS[m.kind](gm, nodes, m, keep_of[id(m)])
            sliced += 1
    for target, roles in layers.items():
        if not any(len(keep_of[id(m)]) != len(m.atoms) for m in roles.values()):
            continue
        sliced += 1
        mod = gm.get_submodule(target)
        rule = next(iter(roles.values())).rule
        keep = {k: _cols(keep_of[id(m)], m.inner) for k, m in roles.items()}
        if "coupled" in keep:
            rule.prune(mod, keep["coupled"], keep["coupled"])
        else:
            rule.prune(mod, keep.get("out"), keep.get("in"))
    _retie(gm, tied)
    gm.recompile()
    return {"tensors_sliced": sliced}


def _tie_conflicts(gm: fx.GraphModule, cg: ChannelGraph, groups: list[ChannelGroup]) -> dict[int, str]:
    """Groups that would slice a tied parameter (an embedding shared with the LM head or between an
    encoder and a decoder) where another of its users is not sliced the same way: group id -> reason."""
    tied = _tied_tensors(gm)
    if not tied:
        return {}
    by_class = cg.group_of_class()
    wanted = {g.id for g in groups}
    sliced: dict[str, set[tuple[int, int]]] = {}  # parameter path -> {(group id, axis)}
    for m in cg.members:
        if m.kind == "param":
            params = {m.target: m.axis}
        elif m.rule is not None:
            mod = gm.get_submodule(m.target)
            ps = m.rule.in_params(mod) if m.kind == "in" else m.rule.out_params(mod)
            params = {f"{m.target}.{k}": a for k, a in m.rule._present(mod, ps).items()}
        else:
            continue
        gids = {by_class[int(r)].id for r in np.unique(cg.root[m.atoms]) if int(r) in by_class}
        for path, axis in params.items():
            for gid in gids:
                sliced.setdefault(path, set()).add((gid, axis))
    out: dict[int, str] = {}
    for names in tied:
        uses = [sliced.get(n, set()) for n in names]
        for gid in {gid for u in uses for gid, _ in u} & wanted:
            axes = [{a for g_, a in u if g_ == gid} for u in uses]
            if any(len(a) != 1 for a in axes) or len({next(iter(a)) for a in axes}) != 1:
                out[gid] = (f"tied weights {', '.join(names)}: this group slices "
                            + ", ".join(n for n, a in zip(names, axes) if a)
                            + " but not " + (", ".join(n for n, a in zip(names, axes) if not a) or "on one axis")
                            + " (one parameter shared by layers in different channel groups); not pruned")
    return out


def _tied_tensors(gm: fx.GraphModule) -> list[list[str]]:
    """Paths of parameters shared by several modules (an embedding tied to the LM head)."""
    users: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        users.setdefault(id(p), []).append(name)
    return [names for names in users.values() if len(names) > 1]


def _retie(gm: fx.GraphModule, tied: list[list[str]]) -> None:
    """Tied parameters sliced alike are one parameter again; sliced differently, an error (the group
    is then declined with it): a tie is never silently broken."""
    for names in tied:
        tensors = [gm.get_parameter(n) for n in names]
        if all(t is tensors[0] for t in tensors):
            continue
        first = tensors[0]
        if any(t.shape != first.shape or not torch.equal(t.detach(), first.detach()) for t in tensors[1:]):
            raise RuntimeError(f"tied weights {', '.join(names)} would be sliced differently "
                               f"({', '.join(str(tuple(t.shape)) for t in tensors)}); the tie cannot be kept")
        for n in names[1:]:
            owner, leaf = _owner(gm, n)
            setattr(owner, leaf, first)


def masked_reference(gm: fx.GraphModule, cg: ChannelGraph, removed: np.ndarray) -> fx.GraphModule:
    """A copy of the unpruned ``gm`` in which removed channels contribute nothing: every layer that
    reads them as input channels has them masked (its rule's ``mask_in_channels``: weight columns
    zero). The pruned model must equal it."""
    return _mask_inputs(copy_graph_module(gm), cg, removed)


def _mask_inputs(ref: fx.GraphModule, cg: ChannelGraph, removed: np.ndarray) -> fx.GraphModule:
    with torch.no_grad():
        for m in cg.members:
            if m.kind != "in" or m.rule is None:
                continue
            gone = np.nonzero(removed[cg.root[m.atoms]])[0]
            if len(gone):
                m.rule.mask_in_channels(ref.get_submodule(m.target), _cols(gone, m.inner))
    return ref


# ----------------------------------------------------------------------------- driver


def renamed_exclude(exclude: list[str] | None, ignore: list[str] | None, where: str) -> list[str] | None:
    """``ignore`` is the old name of ``exclude``: accepted, merged, and logged as renamed."""
    if ignore is None:
        return exclude
    log.warning("%s: option 'ignore' was renamed to 'exclude'; 'ignore' still works but will go", where)
    return list(exclude or []) + list(ignore)


@dataclass
class StructuredResult:
    """What :func:`prune_structured` did: the plan, the groups, the masked reference."""

    gm: fx.GraphModule
    reference: fx.GraphModule | None
    analysis: ChannelGraph
    plan: PruningPlan | None
    pruned: list[tuple[ChannelGroup, int, int]]  # group, before, after
    declined: list[tuple[str, str]]  # target, reason
    notes: dict[str, Any]


def prune_structured(gm: fx.GraphModule, *, ratio: float = 0.5, macs: float | None = None,
                     criterion: str = "l1", scope: str = "per_layer", round_to: int = 1,
                     min_channels: int = 1, max_ratio: float = 0.9, exclude: list[str] | None = None,
                     batches: list[tuple[torch.Tensor, ...]] | None = None,
                     loss_fn: Any = None, ignore: list[str] | None = None, hidden: bool = False,
                     sequential: bool = False) -> StructuredResult:
    """Prune channel groups of ``gm`` in place (see the module docstring).

    ``exclude``: globs of module paths whose *output* channels are kept (groups with an excluded
    producer or coupled layer are not pruned; ``ignore`` is its old name, still accepted).
    ``batches``: input batches for ``taylor`` and ``reconstruction`` (data-aware selection,
    :mod:`graphopt.prune.selection`). ``hidden``: also prune the hidden width of transformers
    (embeddings, residual adds, LayerNorm/RMSNorm over the channels sliced; approximate: the norms'
    statistics are then over the kept channels, so the result has no exact masked reference).
    """
    from graphopt.analysis.channels import analyze_channels
    from graphopt.ir import name_matches
    from graphopt.prune.importance import channel_scores, gradients

    exclude = renamed_exclude(exclude, ignore, "prune_structured")
    cg = analyze_channels(gm, hidden=hidden)
    declined: list[tuple[str, str]] = []
    candidates: list[ChannelGroup] = []
    for g in cg.groups:
        if not g.prunable:
            declined.append((g.name, "not prunable: " + "; ".join(g.blocked[:3])
                             + (f" (+{len(g.blocked) - 3} more reasons)" if len(g.blocked) > 3 else "")))
        elif any(name_matches(p, exclude) for p in g.producers + g.modules):
            declined.append((g.name, "excluded by the 'exclude' option (formerly 'ignore')"))
        elif g.size <= 1:
            declined.append((g.name, "a single channel"))
        else:
            candidates.append(g)
    ties = _tie_conflicts(gm, cg, candidates)
    for g in [g for g in candidates if g.id in ties]:
        candidates.remove(g)
        declined.append((g.name, ties[g.id]))
    notes: dict[str, Any] = {"mode": "structured", "criterion": criterion, "scope": scope,
                             **cg.summary(), "candidate_groups": len(candidates)}
    if not candidates:
        return StructuredResult(gm, None, cg, None, [], declined, notes)
    grads = None
    if criterion == "taylor":
        grads = gradients(gm, batches or [], loss_fn)
    if criterion == "reconstruction":
        from graphopt.prune.selection import reconstruction_scores

        limit = None
        choose = None
        l1 = None
        if sequential:
            if scope != "per_layer":
                raise ValueError("sequential selection needs scope=per_layer (its per-group counts do not "
                                 "depend on the scores)")
            # the counts of a per-layer plan do not depend on the scores: plan once on l1 for them
            l1, _ = channel_scores(gm, cg, "l1")
            probe = plan_pruning(cg, l1, candidates, ratio=ratio, macs=macs, scope=scope, round_to=round_to,
                                 min_channels=min_channels, max_ratio=max_ratio)
            counts = {g.id: g.size - probe.kept.get(g.id, g.size) for g in candidates}
            rules = {g.id: _GroupRule(g, cg, round_to, min_channels, max_ratio) for g in candidates}
            _add_pieces(rules, cg, candidates)

            def choose(gid: int, sc: np.ndarray) -> np.ndarray:
                return rules[gid].choose(sc, counts[gid])

            limit = {gid: n for gid, n in counts.items() if rules[gid].blocks is None}
            notes["sequential"] = True
        elif scope == "per_layer":  # the plan removes at most this many per group: the greedy stops there
            limit = {}
            for g in candidates:
                rule = _GroupRule(g, cg, round_to, min_channels, max_ratio)
                if rule.blocks is None:  # blocks choose per block: rank the whole group
                    limit[g.id] = rule.adjust(int(math.floor(g.size * (ratio if macs is None else max_ratio) + 1e-9)),
                                              True)
        scores, unscored = reconstruction_scores(gm, cg, candidates, batches or [], limit=limit,
                                                 sequential=choose, notes=notes)
        if unscored:
            if l1 is None:
                l1, _ = channel_scores(gm, cg, "l1")
            scores.update({gid: l1[gid] for gid in unscored})
            notes["reconstruction_fallback_l1"] = [g.name for g in candidates if g.id in unscored]
        fallback = []
    else:
        scores, fallback = channel_scores(gm, cg, criterion, grads)
    if fallback:
        notes["bn_scale_fallback_l1"] = [g.name for g in cg.groups if g.id in fallback and g in candidates]
    plan = plan_pruning(cg, scores, candidates, ratio=ratio, macs=macs, scope=scope, round_to=round_to,
                        min_channels=min_channels, max_ratio=max_ratio)
    notes["target"] = plan.target
    pruned: list[tuple[ChannelGroup, int, int]] = []
    for g in candidates:
        if g.id in plan.skipped:
            declined.append((g.name, plan.skipped[g.id]))
        else:
            pruned.append((g, g.size, plan.kept[g.id]))
    if not pruned:
        return StructuredResult(gm, None, cg, plan, [], declined, notes)
    gm, reference, pruned = _apply_checked(gm, cg, plan, pruned, declined, notes)
    if not pruned:
        return StructuredResult(gm, None, cg, plan, [], declined, notes)
    approx = [g for g, _, _ in pruned if g.approximate]
    if approx:  # a norm over kept channels: no masked original equals the result
        reference = None
        notes["hidden_width"] = [{"group": g.name, "approximate": g.approximate[:3]
                                  + ([f"(+{len(g.approximate) - 3} more)"] if len(g.approximate) > 3 else [])}
                                 for g in approx]
    notes["channels_before"] = int(sum(b for _, b, _ in pruned))
    notes["channels_after"] = int(sum(a for _, _, a in pruned))
    return StructuredResult(gm, reference, cg, plan, pruned, declined, notes)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _sliced_and_runs(gm: fx.GraphModule, cg: ChannelGraph, removed: np.ndarray,
                     inputs: tuple[torch.Tensor, ...], notes: dict[str, Any] | None = None) -> str | None:
    """Slice ``gm`` in place and run it on ``inputs`` (eval mode, no gradients): None if that
    worked, else the error in one line (the graph is then unusable)."""
    try:
        counts = apply_pruning(gm, cg, removed)
    except Exception as exc:  # a rule that cannot slice what the analysis asked for
        return _error(exc)
    if notes is not None:
        notes.update(counts)
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(*inputs)
    except Exception as exc:  # any failure means the slicing broke the graph
        return _error(exc)
    finally:
        gm.train(was)
    return None


def _apply_checked(gm: fx.GraphModule, cg: ChannelGraph, plan: PruningPlan,
                   pruned: list[tuple[ChannelGroup, int, int]], declined: list[tuple[str, str]],
                   notes: dict[str, Any]) -> tuple[fx.GraphModule, fx.GraphModule | None, list]:
    """Slice ``gm``; with example inputs, check that it still runs. If it does not (a channel rule
    that slices wrongly), find the groups whose slicing breaks it, decline them with the error and
    prune the others: never an invalid graph. Returns the graph, the masked reference and the
    groups really pruned."""
    inputs = gm.meta.get("graphopt", {}).get("example_inputs")
    if inputs is None:  # nothing to run it on: slice and trust the rules
        reference = masked_reference(gm, cg, plan.removed)
        notes.update(apply_pruning(gm, cg, plan.removed))
        return gm, reference, pruned
    inputs = tuple(inputs)
    backup = copy_graph_module(gm)
    err = _sliced_and_runs(gm, cg, plan.removed, inputs, notes)
    if err is None:  # the unpruned copy is no longer needed as a backup: it becomes the reference
        return gm, _mask_inputs(backup, cg, plan.removed), pruned
    log.warning("structured pruning gave a graph that does not run (%s); finding the groups responsible", err)
    backup.meta["graphopt"] = gm.meta.get("graphopt", {})
    good, removed = [], np.zeros_like(plan.removed)
    for g, before, after in pruned:
        only = np.zeros_like(plan.removed)
        only[g.classes] = plan.removed[g.classes]
        why = _sliced_and_runs(copy_graph_module(backup), cg, only, inputs)
        if why is None:
            good.append((g, before, after))
            removed |= only
        else:
            declined.append((g.name, f"slicing it gives a graph that does not run ({why}); not pruned "
                                     "(a channel rule slices this layer wrongly: please report it)"))
    if not good:
        return backup, None, []
    result = copy_graph_module(backup)
    result.meta["graphopt"] = backup.meta["graphopt"]
    reference = masked_reference(backup, cg, removed)
    why = _sliced_and_runs(result, cg, removed, inputs, notes)
    if why is not None:  # groups that run alone but not together: keep the graph whole
        declined.extend((g.name, f"pruned together with the other groups the graph does not run ({why})")
                        for g, _, _ in good)
        return backup, None, []
    plan.removed = removed
    return result, reference, good
