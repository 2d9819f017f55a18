"""A progress bar with counts and an ETA for long commands (``cohort query``, ``cohort fetch``, ``process``).

Drawn by ``rich`` on standard error, live on a terminal; elsewhere (a log file, a batch job)
:meth:`ProgressBar.close` writes one plain line of counts instead.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Progress of ``total`` units of work with named counters, e.g. ``done``, ``failed``.

    Thread-safe: workers may call :meth:`advance` and :meth:`count` from any thread.

    Parameters
    ----------
    description : str
        What is being done, e.g. ``"fetching"``.
    total : int
        Units of work (studies).
    counters : sequence of str
        Names of the counts shown beside the bar, in order.
    stream : TextIO
        Where to draw (standard error by default).
    """

    def __init__(self, description: str, total: int, counters: tuple[str, ...] = (), stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.stream = stream or sys.stderr
        self.counts = {name: 0 for name in counters}
        self._lock = threading.Lock()
        self._console = Console(file=self.stream)
        # Off a terminal rich would draw the bar once, at the end: close() writes a plain line instead.
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self._console, transient=False,
            disable=not self._console.is_terminal,
        )
        self._task = self._progress.add_task(description, total=total, counts=self._text())
        self._progress.start()

    def _text(self) -> str:
        return ", ".join(f"{value} {name}" for name, value in self.counts.items())

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter without advancing the bar."""
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + amount
            self._progress.update(self._task, counts=self._text())

    def advance(self, amount: int = 1, **counters: int) -> None:
        """One (or ``amount``) unit of work finished; add to the named counters too."""
        with self._lock:
            for name, value in counters.items():
                self.counts[name] = self.counts.get(name, 0) + value
            self._progress.update(self._task, advance=amount, counts=self._text())

    def close(self) -> None:
        """Stop drawing; off a terminal, write the final counts as one line."""
        self._progress.stop()
        if not self._console.is_terminal:
            task = self._progress.tasks[0]
            self.stream.write(f"{task.description}: {int(task.completed)}/{int(task.total or 0)}"
                              f" ({self._text()}) in {task.elapsed or 0:.0f} s\n")
            self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
