"""The coordinator's tables on PostgreSQL, and the migrations that bring a database up to them.

The same tables as `sqlite_store.SCHEMA`, typed for several coordinators sharing one database later:
TEXT ids, BYTEA blobs, DOUBLE PRECISION wall-clock times, BIGSERIAL where only order matters (jobs,
results). The ledger's tables come from `ledger.postgres` (its seq is numbered without gaps there).
`schema_version` holds one row: the number of migrations applied. A migration is a list of
statements run in one transaction with the rest of its kind, under an advisory lock, so two
coordinators starting together migrate once.
"""

from __future__ import annotations

from typing import Final

import asyncpg

from ledger import postgres as ledger_pg

from .store import StoreError

V1: Final = (
    "CREATE TABLE models (digest TEXT PRIMARY KEY, data BYTEA NOT NULL, meta TEXT NOT NULL)",
    "CREATE TABLE blobs (digest TEXT PRIMARY KEY, data BYTEA NOT NULL)",
    # ord: creation order for restore (SQLite's rowid); created_at alone ties within a second
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY, ord BIGSERIAL NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL, error TEXT,
        created_at DOUBLE PRECISION NOT NULL, finished_at DOUBLE PRECISION, expired_at DOUBLE PRECISION,
        expiry TEXT)""",
    # what each retention sweep reads, without the jobs that expired before
    "CREATE INDEX jobs_to_expire ON jobs (finished_at) WHERE expired_at IS NULL AND finished_at IS NOT NULL",
    """CREATE TABLE tasks (
        id TEXT PRIMARY KEY, job TEXT NOT NULL REFERENCES jobs (id), idx INTEGER NOT NULL,
        start BIGINT NOT NULL, stop BIGINT NOT NULL, input_digest TEXT NOT NULL, input_bytes BIGINT NOT NULL,
        state TEXT NOT NULL, canonical_digest TEXT, error TEXT, UNIQUE (job, idx))""",
    """CREATE TABLE leases (
        id TEXT PRIMARY KEY, task TEXT NOT NULL, job TEXT NOT NULL, node TEXT NOT NULL, owner TEXT NOT NULL,
        issued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL, state TEXT NOT NULL)""",
    "CREATE INDEX leases_task ON leases (task)",
    """CREATE TABLE results (
        seq BIGSERIAL PRIMARY KEY, lease TEXT NOT NULL UNIQUE, task TEXT NOT NULL, node TEXT NOT NULL,
        owner TEXT NOT NULL, output_digest TEXT NOT NULL, problem TEXT,
        received_at DOUBLE PRECISION NOT NULL, accepted BOOLEAN NOT NULL DEFAULT FALSE)""",
    "CREATE INDEX results_task ON results (task)",
    "CREATE INDEX results_accepted ON results (seq) WHERE accepted",
    """CREATE TABLE accounts (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, public_key BYTEA NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, blocked BOOLEAN NOT NULL, operator BOOLEAN NOT NULL)""",
    """CREATE TABLE nodes (
        node TEXT PRIMARY KEY, public_key BYTEA NOT NULL, owner TEXT NOT NULL, owner_id TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL, registered_at DOUBLE PRECISION NOT NULL)""",
    "CREATE TABLE invites (token_sha256 TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL, used_by TEXT)",
    "CREATE TABLE trust (kind TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (kind, name))",
    # the leases (and so results) of a task from before it was reopened: history, not loaded on restart
    "CREATE TABLE superseded_leases (lease TEXT PRIMARY KEY, task TEXT NOT NULL)",
    "CREATE TABLE uploads (lease TEXT PRIMARY KEY, job TEXT NOT NULL, digest TEXT NOT NULL)",
    "CREATE INDEX uploads_job ON uploads (job)",
    # which jobs not expired reference which blobs: a blob goes when its last row here does
    "CREATE TABLE blob_refs (digest TEXT NOT NULL, job TEXT NOT NULL, PRIMARY KEY (digest, job))",
    *ledger_pg.SCHEMA,
)

V2: Final = (
    # Issue 11: the ledger's signed checkpoints, and per task the ledger size after the transaction
    # that wrote its current verdict, so that accepted results can be read as of a checkpoint.
    # Tasks verified before it get 0, which every snapshot includes.
    *ledger_pg.CHECKPOINT_SCHEMA,
    "ALTER TABLE tasks ADD COLUMN IF NOT EXISTS verdict_seq BIGINT NOT NULL DEFAULT 0",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (V1, V2)
"""Append only: migration i (from 1) brings a database at version i - 1 to version i."""


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema the connection's search_path selects up to date; returns its version."""
    async with conn.transaction():
        schema = await conn.fetchval("SELECT current_schema()")
        if schema is None:
            path = await conn.fetchval("SHOW search_path")
            raise StoreError(f"no schema to create the coordinator's tables in: search_path is {path!r} "
                             "and names no schema that exists (CREATE SCHEMA it, or fix the URL's options)")
        # Per schema: coordinators of other schemas in the same database do not wait for this one.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('sparecycles.migrate.' || current_schema()))")
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            await conn.execute("INSERT INTO schema_version VALUES (0)")
            version = 0
        if version > len(MIGRATIONS):
            raise StoreError(f"the database's schema is at version {version}, newer than this coordinator's "
                             f"{len(MIGRATIONS)}: run a newer sparecycles against it")
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                await conn.execute(statement)
        await conn.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS))
        return len(MIGRATIONS)
