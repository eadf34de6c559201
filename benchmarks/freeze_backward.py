"""freeze: how much less work does backward do? (CPU, measured)

For ResNet-18 and ResNet-50 (10 classes, random init) the script compares a training step of the
unfrozen graph with ``freeze:mode=stages,stages=K`` (K = 2: stem + layer1, K = 3: + layer2) and
``freeze`` (head only):

- backward FLOPs, counted by ``torch.utils.flop_counter.FlopCounterMode`` around ``loss.backward()``;
- backward time and full step time (forward + backward + SGD step), medians over ``--steps`` steps
  after warm-up, the variants alternated round-robin in one process (the machine is shared);
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


def step(model, opt, x, y) -> tuple[float, float]:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t2 - t1, t3 - t0


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
                           "trainable_params": trainable, "bwd": [], "step": [],
                           "frozen_stages": rec.notes.get("frozen_stages") if rec else None}
    for label, v in variants.items():
        v["backward_flops"] = backward_flops(v["gm"], x, y)
        v["gm"].train()
        for _ in range(3):  # warm-up
            step(v["gm"], v["opt"], x, y)
    for _ in range(steps):  # round-robin: load changes hit every variant alike
        for v in variants.values():
            b, s = step(v["gm"], v["opt"], x, y)
            v["bwd"].append(b)
            v["step"].append(s)
    base = variants["unfrozen"]
    out = {}
    for label, v in variants.items():
        out[label] = {
            "trainable_params": v["trainable_params"], "frozen_stages": v["frozen_stages"],
            "backward_flops": v["backward_flops"],
            "backward_flops_vs_unfrozen": v["backward_flops"] / base["backward_flops"],
            "backward_ms_median": 1e3 * statistics.median(v["bwd"]),
            "step_ms_median": 1e3 * statistics.median(v["step"]),
            "backward_time_vs_unfrozen": statistics.median(v["bwd"]) / statistics.median(base["bwd"]),
            "step_time_vs_unfrozen": statistics.median(v["step"]) / statistics.median(base["step"]),
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
        "(shared machine: variants alternated round-robin, medians).",
        f"Batch {args.batch} x 3 x {args.size} x {args.size}, 10 classes, random init, SGD; "
        f"{args.steps} timed steps per variant after 3 warm-up steps. Backward FLOPs counted by "
        "torch's FlopCounterMode.", "",
        "| model | variant | trainable params | backward GFLOPs | vs unfrozen | backward ms | vs unfrozen | step ms | vs unfrozen |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, res in results.items():
        for label, r in res.items():
            lines.append(f"| {arch} | {label} | {r['trainable_params']:,} | {r['backward_flops'] / 1e9:.4g} | "
                         f"{r['backward_flops_vs_unfrozen']:.2f} | {r['backward_ms_median']:.1f} | "
                         f"{r['backward_time_vs_unfrozen']:.2f} | {r['step_ms_median']:.1f} | "
                         f"{r['step_time_vs_unfrozen']:.2f} |")
    lines += ["", "`stages=K` freezes the first K stages as the `freeze` pass defines them "
              "(ResNet: stem(conv1+bn1), layer1, layer2, ...); frozen BatchNorms become fixed affine ops. "
              "Autograd skips weight gradients of frozen layers and input gradients below the first "
              "trainable layer, which is where the saving comes from."]
    (OUT / "freeze_backward.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
