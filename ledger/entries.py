"""Ledger values: the typed records of one double-entry log, their numbered entries, and balances
summed over entries.

Every record has a `kind` and a positive `amount`; the kind gives the sign for its account:
- `credit`: paid to the owner account of a node whose result was accepted (+);
- `charge`: paid by the submitter account for one verified task, equal to that task's credits (-);
- `grant`: an operator's grant, the only source of new credit (+);
- `clawback`: a credit taken back from its owner account when the result it paid for is no longer
  believed (its node was caught returning wrong results, and the task is reopened) (-);
- `refund`: a charge given back to the submitter of such a reopened task (+).
Credit moves from submitters to contributors and is never made by running jobs, so the sum of all
account balances equals the sum of grants (DESIGN.md §12: "Credit is conserved"). History is never
edited: a reopened task's credits and charge stay in the log, and a clawback per credit and a
refund for the charge reverse them, so a reopen moves credit back and makes none.

Fields issue 8 added (`ref` of credits and charges, `clawed_back` and `refunded` of an account's
row) appear in leaves and JSON only when they are not empty or zero: the entries and documents of a
ledger written before it read, and hash, exactly as they did.

Frozen and validated when built (after h11's events), so a broken record never reaches a store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

import msgpack

from .errors import InvalidEntry

MAX_AMOUNT: Final = 2**63 - 1
"""The largest amount SQLite's INTEGER and PostgreSQL's bigint can hold."""

MAX_MEMO: Final = 1_000
"""Characters in a grant's memo: a note for people, not a place to store documents."""

LEAF_TAG_CREDIT: Final = "credit"
"""First element of a credit's leaf: every kind is a leaf of the same Merkle tree (issue 11), and
the tag keeps one kind's bytes from ever reading as another's."""
LEAF_TAG_CHARGE: Final = "charge"
LEAF_TAG_GRANT: Final = "grant"
LEAF_TAG_CLAWBACK: Final = "clawback"
LEAF_TAG_REFUND: Final = "refund"

SIGNS: Final[Mapping[str, int]] = {LEAF_TAG_GRANT: 1, LEAF_TAG_CREDIT: 1, LEAF_TAG_CHARGE: -1,
                                   LEAF_TAG_CLAWBACK: -1, LEAF_TAG_REFUND: 1}
"""What an entry of each kind does to its account's balance."""

UniqueKey = tuple[str, str, str, str]
"""(kind, task, node, ref) with "" where a part does not apply: the exactly-once key every backend
enforces (SQLite: one UNIQUE constraint over these four columns)."""


def _check_name(kind: str, name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidEntry(f"{kind} field {name!r} must be a non-empty string, got {value!r}")


def _check_amount(kind: str, amount: object, where: str) -> None:
    # bool is an int in Python; True must not pass for one credit.
    if not isinstance(amount, int) or isinstance(amount, bool) or not 0 < amount <= MAX_AMOUNT:
        raise InvalidEntry(f"{kind} amount must be an int in 1..2**63-1, got {amount!r} ({where})")


def _check_ref(kind: str, ref: object) -> None:
    if not isinstance(ref, str):
        raise InvalidEntry(f"{kind} ref must be a string, got {ref!r}")


def _check_time(kind: str, created_at: object) -> None:
    try:
        finite = not isinstance(created_at, bool) and isinstance(created_at, int | float) \
            and math.isfinite(created_at)
    except OverflowError:  # an integer beyond any float (math.isfinite converts it first)
        finite = False
    if not finite:
        raise InvalidEntry(f"{kind} created_at must be a finite number, got {created_at!r:.40}")


def _pack(fields: list[object]) -> bytes:
    """Canonical msgpack: a fixed-order array, never a map (map order is the encoder's choice)."""
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit:
    """One accepted (task, node) result paid for, to the node's owner account (`owner`, a name).
    `amount` comes from the coordinator's own cost model (`ledger.credit`), never from anything the
    node reported. `created_at` is wall-clock seconds: the ledger is read by other processes and
    machines.

    `ref` is the lease whose result is paid for ("" in credits written before issue 8). It is part
    of the exactly-once key, so that a node whose credit for a task was clawed back can be credited
    for the same task again when a new lease of it is accepted, while a replayed verdict (same
    lease) still adds nothing."""

    kind: ClassVar[str] = LEAF_TAG_CREDIT

    node: str
    owner: str
    job: str
    task: str
    amount: int
    result_digest: str
    created_at: float
    ref: str = ""

    def __post_init__(self) -> None:
        for name in ("node", "owner", "job", "task", "result_digest"):
            _check_name("credit", name, getattr(self, name))
        _check_amount("credit", self.amount, f"task {self.task}, node {self.node}")
        _check_time("credit", self.created_at)
        _check_ref("credit", self.ref)

    @property
    def account(self) -> str:
        """The account paid: the node's owner."""
        return self.owner

    @property
    def key(self) -> tuple[str, str, str]:
        """The exactly-once key: a (task, node) pair is credited at most once per accepted lease."""
        return (self.task, self.node, self.ref)

    @property
    def unique_key(self) -> UniqueKey:
        return (self.kind, self.task, self.node, self.ref)

    def leaf_bytes(self) -> bytes:
        """Tag first, then the fields in a fixed order; `created_at` always a float64 so `5` and
        `5.0` hash alike. The entry's seq is left out: a leaf's position in the tree already says it.
        `ref` comes last and only when set (see the module docstring)."""
        return _pack([LEAF_TAG_CREDIT, self.node, self.owner, self.job, self.task, self.amount,
                      self.result_digest, float(self.created_at), *_optional(self.ref)])

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "node": self.node, "owner": self.owner, "job": self.job,
                "task": self.task, "amount": self.amount, "result_digest": self.result_digest,
                "created_at": float(self.created_at), **({"ref": self.ref} if self.ref else {})}


@dataclass(frozen=True, slots=True, kw_only=True)
class Charge:
    """What the submitter `account` pays for one verified task: the sum of that task's credits,
    written in the same transaction as they are (build it with `charge_for`).

    `ref` tells one verdict's charge from the next after a refund: `charge_for` sets it to the
    `ref` of the verdict's first credit (the canonical result's lease), "" before issue 8."""

    kind: ClassVar[str] = LEAF_TAG_CHARGE

    account: str
    job: str
    task: str
    amount: int
    created_at: float
    ref: str = ""

    def __post_init__(self) -> None:
        for name in ("account", "job", "task"):
            _check_name("charge", name, getattr(self, name))
        _check_amount("charge", self.amount, f"task {self.task}, account {self.account}")
        _check_time("charge", self.created_at)
        _check_ref("charge", self.ref)

    @property
    def unique_key(self) -> UniqueKey:
        return (self.kind, self.task, "", self.ref)  # a task is paid for once per verdict

    def leaf_bytes(self) -> bytes:
        return _pack([LEAF_TAG_CHARGE, self.account, self.job, self.task, self.amount,
                      float(self.created_at), *_optional(self.ref)])

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "account": self.account, "job": self.job, "task": self.task,
                "amount": self.amount, "created_at": float(self.created_at),
                **({"ref": self.ref} if self.ref else {})}


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """New credit for `account`: an operator's grant, or the open coordinator's starting grant.
    `key` is the caller's exactly-once key ("start:<account id>" for a starting grant, a uuid for
    an operator's): granting under a key already used adds nothing, so a retried request cannot
    grant twice."""

    kind: ClassVar[str] = LEAF_TAG_GRANT

    account: str
    amount: int
    key: str
    memo: str
    created_at: float

    def __post_init__(self) -> None:
        _check_name("grant", "account", self.account)
        _check_name("grant", "key", self.key)
        if not isinstance(self.memo, str) or len(self.memo) > MAX_MEMO:
            raise InvalidEntry(f"grant memo must be a string of at most {MAX_MEMO} characters")
        _check_amount("grant", self.amount, f"key {self.key}, account {self.account}")
        _check_time("grant", self.created_at)

    @property
    def unique_key(self) -> UniqueKey:
        return (self.kind, "", "", self.key)

    def leaf_bytes(self) -> bytes:
        return _pack([LEAF_TAG_GRANT, self.account, self.amount, self.key, self.memo,
                      float(self.created_at)])

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "account": self.account, "amount": self.amount, "key": self.key,
                "memo": self.memo, "created_at": float(self.created_at)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Clawback:
    """A credit taken back from `account` (the credited owner) because the task it paid for was
    reopened: the result accepted under lease `ref` is no longer believed (`reason` says why).
    One per credit the task had paid, for the same node, job, task and amount; exactly once per
    (task, node, ref)."""

    kind: ClassVar[str] = LEAF_TAG_CLAWBACK

    account: str
    node: str
    job: str
    task: str
    amount: int
    reason: str
    ref: str
    created_at: float

    def __post_init__(self) -> None:
        for name in ("account", "node", "job", "task", "ref"):
            _check_name("clawback", name, getattr(self, name))
        if not isinstance(self.reason, str) or len(self.reason) > MAX_MEMO:
            raise InvalidEntry(f"clawback reason must be a string of at most {MAX_MEMO} characters")
        _check_amount("clawback", self.amount, f"task {self.task}, node {self.node}")
        _check_time("clawback", self.created_at)

    @property
    def unique_key(self) -> UniqueKey:
        return (self.kind, self.task, self.node, self.ref)

    def leaf_bytes(self) -> bytes:
        return _pack([LEAF_TAG_CLAWBACK, self.account, self.node, self.job, self.task, self.amount,
                      self.reason, self.ref, float(self.created_at)])

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "account": self.account, "node": self.node, "job": self.job,
                "task": self.task, "amount": self.amount, "reason": self.reason, "ref": self.ref,
                "created_at": float(self.created_at)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Refund:
    """A charge given back to the submitter `account` because the task it paid for was reopened
    (the result accepted under lease `ref` is no longer believed). Exactly once per (task, ref);
    the task is charged again, under a new `ref`, when it is verified again."""

    kind: ClassVar[str] = LEAF_TAG_REFUND

    account: str
    job: str
    task: str
    amount: int
    ref: str
    created_at: float

    def __post_init__(self) -> None:
        for name in ("account", "job", "task", "ref"):
            _check_name("refund", name, getattr(self, name))
        _check_amount("refund", self.amount, f"task {self.task}, account {self.account}")
        _check_time("refund", self.created_at)

    @property
    def unique_key(self) -> UniqueKey:
        return (self.kind, self.task, "", self.ref)

    def leaf_bytes(self) -> bytes:
        return _pack([LEAF_TAG_REFUND, self.account, self.job, self.task, self.amount, self.ref,
                      float(self.created_at)])

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "account": self.account, "job": self.job, "task": self.task,
                "amount": self.amount, "ref": self.ref, "created_at": float(self.created_at)}


LedgerRecord = Credit | Charge | Grant | Clawback | Refund
"""Anything a ledger store appends."""


def _optional(ref: str) -> list[str]:
    return [ref] if ref else []


def charge_for(credits: Iterable[Credit], *, account: str, created_at: float) -> Charge:
    """The charge that pays for one task's credits, under the `ref` of the first of them (the
    canonical result's lease). Raises `InvalidEntry` for credits of several tasks or none: a charge
    pays for exactly one task."""
    paid = list(credits)
    tasks = {(c.job, c.task) for c in paid}
    if len(tasks) != 1:
        raise InvalidEntry(f"a charge pays for the credits of exactly one task, got {sorted(tasks)}")
    ((job, task),) = tasks
    return Charge(account=account, job=job, task=task, amount=sum(c.amount for c in paid),
                  created_at=created_at, ref=paid[0].ref)


def reversal_of(credits: Iterable[Credit], charge: Charge | None, *, bad_lease: str, reason: str,
                created_at: float) -> list[LedgerRecord]:
    """What reopening a task writes: a clawback for each of its credits and a refund of its charge
    (if it had one), all under `bad_lease`, the lease whose result is no longer believed."""
    out: list[LedgerRecord] = [
        Clawback(account=c.owner, node=c.node, job=c.job, task=c.task, amount=c.amount, reason=reason,
                 ref=bad_lease, created_at=created_at)
        for c in credits]
    if charge is not None:
        out.append(Refund(account=charge.account, job=charge.job, task=charge.task, amount=charge.amount,
                          ref=bad_lease, created_at=created_at))
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    """A record at its place in the log: `seq` counts from 1 without gaps, over every kind."""

    seq: int
    record: LedgerRecord

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def account(self) -> str:
        return self.record.account

    @property
    def amount(self) -> int:
        return self.record.amount

    @property
    def delta(self) -> int:
        """What this entry does to its account's balance."""
        return SIGNS[self.record.kind] * self.record.amount

    def to_json(self) -> dict[str, object]:
        """The record's fields, its seq, and `created_at_iso` for people (`iso_time`); the leaf is
        built from `created_at`, and `entry_from_json` checks that the two agree."""
        return {"seq": self.seq, **self.record.to_json(), "created_at_iso": iso_time(self.record.created_at)}


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def iso_time(seconds: float) -> str | None:
    """Wall-clock seconds as ISO 8601 in UTC to the millisecond (truncated), e.g.
    `2023-11-14T22:13:20.123Z`; None for a time outside years 1-9999, which ISO 8601's usual form
    cannot write (a record may hold any finite time)."""
    try:
        # Epoch plus a timedelta rather than fromtimestamp: the same answer on every platform,
        # before 1970 too.
        t = _EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        return None
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- reading served JSON back -----------------------------------------------------------------

_FIELDS: Final[Mapping[str, tuple[frozenset[str], frozenset[str]]]] = {
    # kind -> (required fields, optional fields), the keys `to_json` writes besides "kind"
    LEAF_TAG_CREDIT: (frozenset({"node", "owner", "job", "task", "amount", "result_digest", "created_at"}),
                      frozenset({"ref"})),
    LEAF_TAG_CHARGE: (frozenset({"account", "job", "task", "amount", "created_at"}), frozenset({"ref"})),
    LEAF_TAG_GRANT: (frozenset({"account", "amount", "key", "memo", "created_at"}), frozenset()),
    LEAF_TAG_CLAWBACK: (frozenset({"account", "node", "job", "task", "amount", "reason", "ref", "created_at"}),
                        frozenset()),
    LEAF_TAG_REFUND: (frozenset({"account", "job", "task", "amount", "ref", "created_at"}), frozenset()),
}
_ENTRY_KEYS: Final = frozenset({"seq", "created_at_iso"})
_RECORDS: Final[Mapping[str, type[LedgerRecord]]] = {
    LEAF_TAG_CREDIT: Credit, LEAF_TAG_CHARGE: Charge, LEAF_TAG_GRANT: Grant, LEAF_TAG_CLAWBACK: Clawback,
    LEAF_TAG_REFUND: Refund}


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidEntry(f"a ledger entry is a JSON object, got {type(value).__name__}")
    return value


def record_from_json(value: object) -> LedgerRecord:
    """The record an entry's (or a record's) JSON describes, strictly: the fields of its kind and
    no others (`seq` and `created_at_iso` of an entry are allowed, and the latter must agree with
    `created_at`), each of the type and range the record's own checks demand. Raises `InvalidEntry`
    with a sentence naming the fault otherwise.

    For a verifier rebuilding the leaf bytes from what a coordinator served:
    `record_from_json(entry.to_json()).leaf_bytes() == entry.record.leaf_bytes()` for every kind."""
    value = _json_object(value)
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise InvalidEntry(f"ledger entry kind must be one of {sorted(_FIELDS)}, got {kind!r:.40}")
    required, optional = _FIELDS[kind]
    keys = set(value) - {"kind"}
    missing, extra = required - keys, keys - required - optional - _ENTRY_KEYS
    if missing or extra:
        raise InvalidEntry(f"a {kind} entry has the fields {sorted(required | optional)}: "
                           + "; ".join(part for part in (f"missing {sorted(missing)}" if missing else "",
                                                         f"unknown {sorted(map(str, extra))}" if extra else "")
                                       if part))
    fields: dict[str, Any] = {k: value[k] for k in required | optional if k in value}
    # The record's checks take an int or a float for a time; JSON's number types carry no other.
    record = _RECORDS[kind](**fields)
    if "created_at_iso" in value and value["created_at_iso"] != iso_time(record.created_at):
        raise InvalidEntry(f"{kind} created_at_iso {value['created_at_iso']!r:.40} does not match its "
                           f"created_at {record.created_at!r}")
    return record


def entry_from_json(value: object) -> Entry:
    """An `Entry` from its JSON (`Entry.to_json`), strictly as `record_from_json`, with its `seq` a
    positive integer."""
    value = _json_object(value)
    record = record_from_json(value)
    seq = value.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= MAX_AMOUNT:
        raise InvalidEntry(f"ledger entry seq must be an integer in 1..2**63-1, got {seq!r:.40}")
    return Entry(seq, record)


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
class AccountBalance:
    """One account's side of the double entry. `balance` may be below zero only if charges were
    written without a reservation (the coordinator reserves a job's cost before accepting it), or if
    credits were clawed back after their owner had spent them.

    `earned` and `spent` are gross: every credit and charge ever written. `clawed_back` and
    `refunded` are what reopened tasks reversed of them; the JSON names them only when not zero."""

    account: str
    granted: int
    earned: int
    spent: int
    clawed_back: int = 0
    refunded: int = 0

    @property
    def balance(self) -> int:
        return self.granted + self.earned - self.spent - self.clawed_back + self.refunded

    def to_json(self) -> dict[str, object]:
        reversed_ = {"clawed_back": self.clawed_back, "refunded": self.refunded} \
            if self.clawed_back or self.refunded else {}
        return {"account": self.account, "granted": self.granted, "earned": self.earned,
                "spent": self.spent, **reversed_, "balance": self.balance}


@dataclass(frozen=True, slots=True)
class Balances:
    """Sums over the whole log.

    `nodes`, `owners`, `total_credits` and `entries` are the contributors' view: credits net of
    clawbacks. A row's `credits` is the sum of its credit entries minus the sum of its clawbacks,
    and its `entries` the number of credit entries minus the number of clawbacks, that is the
    credits that still stand; a node whose every credit was clawed back keeps a row of 0 and 0.
    Charges, refunds and grants are not in this view. A node is listed once per owner it earned
    under: the owner is what a node claims in its requests, and folding two claims into one row
    would hide a change of owner.
    `accounts` is the double entry, one row per account with any entry; the sum of their balances
    is `total_granted` whenever every credited task was charged.
    """

    nodes: tuple[NodeBalance, ...]
    owners: tuple[OwnerBalance, ...]
    total_credits: int
    entries: int
    accounts: tuple[AccountBalance, ...] = ()
    total_granted: int = 0

    def to_json(self) -> dict[str, object]:
        return {"nodes": [n.to_json() for n in self.nodes], "owners": [o.to_json() for o in self.owners],
                "total_credits": self.total_credits, "entries": self.entries,
                "accounts": [a.to_json() for a in self.accounts], "total_granted": self.total_granted}


def account_row(account: str, sums: Mapping[str, int]) -> AccountBalance:
    """An account's row from its per-kind sums of amounts."""
    return AccountBalance(account, granted=sums.get(LEAF_TAG_GRANT, 0), earned=sums.get(LEAF_TAG_CREDIT, 0),
                          spent=sums.get(LEAF_TAG_CHARGE, 0), clawed_back=sums.get(LEAF_TAG_CLAWBACK, 0),
                          refunded=sums.get(LEAF_TAG_REFUND, 0))


def account_of(account: str, entries: Iterable[Entry]) -> AccountBalance:
    """`account`'s row summed over `entries` (e.g. its history); entries of others are skipped."""
    sums: dict[str, int] = {}
    for entry in entries:
        if entry.account == account:
            sums[entry.kind] = sums.get(entry.kind, 0) + entry.amount
    return account_row(account, sums)


def balances_from_rows(node_rows: Iterable[tuple[str, str, int, int]],
                       account_rows: Iterable[tuple[str, str, int]] = ()) -> Balances:
    """Build `Balances` from (node, owner, credits, entries) rows, one per (node, owner) pair of the
    credit entries, net of clawbacks (see `Balances`), and (account, kind, amount) rows, one per
    (account, kind) of all entries.

    Every backend funnels through here so that sorting (amounts descending, then name) and the
    owner and total sums cannot drift apart between them.
    """
    nodes: list[NodeBalance] = []
    owners: dict[str, tuple[int, int]] = {}
    for node, owner, credits, count in node_rows:
        nodes.append(NodeBalance(node, owner, credits, count))
        have_credits, have_count = owners.get(owner, (0, 0))
        owners[owner] = (have_credits + credits, have_count + count)
    nodes.sort(key=lambda b: (-b.credits, b.node, b.owner))
    owner_rows = sorted((OwnerBalance(o, c, n) for o, (c, n) in owners.items()),
                        key=lambda b: (-b.credits, b.owner))
    sums: dict[str, dict[str, int]] = {}
    for account, kind, amount in account_rows:
        by_kind = sums.setdefault(account, {})
        by_kind[kind] = by_kind.get(kind, 0) + amount
    accounts = sorted((account_row(a, s) for a, s in sums.items()), key=lambda b: (-b.balance, b.account))
    return Balances(nodes=tuple(nodes), owners=tuple(owner_rows),
                    total_credits=sum(b.credits for b in nodes), entries=sum(b.entries for b in nodes),
                    accounts=tuple(accounts), total_granted=sum(a.granted for a in accounts))


def balances_of(entries: Iterable[Entry]) -> Balances:
    """Balances of a list of entries, as `LedgerStore.balances()` reports them."""
    tally: dict[tuple[str, str], tuple[int, int]] = {}
    account_rows: list[tuple[str, str, int]] = []
    for entry in entries:
        record = entry.record
        account_rows.append((record.account, record.kind, record.amount))
        if isinstance(record, Credit | Clawback):
            key = (record.node, record.account)
            credits, count = tally.get(key, (0, 0))
            sign = SIGNS[record.kind]
            tally[key] = (credits + sign * record.amount, count + sign)
    return balances_from_rows(((node, owner, c, n) for (node, owner), (c, n) in tally.items()), account_rows)
