"""Training progress: bars on a terminal (rich or tqdm), plain lines in logs.

``auto`` gives rich bars when stderr is a terminal and :class:`LineProgress` otherwise (CI logs,
``nohup``, a pipe): a line every ``max(1, steps // 5)`` steps or every ``interval_s`` seconds,
whichever comes first, and one when an epoch ends, so a long run is never silent.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["make_progress", "RichProgress", "TqdmProgress", "LineProgress"]


class RichProgress:
    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), transient=False)
        self.p.start()

    def start(self, name: str, epoch: int, epochs: int, steps: int) -> Any:
        return self.p.add_task(f"{name} epoch {epoch}/{epochs}", total=steps, loss="-")

    def advance(self, task: Any, loss: float) -> None:
        self.p.update(task, advance=1, loss=f"{loss:.4f}")

    def finish(self, task: Any, rec: Any) -> None:
        if rec is not None:
            acc = f"{rec.test_accuracy:.4f}" if rec.test_accuracy is not None else "-"
            self.p.update(task, loss=f"{rec.train_loss:.4f} test acc {acc}")
        self.p.stop_task(task)

    def close(self) -> None:
        self.p.stop()


class TqdmProgress:
    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.tqdm = tqdm

    def start(self, name: str, epoch: int, epochs: int, steps: int) -> Any:
        return self.tqdm(total=steps, desc=f"{name} epoch {epoch}/{epochs}", leave=True, file=sys.stderr)

    def advance(self, task: Any, loss: float) -> None:
        task.update(1)
        task.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def finish(self, task: Any, rec: Any) -> None:
        if rec is not None and rec.test_accuracy is not None:
            task.set_postfix(loss=f"{rec.train_loss:.4f}", test_acc=f"{rec.test_accuracy:.4f}")
        task.close()

    def close(self) -> None:
        pass


class LineProgress:
    """Plain progress lines on stdout (flushed), for output that is not a terminal."""

    def __init__(self, interval_s: float = 10.0, lines_per_epoch: int = 5) -> None:
        self.interval_s = interval_s
        self.lines_per_epoch = lines_per_epoch

    def start(self, name: str, epoch: int, epochs: int, steps: int) -> dict[str, Any]:
        now = time.monotonic()
        return {"label": f"{name} epoch {epoch}/{epochs}", "steps": steps, "done": 0, "t0": now, "last": now,
                "every": max(1, steps // self.lines_per_epoch)}

    def advance(self, task: dict[str, Any], loss: float) -> None:
        task["done"] += 1
        now = time.monotonic()
        if task["done"] < task["steps"] and (task["done"] % task["every"] == 0
                                             or now - task["last"] >= self.interval_s):
            task["last"] = now
            print(f"{task['label']}: step {task['done']}/{task['steps']}, loss {loss:.4f}, "
                  f"{now - task['t0']:.1f} s", flush=True)

    def finish(self, task: dict[str, Any], rec: Any) -> None:
        tail = ""
        if rec is not None:
            tail = f", loss {rec.train_loss:.4f}"
            if rec.test_accuracy is not None:
                tail += f", test acc {rec.test_accuracy:.4f}"
        print(f"{task['label']}: {task['done']}/{task['steps']} steps{tail}, "
              f"{time.monotonic() - task['t0']:.1f} s", flush=True)

    def close(self) -> None:
        pass


def make_progress(kind: str) -> RichProgress | TqdmProgress | LineProgress | None:
    """``rich`` / ``tqdm`` / ``lines`` / ``auto`` (rich bars on a terminal, lines otherwise) / ``none``."""
    if kind == "auto":
        kind = "rich" if sys.stderr.isatty() else "lines"
    if kind == "rich":
        return RichProgress()
    if kind == "tqdm":
        return TqdmProgress()
    if kind == "lines":
        return LineProgress()
    return None
