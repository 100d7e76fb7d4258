"""Pure: rebuild what a restarted coordinator needs from stored rows. No I/O.

Every store (in-memory, SQLite, and the PostgreSQL one to come) supplies the same row records;
this module alone decides what they mean for a resumed engine, so the stores cannot drift apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from .records import JobRecord, JobSpec, LeaseRecord, TaskRecord
from .scheduler import JobState, TaskState


@dataclass(frozen=True, slots=True)
class JobRow:
    spec: JobSpec
    state: str
    error: str | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class TaskRow:
    id: str
    job: str
    index: int
    start: int
    stop: int
    input_digest: str
    input_bytes: int
    state: str
    error: str | None


@dataclass(frozen=True, slots=True)
class LeaseRow:
    id: str
    task: str
    job: str
    node: str
    owner: str
    issued_at: float
    expires_at: float
    state: str  # live | reported | expired | released | unsent | cancelled | offline | lost


@dataclass(frozen=True, slots=True)
class ResultRow:
    lease: str
    task: str
    node: str
    owner: str
    output_digest: str
    problem: str | None


@dataclass(slots=True)
class StoredRows:
    """What a store hands over on restart. `jobs` in creation order; `tasks` every task of every
    job; `leases` and `results` at least those of the open tasks of running jobs, `results` in
    arrival order."""

    jobs: Sequence[JobRow] = ()
    tasks: Sequence[TaskRow] = ()
    leases: Sequence[LeaseRow] = ()
    results: Sequence[ResultRow] = ()


@dataclass(frozen=True, slots=True)
class StoredVote:
    task: str
    lease: str
    node: str
    owner: str
    output_digest: str


@dataclass(slots=True)
class Snapshot:
    """What a restarted coordinator needs: every job, the open tasks of running jobs (with the
    nodes/owners excluded from them and the tries spent), their live leases and their valid votes."""

    jobs: list[JobRecord] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)
    live_leases: list[LeaseRecord] = field(default_factory=list)
    votes: list[StoredVote] = field(default_factory=list)


def snapshot_from_rows(rows: StoredRows) -> Snapshot:
    tasks_by_job: dict[str, list[TaskRow]] = defaultdict(list)
    for t in rows.tasks:
        tasks_by_job[t.job].append(t)
    leases_by_task: dict[str, list[LeaseRow]] = defaultdict(list)
    for lease in rows.leases:
        leases_by_task[lease.task].append(lease)
    results_by_task: dict[str, list[ResultRow]] = defaultdict(list)
    for r in rows.results:
        results_by_task[r.task].append(r)

    snap = Snapshot()
    for job_row in rows.jobs:
        task_rows = sorted(tasks_by_job.get(job_row.spec.id, ()), key=lambda t: t.index)
        job = JobRecord(spec=job_row.spec, tasks=[t.id for t in task_rows], state=JobState(job_row.state),
                        error=job_row.error, finished_at=job_row.finished_at)
        for t in task_rows:
            if t.state == TaskState.VERIFIED:
                job.verified += 1
            elif t.state == TaskState.FAILED:
                job.failed += 1
                job.failures.append({"task": t.id, "reason": t.error or ""})
        snap.jobs.append(job)
        if job.state is not JobState.RUNNING:
            continue
        for t in task_rows:
            if t.state != TaskState.OPEN:
                continue
            rec, live, votes = _open_task(t, leases_by_task.get(t.id, ()), results_by_task.get(t.id, ()))
            snap.tasks.append(rec)
            snap.live_leases.extend(live)
            snap.votes.extend(votes)
    return snap


def _open_task(t: TaskRow, leases: Sequence[LeaseRow],
               results: Sequence[ResultRow]) -> tuple[TaskRecord, list[LeaseRecord], list[StoredVote]]:
    rec = TaskRecord(id=t.id, job=t.job, index=t.index, start=t.start, stop=t.stop, input_digest=t.input_digest,
                     input_bytes=t.input_bytes)
    live: list[LeaseRecord] = []
    for lease in leases:
        if lease.state == "live":
            # The engine re-tracks it (and counts the try, and excludes its node) on restore_lease.
            live.append(LeaseRecord(id=lease.id, task=lease.task, job=lease.job, node=lease.node,
                                    owner=lease.owner, issued_at=lease.issued_at, expires_at=lease.expires_at,
                                    deadline=0.0))
        elif lease.state == "reported":
            rec.attempts += 1  # only results are tries (Engine._close)
    votes = [StoredVote(r.task, r.lease, r.node, r.owner, r.output_digest) for r in results if r.problem is None]
    # Exclusions as the running engine keeps them (Engine._track, _close, on_result): a node that
    # holds a live lease or reported on the task, valid or not, stays excluded; an owner while one
    # of its nodes holds a live lease or a valid vote. Leases that expired, went offline or were
    # given back exclude nobody, or a network of two owners would stall after a restart.
    rec.nodes = {r.node for r in results} | {lease.node for lease in live}
    rec.owners = {v.owner for v in votes} | {lease.owner for lease in live}
    rec.errors = sum(1 for r in results if r.problem is not None)
    return rec, live, votes
