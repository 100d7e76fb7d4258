"""The ledger port: one ABC whose docstrings are the contract, and an in-memory twin beside it.

Every backend runs the same suite in `tests/contract/test_ledger_store.py`. `factory.open_ledger`
picks a backend from one URL setting (after Flower's `linkstate_factory.py`); the factory imports
the backends and they import this interface, so the arrows run one way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

from .entries import SIGNS, Balances, Clawback, Credit, Entry, LedgerRecord, UniqueKey, balances_of
from .errors import StoreClosed


class LedgerStore(ABC):
    """An append-only log of typed records (credits, charges, grants, clawbacks, refunds), numbered
    from 1 without gaps over all kinds.

    Exactly once, by one key per record (`unique_key`): a credit per (task, node, ref = the accepted
    lease), a charge per (task, ref), a grant per caller-given key, a clawback per (task, node,
    ref = the lease no longer believed), a refund per (task, ref). A record whose key is already in
    the log is ignored, whatever the number of calls, restarts or concurrent callers, even if its
    other fields differ (the first one written stands). Nothing is ever updated or deleted: a
    reopened task's credits and charge are reversed by new clawback and refund entries.

    The store does not check that a task's charge equals its credits, nor that a clawback matches a
    credit: the caller builds them (`entries.charge_for`, `entries.reversal_of`) and appends each
    verdict or reopen in one call; `ledger.verify` checks the result.

    Using a store after `close()` raises `StoreClosed`; a failing database raises `StorageError`.
    A store is an async context manager that closes on exit.
    """

    @abstractmethod
    async def append(self, records: Sequence[LedgerRecord]) -> int:
        """Append records in the given order, all or none. Returns how many were new: keys already
        in the log, and repeats within `records`, are skipped and take no seq number."""

    @abstractmethod
    async def size(self) -> int:
        """Number of entries, which is also the highest seq (0 when empty)."""

    @abstractmethod
    async def entries(self, after: int = 0, limit: int = 1000) -> list[Entry]:
        """Up to `limit` entries with seq > `after`, in ascending seq. `limit` < 1 returns []."""

    @abstractmethod
    async def contains(self, key: UniqueKey) -> bool:
        """Whether a record with this `unique_key` is in the log (committed, or appended by this
        call's own transaction for the coordinator's SQL functions)."""

    @abstractmethod
    async def balances(self) -> Balances:
        """Per (node, owner) and per owner sums of credits net of clawbacks, per account sums of
        every kind, and totals, over the whole log, as one snapshot (`entries.Balances`). Rows are
        sorted by amount (credits, balance) descending, then by name."""

    @abstractmethod
    async def history(self, node: str) -> list[Entry]:
        """Every credit paying `node` and every clawback taking one back, in ascending seq; [] for
        a node never credited. Sum `Entry.delta`, not `amount`, for what the node holds."""

    @abstractmethod
    async def account_balance(self, account: str) -> int:
        """granted + earned - spent - clawed back + refunded for `account` (0 for an account
        without entries). Cheap: the coordinator asks it on every job submission."""

    @abstractmethod
    async def account_history(self, account: str) -> list[Entry]:
        """Every entry of `account` (credits to it, charges to it, grants to it, clawbacks from it,
        refunds to it), in ascending seq."""

    @abstractmethod
    async def close(self) -> None:
        """Release the store's resources. Idempotent."""

    async def __aenter__(self) -> LedgerStore:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class InMemoryLedgerStore(LedgerStore):
    """The twin for unit tests of callers. Not durable.

    Safe under `asyncio.gather` without a lock: no method awaits between reading and writing its
    state, so each call runs whole before another can start. It is not thread-safe.
    """

    def __init__(self) -> None:
        self._log: list[Entry] = []
        self._keys: set[UniqueKey] = set()
        self._by_node: dict[str, list[Entry]] = {}
        self._by_account: dict[str, list[Entry]] = {}
        self._balance: dict[str, int] = {}
        self._closed = False

    async def append(self, records: Sequence[LedgerRecord]) -> int:
        self._check_open()
        added = 0
        for record in records:
            if record.unique_key in self._keys:
                continue
            entry = Entry(len(self._log) + 1, record)
            self._log.append(entry)
            self._keys.add(record.unique_key)
            if isinstance(record, Credit | Clawback):
                self._by_node.setdefault(record.node, []).append(entry)
            self._by_account.setdefault(record.account, []).append(entry)
            self._balance[record.account] = self._balance.get(record.account, 0) \
                + SIGNS[record.kind] * record.amount
            added += 1
        return added

    async def size(self) -> int:
        self._check_open()
        return len(self._log)

    async def entries(self, after: int = 0, limit: int = 1000) -> list[Entry]:
        self._check_open()
        if limit < 1:
            return []
        start = max(after, 0)  # seq n sits at index n - 1
        return self._log[start:start + limit]

    async def contains(self, key: UniqueKey) -> bool:
        self._check_open()
        return key in self._keys

    async def balances(self) -> Balances:
        self._check_open()
        return balances_of(self._log)

    async def history(self, node: str) -> list[Entry]:
        self._check_open()
        return list(self._by_node.get(node, ()))

    async def account_balance(self, account: str) -> int:
        self._check_open()
        return self._balance.get(account, 0)

    async def account_history(self, account: str) -> list[Entry]:
        self._check_open()
        return list(self._by_account.get(account, ()))

    async def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the in-memory ledger store is closed")
