"""Job progress for people: a rich progress bar on a terminal, plain throttled lines otherwise.

    with ProgressReporter(job_id) as report:
        await client.wait(job_id, on_progress=report)

Plain lines look like `job j1: 12/29 tasks verified, 0 failed (41%)`, at most one per `interval`
seconds (identical lines are not repeated) plus one when the job finishes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

FINAL_STATES = frozenset({"done", "failed"})


def _counts(status: dict[str, Any]) -> tuple[int, int, int]:
    tasks = status.get("tasks") or {}
    return int(tasks.get("total") or 0), int(tasks.get("verified") or 0), int(tasks.get("failed") or 0)


def progress_line(job: str, status: dict[str, Any]) -> str:
    total, verified, failed = _counts(status)
    percent = (100 * verified // total) if total else 0
    line = f"job {job}: {verified}/{total} tasks verified, {failed} failed ({percent}%)"
    state = status.get("state")
    return line + f" {state}" if state in FINAL_STATES else line


class ProgressReporter:
    """Callable with a job status dict; pass it as `on_progress`. Close it (or use `with`) at the end."""

    def __init__(
        self,
        job: str,
        *,
        stream: TextIO | None = None,
        interval: float = 1.0,
        rich: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job = job
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._clock = clock
        self._last_time: float | None = None
        self._last_line: str | None = None
        self._finished = False
        use_rich = rich if rich is not None else _isatty(self.stream)
        self._bar: Any = None
        self._bar_task: Any = None
        if use_rich:
            self._start_bar()

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("job {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("verified, {task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=Console(file=self.stream),
        )
        self._bar_task = self._bar.add_task(self.job, total=None, failed=0)
        self._bar.start()

    def __call__(self, status: dict[str, Any]) -> None:
        total, verified, failed = _counts(status)
        final = status.get("state") in FINAL_STATES
        if self._bar is not None:
            self._bar.update(self._bar_task, total=total or None, completed=verified, failed=failed)
            if final:
                self.close()
            return
        if self._finished:
            return
        now = self._clock()
        line = progress_line(self.job, status)
        due = self._last_time is None or now - self._last_time >= self.interval
        if final or (due and line != self._last_line):
            print(line, file=self.stream, flush=True)
            self._last_time, self._last_line = now, line
        self._finished = final

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._finished = True

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
