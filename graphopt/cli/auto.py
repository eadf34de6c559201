"""``graphopt optimize MODEL.py`` without passes: the automatic mode's options and driver."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console

__all__ = ["auto_options", "run_auto", "rebatch", "accuracy_line"]


def auto_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                     help="Automatic mode: device the training step is measured on [default: cuda when available]."),
        click.option("--time-budget", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
                     help="Automatic mode: stop the search after this long with the best so far."),
        click.option("--target-time", type=click.FloatRange(min=0.01, max=1.0), default=None, metavar="F",
                     help="Automatic mode: allow structured pruning (accuracy-changing) until the measured step "
                          "is at most F x the original's."),
        click.option("--max-error", type=click.FloatRange(min=0), default=None, metavar="E",
                     help="Automatic mode with --target-time: bound on the relative output error."),
        click.option("--recover-epochs", type=click.IntRange(min=0), default=1, show_default=True,
                     help="Automatic mode with --target-time and a data(): after pruning, reconstruct on calibration "
                          "batches and distil from the original for N epochs (0: reconstruction only)."),
        click.option("--no-recover", is_flag=True,
                     help="Automatic mode with --target-time: keep the pruned weights as pruned (no reconstruction, "
                          "no distillation)."),
        click.option("--batch-size", "auto_batch", type=click.IntRange(min=1), default=None,
                     help="Automatic mode: batch size the step is measured at [default: the example inputs']."),
        click.option("--rounds", "auto_rounds", type=click.IntRange(min=2), default=30, show_default=True,
                     help="Automatic mode: at most this many paired timing rounds per decision (a decision stops "
                          "after 3 once its confidence interval decides it)."),
        click.option("--decision-time", "auto_decision_s", type=click.FloatRange(min=0), default=15.0,
                     show_default=True, metavar="SECONDS",
                     help="Automatic mode: at most this much timed stepping per undecided decision (half for a "
                          "per-layer one); at least 3 rounds."),
        click.option("--steps", "auto_steps", type=click.IntRange(min=1), default=None,
                     help="Automatic mode: training steps per variant per round [default: enough for 50 ms, "
                          "at least 1]."),
        click.option("--warmup", "auto_warmup", type=click.IntRange(min=0), default=2, show_default=True,
                     help="Automatic mode: warm-up steps per variant."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Automatic mode: where measured layer latencies are cached [default: ~/.cache/graphopt]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def rebatch(inputs: tuple[Any, ...], batch: int | None) -> tuple[Any, ...]:
    """The example inputs at another batch size (sliced, or repeated along dim 0)."""
    if batch is None:
        return inputs
    out = []
    for t in inputs:
        n = int(t.shape[0])
        reps = -(-batch // n)
        out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] if reps > 1 else t[:batch])
    return tuple(out)


def run_auto(console: Console, spec: Any, gm: Any, *, device: str | None, time_budget: float | None,
             target_time: float | None, max_error: float | None, auto_batch: int | None, auto_rounds: int,
             auto_steps: int | None, auto_warmup: int, auto_decision_s: float = 15.0, cache_dir: str | None, report_path: str | None,
             out_path: Path, recover_epochs: int = 1, no_recover: bool = False) -> tuple[Any, Any, Any]:
    import os

    import torch

    from graphopt.auto import auto_optimize
    from graphopt.auto.report import auto_table, candidate_line, plot_auto
    from graphopt.bench.measure import StepMeasurer
    from graphopt.bench.torch_backend import resolve_device
    from graphopt.manager import PassManager

    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = rebatch(tuple(spec.example_inputs), auto_batch)
    measurer = StepMeasurer(inputs, loss=spec.loss, device=dev, warmup=auto_warmup, rounds=auto_rounds,
                            steps=auto_steps, max_s=auto_decision_s)
    cache = cache_dir or os.environ.get("GRAPHOPT_CACHE_DIR") or str(Path.home() / ".cache" / "graphopt")
    tty = sys.stdout.isatty()
    if tty:
        status = console.status("automatic mode: measuring the original training step")
        status.start()

        def progress(rec: Any) -> None:
            console.print(candidate_line(rec))
            status.update(f"automatic mode: {len(auto_progress)} decisions so far")
            auto_progress.append(rec)
    else:
        status = None

        def progress(rec: Any) -> None:
            click.echo(candidate_line(rec))
            sys.stdout.flush()
    auto_progress: list[Any] = []
    try:
        best, rep = auto_optimize(gm, spec.example_inputs, device=dev, loss=spec.loss, time_budget=time_budget,
                                  target_time=target_time, max_error=max_error, measurer=measurer,
                                  cache_dir=cache, progress=progress)
    finally:
        if status is not None:
            status.stop()
    console.print(auto_table(rep))
    if rep.not_tried:
        console.print(f"time budget reached: not tried: {', '.join(rep.not_tried)}")
    report = rep.pipeline_report
    if report is None:  # the original is kept: an empty, verified pipeline
        best, report = PassManager([], verify=True).run(best, spec.example_inputs)
    pruned = bool(rep.pruning and rep.pruning.get("result") == "pruned") and best is not gm
    if spec.data is not None and target_time is not None and pruned and not no_recover:
        from graphopt.auto.recover import recover_pruned

        console.print("recovering accuracy: reconstruction on calibration batches"
                      + (f", then {recover_epochs} epoch(s) of distillation from the original" if recover_epochs else ""))
        try:
            rec = recover_pruned(gm, best, rep.prune_plan, spec.data(), epochs=recover_epochs, loss=spec.loss,
                                 example_inputs=tuple(spec.example_inputs))
            rep.pruning = dict(rep.pruning, recovery=rec, accuracy=rec["accuracy"])
            console.print(accuracy_line(rec))
        except Exception as exc:  # recovery is an improvement, not a reason to lose the pruned result
            rep.pruning = dict(rep.pruning, recovery={"error": f"{type(exc).__name__}: {exc}"})
            console.print(f"recovery failed ({type(exc).__name__}: {exc}); the pruned weights are kept as pruned")
    elif spec.data is not None and target_time is not None:
        try:
            rep.pruning = dict(rep.pruning or {}, accuracy=_accuracy(spec, gm, best))
        except Exception as exc:  # accuracy is a report item, not a reason to fail
            rep.pruning = dict(rep.pruning or {}, accuracy={"error": f"{type(exc).__name__}: {exc}"})
    png = Path(report_path).with_suffix(".png") if report_path else out_path.parent / f"{out_path.name}-auto.png"
    plot_auto(rep, png)
    console.print(f"plotted {png}")
    return best, report, rep


def accuracy_line(rec: dict[str, Any]) -> str:
    """``accuracy (N test samples): original 0.95, pruned 0.31, reconstructed 0.93, distilled 0.95``."""
    acc = rec["accuracy"]
    parts = [f"{k} {v:.4f}" for k, v in acc.items() if isinstance(v, float)]
    return f"accuracy ({rec.get('test_samples')} test samples): " + ", ".join(parts)


def _accuracy(spec: Any, original: Any, rewritten: Any, batches: int = 8) -> dict[str, Any]:
    """Top-1 accuracy of original and rewrite on the first test batches of ``data()`` (no fine-tuning)."""
    import torch

    from graphopt.bench.data import as_tensors
    from graphopt.ir import eval_mode

    test = spec.data()[1]
    x, y = as_tensors(test, limit=batches * 32)[:2]
    hits = {"original": 0, "rewritten": 0}
    n = int(y.shape[0])
    with torch.no_grad(), eval_mode(original), eval_mode(rewritten):
        for i in range(0, n, 32):
            hits["original"] += int((original(x[i:i + 32]).argmax(-1) == y[i:i + 32]).sum())
            hits["rewritten"] += int((rewritten(x[i:i + 32]).argmax(-1) == y[i:i + 32]).sum())
    return {k: v / n for k, v in hits.items()} | {"samples": n, "note": "before any fine-tuning"}
