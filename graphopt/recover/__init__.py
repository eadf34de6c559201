"""Recovering accuracy after approximate rewrites.

- :mod:`graphopt.recover.reconstruct`: data-aware reconstruction on calibration batches
  (least-squares refit after structured pruning, alternating least squares for depthwise-separable
  convs, SparseGPT for 2:4 / unstructured sparsity).
- :mod:`graphopt.recover.distill`: distillation from the original (KL on logits with temperature,
  optional feature matching) in the training harness.
- :mod:`graphopt.recover.early_bird`: early-bird tickets, pruning during training for training speed.
"""

from __future__ import annotations

from graphopt.recover.distill import DistillConfig, DistillError, Distilled, check_teacher, distill_fit, kd_loss
from graphopt.recover.early_bird import EarlyBird, channel_mask, early_bird_fit, mask_distance
from graphopt.recover.reconstruct import (LayerFit, reconstruct_separable, reconstruct_structured, refine_outputs,
                                          require_data, sparsegpt, sparsegpt_layer)

__all__ = ["DistillConfig", "DistillError", "Distilled", "check_teacher", "distill_fit", "kd_loss",
           "EarlyBird", "channel_mask", "early_bird_fit", "mask_distance", "LayerFit", "reconstruct_separable",
           "reconstruct_structured", "refine_outputs", "require_data", "sparsegpt", "sparsegpt_layer"]
