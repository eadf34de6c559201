"""Sweeps from practice: model depth and batch size, each variant trained on the same data.

- :func:`sweep_depth`: variants with ``delta`` shape-preserving blocks removed or repeated per
  stage (:func:`graphopt.bench.depth.change_depth`, a graph rewrite), ``delta = 0`` the
  captured original.
- :func:`sweep_batch_size`: the same model trained with each batch size; the learning rate
  follows ``lr_scaling`` (``linear``: ``lr * b / base``, the rule of Goyal et al.; ``sqrt``;
  ``none``) relative to ``config.batch_size``.

Variants are trained interleaved epoch by epoch (:func:`graphopt.bench.train.fit_many`).
The best variant: with a target accuracy, the one that reached it in the least training time;
otherwise (or if none reached it) the highest final test accuracy, ties to the faster one. When
every variant's final test accuracy is at chance level (within three binomial standard errors of
the majority-class share of the test set, or 0.01), there is no best variant: the criterion says
so instead of crowning noise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from graphopt.bench.depth import change_depth, find_blocks, stages
from graphopt.bench.measure import environment, thread_settings
from graphopt.bench.train import TrainConfig, TrainResult, fit_many
from graphopt.capture import capture
from graphopt.errors import GraphoptError
from graphopt.ir import graph_meta
from graphopt.serialize import dumps

__all__ = ["SweepResult", "sweep_depth", "sweep_batch_size", "pick_best", "chance_level"]


@dataclass
class SweepResult:
    kind: str
    results: dict[str, TrainResult]
    rows: list[dict[str, Any]]
    best: str | None
    criterion: str
    config: dict[str, Any]
    env: dict[str, Any]
    target_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": f"sweep_{self.kind}", "best": self.best, "criterion": self.criterion,
                "target_accuracy": self.target_accuracy, "config": self.config, "env": self.env, "rows": self.rows,
                "runs": {k: r.as_dict() for k, r in self.results.items()}, **({"extra": self.extra} if self.extra else {})}

    def to_json(self) -> str:
        return dumps(self.as_dict())


def chance_level(data: Any) -> tuple[float, int] | None:
    """(accuracy of always predicting the test set's most frequent class, test set size), or None
    when the targets are not class labels."""
    from graphopt.bench.data import as_tensors

    try:
        test = data[1]
        y = as_tensors(test)[-1]
    except Exception:  # not a (train, test) pair of datasets with targets
        return None
    if y.dim() != 1 or y.is_floating_point() or y.numel() == 0:
        return None
    counts = torch.bincount(y.long().clamp(min=0))
    return float(counts.max().item()) / y.numel(), int(y.numel())


def at_chance(accuracy: float, chance: float, n: int) -> bool:
    """Within three binomial standard errors of chance (or 0.01), i.e. indistinguishable from guessing."""
    margin = max(3 * math.sqrt(chance * (1 - chance) / max(n, 1)), 0.01)
    return accuracy <= chance + margin


def pick_best(results: dict[str, TrainResult], target: float | None,
              chance: tuple[float, int] | None = None) -> tuple[str | None, str]:
    """(name, criterion) of the best variant (see the module docstring); ``chance``: the result
    of :func:`chance_level` for the test set."""
    if not results:
        return None, "no variants"
    accs = [r.final.get("test_accuracy") for r in results.values()]
    if chance is not None and accs and all(a is not None and at_chance(a, *chance) for a in accs):
        return None, (f"every variant is at chance accuracy ({min(accs):.3f}-{max(accs):.3f} vs "
                      f"{chance[0]:.3f} for always predicting the most frequent class, {chance[1]} test samples); "
                      "train longer, raise the learning rate or check the data")
    if target is not None:
        hit = {k: r for k, r in results.items() if r.time_to_target_s is not None}
        if hit:
            best = min(hit, key=lambda k: hit[k].time_to_target_s)  # type: ignore[arg-type, return-value]
            return best, f"least training time to {target:.3f} test accuracy"
    scored = {k: r for k, r in results.items() if r.final.get("test_accuracy") is not None}
    if not scored:
        best = min(results, key=lambda k: results[k].final.get("test_loss", math.inf))
        return best, "lowest final test loss"
    best = max(scored, key=lambda k: (round(scored[k].final["test_accuracy"], 6), -scored[k].train_time_s))
    crit = "highest final test accuracy"
    if target is not None:
        crit += f" (no variant reached {target:.3f})"
    return best, crit


def _row(name: str, r: TrainResult, **extra: Any) -> dict[str, Any]:
    s = r.summary()
    return {"variant": name, **extra, "params": s["params"], "macs": s["macs"],
            "final_test_accuracy": s["final_test_accuracy"], "best_test_accuracy": s["best_test_accuracy"],
            "train_time_s": s["train_time_s"], "time_to_target_s": s["time_to_target_s"],
            "epochs_to_target": s["epochs_to_target"], "epochs": s["epochs"], "samples_per_s": s["samples_per_s"],
            "stop_reason": s["stop_reason"]}


def sweep_depth(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], data: Any, config: TrainConfig, *,
                deltas: Sequence[int] = (-1, 0, 1), blocks: Sequence[str] | None = None, init: str = "reset",
                loss: Callable[..., torch.Tensor] | None = None, threads: int | None = 1) -> SweepResult:
    """Train depth variants of ``model`` (see the module docstring)."""
    if not deltas:
        raise GraphoptError("no depths to sweep", fix="give deltas, e.g. -1,0,1")
    variants: dict[str, nn.Module] = {}
    info: dict[str, dict[str, Any]] = {}
    for d in sorted(set(int(x) for x in deltas)):
        name = f"depth{d:+d}"
        if d == 0:
            gm = capture(model, example_inputs)
            found = find_blocks(gm, blocks)
            info[name] = {"delta": 0, "blocks": len(found),
                          "stages": {k or "<root>": len(v) for k, v in stages(found).items()}}
        else:
            gm, ch = change_depth(model, example_inputs, d, blocks=blocks, init=init)
            info[name] = {"delta": d, "blocks": ch.blocks_after, "stages": ch.stages}
        info[name]["macs"] = graph_meta(gm)["cost"].macs
        variants[name] = gm
    dev = torch.device(config.device)
    with thread_settings(dev, threads) as th:
        env = {**environment(dev), **th}
        results = fit_many(variants, data, config, loss=loss, example_inputs=example_inputs)
    rows = []
    for name, r in results.items():
        r.macs = info[name]["macs"]
        r.extra.update({"delta": info[name]["delta"], "blocks": info[name]["blocks"]})
        rows.append(_row(name, r, delta=info[name]["delta"], blocks=info[name]["blocks"]))
    chance = chance_level(data)
    best, crit = pick_best(results, config.target_accuracy, chance)
    return SweepResult("depth", results, rows, best, crit, {"train": config.as_dict(), "deltas": list(deltas),
                                                           "blocks": list(blocks or []), "init": init,
                                                           "stages": {k: v["stages"] for k, v in info.items()}},
                       env, config.target_accuracy, extra=_chance_extra(chance))


def _chance_extra(chance: tuple[float, int] | None) -> dict[str, Any]:
    return {"chance_accuracy": chance[0], "test_samples": chance[1]} if chance else {}


def sweep_batch_size(model: nn.Module, data: Any, config: TrainConfig, sizes: Sequence[int], *,
                     lr_scaling: str = "linear", loss: Callable[..., torch.Tensor] | None = None,
                     example_inputs: tuple[torch.Tensor, ...] | None = None, threads: int | None = 1) -> SweepResult:
    """Train ``model`` once per batch size in ``sizes`` (each from the same initial weights)."""
    if lr_scaling not in ("linear", "sqrt", "none"):
        raise GraphoptError(f"unknown lr scaling '{lr_scaling}'", fix="use linear, sqrt or none")
    sizes = sorted(set(int(s) for s in sizes))
    if not sizes or sizes[0] < 1:
        raise GraphoptError("batch sizes must be >= 1")
    base = config.batch_size
    variants: dict[str, nn.Module] = {}
    configs: dict[str, TrainConfig] = {}
    for b in sizes:
        f = {"linear": b / base, "sqrt": math.sqrt(b / base), "none": 1.0}[lr_scaling]
        name = f"batch{b}"
        variants[name] = copy.deepcopy(model)
        configs[name] = replace(config, batch_size=b, lr=config.lr * f)
    dev = torch.device(config.device)
    with thread_settings(dev, threads) as th:
        env = {**environment(dev), **th}
        results = fit_many(variants, data, configs, loss=loss, example_inputs=example_inputs)
    rows = [_row(name, r, batch_size=configs[name].batch_size, lr=configs[name].lr) for name, r in results.items()]
    chance = chance_level(data)
    best, crit = pick_best(results, config.target_accuracy, chance)
    return SweepResult("batch_size", results, rows, best, crit,
                       {"train": config.as_dict(), "sizes": sizes, "lr_scaling": lr_scaling, "base_batch_size": base},
                       env, config.target_accuracy, extra=_chance_extra(chance))
