"""The coordinator's persistent state behind one interface: models, blobs, jobs, tasks, leases,
results and the ledger's credits. Implementations: `memory_store.MemoryStore` (the twin, for tests
of callers and throw-away runs) and `sqlite_store.SQLiteStore` (default); `store_factory.open_store`
picks one from a URL. Arrows run one way: factory -> implementations -> this interface.

Contract (checked for every backend by tests/contract/test_coordinator_store.py):
- `apply(ops)` writes a batch of engine operations in ONE transaction: a task's verdict, its
  accepted results, their credits and their charge commit together or not at all.
- Credits are exactly once per (task, node, accepted lease), a task's charge once per verdict, a
  grant once per key: applying the same verdict (or granting under the same key) twice adds nothing.
- A task is decided once while open: a verdict for a task no longer open, or one whose ledger
  entries are already there (an old verdict replayed after a reopen), changes nothing.
- `TaskReopened` applies once, to a verified task, in the batch's transaction and order: a
  clawback per credit and a refund of the charge (`ledger.entries.reversal_of`), the task open with
  no canonical digest, its results no longer accepted, and its job running again if
  `job_reopened`. Its earlier leases and results are kept but not loaded: a reopened task restores
  as an ordinary open task. A new verdict for it then applies, with new credits and a new charge
  (credits and a charge without `ref` are keyed by their accepted leases first: `keyed`); one
  that shares some but not all of its ledger keys with the earlier verdict raises `StoreError`
  and the batch is not written.
- A lease closes once: closing a lease that is no longer live changes nothing.
- `load_rows()` returns the stored rows `restore.snapshot_from_rows` rebuilds a resumed engine from;
  a store supplies rows only and never interprets them. Expired jobs are not among them.
- Blobs are content-addressed and shared: a job references its tasks' inputs, their accepted
  outputs and what was uploaded under its leases. `expire_jobs` deletes a blob only once no job
  that has not expired references it, and keeps every job, task and result row (the ledger is
  checked against them); a running job never expires.
- A lease holds at most one upload: `put_upload` of another digest under it stores nothing.
- Ledger reads with `upto` are consistent snapshots (issue 11): ledger seqs run 1..n without gaps and
  commit in seq order, so the entries with seq <= a committed size never change, and neither do
  `ledger_entries`, `ledger_balances` or `accepted` asked with that size as `upto`, however many
  entries are appended after it. Each task records `verdict_seq`, the ledger size right after the
  transaction that wrote its current verdict (0 for a task verified before issue 11).
- Checkpoints are kept one per size, the first saved for a size standing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ledger.checkpoint import Checkpoint
from ledger.entries import Balances, Entry

from .accounts import Account, Invite, NodeRecord
from .quorum import Tolerance
from .records import JobRecord, JobSpec, Op, TaskDecided, TaskRecord
from .restore import JobRow, Snapshot, StoredRows, snapshot_from_rows


class StoreError(Exception):
    pass


class StorageFull(StoreError):
    """The disk under the store is full. The failed call wrote nothing; the coordinator keeps what it
    could not commit and tries again, so freeing space is all an operator has to do."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """A finished job whose inputs and outputs are gone: its row, when, and why (one phrase:
    `retention.expired_after(...)` or `retention.DELETED`)."""

    job: JobRow
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class Freed:
    """What `expire_jobs` removed."""

    jobs: int = 0
    blobs: int = 0
    bytes: int = 0
    leases: int = 0

    def __add__(self, other: Freed) -> Freed:
        return Freed(self.jobs + other.jobs, self.blobs + other.blobs, self.bytes + other.bytes,
                     self.leases + other.leases)


def keyed(decided: TaskDecided) -> TaskDecided:
    """The verdict with each credit keyed by its lease: a credit without a `ref` takes the lease
    accepted at its place in `accepted_leases`, and a charge without one the first (as
    `ledger.entries.charge_for` would), when there is one lease per credit - the engine builds both
    from the same votes, in order. Without a ref, a reopened task's second verdict would share its
    charge's key with the refunded one and could not be written."""
    leases = decided.accepted_leases
    if not leases or len(leases) != len(decided.credits):
        return decided
    credits = tuple(c if c.ref else replace(c, ref=lease) for c, lease in zip(decided.credits, leases, strict=True))
    charge = decided.charge
    if charge is not None and not charge.ref:
        charge = replace(charge, ref=credits[0].ref)
    return replace(decided, credits=credits, charge=charge)


def reused_keys(decided: TaskDecided) -> str:
    """Why a verdict for a reopened task is refused: some of its ledger keys are its earlier
    verdict's. Not a replay (that has all of them): a caller's bug, which would pay without
    charging or charge without paying if written."""
    return (f"the verdict for reopened task {decided.task} reuses ledger keys of its earlier verdict: "
            "build its credits with ref = the accepted lease (charge_for then keys the charge by it)")


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
    async def put_upload(self, lease: str, job: str, digest: str, data: bytes) -> str:
        """A node's outputs uploaded under `lease` (a lease of `job`; the caller has checked the
        digest and the content): the blob, referenced by `job`, as the lease's one upload. Returns
        the digest the lease's upload holds now: `digest` when this is its first upload (or the
        same one again), else the earlier one, and then nothing is stored."""

    @abstractmethod
    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        """Job, tasks and their input blobs in one transaction: a job exists whole or not at all."""

    @abstractmethod
    async def apply(self, ops: Sequence[Op]) -> None:
        """All ops in one transaction, in order."""

    @abstractmethod
    async def load_rows(self) -> StoredRows:
        """Every job not expired and its tasks, and the leases and results of open tasks of running
        jobs."""

    async def load(self) -> Snapshot:
        """What a restarted coordinator resumes from: one interpretation of the rows for all stores."""
        return snapshot_from_rows(await self.load_rows())

    @abstractmethod
    async def finished_before(self, cutoff: float, limit: int) -> list[str]:
        """Ids of at most `limit` jobs that finished (done or failed) at or before `cutoff` (wall
        clock) and have not expired, the earliest finished first. Cheap: asked every sweep."""

    @abstractmethod
    async def expire_jobs(self, jobs: Sequence[str], *, at: float, reason: str) -> Freed:
        """In one transaction, for each of `jobs` that is finished and not expired (others are left
        alone): mark it expired at `at` for `reason`; delete its leases and uploads, and every blob
        it referenced that no job not expired still references. Its job, task and result rows and
        their digests stay, and so do the ledger's entries. Returns what was removed."""

    @abstractmethod
    async def expiry(self, job: str) -> Expiry | None:
        """The expiry of `job`, or None (unknown, or not expired)."""

    @abstractmethod
    async def compact(self) -> None:
        """Give space freed by expiries back where the backend can (SQLite: incremental vacuum)."""

    @abstractmethod
    async def canonical_digests(self, job: str) -> list[str | None]:
        """The accepted output digest of each task of `job`, in task order (None if not verified)."""

    @abstractmethod
    async def ledger_balances(self, upto: int | None = None) -> Balances:
        """Balances over the ledger entries with seq <= `upto` (all of them by default)."""

    @abstractmethod
    async def ledger_entries(self, after: int, limit: int, upto: int | None = None) -> list[Entry]:
        """Up to `limit` entries with `after` < seq (<= `upto` when given), ascending."""

    @abstractmethod
    async def ledger_job(self, job: str) -> list[Entry]:
        """Every ledger entry of `job` (credits, charges, clawbacks, refunds), ascending seq."""

    @abstractmethod
    async def save_checkpoint(self, cp: Checkpoint) -> None:
        """Keep a signed checkpoint. A second one of the same size is ignored: the first stands.
        Committed on return."""

    @abstractmethod
    async def latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint of the largest size kept, or None before the first."""

    @abstractmethod
    async def checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        """Up to `limit` checkpoints of size > `after_size`, ascending size."""

    @abstractmethod
    async def ledger_history(self, node: str) -> list[Entry]: ...

    @abstractmethod
    async def grant(self, account: str, amount: int, *, key: str, memo: str, created_at: float) -> bool:
        """Grant `amount` new credits to `account`, once per `key` ("start:<account id>" for an open
        coordinator's starting grant, a uuid for an operator's grant). True if the grant is new,
        False if `key` was used before (nothing is added, whatever the amount). Committed on return.
        Raises `ledger.InvalidEntry` for an amount that is not a positive int or an empty name."""

    @abstractmethod
    async def account_balance(self, name: str) -> int:
        """granted + earned - spent - clawed back + refunded of the account `name`, as committed; 0
        for an unknown account.
        Cheap (an index range scan): asked on every job submission."""

    @abstractmethod
    async def account_history(self, name: str) -> list[Entry]:
        """Every ledger entry of the account `name` (grants, credits, charges, clawbacks, refunds),
        in ascending seq."""

    @abstractmethod
    async def accepted(self, after: int, limit: int, upto: int | None = None) -> list[dict[str, Any]]:
        """Accepted (task, node) results with the task's state, the job's `submitter` ("" for an
        internal job) and the task's `verdict_seq`, ordered by a stable sequence number `seq` >
        after: what `sparecycles ledger verify` checks credits and charges against. With `upto`,
        only results whose task's verdict_seq <= upto: those whose credits are among the entries
        with seq <= upto. A result accepted and then clawed back (its task reopened) is no longer
        listed: verify matches that credit with its clawback instead. Pages are full up to the last."""

    # ---- accounts: coordinator/accounts.py keeps them in memory, the store keeps them ----------
    @abstractmethod
    async def save_accounts(self, *, accounts: Sequence[Account] = (), nodes: Sequence[NodeRecord] = (),
                            invites: Sequence[Invite] = ()) -> None:
        """Insert or replace these records (by account id, node id, invite hash) in one transaction."""

    @abstractmethod
    async def load_accounts(self) -> tuple[list[Account], list[NodeRecord], list[Invite]]: ...

    @abstractmethod
    async def save_trust(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Insert or replace trust records, keyed by (kind, name): kind is "node" or "owner"."""

    @abstractmethod
    async def load_trust(self) -> list[tuple[str, str, dict[str, Any]]]: ...

    @abstractmethod
    async def close(self) -> None: ...


