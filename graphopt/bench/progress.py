"""Progress bars for training (rich or tqdm), one bar per variant and epoch."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["make_progress", "RichProgress", "TqdmProgress"]


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


def make_progress(kind: str) -> RichProgress | TqdmProgress | None:
    """``rich`` / ``tqdm`` / ``auto`` (rich on a terminal, none otherwise) / ``none``."""
    if kind == "auto":
        kind = "rich" if sys.stderr.isatty() else "none"
    if kind == "rich":
        return RichProgress()
    if kind == "tqdm":
        return TqdmProgress()
    return None
