"""SQLite implementation of `CoordinatorStore`: one connection in WAL mode, used from one thread.

A commit per message caps SQLite at a few thousand rows/s; the engine's ops arrive in batches
and each batch is one transaction (DESIGN.md §6), so verdicts and credits commit together.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ledger import sqlite as ledger_sql
from ledger.checkpoint import Checkpoint
from ledger.entries import Balances, Charge, Credit, Entry, Grant, reversal_of
from ledger.rows import COLUMNS, NO_LIMIT, clamp, entry_from_row, upto_or_all

from . import failpoints
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
from .store import (
    CoordinatorStore,
    Expiry,
    Freed,
    StorageFull,
    StoreError,
    keyed,
    reused_keys,
    spec_from_json,
    spec_to_json,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (digest TEXT PRIMARY KEY, data BLOB NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (digest TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
    created_at REAL NOT NULL, finished_at REAL, expired_at REAL, expiry TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, job TEXT NOT NULL REFERENCES jobs(id), idx INTEGER NOT NULL,
    start INTEGER NOT NULL, stop INTEGER NOT NULL, input_digest TEXT NOT NULL, input_bytes INTEGER NOT NULL,
    state TEXT NOT NULL, canonical_digest TEXT, error TEXT, UNIQUE (job, idx));
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, job TEXT NOT NULL, node TEXT NOT NULL, owner TEXT NOT NULL,
    issued_at REAL NOT NULL, expires_at REAL NOT NULL, state TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS leases_task ON leases(task);
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, lease TEXT NOT NULL UNIQUE, task TEXT NOT NULL,
    node TEXT NOT NULL, owner TEXT NOT NULL, output_digest TEXT NOT NULL, problem TEXT,
    received_at REAL NOT NULL, accepted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS results_task ON results(task);
CREATE INDEX IF NOT EXISTS results_accepted ON results(accepted, seq);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, public_key BLOB NOT NULL, created_at REAL NOT NULL,
    blocked INTEGER NOT NULL, operator INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY, public_key BLOB NOT NULL, owner TEXT NOT NULL, owner_id TEXT NOT NULL,
    expires_at REAL NOT NULL, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS invites (token_sha256 TEXT PRIMARY KEY, created_at REAL NOT NULL, used_by TEXT);
CREATE TABLE IF NOT EXISTS trust (kind TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (kind, name));
CREATE TABLE IF NOT EXISTS superseded_leases (lease TEXT PRIMARY KEY, task TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uploads (lease TEXT PRIMARY KEY, job TEXT NOT NULL, digest TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS uploads_job ON uploads(job);
"""
# Which jobs reference which blobs (inputs, accepted outputs, uploads), for the jobs not expired:
# a blob goes when its last row here does. A table kept as small as the retained jobs, rather than
# indexes on the digest columns of tasks and results, which would grow with every job ever run.
# One b-tree, by digest: a verdict adds a row, and an expiring job's rows are found from its tasks
# and uploads, so an index by job would only slow every verdict down.
REFS_SCHEMA = """
CREATE TABLE blob_refs (digest TEXT NOT NULL, job TEXT NOT NULL, PRIMARY KEY (digest, job)) WITHOUT ROWID;
INSERT OR IGNORE INTO blob_refs SELECT input_digest, job FROM tasks;
INSERT OR IGNORE INTO blob_refs SELECT canonical_digest, job FROM tasks WHERE canonical_digest IS NOT NULL;
INSERT OR IGNORE INTO blob_refs SELECT r.output_digest, t.job FROM results r JOIN tasks t ON t.id = r.task
    WHERE r.output_digest IN (SELECT digest FROM blobs);
"""
# Finished jobs not expired yet, by when they finished: what each retention sweep looks at,
# without reading the jobs that expired before.
EXPIRY_INDEX = ("CREATE INDEX IF NOT EXISTS jobs_to_expire ON jobs(finished_at) "
                "WHERE expired_at IS NULL AND finished_at IS NOT NULL")
EXPIRE_CHUNK = 500  # SQLite caps bound parameters; expire_jobs takes any number
# superseded_leases: the leases (and so the results) of a task from before it was reopened. They
# stay as history but are not loaded on restart, so a reopened task restores as an ordinary open
# task rather than with the votes of the verdict that was undone. A table of its own rather than a
# column, so that databases of earlier versions need no migration.


class SQLiteStore(CoordinatorStore):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # A new database gives pages freed by expiries back to the file (`compact`); this can only
        # be chosen before its first table. An older one reuses freed pages for new rows instead.
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last batches but never corrupts; a killed
        # process loses nothing that was committed.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        _migrate(conn)
        ledger_sql.create_schema(conn)
        self._conn = conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        assert conn is not None, "store is closed"
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, conn)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            raise StorageFull(f"storage full: {exc} ({self.path}); free some space there and the "
                              "coordinator carries on where it stopped") from exc

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (SQLITE_FULL) leaves the transaction open: without this
                # rollback every later BEGIN would fail, and the store would never recover.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return out

        return await self._run(run)

    # ---- models and blobs -------------------------------------------------------------------
    async def put_model(self, digest: str, data: bytes, meta: dict[str, Any]) -> bool:
        def run(c: sqlite3.Connection) -> bool:
            cur = c.execute("INSERT OR IGNORE INTO models VALUES (?, ?, ?)", (digest, data, json.dumps(meta)))
            return cur.rowcount == 1

        return await self._tx(run)

    async def get_model(self, digest: str) -> bytes | None:
        row = await self._run(lambda c: c.execute("SELECT data FROM models WHERE digest=?", (digest,)).fetchone())
        return None if row is None else bytes(row[0])

    async def model_meta(self, digest: str) -> dict[str, Any] | None:
        row = await self._run(lambda c: c.execute("SELECT meta FROM models WHERE digest=?", (digest,)).fetchone())
        return None if row is None else dict(json.loads(row[0]))

    async def put_blob(self, digest: str, data: bytes) -> None:
        await self._tx(lambda c: c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (digest, data)))

    async def get_blob(self, digest: str) -> bytes | None:
        row = await self._run(lambda c: c.execute("SELECT data FROM blobs WHERE digest=?", (digest,)).fetchone())
        return None if row is None else bytes(row[0])

    async def put_upload(self, lease: str, job: str, digest: str, data: bytes) -> str:
        def run(c: sqlite3.Connection) -> str:
            earlier = c.execute("SELECT digest FROM uploads WHERE lease=?", (lease,)).fetchone()
            if earlier is not None:
                return str(earlier[0])
            c.execute("INSERT INTO uploads VALUES (?, ?, ?)", (lease, job, digest))
            c.execute("INSERT OR IGNORE INTO blobs VALUES (?, ?)", (digest, data))
            c.execute("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)", (digest, job))
            return digest

        return await self._tx(run)

    # ---- jobs and engine ops ----------------------------------------------------------------
    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        s = job.spec

        def run(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", blobs.items())
            c.executemany("INSERT OR IGNORE INTO blob_refs VALUES (?, ?)", [(d, s.id) for d in blobs])
            c.execute("INSERT INTO jobs (id, spec, state, error, created_at) VALUES (?, ?, ?, NULL, ?)",
                      (s.id, spec_to_json(s), str(job.state), s.created_at))
            c.executemany(
                "INSERT INTO tasks (id, job, idx, start, stop, input_digest, input_bytes, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(t.id, t.job, t.index, t.start, t.stop, t.input_digest, t.input_bytes, str(t.state))
                 for t in tasks])

        await self._tx(run)

    async def apply(self, ops: Sequence[Op]) -> None:
        if ops:
            await self._tx(lambda c: _apply(c, ops))

    async def load_rows(self) -> StoredRows:
        return await self._run(_load_rows)

    async def finished_before(self, cutoff: float, limit: int) -> list[str]:
        rows = await self._run(lambda c: c.execute(
            "SELECT id FROM jobs WHERE expired_at IS NULL AND finished_at IS NOT NULL AND finished_at <= ? "
            "AND state != 'running' ORDER BY finished_at LIMIT ?", (cutoff, limit)).fetchall())
        return [str(r[0]) for r in rows]

    async def expire_jobs(self, jobs: Sequence[str], *, at: float, reason: str) -> Freed:
        freed = Freed()
        ids = list(dict.fromkeys(jobs))
        for i in range(0, len(ids), EXPIRE_CHUNK):
            chunk = ids[i:i + EXPIRE_CHUNK]

            def run(c: sqlite3.Connection, chunk: list[str] = chunk) -> Freed:
                return _expire(c, chunk, at, reason)

            freed += await self._tx(run)
        return freed

    async def expiry(self, job: str) -> Expiry | None:
        row = await self._run(lambda c: c.execute(
            "SELECT spec, state, error, finished_at, expired_at, expiry FROM jobs "
            "WHERE id=? AND expired_at IS NOT NULL", (job,)).fetchone())
        if row is None:
            return None
        spec, state, error, finished_at, expired_at, reason = row
        return Expiry(job=JobRow(spec=spec_from_json(spec), state=state, error=error, finished_at=finished_at),
                      at=float(expired_at), reason=str(reason))

    async def compact(self) -> None:
        def run(c: sqlite3.Connection) -> None:
            if c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # INCREMENTAL
                # executescript steps the pragma to its end; `execute` frees a single page
                c.executescript("PRAGMA incremental_vacuum;")
            # The file shrinks when the WAL is written back; a passive checkpoint waits for nobody.
            c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        await self._run(run)

    async def canonical_digests(self, job: str) -> list[str | None]:
        rows = await self._run(lambda c: c.execute(
            "SELECT canonical_digest FROM tasks WHERE job=? ORDER BY idx", (job,)).fetchall())
        return [r[0] for r in rows]

    # ---- ledger reads -----------------------------------------------------------------------
    async def ledger_balances(self, upto: int | None = None) -> Balances:
        return await self._run(lambda c: ledger_sql.read_balances(c, upto))

    async def ledger_entries(self, after: int, limit: int, upto: int | None = None) -> list[Entry]:
        return await self._run(lambda c: ledger_sql.read_entries(c, after, limit, upto))

    async def ledger_job(self, job: str) -> list[Entry]:
        # Through the job's tasks (the (job, idx) index) and the ledger's exactly-once key, whose
        # first columns are (kind, task): a few probes per task rather than a scan of the log or
        # an index by job that every insert would pay for. A grant has no task and no job.
        rows = await self._run(lambda c: c.execute(
            f"SELECT {COLUMNS} FROM ledger_entries WHERE kind IN ('credit', 'charge', 'clawback', 'refund') "
            "AND task IN (SELECT id FROM tasks WHERE job = ?) AND job = ? ORDER BY seq", (job, job)).fetchall())
        return [entry_from_row(r) for r in rows]

    async def save_checkpoint(self, cp: Checkpoint) -> None:
        await self._tx(lambda c: ledger_sql.save_checkpoint(c, cp))

    async def latest_checkpoint(self) -> Checkpoint | None:
        return await self._run(ledger_sql.read_latest_checkpoint)

    async def checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        return await self._run(lambda c: ledger_sql.read_checkpoints(c, after_size, limit))

    async def ledger_history(self, node: str) -> list[Entry]:
        return await self._run(lambda c: ledger_sql.read_history(c, node))

    async def grant(self, account: str, amount: int, *, key: str, memo: str, created_at: float) -> bool:
        grant = Grant(account=account, amount=amount, key=key, memo=memo, created_at=created_at)
        return await self._tx(lambda c: ledger_sql.insert_entries(c, [grant])) == 1

    async def account_balance(self, name: str) -> int:
        return await self._run(lambda c: ledger_sql.read_account_balance(c, name))

    async def account_history(self, name: str) -> list[Entry]:
        return await self._run(lambda c: ledger_sql.read_account_history(c, name))

    async def accepted(self, after: int, limit: int, upto: int | None = None) -> list[dict[str, Any]]:
        rows = await self._run(lambda c: c.execute(
            "SELECT r.seq, r.task, t.job, r.node, r.owner, r.output_digest, t.state, "
            "COALESCE(json_extract(j.spec, '$.submitter'), ''), t.verdict_seq, t.stop - t.start, "
            "json_extract(j.spec, '$.flops_per_row') FROM results r "
            "JOIN tasks t ON t.id = r.task JOIN jobs j ON j.id = t.job "
            "WHERE r.accepted = 1 AND r.seq > ? AND t.verdict_seq <= ? ORDER BY r.seq LIMIT ?",
            (clamp(after), upto_or_all(upto), min(limit, NO_LIMIT))).fetchall())
        keys = ("seq", "task", "job", "node", "owner", "output_digest", "task_state", "submitter", "verdict_seq",
                "rows", "flops_per_row")  # the cost model's inputs: a verifier recomputes each credit's amount
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def save_accounts(self, *, accounts: Sequence[Account] = (), nodes: Sequence[NodeRecord] = (),
                            invites: Sequence[Invite] = ()) -> None:
        def run(c: sqlite3.Connection) -> None:
            c.executemany("INSERT OR REPLACE INTO accounts VALUES (?, ?, ?, ?, ?, ?)",
                          [(a.id, a.name, a.public_key, a.created_at, int(a.blocked), int(a.operator))
                           for a in accounts])
            c.executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)",
                          [(n.node, n.public_key, n.owner, n.owner_id, n.expires_at, n.registered_at) for n in nodes])
            c.executemany("INSERT OR REPLACE INTO invites VALUES (?, ?, ?)",
                          [(i.token_sha256, i.created_at, i.used_by) for i in invites])

        await self._tx(run)

    async def save_trust(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        if rows:
            await self._tx(lambda c: c.executemany("INSERT OR REPLACE INTO trust VALUES (?, ?, ?)",
                                                   [(k, n, json.dumps(r)) for k, n, r in rows]))

    async def load_trust(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = await self._run(lambda c: c.execute("SELECT kind, name, record FROM trust").fetchall())
        return [(str(k), str(n), dict(json.loads(r))) for k, n, r in rows]

    async def load_accounts(self) -> tuple[list[Account], list[NodeRecord], list[Invite]]:
        def run(c: sqlite3.Connection) -> tuple[list[Account], list[NodeRecord], list[Invite]]:
            accounts = [Account(id=i, name=n, public_key=bytes(pk), created_at=t, blocked=bool(b), operator=bool(o))
                        for i, n, pk, t, b, o in c.execute("SELECT * FROM accounts")]
            nodes = [NodeRecord(node=n, public_key=bytes(pk), owner=o, owner_id=oi, expires_at=e, registered_at=r)
                     for n, pk, o, oi, e, r in c.execute("SELECT * FROM nodes")]
            invites = [Invite(token_sha256=h, created_at=t, used_by=u)
                       for h, t, u in c.execute("SELECT * FROM invites")]
            return accounts, nodes, invites

        return await self._run(run)

    async def close(self) -> None:
        def run() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._pool, run)
        self._pool.shutdown(wait=True)


def _apply(c: sqlite3.Connection, ops: Sequence[Op]) -> None:
    """Ops in order, grouped between reopens: a reopen must see everything before it (the verdict
    it undoes, the job's finish) and nothing after it (a new verdict for the reopened task)."""
    segment: list[Op] = []
    for op in ops:
        if isinstance(op, TaskReopened):
            _apply_grouped(c, segment)
            segment = []
            _reopen(c, op)
        else:
            segment.append(op)
    _apply_grouped(c, segment)


def _reopen(c: sqlite3.Connection, op: TaskReopened) -> None:
    """Once: a task no longer verified (reopened already, or failed) is left alone, and so is one
    verified again since whose reversal is already in the ledger (a replayed reopen)."""
    row = c.execute("SELECT state FROM tasks WHERE id=?", (op.task,)).fetchone()
    if row is None or row[0] != "verified":
        return
    records = reversal_of(op.credits, op.charge, bad_lease=op.bad_lease, reason=op.reason, created_at=op.at)
    if records and ledger_sql.insert_entries(c, records) == 0:
        return
    # After the reversal's entries: the size now is this transaction's as far as any reader can tell
    # (see _apply_grouped).
    c.execute("UPDATE tasks SET state='open', canonical_digest=NULL, error=NULL, "
              "verdict_seq=(SELECT COALESCE(MAX(seq), 0) FROM ledger_entries) WHERE id=?", (op.task,))
    c.execute("UPDATE results SET accepted=0 WHERE task=? AND accepted=1", (op.task,))
    c.execute("INSERT OR IGNORE INTO superseded_leases (lease, task) "
              "SELECT id, task FROM leases WHERE task=? AND state != 'live'", (op.task,))
    c.execute("INSERT OR IGNORE INTO superseded_leases (lease, task) SELECT lease, task FROM results WHERE task=?",
              (op.task,))
    if op.job_reopened:
        c.execute("UPDATE jobs SET state='running', error=NULL, finished_at=NULL WHERE id=?", (op.job,))


def _new_verdicts(c: sqlite3.Connection, decided: Sequence[TaskDecided]) -> list[TaskDecided]:
    """The verdicts not applied before: the first per task of those for open tasks, less any whose
    ledger entries are already there. An open task has entries only if it was reopened, so the
    second check looks up keys for tasks with a clawback or refund alone, and not at all on a
    ledger without any (one index probe)."""
    still_open: set[str] = set()
    tasks = list(dict.fromkeys(d.task for d in decided))
    for i in range(0, len(tasks), 5000):  # SQLite caps the number of bound parameters
        chunk = tasks[i:i + 5000]
        still_open.update(row[0] for row in c.execute(
            f"SELECT id FROM tasks WHERE state='open' AND id IN ({','.join('?' * len(chunk))})", chunk))
    first: dict[str, TaskDecided] = {}
    for d in decided:
        if d.task in still_open:
            first.setdefault(d.task, d)  # a second verdict in one batch repeats the first
    if not first or c.execute("SELECT 1 FROM ledger_entries WHERE kind IN ('clawback', 'refund') LIMIT 1"
                              ).fetchone() is None:
        return list(first.values())
    reopened: set[str] = set()
    open_tasks = list(first)
    for i in range(0, len(open_tasks), 5000):
        chunk = open_tasks[i:i + 5000]
        reopened.update(row[0] for row in c.execute(
            "SELECT DISTINCT task FROM ledger_entries WHERE kind IN ('clawback', 'refund') "
            f"AND task IN ({','.join('?' * len(chunk))})", chunk))
    out: list[TaskDecided] = []
    for d in first.values():
        taken = [ledger_sql.has_entry(c, r.unique_key) for r in _records(d)] if d.task in reopened else []
        if any(taken):
            if all(taken):
                continue  # the old verdict, replayed onto the reopened task
            raise StoreError(reused_keys(d))
        out.append(d)
    return out


def _records(d: TaskDecided) -> list[Credit | Charge]:
    return [*d.credits, *((d.charge,) if d.charge is not None else ())]


def _apply_grouped(c: sqlite3.Connection, ops: Sequence[Op]) -> None:
    """One `executemany` per kind of op instead of a statement per op: a task costs about ten
    rows, and per-statement Python overhead in this thread competes with the event loop for the
    GIL. Within one transaction, kinds are applied in dependency order (a lease exists before it
    closes, results before the verdict that accepts them), which is all the engine's order means."""
    issued, closed, recorded, blobs, decided, finished = [], [], [], [], [], []
    for op in ops:
        if isinstance(op, LeaseIssued):
            ls = op.lease
            issued.append((ls.id, ls.task, ls.job, ls.node, ls.owner, ls.issued_at, ls.expires_at))
        elif isinstance(op, LeaseClosed):
            closed.append((op.state, op.lease))
        elif isinstance(op, ResultRecorded):
            recorded.append((op.lease, op.task, op.node, op.owner, op.output_digest, op.problem, op.received_at))
        elif isinstance(op, BlobPut):
            blobs.append((op.digest, op.data))
        elif isinstance(op, TaskDecided):
            decided.append(keyed(op))
        elif isinstance(op, JobFinished):
            finished.append((str(op.state), op.error, op.finished_at, op.job))
    c.executemany("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, ?, ?, ?, ?, 'live')", issued)
    c.executemany("UPDATE leases SET state=? WHERE id=? AND state='live'", closed)
    c.executemany("INSERT OR IGNORE INTO results (lease, task, node, owner, output_digest, problem, received_at) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)", recorded)
    c.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", blobs)
    # Every verdict's accepted outputs are its job's, a replayed one's too: its blob was just written.
    c.executemany("INSERT OR IGNORE INTO blob_refs SELECT ?, job FROM tasks WHERE id=?",
                  [(d.canonical_digest, d.task) for d in decided if d.canonical_digest is not None])
    if decided:
        # A task is decided once: a verdict for a task no longer open (a repeated batch) is
        # dropped whole, and the ledger's keys (credit per (task, node, lease), charge per verdict)
        # back that up. A reopened task is open again and takes its new verdict.
        decided = _new_verdicts(c, decided)
        c.executemany("UPDATE results SET accepted=1 WHERE lease=?",
                      [(lease,) for d in decided for lease in d.accepted_leases])
        ledger_sql.insert_entries(c, [entry for d in decided for entry in _records(d)])
        failpoints.hit("ledger.after_insert")
        # verdict_seq: the ledger size once this batch's entries are in, read once (one probe at
        # the end of the rowid tree) rather than per task. A later segment of the same transaction
        # (after a reopen) may add more, but no reader sees a size between: commits are atomic, so
        # every committed size is below all of this transaction's entries or at least its last.
        size = ledger_sql.read_size(c)
        c.executemany("UPDATE tasks SET state=?, canonical_digest=?, error=?, verdict_seq=? WHERE id=?",
                      [(str(d.state), d.canonical_digest, d.error, size, d.task) for d in decided])
    c.executemany("UPDATE jobs SET state=?, error=?, finished_at=? WHERE id=?", finished)


# Leases and results matter only for the open tasks of running jobs: the rest is history, and so
# are those of a reopened task from before it reopened.
_OPEN_TASKS = "SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job WHERE t.state = 'open' AND j.state = 'running'"
_CURRENT = "NOT IN (SELECT lease FROM superseded_leases)"


def _load_rows(c: sqlite3.Connection) -> StoredRows:
    jobs = [JobRow(spec=spec_from_json(spec), state=state, error=error, finished_at=finished_at)
            for spec, state, error, finished_at in c.execute(
                "SELECT spec, state, error, finished_at FROM jobs WHERE expired_at IS NULL ORDER BY created_at, rowid")]
    tasks = [TaskRow(*row) for row in c.execute(
        "SELECT id, job, idx, start, stop, input_digest, input_bytes, state, error FROM tasks "
        "WHERE job IN (SELECT id FROM jobs WHERE expired_at IS NULL)")]
    leases = [LeaseRow(*row) for row in c.execute(
        "SELECT id, task, job, node, owner, issued_at, expires_at, state FROM leases "
        f"WHERE task IN ({_OPEN_TASKS}) AND id {_CURRENT}")]
    results = [ResultRow(*row) for row in c.execute(
        "SELECT lease, task, node, owner, output_digest, problem FROM results "
        f"WHERE task IN ({_OPEN_TASKS}) AND lease {_CURRENT} ORDER BY seq")]
    return StoredRows(jobs=jobs, tasks=tasks, leases=leases, results=results)


def _migrate(c: sqlite3.Connection) -> None:
    """Bring a database of an earlier version up to this schema: the expiry columns of jobs, the
    verdict_seq of tasks (0 for tasks verified before it: inside every snapshot), and blob
    references built from what its jobs hold. A new database gets its columns here too, so both
    have one column order."""
    columns = {row[1] for row in c.execute("PRAGMA table_info(jobs)")}
    for column, kind in (("expired_at", "REAL"), ("expiry", "TEXT")):
        if column not in columns:
            c.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
    if "verdict_seq" not in {row[1] for row in c.execute("PRAGMA table_info(tasks)")}:
        c.execute("ALTER TABLE tasks ADD COLUMN verdict_seq INTEGER NOT NULL DEFAULT 0")
    c.execute(EXPIRY_INDEX)
    if c.execute("SELECT 1 FROM sqlite_master WHERE name='blob_refs'").fetchone() is None:
        c.executescript(f"BEGIN; {REFS_SCHEMA} COMMIT;")


def _expire(c: sqlite3.Connection, jobs: Sequence[str], at: float, reason: str) -> Freed:
    marks = ",".join("?" * len(jobs))
    going = [str(r[0]) for r in c.execute(
        f"SELECT id FROM jobs WHERE id IN ({marks}) AND state != 'running' AND expired_at IS NULL", jobs)]
    if not going:
        return Freed()
    marks = ",".join("?" * len(going))
    c.execute(f"UPDATE jobs SET expired_at=?, expiry=? WHERE id IN ({marks})", (at, reason, *going))
    tasks = f"SELECT id FROM tasks WHERE job IN ({marks})"
    leases = c.execute(f"DELETE FROM leases WHERE task IN ({tasks})", going).rowcount
    c.execute(f"DELETE FROM superseded_leases WHERE task IN ({tasks})", going)
    # what the jobs referenced: their inputs, accepted outputs (those of a verdict undone by a
    # reopen among their results' outputs), and uploads
    refs = set(c.execute(
        f"SELECT input_digest, job FROM tasks WHERE job IN ({marks}) "
        f"UNION SELECT canonical_digest, job FROM tasks WHERE job IN ({marks}) AND canonical_digest IS NOT NULL "
        f"UNION SELECT r.output_digest, t.job FROM results r JOIN tasks t ON t.id = r.task WHERE t.job IN ({marks}) "
        f"UNION SELECT digest, job FROM uploads WHERE job IN ({marks})", (*going, *going, *going, *going)))
    c.execute(f"DELETE FROM uploads WHERE job IN ({marks})", going)
    c.executemany("DELETE FROM blob_refs WHERE digest=? AND job=?", refs)
    digests = sorted({str(d) for d, _ in refs})
    blobs = size = 0
    for i in range(0, len(digests), EXPIRE_CHUNK):
        chunk = digests[i:i + EXPIRE_CHUNK]
        dmarks = ",".join("?" * len(chunk))
        # unreferenced now: no job that has not expired holds it
        orphan = f"digest IN ({dmarks}) AND digest NOT IN (SELECT digest FROM blob_refs WHERE digest IN ({dmarks}))"
        n, b = c.execute(f"SELECT count(*), COALESCE(sum(length(data)), 0) FROM blobs WHERE {orphan}",
                         (*chunk, *chunk)).fetchone()
        c.execute(f"DELETE FROM blobs WHERE {orphan}", (*chunk, *chunk))
        blobs, size = blobs + int(n), size + int(b)
    return Freed(jobs=len(going), blobs=blobs, bytes=size, leases=leases)
