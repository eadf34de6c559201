"""Pruning library: structured channel pruning, unstructured and 2:4 sparsity, iterative pruning.

The ``prune`` pass (passes/prune.py) is a thin wrapper over :func:`prune_structured` and
:func:`prune_sparse`; :func:`prune_iterative` runs it over rounds with fine-tuning in between.
"""

from __future__ import annotations

from graphopt.prune.importance import CRITERIA, channel_scores, default_loss, gradients
from graphopt.prune.iterative import prune_iterative
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
]
