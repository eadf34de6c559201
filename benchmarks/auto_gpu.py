"""Automatic mode on the GPU vs torch.autocast, torch.compile and eager float32 (issue 13, item 5).

Per model (default: ResNet-50 and the GPT-style decoder of benchmarks/models/): graphopt's automatic
mode (``graphopt.auto.auto_optimize``, the engine `graphopt optimize MODEL.py --device cuda` runs:
candidates decided by the measured training step, verified on the CPU at the model file's example
inputs, or at the measured inputs for a graph captured at a fixed batch size), then one alternated measurement of the training step (forward, loss, backward, SGD step) of

    eager_fp32         the model as written
    autocast_bf16      under torch.autocast(device, bfloat16)
    autocast_fp16      under torch.autocast(device, float16) with a GradScaler
    compile            torch.compile(model) (default mode); compilation is the warm-up, time-boxed
                       (--compile-timeout): a compile that fails or runs over is recorded as
                       "skipped: reason", not a failure
    graphopt_auto      the graph automatic mode chose (its precision policy applied: GradScaler for
                       float16, float32 master weights for pure-half graphs)

Every variant is warmed up, then timed in rounds whose starting variant rotates (``steps`` steps per
variant per round; CUDA events on a GPU, so times are device times; perf_counter on CPU); reported:
the median of the per-round means, the speed-up vs eager float32 (1 / the geometric mean of the paired
per-round ratios, with its 95% interval) and the variant's own peak memory (what it holds between steps
plus one step's transient peak above its start: CUDA allocator; on CPU the sampled RSS). Results are written after every model (a run stopped by a
time limit keeps what it finished).

    python benchmarks/auto_gpu.py --device cuda [--models resnet50,gpt] [--batch 64] [--image 224]
    python benchmarks/auto_gpu.py --device cpu --quick     # the same code on CPU, tiny settings

Writes <out>/auto_gpu.{json,md}; default out: benchmarks/results/<device name>/ on CUDA (committed),
out/auto_gpu/<device name>/ on CPU (a CPU run only proves the code path: this CPU has no fast half
kernels, ENV-NOTES).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# benchmarks/ must not be on the path: its transformers.py would shadow the transformers package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
from benchmarks._common import device_name, device_slug  # noqa: E402

import graphopt  # noqa: E402
from graphopt.auto import auto_optimize  # noqa: E402
from graphopt.bench.compare import synthetic_target  # noqa: E402
from graphopt.bench.measure import MemoryProbe, StepMeasurer, StepTimer, alternate, environment, paired_interval  # noqa: E402
from graphopt.bench.torch_backend import TorchBackend  # noqa: E402
from graphopt.cli.auto import rebatch  # noqa: E402
from graphopt.modelfile import load_model_file  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402

MODELS = {"resnet50": "benchmarks/models/resnet50.py", "gpt": "benchmarks/models/gpt.py",
          "bert": "benchmarks/models/bert.py", "resnet18": "benchmarks/models/resnet18.py",
          "mobilenet_v2": "benchmarks/models/mobilenet_v2.py", "vit_tiny": "benchmarks/models/vit_tiny.py"}
VARIANTS = ("eager_fp32", "autocast_bf16", "autocast_fp16", "compile", "graphopt_auto")
CNNS = {"resnet50", "resnet18", "mobilenet_v2"}

# settings per device: (cuda = the GPU session's run; cpu --quick = the same code with tiny settings)
DEFAULTS = {
    "cuda": dict(batch=64, image=224, rounds=10, steps=5, warmup=3, auto_rounds=10, decision_time=3.0,
                 auto_budget=45.0, compile_timeout=90.0),
    "cpu": dict(batch=4, image=64, rounds=4, steps=2, warmup=2, auto_rounds=6, decision_time=4.0,
                auto_budget=40.0, compile_timeout=60.0),
    "cpu_quick": dict(batch=2, image=32, rounds=2, steps=1, warmup=1, auto_rounds=3, decision_time=0.5,
                      auto_budget=10.0, compile_timeout=10.0),
}


class Skipped(Exception):
    """A variant that cannot be measured here (recorded as ``skipped: reason``)."""


@contextlib.contextmanager
def time_box(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`Skipped` in the main thread after ``seconds`` (SIGALRM); no limit elsewhere."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Skipped(f"{what} did not finish within {seconds:g} s (--compile-timeout)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Runner:
    """One variant's training step: a TorchBackend (SGD, loss in float32) on its own copy of the model,
    optionally under autocast (+ GradScaler) or torch.compile."""

    def __init__(self, label: str, module: torch.nn.Module, loss: Callable[..., torch.Tensor], device: torch.device,
                 inputs: tuple[torch.Tensor, ...], target: torch.Tensor, *, autocast: torch.dtype | None = None,
                 scaler: bool = False, compile: bool = False, policy: bool = False):
        self.label = label
        self.be = TorchBackend(copy.deepcopy(module), loss=loss, optimizer="sgd", lr=0.01, device=device,
                               precision="auto" if policy else None, compile=compile)
        if autocast is not None:
            inner = self.be.runner

            def run(*a: Any) -> Any:
                with torch.autocast(device.type, dtype=autocast):
                    return inner(*a)

            self.be.runner = run
        if scaler:
            self.be.scaler = torch.amp.GradScaler(device.type)
        self.data = self.be.prepare(inputs, target)

    def step(self) -> None:
        self.be.step(*self.data)


def measure_inputs(name: str, spec: Any, batch: int, image: int | None) -> tuple[torch.Tensor, ...]:
    """The model file's example inputs at the benchmark's batch (and image size for CNNs)."""
    x = rebatch(tuple(spec.example_inputs), batch)
    if image and name in CNNS and x[0].shape[-1] != image:
        x = (F.interpolate(x[0], size=(image, image), mode="bilinear", align_corners=False), *x[1:])
    return x


def _reason(exc: BaseException) -> str:
    """One line for a variant that could not run: the time box's message when it is in the chain (torch.compile
    wraps it), else the exception's type and first line."""
    seen, c = set(), exc
    while c is not None and id(c) not in seen:
        if isinstance(c, Skipped):
            return str(c)
        seen.add(id(c))
        c = c.__cause__ or c.__context__
    msg = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(msg[:2])[:300] if msg else ''}"


def capture_inputs(spec: Any, x: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Where automatic mode captures and verifies (on the CPU): the model file's example inputs when the
    graph captured there runs at another batch size (a CNN: cheap checks), else the measured inputs (a
    graph that fixes its batch size, e.g. a ``view(b, t, heads, d)`` of a hand-written attention)."""
    ex = tuple(spec.example_inputs)
    if all(a.shape == b.shape for a, b in zip(ex, x)):
        return ex
    try:
        gm = graphopt.capture(spec.module, ex)
        with torch.no_grad():
            gm.eval()(*rebatch(ex, int(ex[0].shape[0]) + 1))
        return ex
    except Exception:  # noqa: BLE001 - specialised to the example batch
        return x


def build_runners(name: str, spec: Any, auto_gm: Any, dev: torch.device, x: tuple[torch.Tensor, ...],
                  y: torch.Tensor, variants: list[str], compile_timeout: float,
                  warmup: int) -> tuple[dict[str, Runner], dict[str, dict[str, Any]]]:
    """The variants, each warmed up; those that cannot run here come back as ``{"skipped": reason}``."""
    runners: dict[str, Runner] = {}
    info: dict[str, dict[str, Any]] = {}
    for v in variants:
        t0 = time.perf_counter()
        try:
            if v == "eager_fp32":
                r = Runner(v, spec.module, spec.loss, dev, x, y)
            elif v == "autocast_bf16":
                if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
                    raise Skipped("this GPU has no bfloat16 support")
                r = Runner(v, spec.module, spec.loss, dev, x, y, autocast=torch.bfloat16)
            elif v == "autocast_fp16":
                r = Runner(v, spec.module, spec.loss, dev, x, y, autocast=torch.float16, scaler=True)
            elif v == "compile":
                r = Runner(v, spec.module, spec.loss, dev, x, y, compile=True)
            elif v == "graphopt_auto":
                r = Runner(v, auto_gm, spec.loss, dev, x, y, policy=True)
            else:
                raise ValueError(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
            with time_box(compile_timeout if v == "compile" else None, "torch.compile's first step (compilation)"):
                for _ in range(max(1, warmup)):
                    r.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            if v == "compile" and compile_timeout and secs > compile_timeout:
                raise Skipped(f"torch.compile's warm-up took {secs:.0f} s, over --compile-timeout {compile_timeout:g} s")
            runners[v] = r
            info[v] = {"setup_and_warmup_s": round(secs, 2)}
        except Skipped as exc:
            info[v] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a variant that does not run is a result, not a crash
            info[v] = {"skipped": _reason(exc)}
            if v != "compile":
                traceback.print_exc()
        if "skipped" in info[v]:
            print(f"  {name}: {v}: skipped: {info[v]['skipped']}", flush=True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return runners, info


def time_runners(runners: dict[str, Runner], dev: torch.device, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per-round mean step seconds of each runner, the starting runner rotating round by round."""
    per_round: dict[str, list[float]] = {k: [] for k in runners}

    def timed(k: str) -> None:
        t = StepTimer(dev)
        for _ in range(steps):
            with t.time():
                runners[k].step()
        per_round[k].append(statistics.fmean(t.samples()))  # synchronises the device once (CUDA)

    alternate({k: (lambda k=k: timed(k)) for k in runners}, rounds)
    return per_round


def _grad_bytes(module: torch.nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)


def peak_memory(r: Runner, dev: torch.device) -> dict[str, Any]:
    """The variant's own peak: what it holds between steps (parameters, buffers, float32 masters, optimizer
    state, gradients) plus the step's transient peak above its start. Every variant is resident on the
    device at once, so the allocator's absolute peak would count the others' weights too."""
    held = sum(r.be.persistent_bytes().values()) + _grad_bytes(r.be.module)
    with MemoryProbe(dev) as p:
        r.step()
    return {"peak_bytes": held + p.delta, "held_bytes": held, "step_transient_bytes": p.delta,
            "device_peak_bytes": p.peak, "source": p.source}


def bench_model(name: str, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    spec = load_model_file(str(ROOT / MODELS[name]))
    x = measure_inputs(name, spec, args.batch, args.image)
    y = synthetic_target(copy.deepcopy(spec.module), x)
    row: dict[str, Any] = {"model": name, "model_file": MODELS[name], "input_shapes": [list(t.shape) for t in x]}
    auto_gm = None
    if "graphopt_auto" in args.variants:
        print(f"{name}: automatic mode on {dev} (budget {args.auto_budget:g} s)", flush=True)
        t0 = time.perf_counter()
        try:
            cx = capture_inputs(spec, x)
            row["auto_capture_shapes"] = [list(t.shape) for t in cx]
            gm = graphopt.capture(spec.module, cx)
            m = StepMeasurer(x, y, loss=spec.loss, device=dev, warmup=args.warmup, rounds=args.auto_rounds,
                             steps=args.steps, max_s=args.decision_time)
            auto_gm, rep = auto_optimize(gm, cx, device=dev, loss=spec.loss, measurer=m,
                                         time_budget=args.auto_budget,
                                         progress=lambda c: print(f"  {name}: {c.pass_}"
                                                                  f"{' [' + c.layer + ']' if c.layer else ''} "
                                                                  f"kept={c.kept} {c.reason[:160]}", flush=True))
            row["auto"] = {"pipeline": rep.pipeline, "kept_original": rep.kept_original, "speedup": rep.speedup,
                           "search_s": round(time.perf_counter() - t0, 1), "not_tried": rep.not_tried,
                           "decisions": [{"candidate": c.pass_ + (f" [{c.layer}]" if c.layer else ""),
                                          "kept": c.kept, "reason": c.reason} for c in rep.candidates]}
            del m
        except Exception as exc:  # noqa: BLE001 - recorded; the other variants are still measured
            traceback.print_exc()
            row["auto"] = {"error": f"{type(exc).__name__}: {exc}"[:500],
                           "search_s": round(time.perf_counter() - t0, 1)}
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    variants = [v for v in args.variants if v != "graphopt_auto" or auto_gm is not None]
    runners, info = build_runners(name, spec, auto_gm, dev, x, y, variants, args.compile_timeout, args.warmup)
    if "graphopt_auto" in args.variants and auto_gm is None:
        info["graphopt_auto"] = {"skipped": "automatic mode failed: " + row["auto"].get("error", "")[:300]}
    if runners:
        print(f"{name}: timing {', '.join(runners)} ({args.rounds} rounds x {args.steps} steps)", flush=True)
        per_round = time_runners(runners, dev, args.rounds, args.steps)
        base = per_round.get("eager_fp32")
        for k, samples in per_round.items():
            d = info[k]
            d["median_ms"] = statistics.median(samples) * 1e3
            d["round_ms"] = [round(s * 1e3, 3) for s in samples]
            if base:
                est, lo, hi = paired_interval([a / b for a, b in zip(samples, base)])
                d["speedup_vs_eager"] = 1.0 / est if est > 0 else float("nan")
                d["speedup_interval"] = [1.0 / hi if hi > 0 and math.isfinite(hi) else 0.0,
                                         1.0 / lo if lo > 0 else float("inf")]
            d["samples_per_s"] = x[0].shape[0] / statistics.median(samples)
        for k, r in runners.items():
            info[k]["memory"] = peak_memory(r, dev)
    row["variants"] = {v: info[v] for v in args.variants if v in info}
    del runners
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(doc: dict[str, Any]) -> str:
    env, s = doc["environment"], doc["settings"]
    lines = [f"# Automatic mode vs torch.autocast / torch.compile / eager: {doc['device']}", "",
             f"<!-- generated by benchmarks/auto_gpu.py -->", "",
             f"torch {env['torch']}{', CUDA ' + str(env.get('cuda')) if env.get('cuda') else ''}, {env['date']}; "
             f"training step (forward, loss, backward, SGD); {s['rounds']} alternated rounds x {s['steps']} steps "
             f"after {s['warmup']} warm-up steps, median of the per-round means "
             f"({'CUDA events' if env['device'] == 'cuda' else 'perf_counter, one CPU thread'}); speed-up vs eager "
             f"float32 = 1 / geometric mean of the paired per-round ratios (95% interval). Automatic mode: "
             f"budget {s['auto_budget']:g} s per model, decisions of at most {s['auto_rounds']} rounds or "
             f"{s['decision_time']:g} s; load average at start {env.get('loadavg')}.", ""]
    if env["device"] != "cuda":
        lines += ["**CPU run: a check of the code path with tiny settings, not a measurement** (this CPU has no "
                  "fast half-precision kernels: autocast is expected to be slower here).", ""]
    for row in doc["models"]:
        lines += [f"## {row['model']} (inputs {row.get('input_shapes')})", ""]
        if "error" in row:
            lines += [f"Failed: `{row['error']}`", ""]
            continue
        a = row.get("auto", {})
        if "error" in a:
            lines += [f"Automatic mode failed: `{a['error']}`", ""]
        elif a:
            lines += [f"Automatic mode chose: `{' '.join('-p ' + p for p in a['pipeline']) or '(the original)'}` "
                      f"(search {a['search_s']} s, its own final check {a['speedup']:.3f}x)"
                      + (f"; not tried (budget): {', '.join(a['not_tried'])}" if a["not_tried"] else "") + ".", ""]
            lines += ["| candidate | kept | reason |", "|---|---|---|"]
            lines += [f"| {d['candidate']} | {'yes' if d['kept'] else 'no'} | {d['reason'][:200]} |"
                      for d in a["decisions"]]
            lines.append("")
        lines += ["| variant | median ms/step | vs eager fp32 (95% interval) | samples/s | peak memory MiB | note |",
                  "|---|---:|---:|---:|---:|---|"]
        for v, d in row["variants"].items():
            if "skipped" in d:
                lines.append(f"| {v} | - | - | - | - | skipped: {d['skipped'][:200]} |")
                continue
            if "median_ms" not in d:
                continue
            sp = (f"{d['speedup_vs_eager']:.3f}x ({d['speedup_interval'][0]:.3f}-{d['speedup_interval'][1]:.3f})"
                  if "speedup_vs_eager" in d else "-")
            mem = d.get("memory", {})
            lines.append(f"| {v} | {d['median_ms']:.2f} | {sp} | {d['samples_per_s']:.0f} | "
                         f"{mem.get('peak_bytes', 0) / 2**20:.0f} | warm-up {d['setup_and_warmup_s']} s |")
        lines.append("")
    lines += ["Peak memory: the variant's own: what it holds between steps (parameters, buffers, float32 masters, "
              "optimizer state, gradients) plus the transient peak of one step above its start (CUDA allocator; on "
              "CPU the process RSS sampled every 0.5 ms). torch.compile: default mode, its compilation is the "
              "warm-up.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="resnet50,gpt", help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="tiny settings (a check of the code path)")
    for k, typ, hlp in [("batch", int, "batch size of the measured step"),
                        ("image", int, "image size for the CNNs (the model files use 64)"),
                        ("rounds", int, "alternated timing rounds"), ("steps", int, "steps per variant per round"),
                        ("warmup", int, "warm-up steps per variant"),
                        ("auto-rounds", int, "automatic mode: round cap per decision"),
                        ("decision-time", float, "automatic mode: timed seconds per decision (cap)"),
                        ("auto-budget", float, "automatic mode: search time budget per model, seconds"),
                        ("compile-timeout", float, "seconds allowed for torch.compile's warm-up (0: no limit)")]:
        ap.add_argument(f"--{k}", type=typ, default=None, help=hlp + " [default: per device, see DEFAULTS]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder [cuda: benchmarks/results/<device>/; cpu: out/auto_gpu/<device>/]")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available here (use --device cpu --quick to check the "
              "code path)", file=sys.stderr)
        return 2
    preset = DEFAULTS["cpu_quick" if args.quick else args.device]  # --quick: tiny settings on either device
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    models = [m for m in args.models.split(",") if m]
    bad += [m for m in models if m not in MODELS]
    if bad:
        print(f"error: unknown variant/model: {', '.join(bad)}", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    dname = device_name(args.device)
    out = args.out or (ROOT / "benchmarks" / "results" / device_slug(dname) if dev.type == "cuda"
                       else ROOT / "out" / "auto_gpu" / device_slug(dname))
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()}
    doc: dict[str, Any] = {"device": dname, "environment": environment(dev), "settings": settings, "models": []}
    t0 = time.perf_counter()
    failed = []
    for name in models:
        try:
            doc["models"].append(bench_model(name, args, dev))
        except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others
            traceback.print_exc()
            failed.append(name)
            doc["models"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:500], "variants": {}})
        doc["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(out / "auto_gpu.json", doc)  # after every model: a time limit keeps what was finished
        (out / "auto_gpu.md").write_text(markdown(doc))
    print(markdown(doc))
    print(f"wrote {out / 'auto_gpu.json'} and {out / 'auto_gpu.md'} ({doc['wall_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
