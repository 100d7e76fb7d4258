"""How a ledger entry lies in a SQL row: the column list and the conversions both SQL backends share
(`ledger.sqlite` and `ledger.postgres` store the same columns, so they read and write rows alike).

A column that does not apply to a kind holds '' rather than NULL (see `ledger.sqlite`); a grant's
key is kept in `ref` and a clawback's reason in `memo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from .checkpoint import Checkpoint
from .entries import Charge, Clawback, Credit, Entry, Grant, LedgerRecord, Refund
from .errors import LedgerError

COLUMNS: Final = "seq, kind, account, amount, job, task, node, ref, result_digest, memo, created_at"
"""The columns of `ledger_entries`, in the order `entry_from_row` reads them."""

CHECKPOINT_COLUMNS: Final = "origin, size, root, timestamp_ms, signature"
"""The columns of `ledger_checkpoints`, in the order `checkpoint_from_row` reads them."""

NO_LIMIT: Final = 2**63 - 1
"""The largest seq (or size, or limit) SQLite's INTEGER and PostgreSQL's bigint hold."""


def clamp(seq: int) -> int:
    """`seq` within what the databases bind: a caller's huge or negative number would overflow a
    64-bit parameter (asyncpg refuses it), and means "all" or "none" anyway."""
    return max(-1, min(seq, NO_LIMIT))


def upto_or_all(upto: int | None) -> int:
    """The highest seq a read covers: `upto`, or every entry."""
    return NO_LIMIT if upto is None else clamp(upto)


def row_of(record: LedgerRecord) -> dict[str, object]:
    """The record as a row: every column of `COLUMNS` but seq, which the store assigns."""
    row: dict[str, object] = {"kind": record.kind, "account": record.account, "amount": record.amount,
                              "job": "", "task": "", "node": "", "ref": "", "result_digest": "", "memo": "",
                              "created_at": float(record.created_at)}
    if isinstance(record, Credit):
        row.update(job=record.job, task=record.task, node=record.node, ref=record.ref,
                   result_digest=record.result_digest)
    elif isinstance(record, Charge | Refund):
        row.update(job=record.job, task=record.task, ref=record.ref)
    elif isinstance(record, Clawback):
        row.update(job=record.job, task=record.task, node=record.node, ref=record.ref, memo=record.reason)
    else:
        row.update(ref=record.key, memo=record.memo)
    return row


def entry_from_row(row: Sequence[Any]) -> Entry:
    """The entry a row of `COLUMNS` holds. A row edited into something no record can be raises
    `InvalidEntry` (from the record's own checks) or `LedgerError` (an unknown kind)."""
    seq, kind, account, amount, job, task, node, ref, result_digest, memo, created_at = row
    record: LedgerRecord
    if kind == "credit":
        record = Credit(node=node, owner=account, job=job, task=task, amount=int(amount),
                        result_digest=result_digest, created_at=float(created_at), ref=ref)
    elif kind == "charge":
        record = Charge(account=account, job=job, task=task, amount=int(amount), created_at=float(created_at),
                        ref=ref)
    elif kind == "grant":
        record = Grant(account=account, amount=int(amount), key=ref, memo=memo, created_at=float(created_at))
    elif kind == "clawback":
        record = Clawback(account=account, node=node, job=job, task=task, amount=int(amount), reason=memo,
                          ref=ref, created_at=float(created_at))
    elif kind == "refund":
        record = Refund(account=account, job=job, task=task, amount=int(amount), ref=ref,
                        created_at=float(created_at))
    else:
        raise LedgerError(f"ledger entry seq {seq} has kind {kind!r}, which this version cannot read")
    return Entry(int(seq), record)


def checkpoint_from_row(row: Sequence[Any]) -> Checkpoint:
    """A stored checkpoint; one edited into something malformed raises `MalformedCheckpoint`."""
    origin, size, root, timestamp_ms, signature = row
    # As stored, unconverted: Checkpoint checks every field's type, so a hand-edited row is named.
    return Checkpoint(origin=origin, size=size, root=root, timestamp_ms=timestamp_ms, signature=signature)
