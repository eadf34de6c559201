"""How long capture and a verified pipeline take on ResNet-50 (targets: capture "well under a
second or two"; capture + a verified exact pass under 2 s on this CPU).

The verified exact pass (channels_last, training "same") is checked for outputs, input and
parameter gradients in eval mode at the model's weights, outputs at a randomized state on a
second batch, and train mode at the randomized state (outputs, gradients, running statistics).

    python benchmarks/capture_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.fx.passes.shape_prop import ShapeProp

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402


def timed(fn, repeats):
    """Median wall seconds, all wall times, median process CPU seconds (one torch thread: CPU time
    is what the work costs, whatever else the machine runs)."""
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), times, statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = zoo.build("resnet50").eval()
    x = (torch.randn(1, 3, 224, 224),)
    graphopt.capture(model, x)  # warm-up (imports, allocator)
    rows = {}
    def fx_reference():
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
        ShapeProp(gm).propagate(*x)

    rows["reference: torch.fx symbolic_trace + ShapeProp (deep copy first)"] = timed(fx_reference, args.repeats)
    rows["capture (trace + shapes + costs)"] = timed(lambda: graphopt.capture(model, x), args.repeats)
    rows["capture + channels_last, --no-verify"] = timed(
        lambda: graphopt.optimize(model, x, ["channels_last"], verify=False), args.repeats)
    rows["capture + channels_last, verified (exact, training same)"] = timed(
        lambda: graphopt.optimize(model, x, ["channels_last"]), args.repeats)
    rows["capture + channels_last + cleanup, --no-verify"] = timed(
        lambda: graphopt.optimize(model, x, ["channels_last", "cleanup"], verify=False), args.repeats)
    rows["capture + channels_last + cleanup, verified"] = timed(
        lambda: graphopt.optimize(model, x, ["channels_last", "cleanup"]), args.repeats)
    data = {"environment": environment(), "model": "torchvision resnet50, 1x3x224x224",
            "seconds_median": {k: v[0] for k, v in rows.items()}, "seconds_all": {k: v[1] for k, v in rows.items()},
            "cpu_seconds_median": {k: v[2] for k, v in rows.items()}}
    md = "| step (ResNet-50, 1x3x224x224) | median s (wall) | median s (CPU) | runs |\n|---|---:|---:|---:|\n" + "".join(
        f"| {k} | {v[0]:.3f} | {v[2]:.3f} | {len(v[1])} |\n" for k, v in rows.items())
    _, report = graphopt.optimize(model, x, ["channels_last"])
    checks = report.records[0].verification.checks
    data["checks"] = checks
    md += ("\nThe verified channels_last runs these checks (each a run of both graphs: forward and backward "
           "where gradients are compared, forward only otherwise; float64 only to confirm a mismatch):\n\n"
           "| check | metric | value | limit |\n|---|---|---:|---:|\n" + "".join(
               f"| {c['check']} | {c.get('metric', '')} | {c.get('value', float('nan')):.1e} | "
               f"{c.get('limit', float('nan')):.2g} |\n" for c in checks))
    folder = write_results("capture_speed", data, md)
    print(md)
    print(f"wrote {folder}/capture_speed.json")


if __name__ == "__main__":
    main()
