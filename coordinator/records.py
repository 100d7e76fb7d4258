"""Plain records the engine keeps in memory and the store persists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ledger.entries import Charge, Credit
from protocol.tensors import Tensor

from .quorum import Tolerance, Vote
from .scheduler import JobState, TaskState


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    id: str
    model: str
    rows: int
    replicas: int
    task_size: int
    max_results: int
    tolerance: Tolerance
    opt_level: int
    output_names: tuple[str, ...]
    flops_per_row: int
    created_at: float
    # Invalid results (errors, NaN, wrong shapes) a task may collect before it fails: BOINC's
    # max_error_results. Without it, a task every node fails would wait forever for a new node.
    max_errors: int = 3
    # Wall-clock seconds after `created_at` by which every task must be decided; a task the network
    # cannot decide by then fails with the reason it could not (0: the coordinator's default).
    deadline_seconds: float = 0.0
    # The account (by name) that submitted the job: it alone reads the job, and pays for it.
    submitter: str = ""
    # sha256 hex of the job's read token: whoever holds the token may read status and outputs.
    read_token_sha256: str = ""
    input_bytes: int = 0  # encoded size of the job's inputs: counts toward the submitter's storage quota


@dataclass(slots=True, kw_only=True)
class TaskRecord:
    id: str
    job: str
    index: int
    start: int
    stop: int
    input_digest: str
    input_bytes: int
    state: TaskState = TaskState.OPEN
    inputs: dict[str, Tensor] | None = None  # held only while open and small enough to go inline
    attempts: int = 0
    errors: int = 0
    nodes: set[str] = field(default_factory=set)
    owners: set[str] = field(default_factory=set)
    live: set[str] = field(default_factory=set)
    votes: list[Vote] = field(default_factory=list)
    best_group: int = 0  # distinct owners in the largest agreeing group of `votes` (Engine._tally)
    last_problem: str | None = None
    canonical_digest: str | None = None
    error: str | None = None
    need: int = 0  # agreeing owners this task needs now: the job's k, or 1 for a trusted node's solo run
    error_owners: set[str] = field(default_factory=set)  # owners whose nodes reported it invalid
    problems: dict[str, int] = field(default_factory=dict)  # invalid-result reason -> distinct owners
    truth: Vote | None = None  # the coordinator's own outputs, once it audited the task
    auditing: bool = False  # an audit is running: no verdict until it answers
    error_nodes: list[tuple[str, str]] = field(default_factory=list)  # (node, owner) that reported errors
    avoid: dict[str, float] = field(default_factory=dict)  # node -> until when (monotonic) it may not retake it
    # While its job runs: the outputs it was accepted on and their nodes, when they stood on trust
    # alone (kept for the job's closing check, Engine._closing_checks).
    unchecked_outputs: Mapping[str, Any] | None = None
    unchecked_nodes: tuple[tuple[str, str], ...] = ()
    paid: tuple[Credit, ...] = ()  # the credits of its verdict (kept to claw back if reopened)
    paid_leases: tuple[str, ...] = ()
    charge: Charge | None = None
    notes: list[str] = field(default_factory=list)  # why it was replicated, audited, rejected (last few)

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(slots=True, kw_only=True)
class JobRecord:
    spec: JobSpec
    tasks: list[str]
    state: JobState = JobState.RUNNING
    verified: int = 0
    failed: int = 0
    error: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    finished_at: float | None = None

    def status(self) -> dict[str, Any]:
        s = self.spec
        total = len(self.tasks)
        return {
            "job": s.id, "model": s.model, "state": str(self.state), "rows": s.rows,
            "replicas": s.replicas, "task_size": s.task_size, "max_results": s.max_results,
            "tasks": {"total": total, "verified": self.verified, "failed": self.failed,
                      "open": total - self.verified - self.failed},
            "error": self.error, "failures": self.failures[:100],
            "created_at": s.created_at, "finished_at": self.finished_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    id: str
    task: str
    job: str
    node: str
    owner: str
    issued_at: float
    expires_at: float  # wall clock: it crosses to the node
    deadline: float  # monotonic: what this process times out on




# Persistence operations, applied in order, one transaction per batch (group commit).
@dataclass(frozen=True, slots=True)
class LeaseIssued:
    lease: LeaseRecord


@dataclass(frozen=True, slots=True)
class LeaseClosed:
    lease: str
    state: str  # reported | expired | released | cancelled | offline


@dataclass(frozen=True, slots=True)
class ResultRecorded:
    lease: str
    task: str
    node: str
    owner: str
    output_digest: str
    problem: str | None
    received_at: float


@dataclass(frozen=True, slots=True)
class TaskDecided:
    task: str
    state: TaskState
    canonical_digest: str | None
    error: str | None
    accepted_leases: tuple[str, ...]
    credits: tuple[Credit, ...]
    # What the job's submitter pays for the task: the sum of `credits`, committed with them. None
    # for a failed task, and for jobs without a submitter (internal use).
    charge: Charge | None = None


@dataclass(frozen=True, slots=True)
class JobFinished:
    job: str
    state: JobState
    error: str | None
    finished_at: float


@dataclass(frozen=True, slots=True)
class BlobPut:
    digest: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TaskReopened:
    """A verified task goes back to open: a result it was accepted on came from a node later caught
    returning wrong results, and had stood on trust alone. The credits it paid are clawed back and
    the submitter's charge refunded, by new ledger entries (history is never edited); the task runs
    again and is charged again when it verifies. If the job had finished, it is running again."""

    task: str
    job: str
    reason: str
    bad_lease: str  # the lease whose result is no longer believed: keys the ledger entries
    credits: tuple[Credit, ...]  # what the task paid, to claw back
    charge: Charge | None  # what its submitter paid, to refund
    job_reopened: bool  # the job had finished and runs again
    at: float


Op = LeaseIssued | LeaseClosed | ResultRecorded | TaskDecided | JobFinished | BlobPut | TaskReopened
