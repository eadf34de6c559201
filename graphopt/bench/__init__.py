"""Benchmark and training harness: timing, memory, training loops, datasets, sweeps, reports, plots.

    from graphopt.bench import compare, fit, TrainConfig
    res = compare({"original": model, "rewritten": gm}, inputs, steps=30)   # -> BenchResult
    res.speedup("rewritten"), res.speedup_interval("rewritten")   # paired rounds: the engine of auto
    run = fit(model, (train_ds, test_ds), TrainConfig(epochs=10, schedule="cosine"))  # -> TrainResult
"""

from __future__ import annotations

from graphopt.bench.backend import TrainBackend, backend_names, create_backend, register_backend
from graphopt.bench.compare import BenchResult, VariantResult, compare, synthetic_target
from graphopt.bench.data import BUILTIN as DATASETS
from graphopt.bench.data import Batches, DataSplits, adapt, load_builtin
from graphopt.bench.depth import DepthChange, change_depth, find_blocks
from graphopt.bench.measure import (Comparison, MemoryProbe, StepMeasurer, StepTimer, environment, measure_peak_flops,
                                    paired_rounds, thread_settings)
from graphopt.bench.schedules import SCHEDULES, Schedule, lr_schedule
from graphopt.bench.sweep import SweepResult, sweep_batch_size, sweep_depth
from graphopt.bench.torch_backend import OPTIMIZERS, TorchBackend
from graphopt.bench.train import EarlyStopping, EpochRecord, TrainConfig, Trainer, TrainResult, fit, fit_many

__all__ = [
    "TrainBackend", "TorchBackend", "backend_names", "register_backend", "create_backend", "OPTIMIZERS",
    "TrainConfig", "TrainResult", "EpochRecord", "EarlyStopping", "Trainer", "fit", "fit_many",
    "SCHEDULES", "Schedule", "lr_schedule",
    "DATASETS", "load_builtin", "adapt", "Batches", "DataSplits",
    "compare", "BenchResult", "VariantResult", "synthetic_target",
    "MemoryProbe", "StepTimer", "environment", "measure_peak_flops", "thread_settings",
    "paired_rounds", "StepMeasurer", "Comparison",
    "change_depth", "find_blocks", "DepthChange", "sweep_depth", "sweep_batch_size", "SweepResult",
]
