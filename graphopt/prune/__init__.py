"""Pruning library: structured channel pruning, unstructured and 2:4 sparsity, iterative pruning.

The ``prune`` pass (passes/prune.py) is a thin wrapper over :func:`prune_structured` and
:func:`prune_sparse`; :func:`prune_iterative` runs it over rounds with fine-tuning in between.
Structured pruning follows and slices each layer through its channel rule: a layer type of your
own becomes prunable with ``register_channel_rule(MyLayer, MyRule())`` (see
:class:`ChannelRule`; the same registry as :mod:`graphopt.analysis`).
"""

from __future__ import annotations

from graphopt.analysis.channels import (
    ChannelRule, Relation, channel_rule_for, register_channel_rule, unregister_channel_rule,
)
from graphopt.prune.importance import CRITERIA, channel_scores, default_loss, gradients
from graphopt.prune.iterative import prune_iterative, removed_nothing
from graphopt.prune.sparsity import (
    SparsityResult, find_masked_weights, prune_sparse, sparsity_of, to_semi_structured,
)
from graphopt.prune.structured import (
    PruningPlan, StructuredResult, apply_pruning, masked_reference, plan_pruning, prune_structured,
)

__all__ = [
    "CRITERIA", "channel_scores", "default_loss", "gradients", "prune_iterative", "SparsityResult",
    "find_masked_weights", "prune_sparse", "sparsity_of", "to_semi_structured", "PruningPlan",
    "StructuredResult", "apply_pruning", "masked_reference", "plan_pruning", "prune_structured",
    "removed_nothing", "ChannelRule", "Relation", "register_channel_rule", "unregister_channel_rule",
    "channel_rule_for",
]
