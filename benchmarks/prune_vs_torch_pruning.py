"""ResNet-50 at half the MACs: CPU training-step speedup of graphopt's pruned model vs Torch-Pruning's.

Both prune per layer by L1 magnitude with the classifier kept. Torch-Pruning's ratio is found by
bisection so that its model has ~50% of the MACs; graphopt is then given *that* MACs share as
its target (``prune:macs=...``), so both models have the same MACs (within rounding).
graphopt's model is emitted and re-loaded (the artifact users train); all three models
(original, graphopt, Torch-Pruning) are timed in one process by graphopt's measurement engine
(``_common.paired_steps``: warm-up, ``--steps`` paired rounds of one step each, the starting model
rotating, thread CPU time with ``torch.set_num_threads(1)``): each speedup is the geometric mean of
the per-round ratios with its 95% interval, and graphopt vs Torch-Pruning is the same statistic on
their paired rounds ("within noise" when its interval contains 1). Wall-time medians are reported too.

    python benchmarks/prune_vs_torch_pruning.py [--batch 4] [--size 224] [--steps 15]

Writes benchmarks/results/cpu/prune_vs_torch_pruning.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
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
from _common import cpu_name, paired_steps, speedup_record, tp_prune  # noqa: E402

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.bench.measure import paired_interval  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=15, help="paired rounds (one step per model each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.5, help="share of MACs to keep")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import torch_pruning as tp

    load_start = os.getloadavg()
    torch.manual_seed(0)
    base = zoo.build("resnet50").eval()
    x_small = torch.randn(1, 3, 64, 64)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch,))
    macs0 = macs_of(base, x[:1])

    # Torch-Pruning: bisection on its per-layer ratio to reach the MACs target
    lo, hi, tp_model, tp_ratio = 0.0, 0.9, None, None
    t0 = time.perf_counter()
    for _ in range(10):
        mid = (lo + hi) / 2
        cand = tp_prune(base, mid, x_small)
        frac = macs_of(cand, x[:1]) / macs0
        if frac <= args.target:
            hi, tp_model, tp_ratio = mid, cand, mid
        else:
            lo = mid
        if tp_model is not None and abs(frac - args.target) < 0.005:
            break
    tp_time = time.perf_counter() - t0
    tp_macs = macs_of(tp_model, x[:1])
    tp_frac = tp_macs / macs0

    # graphopt: the same MACs share as target, per-layer L1
    t0 = time.perf_counter()
    gm, report = graphopt.optimize(base, (x[:1],), [f"prune:macs={tp_frac:.6f},criterion=l1,scope=per_layer"])
    go_time = time.perf_counter() - t0
    rec = report.records[0]
    with tempfile.TemporaryDirectory() as d:
        graphopt.emit_torch_folder(gm, Path(d) / "pruned", report=report)
        go_model = graphopt.load(Path(d) / "pruned")
    go_macs = macs_of(go_model, x[:1])

    models = {"original": copy.deepcopy(base), "graphopt": go_model, "torch_pruning": tp_model}
    steps = {k: train_step_fn(m, x, y) for k, m in models.items()}
    # every model in every round (min_rounds = rounds): graphopt vs Torch-Pruning is paired on all rounds too
    measured = paired_steps(steps, "original", rounds=args.steps, min_rounds=args.steps, warmup=args.warmup,
                            max_s=None)
    times = measured.wall  # seconds per step, per round
    load_end = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    eng = {k: speedup_record(measured.comparisons[k]) for k in ("graphopt", "torch_pruning")}
    # graphopt's speedup over Torch-Pruning: Torch-Pruning's time / graphopt's, per round
    lo_hi = paired_interval([tp / go for tp, go in zip(measured.samples["torch_pruning"], measured.samples["graphopt"])])
    vs_tp = {"speedup": lo_hi[0], "speedup_interval": [lo_hi[1], lo_hi[2]], "rounds": len(measured.samples["graphopt"]),
             "verdict": "faster" if lo_hi[1] > 1 else "slower" if lo_hi[2] < 1 else "within noise",
             "clock": measured.comparisons["graphopt"].clock}
    gshape = {n: tuple(m.weight.shape) for n, m in go_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    tshape = {n: tuple(m.weight.shape) for n, m in tp_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    differ = {n: [list(gshape[n]), list(tshape[n])] for n in gshape if n in tshape and gshape[n] != tshape[n]}
    first_diff = (f"{next(iter(differ))} graphopt {differ[next(iter(differ))][0]} vs Torch-Pruning "
                  f"{differ[next(iter(differ))][1]}" if differ else "none")
    max_diff = max((abs(a - b) for g, t in differ.values() for a, b in zip(g, t)), default=0)
    result = {
        "benchmark": "prune_vs_torch_pruning",
        "model": "torchvision resnet50 (random init)",
        "device": f"CPU: {cpu_name()}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_pruning_version": tp.__version__,
        "graphopt_version": graphopt.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(load_start),
        "loadavg_end": list(load_end),
        "cpu_count": os.cpu_count(),
        "batch": args.batch,
        "image_size": args.size,
        "steps_measured": args.steps,
        "rounds": args.steps,
        "warmup_steps": args.warmup,
        "clock": measured.comparisons["graphopt"].clock,
        "graphopt_vs_torch_pruning": vs_tp,
        "step": "forward + cross-entropy + backward + SGD(momentum) step, train mode",
        "macs_target": args.target,
        "layers_with_different_shapes": len(differ),
        "max_channel_difference": max_diff,
        "shape_differences": differ,
        "original": {"macs": macs0, "params": params_of(base), "step_s_median": med["original"], "step_s_min": best["original"],
                     "step_s_all": times["original"]},
        "graphopt": {"macs": go_macs, "macs_share": go_macs / macs0, "params": params_of(go_model),
                     "option": rec.spec, "verification": rec.verification.as_dict() if rec.verification else None,
                     "prune_time_s": go_time, "step_s_median": med["graphopt"], "step_s_min": best["graphopt"],
                     "speedup_min": best["original"] / best["graphopt"], "step_s_all": times["graphopt"],
                     "speedup": eng["graphopt"]["speedup"], "speedup_interval": eng["graphopt"]["speedup_interval"],
                     "speedup_wall_medians": med["original"] / med["graphopt"], "engine": eng["graphopt"]},
        "torch_pruning": {"macs": tp_macs, "macs_share": tp_frac, "params": params_of(tp_model),
                          "pruning_ratio": tp_ratio, "importance": "MagnitudeImportance(p=1), per layer",
                          "search_time_s": tp_time, "step_s_median": med["torch_pruning"], "step_s_min": best["torch_pruning"],
                          "speedup_min": best["original"] / best["torch_pruning"],
                          "step_s_all": times["torch_pruning"], "speedup": eng["torch_pruning"]["speedup"],
                          "speedup_interval": eng["torch_pruning"]["speedup_interval"],
                          "speedup_wall_medians": med["original"] / med["torch_pruning"],
                          "engine": eng["torch_pruning"]},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "prune_vs_torch_pruning.json", result)
    g, t = result["graphopt"], result["torch_pruning"]
    cmp = {"faster": "graphopt's model is faster than Torch-Pruning's",
           "slower": "graphopt's model is SLOWER than Torch-Pruning's",
           "within noise": "graphopt's and Torch-Pruning's models are equally fast within the noise"}[vs_tp["verdict"]]

    def iv(r: dict, d: int = 2) -> str:
        return f"{r['speedup']:.{d}f}x [{r['speedup_interval'][0]:.{d}f}-{r['speedup_interval'][1]:.{d}f}]"
    md = f"""# ResNet-50 pruned to ~{args.target:.0%} MACs: CPU training-step speedup, graphopt vs Torch-Pruning

{result['device']}, {result['threads']} thread, torch {result['torch']}, torch-pruning {result["torch_pruning_version"]},
{result['date']}. Machine load (1/5/15 min) at start {tuple(round(v, 2) for v in load_start)}, at end
{tuple(round(v, 2) for v in load_end)} on {result['cpu_count']} cores (shared machine).
Batch {args.batch} at {args.size}x{args.size}; a step = forward, cross-entropy, backward, SGD step (train mode).
{args.warmup} warm-up steps per model, then {args.steps} paired rounds of one step per model (the starting model rotating), in
one process: graphopt's measurement engine. Speedup: geometric mean of the per-round ratios to the original in
{g['engine']['clock_name']}, with its 95% interval; step times: wall.

| model | MACs (per image) | MACs share | params | median step (s, wall) | speedup [95% interval] | speedup (wall medians) | fastest step (s) | speedup (fastest) |
|---|---|---|---|---|---|---|---|---|
| original | {macs0 / 1e9:.3f} G | 100% | {params_of(base) / 1e6:.2f} M | {med['original']:.3f} | 1.00x | 1.00x | {best['original']:.3f} | 1.00x |
| graphopt `{rec.spec}` (emitted + reloaded) | {go_macs / 1e9:.3f} G | {g['macs_share']:.1%} | {g['params'] / 1e6:.2f} M | {med['graphopt']:.3f} | {iv(g)} | {g['speedup_wall_medians']:.2f}x | {best['graphopt']:.3f} | {g['speedup_min']:.2f}x |
| Torch-Pruning (L1, per layer, ratio {tp_ratio:.3f}) | {tp_macs / 1e9:.3f} G | {t['macs_share']:.1%} | {t['params'] / 1e6:.2f} M | {med['torch_pruning']:.3f} | {iv(t)} | {t['speedup_wall_medians']:.2f}x | {best['torch_pruning']:.3f} | {t['speedup_min']:.2f}x |

The two pruned networks have nearly the same architecture: {len(differ)} conv/linear layers differ in shape, by at most
{max_diff} channels (first: {first_diff}). With equal MACs and
shapes, a gap between the two speedups is the shared machine's noise, not the models: their direct paired
comparison says how large that noise is.

Result: {cmp}: graphopt's step is {iv(vs_tp, 3)} as fast as Torch-Pruning's (paired on the same {vs_tp['rounds']}
rounds, 95% interval).
graphopt's pruned model was verified: equal (max rel. error
{(rec.verification.details.get('reference_max_rel_error') if rec.verification else float('nan')):.1e}) to the original
with the same channels masked.
"""
    (out / "prune_vs_torch_pruning.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
