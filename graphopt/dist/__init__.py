"""Distributed training of partitioned graphs on torch.distributed.

- :mod:`graphopt.dist.stages`: split a partitioned graph into pipeline stages; chain them in one
  process across devices (``device_map``).
- :mod:`graphopt.dist.train`: the worker ``torchrun`` starts (pipeline parallel with
  ``torch.distributed.pipelining``, data parallel with DDP, or both).
- :mod:`graphopt.dist.launch`: builds (and runs) the ``torchrun`` command.
"""

from __future__ import annotations

from graphopt.dist.stages import SequentialStages, device_map, partition_plan, split_stages

__all__ = ["SequentialStages", "device_map", "partition_plan", "split_stages"]
