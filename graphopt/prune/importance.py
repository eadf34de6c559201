"""Importance criteria for pruning: magnitude (L1, L2), BatchNorm scale, first-order Taylor.

Channel scores aggregate over every member of a channel group (producer rows, consumer
columns, norm parameters, sliced parameters), as in DepGraph/Torch-Pruning's group importance:
a channel that is small where it is made but large where it is read is not unimportant.

- ``l1``: sum of ``|w|``; ``l2``: sum of ``w**2`` over the channel's slices;
- ``bn_scale``: ``|gamma|`` of the BatchNorm/GroupNorm in the group (network slimming); groups
  without a norm fall back to ``l1`` (reported);
- ``taylor``: sum of ``|w * dL/dw|`` with gradients accumulated over a few batches (Molchanov
  et al. 2019, first order). Without labels the loss is the cross-entropy against the model's
  own predictions for 2-D outputs (logits), else the mean squared output.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from graphopt.analysis.channels import ChannelGraph, Member
from graphopt.ir import eval_mode

__all__ = ["CRITERIA", "gradients", "default_loss", "channel_scores", "element_scores"]

log = logging.getLogger(__name__)
CRITERIA = ("l1", "l2", "bn_scale", "taylor")


def default_loss(output: Any) -> torch.Tensor:
    """A label-free loss for Taylor importance (see the module docstring)."""
    flat, _ = tree_flatten(output)
    outs = [o for o in flat if isinstance(o, torch.Tensor) and o.is_floating_point()]
    if len(outs) == 1 and outs[0].dim() == 2 and outs[0].shape[1] > 1:
        logits = outs[0]
        return nn.functional.cross_entropy(logits, logits.detach().argmax(1))
    return sum(o.float().pow(2).mean() for o in outs)


def gradients(gm: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
              loss_fn: Callable[[Any], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Parameter gradients summed over ``batches`` (eval mode: BatchNorm statistics untouched)."""
    loss_fn = loss_fn or default_loss
    params = dict(gm.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    with eval_mode(gm):
        for batch in batches:
            gm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(gm(*batch))
                loss.backward()
            for k, p in params.items():
                if p.grad is not None:
                    grads[k] += p.grad.detach()
        gm.zero_grad(set_to_none=True)
    return grads


def element_scores(criterion: str, grads: dict[str, torch.Tensor] | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """``f(name, tensor) -> elementwise score`` for the criterion."""
    def score(name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().float()
        if criterion == "l2":
            return t.pow(2)
        if criterion == "taylor":
            g = (grads or {}).get(name)
            return (t * g.float()).abs() if g is not None else torch.zeros_like(t)
        return t.abs()

    return score


def _param(gm: fx.GraphModule, path: str) -> torch.Tensor | None:
    try:
        return gm.get_parameter(path)
    except AttributeError:
        try:
            return gm.get_buffer(path)
        except AttributeError:
            return None


def _member_scores(gm: fx.GraphModule, m: Member, score: Callable[[str, torch.Tensor], torch.Tensor],
                   norms_only: bool) -> np.ndarray | None:
    """Score per position of the member's sliced axis, or None if it carries no weights.

    Layers score through their channel rule (:meth:`graphopt.analysis.ChannelRule.score`)."""
    n = len(m.atoms)
    if m.rule is not None:
        s = m.rule.score(gm.get_submodule(m.target), m.kind, score, f"{m.target}.", norms_only)
        if s is None:
            return None
        return s.detach().reshape(n, -1).sum(1).numpy().astype(np.float64)  # features -> channels
    if m.kind == "bn_f":
        w_target = m.extra.get("weight")
        t = _param(gm, w_target) if w_target else None
        return None if t is None else score(w_target, t).numpy().astype(np.float64)
    if m.kind == "param" and not norms_only:
        t = _param(gm, m.target)
        if t is None or not t.is_floating_point():
            return None
        s = score(m.target, t).movedim(m.axis, 0)
        return s.reshape(s.shape[0], -1).sum(1).numpy().astype(np.float64)
    return None


def channel_scores(gm: fx.GraphModule, cg: ChannelGraph, criterion: str,
                   grads: dict[str, torch.Tensor] | None = None) -> tuple[dict[int, np.ndarray], list[int]]:
    """Per group id: a score per channel (in the group's class order). Also the ids of groups
    that fell back from ``bn_scale`` to ``l1`` (no norm layer)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}")
    cls_pos: dict[int, tuple[int, int]] = {}
    for g in cg.groups:
        for i, c in enumerate(g.classes):
            cls_pos[int(c)] = (g.id, i)
    scores = {g.id: np.zeros(g.size) for g in cg.groups}
    has_norm: set[int] = set()
    fn = element_scores("l1" if criterion == "bn_scale" else criterion, grads)
    for norms_only in ((True, False) if criterion == "bn_scale" else (False,)):
        for m in cg.members:
            s = _member_scores(gm, m, fn, norms_only)
            if s is None:
                continue
            roots = cg.root[m.atoms]
            for pos, r in enumerate(roots):
                gi = cls_pos.get(int(r))
                if gi is None:
                    continue
                if norms_only:
                    has_norm.add(gi[0])
                elif criterion == "bn_scale" and gi[0] in has_norm:
                    continue
                scores[gi[0]][gi[1]] += s[pos]
    fallback = [g.id for g in cg.groups if criterion == "bn_scale" and g.id not in has_norm]
    return scores, fallback
