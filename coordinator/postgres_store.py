"""PostgreSQL implementation of `CoordinatorStore`, on a small asyncpg pool.

The same contract as `sqlite_store.SQLiteStore` (tests/contract runs both): each `apply` batch is one
transaction, its ledger entries written by `ledger.postgres.insert_entries` inside it. asyncpg speaks
the protocol on the event loop itself (no thread), and caches each statement's prepared form per
connection.

The pool is made, and the schema migrated, on first use: `open_store` stays synchronous, and a
coordinator started while PostgreSQL is down fails its first call with a clear `StoreError` rather
than hanging. Every call is bounded in time; when the server goes away, calls raise
`StoreError("database unavailable: ...")`, and once it is back the pool connects afresh.

Writes run one at a time in this process (`_write`), as SQLite's single writer thread does:
`expire_jobs` deleting a blob no job references any more must not interleave with `create_job`
adding a reference to the same blob. Reads go concurrently on the other connections.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from ledger import postgres as ledger_pg
from ledger.checkpoint import Checkpoint
from ledger.entries import Balances, Entry, Grant
from ledger.rows import COLUMNS, NO_LIMIT, clamp, entry_from_row, upto_or_all

from . import postgres_ops as ops_sql
from .accounts import Account, Invite, NodeRecord
from .postgres_schema import migrate
from .records import JobRecord, Op, TaskRecord
from .restore import JobRow, StoredRows
from .store import CoordinatorStore, Expiry, Freed, StorageFull, StoreError, spec_from_json, spec_to_json

POOL_SIZE = 4  # the persist loop, HTTP reads, uploads; PostgreSQL pays a process per connection
CONNECT_TIMEOUT = 5.0  # seconds to open a connection (an unreachable host would take minutes)
COMMAND_TIMEOUT = 30.0  # seconds for one statement: a batch of a few thousand ops takes well under one


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What the pool does to a connection given back, after asyncpg has rolled back any open
    transaction (it does that whatever this does). Its default also sends `pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`: a round trip per release, most of the statements this store
    sends outside a batch, for session state it never makes (its locks are transaction-scoped; no
    cursors, listeners or SETs). So: nothing."""


class PostgresStore(CoordinatorStore):
    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT) -> None:
        self._url = url
        self.location = ledger_pg.redact(url)  # never the password, in logs or errors
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._migrated = False
        self._init_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._closed = False

    # ---- connections ------------------------------------------------------------------------
    async def _ready(self) -> asyncpg.Pool:
        if self._closed:
            raise StoreError(f"the store at {self.location} is closed")
        if self._pool is not None and self._migrated:
            return self._pool
        async with self._init_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._url, min_size=0, max_size=self._pool_size, timeout=self._connect_timeout,
                    command_timeout=self._command_timeout, reset=_keep_session,
                    server_settings={"application_name": "sparecycles-coordinator"})  # in pg_stat_activity
            if not self._migrated:
                async with self._pool.acquire(timeout=self._connect_timeout) as conn:
                    await migrate(conn)
                self._migrated = True
            return self._pool

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            pool = await self._ready()
            async with pool.acquire(timeout=self._connect_timeout) as conn:
                yield conn
        except ledger_pg.UNAVAILABLE as exc:
            raise StoreError(f"database unavailable: {ledger_pg.unavailable(exc)} ({self.location})") from exc
        except asyncpg.DiskFullError as exc:  # SQLSTATE 53100: the server's disk, not ours
            raise StorageFull(f"storage full: the database server could not write ({exc}; {self.location}); "
                              "free space on its disk and the coordinator carries on where it stopped") from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[asyncpg.Connection]:
        """A write transaction: one at a time in this process, committed on a clean exit."""
        async with self._write_lock, self._conn() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """Several reads that must agree with each other."""
        async with self._conn() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            yield conn

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._conn() as conn:
            return await conn.fetchval(sql, *args)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql, *args))

    # ---- models and blobs -------------------------------------------------------------------
    async def put_model(self, digest: str, data: bytes, meta: dict[str, Any]) -> bool:
        async with self._write() as c:
            status = await c.execute("INSERT INTO models VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                                     digest, data, json.dumps(meta))
        return ops_sql.count(status) == 1

    async def get_model(self, digest: str) -> bytes | None:
        data = await self._fetchval("SELECT data FROM models WHERE digest = $1", digest)
        return None if data is None else bytes(data)

    async def model_meta(self, digest: str) -> dict[str, Any] | None:
        meta = await self._fetchval("SELECT meta FROM models WHERE digest = $1", digest)
        return None if meta is None else dict(json.loads(meta))

    async def put_blob(self, digest: str, data: bytes) -> None:
        async with self._write() as c:
            await c.execute("INSERT INTO blobs VALUES ($1, $2) ON CONFLICT DO NOTHING", digest, data)

    async def get_blob(self, digest: str) -> bytes | None:
        data = await self._fetchval("SELECT data FROM blobs WHERE digest = $1", digest)
        return None if data is None else bytes(data)

    async def put_upload(self, lease: str, job: str, digest: str, data: bytes) -> str:
        async with self._write() as c:
            held = await c.fetchval("INSERT INTO uploads VALUES ($1, $2, $3) ON CONFLICT (lease) DO NOTHING "
                                    "RETURNING digest", lease, job, digest)
            if held is None:
                return str(await c.fetchval("SELECT digest FROM uploads WHERE lease = $1", lease))
            await c.execute("INSERT INTO blobs VALUES ($1, $2) ON CONFLICT DO NOTHING", digest, data)
            await c.execute("INSERT INTO blob_refs VALUES ($1, $2) ON CONFLICT DO NOTHING", digest, job)
            return digest

    # ---- jobs and engine ops ----------------------------------------------------------------
    async def create_job(self, job: JobRecord, tasks: Sequence[TaskRecord], blobs: dict[str, bytes]) -> None:
        s = job.spec
        async with self._write() as c:
            await c.execute("INSERT INTO blobs SELECT * FROM unnest($1::text[], $2::bytea[]) ON CONFLICT DO NOTHING",
                            list(blobs), list(blobs.values()))
            await c.execute("INSERT INTO blob_refs SELECT d, $2 FROM unnest($1::text[]) AS d ON CONFLICT DO NOTHING",
                            list(blobs), s.id)
            await c.execute("INSERT INTO jobs (id, spec, state, created_at) VALUES ($1, $2, $3, $4)",
                            s.id, spec_to_json(s), str(job.state), s.created_at)
            await c.execute(
                "INSERT INTO tasks (id, job, idx, start, stop, input_digest, input_bytes, state) SELECT * FROM "
                "unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], "
                "$8::text[])", *ops_sql.columns(
                    [(t.id, t.job, t.index, t.start, t.stop, t.input_digest, t.input_bytes, str(t.state))
                     for t in tasks], 8))

    async def apply(self, ops: Sequence[Op]) -> None:
        if ops:
            async with self._write() as c:
                await ops_sql.apply(c, ops)

    async def load_rows(self) -> StoredRows:
        async with self._snapshot() as c:
            return await ops_sql.load_rows(c)

    async def finished_before(self, cutoff: float, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM jobs WHERE expired_at IS NULL AND finished_at IS NOT NULL AND finished_at <= $1 "
            "AND state <> 'running' ORDER BY finished_at LIMIT $2", cutoff, limit)
        return [str(r[0]) for r in rows]

    async def expire_jobs(self, jobs: Sequence[str], *, at: float, reason: str) -> Freed:
        freed = Freed()
        ids = list(dict.fromkeys(jobs))
        for i in range(0, len(ids), 500):  # short transactions: the persist loop waits for the write lock
            async with self._write() as c:
                freed += await ops_sql.expire(c, ids[i:i + 500], at, reason)
        return freed

    async def expiry(self, job: str) -> Expiry | None:
        rows = await self._fetch("SELECT spec, state, error, finished_at, expired_at, expiry FROM jobs "
                                 "WHERE id = $1 AND expired_at IS NOT NULL", job)
        if not rows:
            return None
        spec, state, error, finished_at, expired_at, reason = rows[0]
        return Expiry(job=JobRow(spec=spec_from_json(spec), state=state, error=error, finished_at=finished_at),
                      at=float(expired_at), reason=str(reason))

    async def compact(self) -> None:
        """Nothing to do: autovacuum makes the space of deleted blobs reusable. VACUUM FULL would give
        it back to the file system, but locks the table while it copies it."""

    async def canonical_digests(self, job: str) -> list[str | None]:
        rows = await self._fetch("SELECT canonical_digest FROM tasks WHERE job = $1 ORDER BY idx", job)
        return [r[0] for r in rows]

    # ---- ledger -----------------------------------------------------------------------------
    async def ledger_balances(self, upto: int | None = None) -> Balances:
        async with self._conn() as c:
            return await ledger_pg.read_balances(c, upto)

    async def ledger_entries(self, after: int, limit: int, upto: int | None = None) -> list[Entry]:
        async with self._conn() as c:
            return await ledger_pg.read_entries(c, after, limit, upto)

    async def ledger_job(self, job: str) -> list[Entry]:
        # Through the job's tasks and the exactly-once key (kind, task, ...), as sqlite_store does:
        # no index by job for every insert to pay for. A grant has no task and no job.
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM ledger_entries WHERE kind IN ('credit', 'charge', 'clawback', 'refund') "
            "AND task IN (SELECT id FROM tasks WHERE job = $1) AND job = $1 ORDER BY seq", job)
        return [entry_from_row(tuple(r)) for r in rows]

    async def save_checkpoint(self, cp: Checkpoint) -> None:
        # One statement, committed on its own: it touches nothing the write lock guards.
        async with self._conn() as c:
            await ledger_pg.save_checkpoint(c, cp)

    async def latest_checkpoint(self) -> Checkpoint | None:
        async with self._conn() as c:
            return await ledger_pg.read_latest_checkpoint(c)

    async def checkpoints(self, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        async with self._conn() as c:
            return await ledger_pg.read_checkpoints(c, after_size, limit)

    async def ledger_history(self, node: str) -> list[Entry]:
        async with self._conn() as c:
            return await ledger_pg.read_history(c, node)

    async def grant(self, account: str, amount: int, *, key: str, memo: str, created_at: float) -> bool:
        grant = Grant(account=account, amount=amount, key=key, memo=memo, created_at=created_at)
        async with self._write() as c:
            return await ledger_pg.insert_entries(c, [grant]) == 1

    async def account_balance(self, name: str) -> int:
        async with self._conn() as c:
            return await ledger_pg.read_account_balance(c, name)

    async def account_history(self, name: str) -> list[Entry]:
        async with self._conn() as c:
            return await ledger_pg.read_account_history(c, name)

    async def accepted(self, after: int, limit: int, upto: int | None = None) -> list[dict[str, Any]]:
        rows = await self._fetch(
            "SELECT r.seq, r.task, t.job, r.node, r.owner, r.output_digest, t.state, "
            "COALESCE(j.spec::jsonb ->> 'submitter', ''), t.verdict_seq, t.stop - t.start, "
            "(j.spec::jsonb ->> 'flops_per_row')::bigint FROM results r "
            "JOIN tasks t ON t.id = r.task JOIN jobs j ON j.id = t.job "
            "WHERE r.accepted AND r.seq > $1 AND t.verdict_seq <= $2 ORDER BY r.seq LIMIT $3",
            clamp(after), upto_or_all(upto), min(limit, NO_LIMIT))
        keys = ("seq", "task", "job", "node", "owner", "output_digest", "task_state", "submitter", "verdict_seq",
                "rows", "flops_per_row")  # the cost model's inputs: a verifier recomputes each credit's amount
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ---- accounts and trust -----------------------------------------------------------------
    async def save_accounts(self, *, accounts: Sequence[Account] = (), nodes: Sequence[NodeRecord] = (),
                            invites: Sequence[Invite] = ()) -> None:
        async with self._write() as c:
            await c.executemany(
                "INSERT INTO accounts VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET "
                "name = EXCLUDED.name, public_key = EXCLUDED.public_key, created_at = EXCLUDED.created_at, "
                "blocked = EXCLUDED.blocked, operator = EXCLUDED.operator",
                [(a.id, a.name, a.public_key, a.created_at, a.blocked, a.operator) for a in accounts])
            await c.executemany(
                "INSERT INTO nodes VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (node) DO UPDATE SET "
                "public_key = EXCLUDED.public_key, owner = EXCLUDED.owner, owner_id = EXCLUDED.owner_id, "
                "expires_at = EXCLUDED.expires_at, registered_at = EXCLUDED.registered_at",
                [(n.node, n.public_key, n.owner, n.owner_id, n.expires_at, n.registered_at) for n in nodes])
            await c.executemany(
                "INSERT INTO invites VALUES ($1, $2, $3) ON CONFLICT (token_sha256) DO UPDATE SET "
                "created_at = EXCLUDED.created_at, used_by = EXCLUDED.used_by",
                [(i.token_sha256, i.created_at, i.used_by) for i in invites])

    async def load_accounts(self) -> tuple[list[Account], list[NodeRecord], list[Invite]]:
        async with self._snapshot() as c:
            accounts = [Account(id=i, name=n, public_key=bytes(pk), created_at=t, blocked=b, operator=o)
                        for i, n, pk, t, b, o in await c.fetch("SELECT * FROM accounts")]
            nodes = [NodeRecord(node=n, public_key=bytes(pk), owner=o, owner_id=oi, expires_at=e, registered_at=r)
                     for n, pk, o, oi, e, r in await c.fetch("SELECT * FROM nodes")]
            invites = [Invite(token_sha256=h, created_at=t, used_by=u)
                       for h, t, u in await c.fetch("SELECT * FROM invites")]
        return accounts, nodes, invites

    async def save_trust(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        if rows:
            async with self._write() as c:
                await c.executemany("INSERT INTO trust VALUES ($1, $2, $3) ON CONFLICT (kind, name) "
                                    "DO UPDATE SET record = EXCLUDED.record",
                                    [(k, n, json.dumps(r)) for k, n, r in rows])

    async def load_trust(self) -> list[tuple[str, str, dict[str, Any]]]:
        rows = await self._fetch("SELECT kind, name, record FROM trust")
        return [(str(k), str(n), dict(json.loads(r))) for k, n, r in rows]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._command_timeout)
            except (*ledger_pg.UNAVAILABLE, asyncpg.PostgresError):
                pool.terminate()  # the server is gone: drop the sockets without goodbyes
