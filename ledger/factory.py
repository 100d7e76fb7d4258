"""Open the ledger backend one URL names. Imports the backends; they import only the interface."""

from __future__ import annotations

from typing import Final

from .errors import LedgerError
from .sqlite import SQLiteLedgerStore
from .store import InMemoryLedgerStore, LedgerStore

POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")
"""libpq's two spellings, as the coordinator's `--db` takes them."""


def open_ledger(url: str) -> LedgerStore:
    """Open the ledger named by one setting.

    - ``memory`` or ``:memory:``: an `InMemoryLedgerStore`;
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's spelling:
      the path is what follows the third slash); ``sqlite://`` or ``sqlite:///:memory:`` for a
      private in-memory SQLite database;
    - ``postgresql://USER@HOST:PORT/DB`` (or ``postgres://``), with libpq's parameters (a schema
      by ``?options=-csearch_path%3DNAME``, a password from PGPASSWORD): a `PostgresLedgerStore`,
      which connects and creates its tables on first use.

    Anything else raises `LedgerError`. The SQLite file is opened in the store's own thread; an
    unusable path surfaces as `StorageError` on first use (`await SQLiteLedgerStore.open(path)`
    reports it at once), and so does an unreachable PostgreSQL server.
    """
    if url in ("memory", ":memory:"):
        return InMemoryLedgerStore()
    if url == "sqlite://":
        return SQLiteLedgerStore(":memory:")
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise LedgerError(f"ledger URL {url!r} names no file: write sqlite:////absolute/path.db")
        return SQLiteLedgerStore(path)
    if url.startswith(POSTGRES_SCHEMES):
        if not url.split("://", 1)[1].split("?", 1)[0].strip("/"):
            raise LedgerError("ledger URL names no PostgreSQL server and database: write "
                              "postgresql://USER@HOST:PORT/DB")
        # Imported here: asyncpg is not needed by the many readers of a SQLite or in-memory ledger.
        from .postgres import PostgresLedgerStore

        return PostgresLedgerStore(url)
    shown = url.split("://", 1)[0] + "://..." if "://" in url else url  # a URL may hold a password
    raise LedgerError(
        f"unsupported ledger URL {shown!r}: use 'memory', 'sqlite:///relative.db', "
        "'sqlite:////absolute/path.db' or 'postgresql://USER@HOST:PORT/DB'"
    )
