"""Pure: the task life cycle and what a task needs next.

Life cycle `open -> verified | failed`, and `verified -> open` when a task is reopened, as a
transition table (after h11's _state.py): anything not listed is our bug and raises. A task is
`open` while it collects replicas; `plan_replicas` says how many more leases to issue, or that it
has run out of tries (BOINC's transitioner, as a function).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskState(StrEnum):
    OPEN = "open"
    VERIFIED = "verified"
    FAILED = "failed"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.OPEN: frozenset({TaskState.VERIFIED, TaskState.FAILED}),
    # A verified task reopens when a result it stood on came from a node caught cheating later.
    TaskState.VERIFIED: frozenset({TaskState.OPEN}),
    TaskState.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    pass


def check_transition(current: TaskState, new: TaskState) -> TaskState:
    if new not in _TASK_TRANSITIONS[current]:
        raise InvalidTransition(f"task cannot go from {current} to {new}")
    return new


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    issue: int
    fail_reason: str | None = None


def plan_replicas(*, k: int, max_results: int, live: int, attempts: int, best_group: int,
                  last_problem: str | None = None, errors: int = 0, max_errors: int = 3) -> ReplicaPlan:
    """How many more replicas to lease now.

    `attempts` counts every lease that ran (answered, errored, expired or live), so a task that
    keeps failing stops at `max_results` (BOINC's max_total_results); `errors` counts invalid
    results, and `max_errors` of them fail the task (BOINC's max_error_results).
    """
    need = k - best_group
    if need <= 0:
        return ReplicaPlan(0)
    if errors >= max_errors:
        return ReplicaPlan(0, fail_reason=f"{errors} invalid results (max_errors={max_errors}); "
                                          f"last problem: {last_problem}")
    issue = min(max(0, need - live), max_results - attempts)
    if issue > 0 or live > 0:
        return ReplicaPlan(max(0, issue))
    reason = f"no agreement of {k} owners after {attempts} results (max_results={max_results})"
    if last_problem:
        reason += f"; last problem: {last_problem}"
    return ReplicaPlan(0, fail_reason=reason)


def may_take(*, node: str, owner: str, task_nodes: set[str], task_owners: set[str]) -> bool:
    """Never two replicas of one task on one node, nor on two nodes of one owner."""
    return node not in task_nodes and owner not in task_owners
