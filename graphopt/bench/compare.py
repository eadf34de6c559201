"""Side-by-side training-step benchmark of model variants in one process.

    res = compare({"original": model, "rewritten": gm}, inputs, target, steps=30)
    res.speedup("rewritten"), res.to_json()

What one *training step* is: ``zero_grad`` + forward + loss + backward + optimizer step
(:meth:`TorchBackend.step`), on the same batch for every variant.

How it is measured:

1. Every variant is a deep copy (the caller's modules are not trained), wrapped in a
   :class:`TorchBackend` (the graph's precision policy applies), optionally ``torch.compile``-d.
2. FLOPs of one step (forward + loss + backward, counted at the aten level by
   ``FlopCounterMode``) and forward MACs, on the uncompiled copy.
3. Warm-up: ``warmup`` steps per variant (the first one, which includes compilation, is
   reported as ``first_step_s``).
4. Timed steps in paired rounds, by the measurement engine the automatic mode decides with
   (:func:`graphopt.bench.measure.paired_rounds`): in each round every variant runs its share of
   steps (``ceil(steps / rounds)``), the starting variant rotating from round to round, so drifting
   machine load hits every variant alike. Per variant vs the baseline: the per-round ratio of the
   mean step time in the decision clock (thread CPU time on a CPU with one thread, else wall time:
   CUDA events on a GPU), its geometric mean (the speedup) and 95% Student-t interval. ``rounds``
   rounds always run; with ``max_rounds`` above it, more rounds follow while a variant is undecided
   (the engine's sequential rule), until ``max_rounds`` or ``max_s`` seconds of timed steps.
   Each step is also timed on its own in wall time (CUDA events on a GPU); medians and quartiles of
   those are reported next to the paired speedup.
5. Peak memory, separately from timing: a few more steps under a :class:`MemoryProbe`
   (CUDA allocator, or sampled RSS on CPU). ``peak_bytes`` = what persists between steps
   (parameters, buffers, master weights, optimizer state; counted from tensors) + the
   transient peak of a step above that (activations, gradients, workspaces).
6. Achieved FLOP/s = step FLOPs / median step time, and its fraction of the device's measured
   matmul peak (:func:`measure_peak_flops`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from graphopt.bench.measure import (CLOCK_NAMES, Comparison, MemoryProbe, PeakFlops, StepTimer, count_flops,
                                    default_clock, environment, measure_peak_flops, paired_rounds, summarize,
                                    thread_settings)
from graphopt.bench.torch_backend import TorchBackend, default_loss, resolve_device
from graphopt.errors import GraphoptError
from graphopt.ir import eval_mode
from graphopt.precision import get_policy
from graphopt.serialize import dumps

__all__ = ["compare", "BenchResult", "VariantResult", "synthetic_target"]

log = logging.getLogger(__name__)


@dataclass
class VariantResult:
    name: str
    step_time_s: dict[str, float]
    samples_per_s: float
    first_step_s: float
    memory: dict[str, Any]
    params: int
    trainable_params: int
    macs: int | None
    step_flops: int | None
    achieved_flops_per_s: float | None
    peak_fraction: float | None
    final_loss: float
    compiled: bool
    precision: dict[str, Any] | None
    skipped_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BenchResult:
    variants: dict[str, VariantResult]
    baseline: str
    config: dict[str, Any]
    env: dict[str, Any]
    peak: PeakFlops | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # each variant vs the baseline (paired)
    engine: dict[str, Any] = field(default_factory=dict)  # the measurement's clock and decision settings

    def speedup(self, name: str) -> float:
        """The paired speedup vs the baseline in the decision clock (the geometric mean over rounds of
        baseline / variant; > 1: faster); the wall-time median ratio where no comparison was made."""
        if name == self.baseline:
            return 1.0
        cmp = self.comparisons.get(name)
        if cmp is not None and cmp.ratio > 0 and math.isfinite(cmp.ratio):
            return 1.0 / cmp.ratio
        return self.wall_speedup(name)

    def wall_speedup(self, name: str) -> float:
        """Baseline median wall step time / this variant's (> 1: faster)."""
        return self.variants[self.baseline].step_time_s["median"] / self.variants[name].step_time_s["median"]

    def speedup_interval(self, name: str) -> tuple[float, float] | None:
        """The 95% (``engine["confidence"]``) interval of :meth:`speedup`; ``(0, inf)`` below 2 rounds."""
        cmp = self.comparisons.get(name)
        if cmp is None:
            return None
        lo = 1.0 / cmp.high if cmp.high > 0 and math.isfinite(cmp.high) else 0.0
        hi = 1.0 / cmp.low if cmp.low > 0 else float("inf")
        return lo, hi

    def verdict(self, name: str) -> str | None:
        """``"faster"`` / ``"slower"`` when the speedup's interval lies above / below 1, else ``"within noise"``."""
        iv = self.speedup_interval(name)
        if iv is None:
            return None
        return "faster" if iv[0] > 1.0 else "slower" if iv[1] < 1.0 else "within noise"

    def rounds(self, name: str) -> int | None:
        cmp = self.comparisons.get(name)
        return cmp.rounds if cmp is not None else None

    def speedup_text(self, name: str) -> str:
        """``1.418x (95% interval 1.350-1.490x, 5 paired rounds, thread CPU time)`` + ``, within noise``."""
        cmp = self.comparisons.get(name)
        if cmp is None:
            return f"{self.speedup(name):.3f}x (wall-time medians)"
        v = self.verdict(name)
        return cmp.summary() + (", within noise" if v == "within noise" else "")

    def memory_ratio(self, name: str) -> float | None:
        a, b = self.variants[self.baseline].memory.get("peak_bytes"), self.variants[name].memory.get("peak_bytes")
        return b / a if a and b is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": "step_benchmark", "baseline": self.baseline, "config": self.config, "env": self.env,
                "device_peak": self.peak.as_dict() if self.peak else None,
                "engine": self.engine,
                "variants": {k: {**v.as_dict(), "speedup_vs_baseline": self.speedup(k),
                                 "speedup_interval": (list(self.speedup_interval(k)) if k in self.comparisons
                                                      else None),
                                 "verdict": self.verdict(k), "rounds": self.rounds(k),
                                 "clock": self.engine.get("clock"),
                                 "wall_speedup_vs_baseline": self.wall_speedup(k),
                                 "comparison": self.comparisons[k].as_dict() if k in self.comparisons else None,
                                 "memory_vs_baseline": self.memory_ratio(k)} for k, v in self.variants.items()},
                **({"extra": self.extra} if self.extra else {})}

    def to_json(self) -> str:
        return dumps(self.as_dict())


def synthetic_target(module: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> torch.Tensor:
    """A target matching the model's output: class indices for (N, C) outputs, else a random tensor."""
    with eval_mode(module), torch.no_grad():
        out = module(*inputs)
    if not isinstance(out, torch.Tensor):
        raise GraphoptError(f"the model returns {type(out).__name__}, not a tensor",
                            fix="benchmark a model whose forward returns one tensor, or give loss()/data()")
    g = torch.Generator().manual_seed(seed)
    if out.dim() == 2:
        return torch.randint(0, out.shape[1], (out.shape[0],), generator=g)
    return torch.randn(out.shape, generator=g)


def _params(module: nn.Module) -> tuple[int, int]:
    ps = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def compare(models: Mapping[str, nn.Module], inputs: tuple[torch.Tensor, ...] | torch.Tensor,
            target: torch.Tensor | None = None, *, loss: Callable[..., torch.Tensor] | None = None,
            device: str | torch.device = "cpu", steps: int = 20, warmup: int = 3, rounds: int | None = None,
            memory_steps: int = 2, optimizer: str = "sgd", lr: float = 0.01, compile: bool | str = False,
            threads: int | None = 1, baseline: str | None = None, peak: bool = True,
            max_rounds: int | None = None, max_s: float | None = None, clock: str | None = None,
            confidence: float = 0.95, min_gain: float = 0.01, timer: Callable[[str], float] | None = None,
            on_variant: Callable[[str, str], None] | None = None) -> BenchResult:
    """Benchmark the training step of each model in ``models`` (see the module docstring).

    ``compile``: False, True (compile every variant) or ``"add"`` (keep each eager variant and
    add ``NAME+compile``). ``baseline``: the variant speedups are relative to (default: the first).
    ``rounds`` (default ``min(steps, 5)``) paired rounds of ``ceil(steps / rounds)`` steps per variant
    always run; ``max_rounds`` (default: ``rounds``, no more) and ``max_s`` (seconds of timed steps,
    default: no cap) bound the further rounds run while a variant's speedup is undecided by the
    engine's rule (:func:`graphopt.bench.measure.paired_verdict`). ``clock``: the decision clock
    (``"thread_cpu"`` / ``"wall"``; default: thread CPU time on a CPU with one thread, else wall).
    ``timer(name) -> seconds``: replaces the timing of each step (the steps still run), for tests.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not models:
        raise GraphoptError("nothing to compare", fix="pass at least one model")
    if steps < 1 or warmup < 0:
        raise GraphoptError("need steps >= 1 and warmup >= 0")
    dev = resolve_device(device)
    loss_fn = loss or default_loss
    first = next(iter(models.values()))
    if target is None:
        target = synthetic_target(copy.deepcopy(first), inputs)
    plan: list[tuple[str, nn.Module, bool]] = []
    for name, m in models.items():
        if compile != True:  # noqa: E712 - False or "add"
            plan.append((name, m, False))
        if compile:
            plan.append((name if compile is True else f"{name}+compile", m, True))
    baseline = baseline or plan[0][0]
    rounds = rounds or min(steps, 5)
    per_round = max(1, math.ceil(steps / rounds))
    max_rounds = max(rounds, max_rounds or rounds)
    clock = "injected" if timer is not None else (clock or default_clock(dev, threads))
    batch = int(inputs[0].shape[0]) if inputs[0].dim() else 1
    with thread_settings(dev, threads) as threads_rec:
        env = environment(dev)
        env.update(threads_rec)
        backends: dict[str, TorchBackend] = {}
        data: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        info: dict[str, dict[str, Any]] = {}
        for name, m, comp in plan:
            if on_variant:
                on_variant(name, "setting up")
            module = copy.deepcopy(m)
            params, trainable = _params(module)
            be = TorchBackend(module, loss=loss_fn, optimizer=optimizer, lr=lr, device=dev, compile=comp)
            x, y = be.prepare(tuple(inputs), target)
            macs = flops = None
            try:
                module.train()
                with torch.no_grad():
                    fwd = count_flops(lambda: module(*x))
                macs = fwd // 2

                def fwd_bwd() -> None:
                    out = module(*x)
                    loss_fn(out.float(), y).backward()

                flops = count_flops(fwd_bwd)
                for p in module.parameters():
                    p.grad = None
            except Exception as exc:  # a counting failure must not stop the timing
                log.warning("FLOP counting failed for %s: %s", name, exc)
            warm_timer = StepTimer(dev)
            for i in range(max(warmup, 1 if comp else 0)):
                if i == 0:
                    with warm_timer.time():
                        be.step(x, y)
                else:
                    be.step(x, y)
            first_step = warm_timer.samples()[0] if warm_timer.samples() else float("nan")
            backends[name], data[name] = be, (x, y)
            info[name] = {"params": params, "trainable": trainable, "macs": macs, "flops": flops,
                          "first": first_step, "compiled": comp, "timer": StepTimer(dev)}
        names = list(backends)
        last_loss: dict[str, torch.Tensor] = {}
        injected: dict[str, list[float]] = {name: [] for name in names}

        def runner(name: str) -> Callable[[], tuple[float, float]]:
            def run() -> tuple[float, float]:
                be, (x, y), t = backends[name], data[name], info[name]["timer"]
                c0 = time.thread_time()
                for _ in range(per_round):
                    with t.time():
                        last_loss[name] = be.step(x, y)
                cpu = (time.thread_time() - c0) / per_round
                if timer is not None:
                    vals = [timer(name) for _ in range(per_round)]
                    injected[name] += vals
                    return sum(vals) / per_round, sum(vals) / per_round
                wall = sum(t.samples()[-per_round:]) / per_round
                return (cpu if clock == "thread_cpu" else wall), wall
            return run

        measured = paired_rounds({name: runner(name) for name in names}, baseline, rounds=max_rounds,
                                 min_rounds=rounds, confidence=confidence, min_gain=min_gain, max_s=max_s,
                                 steps=per_round, clock=clock,
                                 on_run=(lambda name, r: on_variant(name, f"round {r + 1}")) if on_variant else None)
        mem: dict[str, dict[str, Any]] = {}
        for name in names:
            be, (x, y) = backends[name], data[name]
            persistent = be.persistent_bytes()
            transient = None
            if memory_steps:
                with MemoryProbe(dev) as probe:
                    for _ in range(memory_steps):
                        be.step(x, y)
                transient = probe.delta
            mem[name] = {"source": MemoryProbe(dev).source, "model_bytes": persistent["model"],
                         "optimizer_state_bytes": persistent["optimizer_state"], "transient_bytes": transient,
                         "peak_bytes": (persistent["model"] + persistent["optimizer_state"] + transient)
                         if transient is not None else None}
        device_peak = None
        if peak:
            dtypes = {get_policy(m).torch_dtype for m in models.values() if get_policy(m) is not None}
            device_peak = measure_peak_flops(dev, dtypes.pop() if len(dtypes) == 1 else torch.float32)
        results: dict[str, VariantResult] = {}
        for name in names:
            be, i = backends[name], info[name]
            st = summarize(injected[name] if timer is not None else i["timer"].samples())
            achieved = i["flops"] / st["median"] if i["flops"] and st["median"] > 0 else None
            pol = be.policy.as_dict() if be.policy is not None else None
            results[name] = VariantResult(
                name=name, step_time_s=st, samples_per_s=batch / st["median"] if st["median"] > 0 else 0.0,
                first_step_s=i["first"], memory=mem[name], params=i["params"], trainable_params=i["trainable"],
                macs=i["macs"], step_flops=i["flops"], achieved_flops_per_s=achieved,
                peak_fraction=achieved / device_peak.flops_per_s if achieved and device_peak else None,
                final_loss=float(last_loss[name].item()), compiled=i["compiled"], precision=pol,
                skipped_steps=be.skipped_steps)
    config = {"batch_size": batch, "input_shapes": [list(t.shape) for t in inputs],
              "steps": per_round * measured.rounds, "steps_per_round": per_round, "rounds": measured.rounds,
              "min_rounds": rounds, "max_rounds": max_rounds, "max_s": max_s, "warmup": warmup, "memory_steps": memory_steps, "optimizer": optimizer, "lr": lr,
              "compile": compile, "device": str(dev), "threads": threads}
    engine = {"engine": "graphopt.bench.measure.paired_rounds", "clock": clock,
              "clock_name": CLOCK_NAMES.get(clock, clock),
              "wall_timer": "cuda_events" if dev.type == "cuda" else "perf_counter",
              "confidence": confidence, "min_gain": min_gain, "min_rounds": rounds, "max_rounds": max_rounds,
              "max_s": max_s, "steps_per_round": per_round, "rounds": measured.rounds}
    return BenchResult(results, baseline, config, env, device_peak, comparisons=measured.comparisons, engine=engine)
