"""The ledger's error tree, rooted at `LedgerError` (after dramatiq's `errors.py`).

Errors carry what a handler needs to act on (the reason, the size of the rejected model, the store's
location), not just a sentence.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every ledger failure."""


class CostModelError(LedgerError):
    """The bytes offered for pricing are not a usable ONNX model.

    `reason` is the sentence for the submitter (the HTTP API answers 400 with it); `size` is how
    many bytes were offered, for the counter and the log line.
    """

    def __init__(self, reason: str, *, size: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.size = size


class InvalidEntry(LedgerError, ValueError):
    """A credit that breaks the ledger's invariants (amount not positive, a name empty): the caller's
    bug, raised when the value is built so that it can never reach a store. Also a `ValueError`."""


class StoreClosed(LedgerError):
    """The store was used after `close()`."""


class StorageError(LedgerError):
    """The backing database failed (disk full, file unreadable, locked for too long).

    `location` names the database, so the log line says which file to look at.
    """

    def __init__(self, message: str, *, location: str) -> None:
        super().__init__(f"{message} (ledger at {location})")
        self.location = location
