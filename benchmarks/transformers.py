"""Transformer training step: original vs `sdpa`, vs `prune` (heads + MLP at 30%; + hidden width), vs `freeze`.

Two hand-written models (tests/transformer_models.py): a LLaMA-style causal LM with grouped-query
attention and a gated MLP, and a BERT-style encoder with a padding mask. Each variant is built by
graphopt.optimize from the same model; one training step = forward, cross-entropy, backward,
AdamW step. Variants are timed alternately in one process (warm-up, then the median of the
rounds), in wall time and in the main thread's CPU time (``time.thread_time``: on one thread the
forward and the CPU backward run in it, so CPU time is less sensitive to other processes on a
shared machine than wall time). Memory: on CUDA the peak allocated during a step
(torch.cuda.max_memory_allocated); on CPU the bytes autograd saves for backward during the forward
(activation memory, via saved_tensors_hooks) plus parameters, gradients and AdamW state: the
allocator's own peak is not observable on CPU.

    python benchmarks/transformers.py [--device cuda] [--rounds 21] [--batch 8] [--seq 64] [--out DIR]

Runs in under 40 s (load 2.7) or 74 s (load 3.6-4.8) on one CPU thread; 23 s with --rounds 5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from benchmarks._common import environment, write_results  # noqa: E402
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
    ap.add_argument("--rounds", type=int, default=21)
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
    md = [f"batch {args.batch}, sequence {args.seq}; median of {args.rounds} alternated training steps "
          "(forward, loss, backward, AdamW), in wall time and in the main thread's CPU time (on a shared "
          "machine wall time includes waiting for a core; CPU time does not).\n"]
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
                           "times_ms": [], "cpu_ms": []}
        xs = tuple(t.to(dev) for t in x)

        def step(name: str) -> tuple[float, float]:
            gm, opt = built[name]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            c0, t0 = time.thread_time(), time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(gm(*xs))
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3

        for name in built:  # warm-up
            step(name)
        for _ in range(args.rounds):
            for name in built:
                wall, cpu = step(name)
                info[name]["times_ms"].append(wall)
                info[name]["cpu_ms"].append(cpu)
        for name, (gm, _) in built.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step(name)
                info[name]["peak_bytes"] = torch.cuda.max_memory_allocated()
            else:
                info[name]["saved_activation_bytes"] = saved_bytes(gm, xs, loss_fn)
                info[name]["state_bytes"] = state_bytes(gm)
            info[name]["median_ms"] = statistics.median(info[name]["times_ms"])
            info[name]["median_cpu_ms"] = statistics.median(info[name]["cpu_ms"])
        base, base_cpu = info["original"]["median_ms"], info["original"]["median_cpu_ms"]
        md.append(f"\n### {mname}\n")
        mem_col = "peak allocated (MiB)" if dev.type == "cuda" else "saved activations (MiB) | params+grads+AdamW (MiB)"
        md.append(f"| variant | params | trainable | step wall (ms) | speed-up wall | step CPU (ms) | speed-up CPU "
                  f"| {mem_col} |")
        md.append("|---|---|---|---|---|---|---|---" + ("|" if dev.type == "cuda" else "|---|"))
        for name, v in info.items():
            mem = (f"{v['peak_bytes'] / 2**20:.1f}" if dev.type == "cuda"
                   else f"{v['saved_activation_bytes'] / 2**20:.1f} | {v['state_bytes'] / 2**20:.1f}")
            md.append(f"| {name} | {v['params']:,} | {v['trainable']:,} | {v['median_ms']:.1f} | "
                      f"{base / v['median_ms']:.2f}x | {v['median_cpu_ms']:.1f} | {base_cpu / v['median_cpu_ms']:.2f}x "
                      f"| {mem} |")
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
