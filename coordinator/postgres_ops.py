"""What `PostgresStore` runs inside one transaction: a batch of engine ops, a job's expiry, and the rows
a restart reads. The same steps, in the same order, as `sqlite_store._apply` and friends; see there
for why each is done the way it is. Batches travel as arrays (`unnest`, `= ANY`): one round trip per
kind of op rather than one per row, and no cap on bound parameters to chunk around.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from ledger import postgres as ledger_pg
from ledger.entries import Charge, Credit, reversal_of

from . import failpoints
from .records import BlobPut, JobFinished, LeaseClosed, LeaseIssued, Op, ResultRecorded, TaskDecided, TaskReopened
from .restore import JobRow, LeaseRow, ResultRow, StoredRows, TaskRow
from .store import Freed, StoreError, keyed, reused_keys, spec_from_json


def count(status: str) -> int:
    """Rows a command touched, from its status tag ("DELETE 3", "INSERT 0 1")."""
    return int(status.rsplit(" ", 1)[1])


async def apply(c: asyncpg.Connection, ops: Sequence[Op]) -> None:
    """Ops in order, grouped between reopens (a reopen sees everything before it, nothing after)."""
    segment: list[Op] = []
    for op in ops:
        if isinstance(op, TaskReopened):
            await _apply_grouped(c, segment)
            segment = []
            await _reopen(c, op)
        else:
            segment.append(op)
    await _apply_grouped(c, segment)


async def _reopen(c: asyncpg.Connection, op: TaskReopened) -> None:
    state = await c.fetchval("SELECT state FROM tasks WHERE id = $1 FOR UPDATE", op.task)
    if state != "verified":
        return
    records = reversal_of(op.credits, op.charge, bad_lease=op.bad_lease, reason=op.reason, created_at=op.at)
    if records and await ledger_pg.insert_entries(c, records) == 0:
        return  # verified again since, and this reopen's reversal is in: a replay
    # After the reversal's entries, under the ledger_head lock they took (see _apply_grouped).
    await c.execute("UPDATE tasks SET state = 'open', canonical_digest = NULL, error = NULL, "
                    "verdict_seq = (SELECT COALESCE(MAX(seq), 0) FROM ledger_entries) WHERE id = $1", op.task)
    await c.execute("UPDATE results SET accepted = FALSE WHERE task = $1 AND accepted", op.task)
    await c.execute("INSERT INTO superseded_leases (lease, task) SELECT id, task FROM leases "
                    "WHERE task = $1 AND state <> 'live' ON CONFLICT DO NOTHING", op.task)
    await c.execute("INSERT INTO superseded_leases (lease, task) SELECT lease, task FROM results "
                    "WHERE task = $1 ON CONFLICT DO NOTHING", op.task)
    if op.job_reopened:
        await c.execute("UPDATE jobs SET state = 'running', error = NULL, finished_at = NULL WHERE id = $1", op.job)


def _records(d: TaskDecided) -> list[Credit | Charge]:
    return [*d.credits, *((d.charge,) if d.charge is not None else ())]


async def _new_verdicts(c: asyncpg.Connection, decided: Sequence[TaskDecided]) -> list[TaskDecided]:
    """The verdicts not applied before (see `sqlite_store._new_verdicts`). FOR UPDATE: a second
    writer deciding the same task waits, then finds it no longer open."""
    tasks = list(dict.fromkeys(d.task for d in decided))
    still_open = {r[0] for r in await c.fetch(
        "SELECT id FROM tasks WHERE state = 'open' AND id = ANY($1::text[]) FOR UPDATE", tasks)}
    first: dict[str, TaskDecided] = {}
    for d in decided:
        if d.task in still_open:
            first.setdefault(d.task, d)
    if not first or await c.fetchval(
            "SELECT 1 FROM ledger_entries WHERE kind IN ('clawback', 'refund') LIMIT 1") is None:
        return list(first.values())
    reopened = {r[0] for r in await c.fetch(
        "SELECT DISTINCT task FROM ledger_entries WHERE kind IN ('clawback', 'refund') AND task = ANY($1::text[])",
        list(first))}
    out: list[TaskDecided] = []
    for d in first.values():
        if d.task in reopened:
            keys = [r.unique_key for r in _records(d)]
            taken = await ledger_pg.existing_keys(c, keys)
            if taken:
                if len(taken) == len(set(keys)):
                    continue  # the old verdict, replayed onto the reopened task
                raise StoreError(reused_keys(d))
        out.append(d)
    return out


async def _apply_grouped(c: asyncpg.Connection, ops: Sequence[Op]) -> None:
    """One statement per kind of op, in dependency order (see `sqlite_store._apply_grouped`)."""
    issued: list[tuple[str, str, str, str, str, float, float]] = []
    closed: dict[str, str] = {}  # lease -> how it closed: the first close in the batch stands
    recorded: list[tuple[str, str, str, str, str, str | None, float]] = []
    blobs: dict[str, bytes] = {}
    decided: list[TaskDecided] = []
    finished: dict[str, tuple[str, str | None, float]] = {}  # job -> the last finish in the batch
    for op in ops:
        if isinstance(op, LeaseIssued):
            ls = op.lease
            issued.append((ls.id, ls.task, ls.job, ls.node, ls.owner, ls.issued_at, ls.expires_at))
        elif isinstance(op, LeaseClosed):
            closed.setdefault(op.lease, op.state)
        elif isinstance(op, ResultRecorded):
            recorded.append((op.lease, op.task, op.node, op.owner, op.output_digest, op.problem, op.received_at))
        elif isinstance(op, BlobPut):
            blobs.setdefault(op.digest, op.data)
        elif isinstance(op, TaskDecided):
            decided.append(keyed(op))
        elif isinstance(op, JobFinished):
            finished[op.job] = (str(op.state), op.error, op.finished_at)
    if issued:
        await c.execute(
            "INSERT INTO leases SELECT *, 'live' FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
            "$5::text[], $6::float8[], $7::float8[]) ON CONFLICT (id) DO NOTHING", *columns(issued, 7))
    if closed:
        await c.execute("UPDATE leases l SET state = u.state FROM unnest($1::text[], $2::text[]) AS u(id, state) "
                        "WHERE l.id = u.id AND l.state = 'live'", list(closed), list(closed.values()))
    if recorded:
        # ORDER BY keeps arrival order in seq, which restore replays votes in
        await c.execute(
            "INSERT INTO results (lease, task, node, owner, output_digest, problem, received_at) "
            "SELECT lease, task, node, owner, output_digest, problem, received_at FROM unnest($1::text[], "
            "$2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::float8[]) WITH ORDINALITY "
            "AS u(lease, task, node, owner, output_digest, problem, received_at, n) ORDER BY n "
            "ON CONFLICT (lease) DO NOTHING", *columns(recorded, 7))
    if blobs:
        await c.execute("INSERT INTO blobs SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING",
                        list(blobs), list(blobs.values()))
    outputs = [(d.canonical_digest, d.task) for d in decided if d.canonical_digest is not None]
    if outputs:
        await c.execute("INSERT INTO blob_refs SELECT u.digest, t.job FROM unnest($1::text[], $2::text[]) "
                        "AS u(digest, task) JOIN tasks t ON t.id = u.task ON CONFLICT DO NOTHING",
                        *columns(outputs, 2))
    if decided:
        decided = await _new_verdicts(c, decided)
    if decided:
        accepted = [lease for d in decided for lease in d.accepted_leases]
        if accepted:
            await c.execute("UPDATE results SET accepted = TRUE WHERE lease = ANY($1::text[])", accepted)
        await ledger_pg.insert_entries(c, [entry for d in decided for entry in _records(d)])
        failpoints.hit("ledger.after_insert")
        # verdict_seq: the ledger size once these entries are in, folded into the one UPDATE as a
        # subquery evaluated once (an uncorrelated InitPlan: one probe at the end of the primary
        # key). Read after insert_entries took the ledger_head lock, which it holds until commit:
        # no other writer's entries can land between (see sqlite_store._apply_grouped for why a
        # later segment of the same transaction adding more does not matter).
        await c.execute(
            "UPDATE tasks t SET state = u.state, canonical_digest = u.digest, error = u.error, "
            "verdict_seq = (SELECT COALESCE(MAX(seq), 0) FROM ledger_entries) "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(id, state, digest, error) "
            "WHERE t.id = u.id",
            [d.task for d in decided], [str(d.state) for d in decided], [d.canonical_digest for d in decided],
            [d.error for d in decided])
    if finished:
        await c.execute(
            "UPDATE jobs j SET state = u.state, error = u.error, finished_at = u.at "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[]) AS u(id, state, error, at) "
            "WHERE j.id = u.id",
            list(finished), *columns(list(finished.values()), 3))


def columns(rows: Sequence[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows as `width` column lists: what `unnest($1::type[], ...)` takes."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


# Leases and results matter only for the open tasks of running jobs, less those from before a reopen.
_OPEN_TASKS = "SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job WHERE t.state = 'open' AND j.state = 'running'"
_CURRENT = "NOT IN (SELECT lease FROM superseded_leases)"


LOAD_TIMEOUT = 600.0  # seconds: a restart reads every task of every job kept, millions on a busy coordinator


async def load_rows(c: asyncpg.Connection) -> StoredRows:
    """Call inside a REPEATABLE READ transaction: four statements, one snapshot."""
    jobs = [JobRow(spec=spec_from_json(r[0]), state=r[1], error=r[2], finished_at=r[3]) for r in await c.fetch(
        "SELECT spec, state, error, finished_at FROM jobs WHERE expired_at IS NULL ORDER BY created_at, ord",
        timeout=LOAD_TIMEOUT)]
    tasks = [TaskRow(*r) for r in await c.fetch(
        "SELECT id, job, idx, start, stop, input_digest, input_bytes, state, error FROM tasks "
        "WHERE job IN (SELECT id FROM jobs WHERE expired_at IS NULL)", timeout=LOAD_TIMEOUT)]
    leases = [LeaseRow(*r) for r in await c.fetch(
        "SELECT id, task, job, node, owner, issued_at, expires_at, state FROM leases "
        f"WHERE task IN ({_OPEN_TASKS}) AND id {_CURRENT}", timeout=LOAD_TIMEOUT)]
    results = [ResultRow(*r) for r in await c.fetch(
        "SELECT lease, task, node, owner, output_digest, problem FROM results "
        f"WHERE task IN ({_OPEN_TASKS}) AND lease {_CURRENT} ORDER BY seq", timeout=LOAD_TIMEOUT)]
    return StoredRows(jobs=jobs, tasks=tasks, leases=leases, results=results)


async def expire(c: asyncpg.Connection, jobs: Sequence[str], at: float, reason: str) -> Freed:
    """One transaction's expiry (see `sqlite_store._expire`)."""
    going = [r[0] for r in await c.fetch(
        "SELECT id FROM jobs WHERE id = ANY($1::text[]) AND state <> 'running' AND expired_at IS NULL "
        "ORDER BY id FOR UPDATE", list(jobs))]
    if not going:
        return Freed()
    await c.execute("UPDATE jobs SET expired_at = $2, expiry = $3 WHERE id = ANY($1::text[])", going, at, reason)
    tasks = "SELECT id FROM tasks WHERE job = ANY($1::text[])"
    leases = count(await c.execute(f"DELETE FROM leases WHERE task IN ({tasks})", going))
    await c.execute(f"DELETE FROM superseded_leases WHERE task IN ({tasks})", going)
    # what the jobs referenced: inputs, accepted outputs (and those of verdicts undone by a reopen,
    # among their results' outputs), uploads
    refs = await c.fetch(
        "SELECT input_digest, job FROM tasks WHERE job = ANY($1::text[]) "
        "UNION SELECT canonical_digest, job FROM tasks WHERE job = ANY($1::text[]) AND canonical_digest IS NOT NULL "
        "UNION SELECT r.output_digest, t.job FROM results r JOIN tasks t ON t.id = r.task "
        "WHERE t.job = ANY($1::text[]) "
        "UNION SELECT digest, job FROM uploads WHERE job = ANY($1::text[])", going)
    await c.execute("DELETE FROM uploads WHERE job = ANY($1::text[])", going)
    await c.execute("DELETE FROM blob_refs b USING unnest($1::text[], $2::text[]) AS u(digest, job) "
                    "WHERE b.digest = u.digest AND b.job = u.job", [r[0] for r in refs], [r[1] for r in refs])
    digests = sorted({str(r[0]) for r in refs})
    blobs, size = await c.fetchrow(
        "WITH gone AS (DELETE FROM blobs b WHERE b.digest = ANY($1::text[]) "
        "AND NOT EXISTS (SELECT 1 FROM blob_refs r WHERE r.digest = b.digest) RETURNING length(b.data) AS n) "
        "SELECT count(*), COALESCE(sum(n), 0) FROM gone", digests)
    return Freed(jobs=len(going), blobs=int(blobs), bytes=int(size), leases=leases)
