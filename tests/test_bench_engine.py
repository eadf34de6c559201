"""The one measurement engine (graphopt.bench.measure.paired_rounds) as `graphopt bench` uses it:
fake per-step timings injected (deterministic; nothing here asserts real speed)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import graphopt
from graphopt.bench import compare
from graphopt.bench.measure import StepMeasurer, paired_interval, paired_rounds, sequential_confidence
from graphopt.cli import main


class FakeTimes:
    """Per-variant step seconds: ``base[name] * (1 + noise)``, noise from one seeded generator per name
    (the draw sequence of a variant does not depend on the other variants' calls)."""

    def __init__(self, base: dict[str, float], noise: float = 0.0, seed: int = 0):
        self.base, self.noise = base, noise
        self.rng = {n: random.Random(f"{seed}-{n}") for n in base}

    def __call__(self, name: str) -> float:
        return self.base[name] * (1.0 + self.rng[name].uniform(-self.noise, self.noise))


@pytest.fixture(scope="module")
def pair(small_cnn_module):
    model, inputs = small_cnn_module
    gm, _ = graphopt.optimize(model, inputs, ["channels_last"])
    return model, gm, inputs


MODEL = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


def example_inputs():
    return (torch.randn(2, 3, 8, 8),)
"""


@pytest.fixture(scope="module")
def small_cnn_module():
    ns: dict = {}
    exec(MODEL, ns)
    return ns["model"]().eval(), ns["example_inputs"]()


def _bench(pair, timer, **kw):
    model, gm, inputs = pair
    kw = {"steps": 3, "warmup": 0, "rounds": 3, "memory_steps": 0, "peak": False, **kw}
    return compare({"original": model, "rewritten": gm}, inputs, timer=timer, **kw)


def test_clear_gain_is_decided_at_the_minimum_rounds(pair):
    res = _bench(pair, FakeTimes({"original": 0.010, "rewritten": 0.008}, noise=0.01), max_rounds=20)
    cmp = res.comparisons["rewritten"]
    assert cmp.rounds == 3 and cmp.verdict == "faster" and res.rounds("rewritten") == 3
    assert res.speedup("rewritten") == pytest.approx(1.25, rel=0.02)
    lo, hi = res.speedup_interval("rewritten")
    assert 1.0 < lo < res.speedup("rewritten") < hi and res.verdict("rewritten") == "faster"
    assert res.engine["clock"] == "injected" and res.config["rounds"] == 3
    # wall-time medians are reported next to the paired speedup (here the injected times)
    assert res.variants["original"].step_time_s["median"] == pytest.approx(0.010, rel=0.02)
    assert res.wall_speedup("rewritten") == pytest.approx(1.25, rel=0.03)
    assert res.variants["original"].step_time_s["n"] == 3  # 1 step per round, 3 rounds


def test_no_difference_is_within_noise_and_runs_to_the_cap(pair):
    res = _bench(pair, FakeTimes({"original": 0.010, "rewritten": 0.0099}, noise=0.05), max_rounds=12)
    lo, hi = res.speedup_interval("rewritten")
    assert lo < 1.0 < hi and res.verdict("rewritten") == "within noise"
    assert res.rounds("rewritten") == 12 and res.comparisons["rewritten"].verdict == "undecided"
    assert "within noise" in res.speedup_text("rewritten")
    from graphopt.bench import report as rep

    assert rep.speedup_cell(res, "rewritten").endswith("within noise")


def test_slower_and_time_cap(pair):
    res = _bench(pair, FakeTimes({"original": 0.010, "rewritten": 0.013}, noise=0.01), max_rounds=20)
    assert res.verdict("rewritten") == "slower" and res.speedup_interval("rewritten")[1] < 1.0
    # max_s: no rounds beyond the minimum once that much timed stepping (wall) is spent
    res = _bench(pair, FakeTimes({"original": 0.010, "rewritten": 0.010}, noise=0.05), max_rounds=30, max_s=0.1)
    assert res.rounds("rewritten") == 5  # 3 rounds: 0.06 s; 5 rounds: 0.1 s


def test_default_max_rounds_is_rounds_and_steps_split_over_rounds(pair):
    res = _bench(pair, FakeTimes({"original": 0.010, "rewritten": 0.010}, noise=0.05), steps=6, rounds=3)
    assert res.rounds("rewritten") == 3 and res.config["steps_per_round"] == 2 and res.config["steps"] == 6
    assert res.variants["rewritten"].step_time_s["n"] == 6


def test_bench_and_auto_share_the_engine(pair):
    """The same per-step timings give the same ratio, interval and rounds through bench's compare()
    and the automatic mode's StepMeasurer.compare."""
    model, gm, inputs = pair
    base = {"original": 0.010, "rewritten": 0.0097}
    res = _bench(pair, FakeTimes(base, noise=0.03, seed=3), steps=1, rounds=3, max_rounds=25)
    fake = FakeTimes(base, noise=0.03, seed=3)
    m = StepMeasurer(inputs, device="cpu", warmup=0, rounds=25, steps=1, max_s=None,
                     timer=lambda mod: fake("rewritten" if mod is gm else "original"))
    cmp = m.compare(gm, model)
    b = res.comparisons["rewritten"]
    assert (b.rounds, b.verdict) == (cmp.rounds, cmp.verdict)
    assert b.ratio == pytest.approx(cmp.ratio) and (b.low, b.high) == pytest.approx((cmp.low, cmp.high))


def test_paired_rounds_several_candidates_alternate_and_stop_when_decided():
    order: list[tuple[str, int]] = []
    times = {"base": 1.0, "fast": 0.8, "same": 1.0}
    noise = {n: random.Random(n) for n in times}

    def runner(n):
        return lambda: (times[n] * (1 + noise[n].uniform(-0.03, 0.03)),) * 2

    out = paired_rounds({n: runner(n) for n in times}, "base", rounds=8, min_rounds=3,
                        on_run=lambda n, r: order.append((n, r)))
    assert [n for n, r in order if r == 0] == ["base", "fast", "same"]
    assert [n for n, r in order if r == 1] == ["fast", "same", "base"]  # the starting variant rotates
    fast, same = out.comparisons["fast"], out.comparisons["same"]
    assert fast.verdict == "faster" and fast.rounds == 3  # decided: it stops running
    assert not any(n == "fast" for n, r in order if r >= 3)
    assert same.rounds == out.rounds == 8 and len(out.samples["base"]) == 8
    assert fast.baseline_samples_ms == [v * 1e3 for v in out.samples["base"][:3]]  # paired with its rounds
    est, lo, hi = paired_interval([c / b for c, b in zip(out.samples["same"], out.samples["base"])])
    assert (same.ratio, same.low, same.high) == pytest.approx((est, lo, hi))
    with pytest.raises(ValueError):
        paired_rounds({"a": runner("base")}, "b", rounds=3)


def test_cli_bench_reports_interval_rounds_clock_and_wall_medians(pair, tmp_path, capsys, monkeypatch):
    import importlib

    cmod = importlib.import_module("graphopt.bench.compare")

    real = cmod.compare
    monkeypatch.setattr(cmod, "compare", lambda *a, **kw: real(
        *a, **kw, timer=FakeTimes({"original": 0.010, "rewritten": 0.0099}, noise=0.05)))
    p = tmp_path / "net.py"
    p.write_text(MODEL)
    out = tmp_path / "b"
    code = main(["bench", str(p), "-p", "channels_last", "--steps", "3", "--warmup", "0", "--max-rounds", "6",
                 "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    doc = json.loads((out / "bench.json").read_text())
    v = doc["variants"]["rewritten"]
    assert v["rounds"] == 6 and v["verdict"] == "within noise" and v["clock"] == "injected"
    lo, hi = v["speedup_interval"]
    assert lo < v["speedup_vs_baseline"] < hi and lo < 1 < hi
    assert v["comparison"]["candidate_wall_ms"] == pytest.approx(10.0, rel=0.06)
    assert v["wall_speedup_vs_baseline"] > 0 and v["step_time_s"]["median"] == pytest.approx(0.010, rel=0.06)
    assert doc["engine"]["min_rounds"] == 3 and doc["engine"]["max_rounds"] == 6 and doc["engine"]["max_s"] == 15.0
    assert doc["variants"]["original"]["speedup_interval"] is None and doc["variants"]["original"]["rounds"] is None
    assert "within noise" in text and "6 paired rounds" in text and "wall-time medians" in text
    md = (out / "bench.md").read_text()
    assert "speedup [95% interval]" in md and "within noise" in md and "injected timer" in md
    assert math.isfinite(v["speedup_vs_baseline"])


def test_benchmarks_common_exposes_the_engine():
    import importlib.util
    from pathlib import Path

    from graphopt.bench.measure import Comparison

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common_for_test", path)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    assert common.paired_rounds is paired_rounds and common.StepMeasurer is StepMeasurer
    cmp = Comparison(8.0, 10.0, 0.8, 0.05, 4, low=0.76, high=0.84, clock="thread_cpu", candidate_wall_ms=9.0,
                     baseline_wall_ms=11.0)
    rec = common.speedup_record(cmp)
    assert rec["speedup"] == pytest.approx(1.25) and rec["speedup_interval"] == pytest.approx([1 / 0.84, 1 / 0.76])
    assert rec["verdict"] == "faster" and rec["rounds"] == 4 and rec["wall_speedup"] == pytest.approx(11 / 9)
    assert common.speedup_text(rec) == "1.25x [1.19-1.32], 95%, 4 rounds, thread CPU time"
    calls = {"a": 0, "b": 0}

    def step(n):
        def f():
            calls[n] += 1
        return f

    out = common.paired_steps({"a": step("a"), "b": step("b")}, "a", rounds=4, min_rounds=4, steps_per_round=2,
                              warmup=1, max_s=None)
    assert out.rounds == 4 and calls == {"a": 1 + 8, "b": 1 + 8}  # warm-up, then 4 rounds of 2 steps
    assert out.comparisons["b"].clock == "thread_cpu" and len(out.samples["b"]) == 4


def test_sequential_confidence_is_calibrated_and_deterministic():
    assert sequential_confidence(0.95, 3, 3) == 0.95  # one look: the nominal level
    c = sequential_confidence(0.95, 3, 30)
    assert c == sequential_confidence(0.95, 3, 30, paths=20000)  # fixed seed
    assert 0.99 < c < 0.997  # about 99.4% per look for 28 looks
    assert sequential_confidence(0.95, 3, 5) < c < sequential_confidence(0.95, 3, 100)  # more looks, stricter


@pytest.mark.parametrize("true,lo,hi", [(1.0, 0, 0.06), (0.95, 0.95, 1.0)])
def test_engine_false_keep_rate_under_repeated_looks(true, lo, hi):
    """A candidate exactly as fast as the baseline, 3% noise per round, looked at after every round up
    to 30: declared faster in at most ~2.5% of runs (the nominal per-look rule kept 12% of them), while
    a 5% faster one is still found."""
    rng = random.Random(7)

    def one() -> str:
        runners = {"c": lambda: (true * math.exp(rng.gauss(0, 0.021)), 0.0),
                   "b": lambda: (math.exp(rng.gauss(0, 0.021)), 0.0)}
        return paired_rounds(runners, "b", rounds=30).comparisons["c"].verdict

    verdicts = [one() for _ in range(250)]
    share = verdicts.count("faster") / len(verdicts)
    assert lo <= share <= hi, share


def test_sequential_decisions_benchmark_runs(tmp_path):
    """benchmarks/sequential_decisions.py (the README's false-keep figures) through its own code path,
    few runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sequential_decisions.py"
    spec = importlib.util.spec_from_file_location("sequential_decisions_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--runs", "20", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "sequential_decisions.json").read_text())
    assert len(doc["rows"]) == 12 and 0.99 < doc["decision_confidence"] < 0.997
    big = next(r for r in doc["rows"] if r["noise"] == 0.01 and r["true_ratio"] == 0.9)
    assert big["engine"]["kept"] == 1.0 and big["nominal_every_look"]["kept"] == 1.0
    assert "| 3% | 1.00 |" in (tmp_path / "sequential_decisions.md").read_text()
