"""freeze: how much less work does backward do? (CPU, measured)

For ResNet-18 and ResNet-50 (10 classes, random init) the script compares a training step of the
unfrozen graph with ``freeze:mode=stages,stages=K`` (K = 2: stem + layer1, K = 3: + layer2) and
``freeze`` (head only):

- backward FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` around ``loss.backward()``;
- backward time and full step time (forward + backward + SGD step) by graphopt's measurement engine
  (``paired_rounds``): ``--steps`` paired rounds of one step per variant after warm-up, the starting
  variant rotating, thread CPU time on one thread; the time ratio vs the unfrozen graph is the
  geometric mean of the per-round ratios with its 95% interval (backward time: the same statistic on
  the backward part of each step). Wall-time medians are reported too;
- trainable parameters before/after (from the pass report).

    python benchmarks/freeze_backward.py [--steps 15] [--batch 8] [--size 64]

Writes benchmarks/results/cpu/freeze_backward.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

from graphopt.bench.measure import paired_interval, paired_rounds  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo
from graphopt.serialize import write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "cpu"
VARIANTS = [("unfrozen", None), ("stages=2", "freeze:mode=stages,stages=2"),
            ("stages=3", "freeze:mode=stages,stages=3"), ("head only", "freeze")]


def backward_flops(model, x, y) -> int:
    model.train()
    loss = F.cross_entropy(model(x), y)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step(model, opt, x, y) -> tuple[float, float, float, float]:
    """(backward thread-CPU s, step thread-CPU s, backward wall s, step wall s) of one training step."""
    c0, t0 = time.thread_time(), time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    c1, t1 = time.thread_time(), time.perf_counter()
    loss.backward()
    c2, t2 = time.thread_time(), time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    c3, t3 = time.thread_time(), time.perf_counter()
    return c2 - c1, c3 - c0, t2 - t1, t3 - t0


def run(arch: str, steps: int, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    model = zoo.build(arch, num_classes=10)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    variants = {}
    for label, spec in VARIANTS:
        if spec is None:
            gm, report = graphopt.optimize(model, (x,), [])
            trainable = report.after.trainable_params
            rec = None
        else:
            gm, report = graphopt.optimize(model, (x,), [spec])
            rec = report.records[0]
            assert rec.verification.status == "passed"
            trainable = rec.after["trainable_params"]
        params = [p for p in gm.parameters() if p.requires_grad]
        variants[label] = {"gm": gm, "opt": torch.optim.SGD(params, lr=0.01, momentum=0.9),
                           "trainable_params": trainable, "bwd": [], "step": [], "bwd_cpu": [],
                           "frozen_stages": rec.notes.get("frozen_stages") if rec else None}
    for label, v in variants.items():
        v["backward_flops"] = backward_flops(v["gm"], x, y)
        v["gm"].train()
        for _ in range(3):  # warm-up
            step(v["gm"], v["opt"], x, y)

    def runner(v):
        def run():
            bc, sc, bw, sw = step(v["gm"], v["opt"], x, y)
            v["bwd_cpu"].append(bc)
            v["bwd"].append(bw)
            v["step"].append(sw)
            return sc, sw
        return run

    # every variant in every round (min_rounds = rounds), so the backward parts are paired on the same rounds
    measured = paired_rounds({label: runner(v) for label, v in variants.items()}, "unfrozen", rounds=steps,
                             min_rounds=steps, clock="thread_cpu")
    base = variants["unfrozen"]
    out = {}
    for label, v in variants.items():
        cmp = measured.comparisons.get(label)
        bwd = paired_interval([b / b0 for b, b0 in zip(v["bwd_cpu"], base["bwd_cpu"]) if b0 > 0])
        out[label] = {
            "trainable_params": v["trainable_params"], "frozen_stages": v["frozen_stages"],
            "backward_flops": v["backward_flops"],
            "backward_flops_vs_unfrozen": v["backward_flops"] / base["backward_flops"],
            "backward_ms_median": 1e3 * statistics.median(v["bwd"]),
            "step_ms_median": 1e3 * statistics.median(v["step"]),
            "backward_cpu_ms_median": 1e3 * statistics.median(v["bwd_cpu"]),
            "step_cpu_ms_median": 1e3 * statistics.median(measured.samples[label]),
            # time ratios vs unfrozen (< 1: less time), thread CPU, paired rounds, with the 95% interval
            "backward_time_vs_unfrozen": 1.0 if cmp is None else bwd[0],
            "backward_time_vs_unfrozen_interval": None if cmp is None else [bwd[1], bwd[2]],
            "step_time_vs_unfrozen": 1.0 if cmp is None else cmp.ratio,
            "step_time_vs_unfrozen_interval": None if cmp is None else [cmp.low, cmp.high],
            "rounds": measured.rounds,
            "step_time_vs_unfrozen_wall_medians": statistics.median(v["step"]) / statistics.median(base["step"]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--archs", default="resnet18,resnet50")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = machine()
    results = {a: run(a, args.steps, args.batch, args.size) for a in args.archs.split(",")}
    meta["loadavg_end"] = list(os.getloadavg())
    doc = {"benchmark": "freeze_backward", **meta, "config": vars(args), "results": results}
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / "freeze_backward.json", doc)
    lines = [
        "# freeze: backward work, measured", "",
        f"{meta['device']}, {meta['threads']} thread, torch {meta['torch']}, {meta['date']}; "
        f"load average {meta['loadavg_start'][0]:.1f} at start, {meta['loadavg_end'][0]:.1f} at end "
        "(shared machine).",
        f"Batch {args.batch} x 3 x {args.size} x {args.size}, 10 classes, random init, SGD; 3 warm-up steps, then "
        f"{args.steps} paired rounds of one step per variant (graphopt's measurement engine: the starting variant "
        "rotating; time ratios vs unfrozen = geometric mean of the per-round ratios in thread CPU time, 95% "
        "interval in brackets; ms: thread CPU medians, wall medians in the JSON). Backward FLOPs counted by "
        "torch's FlopCounterMode.", "",
        "| model | variant | trainable params | backward GFLOPs | vs unfrozen | backward ms | vs unfrozen [95%] | step ms | vs unfrozen [95%] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, res in results.items():
        for label, r in res.items():
            def iv(v, rng):
                return f"{v:.2f}" + (f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else "")

            lines.append(f"| {arch} | {label} | {r['trainable_params']:,} | {r['backward_flops'] / 1e9:.4g} | "
                         f"{r['backward_flops_vs_unfrozen']:.2f} | {r['backward_cpu_ms_median']:.1f} | "
                         f"{iv(r['backward_time_vs_unfrozen'], r['backward_time_vs_unfrozen_interval'])} | "
                         f"{r['step_cpu_ms_median']:.1f} | "
                         f"{iv(r['step_time_vs_unfrozen'], r['step_time_vs_unfrozen_interval'])} |")
    lines += ["", "`stages=K` freezes the first K stages as the `freeze` pass defines them "
              "(ResNet: stem(conv1+bn1), layer1, layer2, ...); frozen BatchNorms become fixed affine ops. "
              "Autograd skips weight gradients of frozen layers and input gradients below the first "
              "trainable layer, which is where the saving comes from."]
    (OUT / "freeze_backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
