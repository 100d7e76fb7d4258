"""The in-memory twin of the coordinator's store: same contract, nothing survives the process.

It keeps the same row records the SQL stores keep (`restore.JobRow`, `TaskRow`, `LeaseRow`,
`ResultRow`), so restoring from it goes through the one path in `restore.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ledger.checkpoint import Checkpoint
from ledger.entries import Balances, Charge, Credit, Entry, Grant, balances_of, reversal_of
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
    TaskReopened,
)
from .restore import JobRow, LeaseRow, ResultRow, StoredRows, TaskRow
from .scheduler import TaskState
from .store import CoordinatorStore, Expiry, Freed, StoreError, keyed, reused_keys


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
        self._accepted: list[str] = []  # leases in the order they were accepted: seq = place + 1
        self._unaccepted: set[str] = set()  # accepted, then clawed back when their task reopened
        self._accepted_of: dict[str, list[str]] = {}  # task -> its leases accepted now
        self._superseded: set[str] = set()  # leases and results of a task before it was reopened
        self.ledger = InMemoryLedgerStore()
        self.accounts: dict[str, Account] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.invites: dict[str, Invite] = {}
        self.trust: dict[tuple[str, str], dict[str, Any]] = {}
        self.refs: dict[str, set[str]] = {}  # blob digest -> jobs that reference it (not expired)
        self.uploads: dict[str, tuple[str, str]] = {}  # lease -> (job, digest) of its one upload
        self.expired: dict[str, tuple[float, str]] = {}  # job -> (when, why)
        self.verdict_seq: dict[str, int] = {}  # task -> ledger size after its current verdict's apply
        self.checkpoints_by_size: dict[int, Checkpoint] = {}

    def _ref(self, digest: str, job: str) -> None:
        self.refs.setdefault(digest, set()).add(job)

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

    async def put_upload(self, lease: str, job: str, digest: str, data: bytes) -> str:
        earlier = self.uploads.get(lease)
        if earlier is not None:
            return earlier[1]
        self.uploads[lease] = (job, digest)
        self.blobs.setdefault(digest, data)
        self._ref(digest, job)
        return digest

    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        for d, b in blobs.items():
            self.blobs.setdefault(d, b)
            self._ref(d, job.spec.id)
        self.jobs[job.spec.id] = JobRow(spec=job.spec, state=str(job.state), error=None, finished_at=None)
        self.job_tasks[job.spec.id] = [t.id for t in tasks]
        for t in tasks:
            self.tasks[t.id] = TaskRow(id=t.id, job=t.job, index=t.index, start=t.start, stop=t.stop,
                                       input_digest=t.input_digest, input_bytes=t.input_bytes,
                                       state=str(t.state), error=None)
            self.canonical[t.id] = None

    async def apply(self, ops: Sequence[Op]) -> None:
        decided: list[str] = []  # tasks whose verdict this batch wrote or undid
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
                if op.canonical_digest is not None and op.task in self.tasks:
                    self._ref(op.canonical_digest, self.tasks[op.task].job)  # even if the verdict is a replay
                if await self._decide(keyed(op)):
                    decided.append(op.task)
            elif isinstance(op, TaskReopened):
                if await self._reopen(op):
                    decided.append(op.task)
            elif isinstance(op, JobFinished):
                self.jobs[op.job] = replace(self.jobs[op.job], state=str(op.state), error=op.error,
                                            finished_at=op.finished_at)
            elif isinstance(op, BlobPut):
                self.blobs.setdefault(op.digest, op.data)
        # Nothing awaited above suspends, so the batch is as atomic as a transaction: the size
        # after it is the size right after this verdict's "transaction", as the SQL stores record.
        size = await self.ledger.size()
        self.verdict_seq.update((task, size) for task in decided)

    async def _decide(self, op: TaskDecided) -> bool:
        """Whether the verdict was new (and written)."""
        task = self.tasks[op.task]
        if task.state != TaskState.OPEN:
            return False  # decided already: a repeated verdict changes nothing
        records: list[Credit | Charge] = [*op.credits, *([op.charge] if op.charge is not None else [])]
        # Open again after a reopen: the old verdict, replayed, finds its keys in the ledger and
        # must not verify the task again on a result no longer believed (sqlite_store does the same).
        taken = [await self.ledger.contains(r.unique_key) for r in records]
        if any(taken):
            if all(taken):
                return False
            raise StoreError(reused_keys(op))
        self.tasks[op.task] = replace(task, state=str(op.state), error=op.error)
        self.canonical[op.task] = op.canonical_digest
        for lease in op.accepted_leases:
            if lease in self._unaccepted:
                self._unaccepted.discard(lease)  # accepted again: back at its old seq, as in SQL
            else:
                self._accepted.append(lease)
        self._accepted_of.setdefault(op.task, []).extend(op.accepted_leases)
        await self.ledger.append(records)
        return True

    async def _reopen(self, op: TaskReopened) -> bool:
        """Whether the reopen was new (and written)."""
        task = self.tasks[op.task]
        if task.state != TaskState.VERIFIED:
            return False  # open already, or failed: only a verified task reopens
        records = reversal_of(op.credits, op.charge, bad_lease=op.bad_lease, reason=op.reason, created_at=op.at)
        if records and await self.ledger.append(records) == 0:
            return False  # a replayed reopen, the task verified again since: its entries are in the ledger
        self.tasks[op.task] = replace(task, state=str(TaskState.OPEN), error=None)
        self.canonical[op.task] = None
        self._unaccepted.update(self._accepted_of.pop(op.task, ()))
        self._superseded.update(lid for lid, ls in self.leases.items() if ls.task == op.task and ls.state != "live")
        self._superseded.update(lid for lid, r in self.results.items() if r.task == op.task)
        if op.job_reopened:
            self.jobs[op.job] = replace(self.jobs[op.job], state="running", error=None, finished_at=None)
        return True

    async def load_rows(self) -> StoredRows:
        # A reopened task's leases and results from before the reopen are history: it restores as
        # an ordinary open task, with no tries, votes or exclusions from its earlier verdict.
        return StoredRows(jobs=[j for j in self.jobs.values() if j.spec.id not in self.expired],
                          tasks=[t for t in self.tasks.values() if t.job not in self.expired],
                          leases=[r for r in self.leases.values() if r.id not in self._superseded],
                          results=[r for r in self.results.values() if r.lease not in self._superseded])

    async def finished_before(self, cutoff: float, limit: int) -> list[str]:
        done = [j for j in self.jobs.values() if j.state != "running" and j.finished_at is not None
                and j.finished_at <= cutoff and j.spec.id not in self.expired]
        return [j.spec.id for j in sorted(done, key=lambda j: j.finished_at or 0.0)[:limit]]

    async def expire_jobs(self, jobs: Sequence[str], *, at: float, reason: str) -> Freed:
        going = {j for j in jobs if j in self.jobs and self.jobs[j].state != "running" and j not in self.expired}
        if not going:
            return Freed()
        for j in going:
            self.expired[j] = (at, reason)
        leases = [lid for lid, row in self.leases.items() if row.job in going]
        for lid in leases:
            del self.leases[lid]
        for lid in [lid for lid, (job, _) in self.uploads.items() if job in going]:
            del self.uploads[lid]
        blobs = size = 0
        for digest in [d for d, holders in self.refs.items() if holders & going]:
            holders = self.refs[digest] - going
            if holders:
                self.refs[digest] = holders
                continue
            del self.refs[digest]
            data = self.blobs.pop(digest, None)
            if data is not None:
                blobs, size = blobs + 1, size + len(data)
        return Freed(jobs=len(going), blobs=blobs, bytes=size, leases=len(leases))

    async def expiry(self, job: str) -> Expiry | None:
        when = self.expired.get(job)
        return None if when is None else Expiry(job=self.jobs[job], at=when[0], reason=when[1])

    async def compact(self) -> None:
        return None  # memory is given back as the objects go

    async def canonical_digests(self, job: str) -> list[str | None]:
        return [self.canonical[t] for t in self.job_tasks[job]]

    async def ledger_balances(self, upto: int | None = None) -> Balances:
        if upto is None:
            return await self.ledger.balances()
        return balances_of(await self.ledger.entries(0, max(upto, 0)))

    async def ledger_entries(self, after: int, limit: int, upto: int | None = None) -> list[Entry]:
        if upto is not None:
            limit = min(limit, upto - max(after, 0))
        return await self.ledger.entries(after, limit)

    async def ledger_job(self, job: str) -> list[Entry]:
        return [e for e in await self.ledger.entries(0, await self.ledger.size())
                if not isinstance(e.record, Grant) and e.record.job == job]

    async def save_checkpoint(self, cp: Checkpoint) -> None:
        self.checkpoints_by_size.setdefault(cp.size, cp)

    async def latest_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints_by_size[max(self.checkpoints_by_size)] if self.checkpoints_by_size else None

    async def checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        return [self.checkpoints_by_size[s] for s in sorted(self.checkpoints_by_size) if s > after_size][:max(limit, 0)]

    async def ledger_history(self, node: str) -> list[Entry]:
        return await self.ledger.history(node)

    async def grant(self, account: str, amount: int, *, key: str, memo: str, created_at: float) -> bool:
        grant = Grant(account=account, amount=amount, key=key, memo=memo, created_at=created_at)
        return await self.ledger.append([grant]) == 1

    async def account_balance(self, name: str) -> int:
        return await self.ledger.account_balance(name)

    async def account_history(self, name: str) -> list[Entry]:
        return await self.ledger.account_history(name)

    async def accepted(self, after: int, limit: int, upto: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for seq, lease in enumerate(self._accepted[max(after, 0):], start=max(after, 0) + 1):
            if len(out) >= limit:
                break
            if lease in self._unaccepted:
                continue  # clawed back: no longer accepted, and a full page stays full
            r = self.results[lease]
            task = self.tasks[r.task]
            verdict_seq = self.verdict_seq.get(r.task, 0)
            if upto is not None and verdict_seq > upto:
                continue  # verified after the snapshot
            out.append({"seq": seq, "task": r.task, "job": task.job, "node": r.node, "owner": r.owner,
                        "output_digest": r.output_digest, "task_state": task.state,
                        "submitter": self.jobs[task.job].spec.submitter, "verdict_seq": verdict_seq,
                        "rows": task.stop - task.start, "flops_per_row": self.jobs[task.job].spec.flops_per_row})
        return out

    async def save_accounts(self, *, accounts: Sequence[Account] = (), nodes: Sequence[NodeRecord] = (),
                            invites: Sequence[Invite] = ()) -> None:
        self.accounts.update((a.id, a) for a in accounts)
        self.nodes.update((n.node, n) for n in nodes)
        self.invites.update((i.token_sha256, i) for i in invites)

    async def load_accounts(self) -> tuple[list[Account], list[NodeRecord], list[Invite]]:
        return list(self.accounts.values()), list(self.nodes.values()), list(self.invites.values())

    async def save_trust(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        self.trust.update(((kind, name), dict(rec)) for kind, name, rec in rows)

    async def load_trust(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(kind, name, dict(rec)) for (kind, name), rec in self.trust.items()]

    async def close(self) -> None:
        await self.ledger.close()
