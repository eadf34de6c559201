"""Transformer training step: original vs `sdpa`, vs `prune` (heads + MLP at 30%; + hidden width), vs `freeze`.

Two hand-written models (tests/transformer_models.py): a LLaMA-style causal LM with grouped-query
attention and a gated MLP, and a BERT-style encoder with a padding mask. Each variant is built by
graphopt.optimize from the same model; one training step = forward, cross-entropy, backward,
AdamW step. Variants are timed by graphopt's measurement engine in one process
(``benchmarks/_common.paired_steps``: warm-up, paired rounds with the starting variant rotating,
thread CPU time on one CPU thread; the speed-up vs the original is the geometric mean of the
per-round ratios with its 95% interval, at least ``--rounds`` rounds, more while undecided up to
``--max-rounds``); the step time shown is the wall-time median. Memory: on CUDA the peak allocated during a step (torch.cuda.max_memory_allocated); on
CPU the bytes autograd saves for backward during the forward (activation memory, via
saved_tensors_hooks) plus parameters, gradients and AdamW state: the allocator's own peak is not
observable on CPU.

    python benchmarks/transformers.py [--device cuda] [--rounds 5] [--max-rounds 15] [--batch 8] [--seq 64] [--out DIR]

Runs in about 20 s on one quiet CPU thread (5-15 paired rounds per model; about 0.15 s per step and variant).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from benchmarks._common import environment, paired_steps, speedup_record, write_results  # noqa: E402
from tests.transformer_models import Bert, Llama  # noqa: E402

VARIANTS = {"original": [], "sdpa": ["sdpa"], "prune 30%": ["prune:ratio=0.3"],
            "prune 30% + hidden": ["prune:ratio=0.3,hidden=true"],
            "freeze": ["freeze:mode=modules,modules=tok|pos|blocks.0.*|blocks.1.*"]}


def models(batch: int, T: int) -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...], Any]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (batch, T), generator=g)
    llama = Llama(vocab=512, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, mlp=688, max_len=T).eval()
    mask = torch.ones(batch, T, dtype=torch.long)
    mask[: batch // 2, T * 3 // 4:] = 0
    bert = Bert(vocab=512, dim=256, n_layers=4, n_heads=8, mlp=1024, max_len=T, classes=4).eval()
    labels = torch.randint(0, 4, (batch,), generator=g)

    def lm_loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1).to(out.device))

    def cls_loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, labels.to(out.device))

    return {"llama_gqa": (llama, (ids,), lm_loss), "bert": (bert, (ids, mask), cls_loss)}


def saved_bytes(module: torch.nn.Module, x: tuple[torch.Tensor, ...], loss_fn: Any) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(module(*x))
    loss.backward()
    module.zero_grad(set_to_none=True)
    return total


def state_bytes(module: torch.nn.Module) -> int:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return params + 3 * trainable  # + gradients + AdamW's two moments


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="paired rounds always run")
    ap.add_argument("--max-rounds", type=int, default=15, help="more rounds while a speed-up is undecided")
    ap.add_argument("--decision-time", type=float, default=30.0, help="seconds of timed steps per model, at most")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder [benchmarks/results/cpu, or benchmarks/results/gpu with --device cuda]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    env = environment(args.device)
    results: dict[str, Any] = {"environment": env, "batch": args.batch, "seq": args.seq, "models": {}}
    md = [f"batch {args.batch}, sequence {args.seq}; training step = forward, loss, backward, AdamW. Speed-up vs "
          f"the original: graphopt's measurement engine (paired rounds of one step per variant, the starting "
          f"variant rotating, at least {args.rounds} and at most {args.max_rounds} rounds or "
          f"{args.decision_time:g} s of timed steps; geometric mean of the per-round ratios with its 95% interval, "
          "\"within noise\" when it contains 1); step (ms): wall-time median.\n"]
    for mname, (model, x, loss_fn) in models(args.batch, args.seq).items():
        built: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        info: dict[str, Any] = {}
        for vname, passes in VARIANTS.items():
            gm, report = graphopt.optimize(model, x, passes) if passes else (graphopt.capture(model, x), None)
            gm = gm.to(dev).train()
            params = [p for p in gm.parameters() if p.requires_grad]
            built[vname] = (gm, torch.optim.AdamW(params, lr=1e-4))
            info[vname] = {"params": sum(p.numel() for p in gm.parameters()), "trainable": sum(p.numel() for p in params),
                           "verification": [r.verification.summary() for r in report.records] if report else [],
                           "times_ms": []}
        xs = tuple(t.to(dev) for t in x)

        def step(name: str) -> None:
            gm, opt = built[name]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(gm(*xs))
            loss.backward()
            opt.step()

        measured = paired_steps({name: (lambda name=name: step(name)) for name in built}, "original",
                                rounds=args.max_rounds, min_rounds=args.rounds, warmup=1, device=args.device,
                                threads=args.threads, max_s=args.decision_time)
        for name in built:
            info[name]["times_ms"] = [w * 1e3 for w in measured.wall[name]]
            info[name]["speedup"] = (speedup_record(measured.comparisons[name]) if name != "original" else None)
        for name, (gm, _) in built.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step(name)
                torch.cuda.synchronize()
                info[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
            else:
                info[name]["saved_activation_bytes"] = saved_bytes(gm, xs, loss_fn)
                info[name]["state_bytes"] = state_bytes(gm)
            info[name]["median_ms"] = statistics.median(info[name]["times_ms"])
        md.append(f"\n### {mname}\n")
        mem_col = "peak allocated (MiB)" if dev.type == "cuda" else "saved activations (MiB) | params+grads+AdamW (MiB)"
        clock = next((v["speedup"]["clock_name"] for v in info.values() if v["speedup"]), "")
        md.append(f"| variant | params | trainable | step (ms) | speed-up [95% interval], {clock} | rounds | {mem_col} |")
        md.append("|---|---|---|---|---|---|---" + ("|" if dev.type == "cuda" else "|---|"))
        for name, v in info.items():
            mem = (f"{v['peak_bytes'] / 2**20:.1f}" if dev.type == "cuda"
                   else f"{v['saved_activation_bytes'] / 2**20:.1f} | {v['state_bytes'] / 2**20:.1f}")
            sp = v["speedup"]
            cell = "1.00x" if sp is None else (f"{sp['speedup']:.2f}x [{sp['speedup_interval'][0]:.2f}-"
                                                f"{sp['speedup_interval'][1]:.2f}]"
                                                + (" within noise" if sp["verdict"] == "within noise" else ""))
            md.append(f"| {name} | {v['params']:,} | {v['trainable']:,} | {v['median_ms']:.1f} | {cell} | "
                      f"{'-' if sp is None else sp['rounds']} | {mem} |")
        results["models"][mname] = info
    results["loadavg_at_end"] = list(os.getloadavg())
    md.append(f"\nLoad average at the end: {[round(v, 2) for v in results['loadavg_at_end']]}.")
    md.append("\nVariants: `sdpa` (hand-written attention -> scaled_dot_product_attention), "
              "`prune:ratio=0.3` (attention heads by key/value group + MLP width), "
              "`prune:ratio=0.3,hidden=true` (the same + 30% of the hidden width: embeddings, LayerNorms, "
              "every residual add; approximate, not verified exactly against the masked original), "
              "`freeze` (embeddings and the first 2 of 4 blocks).")
    write_results("transformers", results, "\n".join(md) + "\n", args.device, args.out)
    print("\n".join(md))
    return results


if __name__ == "__main__":
    main()
