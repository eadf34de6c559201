"""Cost of the data-aware channel selection (``prune:criterion=reconstruction``) against magnitude (``l1``)
on torchvision ResNet-50 (random weights): wall time of the prune pass alone (``PassRecord.time_s``:
channel analysis, scoring, planning, slicing; no ``reconstruct`` refit, no verification), at
``ratio`` 0.3, with N calibration batches of random normal images.

For ``reconstruction`` the time inside the selection is split into its phases (the calibration
forward that collects each consumer's inputs, the Gram matrices and their inverses, the greedy),
so where the time goes is in the file. Both criteria keep the same channel counts (per-layer ratio);
the file says whether the pruned models' parameter shapes match.

    python benchmarks/selection_cost.py [--batches 4] [--batch 8] [--size 224] [--ratio 0.3] [--repeats 3]

One CPU thread (``torch.set_num_threads(1)``). The l1 pass is repeated ``--repeats`` times (median);
the reconstruction pass ``--rec-repeats`` times (default 1). Writes
benchmarks/results/cpu/selection_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import environment, write_results  # noqa: E402

import graphopt  # noqa: E402
from graphopt.ir import graph_meta  # noqa: E402
from graphopt.manager import PassManager  # noqa: E402
from graphopt.pass_infra import build_pipeline  # noqa: E402
from graphopt.zoo import torchvision_model  # noqa: E402


def _phase_timers() -> tuple[dict[str, float], list]:
    """Wrap the selection's phases with wall-clock accumulators; returns (totals, undo list)."""
    from graphopt.prune import selection as sel

    tot: dict[str, float] = defaultdict(float)
    undo = []

    def wrap(owner, name, key):
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                tot[key] += time.perf_counter() - t

        setattr(owner, name, timed)
        undo.append((owner, name, orig))

    wrap(sel, "reconstruction_scores", "selection total")
    wrap(sel, "_consumer_inputs", "calibration forward + im2col rows")
    wrap(sel._Consumer, "__init__", "Gram matrices + inverses")
    wrap(sel._Consumer, "costs", "greedy: candidate costs")
    wrap(sel._Consumer, "remove", "greedy: removal updates")
    return tot, undo


def run_once(gm0, batches, spec: str):
    gm = copy.deepcopy(gm0)
    graph_meta(gm)["calibration_data"] = batches
    t = time.perf_counter()
    out, report = PassManager(build_pipeline([spec], None), verify=False).run(gm, batches[0])
    wall = time.perf_counter() - t
    return out, report.records[0], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="calibration batches N")
    ap.add_argument("--batch", type=int, default=8, help="images per calibration batch")
    ap.add_argument("--size", type=int, default=224, help="image height = width")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3, help="l1 passes (median)")
    ap.add_argument("--rec-repeats", type=int, default=1, help="reconstruction passes (median)")
    ap.add_argument("--tag", default="", help="suffix of the result files (selection_cost<tag>.*)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = environment()
    model = torchvision_model("resnet50").eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g),) for _ in range(args.batches)]
    gm0 = graphopt.capture(model, batches[0])
    rows = {}
    shapes = {}
    phases = {}
    for crit, reps in (("l1", args.repeats), ("reconstruction", args.rec_repeats)):
        spec = f"prune:ratio={args.ratio},criterion={crit},batches={args.batches}"
        times, walls = [], []
        for _ in range(reps):
            tot, undo = _phase_timers() if crit == "reconstruction" else ({}, [])
            try:
                out, rec, wall = run_once(gm0, batches, spec)
            finally:
                for owner, name, orig in undo:
                    setattr(owner, name, orig)
            times.append(rec.time_s)
            walls.append(wall)
            if tot:
                phases = dict(tot)
            print(f"{crit}: pass {rec.time_s:.2f} s (load {os.getloadavg()[0]:.2f})", flush=True)
        shapes[crit] = [tuple(p.shape) for p in out.parameters()]
        rows[crit] = {"spec": spec, "pass_s": times, "pass_s_median": statistics.median(times),
                      "manager_wall_s": walls, "macs_before": rec.before.get("macs"),
                      "macs_after": rec.after.get("macs"),
                      "params_after": sum(p.numel() for p in out.parameters())}
    ratio = rows["reconstruction"]["pass_s_median"] / rows["l1"]["pass_s_median"]
    env_end = list(os.getloadavg())
    data = {"environment": env, "load_average_end": env_end,
            "model": "torchvision resnet50, random weights (seed 0)",
            "calibration": {"batches": args.batches, "batch": args.batch, "size": args.size,
                            "data": "random normal (seed 0)"},
            "ratio": args.ratio, "results": rows, "reconstruction_phases_s": phases,
            "reconstruction_over_l1": ratio, "same_shapes": shapes["l1"] == shapes["reconstruction"]}
    md = [f"# Selection cost: `criterion=reconstruction` vs `l1` on ResNet-50\n",
          f"torchvision ResNet-50 (random weights), `prune:ratio={args.ratio}` (structured, per layer), "
          f"{args.batches} calibration batches of {args.batch}x3x{args.size}x{args.size} random normal images, "
          f"1 CPU thread. Time of the prune pass alone (analysis, scoring, planning, slicing; no `reconstruct` "
          f"refit, no verification). Load average (1 min) {env['loadavg_1m_5m_15m'][0]:.2f} at the start, "
          f"{env_end[0]:.2f} at the end (2 cores shared with other engineers' jobs).\n",
          "| criterion | prune pass s (median) | runs | MACs after |", "|---|---:|---|---:|"]
    for crit, r in rows.items():
        md.append(f"| `{crit}` | {r['pass_s_median']:.2f} | {', '.join(f'{t:.2f}' for t in r['pass_s'])} "
                  f"| {r['macs_after']} |")
    md.append(f"\n`reconstruction` / `l1`: **{ratio:.1f}x**. Same parameter shapes: "
              f"{data['same_shapes']}.\n")
    if phases:
        md += ["Where the reconstruction selection's time goes (wall s of its last run, summed over groups; the "
               "phases nest inside `selection total`):\n", "| phase | s |", "|---|---:|"]
        md += [f"| {k} | {v:.2f} |" for k, v in phases.items()]
    folder = write_results("selection_cost" + args.tag, data, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {folder}/selection_cost{args.tag}.json")


if __name__ == "__main__":
    main()
