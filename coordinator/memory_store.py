"""The in-memory twin of the coordinator's store: same contract, nothing survives the process.

It keeps the same row records the SQL stores keep (`restore.JobRow`, `TaskRow`, `LeaseRow`,
`ResultRow`), so restoring from it goes through the one path in `restore.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ledger.entries import Balances, Entry, Grant
from ledger.store import InMemoryLedgerStore

from .accounts import Account, Invite, NodeRecord
from .records import (
    BlobPut,
    JobFinished,
    JobRecord,
    LeaseClosed,
    LeaseIssued,
    Op,
    ResultRecorded,
    TaskDecided,
    TaskRecord,
)
from .restore import JobRow, LeaseRow, ResultRow, StoredRows, TaskRow
from .scheduler import TaskState
from .store import CoordinatorStore


class MemoryStore(CoordinatorStore):
    def __init__(self) -> None:
        self.models: dict[str, tuple[bytes, dict[str, Any]]] = {}
        self.blobs: dict[str, bytes] = {}
        self.jobs: dict[str, JobRow] = {}  # insertion order is creation order
        self.tasks: dict[str, TaskRow] = {}
        self.canonical: dict[str, str | None] = {}
        self.job_tasks: dict[str, list[str]] = {}
        self.leases: dict[str, LeaseRow] = {}
        self.results: dict[str, ResultRow] = {}  # by lease; insertion order is arrival order
        self._accepted: list[str] = []
        self.ledger = InMemoryLedgerStore()
        self.accounts: dict[str, Account] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.invites: dict[str, Invite] = {}

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
        self.jobs[job.spec.id] = JobRow(spec=job.spec, state=str(job.state), error=None, finished_at=None)
        self.job_tasks[job.spec.id] = [t.id for t in tasks]
        for t in tasks:
            self.tasks[t.id] = TaskRow(id=t.id, job=t.job, index=t.index, start=t.start, stop=t.stop,
                                       input_digest=t.input_digest, input_bytes=t.input_bytes,
                                       state=str(t.state), error=None)
            self.canonical[t.id] = None

    async def apply(self, ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, LeaseIssued):
                ls = op.lease
                self.leases.setdefault(ls.id, LeaseRow(id=ls.id, task=ls.task, job=ls.job, node=ls.node,
                                                       owner=ls.owner, issued_at=ls.issued_at,
                                                       expires_at=ls.expires_at, state="live"))
            elif isinstance(op, LeaseClosed):
                row = self.leases.get(op.lease)
                if row is not None and row.state == "live":  # a lease closes once
                    self.leases[op.lease] = replace(row, state=op.state)
            elif isinstance(op, ResultRecorded):
                self.results.setdefault(op.lease, ResultRow(lease=op.lease, task=op.task, node=op.node,
                                                            owner=op.owner, output_digest=op.output_digest,
                                                            problem=op.problem))
            elif isinstance(op, TaskDecided):
                task = self.tasks[op.task]
                if task.state != TaskState.OPEN:
                    continue  # decided already: a repeated verdict changes nothing
                self.tasks[op.task] = replace(task, state=str(op.state), error=op.error)
                self.canonical[op.task] = op.canonical_digest
                self._accepted.extend(op.accepted_leases)
                await self.ledger.append([*op.credits, *([op.charge] if op.charge is not None else [])])
            elif isinstance(op, JobFinished):
                self.jobs[op.job] = replace(self.jobs[op.job], state=str(op.state), error=op.error,
                                            finished_at=op.finished_at)
            elif isinstance(op, BlobPut):
                self.blobs.setdefault(op.digest, op.data)

    async def load_rows(self) -> StoredRows:
        return StoredRows(jobs=list(self.jobs.values()), tasks=list(self.tasks.values()),
                          leases=list(self.leases.values()), results=list(self.results.values()))

    async def canonical_digests(self, job: str) -> list[str | None]:
        return [self.canonical[t] for t in self.job_tasks[job]]

    async def ledger_balances(self) -> Balances:
        return await self.ledger.balances()

    async def ledger_entries(self, after: int, limit: int) -> list[Entry]:
        return await self.ledger.entries(after, limit)

    async def ledger_history(self, node: str) -> list[Entry]:
        return await self.ledger.history(node)

    async def grant(self, account: str, amount: int, *, key: str, memo: str, created_at: float) -> bool:
        grant = Grant(account=account, amount=amount, key=key, memo=memo, created_at=created_at)
        return await self.ledger.append([grant]) == 1

    async def account_balance(self, name: str) -> int:
        return await self.ledger.account_balance(name)

    async def account_history(self, name: str) -> list[Entry]:
        return await self.ledger.account_history(name)

    async def accepted(self, after: int, limit: int) -> list[dict[str, Any]]:
        out = []
        for seq, lease in enumerate(self._accepted[after:after + limit], start=after + 1):
            r = self.results[lease]
            task = self.tasks[r.task]
            out.append({"seq": seq, "task": r.task, "job": task.job, "node": r.node, "owner": r.owner,
                        "output_digest": r.output_digest, "task_state": task.state,
                        "submitter": self.jobs[task.job].spec.submitter})
        return out

    async def save_accounts(self, *, accounts: Sequence[Account] = (), nodes: Sequence[NodeRecord] = (),
                            invites: Sequence[Invite] = ()) -> None:
        self.accounts.update((a.id, a) for a in accounts)
        self.nodes.update((n.node, n) for n in nodes)
        self.invites.update((i.token_sha256, i) for i in invites)

    async def load_accounts(self) -> tuple[list[Account], list[NodeRecord], list[Invite]]:
        return list(self.accounts.values()), list(self.nodes.values()), list(self.invites.values())

    async def close(self) -> None:
        await self.ledger.close()
