"""GPU benchmark: eager float32 vs torch.autocast vs graphopt's mixed-precision graph.

Training steps (forward + cross-entropy + backward + SGD step) of resnet50 and vit_b_16 on
random data, timed with CUDA events after warm-up; the variants are interleaved round by round
in one process and the median per-step time is reported, plus each variant's own peak memory (the
parameters, buffers, gradients and optimizer state it holds, plus one step's transient peak above its
start: all variants are resident at once, so the allocator's absolute peak would mix them):

    eager_fp32            the model as written
    autocast_<dt>         the model under torch.autocast("cuda", dtype) (+ GradScaler for float16)
    graphopt_<dt>         graphopt.optimize(model, x, ["mixed_precision:dtype=<dt>"]) (+ GradScaler for float16)
    *_channels_last       the same with NHWC activations/weights (CNNs only; graphopt's
                          ``channels_last`` pass, eager/autocast via .to(memory_format=...))

Writes benchmarks/results/<device>/precision.{json,md} (after every model). ``--device cuda`` (the
default) needs a CUDA device and refuses otherwise; ``--device cpu`` runs the same code on the CPU (perf_counter,
sampled RSS) as a check of the path, not a measurement: this CPU has no fast half kernels (ENV-NOTES).

    python benchmarks/precision_gpu.py [--models resnet50,vit_b_16] [--dtype float16|bfloat16|both]
                                       [--batch 64] [--image 224] [--steps 30] [--warmup 10] [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import graphopt  # noqa: E402
from graphopt import zoo  # noqa: E402
from graphopt.precision import get_policy, needs_grad_scaler  # noqa: E402
from graphopt.bench.measure import MemoryProbe, StepTimer  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402
from benchmarks._common import cpu_name, device_slug  # noqa: E402


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(name, num_classes=1000)


class Variant:
    def __init__(self, label: str, model: torch.nn.Module, autocast: torch.dtype | None, scaler: bool,
                 channels_last: bool, device: torch.device):
        self.label = label
        self.device = device
        self.model = model
        self.autocast = autocast
        self.channels_last = channels_last
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaler)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                out = self.model(x)
        else:
            out = self.model(x)
        loss = F.cross_entropy(out.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss


def graphopt_graph(name: str, dtype: str, shape: tuple[int, ...], state: dict[str, torch.Tensor],
                   extra: tuple[str, ...] = (), verify: bool = True) -> torch.nn.Module:
    """graphopt's rewrite, captured and verified on a batch of 2 on the CPU, with ``state``'s weights."""
    cpu_model = build(name).eval()
    gm, report = graphopt.optimize(cpu_model, (torch.randn(2, *shape[1:]),),
                                   [f"mixed_precision:dtype={dtype}", *extra], verify=verify)
    if verify and not report.verified:
        raise RuntimeError(f"graphopt's {name} {dtype} graph failed verification")
    gm.load_state_dict({k: v.detach().cpu() for k, v in state.items()})  # strict: same names
    return gm


def variants(name: str, dtype: torch.dtype, x: torch.Tensor, verify: bool = True) -> list[Variant]:
    dname = str(dtype).replace("torch.", "")
    cnn = not name.startswith("vit")
    fp16 = dtype == torch.float16
    dev = x.device
    out: list[Variant] = []
    base = build(name).to(dev).train()
    out.append(Variant("eager_fp32", base, None, False, False, dev))
    out.append(Variant(f"autocast_{dname}", copy.deepcopy(base), dtype, fp16, False, dev))
    # graphopt captures/verifies on a small CPU batch, then the graph moves to the GPU
    gm = graphopt_graph(name, dname, tuple(x.shape), base.state_dict(), verify=verify)
    policy = get_policy(gm)
    out.append(Variant(f"graphopt_{dname}", gm.to(dev).train(), None, needs_grad_scaler(policy), False, dev))
    if cnn:
        cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
        out.append(Variant("eager_fp32_channels_last", cl, None, False, True, dev))
        out.append(Variant(f"autocast_{dname}_channels_last", copy.deepcopy(cl), dtype, fp16, True, dev))
        gm_cl = graphopt_graph(name, dname, tuple(x.shape), base.state_dict(), ("channels_last",), verify)
        gm_cl = gm_cl.to(dev).train()
        for p in gm_cl.parameters():  # keep NHWC on the device copy
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        out.append(Variant(f"graphopt_{dname}_channels_last", gm_cl, None, needs_grad_scaler(policy), True, dev))
    return out


def time_variants(vs: list[Variant], x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> dict[str, Any]:
    dev = x.device
    for v in vs:  # warm-up (cuDNN autotuning, allocator) per variant
        for _ in range(warmup):
            v.step(x, y)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {v.label: [] for v in vs}
    peak: dict[str, int] = {}
    for _ in range(steps):  # interleave variants round by round
        for v in vs:
            t = StepTimer(dev)  # CUDA events on a GPU, perf_counter on CPU
            with t.time():
                v.step(x, y)
            times[v.label].append(t.samples()[0] * 1000)
    for v in vs:  # the variant's own peak: what it holds between steps + one step's transient peak above its start
        # (all variants are resident at once: the allocator's absolute peak would count the others' weights)
        tensors = {id(t): t for t in [*v.model.parameters(), *v.model.buffers(),
                                      *(p.grad for p in v.model.parameters() if p.grad is not None),
                                      *(t for st in v.opt.state.values() for t in st.values()
                                        if isinstance(t, torch.Tensor))]}
        held = sum(t.numel() * t.element_size() for t in tensors.values())
        with MemoryProbe(dev) as probe:  # CUDA: the allocator; CPU: sampled RSS
            v.step(x, y)
        peak[v.label] = held + probe.delta
    res = {}
    for v in vs:
        t = times[v.label]
        res[v.label] = {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                        "steps": len(t), "peak_mem_bytes": peak[v.label],
                        "images_per_s": x.shape[0] / (statistics.median(t) / 1000)}
    return res


def write(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "precision.json", results)
    lines = [f"# Mixed precision training step: {results['device']}", "",
             f"torch {results['torch']}, " + (f"CUDA {results['cuda']}, " if results.get("cuda") else "")
             + f"{results['date']}, batch {results['batch']}, image {results.get('image', 224)}, "
             f"{results['steps']} timed steps after {results['warmup']} warm-up (median, "
             f"{'CUDA events' if results.get('device_kind', 'cuda') == 'cuda' else 'perf_counter, CPU: a path check'}), "
             f"variants interleaved; load average {results['loadavg']}.", ""]
    for model, per_dtype in results["models"].items():
        for dname, res in per_dtype.items():
            base = res["eager_fp32"]["median_ms"]
            ac = next(v["median_ms"] for k, v in res.items() if k == f"autocast_{dname}")
            lines += [f"## {model}, {dname}", "", "| variant | median ms/step | vs eager fp32 | vs autocast | images/s | peak MiB |",
                      "|---|---:|---:|---:|---:|---:|"]
            for label, r in res.items():
                lines.append(f"| {label} | {r['median_ms']:.2f} | {base / r['median_ms']:.2f}x | "
                             f"{ac / r['median_ms']:.2f}x | {r['images_per_s']:.0f} | {r['peak_mem_bytes'] / 2**20:.0f} |")
            lines.append("")
    (out_dir / "precision.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,vit_b_16")
    ap.add_argument("--dtype", default="both", choices=("float16", "bfloat16", "both"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=224, help="input height and width")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the same code on the CPU, a check of the path (not a measurement)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None, help="results folder [benchmarks/results/<device>]")
    ap.add_argument("--no-verify", action="store_true", help="skip graphopt's CPU verification of the graphs")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("precision_gpu.py needs a CUDA device: torch.cuda.is_available() is False here. "
              "Half-precision speed is a GPU property (ENV-NOTES: CPU half kernels are 9-13x slower "
              "than float32); run this on a GPU machine.", file=sys.stderr)
        return 2
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        dev = torch.cuda.get_device_name(0)
    else:
        torch.set_num_threads(1)
        dev = "CPU: " + cpu_name()
    dtypes = [torch.float16, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    results: dict[str, Any] = {
        "device": dev, "device_kind": args.device, "image": args.image, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "batch": args.batch,
        "steps": args.steps, "warmup": args.warmup, "loadavg": list(os.getloadavg()), "models": {}}
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" / device_slug(dev) if args.device == "cuda"
                                           else ROOT / "out" / "precision_gpu" / device_slug(dev))
    for name in args.models.split(","):
        x = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
        y = torch.randint(0, 1000, (args.batch,), device=args.device)
        results["models"][name] = {}
        for dt in dtypes:
            vs = variants(name, dt, x, verify=not args.no_verify)
            res = time_variants(vs, x, y, args.steps, args.warmup)
            results["models"][name][str(dt).replace("torch.", "")] = res
            for label, r in res.items():
                print(f"{name:10s} {label:34s} {r['median_ms']:8.2f} ms/step  {r['peak_mem_bytes'] / 2**20:8.0f} MiB")
            del vs
            if args.device == "cuda":
                torch.cuda.empty_cache()
        write(results, out)  # after every model: a session cut short keeps what it finished
    print(f"wrote {out / 'precision.json'} and {out / 'precision.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
