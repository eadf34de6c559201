"""Automatic mode: decision logic with a deterministic injected timer (no wall-clock timing), the
report, the CLI end to end, pruning to a (fake-)measured time target, bad input."""

from __future__ import annotations

import json
import random
import textwrap

import pytest
import torch
from torch import nn

import graphopt
from graphopt.auto import auto_optimize
from graphopt.auto.halp import LatencyTable, allocate_widths, keep_cost, next_share, width_grid
from graphopt.bench.measure import (StepMeasurer, noninferior_verdict, noise_margin, paired_interval, paired_verdict,
                                    t_quantile)
from graphopt.cli import main
from graphopt.serialize import dumps


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.b3(self.b2(self.b1(x))).mean((2, 3)))


def _captured():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    return graphopt.capture(Net(), (x,)), (x,)


def _nhwc(conv: nn.Conv2d) -> bool:
    return conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


class FakeTimer:
    """Deterministic step time of a module: per conv 10 ms in NCHW; channels_last makes b1 and b3 faster
    (6 ms) and b2 slower (12 ms); conv cost scales with its weight size; +-0.2% seeded noise."""

    def __init__(self, clock=None, per_call: float = 0.0, cl=(0.6, 1.2, 0.6)) -> None:
        self.rng = random.Random(0)
        self.calls = 0
        self.clock = clock
        self.per_call = per_call
        self.cl = cl

    def __call__(self, module) -> float:
        self.calls += 1
        if self.clock is not None:
            self.clock.t += self.per_call
        t = 0.002
        for name, mod in module.named_modules():
            if isinstance(mod, nn.Conv2d):
                base = 0.010 * mod.weight.numel() / (32 * 32 * 9)
                if _nhwc(mod):
                    base *= self.cl[int(name[1]) - 1] if name[:1] == "b" else 1.0
                t += base
        return t * (1 + self.rng.uniform(-0.002, 0.002))


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _measurer(inputs, timer):
    return StepMeasurer(inputs, device="cpu", warmup=1, rounds=5, steps=1, timer=timer)


def test_t_quantile_matches_tables():
    for df, exact in [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (10_000, 1.960)]:
        assert t_quantile(0.975, df) == pytest.approx(exact, rel=0.01)
    assert t_quantile(0.995, 9) == pytest.approx(3.250, rel=0.01)
    # far tails at few degrees of freedom, where the sequential decisions look (tables: exact CDF)
    for p, df, exact in [(0.999, 2, 22.327), (0.999, 3, 10.215), (0.9995, 5, 6.869)]:
        assert t_quantile(p, df) == pytest.approx(exact, rel=0.002)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7))


def test_paired_interval_and_verdict():
    est, lo, hi = paired_interval([0.9, 0.9, 0.9])
    assert est == pytest.approx(0.9) and lo == pytest.approx(0.9) and hi == pytest.approx(0.9)
    est, lo, hi = paired_interval([0.94, 0.95, 0.96])
    assert lo < est < hi < 1.0
    assert paired_verdict([0.94, 0.95, 0.96]) == "faster"
    assert paired_verdict([0.94, 0.95]) == "undecided"  # below min_rounds: never decided
    assert paired_verdict([0.999, 1.0, 1.001]) == "not faster"  # no 1% gain inside the interval
    assert paired_verdict([1.05, 1.06, 1.04]) == "not faster"  # slower
    assert paired_verdict([0.9, 1.1, 0.95]) == "undecided"  # the interval straddles 1: more rounds
    assert paired_verdict([0.995, 0.996, 0.994]) == "not faster"  # significant but below the 1% minimum gain
    assert noise_margin([1.0, 1.0, 1.0]) == 0.0 and noise_margin([1.0]) == 0.05


def test_final_check_is_non_inferiority():
    # the combination's final check: faster on the estimate and, with confidence, at least 0.98x as fast
    assert noninferior_verdict([0.94, 0.95, 0.96]) == "faster"
    assert noninferior_verdict([0.995, 0.99, 1.0]) == "not slower"  # a small gain, surely no worse than 0.98x
    assert noninferior_verdict([0.96, 1.02, 0.99]) == "undecided"  # could be up to ~1.06x slower: more rounds
    assert noninferior_verdict([1.004, 0.999, 1.001]) == "not faster"  # estimate not faster: never accepted
    assert noninferior_verdict([1.05, 1.06, 1.04]) == "slower"
    assert noninferior_verdict([0.99, 0.99]) == "undecided"  # below min_rounds


class NoisyTimer:
    """Steps of 10 ms; modules whose first conv is channels_last take ``factor`` of that; every step is
    off by up to +-``noise`` (seeded), as on a loaded machine."""

    def __init__(self, factor: float, noise: float, seed: int = 0) -> None:
        self.factor, self.noise, self.rng, self.calls = factor, noise, random.Random(seed), 0

    def __call__(self, module) -> float:
        self.calls += 1
        f = self.factor if _nhwc(module.get_submodule("b1.0")) else 1.0
        return 0.010 * f * (1 + self.rng.uniform(-self.noise, self.noise))


def _cl_pair():
    gm, inputs = _captured()
    cl, _ = graphopt.optimize(gm, inputs, ["channels_last"])
    return gm, cl, inputs


def test_sequential_compare_stops_early_when_clear():
    gm, cl, inputs = _cl_pair()
    timer = NoisyTimer(0.6, 0.01)
    m = StepMeasurer(inputs, device="cpu", warmup=1, rounds=10, steps=1, timer=timer)
    cmp = m.compare(cl, gm)
    assert cmp.faster and cmp.rounds == 3 and cmp.verdict == "faster"  # min_rounds, then decided
    assert timer.calls == 2 + 3 * 2  # one warm-up each, three paired rounds
    assert cmp.low < cmp.ratio < cmp.high < 1.0 and cmp.ratio == pytest.approx(0.6, rel=0.02)
    cmp2 = m.compare(gm, cl)  # both warm already: no warm-up again
    assert timer.calls == 8 + 3 * 2 and cmp2.slower and not cmp2.faster


def test_small_real_gain_under_noise_is_kept_after_more_rounds():
    # a 5% gain under +-4% step noise: the old rule (median ratio beyond the ratios' IQR) rejected such
    # gains; the sequential test runs more rounds until the interval excludes 1
    kept, rounds = 0, []
    for seed in range(5):
        gm, cl, inputs = _cl_pair()
        m = StepMeasurer(inputs, device="cpu", warmup=1, rounds=20, steps=1, timer=NoisyTimer(0.95, 0.04, seed))
        cmp = m.compare(cl, gm)
        kept += cmp.faster
        rounds.append(cmp.rounds)
    assert kept == 5 and max(rounds) > 3


def test_no_gain_under_noise_is_not_kept():
    for seed in range(5):
        gm, cl, inputs = _cl_pair()
        m = StepMeasurer(inputs, device="cpu", warmup=1, rounds=10, steps=1, timer=NoisyTimer(1.0, 0.04, seed))
        cmp = m.compare(cl, gm)
        assert not cmp.faster and cmp.verdict in ("not faster", "undecided")


def test_undecided_stops_at_the_measuring_time_cap():
    # the candidate alternates between 0.90x and 1.07x of the baseline's 10 ms: undecided at any number of
    # rounds; they stop at max_s seconds of timed steps
    class Alternating:
        n = 0

        def __call__(self, module) -> float:
            if not _nhwc(module.get_submodule("b1.0")):
                return 0.010
            self.n += 1
            return 0.010 * (0.90 if self.n % 2 else 1.07)

    gm, cl, inputs = _cl_pair()
    m = StepMeasurer(inputs, device="cpu", warmup=0, rounds=30, steps=1, max_s=0.2, timer=Alternating())
    cmp = m.compare(cl, gm)
    assert cmp.verdict == "undecided" and not cmp.faster and 10 <= cmp.rounds <= 11  # ~0.2 s in rounds of ~20 ms
    assert m.compare(cl, gm, max_s=0.06).rounds == 3  # never fewer than min_rounds
    m.max_s = None
    assert m.compare(cl, gm).rounds == 30  # then the round cap


def test_clock_is_thread_cpu_time_on_one_cpu_thread():
    gm, inputs = _captured()
    assert StepMeasurer(inputs, device="cpu").clock == "thread_cpu"
    assert StepMeasurer(inputs, device="cpu", threads=2).clock == "wall"
    assert StepMeasurer(inputs, device="cpu", clock="wall").clock == "wall"
    m = StepMeasurer(inputs, device="cpu", warmup=1, rounds=3, steps=1)
    cmp = m.compare(gm, gm)  # real steps of a tiny model: both clocks recorded (no timing asserted)
    assert cmp.rounds >= 3 and cmp.candidate_ms > 0 and cmp.candidate_wall_ms > 0
    assert "thread CPU time" in cmp.summary() and not cmp.faster


def test_only_a_candidate_measured_faster_is_verified(monkeypatch):
    from graphopt.auto import search

    calls = []
    build = search._Search.build

    def spy(self, specs, verify=True):
        calls.append(([n for n, _ in specs], verify))
        return build(self, specs, verify)

    monkeypatch.setattr(search._Search, "build", spy)
    gm, inputs = _captured()
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, FakeTimer()))
    verified = [c for c in calls if c[1]]
    kept = [c for c in rep.candidates if c.kept]
    assert len(verified) == len(kept) == 2  # channels_last, then its b2 exclusion: b1/b3 were never verified
    assert rep.pipeline_report.verified
    # nothing kept: no final measurement of the original against itself; its time is the decisions' baseline
    timer = FakeTimer(cl=(1.0, 1.0, 1.0))
    _, rep2 = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, timer), per_layer=False)
    cl = next(c for c in rep2.candidates if c.pass_ == "channels_last")
    assert rep2.kept_original and rep2.original_ms == cl.baseline_ms and rep2.final_comparison is None
    assert timer.calls == 2 + 3 * 2  # warm-ups and three rounds of the one decision, nothing more


def test_keeps_faster_rejects_noise_and_decides_per_region():
    gm, inputs = _captured()
    timer = FakeTimer()
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, timer))
    by = {(c.pass_, c.layer): c for c in rep.candidates}
    assert by[("channels_last", None)].kept  # b1, b2, b3 all NHWC: 0.6+1.2+0.6 of the NCHW time on their convs
    assert by[("channels_last", "b2")].kept  # b2 measured slower in NHWC: excluded again
    assert not by[("channels_last", "b1")].kept and not by[("channels_last", "b3")].kept
    assert not by[("cleanup", None)].kept and "nothing to rewrite" in by[("cleanup", None)].reason or \
        "within noise" in by[("cleanup", None)].reason
    assert "partition" in {c.pass_ for c in rep.candidates if not c.kept}
    assert _nhwc(best.get_submodule("b1.0")) and not _nhwc(best.get_submodule("b2.0")) and _nhwc(best.get_submodule("b3.0"))
    assert rep.pipeline[-1] == "channels_last:exclude=b2|b2.*"
    assert rep.speedup > 1.05 and not rep.kept_original
    torch.testing.assert_close(best(*inputs), gm(*inputs))  # exact
    doc = json.loads(dumps({"auto": rep.as_dict()}))
    assert {"candidates", "speedup"} <= set(doc["auto"])
    for c in doc["auto"]["candidates"]:
        assert {"pass", "options", "layer", "measured_ms", "baseline_ms", "kept", "reason"} <= set(c)


def test_within_noise_is_rejected_and_original_kept():
    gm, inputs = _captured()
    timer = FakeTimer(cl=(0.999, 0.999, 0.999))  # 0.1% faster: inside the 1% floor of the margin
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, timer), per_layer=False)
    cl = next(c for c in rep.candidates if c.pass_ == "channels_last")
    assert not cl.kept and "within noise" in cl.reason
    assert rep.kept_original and best is gm and rep.speedup == 1.0 and rep.pipeline == []


def test_never_slower_final_comparison_keeps_original():
    gm, inputs = _captured()

    class Drifting(FakeTimer):
        """channels_last pays while candidates are decided, then costs more (as if the load changed)."""

        drift = False

        def __call__(self, module):
            t = super().__call__(module)
            if self.drift and _nhwc(module.get_submodule("b1.0")):
                t *= 2.0
            return t

    timer = Drifting()

    def decided(rec):  # after the decision, the final comparison sees the drifted times
        timer.drift = True

    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, timer), per_layer=False,
                              candidates=[("channels_last", {})], progress=decided)
    assert rep.candidates[0].kept
    assert rep.kept_original and best is gm and rep.speedup == 1.0
    assert rep.candidates[-1].pass_ == "combined" and "original is kept" in rep.candidates[-1].reason


def test_time_budget_stops_with_best_so_far():
    gm, inputs = _captured()
    clock = Clock()
    timer = FakeTimer(clock=clock, per_call=1.0)  # every fake step "takes" one second of search time
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, timer), time_budget=5,
                              clock=clock)
    assert rep.not_tried  # the budget ran out: what was not tried is said
    assert len([c for c in rep.candidates if c.measured_ms is not None]) <= 1
    assert rep.budget_s == 5


def test_mixed_precision_declined_on_cpu_with_reason():
    gm, inputs = _captured()
    _, rep = auto_optimize(gm, inputs, device="cpu", measurer=_measurer(inputs, FakeTimer()), per_layer=False)
    mp = next(c for c in rep.candidates if c.pass_ == "mixed_precision")
    assert not mp.kept and "no fast half-precision kernels on cpu" in mp.reason


def test_target_time_prunes_until_fake_measured_target(tmp_path):
    gm, inputs = _captured()
    m = _measurer(inputs, FakeTimer(cl=(1.0, 1.0, 1.0)))

    seen = []

    def layer_time(kind, s):  # fake latency table: proportional to MACs, and width 24 "measures" fast
        seen.append((kind, s))
        fast = 0.5 if s["cout"] == 24 else 1.0
        return 1e-6 * s["cin"] * s["cout"] * (9 if kind == "conv" else 1) * fast

    m.latency_timer = layer_time
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=m, per_layer=False, target_time=0.5,
                              candidates=[], cache_dir=str(tmp_path))
    info = rep.pruning
    assert info["result"] == "pruned" and info["met"]
    assert min(h["ratio"] for h in info["iterations"]) <= 0.5  # the chosen iteration met the target
    assert rep.speedup >= 2.0 * 0.98
    assert best(*inputs).shape == (2, 5)
    widths = {k: v for k, v in info["widths"].items()}
    assert widths and all(after < before for before, after in widths.values())
    # each layer is timed as it trains: with its SGD update, and a conv with the BatchNorm that follows it
    assert all(sh["sgd"] for _, sh in seen) and all(sh["bn"] for k, sh in seen if k == "conv")
    assert (tmp_path / "latency-cpu.json").exists()  # measured layer latencies cached on disk
    cached = LatencyTable(torch.device("cpu"), tmp_path)
    assert len(cached.data) == info["latency_table"]["entries"] > 0


def test_target_time_respects_max_error():
    gm, inputs = _captured()
    m = _measurer(inputs, FakeTimer(cl=(1.0, 1.0, 1.0)))
    m.latency_timer = lambda kind, s: 1e-6 * s["cin"] * s["cout"]
    best, rep = auto_optimize(gm, inputs, device="cpu", measurer=m, per_layer=False, target_time=0.3,
                              max_error=1e-9, candidates=[])
    assert rep.pruning["result"] == "no pruned graph was accepted"
    assert "above --max-error" in rep.pruning["iterations"][0]["stopped"]
    assert best is gm and rep.kept_original


def test_width_grid():
    assert width_grid(64, 8) == [16, 32, 48, 64]  # multiples of 16 from 64 channels
    assert width_grid(48, 5) == [8, 16, 24, 32, 40, 48]
    g = width_grid(2048, 205)
    assert g[-1] == 2048 and all(w % 64 == 0 for w in g) and len(g) <= 13 and g[0] >= 205
    assert all(w % 32 == 0 for w in width_grid(512, 52))
    assert width_grid(10, 1) == list(range(1, 11))


def _table_latency(tables):
    """Modelled latency of widths from per-group latency tables (group -> {width: seconds})."""
    return lambda wd: sum(tables[g][w] for g, w in wd.items())


def test_allocation_prefers_more_ms_saved_per_importance():
    # equal importance per channel; group "a" saves 3 ms per 16 channels, "b" 1 ms: "a" shrinks first
    grids = {"a": [16, 32, 48, 64], "b": [16, 32, 48, 64]}
    tables = {"a": {16: 1.0, 32: 4.0, 48: 7.0, 64: 10.0}, "b": {16: 7.0, 32: 8.0, 48: 9.0, 64: 10.0}}
    cost = {g: keep_cost([1.0] * 64) for g in grids}
    w = allocate_widths({"a": 64, "b": 64}, grids, _table_latency(tables), cost, need_frac=0.15)
    assert w["a"] < 64 and w["b"] == 64
    # the same saving, but "a"'s channels matter 10x more (L1 mass): now "b" goes first
    heavy = keep_cost([10.0] * 64)
    cost2 = {"a": lambda k: 10 * heavy(k), "b": keep_cost([1.0] * 64)}
    w2 = allocate_widths({"a": 64, "b": 64}, grids, _table_latency(tables), cost2, need_frac=0.05)
    assert w2["b"] < 64 and w2["a"] == 64


def test_width_rounding_picks_the_measured_fastest_width():
    # width 48 measures faster than 32 (a faster kernel): after shrinking, the group is raised to 48
    grids = {"a": [16, 32, 48, 64]}
    tables = {"a": {16: 6.0, 32: 7.0, 48: 5.0, 64: 10.0}}
    w = allocate_widths({"a": 64}, grids, _table_latency(tables), {"a": keep_cost([1.0] * 64)}, need_frac=0.3)
    assert w["a"] == 48
    # a slower odd width is skipped for a faster, wider aligned one: 32 -> 48 when 48 is as fast
    tables = {"a": {16: 4.0, 32: 6.0, 48: 6.0, 64: 10.0}}
    w = allocate_widths({"a": 64}, grids, _table_latency(tables), {"a": keep_cost([1.0] * 64)}, need_frac=0.35)
    assert w["a"] == 48


def test_keep_cost_is_comparable_across_group_sizes():
    small, big = keep_cost([1.0] * 64), keep_cost([3.0] * 2048)
    assert abs(small(32) - big(1024)) < 1e-9  # halving costs the same whatever the width or scale
    assert small(16) - small(32) > 0 and abs((small(16) - small(32)) - (small(32) - small(64))) < 1e-9
    skew = keep_cost([0.1] * 32 + [1.0] * 32)  # dropping the low-L1 half costs little
    assert skew(32) < small(32)


def test_next_share_interpolates_on_measured_ratios():
    # one point short of the target: extrapolate further along the measured line
    nxt = next_share([(0.0, 1.0), (0.5, 0.75)], aim=0.5)
    assert abs(nxt - 0.95) < 1e-9  # 1.0 at share 0, 0.5 would need 1.0: capped
    nxt = next_share([(0.0, 1.0), (0.4, 0.8)], aim=0.5)
    assert abs(nxt - 0.95) < 1e-9 or nxt > 0.4
    # bracketed (overshot): interpolate back between the two measured points
    nxt = next_share([(0.0, 1.0), (0.5, 0.7), (0.9, 0.3)], aim=0.5)
    assert abs(nxt - 0.7) < 1e-9


MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.b1(x).mean((2, 3)))

def model():
    return Net()

def example_inputs():
    return (torch.randn(2, 3, 16, 16),)
"""


def test_cli_without_passes_end_to_end(tmp_path, capsys):
    mf = tmp_path / "model.py"
    mf.write_text(textwrap.dedent(MODEL))
    report, out = tmp_path / "r.json", tmp_path / "out"
    code = main(["optimize", str(mf), "--device", "cpu", "--rounds", "3", "--decision-time", "5", "--warmup", "1",
                 "--report", str(report), "-o", str(out), "--cache-dir", str(tmp_path / "cache")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "candidate channels_last" in text  # one progress line per candidate (not a TTY)
    doc = json.loads(report.read_text())
    assert {"candidates", "speedup", "pipeline", "original_ms", "final_ms", "clock", "original_wall_ms",
            "final_wall_ms", "wall_speedup"} <= set(doc["auto"])
    assert doc["auto"]["clock"] == "thread_cpu"  # one CPU thread: decided on the step's thread CPU time
    cl = next(c for c in doc["auto"]["candidates"] if c["pass"] == "channels_last" and c["layer"] is None)
    assert 3 >= cl["comparison"]["rounds"] >= 2 and cl["comparison"]["verdict"] in ("faster", "not faster", "undecided")
    assert len(cl["comparison"]["candidate_samples_ms"]) == cl["comparison"]["rounds"]
    assert doc["auto"]["speedup"] >= 1.0  # never slower: the original is kept otherwise
    assert doc["verified"] is True
    assert report.with_suffix(".png").stat().st_size > 1000
    assert (out / "manifest.json").exists() or any(out.iterdir())
    loaded = graphopt.load(out)
    x = torch.randn(2, 3, 16, 16)
    assert loaded(x).shape == (2, 4)


def test_cli_bad_device_one_line_exit_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    mf = tmp_path / "model.py"
    mf.write_text(textwrap.dedent(MODEL))
    code = main(["optimize", str(mf), "--device", "cuda", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_step_that_cannot_run_exit_2(tmp_path, capsys):
    bad = MODEL.replace("def example_inputs():", "def loss(output, target):\n    raise RuntimeError('no loss here')\n\n"
                                                  "def example_inputs():")
    mf = tmp_path / "model.py"
    mf.write_text(textwrap.dedent(bad))
    code = main(["optimize", str(mf), "--device", "cpu", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "training step cannot run on cpu" in err and err.count("\n") == 1


def test_channels_last_exclude_keeps_region_nchw_exactly(tmp_path):
    gm, inputs = _captured()
    out, rep = graphopt.optimize(gm, inputs, ["channels_last:exclude=b2|b2.*"])
    assert _nhwc(out.get_submodule("b1.0")) and not _nhwc(out.get_submodule("b2.0"))
    assert any(d["target"] == "b2.0" and "exclude" in d["reason"] for d in rep.records[0].declined)
    torch.testing.assert_close(out(*inputs), gm(*inputs))
    graphopt.emit_torch_folder(out, tmp_path / "f", report=rep)
    loaded = graphopt.load(tmp_path / "f")
    assert not _nhwc(loaded.get_submodule("b2.0")) and _nhwc(loaded.get_submodule("b1.0"))


def test_latency_table_measures_a_training_layer_with_batchnorm():
    table = LatencyTable(torch.device("cpu"), None, reps=1)
    shape = {"n": 2, "cin": 4, "cout": 8, "h": 6, "w": 6, "k": [3, 3], "stride": [1, 1], "pad": [1, 1],
             "dil": [1, 1], "groups": 1, "bias": False, "bn": True, "sgd": True}
    t = table.latency("conv", shape)
    assert t > 0 and table.measured == 1
    assert table.latency("conv", shape) == t and table.measured == 1  # looked up, not measured again
