"""The coordinator's notary (ledger/notary.py): the ledger's tree fed entries in seq order, signed
checkpoints, proofs and receipts.

The attacker is whoever can write the coordinator's database (or a bug in a store): they drop,
repeat, change or insert entries and hope the tree, or a checkpoint signed before, does not notice.
Each test names what it defends against."""

from __future__ import annotations

import dataclasses
import tracemalloc

import pytest

from ledger.checkpoint import Checkpoint, ForgedCheckpoint, InconsistentLog, check_history, sign_checkpoint
from ledger.entries import Charge, Credit, Entry, Grant
from ledger.merkle import InvalidProof, leaf_hash, root_of, verify_consistency, verify_inclusion
from ledger.notary import LedgerMismatch, Notary, NotaryError
from protocol.signing import Identity

COORDINATOR = Identity.generate()
OTHER = Identity.generate()
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00.000Z


def credit(i: int, amount: int | None = None) -> Credit:
    return Credit(node=f"node{i % 3}", owner="alice", job="j1", task=f"t{i}", amount=amount or 100 + i,
                  result_digest="ab" * 32, created_at=1_767_225_600.0 + i, ref=f"lease{i}")


def entries(n: int, start: int = 1) -> list[Entry]:
    out: list[Entry] = []
    for seq in range(start, start + n):
        record = credit(seq) if seq % 5 else (
            Grant(account="dave", amount=10**6, key=f"g{seq}", memo="", created_at=1.0) if seq % 2
            else Charge(account="dave", job="j1", task=f"t{seq}", amount=seq, created_at=2.0))
        out.append(Entry(seq, record))
    return out


def notary_with(n: int, identity: Identity = COORDINATOR) -> Notary:
    notary = Notary(identity)
    notary.absorb(entries(n))
    return notary


def test_the_tree_is_the_leaf_hashes_of_the_entries_in_seq_order() -> None:
    log = entries(37)
    notary = notary_with(37)
    assert notary.size == 37
    assert notary.root() == root_of(leaf_hash(e.record.leaf_bytes()) for e in log)
    assert notary.leaf_hash_at(5) == leaf_hash(log[4].record.leaf_bytes())


def test_a_gap_is_refused_and_nothing_of_the_batch_is_absorbed() -> None:
    """Attack: an entry deleted from the database; the tree must not close over the hole."""
    notary = notary_with(4)
    batch = entries(3, start=5)
    del batch[1]  # seq 6 missing
    with pytest.raises(NotaryError, match="jump from seq 5 to 7: seq 6 is missing") as caught:
        notary.absorb(batch)
    assert (caught.value.expected, caught.value.got) == (6, 7)
    assert notary.size == 4  # all or none: seq 5 was not taken either
    with pytest.raises(NotaryError, match="seq 5 is missing"):
        notary.absorb(entries(1, start=6))


def test_a_repeat_is_refused() -> None:
    """Attack: an entry read twice (a page boundary bug, or a row inserted with an old seq) would
    be counted twice in the tree."""
    notary = notary_with(4)
    with pytest.raises(NotaryError, match="seq 4 repeats one already in the tree of 4 entries"):
        notary.absorb(entries(2, start=4))
    assert notary.size == 4
    assert notary.absorb(entries(2, start=5)) == 2 and notary.size == 6


def test_a_signed_checkpoint_verifies_with_the_coordinators_key_and_checks() -> None:
    notary = notary_with(10)
    cp = notary.sign(T0)
    assert (cp.origin, cp.size, cp.root, cp.timestamp_ms) == (COORDINATOR.id, 10, notary.root(), T0)
    cp.verify(COORDINATOR.public_key)
    notary.check(cp)
    notary.absorb(entries(5, start=11))
    notary.check(cp)  # an older checkpoint of a grown tree still checks: it is a prefix


def test_a_checkpoint_over_changed_entries_is_refused_with_what_to_do() -> None:
    """Attack: one entry's amount edited in the database after it was checkpointed."""
    cp = notary_with(10).sign(T0)
    edited = entries(10)
    edited[2] = Entry(3, credit(3, amount=999_999_999))
    rebuilt = Notary(COORDINATOR)
    rebuilt.absorb(edited)
    with pytest.raises(LedgerMismatch, match=r"^ledger does not match its checkpoint of size 10 signed at "
                                             r"2026-01-01T00:00:00.000Z: .*changed outside the coordinator; "
                                             r"restore the database from a backup$") as caught:
        rebuilt.check(cp)
    assert caught.value.checkpoint == cp


def test_a_checkpoint_larger_than_the_ledger_is_refused() -> None:
    """Attack: the newest entries deleted (the tree is a prefix of the signed one, yet shorter)."""
    cp = notary_with(10).sign(T0)
    with pytest.raises(LedgerMismatch, match="holds only 9 entries, so entries were deleted"):
        notary_with(9).check(cp)


def test_an_inserted_entry_is_refused() -> None:
    """Attack: an entry inserted before checkpointed ones (everything after it shifts by one)."""
    cp = notary_with(10).sign(T0)
    shifted = [Entry(1, credit(999)), *(Entry(e.seq + 1, e.record) for e in entries(10))]
    rebuilt = Notary(COORDINATOR)
    rebuilt.absorb(shifted)
    with pytest.raises(LedgerMismatch, match="hash to another root"):
        rebuilt.check(cp)


def test_a_checkpoint_of_another_coordinator_or_a_forged_one_is_refused() -> None:
    """Attack: a database (or checkpoint row) from another coordinator, or a signature forged."""
    notary = notary_with(10)
    foreign = notary_with(10, OTHER).sign(T0)
    with pytest.raises(ForgedCheckpoint, match=f"signed by coordinator {OTHER.id}, not by this one"):
        notary.check(foreign)
    forged = dataclasses.replace(notary.sign(T0), timestamp_ms=T0 + 1)  # signature no longer matches
    with pytest.raises(ForgedCheckpoint, match="signature does not verify"):
        notary.check(forged)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 9, 33])
def test_every_inclusion_proof_verifies_against_the_signed_root(size: int) -> None:
    notary = notary_with(40)
    cp = sign_checkpoint(COORDINATOR, size=size, root=notary.root(size), timestamp_ms=T0)
    log = entries(40)
    for seq in range(1, size + 1):
        proof = notary.inclusion_proof(seq, size)
        verify_inclusion(leaf_hash(log[seq - 1].record.leaf_bytes()), seq - 1, size, proof, cp.root)
    with pytest.raises(InvalidProof):  # and does not verify for another entry
        verify_inclusion(leaf_hash(credit(12345).leaf_bytes()), 0, size, notary.inclusion_proof(1, size), cp.root)


def test_every_consistency_proof_verifies_and_a_rewritten_history_does_not() -> None:
    """Attack: the log rewritten between two checkpoints (a fork): no proof can join them."""
    notary = notary_with(30)
    for old in range(0, 31, 3):
        for new in (old, 17, 30):
            if new >= old:
                verify_consistency(old, new, notary.root(old), notary.root(new), notary.consistency_proof(old, new))
    edited = entries(30)
    edited[4] = Entry(5, credit(5, amount=1))
    fork = Notary(COORDINATOR)
    fork.absorb(edited)
    with pytest.raises(InvalidProof):
        verify_consistency(10, 30, notary.root(10), fork.root(30), fork.consistency_proof(10, 30))


@pytest.mark.parametrize(("call", "message"), [
    (lambda n: n.inclusion_proof(11, 10), r"seq must be in 1\.\.10"),
    (lambda n: n.inclusion_proof(0, 5), r"seq must be in 1\.\.5"),
    (lambda n: n.inclusion_proof(3, 21), r"size must be in 0\.\.20"),
    (lambda n: n.consistency_proof(12, 10), r"old must be in 0\.\.10"),
    (lambda n: n.consistency_proof(1, 21), r"size must be in 0\.\.20"),
    (lambda n: n.consistency_proof(True, 3), r"old must be"),
])
def test_proofs_past_the_tree_are_refused_with_a_sentence(call: object, message: str) -> None:
    notary = notary_with(20)
    with pytest.raises(ValueError, match=message):
        call(notary)  # type: ignore[operator]


def test_receipts_verify_and_refuse_an_entry_changed_since() -> None:
    """Attack: a receipt handed out for an entry the database changed after it was signed: it
    would not verify, and the contributor would blame the wrong party. Refused instead."""
    notary = notary_with(25)
    cp = notary.sign(T0)
    log = entries(25)
    receipts = notary.receipts([log[0], log[11], log[24]], cp)
    for r in receipts:
        r.verify(COORDINATOR.public_key)
    assert [r.index for r in receipts] == [0, 11, 24]
    with pytest.raises(LedgerMismatch, match="entry seq 12 in the database is not the one signed"):
        notary.receipts([Entry(12, credit(12, amount=7))], cp)
    with pytest.raises(ValueError, match="not in the checkpoint of size 10"):
        notary.receipts([log[11]], notary_with(10).sign(T0))
    with pytest.raises(ValueError, match="not one of this tree"):
        notary.receipts([log[0]], notary_with(25, OTHER).sign(T0))


def test_checkpoints_signed_as_the_tree_grows_form_one_history() -> None:
    """What `ledger verify` checks from outside, on checkpoints the notary signed over time."""
    notary = Notary(COORDINATOR)
    seen: list[Checkpoint] = []
    for step in range(6):
        notary.absorb(entries(7, start=notary.size + 1))
        seen.append(notary.sign(T0 + step))
    newest = seen[-1]
    check_history(seen, newest, {c.size: notary.consistency_proof(c.size, newest.size) for c in seen},
                  COORDINATOR.public_key)
    with pytest.raises(InconsistentLog):
        check_history(seen, newest, {c.size: notary.consistency_proof(c.size - 1, newest.size)[:1] for c in seen},
                      COORDINATOR.public_key)


def test_a_tree_of_a_million_entries_fits_in_100_mb() -> None:
    """Measured on 131,072 entries (the per-leaf cost is flat: 32 bytes a leaf plus a 1/64 subtree
    cache), then scaled: a million must stay well under 100 MB."""
    n = 1 << 17
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        notary = Notary(COORDINATOR)
        record = credit(1)
        for start in range(1, n + 1, 8192):
            notary.absorb([Entry(seq, record) for seq in range(start, start + 8192)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert notary.size == n
    per_leaf = held / n
    assert 32 <= per_leaf < 48, per_leaf  # 32 bytes a leaf, the cache and bytearray slack on top (37 measured)
    assert per_leaf * 1_000_000 < 100 * 2**20
