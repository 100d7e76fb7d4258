"""The SQLite ledger: plain SQL functions over a caller's connection, and a standalone async store.

The coordinator writes a task's credits in the same transaction that marks the task verified, so
that a crash or a replayed message can never credit twice or lose a credit. It therefore calls the
functions below on its own connection, inside its own transaction; none of them commits.
`SQLiteLedgerStore` wraps the same functions for a process that owns the ledger file alone.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

from .entries import Balances, Credit, Entry, balances_from_rows
from .errors import StorageError, StoreClosed
from .store import LedgerStore

T = TypeVar("T")

_SCHEMA_STATEMENTS: Final = (
    """CREATE TABLE IF NOT EXISTS ledger_entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    owner TEXT NOT NULL,
    job TEXT NOT NULL,
    task TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount > 0),
    result_digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (task, node)
)""",
    "CREATE INDEX IF NOT EXISTS ledger_entries_node ON ledger_entries (node)",
    "CREATE INDEX IF NOT EXISTS ledger_entries_owner ON ledger_entries (owner)",
)
# AUTOINCREMENT, unlike a bare INTEGER PRIMARY KEY, never reuses a seq, so an entry's number is its
# place in the log for good. With no deletes, and rolled-back inserts rolling the counter back too,
# seq runs 1..n without gaps - as long as no insert hits the UNIQUE key (see _INSERT).
LEDGER_SCHEMA: Final = ";\n".join(_SCHEMA_STATEMENTS) + ";\n"

_COLUMNS: Final = "seq, node, owner, job, task, amount, result_digest, created_at"
# AUTOINCREMENT advances its counter even for a row that ON CONFLICT then skips (measured: the
# next entry after a replay got seq n+2), so a replay is filtered out by NOT EXISTS before it can
# reach the key. SQLite admits one writer at a time, so nothing can slip in between the check and the
# insert. ON CONFLICT stays as the last guard (a gap `ledger verify` reports beats a failed
# transaction), and unlike INSERT OR IGNORE it does not also swallow a broken CHECK on amount.
_INSERT: Final = (
    "INSERT INTO ledger_entries (node, owner, job, task, amount, result_digest, created_at) "
    "SELECT :node, :owner, :job, :task, :amount, :result_digest, :created_at "
    "WHERE NOT EXISTS (SELECT 1 FROM ledger_entries WHERE task = :task AND node = :node) "
    "ON CONFLICT (task, node) DO NOTHING"
)


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the ledger's table and indexes if missing. Statement by statement, because
    `executescript` would first commit whatever transaction the caller has open."""
    for statement in _SCHEMA_STATEMENTS:
        conn.execute(statement)


def insert_credits(conn: sqlite3.Connection, credits: Sequence[Credit]) -> int:
    """Insert credits in order; a (task, node) already present is skipped. Returns the number of
    rows newly inserted. Does not commit: the caller's transaction decides."""
    if not credits:
        return 0
    cursor = conn.executemany(_INSERT, [c.to_json() for c in credits])
    try:
        return cursor.rowcount  # summed over the batch; a skipped row counts 0
    finally:
        cursor.close()


def read_entries(conn: sqlite3.Connection, after: int, limit: int) -> list[Entry]:
    if limit < 1:
        return []  # SQLite reads LIMIT -1 as "no limit"
    rows = _select(conn, f"SELECT {_COLUMNS} FROM ledger_entries WHERE seq > ? ORDER BY seq LIMIT ?",
                   (after, limit))
    return [_entry(row) for row in rows]


def read_size(conn: sqlite3.Connection) -> int:
    # MAX(seq) is a lookup at the end of the rowid tree while COUNT(*) scans the table; they are
    # equal because seq has no gaps.
    rows = _select(conn, "SELECT COALESCE(MAX(seq), 0) FROM ledger_entries", ())
    return int(rows[0][0])


def read_balances(conn: sqlite3.Connection) -> Balances:
    # One statement is one snapshot: owner sums and totals are derived from these rows, not read by
    # further queries that a concurrent writer could land between.
    rows = _select(conn, "SELECT node, owner, SUM(amount), COUNT(*) FROM ledger_entries GROUP BY node, owner",
                   ())
    return balances_from_rows((str(n), str(o), int(c), int(k)) for n, o, c, k in rows)


def read_history(conn: sqlite3.Connection, node: str) -> list[Entry]:
    rows = _select(conn, f"SELECT {_COLUMNS} FROM ledger_entries WHERE node = ? ORDER BY seq", (node,))
    return [_entry(row) for row in rows]


def _select(conn: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[Any]:
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples, whatever row factory the caller's connection uses
    try:
        return cursor.execute(sql, params).fetchall()
    finally:
        cursor.close()


def _entry(row: Sequence[Any]) -> Entry:
    seq, node, owner, job, task, amount, result_digest, created_at = row
    return Entry(int(seq), Credit(node=node, owner=owner, job=job, task=task, amount=int(amount),
                                  result_digest=result_digest, created_at=float(created_at)))


def _append(conn: sqlite3.Connection, credits: Sequence[Credit]) -> int:
    # IMMEDIATE takes the write lock at BEGIN, so a busy database fails here, before any work.
    conn.execute("BEGIN IMMEDIATE")
    try:
        added = insert_credits(conn, credits)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # some errors (disk full) have already rolled back
            conn.execute("ROLLBACK")
        raise
    return added


class SQLiteLedgerStore(LedgerStore):
    """A ledger in one SQLite file, in WAL mode, for a process that owns the file.

    One connection, used only from one dedicated thread: sqlite3 blocks the caller, and plain
    sqlite3 in its own thread measured 63.6k rows/s committing each row and 580k/s batched, against
    5.3k/s for aiosqlite (DESIGN.md §11). `append` is one transaction, one commit: batch credits.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._location = os.fspath(path)
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        # Submitted first on a one-thread executor, so every later job finds the connection made;
        # __init__ itself never blocks on the disk.
        self._ready = self._executor.submit(self._connect)

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> SQLiteLedgerStore:
        """Open and wait until the file is usable; raises `StorageError` at once if it is not."""
        store = cls(path)
        try:
            await asyncio.wrap_future(store._ready)
        except BaseException:
            await store.close()
            raise
        return store

    async def append(self, credits: Sequence[Credit]) -> int:
        batch = list(credits)  # the caller may mutate its sequence while the thread runs
        return await self._run(lambda conn: _append(conn, batch))

    async def size(self) -> int:
        return await self._run(read_size)

    async def entries(self, after: int = 0, limit: int = 1000) -> list[Entry]:
        return await self._run(lambda conn: read_entries(conn, after, limit))

    async def balances(self) -> Balances:
        return await self._run(read_balances)

    async def history(self, node: str) -> list[Entry]:
        return await self._run(lambda conn: read_history(conn, node))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Jobs already queued run first (the executor is FIFO), then the connection closes.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        self._executor.shutdown(wait=True)  # the queue is empty: this joins an idle thread

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(self._location, isolation_level=None)  # we issue BEGIN/COMMIT
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the ledger: {exc}", location=self._location) from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is safe in WAL mode: a power cut may lose the last commits, never half of one,
            # so exactly-once still holds; FULL would fsync every commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            create_schema(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StorageError(f"cannot prepare the ledger: {exc}", location=self._location) from exc
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._ready.result()  # already done on this thread; re-raises the StorageError if it failed
        if self._conn is None:
            raise StoreClosed(f"the ledger at {self._location} is closed")
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageError(str(exc), location=self._location) from exc

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreClosed(f"the ledger at {self._location} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)
