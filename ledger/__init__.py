"""sparecycles ledger: append-only credits for accepted results, priced by the coordinator's own
cost model, stored exactly once per (task, node), and checkable by anyone.

Imports `protocol` at most; never `coordinator` or `node`. The cost model is imported from
`ledger.credit` explicitly: it loads onnx (~250 ms), which readers of the ledger do not need.
"""

from .entries import Balances, Credit, Entry, NodeBalance, OwnerBalance
from .errors import CostModelError, InvalidEntry, LedgerError, StorageError, StoreClosed
from .factory import open_ledger
from .store import InMemoryLedgerStore, LedgerStore

__all__ = [
    "Balances",
    "CostModelError",
    "Credit",
    "Entry",
    "InMemoryLedgerStore",
    "InvalidEntry",
    "LedgerError",
    "LedgerStore",
    "NodeBalance",
    "OwnerBalance",
    "StorageError",
    "StoreClosed",
    "open_ledger",
]
