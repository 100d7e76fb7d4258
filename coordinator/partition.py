"""Pure: split a job's rows into tasks (contiguous row ranges)."""

from __future__ import annotations

from dataclasses import dataclass

# A task should be big enough that the network round trip is small beside the compute, and small
# enough that a lost node costs little: 64 rows of a small classifier is ~1 ms of work, of a 10 MB
# model a few hundred ms. The coordinator may pick a size from the model's cost (see auto_task_size).
DEFAULT_TASK_SIZE = 64
MAX_TASKS_PER_JOB = 100_000


@dataclass(frozen=True, slots=True)
class RowRange:
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def partition_rows(rows: int, task_size: int) -> list[RowRange]:
    """Contiguous ranges of at most `task_size` rows covering [0, rows), in order."""
    if rows <= 0:
        raise ValueError("a job needs at least one row")
    if task_size <= 0:
        raise ValueError("task_size must be positive")
    count = -(-rows // task_size)
    if count > MAX_TASKS_PER_JOB:
        raise ValueError(f"{count} tasks exceeds {MAX_TASKS_PER_JOB}; use a larger task_size")
    # Even split: 100 rows at size 64 become 50+50 rather than 64+36, so replicas finish together.
    base, extra = divmod(rows, count)
    ranges, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(RowRange(i, start, stop))
        start = stop
    return ranges


def auto_task_size(flops_per_row: int, *, target_flops: int = 200_000_000, lo: int = 1, hi: int = 1024) -> int:
    """Rows per task so that a task is ~`target_flops` (~0.1-0.5 s on one core), within [lo, hi]."""
    if flops_per_row <= 0:
        return DEFAULT_TASK_SIZE
    return max(lo, min(hi, target_flops // flops_per_row))
