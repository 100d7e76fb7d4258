"""Open the ledger backend one URL names. Imports the backends; they import only the interface."""

from __future__ import annotations

from .errors import LedgerError
from .sqlite import SQLiteLedgerStore
from .store import InMemoryLedgerStore, LedgerStore


def open_ledger(url: str) -> LedgerStore:
    """Open the ledger named by one setting.

    - ``memory`` or ``:memory:``: an `InMemoryLedgerStore`;
    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's spelling:
      the path is what follows the third slash); ``sqlite://`` or ``sqlite:///:memory:`` for a
      private in-memory SQLite database.

    Anything else raises `LedgerError`. The SQLite file is opened in the store's own thread; an
    unusable path surfaces as `StorageError` on first use (`await SQLiteLedgerStore.open(path)`
    reports it at once).
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
    raise LedgerError(
        f"unsupported ledger URL {url!r}: use 'memory', 'sqlite:///relative.db' or "
        "'sqlite:////absolute/path.db'"
    )
