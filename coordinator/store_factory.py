"""Pick a `CoordinatorStore` from one `--db` setting (after Flower's `linkstate_factory.py`).

The factory imports the implementations and they import the interface, never the reverse."""

from __future__ import annotations

from .memory_store import MemoryStore
from .sqlite_store import SQLiteStore
from .store import CoordinatorStore, StoreError


def open_store(url: str) -> CoordinatorStore:
    """`memory` or `sqlite:///relative.db` / `sqlite:////abs/path.db` (SQLAlchemy-style)."""
    if url in ("memory", ":memory:", "memory://"):
        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise StoreError("sqlite URL needs a path: sqlite:////abs/path/ledger.db")
        return SQLiteStore(path)
    raise StoreError(f"unsupported --db {url!r}: use sqlite:////abs/path/ledger.db or memory "
                     "(PostgreSQL arrives with the auditable ledger)")
