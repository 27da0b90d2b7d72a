"""A per-epoch progress bar (rich): loss, images per second, time left. Drawn by rank 0 only."""

from __future__ import annotations

import sys
from typing import Any


class EpochBar:
    """A rich Progress for one epoch, or nothing when disabled (other ranks, --no-progress)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self._progress, self._task = enabled, None, None

    def start(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
            TimeRemainingColumn(), console=Console(file=sys.stderr),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, loss="-", speed="-")

    def update(self, loss: float, speed: float, **_: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=f"{loss:.4f}", speed=f"{speed:.0f}")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
