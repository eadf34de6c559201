"""Measurement primitives: stable thread settings, the environment record, step timers,
peak-memory probes, FLOP counts and the device's measured matmul peak.

CPU numbers on a shared 2-core machine are only comparable with one intra-op thread (or a
passive OpenMP wait policy): with spin-waiting threads a step took 4-5x longer (ENV-NOTES.md).
Every result records the thread settings and the machine load (``os.getloadavg()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["thread_settings", "environment", "StepTimer", "MemoryProbe", "count_flops", "measure_peak_flops",
           "summarize", "rss_bytes", "trim_memory", "StepMeasurer", "Comparison", "noise_margin", "alternate",
           "ModelTimer"]


@contextlib.contextmanager
def thread_settings(device: torch.device, threads: int | None = 1) -> Iterator[dict[str, Any]]:
    """Set ``torch.set_num_threads(threads)`` on CPU for the block (restored after); yields the record."""
    old = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield {"torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    finally:
        torch.set_num_threads(old)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device, versions, date, CPU count, thread settings and machine load, for every result file."""
    import graphopt

    device = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "graphopt": graphopt.__version__,
        "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        env.update({"gpu": props.name, "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version(),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                    "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return env


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of a list of timings."""
    if not samples:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) >= 2 else [s[0], s[0], s[0]]
    return {"median": statistics.median(s), "p25": q[0], "p75": q[2], "min": s[0], "max": s[-1], "n": len(s)}


class StepTimer:
    """Times callables: CUDA events on a GPU (no host sync inside the timed region), else perf_counter.

    ``with timer.time(): step()`` records one sample; :meth:`samples` returns seconds (it
    synchronises the device once to read the events).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._events: list[tuple[Any, Any]] = []
        self._cpu: list[float] = []

    @contextlib.contextmanager
    def time(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu.append(time.perf_counter() - t0)

    def samples(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1000.0 for s, e in self._events]
        return list(self._cpu)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def trim_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so RSS
    measurements of one variant are not hidden by memory freed by another."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of a region above its starting point.

    - CUDA: the caching allocator's ``max_memory_allocated`` (reset at entry) minus the bytes
      allocated at entry: exact.
    - CPU: the process RSS, sampled every ``interval_s`` by a background thread (after
      ``malloc_trim`` at entry), minus the RSS at entry. A sampled peak can miss a spike
      shorter than the interval; training steps here hold their activations for milliseconds.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.0005):
        self.device = device
        self.interval_s = interval_s
        self.start = 0
        self.peak = 0
        self.source = "cuda_allocator" if device.type == "cuda" else "rss_sampled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.peak = self.start
        else:
            trim_memory()
            self.start = self.peak = rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            rss = proc.memory_info().rss
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.start)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the aten ops ``fn`` runs (forward, backward, whatever it does), by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass
class PeakFlops:
    flops_per_s: float
    dtype: str
    n: int
    device: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                       reps: int | None = None) -> PeakFlops:
    """The device's measured matmul throughput (square ``n x n`` GEMMs, best of ``reps``): the
    reference for "fraction of peak". On CUDA, float32 matmuls follow the current TF32 setting."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    reps = reps or (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = StepTimer(device)
    for _ in range(3):
        a @ b
    for _ in range(reps):
        with timer.time():
            a @ b
    best = min(timer.samples())
    return PeakFlops(2 * n**3 / best, str(dtype).replace("torch.", ""), n, str(device))


# ----------------------------------------------------------------------------- the measurement engine
#
# Noise model (also in the README, "How auto decides"):
# - every variant is warmed up (``warmup`` steps: allocator, oneDNN/cuDNN kernel choice);
# - timed rounds alternate the variants (the starting variant rotates each round), so drifting
#   machine load hits every variant alike; a round runs ``steps`` steps per variant and records
#   their mean;
# - the decision uses the per-round *ratio* candidate/baseline (the two ran back to back, so slow
#   drifts cancel), its median over the rounds, and a noise margin from its spread: the
#   interquartile range of the ratios, at least ``min_margin`` (1%). A candidate counts as
#   faster only when ``median ratio < 1 - margin``.
# - GPU: CUDA events around each step and one synchronize per round (no host sync inside the
#   timed region); CPU: perf_counter with one intra-op thread (see thread_settings).


def alternate(runners: Mapping[str, Callable[[], Any]], rounds: int,
              on_run: Callable[[str, int], None] | None = None) -> None:
    """Run every runner once per round, the starting one rotating from round to round (the
    alternation both :class:`StepMeasurer` and :func:`graphopt.bench.compare` time with)."""
    names = list(runners)
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            if on_run is not None:
                on_run(n, r)
            runners[n]()


@dataclass
class Comparison:
    """Candidate vs baseline, measured alternately in one process."""

    candidate_ms: float
    baseline_ms: float
    ratio: float  # median over rounds of candidate/baseline (< 1: candidate faster)
    margin: float  # relative noise margin derived from the spread of the per-round ratios
    rounds: int
    candidate_samples_ms: list[float] = field(default_factory=list)
    baseline_samples_ms: list[float] = field(default_factory=list)

    @property
    def faster(self) -> bool:
        return self.ratio < 1.0 - self.margin

    @property
    def slower(self) -> bool:
        return self.ratio > 1.0 + self.margin

    def as_dict(self) -> dict[str, Any]:
        return {"candidate_ms": self.candidate_ms, "baseline_ms": self.baseline_ms, "ratio": self.ratio,
                "margin": self.margin, "rounds": self.rounds, "faster": self.faster}


def noise_margin(ratios: list[float], min_margin: float = 0.01) -> float:
    """The relative margin a ratio must beat: the interquartile range of the per-round ratios
    (at least ``min_margin``)."""
    if len(ratios) < 2:
        return max(min_margin, 0.05)
    q = statistics.quantiles(sorted(ratios), n=4, method="inclusive")
    return max(min_margin, q[2] - q[0])


ModelTimer = Callable[[Any], float]
"""``timer(module) -> seconds`` of one training step of ``module`` (injectable for tests)."""


class StepMeasurer:
    """Times the training step (zero_grad, forward, loss, backward, optimizer step) of modules on one
    device, alternating variants in one process (see the noise model above).

    ``timer``: replaces running and timing a real step (tests inject a deterministic one); the
    engine's alternation, medians and margins stay the same.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None = None, *,
                 loss: Callable[..., torch.Tensor] | None = None, device: str | torch.device = "cpu",
                 warmup: int = 2, rounds: int = 5, steps: int = 2, threads: int | None = 1,
                 optimizer: str = "sgd", lr: float = 0.01, min_margin: float = 0.01,
                 timer: ModelTimer | None = None) -> None:
        self.inputs = tuple(inputs)
        self.target = target
        self.loss = loss
        self.device = torch.device(device)
        self.warmup, self.rounds, self.steps = warmup, max(1, rounds), max(1, steps)
        self.threads, self.optimizer, self.lr, self.min_margin = threads, optimizer, lr, min_margin
        self.timer = timer
        self._backends: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}
        self.measured_steps = 0

    # -- one module --------------------------------------------------------------------------
    def _backend(self, module: Any) -> tuple[Any, tuple[Any, ...]]:
        hit = self._backends.get(id(module))
        if hit is not None and hit[0] is module:
            return hit[1], hit[2]
        import copy

        from graphopt.bench.compare import synthetic_target
        from graphopt.bench.torch_backend import TorchBackend, default_loss

        if self.target is None:
            self.target = synthetic_target(copy.deepcopy(module), self.inputs)
        be = TorchBackend(copy.deepcopy(module), loss=self.loss or default_loss, optimizer=self.optimizer,
                          lr=self.lr, device=self.device)
        data = be.prepare(self.inputs, self.target)
        self._backends[id(module)] = (module, be, data)
        return be, data

    def release(self, module: Any) -> None:
        """Drop the training copy of ``module`` (memory)."""
        self._backends.pop(id(module), None)

    def _run(self, module: Any, n: int) -> float:
        """Mean seconds of ``n`` steps of ``module``."""
        self.measured_steps += n
        if self.timer is not None:
            return sum(self.timer(module) for _ in range(n)) / n
        be, (x, y) = self._backend(module)
        t = StepTimer(self.device)
        for _ in range(n):
            with t.time():
                be.step(x, y)
        return statistics.fmean(t.samples())

    def warm(self, module: Any) -> float:
        """Warm ``module`` up (also proves its step runs on the device); returns the last step's seconds."""
        last = float("nan")
        with thread_settings(self.device, self.threads):
            for _ in range(max(1, self.warmup)):
                last = self._run(module, 1)
        return last

    # -- alternation ---------------------------------------------------------------------------
    def measure(self, modules: Mapping[str, Any]) -> dict[str, list[float]]:
        """Per-round mean step seconds of each module, the variants alternated round by round."""
        names = list(modules)
        out: dict[str, list[float]] = {n: [] for n in names}
        with thread_settings(self.device, self.threads):
            for n in names:
                for _ in range(self.warmup):
                    self._run(modules[n], 1)
            alternate({n: (lambda n=n: out[n].append(self._run(modules[n], self.steps))) for n in names},
                      self.rounds)
        return out

    def compare(self, candidate: Any, baseline: Any) -> Comparison:
        """Candidate vs baseline: medians, per-round ratios and the noise margin."""
        s = self.measure({"candidate": candidate, "baseline": baseline})
        c, b = s["candidate"], s["baseline"]
        ratios = [ci / bi for ci, bi in zip(c, b) if bi > 0]
        return Comparison(statistics.median(c) * 1e3, statistics.median(b) * 1e3,
                          statistics.median(ratios) if ratios else float("nan"),
                          noise_margin(ratios, self.min_margin), len(ratios),
                          [v * 1e3 for v in c], [v * 1e3 for v in b])
