"""Pick a `CoordinatorStore` from one `--db` setting (after Flower's `linkstate_factory.py`).

The factory imports the implementations and they import the interface, never the reverse."""

from __future__ import annotations

from .memory_store import MemoryStore
from .postgres_store import PostgresStore
from .sqlite_store import SQLiteStore
from .store import CoordinatorStore, StoreError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MEMORY = ("memory", ":memory:", "memory://")


def db_url(text: str) -> str:
    """`--db` as given, with a plain file path (`state.db`, `/var/lib/sc/state.db`) read as the SQLite
    URL of that file: `--db state.db` is `--db sqlite:///state.db`. URLs and `memory` pass unchanged."""
    if text in MEMORY or "://" in text or not text.strip():
        return text
    return f"sqlite:///{text}"


def open_store(url: str) -> CoordinatorStore:
    """`memory`; a file path (SQLite); `sqlite:///relative.db` / `sqlite:////abs/path.db` (SQLAlchemy-style); or
    `postgresql://USER@HOST:PORT/DB` (also `postgres://`), with libpq's parameters: a password from
    the PGPASSWORD environment variable (keeps it off the command line) or `USER:PASSWORD@`, a
    schema by `?options=-csearch_path%3DNAME`. A PostgreSQL store connects on first use."""
    url = db_url(url)
    if url in MEMORY:
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StoreError("sqlite URL needs a path: sqlite:////abs/path/ledger.db")
        return SQLiteStore(path)
    if url.startswith(POSTGRES_SCHEMES):
        if not url.split("://", 1)[1].split("?", 1)[0].strip("/"):
            raise StoreError("a PostgreSQL URL names a server and a database: postgresql://USER@HOST:PORT/DB")
        return PostgresStore(url)
    shown = url.split("://", 1)[0] + "://..." if "://" in url else url  # a URL may hold a password
    raise StoreError(f"unsupported --db {shown!r}: use a file path (state.db), sqlite:////abs/path/ledger.db, "
                     "postgresql://USER@HOST:PORT/DB or memory")
