"""sparecycles ledger: an append-only, double-entry log. Credits for accepted results, priced by the
coordinator's own cost model, are paid by the submitter's charges; operator grants are the only
source of credit. A task reopened after its result stopped being believed is reversed by new
clawback and refund entries, never by editing the log. Every entry is stored exactly once by its
key, and the log is checkable by anyone.

Imports `protocol` at most; never `coordinator` or `node`. The cost model is imported from
`ledger.credit` explicitly: it loads onnx (~250 ms), which readers of the ledger do not need.
"""

from .entries import (
    AccountBalance,
    Balances,
    Charge,
    Clawback,
    Credit,
    Entry,
    Grant,
    LedgerRecord,
    NodeBalance,
    OwnerBalance,
    Refund,
    charge_for,
    reversal_of,
)
from .errors import CostModelError, InvalidEntry, LedgerError, StorageError, StoreClosed
from .factory import open_ledger
from .store import InMemoryLedgerStore, LedgerStore

__all__ = [
    "AccountBalance",
    "Balances",
    "Charge",
    "Clawback",
    "CostModelError",
    "Credit",
    "Entry",
    "Grant",
    "InMemoryLedgerStore",
    "InvalidEntry",
    "LedgerError",
    "LedgerRecord",
    "LedgerStore",
    "NodeBalance",
    "OwnerBalance",
    "Refund",
    "StorageError",
    "StoreClosed",
    "charge_for",
    "open_ledger",
    "reversal_of",
]
