"""How long a task will take here, and whether a lease leaves time for it: pure, no clock.

The node keeps, per (model, opt level), the run time of its tasks on this machine (a job's tasks
are alike in size, so per task is the unit the coordinator leases in). An assignment is worth
holding only if the work queued ahead of it on this node, shared over its slots, plus its own run
fits before its lease ends: otherwise the node would hold it to expiry and the task would wait a
whole lease for nothing, so it goes back at once. A model never run here has no estimate and is
accepted (its first run is the measure), as is anything the node knows too little about.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ModelKey = tuple[str, int]  # (model digest, opt level)

FINISH_MARGIN_SECONDS = 1.0
"""Kept free before the lease ends: a result must still cross the broker and be checked in time."""


@dataclass(slots=True)
class TaskTimes:
    """Seconds a task of each model takes here: rises at once on a slower run (a cautious node
    hands back sooner) and decays slowly (one fast run does not make it promise more)."""

    seconds: dict[ModelKey, float] = field(default_factory=dict)

    def observe(self, key: ModelKey, elapsed: float) -> None:
        if elapsed < 0:
            return
        known = self.seconds.get(key)
        self.seconds[key] = elapsed if known is None or elapsed > known else 0.8 * known + 0.2 * elapsed

    def get(self, key: ModelKey) -> float | None:
        return self.seconds.get(key)


def can_finish(*, own_seconds: float | None, ahead_seconds: float, slots: int, lease_left: float,
               margin: float = FINISH_MARGIN_SECONDS) -> bool:
    """Whether a task estimated at `own_seconds` (None: unknown), behind `ahead_seconds` of work
    held on this node's `slots`, ends before its lease (`lease_left` seconds from now, minus
    `margin`). Times are wall-clock runs here, so a CPU cap's stretch is already in them.

    With nothing ahead the answer is yes: the node would otherwise never run the model again, and
    a measure taken on a bad moment (the machine busy, the run niced away) would keep it from that
    model's work for good. The run's own time limit (node/runner.py) still ends it with the lease."""
    if own_seconds is None or ahead_seconds <= 0:
        return True
    return ahead_seconds / max(1, slots) + own_seconds <= lease_left - margin
