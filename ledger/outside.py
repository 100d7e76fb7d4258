"""Pure check of a ledger from outside the coordinator: what `sparecycles ledger verify` runs on
the documents it fetched, with the checkpoints it remembers and the receipts it is given.

Nothing here trusts the coordinator beyond its public key (pinned by the caller on first use):
- the newest checkpoint must be signed by that key, for that coordinator;
- every checkpoint seen before (remembered, or inside a receipt) must be a prefix of the newest
  (RFC 6962 consistency), so a log that was rewritten after someone looked at it is caught;
- the entries served, hashed leaf by leaf, must give the newest checkpoint's root, so an entry
  edited, removed, reordered or inserted in the database by hand is caught even though the rest of
  the documents (accepted results, balances) were edited to match;
- every receipt must prove its entry is in its checkpoint's tree, and must match the entry served
  at its position;
- then `ledger.verify.find_discrepancies` checks credits against accepted results (the cost model
  included, when the accepted rows carry it) and the balances against the entries.

Every problem is one sentence; `check` returns them all (the first is the most telling). The
entries are one consistent snapshot: all of them up to the checkpoint's size, fetched with
`upto=size` together with the accepted results and balances.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import msgpack

from .checkpoint import Checkpoint, CheckpointError, Receipt, check_history
from .entries import (
    LEAF_TAG_CHARGE,
    LEAF_TAG_CLAWBACK,
    LEAF_TAG_CREDIT,
    LEAF_TAG_GRANT,
    LEAF_TAG_REFUND,
    MAX_AMOUNT,
    MAX_MEMO,
    iso_time,
    record_from_json,
)
from .errors import InvalidEntry
from .merkle import EMPTY_ROOT
from .verify import (
    ChargeEntry,
    ClawbackEntry,
    CreditEntry,
    GrantEntry,
    ParsedEntry,
    RefundEntry,
    collector_paused,
    find_discrepancies,
    parse_entries,
)

PROGRESS_EVERY: Final = 1 << 16
"""Entries hashed between two progress calls: a few per second on a large ledger."""

Progress = Callable[[int, int], None]
"""(entries hashed so far, entries in all)."""

_sha256 = hashlib.sha256


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """Everything one `ledger verify` run holds. `entries` are the entry documents with seq
    1..checkpoint.size; `accepted` and `balances` were fetched with upto=checkpoint.size.
    `consistency[m]` is the coordinator's consistency proof from size m to checkpoint.size, for
    every size m of a remembered checkpoint or a receipt's checkpoint (`sizes_to_prove`)."""

    checkpoint: Checkpoint
    public_key: bytes
    entries: Sequence[Mapping[str, Any]]
    accepted: Sequence[Mapping[str, Any]]
    balances: Mapping[str, Any]
    remembered: Sequence[Checkpoint] = ()
    consistency: Mapping[int, Sequence[bytes]] = field(default_factory=dict)
    receipts: Sequence[Receipt] = ()


def sizes_to_prove(remembered: Iterable[Checkpoint], receipts: Iterable[Receipt], newest: Checkpoint) -> list[int]:
    """The old sizes whose consistency proof to `newest.size` the caller must fetch."""
    sizes = {c.size for c in remembered} | {r.checkpoint.size for r in receipts}
    return sorted(s for s in sizes if 0 < s < newest.size)


def check(evidence: Evidence, *, progress: Progress | None = None) -> list[str]:
    """Every problem found, one sentence each; [] when the ledger verifies."""
    newest, key = evidence.checkpoint, evidence.public_key
    try:
        newest.verify(key)
    except CheckpointError as exc:
        # Nothing else can be judged against a head the coordinator did not sign.
        return [f"the newest checkpoint is not the coordinator's: {exc}"]
    problems: list[str] = []
    remembered = list(dict.fromkeys(evidence.remembered))
    _check_history(remembered, newest, evidence.consistency, key, problems)
    receipts = _check_receipts(evidence.receipts, newest, evidence.consistency, key, problems)
    # Only checkpoints signed by the key can say where the log changed; a forged one says nothing.
    seen = [c for c in remembered if _signed(c, key)] + [r.checkpoint for r in receipts]

    with collector_paused():
        # Parsed once, for the leaves and for find_discrepancies both.
        items = parse_entries(evidence.entries)
        leaves = _leaf_hashes(evidence.entries, items, newest.size, problems, progress)
        _check_tree(leaves, newest, seen, problems)
        _check_receipt_entries(receipts, leaves, problems)
        problems.extend(find_discrepancies(evidence.entries, evidence.accepted, evidence.balances, parsed=items))
    return problems


def _signed(checkpoint: Checkpoint, key: bytes) -> bool:
    try:
        checkpoint.verify(key)
    except CheckpointError:
        return False
    return True


def _check_history(remembered: Sequence[Checkpoint], newest: Checkpoint, proofs: Mapping[int, Sequence[bytes]],
                   key: bytes, problems: list[str]) -> None:
    """Each remembered checkpoint checked alone, so that every one at fault is named."""
    for old in remembered:
        try:
            check_history([old], newest, proofs, key)
        except CheckpointError as exc:
            problems.append(f"a checkpoint seen before does not agree with the newest: {exc}")


def _check_receipts(receipts: Sequence[Receipt], newest: Checkpoint, proofs: Mapping[int, Sequence[bytes]],
                    key: bytes, problems: list[str]) -> list[Receipt]:
    """Receipts whose inclusion proof verifies and whose checkpoint the newest extends."""
    good: list[Receipt] = []
    for receipt in receipts:
        where = f"receipt for seq {receipt.index + 1} (checkpoint of size {receipt.checkpoint.size})"
        try:
            receipt.verify(key)
            check_history([receipt.checkpoint], newest, proofs, key)
        except CheckpointError as exc:
            problems.append(f"{where}: {exc}")
        else:
            good.append(receipt)
    return good


def _leaf_hashes(entries: Sequence[Mapping[str, Any]], items: Sequence[ParsedEntry | str], size: int,
                 problems: list[str], progress: Progress | None) -> list[bytes]:
    """The leaf hash of each entry, in order. A malformed entry gets a hash no entry has, so that
    the others keep their positions and can still be compared with checkpoints seen before.
    `items` are the entries as `parse_entries` read them."""
    if len(entries) != size:
        problems.append(f"the coordinator served {len(entries)} entries for a checkpoint of {size}: "
                        f"entries were removed or added behind the checkpoint")
    hashes: list[bytes] = []
    append = hashes.append
    leaf = _Leaves()
    out_of_place = False
    for index, (raw, item) in enumerate(zip(entries, items, strict=True)):
        if progress is not None and index and not index % PROGRESS_EVERY:
            progress(index, len(entries))
        data = leaf.fast(raw, item)
        if data is None:
            try:
                data = record_from_json(raw).leaf_bytes()
            except InvalidEntry as exc:
                problems.append(f"entry #{index + 1} cannot be hashed: {exc}")
                append(_UNHASHABLE)
                continue
        seq = raw.get("seq")
        if not out_of_place and (seq != index + 1 or isinstance(seq, bool)):
            problems.append(f"entry #{index + 1} has seq {seq!r:.40}: the served entries are not seq 1..{size} "
                            f"in order")
            out_of_place = True  # one sentence: find_discrepancies names every gap and repeat
        append(_sha256(b"\x00" + data).digest())
    if progress is not None:
        progress(len(entries), len(entries))
    return hashes


def _keys(*names: str) -> frozenset[str]:
    return frozenset({"kind", "seq", "created_at", "created_at_iso", *names})


_CREDIT_KEYS: Final = _keys("node", "owner", "job", "task", "amount", "result_digest")
_CREDIT_KEYS_REF: Final = _CREDIT_KEYS | {"ref"}
_CHARGE_KEYS: Final = _keys("account", "job", "task", "amount")
_CHARGE_KEYS_REF: Final = _CHARGE_KEYS | {"ref"}
_GRANT_KEYS: Final = _keys("account", "amount", "key", "memo")
_CLAWBACK_KEYS: Final = _keys("account", "node", "job", "task", "amount", "reason", "ref")
_REFUND_KEYS: Final = _keys("account", "job", "task", "amount", "ref")


class _Leaves:
    """Leaf bytes of an entry exactly as the coordinator serves it, without building its record.

    `record_from_json(raw).leaf_bytes()` builds a frozen record, runs its checks and formats its
    time: about three quarters of hashing a ledger. For an entry `parse_entries` read well (its
    names non-empty strings, its seq and amount exact ints) and that has exactly its kind's
    fields, seq and created_at_iso, the rest of what `record_from_json` checks is checked here
    (amount in range, created_at a finite float, memo or reason short enough, created_at_iso
    agreeing) and the bytes are packed as the record's `leaf_bytes` packs them. Anything else
    returns None, and the caller asks `record_from_json`, which says what is wrong.
    tests/unit/test_ledger_outside.py holds the two to the same bytes for every kind."""

    __slots__ = ("_last_iso", "_last_time", "_pack", "_prefixes")

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True).pack  # as entries._pack, without a Packer per leaf
        self._last_time = math.nan  # equal to nothing
        self._last_iso = ""
        self._prefixes: dict[int, str] = {}  # epoch second -> its ISO 8601 form up to the seconds

    def fast(self, raw: Mapping[str, Any], item: ParsedEntry | str) -> bytes | None:
        if type(raw) is not dict:
            return None
        keys = raw.keys()
        amount = raw.get("amount")
        if type(amount) is not int or not 0 < amount <= MAX_AMOUNT:
            return None
        if isinstance(item, CreditEntry):
            if keys != (_CREDIT_KEYS_REF if "ref" in raw else _CREDIT_KEYS) or not item.result_digest:
                return None
            fields: list[object] = [LEAF_TAG_CREDIT, item.node, item.owner, item.job, item.task, amount,
                                    item.result_digest]
            tail = [item.ref] if item.ref else []
        elif isinstance(item, ChargeEntry):
            if keys != (_CHARGE_KEYS_REF if "ref" in raw else _CHARGE_KEYS):
                return None
            fields, tail = [LEAF_TAG_CHARGE, item.account, item.job, item.task, amount], [item.ref] if item.ref else []
        elif isinstance(item, GrantEntry):
            memo = raw.get("memo")
            if keys != _GRANT_KEYS or type(memo) is not str or len(memo) > MAX_MEMO:
                return None
            fields, tail = [LEAF_TAG_GRANT, item.account, amount, item.key, memo], []
        elif isinstance(item, ClawbackEntry):
            reason = raw.get("reason")
            if keys != _CLAWBACK_KEYS or type(reason) is not str or len(reason) > MAX_MEMO:
                return None
            fields, tail = [LEAF_TAG_CLAWBACK, item.account, item.node, item.job, item.task, amount, reason,
                            item.ref], []
        elif isinstance(item, RefundEntry):
            if keys != _REFUND_KEYS:
                return None
            fields, tail = [LEAF_TAG_REFUND, item.account, item.job, item.task, amount, item.ref], []
        else:
            return None
        created_at = raw["created_at"]
        if type(created_at) is not float or not self._iso_agrees(created_at, raw["created_at_iso"]):
            return None
        fields.append(created_at)
        packed: bytes = self._pack(fields + tail)
        return packed

    def _iso_agrees(self, created_at: float, iso: object) -> bool:
        """`iso == iso_time(created_at)` for a finite float, formatting a time only once per
        second: entries written together share their time, or at least its second."""
        if created_at == self._last_time:
            return iso == self._last_iso
        if not math.isfinite(created_at):
            return False
        try:
            since = timedelta(seconds=created_at)  # rounded to the microsecond as iso_time rounds it
        except OverflowError:
            return False
        second = since.days * 86400 + since.seconds
        prefix = self._prefixes.get(second)
        if prefix is None:
            full = iso_time(created_at)
            if full is None:
                return False
            if len(self._prefixes) >= 4096:
                self._prefixes.clear()
            prefix = self._prefixes[second] = full[:19]  # YYYY-MM-DDTHH:MM:SS
        self._last_time, self._last_iso = created_at, f"{prefix}.{since.microseconds // 1000:03d}Z"
        return iso == self._last_iso


_UNHASHABLE: Final = b"\xff" * 32


def _check_tree(leaves: Sequence[bytes], newest: Checkpoint, seen: Sequence[Checkpoint],
                problems: list[str]) -> None:
    """The served entries against the newest root and against every checkpoint seen before."""
    sizes = {c.size for c in seen if 0 < c.size <= len(leaves)} | {len(leaves)}
    roots = prefix_roots(leaves, sorted(sizes))
    if len(leaves) != newest.size:
        where = _where_first(roots, seen)
        if where:
            problems.append(f"compared with the checkpoints seen before{where}")
        return
    if roots[newest.size] != newest.root:
        problems.append(f"the {newest.size} entries served do not hash to the root the coordinator signed "
                        f"at {newest.time_iso()}: an entry was edited, removed, reordered or inserted in its "
                        f"database{_where_first(roots, [*seen, newest])}")
        return
    # The newest root matches the entries: a seen checkpoint whose prefix differs was reported by
    # the history check; say here from which seq on the log was rewritten.
    if any(c.size in roots and roots[c.size] != c.root for c in seen):
        problems.append(f"the ledger was rewritten after a checkpoint seen before, and signed again"
                        f"{_where_first(roots, seen)}")


def _where_first(roots: Mapping[int, bytes], seen: Iterable[Checkpoint]) -> str:
    """Between which seqs the first change lies, from the seen checkpoints the prefix matches and
    the first it does not."""
    by_size = sorted({c.size: c for c in seen if c.size in roots}.items())
    if not by_size:
        return ""
    last_good = 0
    for size, cp in by_size:
        if roots[size] == cp.root:
            last_good = size
        else:
            first = last_good + 1
            span = f"seq {first}" if first == size else f"seq {first}..{size}"
            agrees = f" (seq 1..{last_good} still match a checkpoint you saw)" if last_good else ""
            return f"; the first change is in {span}{agrees}"
    return f"; seq 1..{last_good} still match the checkpoint of size {last_good} you saw, so the change is after it"


def _check_receipt_entries(receipts: Sequence[Receipt], leaves: Sequence[bytes], problems: list[str]) -> None:
    """A receipt's entry is the entry served at its seq; otherwise say where it went."""
    position: dict[bytes, int] | None = None
    for receipt in receipts:
        seq = receipt.index + 1
        mine = _sha256(b"\x00" + receipt.entry).digest()
        if receipt.index < len(leaves) and leaves[receipt.index] == mine:
            continue
        if position is None:
            position = {h: i for i, h in enumerate(leaves)}
        now = position.get(mine)
        if now is None:
            problems.append(f"seq {seq}: the entry your receipt holds is no longer served: it was edited or removed")
        else:
            problems.append(f"seq {seq}: the entry your receipt holds is now served at seq {now + 1}: entries "
                            f"were removed, inserted or reordered before it")


def prefix_roots(leaves: Sequence[bytes], sizes: Sequence[int]) -> dict[int, bytes]:
    """The tree head of the first `size` leaves for each of `sizes`, in one pass (RFC 9162 MTH)."""
    wanted = sorted(set(sizes))
    out: dict[int, bytes] = {0: EMPTY_ROOT} if 0 in wanted else {}
    stack: list[bytes] = []
    nxt = bisect.bisect_right(wanted, 0)
    for count, h in enumerate(leaves):
        c = count
        while c & 1:
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            c >>= 1
        stack.append(h)
        while nxt < len(wanted) and wanted[nxt] == count + 1:
            r = stack[-1]
            for left in reversed(stack[:-1]):
                r = _sha256(b"\x01" + left + r).digest()
            out[count + 1] = r
            nxt += 1
    return out
