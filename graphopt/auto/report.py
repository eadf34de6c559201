"""The automatic mode's table and plot (time per candidate)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from graphopt.auto.search import AutoReport, CandidateRecord

__all__ = ["candidate_line", "auto_table", "plot_auto"]


def _ms(x: float | None) -> str:
    return f"{x:.1f}" if x is not None else "-"


def _label(c: CandidateRecord) -> str:
    opts = ",".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in c.options.items()
                    if k != "pipeline")
    return c.pass_ + (f":{opts}" if opts else "") + (f" [{c.layer}]" if c.layer else "")


def candidate_line(c: CandidateRecord) -> str:
    """One progress line per decision (non-TTY output)."""
    verdict = "kept" if c.kept else "rejected"
    times = f" {_ms(c.measured_ms)} ms vs {_ms(c.baseline_ms)} ms" if c.measured_ms is not None else ""
    return f"candidate {_label(c)}: {verdict}{times} ({c.reason})"


def auto_table(rep: AutoReport) -> Table:
    from graphopt.bench.measure import CLOCK_NAMES

    wall = (f"; wall time {_ms(rep.original_wall_ms)} -> {_ms(rep.final_wall_ms)} ms"
            if rep.clock != "wall" and rep.original_wall_ms is not None else "")
    t = Table(title=f"automatic mode on {rep.device}: {rep.speedup:.3f}x "
                    f"({_ms(rep.original_ms)} -> {_ms(rep.final_ms)} ms per training step, "
                    f"{CLOCK_NAMES.get(rep.clock, rep.clock)}{wall})", header_style="bold")
    t.add_column("candidate [layer]", overflow="fold")
    t.add_column("ms", justify="right", no_wrap=True)
    t.add_column("best ms", justify="right", no_wrap=True)
    t.add_column("kept", no_wrap=True)
    t.add_column("reason", overflow="fold")
    for c in rep.candidates:
        t.add_row(_label(c), _ms(c.measured_ms), _ms(c.baseline_ms), "[green]yes[/]" if c.kept else "no", c.reason)
    return t


def plot_auto(rep: AutoReport, path: str | Path) -> Path:
    """Bar chart: measured step time of every measured candidate vs the best so far at that point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in rep.candidates if c.measured_ms is not None]
    labels = ["original"] + [_label(c) for c in rows] + ["emitted"]
    vals = [rep.original_ms or 0.0] + [c.measured_ms or 0.0 for c in rows] + [rep.final_ms or 0.0]
    base = [rep.original_ms or 0.0] + [c.baseline_ms or 0.0 for c in rows] + [rep.original_ms or 0.0]
    colors = ["#607d8b"] + ["#4caf50" if c.kept else "#e57373" for c in rows] + ["#2196f3"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(labels) + 2), 4.2))
    xs = range(len(labels))
    ax.bar(xs, vals, color=colors)
    ax.scatter(xs, base, marker="_", s=400, color="black", label="best so far (baseline of the decision)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"training step, median (ms, {rep.clock.replace('_', ' ')})")
    ax.set_title(f"{rep.device}: {rep.speedup:.3f}x; green kept, red rejected", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
