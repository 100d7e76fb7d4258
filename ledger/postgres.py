"""The PostgreSQL ledger: SQL functions over a caller's asyncpg connection, and a standalone async store.

The twin of `ledger/sqlite.py`, and for the same reason: the coordinator writes a task's credits and
its charge in the transaction that marks the task verified, so it calls these functions on its own
connection, inside its own transaction; none of them commits. `PostgresLedgerStore` wraps them for
a process that owns the ledger alone (and for the contract suite).

Seq numbers run 1..n without gaps, as in SQLite. A sequence (BIGSERIAL) cannot promise that - a
rolled-back insert or an ON CONFLICT skip burns its values - so `insert_entries` numbers entries
itself, after locking the one row of `ledger_head`: ledger writers take turns (one log has one
order anyway), readers never wait, and several coordinators on one database would queue there
rather than interleave. A lock row rather than `LOCK TABLE`, so that an operator may grant the
coordinator's role INSERT and SELECT on `ledger_entries` and nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from .checkpoint import Checkpoint
from .entries import Balances, Entry, LedgerRecord, UniqueKey, balances_from_rows
from .errors import StorageError, StoreClosed
from .rows import CHECKPOINT_COLUMNS, COLUMNS, NO_LIMIT, checkpoint_from_row, clamp, entry_from_row, row_of, upto_or_all
from .store import LedgerStore

T = TypeVar("T")

SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS ledger_entries (
        seq BIGINT PRIMARY KEY CHECK (seq > 0),
        kind TEXT NOT NULL,
        account TEXT NOT NULL,
        amount BIGINT NOT NULL CHECK (amount > 0),
        job TEXT NOT NULL DEFAULT '',
        task TEXT NOT NULL DEFAULT '',
        node TEXT NOT NULL DEFAULT '',
        ref TEXT NOT NULL DEFAULT '',
        result_digest TEXT NOT NULL DEFAULT '',
        memo TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        UNIQUE (kind, task, node, ref))""",
    # '' rather than NULL in columns a kind does not use: one UNIQUE constraint is every kind's
    # exactly-once key (see ledger/sqlite.py).
    "CREATE INDEX IF NOT EXISTS ledger_entries_node ON ledger_entries (node)",
    # Covering: account_balance() sums from the index alone (an index-only scan once vacuumed).
    "CREATE INDEX IF NOT EXISTS ledger_entries_account ON ledger_entries (account, kind) INCLUDE (amount)",
    "CREATE TABLE IF NOT EXISTS ledger_head (id INTEGER PRIMARY KEY CHECK (id = 1))",
    "INSERT INTO ledger_head VALUES (1) ON CONFLICT DO NOTHING",
)
"""The ledger's tables as issue 8 left them: the coordinator's first schema migration runs exactly
these, so they must not change (a new table goes in a statement list of its own, run by a new
migration)."""

CHECKPOINT_SCHEMA: Final = (
    # One signed tree head per size: the first one signed for a size stands (see ledger/sqlite.py).
    "CREATE TABLE IF NOT EXISTS ledger_checkpoints (size BIGINT PRIMARY KEY CHECK (size >= 0), "
    "root BYTEA NOT NULL, timestamp_ms BIGINT NOT NULL, signature BYTEA NOT NULL, origin TEXT NOT NULL)",
)
"""Added by issue 11."""

_KEYS: Final = ("SELECT e.kind, e.task, e.node, e.ref FROM ledger_entries e "
                "JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k(kind, task, node, ref) "
                "USING (kind, task, node, ref)")
_INSERT: Final = (
    f"INSERT INTO ledger_entries ({COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], "
    "$4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::float8[]) "
    # never taken while writers hold ledger_head; kept as the last guard, as in SQLite
    "ON CONFLICT (kind, task, node, ref) DO NOTHING")
_FIELDS: Final = tuple(c.strip() for c in COLUMNS.split(","))[1:]  # after seq

# What "the database went away" looks like to asyncpg: refused or reset sockets and timeouts
# (OSError), a connection closed under a query (InterfaceError, ConnectionDoesNotExistError), a
# server shutting down or starting up (class 57), a broken connection (class 08).
UNAVAILABLE: Final = (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                      asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.CannotConnectNowError)


def redact(url: str) -> str:
    """The URL without its password (in the user part or as a `password=` parameter): what logs and
    error messages may show."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="/:=-")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def unavailable(exc: BaseException) -> str:
    """One line for an `UNAVAILABLE` error; a timeout's own message is empty."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def create_schema(conn: asyncpg.Connection) -> None:
    """Create the ledger's tables and indexes if missing. Run it inside the caller's transaction
    (or alone: each statement is idempotent)."""
    for statement in (*SCHEMA, *CHECKPOINT_SCHEMA):
        await conn.execute(statement)


def _dedupe(records: Sequence[LedgerRecord]) -> list[LedgerRecord]:
    first: dict[UniqueKey, LedgerRecord] = {}
    for r in records:
        first.setdefault(r.unique_key, r)
    return list(first.values())


async def existing_keys(conn: asyncpg.Connection, keys: Sequence[UniqueKey]) -> set[UniqueKey]:
    """Which of `keys` are in the log (or this transaction)."""
    if not keys:
        return set()
    rows = await conn.fetch(_KEYS, *(list(col) for col in zip(*keys, strict=True)))
    return {(str(k), str(t), str(n), str(r)) for k, t, n, r in rows}


async def insert_entries(conn: asyncpg.Connection, records: Sequence[LedgerRecord]) -> int:
    """Insert records in order; a record whose key is already present (or repeated earlier in
    `records`) is skipped and takes no seq. Returns the number of rows inserted. Call it inside a
    transaction: the lock on `ledger_head` that keeps seq gapless is held until that commits."""
    if not records:
        return 0
    await conn.execute("SELECT 1 FROM ledger_head WHERE id = 1 FOR UPDATE")
    # After the lock: under READ COMMITTED this statement sees every writer that went before.
    candidates = _dedupe(records)
    taken = await existing_keys(conn, [r.unique_key for r in candidates])
    new = [r for r in candidates if r.unique_key not in taken]
    if not new:
        return 0
    size = await read_size(conn)
    rows = [row_of(r) for r in new]
    columns = [list(range(size + 1, size + 1 + len(new)))] + [[row[f] for row in rows] for f in _FIELDS]
    status = await conn.execute(_INSERT, *columns)
    return int(status.rsplit(" ", 1)[1])


async def read_entries(conn: asyncpg.Connection, after: int, limit: int, upto: int | None = None) -> list[Entry]:
    """Up to `limit` entries with `after` < seq <= `upto`, ascending."""
    if limit < 1:
        return []
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM ledger_entries WHERE seq > $1 AND seq <= $2 "
                            "ORDER BY seq LIMIT $3", clamp(after), upto_or_all(upto), min(limit, NO_LIMIT))
    return [entry_from_row(tuple(r)) for r in rows]



async def read_size(conn: asyncpg.Connection) -> int:
    # MAX over the primary key is one index probe; equal to COUNT(*) because seq has no gaps.
    return int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM ledger_entries"))


async def has_entry(conn: asyncpg.Connection, key: UniqueKey) -> bool:
    return bool(await existing_keys(conn, [key]))


async def read_balances(conn: asyncpg.Connection, upto: int | None = None) -> Balances:
    """Balances over the entries with seq <= `upto` (all of them by default)."""
    # One statement, one snapshot: node rows and account rows from the same state of the log.
    rows = await conn.fetch(
        "SELECT 'node', node, account, SUM(CASE kind WHEN 'clawback' THEN -amount ELSE amount END), "
        "SUM(CASE kind WHEN 'clawback' THEN -1 ELSE 1 END) FROM ledger_entries "
        "WHERE kind IN ('credit', 'clawback') AND seq <= $1 GROUP BY node, account "
        "UNION ALL "
        "SELECT 'account', account, kind, SUM(amount), 0 FROM ledger_entries WHERE seq <= $1 "
        "GROUP BY account, kind", upto_or_all(upto))
    nodes = [(str(a), str(b), int(s), int(n)) for part, a, b, s, n in rows if part == "node"]
    accounts = [(str(a), str(b), int(s)) for part, a, b, s, _ in rows if part == "account"]
    return balances_from_rows(nodes, accounts)


async def read_history(conn: asyncpg.Connection, node: str) -> list[Entry]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM ledger_entries WHERE node = $1 "
                            "AND kind IN ('credit', 'clawback') ORDER BY seq", node)
    return [entry_from_row(tuple(r)) for r in rows]


async def read_account_balance(conn: asyncpg.Connection, account: str) -> int:
    return int(await conn.fetchval(
        "SELECT COALESCE(SUM(CASE WHEN kind IN ('charge', 'clawback') THEN -amount ELSE amount END), 0) "
        "FROM ledger_entries WHERE account = $1", account))


async def read_account_history(conn: asyncpg.Connection, account: str) -> list[Entry]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM ledger_entries WHERE account = $1 ORDER BY seq", account)
    return [entry_from_row(tuple(r)) for r in rows]


async def read_job(conn: asyncpg.Connection, job: str) -> list[Entry]:
    """Every entry of `job`, ascending seq: a scan of the log (the coordinator's store goes through
    the job's tasks instead)."""
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM ledger_entries WHERE job = $1 ORDER BY seq", job)
    return [entry_from_row(tuple(r)) for r in rows]


# ---- checkpoints ----------------------------------------------------------------------------


async def save_checkpoint(conn: asyncpg.Connection, cp: Checkpoint) -> bool:
    """Keep `cp`; True if it is the first of its size (a later one of that size is ignored)."""
    status: str = await conn.execute(f"INSERT INTO ledger_checkpoints ({CHECKPOINT_COLUMNS}) "
                                     "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (size) DO NOTHING",
                                     cp.origin, cp.size, cp.root, cp.timestamp_ms, cp.signature)
    return status.endswith(" 1")


async def read_latest_checkpoint(conn: asyncpg.Connection) -> Checkpoint | None:
    row = await conn.fetchrow(f"SELECT {CHECKPOINT_COLUMNS} FROM ledger_checkpoints ORDER BY size DESC LIMIT 1")
    return None if row is None else checkpoint_from_row(tuple(row))


async def read_checkpoints(conn: asyncpg.Connection, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
    """Up to `limit` checkpoints of size > `after_size`, ascending size."""
    if limit < 1:
        return []
    rows = await conn.fetch(f"SELECT {CHECKPOINT_COLUMNS} FROM ledger_checkpoints WHERE size > $1 "
                            "ORDER BY size LIMIT $2", clamp(after_size), min(limit, NO_LIMIT))
    return [checkpoint_from_row(tuple(r)) for r in rows]


class PostgresLedgerStore(LedgerStore):
    """A ledger in a PostgreSQL database (the schema the URL's search_path selects), through a small
    asyncpg pool made on first use. The database being down makes calls fail with `StorageError`
    within `timeout` seconds, and they work again once it is back."""

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 10.0) -> None:
        self._url = url
        self._location = redact(url)
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._ready = False
        self._lock = asyncio.Lock()
        self._closed = False

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise StoreClosed(f"the ledger at {self._location} is closed")
        try:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(self._url, min_size=0, max_size=self._pool_size,
                                                           timeout=self._timeout, command_timeout=self._timeout)
                if not self._ready:
                    async with self._pool.acquire(timeout=self._timeout) as conn:
                        await create_schema(conn)
                    self._ready = True
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise StorageError(f"database unavailable: {unavailable(exc)}", location=self._location) from exc
        except asyncpg.PostgresError as exc:
            raise StorageError(str(exc), location=self._location) from exc

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._conn() as conn:
            return await fn(conn)

    async def append(self, records: Sequence[LedgerRecord]) -> int:
        batch = list(records)
        async with self._conn() as conn, conn.transaction():
            return await insert_entries(conn, batch)

    async def size(self) -> int:
        return await self._read(read_size)

    async def entries(self, after: int = 0, limit: int = 1000) -> list[Entry]:
        return await self._read(lambda c: read_entries(c, after, limit))

    async def contains(self, key: UniqueKey) -> bool:
        return await self._read(lambda c: has_entry(c, key))

    async def balances(self) -> Balances:
        return await self._read(read_balances)

    async def history(self, node: str) -> list[Entry]:
        return await self._read(lambda c: read_history(c, node))

    async def account_balance(self, account: str) -> int:
        return await self._read(lambda c: read_account_balance(c, account))

    async def account_history(self, account: str) -> list[Entry]:
        return await self._read(lambda c: read_account_history(c, account))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), self._timeout)
            except (*UNAVAILABLE, asyncpg.PostgresError):
                self._pool.terminate()  # the server is gone: drop the sockets without goodbyes
            self._pool = None

