"""ResNet-50 ``--target-time 0.5``: latency-aware pruning (graphopt auto) vs Torch-Pruning at the same MACs.

1. graphopt: ``auto_optimize(..., target_time=F)`` — exact candidates decided by measurement, then
   channels removed where the measured per-layer latency table says they save the most time per
   unit of importance (HALP), widths rounded to the fastest measured ones, iterated until the
   measured training step is at most F x the original's.
2. Torch-Pruning (L1 magnitude, per layer, classifier kept) bisected to the *same MACs* as graphopt's
   result; also Torch-Pruning + channels_last (the same exact rewrite graphopt may add), for fairness.
3. All variants timed in one alternated measurement (StepMeasurer: warm-up, rotating order, medians).

Targets (CPU, batch 8, 1 thread): graphopt >= 2.0x and >= 5% ahead of Torch-Pruning.

    python benchmarks/auto_target_time.py [--device cpu|cuda] [--batch 8] [--size 128] [--target 0.5]

Default 128x128 images: the whole run is about 150 s of CPU time (one thread), so it fits the
8-minute budget with benchmarks/auto_exact.py; ``--size 224`` is about 3x the compute (~8 minutes alone
on a quiet 2-core machine). The latency table is measured afresh (a temporary cache) unless
``--cache-dir`` is given, so the search time includes it.

Writes benchmarks/results/<cpu|gpu>/auto_target_time.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import environment, tp_prune, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.auto import auto_optimize  # noqa: E402
from graphopt.bench.measure import StepMeasurer  # noqa: E402


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() // 2


def tp_same_macs(base: nn.Module, goal: int, x: torch.Tensor) -> tuple[nn.Module, float]:
    lo, hi, best, ratio = 0.0, 0.9, None, 0.0
    for _ in range(12):
        mid = (lo + hi) / 2
        cand = tp_prune(base, mid, x)
        if macs_of(cand, x) <= goal:
            hi, best, ratio = mid, cand, mid
        else:
            lo = mid
    return (best if best is not None else tp_prune(base, hi, x)), ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=30, help="cap on paired rounds per decision (the CLI default)")
    ap.add_argument("--final-rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cache-dir", default=None,
                    help="latency-table cache [default: a fresh temporary folder, so the search time includes "
                         "measuring the table]")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    env = environment(args.device)
    torch.manual_seed(0)
    base = zoo.build("resnet50").train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    gm = graphopt.capture(base, (x,))
    m = StepMeasurer((x,), y, device=dev, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="graphopt-latency-")
    t0 = time.perf_counter()
    best, rep = auto_optimize(gm, (x,), device=dev, target=y, measurer=m, target_time=args.target,
                              cache_dir=cache,
                              progress=lambda c: print(f"  {c.pass_} {c.options} kept={c.kept} {c.reason}", flush=True))
    search_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:  # the artifact users train: emitted and re-loaded
        graphopt.emit_torch_folder(best, Path(d) / "auto")
        go_model = graphopt.load(Path(d) / "auto")
    x1 = x[:1]
    macs0, go_macs = macs_of(base, x1), macs_of(go_model, x1)
    t1 = time.perf_counter()
    tp_model, tp_ratio = tp_same_macs(base, go_macs, x1)
    tp_s = time.perf_counter() - t1
    tp_cl = copy.deepcopy(tp_model).to(memory_format=torch.channels_last)

    class CL(nn.Module):  # channels_last inputs as graphopt's rewrite does
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t.contiguous(memory_format=torch.channels_last))

    variants = {"original": base, "graphopt_auto": go_model, "torch_pruning": tp_model,
                "torch_pruning+channels_last": CL(tp_cl)}
    final = StepMeasurer((x,), y, device=dev, warmup=args.warmup, rounds=args.final_rounds, steps=args.steps)
    cpu, samples = final.measure_both(variants)  # (thread CPU time on CPU, wall time)
    med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    speed = {k: med["original"] / v for k, v in med.items()}
    med_cpu = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    speed_cpu = {k: med_cpu["original"] / v for k, v in med_cpu.items()}
    best_tp = max(speed["torch_pruning"], speed["torch_pruning+channels_last"])
    env["loadavg_end"] = list(os.getloadavg())
    doc = {"environment": env, "settings": vars(args), "search_s": search_s, "torch_pruning_s": tp_s,
           "macs": {"original": macs0, "graphopt_auto": go_macs, "torch_pruning": macs_of(tp_model, x1)},
           "torch_pruning_ratio": tp_ratio, "median_ms": med, "speedup": speed,
           "median_cpu_ms": med_cpu, "speedup_cpu": speed_cpu,
           "graphopt_vs_best_torch_pruning": speed["graphopt_auto"] / best_tp, "auto_report": rep.as_dict()}
    rows = ["| variant | MACs (1 image) | MACs share | step ms (median, wall) | speedup (wall) | step CPU ms | "
            "speedup (CPU) |", "|---|---|---|---|---|---|---|"]
    for k in variants:
        mk = doc["macs"].get(k, doc["macs"]["torch_pruning"] if k.startswith("torch") else macs0)
        rows.append(f"| {k} | {mk / 1e9:.3f} G | {mk / macs0:.1%} | {med[k]:.1f} | {speed[k]:.2f}x | {med_cpu[k]:.1f} | "
                    f"{speed_cpu[k]:.2f}x |")
    vs = doc["graphopt_vs_best_torch_pruning"]
    checks = (f"Targets: graphopt {speed['graphopt_auto']:.2f}x ({'>=' if speed['graphopt_auto'] >= 2.0 else 'BELOW'} 2.0x); "
              f"{vs:.3f}x the better Torch-Pruning variant ({'>=' if vs >= 1.05 else 'BELOW'} 1.05x), in wall time. "
              f"In thread CPU time: graphopt {speed_cpu['graphopt_auto']:.2f}x, "
              f"{speed_cpu['graphopt_auto'] / max(speed_cpu['torch_pruning'], speed_cpu['torch_pruning+channels_last']):.3f}x "
              "the better Torch-Pruning variant.")
    md = ("# ResNet-50: `--target-time " + f"{args.target}` (measured-latency pruning) vs Torch-Pruning at the same MACs\n\n"
          + "\n".join(rows) + "\n\n" + checks
          + f"\n\ngraphopt vs the better Torch-Pruning variant: {doc['graphopt_vs_best_torch_pruning']:.3f}x. "
          f"Search (auto incl. measuring the latency table, "
          f"{rep.pruning.get('latency_table', {}).get('measured_now', 0) if rep.pruning else 0} layer shapes) {search_s:.0f} s; Torch-Pruning bisection {tp_s:.0f} s. "
          f"Batch {args.batch}, {args.size}x{args.size}, pipeline: {' '.join(rep.pipeline)}. "
          f"Load average start {env.get('loadavg_1m_5m_15m')}, end {env['loadavg_end']}.\n")
    write_results("auto_target_time", doc, md, device=args.device)
    print(md)


if __name__ == "__main__":
    main()
