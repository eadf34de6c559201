"""Reports of benchmark, training and sweep results: rich tables, Markdown, PNG plots, and
writing them (with the JSON) into an output folder atomically.

Every Markdown report starts with the conditions: device, CPU/GPU, torch version, date,
threads and machine load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from rich.table import Table

from graphopt.bench.compare import BenchResult
from graphopt.bench.sweep import SweepResult
from graphopt.bench.train import TrainResult

__all__ = ["fmt_bytes", "fmt_time", "env_markdown", "bench_table", "speedup_cell", "clock_text", "bench_markdown", "plot_bench", "bench_plot_title",
           "training_plot_title", "accuracy_limits", "sweep_verdict",
           "training_table", "history_table", "history_markdown", "training_markdown", "plot_training", "sweep_table", "sweep_markdown", "plot_sweep",
           "write_outputs"]


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms"


def _num(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suf}{unit}"
    return f"{n:.3g} {unit}".strip()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def env_markdown(env: Mapping[str, Any]) -> str:
    dev = env.get("gpu") or env.get("cpu")
    load = env.get("loadavg")
    load_s = ", ".join(f"{x:.2f}" for x in load) if load else "n/a"
    lines = [f"- device: **{env.get('device')}** ({dev}, {env.get('cpu_count')} CPUs)",
             f"- torch {env.get('torch')}, graphopt {env.get('graphopt')}, Python {env.get('python')}",
             f"- date: {env.get('date')}",
             f"- threads: torch {env.get('torch_threads')} (OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY')})",
             f"- machine load (1/5/15 min) at start: {load_s}"]
    if env.get("gpu"):
        lines.append(f"- CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, TF32 matmul {env.get('tf32_matmul')}")
    return "\n".join(lines)


# -- step benchmark ------------------------------------------------------------------------------
def speedup_cell(res: BenchResult, name: str) -> str:
    """``1.418x [1.350-1.490]``, ``+ within noise`` when the interval straddles 1; ``-`` for the baseline."""
    iv = res.speedup_interval(name)
    if iv is None:
        return "-" if name == res.baseline else f"{res.speedup(name):.3f}x"
    hi = "inf" if iv[1] == float("inf") else f"{iv[1]:.3f}"
    cell = f"{res.speedup(name):.3f}x [{iv[0]:.3f}-{hi}]"
    return cell + (" within noise" if res.verdict(name) == "within noise" else "")


def _bench_rows(res: BenchResult) -> list[list[str]]:
    rows = []
    for name, v in res.variants.items():
        st = v.step_time_s
        rounds = res.rounds(name)
        rows.append([name, fmt_time(st["median"]), f"{fmt_time(st['p25'])} - {fmt_time(st['p75'])}",
                     speedup_cell(res, name), "-" if rounds is None else str(rounds),
                     f"{res.wall_speedup(name):.3f}x", f"{v.samples_per_s:.1f}", fmt_bytes(v.memory.get("peak_bytes")),
                     fmt_bytes(v.memory.get("transient_bytes")), _num(v.params), _num(v.macs),
                     _num(v.achieved_flops_per_s, "FLOP/s"), _pct(v.peak_fraction)])
    return rows


_BENCH_COLS = ["variant", "step (wall median)", "IQR", "speedup [95% interval]", "rounds", "wall speedup",
               "samples/s", "peak mem", "of which transient", "params", "MACs (fwd)", "achieved", "of peak"]


_BENCH_TERM = [0, 1, 3, 4, 5, 6, 7, 10, 11, 12]  # columns shown in the terminal (all are in the Markdown/JSON)


def clock_text(res: BenchResult) -> str:
    """The decision clock of the paired speedups, in words (``thread CPU time`` / ``wall time (CUDA events)``)."""
    e = res.engine
    name = e.get("clock_name", e.get("clock", "wall time"))
    if e.get("clock") == "wall":
        name += " (CUDA events)" if e.get("wall_timer") == "cuda_events" else " (perf_counter)"
    return name


def bench_table(res: BenchResult, title: str | None = None) -> Table:
    t = Table(title=title or f"training step, batch {res.config['batch_size']}, {res.config['device']}",
              title_justify="left", header_style="bold")
    for i in _BENCH_TERM:
        t.add_column(_BENCH_COLS[i], justify="left" if i == 0 else "right")
    for r in _bench_rows(res):
        t.add_row(*[r[i] for i in _BENCH_TERM])
    return t


def _md_table(cols: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def bench_markdown(res: BenchResult, title: str = "Training-step benchmark", notes: str = "") -> str:
    c = res.config
    peak = (f"measured device matmul peak: {_num(res.peak.flops_per_s, 'FLOP/s')} ({res.peak.dtype}, "
            f"{res.peak.n}x{res.peak.n})") if res.peak else "device peak not measured"
    mem_src = next(iter(res.variants.values())).memory.get("source")
    parts = [f"# {title}", "", env_markdown(res.env), "",
             f"Batch {c['batch_size']} (inputs {c['input_shapes']}), {c['optimizer']} lr {c['lr']}, "
             f"{c['warmup']} warm-up steps, {c.get('steps_per_round', '?')} timed steps per variant per round, "
             f"{c['rounds']} paired rounds (at least {c.get('min_rounds', c['rounds'])}, at most "
             f"{c.get('max_rounds', c['rounds'])}; the starting variant alternating), compile={c['compile']}. "
             f"Step = zero_grad + forward + loss + backward + optimizer step. Speedup: the geometric mean over "
             f"rounds of the per-round ratio to {res.baseline} in {clock_text(res)}, with its "
             f"{res.engine.get('confidence', 0.95):.0%} Student-t interval (\"within noise\" when it straddles 1; "
             f"the engine of the automatic mode); step times and wall speedup: medians of per-step wall times. "
             f"Peak memory = parameters/buffers + optimizer state + the step's transient peak ({mem_src}). "
             f"Achieved = measured step FLOPs (forward + backward, FlopCounterMode) / median step time; {peak}.",
             "", _md_table(_BENCH_COLS, _bench_rows(res))]
    if notes:
        parts += ["", notes]
    return "\n".join(parts) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_plot_title(res: BenchResult, model: str | None = None, passes: str | None = None) -> str:
    """What a reader of bench.png needs without the command line: model, passes, device, batch,
    threads (plain text: no Markdown)."""
    env, c = res.env, res.config
    dev = c.get("device", env.get("device"))
    hw = env.get("gpu") or env.get("cpu")
    head = f"{model or 'model'}: original vs {passes}" if passes else f"{model or 'model'}: original only"
    return (f"{head} - training step on {dev}{f' ({hw})' if hw else ''}, batch {c.get('batch_size')}, "
            f"{env.get('torch_threads', '?')} thread(s), torch {env.get('torch')}, "
            f"load {(env.get('loadavg') or [0])[0]:.2f}")


def _save(fig: Any, path: str | Path, title: str) -> Path:
    """Save with the title also in the file's metadata (PNG text chunk, SVG/PDF title)."""
    path = Path(path)
    fig.savefig(path, dpi=110, metadata={"Title": title})
    return path


def plot_bench(res: BenchResult, path: str | Path, title: str | None = None, *, model: str | None = None,
               passes: str | None = None) -> Path:
    """bench.png: step time, samples/s and peak memory per variant; titled by :func:`bench_plot_title`
    (or ``title``)."""
    plt = _plt()
    title = (title or bench_plot_title(res, model, passes)).replace("`", "")
    names = list(res.variants)
    vs = [res.variants[n] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    med = [v.step_time_s["median"] * 1000 for v in vs]
    err = [[(v.step_time_s["median"] - v.step_time_s["p25"]) * 1000 for v in vs],
           [(v.step_time_s["p75"] - v.step_time_s["median"]) * 1000 for v in vs]]
    colors = ["#607d8b" if i == 0 else "#2196f3" for i in range(len(names))]
    axes[0].bar(names, med, yerr=err, color=colors, capsize=4)
    axes[0].set_ylabel("training step, wall median (ms)")
    for i, n in enumerate(names):  # the paired speedup and its interval (the engine's) above each variant
        if res.speedup_interval(n) is not None:
            axes[0].annotate(speedup_cell(res, n).replace(" within noise", "\nwithin noise"), (i, med[i] + err[1][i]),
                             textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=7)
    if res.comparisons:
        axes[0].set_title(f"speedup [95% interval], {clock_text(res)}", fontsize=8)
    axes[1].bar(names, [v.samples_per_s for v in vs], color=colors)
    axes[1].set_ylabel("samples / s")
    peaks = [(v.memory.get("peak_bytes") or 0) / 2**20 for v in vs]
    trans = [(v.memory.get("transient_bytes") or 0) / 2**20 for v in vs]
    axes[2].bar(names, [p - t for p, t in zip(peaks, trans)], color="#9e9e9e", label="params + optimizer state")
    axes[2].bar(names, trans, bottom=[p - t for p, t in zip(peaks, trans)], color="#ff9800", label="step transient")
    axes[2].set_ylabel("peak memory (MiB)")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    import textwrap

    fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.tight_layout()
    path = _save(fig, path, title)
    plt.close(fig)
    return path


# -- training / time-to-accuracy ----------------------------------------------------------------------
_TRAIN_COLS = ["variant", "final test acc", "best test acc", "time to target", "epochs to target", "epochs",
               "train time", "samples/s", "params", "stopped because"]
_TRAIN_TERM = [0, 1, 3, 4, 5, 6, 7, 9]  # columns shown in the terminal


def _train_rows(results: Mapping[str, TrainResult]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        s = r.summary()
        rows.append([name, _acc(s["final_test_accuracy"]), _acc(s["best_test_accuracy"]), fmt_time(s["time_to_target_s"]),
                     "-" if s["epochs_to_target"] is None else f"{s['epochs_to_target']:g}", f"{s['epochs']:g}",
                     fmt_time(s["train_time_s"]), f"{s['samples_per_s']:.0f}", _num(s["params"]), s["stop_reason"]])
    return rows


def training_table(results: Mapping[str, TrainResult], title: str = "training") -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for i in _TRAIN_TERM:
        t.add_column(_TRAIN_COLS[i], justify="left" if i in (0, len(_TRAIN_COLS) - 1) else "right", overflow="fold")
    for r in _train_rows(results):
        t.add_row(*[r[i] for i in _TRAIN_TERM])
    return t


_HIST_COLS = ["epoch", "lr", "train loss", "val acc", "test loss", "test acc", "epoch time", "train time"]


def _hist_rows(r: TrainResult) -> list[list[str]]:
    return [[f"{h.epoch:g}", f"{h.lr:.4g}", f"{h.train_loss:.4f}", _acc(h.val_accuracy), f"{h.test_loss:.4f}",
             _acc(h.test_accuracy), fmt_time(h.epoch_time_s), fmt_time(h.train_time_s)] for h in r.history]


def history_markdown(r: TrainResult) -> str:
    return _md_table(_HIST_COLS, _hist_rows(r))


def history_table(r: TrainResult) -> Table:
    """Per-epoch metrics of one run, and a caption with how it ended."""
    s = r.summary()
    cap = (f"{r.stop_reason}; final test acc {_acc(s['final_test_accuracy'])}, {fmt_time(s['train_time_s'])} "
           f"training, {s['samples_per_s']:.0f} samples/s")
    if s["time_to_target_s"] is not None:
        cap += f"; target reached after {fmt_time(s['time_to_target_s'])} (epoch {s['epochs_to_target']:g})"
    t = Table(title=r.name, title_justify="left", header_style="bold", caption=cap, caption_justify="left")
    for i, c in enumerate(_HIST_COLS):
        t.add_column(c, justify="right")
    for row in _hist_rows(r):
        t.add_row(*row)
    return t


def training_markdown(results: Mapping[str, TrainResult], env: Mapping[str, Any], title: str = "Training",
                      data: str = "", notes: str = "") -> str:
    first = next(iter(results.values()))
    c = first.config
    target = f"target test accuracy {c.target_accuracy}; " if c.target_accuracy else ""
    parts = [f"# {title}", "", env_markdown(env), "",
             f"Data: {data or '-'}. {c.optimizer} lr {c.lr} ({c.schedule}, warm-up {c.warmup_epochs} epochs), "
             f"batch {c.batch_size}, up to {c.epochs} epochs, {target}early stopping "
             f"{'patience ' + str(c.patience) + ' on ' + c.monitor if c.patience else 'off'}, seed {c.seed}. "
             "Variants trained interleaved epoch by epoch; times are training time only (evaluation excluded).",
             "", _md_table(_TRAIN_COLS, _train_rows(results))]
    for name, r in results.items():
        parts += ["", f"## {name}", "", history_markdown(r)]
    if notes:
        parts += ["", notes]
    return "\n".join(parts) + "\n"


def training_plot_title(model: str, passes: str | None, results: Mapping[str, TrainResult],
                        env: Mapping[str, Any] | None = None) -> str:
    """Model, passes, device, batch size (and optimizer) for train.png."""
    c = next(iter(results.values())).config
    hw = (env or {}).get("gpu") or (env or {}).get("cpu")
    what = f"{model} + {passes}" if passes else model
    return (f"{what}: test accuracy vs training time - {c.device}{f' ({hw})' if hw else ''}, batch {c.batch_size}, "
            f"{c.optimizer} lr {c.lr:g}, {c.schedule} schedule")


def plot_training(results: Mapping[str, TrainResult], path: str | Path, target: float | None = None,
                  title: str = "", chance: float | None = None) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        t = [h.train_time_s for h in r.history]
        acc = [h.test_accuracy for h in r.history]
        if any(a is not None for a in acc):
            axes[0].plot(t, acc, marker="o", ms=3, label=name)
        axes[1].plot(t, [h.test_loss for h in r.history], marker="o", ms=3, label=name)
    _reference_lines(axes[0], target, chance)
    axes[0].set_ylim(*accuracy_limits([h.test_accuracy for r in results.values() for h in r.history], target, chance))
    axes[0].set_xlabel("training time (s)")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_xlabel("training time (s)")
    axes[1].set_ylabel("test loss")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    if title:
        import textwrap

        fig.suptitle(textwrap.fill(title, 140), fontsize=9)
    fig.tight_layout()
    path = _save(fig, path, title)
    plt.close(fig)
    return path


MIN_ACCURACY_SPAN = 0.1


def accuracy_limits(values: Any, target: float | None = None, chance: float | None = None,
                    min_span: float = MIN_ACCURACY_SPAN) -> tuple[float, float]:
    """y-limits for an accuracy axis: the data, the target and chance lines, and at least
    ``min_span`` wide (within [0, 1]), so that noise of a few 0.001 does not fill the plot."""
    vals = [float(v) for v in values if v is not None]
    vals += [v for v in (target, chance) if v is not None]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
        if lo < 0:
            lo, hi = 0.0, min_span
        if hi > 1:
            lo, hi = 1.0 - min_span, 1.0
    pad = (hi - lo) * 0.05
    return max(lo - pad, 0.0 - pad), min(hi + pad, 1.0 + pad)


def _reference_lines(ax: Any, target: float | None, chance: float | None) -> None:
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target accuracy {target:g}")
    if chance is not None:
        ax.axhline(chance, color="#9e9e9e", ls=":", lw=1.0, label=f"chance (most frequent class) {chance:.3f}")


# -- sweeps ---------------------------------------------------------------------------------------
def _sweep_cols(res: SweepResult) -> list[str]:
    key = "blocks" if res.kind == "depth" else "batch size"
    return ["variant", key, "params", "MACs (fwd)" if res.kind == "depth" else "lr", "final test acc", "best test acc",
            "train time", "time to target", "samples/s", "stopped because"]


def _sweep_rows(res: SweepResult) -> list[list[str]]:
    rows = []
    for r in res.rows:
        mark = " (best)" if r["variant"] == res.best else ""
        rows.append([r["variant"] + mark, str(r.get("blocks", r.get("batch_size"))), _num(r["params"]),
                     _num(r["macs"]) if res.kind == "depth" else f"{r['lr']:.4g}", _acc(r["final_test_accuracy"]),
                     _acc(r["best_test_accuracy"]), fmt_time(r["train_time_s"]), fmt_time(r["time_to_target_s"]),
                     f"{r['samples_per_s']:.0f}", r["stop_reason"]])
    return rows


def sweep_verdict(res: SweepResult) -> str:
    """``best = NAME (criterion)`` or the reason there is none."""
    return f"best = {res.best or 'none'} ({res.criterion})"


def sweep_table(res: SweepResult) -> Table:
    t = Table(title=f"{res.kind} sweep: {sweep_verdict(res)}", title_justify="left",
              header_style="bold")
    cols = _sweep_cols(res)
    for i, c in enumerate(cols):
        t.add_column(c, justify="left" if i in (0, len(cols) - 1) else "right", overflow="fold")
    for r in _sweep_rows(res):
        t.add_row(*r)
    return t


def sweep_markdown(res: SweepResult, title: str | None = None, data: str = "") -> str:
    c = res.config["train"]
    what = (f"depth deltas {res.config['deltas']} per stage (blocks per stage: {res.config['stages']})"
            if res.kind == "depth" else
            f"batch sizes {res.config['sizes']}, lr scaling {res.config['lr_scaling']} from base batch "
            f"{res.config['base_batch_size']} (lr {c['lr']})")
    parts = [f"# {title or res.kind.replace('_', ' ') + ' sweep'}", "", env_markdown(res.env), "",
             f"Data: {data or '-'}. {what}. {c['optimizer']}, {c['schedule']} schedule, up to {c['epochs']} epochs"
             + (f", target test accuracy {res.target_accuracy}" if res.target_accuracy else "") + ". "
             "Variants trained interleaved epoch by epoch; times are training time only.", "",
             f"**Best: {res.best or 'none'}** ({res.criterion}).", "",
             _md_table(_sweep_cols(res), _sweep_rows(res))]
    return "\n".join(parts) + "\n"


def plot_sweep(res: SweepResult, path: str | Path, title: str | None = None) -> Path:
    """sweep.png: test accuracy against training time per variant (left) and final accuracy against
    total training time (right); target and chance lines labelled, the accuracy axis at least
    ``MIN_ACCURACY_SPAN`` wide, variants named in legends (point labels would overlap)."""
    plt = _plt()
    chance = res.extra.get("chance_accuracy")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    accs: list[float | None] = []
    for i, (name, r) in enumerate(res.results.items()):
        t = [h.train_time_s for h in r.history]
        acc = [h.test_accuracy for h in r.history]
        accs += acc
        axes[0].plot(t, acc, marker=markers[i % len(markers)], ms=3, color=colors[i % len(colors)],
                     label=name + (" (best)" if name == res.best else ""))
    _reference_lines(axes[0], res.target_accuracy, chance)
    axes[0].set_xlabel("training time (s)")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    finals = []
    for i, r in enumerate(res.rows):
        y = r["final_test_accuracy"]
        finals.append(y)
        best = r["variant"] == res.best
        axes[1].scatter([r["train_time_s"]], [y if y is not None else float("nan")], s=60 if best else 30,
                        marker=markers[i % len(markers)], color=colors[i % len(colors)],
                        edgecolors="k" if best else "none", label=r["variant"] + (" (best)" if best else ""))
    axes[0].set_ylim(*accuracy_limits(accs + finals, res.target_accuracy, chance))
    # the final accuracies side by side: the chance line only where it is within their span
    lo, hi = accuracy_limits(finals, res.target_accuracy)
    near = chance is not None and lo <= chance <= hi
    if near or (chance is not None and all(f is None or f <= chance + 0.05 for f in finals)):
        lo, hi = accuracy_limits(finals, res.target_accuracy, chance)
        near = True
    _reference_lines(axes[1], res.target_accuracy, chance if near else None)
    axes[1].set_ylim(lo, hi)
    axes[1].set_xlabel("total training time (s)")
    axes[1].set_ylabel("final test accuracy")
    axes[1].legend(fontsize=7)
    title = title or f"{res.kind.replace('_', ' ')} sweep: {sweep_verdict(res)}"
    import textwrap

    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout()
    path = _save(fig, path, title)
    plt.close(fig)
    return path


# -- output folder -----------------------------------------------------------------------------------
def write_outputs(out: str | Path, files: Mapping[str, str | bytes | Callable[[Path], Any]], force: bool = False) -> Path:
    """Write ``files`` (name -> text, bytes, or a function writing to the given path) into ``out``,
    atomically: nothing appears unless everything was written."""
    from graphopt.emit.fs import atomic_folder

    from graphopt._fsutil import made_parents

    out = Path(out)
    with made_parents(out), atomic_folder(out, force=force) as tmp:  # `-o runs/bn` without runs/: made
        for name, content in files.items():
            p = tmp / name
            if callable(content):
                content(p)
            elif isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
    return out

