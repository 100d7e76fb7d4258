"""Ledger values: a credit, its numbered entry, and balances summed over entries.

Frozen and validated when built (after h11's events), so a broken credit never reaches a store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgpack

from .errors import InvalidEntry

MAX_AMOUNT: Final = 2**63 - 1
"""The largest amount SQLite's INTEGER and PostgreSQL's bigint can hold."""

LEAF_TAG_CREDIT: Final = "credit"
"""First element of a credit's leaf: penalties and checkpoints will be leaves of the same tree, and
the tag keeps a credit's bytes from ever reading as one of them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """One accepted (task, node) result paid for. `amount` comes from the coordinator's own cost
    model (`ledger.credit`), never from anything the node reported. `created_at` is wall-clock
    seconds: the ledger is read by other processes and machines."""

    node: str
    owner: str
    job: str
    task: str
    amount: int
    result_digest: str
    created_at: float

    def __post_init__(self) -> None:
        for name in ("node", "owner", "job", "task", "result_digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidEntry(f"credit field {name!r} must be a non-empty string, got {value!r}")
        # bool is an int in Python; True must not pass for one credit.
        if not isinstance(self.amount, int) or isinstance(self.amount, bool) \
                or not 0 < self.amount <= MAX_AMOUNT:
            raise InvalidEntry(f"credit amount must be an int in 1..2**63-1, got {self.amount!r} "
                               f"(task {self.task}, node {self.node})")
        if isinstance(self.created_at, bool) or not isinstance(self.created_at, int | float) \
                or not math.isfinite(self.created_at):
            raise InvalidEntry(f"credit created_at must be a finite number, got {self.created_at!r}")

    @property
    def key(self) -> tuple[str, str]:
        """The exactly-once key: a (task, node) pair is credited at most once."""
        return (self.task, self.node)

    def leaf_bytes(self) -> bytes:
        """Canonical msgpack: a fixed-order array, never a map (map order is the encoder's choice),
        and `created_at` always a float64 so `5` and `5.0` hash alike. The entry's seq is left out:
        a leaf's position in the tree already says it."""
        packed: bytes = msgpack.packb(
            [LEAF_TAG_CREDIT, self.node, self.owner, self.job, self.task, self.amount,
             self.result_digest, float(self.created_at)],
            use_bin_type=True,
        )
        return packed

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "owner": self.owner, "job": self.job, "task": self.task,
                "amount": self.amount, "result_digest": self.result_digest,
                "created_at": float(self.created_at)}


@dataclass(frozen=True, slots=True)
class Entry:
    """A credit at its place in the log: `seq` counts from 1 without gaps."""

    seq: int
    credit: Credit

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, **self.credit.to_json()}


@dataclass(frozen=True, slots=True)
class NodeBalance:
    node: str
    owner: str
    credits: int
    entries: int

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "owner": self.owner, "credits": self.credits, "entries": self.entries}


@dataclass(frozen=True, slots=True)
class OwnerBalance:
    owner: str
    credits: int
    entries: int

    def to_json(self) -> dict[str, object]:
        return {"owner": self.owner, "credits": self.credits, "entries": self.entries}


@dataclass(frozen=True, slots=True)
class Balances:
    """Sums over the whole log. A node is listed once per owner it earned under: the owner is what a
    node claims in its requests, and folding two claims into one row would hide a change of owner."""

    nodes: tuple[NodeBalance, ...]
    owners: tuple[OwnerBalance, ...]
    total_credits: int
    entries: int

    def to_json(self) -> dict[str, object]:
        return {"nodes": [n.to_json() for n in self.nodes], "owners": [o.to_json() for o in self.owners],
                "total_credits": self.total_credits, "entries": self.entries}


def balances_from_rows(rows: Iterable[tuple[str, str, int, int]]) -> Balances:
    """Build `Balances` from (node, owner, credits, entries) rows, one per (node, owner) pair.

    Every backend funnels through here so that sorting (credits descending, then name) and the
    owner and total sums cannot drift apart between them.
    """
    nodes: list[NodeBalance] = []
    owners: dict[str, tuple[int, int]] = {}
    for node, owner, credits, count in rows:
        nodes.append(NodeBalance(node, owner, credits, count))
        have_credits, have_count = owners.get(owner, (0, 0))
        owners[owner] = (have_credits + credits, have_count + count)
    nodes.sort(key=lambda b: (-b.credits, b.node, b.owner))
    owner_rows = sorted((OwnerBalance(o, c, n) for o, (c, n) in owners.items()),
                        key=lambda b: (-b.credits, b.owner))
    return Balances(nodes=tuple(nodes), owners=tuple(owner_rows),
                    total_credits=sum(b.credits for b in nodes), entries=sum(b.entries for b in nodes))


def balances_of(entries: Iterable[Entry]) -> Balances:
    """Balances of a list of entries, as `LedgerStore.balances()` reports them."""
    tally: dict[tuple[str, str], tuple[int, int]] = {}
    for entry in entries:
        key = (entry.credit.node, entry.credit.owner)
        credits, count = tally.get(key, (0, 0))
        tally[key] = (credits + entry.credit.amount, count + 1)
    return balances_from_rows((node, owner, c, n) for (node, owner), (c, n) in tally.items())
