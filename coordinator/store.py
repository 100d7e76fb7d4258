"""The coordinator's persistent state behind one interface: models, blobs, jobs, tasks, leases,
results and the ledger's credits. Implementations: `MemoryStore` (the twin, for tests of callers
and throw-away runs) and `SQLiteStore` (default). `open_store(url)` picks one from a URL.

Contract (checked for every backend by tests/contract/test_coordinator_store.py):
- `apply(ops)` writes a batch of engine operations in ONE transaction: a task's verdict, its
  accepted results and their credits commit together or not at all.
- Credits are exactly once per (task, node): applying the same verdict twice adds nothing.
- `load()` returns everything needed to resume unfinished jobs after a restart.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ledger.entries import Balances, Entry
from ledger.store import InMemoryLedgerStore

from .quorum import Tolerance
from .records import (
    NEVER_RAN,
    BlobPut,
    JobFinished,
    JobRecord,
    JobSpec,
    LeaseClosed,
    LeaseIssued,
    LeaseRecord,
    Op,
    ResultRecorded,
    TaskDecided,
    TaskRecord,
)
from .scheduler import JobState, TaskState


class StoreError(Exception):
    pass


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
    nodes/owners already used and the tries spent), their live leases and their valid votes."""

    jobs: list[JobRecord] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)
    live_leases: list[LeaseRecord] = field(default_factory=list)
    votes: list[StoredVote] = field(default_factory=list)


def spec_to_json(spec: JobSpec) -> str:
    d = {k: getattr(spec, k) for k in spec.__dataclass_fields__}
    d["tolerance"] = {"rtol": spec.tolerance.rtol, "atol": spec.tolerance.atol, "final": spec.tolerance.final}
    d["output_names"] = list(spec.output_names)
    return json.dumps(d)


def spec_from_json(raw: str) -> JobSpec:
    d = json.loads(raw)
    d["tolerance"] = Tolerance(**d["tolerance"])
    d["output_names"] = tuple(d["output_names"])
    return JobSpec(**d)


class CoordinatorStore(ABC):
    @abstractmethod
    async def put_model(self, digest: str, data: bytes, meta: dict[str, Any]) -> bool:
        """Store a model by digest; True if it was new. Idempotent."""

    @abstractmethod
    async def get_model(self, digest: str) -> bytes | None: ...

    @abstractmethod
    async def model_meta(self, digest: str) -> dict[str, Any] | None: ...

    @abstractmethod
    async def put_blob(self, digest: str, data: bytes) -> None:
        """Content-addressed; the caller has checked the digest. Idempotent."""

    @abstractmethod
    async def get_blob(self, digest: str) -> bytes | None: ...

    @abstractmethod
    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        """Job, tasks and their input blobs in one transaction: a job exists whole or not at all."""

    @abstractmethod
    async def apply(self, ops: Sequence[Op]) -> None:
        """All ops in one transaction, in order."""

    @abstractmethod
    async def load(self) -> Snapshot: ...

    @abstractmethod
    async def canonical_digests(self, job: str) -> list[str | None]:
        """The accepted output digest of each task of `job`, in task order (None if not verified)."""

    @abstractmethod
    async def ledger_balances(self) -> Balances: ...

    @abstractmethod
    async def ledger_entries(self, after: int, limit: int) -> list[Entry]: ...

    @abstractmethod
    async def ledger_history(self, node: str) -> list[Entry]: ...

    @abstractmethod
    async def accepted(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Accepted (task, node) results with the task's state, ordered by a stable sequence
        number `seq` > after: what `sparecycles ledger verify` checks credits against."""

    @abstractmethod
    async def close(self) -> None: ...


class MemoryStore(CoordinatorStore):
    """The in-memory twin: same contract, nothing survives the process."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.blobs: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, dict[str, Any]] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self._accepted: list[str] = []
        self.ledger = InMemoryLedgerStore()

    async def put_model(self, digest: str, data: bytes, meta: dict[str, Any]) -> bool:
        if digest in self.models:
            return False
        self.models[digest] = (data, meta)
        return True

    async def get_model(self, digest: str) -> bytes | None:
        m = self.models.get(digest)
        return None if m is None else m[0]

    async def model_meta(self, digest: str) -> dict[str, Any] | None:
        m = self.models.get(digest)
        return None if m is None else m[1]

    async def put_blob(self, digest: str, data: bytes) -> None:
        self.blobs.setdefault(digest, data)

    async def get_blob(self, digest: str) -> bytes | None:
        return self.blobs.get(digest)

    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        for d, b in blobs.items():
            self.blobs.setdefault(d, b)
        self.jobs[job.spec.id] = {"spec": job.spec, "state": job.state, "error": None, "finished_at": None,
                                  "tasks": [t.id for t in tasks]}
        for t in tasks:
            self.tasks[t.id] = {"rec": t, "state": t.state, "canonical": None, "error": None}

    async def apply(self, ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, LeaseIssued):
                self.leases[op.lease.id] = {"rec": op.lease, "state": "live"}
            elif isinstance(op, LeaseClosed):
                self.leases[op.lease]["state"] = op.state
            elif isinstance(op, ResultRecorded):
                self.results.setdefault(op.lease, {"op": op, "accepted": False})
            elif isinstance(op, TaskDecided):
                row = self.tasks[op.task]
                if row["state"] is not TaskState.OPEN:
                    continue  # decided already: a repeated verdict changes nothing
                row.update(state=op.state, canonical=op.canonical_digest, error=op.error)
                for lease in op.accepted_leases:
                    self.results[lease]["accepted"] = True
                    self._accepted.append(lease)
                await self.ledger.append(op.credits)
            elif isinstance(op, JobFinished):
                self.jobs[op.job].update(state=op.state, error=op.error, finished_at=op.finished_at)
            elif isinstance(op, BlobPut):
                self.blobs.setdefault(op.digest, op.data)

    async def load(self) -> Snapshot:
        snap = Snapshot()
        for job_row in self.jobs.values():
            spec: JobSpec = job_row["spec"]
            tasks = [self.tasks[t] for t in job_row["tasks"]]
            job = JobRecord(spec=spec, tasks=list(job_row["tasks"]), state=job_row["state"],
                            error=job_row["error"], finished_at=job_row["finished_at"])
            for row in tasks:
                if row["state"] is TaskState.VERIFIED:
                    job.verified += 1
                elif row["state"] is TaskState.FAILED:
                    job.failed += 1
                    job.failures.append({"task": row["rec"].id, "reason": row["error"]})
            snap.jobs.append(job)
            if job.state is not JobState.RUNNING:
                continue
            for row in tasks:
                if row["state"] is not TaskState.OPEN:
                    continue
                old: TaskRecord = row["rec"]
                rec = TaskRecord(id=old.id, job=old.job, index=old.index, start=old.start, stop=old.stop,
                                 input_digest=old.input_digest, input_bytes=old.input_bytes)
                for lrow in self.leases.values():
                    lease: LeaseRecord = lrow["rec"]
                    if lease.task != rec.id:
                        continue
                    rec.nodes.add(lease.node)
                    rec.owners.add(lease.owner)
                    if lrow["state"] == "live":
                        snap.live_leases.append(lease)
                    elif lrow["state"] not in NEVER_RAN:
                        rec.attempts += 1
                snap.tasks.append(rec)
                for res in self.results.values():
                    op = res["op"]
                    if op.task != rec.id:
                        continue
                    if op.problem is None:
                        snap.votes.append(StoredVote(op.task, op.lease, op.node, op.owner, op.output_digest))
                    else:
                        rec.errors += 1
        return snap

    async def canonical_digests(self, job: str) -> list[str | None]:
        return [self.tasks[t]["canonical"] for t in self.jobs[job]["tasks"]]

    async def ledger_balances(self) -> Balances:
        return await self.ledger.balances()

    async def ledger_entries(self, after: int, limit: int) -> list[Entry]:
        return await self.ledger.entries(after, limit)

    async def ledger_history(self, node: str) -> list[Entry]:
        return await self.ledger.history(node)

    async def accepted(self, after: int, limit: int) -> list[dict[str, Any]]:
        out = []
        for seq, lease in enumerate(self._accepted[after:after + limit], start=after + 1):
            op: ResultRecorded = self.results[lease]["op"]
            task = self.tasks[op.task]
            out.append({"seq": seq, "task": op.task, "job": task["rec"].job, "node": op.node,
                        "owner": op.owner, "output_digest": op.output_digest,
                        "task_state": str(task["state"])})
        return out

    async def close(self) -> None:
        await self.ledger.close()


def open_store(url: str) -> CoordinatorStore:
    """`memory` or `sqlite:///relative.db` / `sqlite:////abs/path.db` (SQLAlchemy-style)."""
    if url in ("memory", ":memory:", "memory://"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        from .sqlite_store import SQLiteStore

        path = url[len("sqlite:///"):]
        if not path:
            raise StoreError("sqlite URL needs a path: sqlite:////abs/path/ledger.db")
        return SQLiteStore(path)
    raise StoreError(f"unsupported --db {url!r}: use sqlite:////abs/path/ledger.db or memory "
                     "(PostgreSQL arrives with the auditable ledger)")
