"""ResNet-50 split into 2 and 4 pipeline stages, by MACs and by measured time.

For every split: the partition pass's own numbers (stage costs, balance max/mean, bytes
crossing each cut, predicted bubble) and a *measurement* of the stages it produced: each
stage module's forward+backward time on its real inputs (stages alternated within one
process, warm-up, median), so the balance predicted by the cost model can be compared with
the balance the stages actually have on this CPU.

    python benchmarks/partition_resnet50.py [--batch 4] [--repeats 5] [--profile-repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.dist import split_stages  # noqa: E402


def stage_times(stages, repeats: int) -> list[float]:
    """Median forward+backward seconds of each stage on its own example inputs (training mode)."""
    runs: list[list[float]] = [[] for _ in stages]
    for r in range(repeats + 1):  # first round is warm-up
        for i, st in enumerate(stages):
            st.train()
            xs = [x.detach().clone().requires_grad_(x.is_floating_point() and i > 0)
                  for x in st.meta["graphopt"]["example_inputs"]]
            t0 = time.perf_counter()
            out = st(*xs)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            torch.autograd.backward([o for o in outs if o.requires_grad],
                                    [torch.ones_like(o) for o in outs if o.requires_grad])
            dt = time.perf_counter() - t0
            st.zero_grad(set_to_none=True)
            if r:
                runs[i].append(dt)
    return [statistics.median(r) for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile-repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = zoo.build("resnet50").eval()
    x = (torch.randn(args.batch, 3, 224, 224),)
    env = environment()
    results = []
    for by in ("macs", "time"):
        for stages in (2, 4):
            spec = f"partition:stages={stages},by={by},microbatches=8"
            if by == "time":
                spec += f",repeats={args.profile_repeats}"
            t0 = time.perf_counter()
            gm, report = graphopt.optimize(model, x, [spec], verify=False)
            elapsed = time.perf_counter() - t0
            plan = gm.meta["graphopt"]["partition"]
            measured = stage_times(split_stages(gm), args.repeats)
            mean = sum(measured) / len(measured)
            results.append({
                "by": by, "stages": stages, "pass_seconds": elapsed,
                "stage_costs": plan["stage_costs"], "unit": plan["unit"], "balance": plan["balance"],
                "cuts": [{"after": c["after"], "tensors": [t["name"] for t in c["tensors"]], "bytes": c["bytes"]}
                         for c in plan["cuts"]],
                "cut_bytes_total": plan["cut_bytes_total"], "bubble": plan["bubble"],
                "measured_stage_seconds": measured, "measured_balance": max(measured) / mean,
            })
            r = results[-1]
            print(f"by={by} stages={stages}: balance {r['balance']:.3f} (measured {r['measured_balance']:.3f}), "
                  f"cuts {[c['after'] for c in r['cuts']]}, {r['cut_bytes_total']} B, pass {elapsed:.1f} s",
                  flush=True)
    env["loadavg_end"] = list(__import__("os").getloadavg())
    data = {"environment": env, "model": f"torchvision resnet50, {args.batch}x3x224x224, fp32",
            "target": "by=macs balance max/mean <= 1.10 for 2 and 4 stages", "results": results}
    md = [f"ResNet-50 ({args.batch}x3x224x224) split with `partition` (max_crossing=2, slack=0.05). "
          "*balance* is max/mean of the stage costs the pass balanced; *measured* is max/mean of each stage's "
          "forward+backward time, measured after the split on this CPU (1 thread, median of "
          f"{args.repeats}). Bubble: predicted idle fraction at 8 microbatches (communication not included).\n",
          "| by | stages | balance (pass) | measured fwd+bwd balance | stage costs | cuts (tensors) | bytes crossing "
          "| bubble predicted / balanced | pass time s |",
          "|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in results:
        costs = (", ".join(f"{c / 1e9:.3f} G" for c in r["stage_costs"]) if r["by"] == "macs"
                 else ", ".join(f"{c * 1000:.0f} ms" for c in r["stage_costs"]))
        cuts = "; ".join(f"{c['after']} ({len(c['tensors'])})" for c in r["cuts"])
        md.append(f"| {r['by']} | {r['stages']} | {r['balance']:.3f} | {r['measured_balance']:.3f} | {costs} | "
                  f"{cuts} | {r['cut_bytes_total'] / 2**20:.2f} MiB | {r['bubble']['predicted'] * 100:.1f}% / "
                  f"{r['bubble']['ideal'] * 100:.1f}% | {r['pass_seconds']:.1f} |")
    md.append("")
    md.append("Measured stage times per split (ms): " + "; ".join(
        f"{r['by']}/{r['stages']}: " + ", ".join(f"{t * 1000:.0f}" for t in r["measured_stage_seconds"])
        for r in results) + ".")
    md.append("")
    md.append(f"Load average at the end: {env['loadavg_end']} (the machine is shared by several engineers; "
              "time measurements are noisy: by=time profiles each node in isolation, so a busy neighbour "
              "moves its stage costs).")
    folder = write_results("partition_resnet50", data, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {folder}/partition_resnet50.json")


if __name__ == "__main__":
    main()
