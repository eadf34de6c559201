"""Measurement primitives: stable thread settings, the environment record, step timers,
peak-memory probes, FLOP counts and the device's measured matmul peak.

CPU numbers on a shared 2-core machine are only comparable with one intra-op thread (or a
passive OpenMP wait policy): with spin-waiting threads a step took 4-5x longer (ENV-NOTES.md).
Every result records the thread settings and the machine load (``os.getloadavg()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import datetime as _dt
import gc
import math
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
           "t_quantile", "t_sf", "sequential_confidence", "paired_interval", "paired_verdict", "noninferior_verdict", "CLOCK_NAMES",
           "ModelTimer", "paired_rounds", "PairedRounds", "RoundRunner", "default_clock"]


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
# Noise model (also in the README, "Noise model"), one engine (:func:`paired_rounds`) for the automatic
# mode (:meth:`StepMeasurer.compare`), ``graphopt bench`` (:func:`graphopt.bench.compare.compare`) and
# the benchmarks:
# - every variant is warmed up once (``warmup`` steps: allocator, oneDNN/cuDNN kernel choice,
#   optimizer state); a variant that stays the baseline is not warmed again;
# - the clock: on a CPU with one intra-op thread, the *thread CPU time* of the step
#   (``time.thread_time``: the step runs entirely in the calling thread, and the time the thread
#   waits for a core taken by another process is not counted), else wall time (CUDA events on a
#   GPU). Wall time is recorded alongside, always;
# - paired rounds: each round runs candidate and baseline back to back (``steps`` steps each, the
#   order alternating), so a slow drift hits both; the statistic is the per-round log-ratio
#   ``d = log(candidate / baseline)``. Its mean gives the ratio estimate ``exp(mean d)`` and a
#   Student-t confidence interval ``exp(mean d +- t * sd / sqrt(n))`` (``confidence``, 95%);
# - sequential: after ``min_rounds`` (3) rounds the interval is checked after every round:
#   *faster* when the whole interval is below 1 and the estimate is at least ``min_gain`` (1%)
#   faster; *not faster* when the interval's lower end is above ``1 - min_gain`` (slower, or a gain
#   too small to matter); otherwise another round, up to ``rounds`` (10). Still undecided at the
#   cap: not faster. Clear cases stop after 3 rounds; small real gains get more rounds.


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


def _t_two_sided(t: Any, df: int) -> Any:
    """P(|T| < t) for Student's t with integer ``df`` (closed-form finite series in theta =
    atan(t / sqrt(df)); Abramowitz & Stegun 26.7.3/26.7.4): exact to rounding. ``t`` may be a float or a
    numpy array; the result is odd in ``t`` (negative for negative t)."""
    import numpy as np

    th = np.arctan(np.asarray(t, dtype=float) / math.sqrt(df))
    c2 = np.cos(th) ** 2
    term = np.ones_like(th)
    total = np.ones_like(th)
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 c2 + 2*4/(3*5) c2^2 + ...)), df = 1: 2 theta / pi
        if df == 1:
            return 2 * th / math.pi
        for j in range(1, (df - 3) // 2 + 1):
            term = term * (2 * j) / (2 * j + 1) * c2
            total = total + term
        return 2 / math.pi * (th + np.sin(th) * np.cos(th) * total)
    for j in range(1, (df - 2) // 2 + 1):  # even: sin (1 + 1/2 c2 + 1*3/(2*4) c2^2 + ...)
        term = term * (2 * j - 1) / (2 * j) * c2
        total = total + term
    return np.sin(th) * total


def t_sf(t: Any, df: int) -> Any:
    """P(T > t) for Student's t with integer ``df`` (float or numpy array)."""
    return 0.5 - 0.5 * _t_two_sided(t, df)


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of Student's t with integer ``df`` degrees of freedom: the exact CDF inverted by
    bisection (the sequential decisions use far tails, 0.998 and beyond at 2 degrees of freedom, where
    series approximations around the normal quantile are 10-20% off)."""
    if df <= 0:
        return float("inf")
    if not 0.0 < p < 1.0:
        return math.copysign(float("inf"), p - 0.5) if p != 0.5 else 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 1.0 - p  # find t with P(T > t) = 1 - p
    lo, hi = 0.0, 1.0
    while float(t_sf(hi, df)) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(t_sf(mid, df)) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=64)
def sequential_confidence(confidence: float, min_rounds: int, rounds: int, *, paths: int = 20000) -> float:
    """The per-look confidence that keeps a sequential test honest.

    The engine looks at the paired ratios after every round from ``min_rounds`` to ``rounds`` and
    declares a candidate faster the first time the interval's high end is below 1. At the nominal 95%
    per look, a candidate that is exactly as fast as the baseline was declared faster in 12% of runs
    (simulated, 3% noise per round, 30 rounds) instead of 2.5%. This returns the constant per-look
    (two-sided) confidence, Pocock-style on the t scale, at which the chance of *ever* declaring a
    candidate faster when it is not is the one-sided ``(1 - confidence) / 2``, for normal per-round
    log-ratios of any noise level: the level is calibrated by simulating ``paths`` null sequences
    (fixed seed: deterministic) and taking the quantile of their smallest one-sided p-value over the
    looks. With one look it is ``confidence`` itself. For 3..30 rounds at 95%: about 99.3% per look.
    """
    import numpy as np

    rounds = max(1, int(rounds))
    first = max(2, min(int(min_rounds), rounds))
    if rounds <= first:
        return confidence
    rng = np.random.default_rng(20261201)
    x = rng.standard_normal((paths, rounds))
    n = np.arange(1, rounds + 1, dtype=float)
    mean = np.cumsum(x, axis=1) / n
    var = (np.cumsum(x * x, axis=1) - n * mean ** 2) / np.maximum(n - 1, 1)
    smallest = np.ones(paths)
    for k in range(first, rounds + 1):
        se = np.sqrt(np.maximum(var[:, k - 1], 1e-300) / k)
        smallest = np.minimum(smallest, t_sf(mean[:, k - 1] / se, k - 1))
    alpha = float(np.quantile(smallest, (1.0 - confidence) / 2))
    return 1.0 - 2.0 * alpha


def _log_stats(ratios: list[float]) -> tuple[float, float, int]:
    """(mean, standard deviation, count) of the finite positive ratios' logs (sd nan below 2)."""
    d = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not d:
        return float("nan"), float("nan"), 0
    return statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else float("nan")), len(d)


def _interval(stats: tuple[float, float, int], confidence: float) -> tuple[float, float, float]:
    m, sd, n = stats
    if n == 0:
        return float("nan"), 0.0, float("inf")
    if n < 2:
        return math.exp(m), 0.0, float("inf")
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def paired_interval(ratios: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high) of the candidate/baseline time ratio from paired per-round ratios: the
    geometric mean and the Student-t interval of the mean log-ratio (``(nan, 0, inf)`` below 2 rounds)."""
    return _interval(_log_stats(ratios), confidence)


FASTER, NOT_FASTER, UNDECIDED = "faster", "not faster", "undecided"
NOT_SLOWER, SLOWER = "not slower", "slower"


def paired_verdict(ratios: list[float], *, confidence: float = 0.95, min_gain: float = 0.01,
                   min_rounds: int = 3, look_confidence: float | None = None) -> str:
    """The sequential decision on paired ratios (candidate/baseline): ``"faster"`` when the interval at
    ``look_confidence`` (default ``confidence``: a single look; the engine passes
    :func:`sequential_confidence`, since it looks after every round) lies below 1 and the estimate is
    at least ``min_gain`` faster; ``"not faster"`` when the low end of the interval at ``confidence``
    is above ``1 - min_gain``; else ``"undecided"`` (also below ``min_rounds``)."""
    if len(ratios) < max(2, min_rounds):
        return UNDECIDED
    return _verdict(*_bounds(ratios, confidence, look_confidence), min_gain)


def _bounds(ratios: list[float], confidence: float, look_confidence: float | None) -> tuple[float, float, float]:
    """(estimate, low end at ``confidence``, high end at ``look_confidence``): what the verdicts read."""
    stats = _log_stats(ratios)
    est, lo, hi = _interval(stats, confidence)
    if look_confidence is not None and look_confidence != confidence:
        hi = _interval(stats, look_confidence)[2]
    return est, lo, hi


def _verdict(est: float, lo: float, keep_hi: float, min_gain: float) -> str:
    if keep_hi < 1.0 and est <= 1.0 - min_gain:
        return FASTER
    if lo > 1.0 - min_gain:
        return NOT_FASTER
    return UNDECIDED


def noninferior_verdict(ratios: list[float], *, floor: float = 0.98, confidence: float = 0.95,
                        min_gain: float = 0.01, min_rounds: int = 3, look_confidence: float | None = None) -> str:
    """The sequential non-inferiority decision (the final check of a combination whose parts each
    measured faster): ``"faster"`` as :func:`paired_verdict`; ``"not slower"`` when the estimate is
    below 1 and the high end of the interval at ``look_confidence`` shows the candidate at least
    ``floor`` x the baseline's speed (ratio at most ``1 / floor``); ``"slower"`` when the interval lies
    above 1; ``"not faster"`` when :func:`paired_verdict` says so and the estimate is not below 1; else
    ``"undecided"``. Decisions that keep a candidate use ``look_confidence``, those that reject it
    ``confidence``."""
    if len(ratios) < max(2, min_rounds):
        return UNDECIDED
    est, lo, keep_hi = _bounds(ratios, confidence, look_confidence)
    v = _verdict(est, lo, keep_hi, min_gain)
    if v == FASTER:
        return v
    if est < 1.0 and keep_hi <= 1.0 / floor:
        return NOT_SLOWER
    if lo > 1.0:
        return SLOWER
    if v == NOT_FASTER and est >= 1.0:  # no 1% gain possible, and not faster on the estimate: stop
        return NOT_FASTER
    return UNDECIDED


@dataclass
class Comparison:
    """Candidate vs baseline, measured in paired alternated rounds in one process. Times are medians
    of the per-round means in the decision clock (``clock``); ``wall_*``: the same in wall time."""

    candidate_ms: float
    baseline_ms: float
    ratio: float  # geometric mean over rounds of candidate/baseline (< 1: candidate faster)
    margin: float  # relative half-width of the confidence interval of the ratio
    rounds: int
    candidate_samples_ms: list[float] = field(default_factory=list)
    baseline_samples_ms: list[float] = field(default_factory=list)
    low: float = float("nan")  # confidence interval of the ratio
    high: float = float("nan")
    verdict: str = UNDECIDED  # "faster" | "not faster" | "undecided" (at the round cap or stopped)
    clock: str = "wall"
    candidate_wall_ms: float = float("nan")
    baseline_wall_ms: float = float("nan")
    confidence: float = 0.95
    stopped: bool = False  # stopped early by the caller (time budget) before a decision
    decision_confidence: float = float("nan")  # per-look confidence of the keep decisions (sequential_confidence)

    @property
    def faster(self) -> bool:
        return self.verdict == FASTER

    @property
    def slower(self) -> bool:
        return self.low > 1.0

    @property
    def wall_ratio(self) -> float:
        return self.candidate_wall_ms / self.baseline_wall_ms if self.baseline_wall_ms > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"candidate_ms": self.candidate_ms, "baseline_ms": self.baseline_ms, "ratio": self.ratio,
                "ratio_interval": [self.low, self.high], "confidence": self.confidence,
                "decision_confidence": self.decision_confidence, "margin": self.margin,
                "rounds": self.rounds, "verdict": self.verdict, "faster": self.faster, "clock": self.clock,
                "candidate_wall_ms": self.candidate_wall_ms, "baseline_wall_ms": self.baseline_wall_ms,
                "candidate_samples_ms": [round(v, 3) for v in self.candidate_samples_ms],
                "baseline_samples_ms": [round(v, 3) for v in self.baseline_samples_ms]}

    def summary(self) -> str:
        """``1.418x (95% interval 1.35-1.49x, 4 rounds, thread CPU time)`` in speed-up terms."""
        lo = f"{1 / self.high:.3f}" if self.high > 0 and math.isfinite(self.high) else "0"
        hi = f"{1 / self.low:.3f}" if self.low > 0 else "inf"
        return (f"{1 / self.ratio:.3f}x ({self.confidence:.0%} interval {lo}-{hi}x, {self.rounds} paired rounds, "
                f"{CLOCK_NAMES.get(self.clock, self.clock)})")


CLOCK_NAMES = {"thread_cpu": "thread CPU time", "wall": "wall time", "injected": "injected timer"}


def noise_margin(ratios: list[float], confidence: float = 0.95) -> float:
    """The relative half-width of the confidence interval of the paired ratios (0.05 below 2 rounds)."""
    est, lo, hi = paired_interval(ratios, confidence)
    if not math.isfinite(hi) or not est > 0:
        return 0.05
    return max(hi / est - 1.0, 1.0 - lo / est)


ModelTimer = Callable[[Any], float]
"""``timer(module) -> seconds`` of one training step of ``module`` (injectable for tests)."""


class StepMeasurer:
    """Times the training step (zero_grad, forward, loss, backward, optimizer step) of modules on one
    device, alternating variants in one process (see the noise model above).

    ``rounds`` and ``max_s``: the caps on paired rounds and on their time (the sum of the timed steps'
    wall time, both variants) per comparison; it stops earlier once decided, and always runs
    ``min_rounds``;
    ``steps``: steps per variant per round (``None``: enough for a round of ``round_s`` seconds per
    variant, from the first warm-up, at least 1); ``clock``: ``"thread_cpu"`` or ``"wall"``
    (default: thread CPU time on a CPU with one thread, else wall).
    ``timer``: replaces running and timing a real step (tests inject a deterministic one); the
    engine's alternation, warm-up and decisions stay the same.
    """

    def __init__(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor | None = None, *,
                 loss: Callable[..., torch.Tensor] | None = None, device: str | torch.device = "cpu",
                 warmup: int = 2, rounds: int = 30, steps: int | None = None, threads: int | None = 1,
                 optimizer: str = "sgd", lr: float = 0.01, min_rounds: int = 3, confidence: float = 0.95,
                 min_gain: float = 0.01, clock: str | None = None, round_s: float = 0.05,
                 max_s: float | None = 15.0, timer: ModelTimer | None = None) -> None:
        self.inputs = tuple(inputs)
        self.target = target
        self.loss = loss
        self.device = torch.device(device)
        self.warmup, self.rounds = warmup, max(1, rounds)
        self.steps = max(1, steps) if steps is not None else None
        self.min_rounds = max(2, min(min_rounds, self.rounds))
        self.confidence, self.min_gain, self.round_s, self.max_s = confidence, min_gain, round_s, max_s
        self.threads, self.optimizer, self.lr = threads, optimizer, lr
        self.timer = timer
        if clock is None:
            clock = "injected" if timer is not None else default_clock(self.device, threads)
        if clock not in CLOCK_NAMES:
            raise ValueError(f"clock must be 'thread_cpu' or 'wall', not {clock!r}")
        self.clock = clock
        self._backends: dict[int, tuple[Any, Any, tuple[Any, ...]]] = {}
        self._warm: set[int] = set()
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
        self._warm.discard(id(module))
        return be, data

    def release(self, module: Any) -> None:
        """Drop the training copy of ``module`` (memory)."""
        self._backends.pop(id(module), None)
        self._warm.discard(id(module))

    def adopt(self, new: Any, old: Any) -> None:
        """Time ``new`` with ``old``'s (warm) training copy from now on: for a module built again
        identically (the same passes on the same graph), so it is not set up and warmed twice."""
        hit = self._backends.pop(id(old), None)
        warm = id(old) in self._warm
        self._warm.discard(id(old))
        if hit is not None:
            self._backends[id(new)] = (new, hit[1], hit[2])
        if warm and (hit is not None or self.timer is not None):
            self._warm.add(id(new))

    def _run2(self, module: Any, n: int) -> tuple[float, float]:
        """(decision-clock seconds, wall seconds): means over ``n`` steps of ``module``."""
        self.measured_steps += n
        if self.timer is not None:
            v = sum(self.timer(module) for _ in range(n)) / n
            return v, v
        be, (x, y) = self._backend(module)
        t = StepTimer(self.device)
        c0 = time.thread_time()
        for _ in range(n):
            with t.time():
                be.step(x, y)
        cpu = (time.thread_time() - c0) / n
        wall = statistics.fmean(t.samples())
        return (cpu if self.clock == "thread_cpu" else wall), wall

    def _run(self, module: Any, n: int) -> float:
        """Mean seconds of ``n`` steps of ``module`` (decision clock)."""
        return self._run2(module, n)[0]

    def _is_warm(self, module: Any) -> bool:
        if id(module) not in self._warm:
            return False
        hit = self._backends.get(id(module))
        return self.timer is not None or (hit is not None and hit[0] is module)

    def _warm_up(self, module: Any, force: bool = False) -> float:
        """``warmup`` untimed steps, once per module (a baseline kept across comparisons is not warmed
        again); the first warm-up also sets ``steps`` when it is automatic."""
        if self._is_warm(module) and not force:
            return float("nan")
        last = float("nan")
        for _ in range(max(self.warmup, 1 if force else 0)):
            last = self._run(module, 1)
        self._warm.add(id(module))
        if self.steps is None and last == last:
            self.steps = max(1, min(50, math.ceil(self.round_s / max(last, 1e-6))))
        return last

    def warm(self, module: Any) -> float:
        """Warm ``module`` up (also proves its step runs on the device); returns the last step's seconds."""
        with thread_settings(self.device, self.threads):
            return self._warm_up(module, force=True)

    # -- alternation ---------------------------------------------------------------------------
    def measure_both(self, modules: Mapping[str, Any], rounds: int | None = None
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Per-round mean step seconds of each module, the variants alternated round by round:
        (decision clock, wall)."""
        names = list(modules)
        out: dict[str, list[float]] = {n: [] for n in names}
        wall: dict[str, list[float]] = {n: [] for n in names}

        def run(n: str) -> None:
            c, w = self._run2(modules[n], self.steps or 1)
            out[n].append(c)
            wall[n].append(w)

        with thread_settings(self.device, self.threads):
            for n in names:
                self._warm_up(modules[n])
            alternate({n: (lambda n=n: run(n)) for n in names}, rounds or self.rounds)
        return out, wall

    def measure(self, modules: Mapping[str, Any], rounds: int | None = None) -> dict[str, list[float]]:
        """Per-round mean step seconds (decision clock) of each module, alternated round by round."""
        return self.measure_both(modules, rounds)[0]

    def compare(self, candidate: Any, baseline: Any, *, stop: Callable[[], bool] | None = None,
                max_s: float | None = -1.0, floor: float | None = None) -> Comparison:
        """Candidate vs baseline in paired rounds, sequentially (:func:`paired_rounds`, the shared
        engine): from ``min_rounds`` on, stops as soon as :func:`paired_verdict` decides (with ``floor``:
        :func:`noninferior_verdict`), else at ``rounds`` rounds or ``max_s`` seconds of timed steps
        (default: the measurer's), or when ``stop()`` says so (a search's time budget)."""
        cap_s = self.max_s if max_s == -1.0 else max_s
        with thread_settings(self.device, self.threads):
            self._warm_up(candidate)
            self._warm_up(baseline)
            out = paired_rounds({"candidate": lambda: self._run2(candidate, self.steps or 1),
                                 "baseline": lambda: self._run2(baseline, self.steps or 1)}, "baseline",
                                rounds=self.rounds, min_rounds=self.min_rounds, confidence=self.confidence,
                                min_gain=self.min_gain, floor=floor, max_s=cap_s, steps=self.steps or 1,
                                stop=stop, clock=self.clock)
        return out.comparisons["candidate"]


def default_clock(device: torch.device | str, threads: int | None) -> str:
    """The engine's decision clock: thread CPU time on a CPU with one intra-op thread, else wall time
    (CUDA events on a GPU)."""
    return "thread_cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"


@dataclass
class PairedRounds:
    """What :func:`paired_rounds` measured: one :class:`Comparison` per candidate (vs the baseline), the
    rounds run, and every runner's per-round samples (decision clock and wall seconds)."""

    comparisons: dict[str, Comparison]
    rounds: int
    samples: dict[str, list[float]]
    wall: dict[str, list[float]]
    stopped: bool = False


RoundRunner = Callable[[], tuple[float, float]]
"""Runs one variant's share of a round; returns (decision-clock seconds, wall seconds) per step."""


def paired_rounds(runners: Mapping[str, RoundRunner], baseline: str, *, rounds: int, min_rounds: int = 3,
                  confidence: float = 0.95, min_gain: float = 0.01, floor: float | None = None,
                  max_s: float | None = None, steps: int = 1, stop: Callable[[], bool] | None = None,
                  clock: str = "wall", on_run: Callable[[str, int], None] | None = None) -> PairedRounds:
    """The measurement engine: the baseline and every candidate in paired rounds, sequentially.

    Each round runs every still-undecided candidate and the baseline once (``runners[name]()``: its
    ``steps`` steps), the starting one rotating from round to round through the runners' order
    (:meth:`StepMeasurer.compare` lists the candidate first: candidate first in even rounds, baseline
    first in odd ones). After every round each candidate's per-round
    ratios ``t_candidate / t_baseline`` (decision clock) get :func:`paired_verdict` (with ``floor``:
    :func:`noninferior_verdict`), whose keep decisions use the per-look confidence of
    :func:`sequential_confidence` (so that looking after every round still declares a candidate that is
    not faster "faster" in at most 2.5% of runs at 95%); a decided candidate stops running. The rounds stop when every
    candidate is decided (never before ``min_rounds``), at ``rounds`` rounds, once ``max_s`` seconds of
    timed steps (wall, all runners) are spent after ``min_rounds``, or when ``stop()`` says so (then
    ``stopped``). Used by :meth:`StepMeasurer.compare` (automatic mode) and
    :func:`graphopt.bench.compare.compare` (``graphopt bench``)."""
    names = list(runners)
    if baseline not in runners:
        raise ValueError(f"baseline {baseline!r} is not one of the runners")
    rounds = max(1, rounds)
    min_rounds = max(1, min(min_rounds, rounds))
    cands = [n for n in names if n != baseline]
    samples: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    verdicts = {n: UNDECIDED for n in cands}
    active = list(names)
    stopped = False
    done = 0

    look = sequential_confidence(confidence, min_rounds, rounds)

    def ratios(n: str) -> list[float]:
        return [ci / bi for ci, bi in zip(samples[n], samples[baseline]) if bi > 0]

    for r in range(rounds):
        k = r % len(active)
        for n in active[k:] + active[:k]:
            if on_run is not None:
                on_run(n, r)
            v, w = runners[n]()
            samples[n].append(v)
            wall[n].append(w)
        done = r + 1
        for n in [c for c in active if c != baseline]:
            rs = ratios(n)
            if floor is None:
                verdicts[n] = paired_verdict(rs, confidence=confidence, min_gain=min_gain, min_rounds=min_rounds,
                                             look_confidence=look)
            else:
                verdicts[n] = noninferior_verdict(rs, floor=floor, confidence=confidence, min_gain=min_gain,
                                                  min_rounds=min_rounds, look_confidence=look)
            if verdicts[n] != UNDECIDED:
                active.remove(n)
        if len(active) == 1 and done >= min_rounds:  # only the baseline left: every candidate decided
            break
        spent = sum(sum(w_) for w_ in wall.values()) * steps
        if max_s is not None and done >= min_rounds and spent >= max_s:
            break
        if stop is not None and done < rounds and stop():
            stopped = True
            break
    comparisons: dict[str, Comparison] = {}
    for n in cands:
        rs = ratios(n)
        m = len(samples[n])
        est, lo, hi = paired_interval(rs, confidence)
        comparisons[n] = Comparison(statistics.median(samples[n]) * 1e3, statistics.median(samples[baseline][:m]) * 1e3,
                                    est, noise_margin(rs, confidence), len(rs),
                                    [v * 1e3 for v in samples[n]], [v * 1e3 for v in samples[baseline][:m]], lo, hi,
                                    verdicts[n], clock, statistics.median(wall[n]) * 1e3,
                                    statistics.median(wall[baseline][:m]) * 1e3, confidence,
                                    stopped and n in active, look)
    return PairedRounds(comparisons, done, samples, wall, stopped)
