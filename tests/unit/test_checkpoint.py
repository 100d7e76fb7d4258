"""Signed checkpoints, receipts and checkpoint histories (ledger/checkpoint.py).

The attacker is the coordinator's operator, or anyone between it and a contributor: they forge or
alter checkpoints, replay other signatures as checkpoints, hand out receipts from another
coordinator, or rewrite the log and hope a contributor's remembered checkpoints do not notice.
Each test names the attack and asserts the error that stops it."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import pytest

from ledger.checkpoint import (
    KIND,
    MAX_TIMESTAMP_MS,
    Checkpoint,
    CheckpointError,
    ForgedCheckpoint,
    InconsistentLog,
    MalformedCheckpoint,
    Receipt,
    check_history,
    decode_proof,
    make_receipt,
    sign_checkpoint,
    sizes_to_prove,
)
from ledger.entries import Credit
from ledger.errors import LedgerError
from ledger.merkle import EMPTY_ROOT, LeafHashList, MerkleLog, leaf_hash
from protocol.codec import scoped_kind
from protocol.errors import BadSignature
from protocol.signing import Identity, verify

COORDINATOR = Identity.generate()
OTHER = Identity.generate()
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00.000Z


def entry(i: int) -> bytes:
    return Credit(node=f"node{i % 3}", owner="alice", job="j1", task=f"t{i}", amount=100 + i,
                  result_digest="ab" * 32, created_at=1_767_225_600.0 + i).leaf_bytes()


def build_log(entries: list[bytes]) -> MerkleLog:
    return MerkleLog(LeafHashList(leaf_hash(e) for e in entries), cache_level=2)


ENTRIES = [entry(i) for i in range(20)]
LOG = build_log(ENTRIES)


def checkpoint_at(size: int, log: MerkleLog = LOG, *, identity: Identity = COORDINATOR, t: int = T0) -> Checkpoint:
    return sign_checkpoint(identity, size=size, root=log.root(size), timestamp_ms=t + size)


# -- checkpoints ----------------------------------------------------------------------------------

def test_checkpoint_round_trips_and_verifies() -> None:
    cp = checkpoint_at(13)
    cp.verify(COORDINATOR.public_key)
    doc = json.loads(json.dumps(cp.to_json()))
    assert doc["time"] == "2026-01-01T00:00:00.013Z" and doc["origin"] == COORDINATOR.id
    assert Checkpoint.from_json(doc) == cp
    assert cp.signed_text() == (b"sparecycles/checkpoint/v1\n" + COORDINATOR.id.encode() + b"\n13\n"
                                + LOG.root(13).hex().encode() + b"\n" + str(T0 + 13).encode() + b"\n")
    empty = sign_checkpoint(COORDINATOR, size=0, root=EMPTY_ROOT, timestamp_ms=0)
    empty.verify(COORDINATOR.public_key)


def test_checkpoint_from_another_key_is_refused() -> None:
    # Attack: a checkpoint signed by another coordinator (or the attacker's own key) offered as ours.
    with pytest.raises(ForgedCheckpoint, match="from coordinator"):
        checkpoint_at(5, identity=OTHER).verify(COORDINATOR.public_key)
    # Attack: same, with the origin rewritten to name our coordinator: the signature then fails.
    forged = dataclasses.replace(checkpoint_at(5, identity=OTHER), origin=COORDINATOR.id)
    with pytest.raises(ForgedCheckpoint, match="signature"):
        forged.verify(COORDINATOR.public_key)


@pytest.mark.parametrize("change", [
    {"size": 14}, {"size": 12}, {"root": LOG.root(12)}, {"root": EMPTY_ROOT[:31] + b"\x00"},
    {"timestamp_ms": T0 + 14}, {"timestamp_ms": T0},
])
def test_altered_checkpoint_is_refused(change: dict[str, Any]) -> None:
    # Attack: keep a genuine signature and change the size, the root or the time it vouches for.
    altered = dataclasses.replace(checkpoint_at(13), **change)
    with pytest.raises(ForgedCheckpoint, match="signature"):
        altered.verify(COORDINATOR.public_key)


def test_signature_of_another_kind_is_not_a_checkpoint_signature() -> None:
    cp = checkpoint_at(7)
    text = cp.signed_text()
    # Attack: the coordinator's key signed these very bytes as another message kind (an envelope
    # under some namespace, a node certificate, an HTTP request): replayed as a checkpoint, it fails.
    for kind in (scoped_kind("sc/v1", KIND), "cert", "http", scoped_kind("sc/v1", "assignment")):
        replay = dataclasses.replace(cp, signature=COORDINATOR.sign(kind, text))
        with pytest.raises(ForgedCheckpoint):
            replay.verify(COORDINATOR.public_key)
    # Attack, the other way round: a checkpoint's signature presented for another kind.
    for kind in ("cert", "http", scoped_kind("sc/v1", KIND)):
        with pytest.raises(BadSignature):
            verify(COORDINATOR.public_key, kind, text, cp.signature)


def good_doc() -> dict[str, Any]:
    return checkpoint_at(9).to_json()


_DROP = object()


def _with(**change: Any) -> dict[str, Any]:
    doc = good_doc()
    doc.update(change)
    return {k: v for k, v in doc.items() if v is not _DROP}


@pytest.mark.parametrize(("doc", "reason"), [
    ([], "object"),
    ("{}", "object"),
    (_with(size=_DROP), "fields"),
    (_with(extra=1), "fields"),
    (_with(size=True), "size"),
    (_with(size=-1), "size"),
    (_with(size=9.0), "size"),
    (_with(size="9"), "size"),
    (_with(size=2**63), "size"),
    (_with(timestamp_ms=MAX_TIMESTAMP_MS + 1), "timestamp_ms"),
    (_with(timestamp_ms=None), "timestamp_ms"),
    (_with(root=good_doc()["root"].upper()), "root"),
    (_with(root=good_doc()["root"][:62]), "root"),
    (_with(root=good_doc()["root"] + "00"), "root"),
    (_with(root=good_doc()["root"][:63] + "\n"), "root"),
    (_with(root=" " + good_doc()["root"][1:]), "root"),
    (_with(root=1), "root"),
    (_with(signature=good_doc()["signature"][:126]), "signature"),
    (_with(origin=COORDINATOR.id + "\n"), "origin"),
    (_with(origin=""), "origin"),
    (_with(origin="A" * 26), "origin"),
    (_with(time="2026-01-01T00:00:00Z"), "time"),
    (_with(size=0), "empty tree"),  # attack: an empty log with a non-empty root
])
def test_malformed_checkpoint_json_is_refused(doc: object, reason: str) -> None:
    # Attack: hostile JSON from the coordinator under audit: each fault is named, none crashes.
    with pytest.raises(MalformedCheckpoint, match=reason):
        Checkpoint.from_json(doc)


def test_checkpoint_errors_are_ledger_errors() -> None:
    assert issubclass(MalformedCheckpoint, CheckpointError) and issubclass(CheckpointError, LedgerError)
    assert issubclass(CheckpointError, ValueError)


# -- receipts -------------------------------------------------------------------------------------

def test_receipt_verifies_and_round_trips() -> None:
    cp = checkpoint_at(17)
    receipt = make_receipt(LOG, ENTRIES[4], 4, cp)
    receipt.verify(COORDINATOR.public_key)
    again = Receipt.from_json(json.loads(json.dumps(receipt.to_json())))
    assert again == receipt
    again.verify(COORDINATOR.public_key)


def test_receipt_for_an_altered_entry_or_position_is_refused() -> None:
    receipt = make_receipt(LOG, ENTRIES[4], 4, checkpoint_at(17))
    # Attack: a node inflates the amount in its own receipt (or a coordinator hands out a receipt
    # for an entry it never logged): the leaf is not in the signed tree.
    inflated = Credit(node="node1", owner="alice", job="j1", task="t4", amount=999_999_999,
                      result_digest="ab" * 32, created_at=1_767_225_604.0).leaf_bytes()
    for bad in (dataclasses.replace(receipt, entry=inflated),
                dataclasses.replace(receipt, entry=ENTRIES[5]),
                dataclasses.replace(receipt, index=5),
                dataclasses.replace(receipt, index=17),
                dataclasses.replace(receipt, proof=receipt.proof[:-1]),
                dataclasses.replace(receipt, proof=tuple(LOG.inclusion_proof(4, 16))),
                dataclasses.replace(receipt, checkpoint=checkpoint_at(16))):
        with pytest.raises(InconsistentLog):
            bad.verify(COORDINATOR.public_key)


def test_receipt_from_another_coordinator_is_refused() -> None:
    # Attack: a receipt issued by another coordinator (valid there) presented to ours.
    foreign = make_receipt(LOG, ENTRIES[2], 2, checkpoint_at(10, identity=OTHER))
    foreign.verify(OTHER.public_key)
    with pytest.raises(ForgedCheckpoint, match="from coordinator"):
        foreign.verify(COORDINATOR.public_key)


def test_make_receipt_refuses_what_would_not_verify() -> None:
    with pytest.raises(ValueError, match="leaf 4"):
        make_receipt(LOG, ENTRIES[5], 4, checkpoint_at(17))
    with pytest.raises(ValueError, match="leaf 17"):
        make_receipt(LOG, ENTRIES[4], 17, checkpoint_at(17))
    other = sign_checkpoint(COORDINATOR, size=17, root=LOG.root(16), timestamp_ms=T0)
    with pytest.raises(ValueError, match="describe"):
        make_receipt(LOG, ENTRIES[4], 4, other)


def test_malformed_receipt_json_is_refused() -> None:
    doc = make_receipt(LOG, ENTRIES[4], 4, checkpoint_at(17)).to_json()
    bad_docs: list[object] = [None, [], {**doc, "extra": 1}]
    for key, value in (("entry", ""), ("entry", "zz"), ("entry", "abc"), ("entry", 5), ("entry", "00" * 70_000),
                       ("index", -1), ("index", "4"), ("index", False), ("proof", "00" * 32), ("proof", ["00"]),
                       ("proof", ["00" * 32] * 129), ("proof", None), ("checkpoint", {}), ("checkpoint", None)):
        bad_docs.append({**doc, key: value})
    for bad in bad_docs:
        with pytest.raises(MalformedCheckpoint):
            Receipt.from_json(bad)
    assert decode_proof([]) == ()


# -- histories: every checkpoint seen before is a prefix of the newest ----------------------------

def proofs_for(log: MerkleLog, seen: list[Checkpoint], newest: Checkpoint) -> dict[int, list[bytes]]:
    return {size: log.consistency_proof(size, newest.size) for size in sizes_to_prove(seen, newest)}


def test_consistent_history_passes() -> None:
    seen = [checkpoint_at(s) for s in (0, 1, 4, 7, 7, 13, 20)]
    newest = checkpoint_at(20)
    assert sizes_to_prove(seen, newest) == [1, 4, 7, 13]
    check_history(seen, newest, proofs_for(LOG, seen, newest), COORDINATOR.public_key)
    check_history([], newest, {}, COORDINATOR.public_key)


def rewritten(change: str) -> list[bytes]:
    """The log as an operator left it after editing the database by hand."""
    out = list(ENTRIES)
    if change == "edited":
        out[3] = entry(103)
    elif change == "removed":
        del out[3]
        out.append(entry(99))
    elif change == "reordered":
        out[3], out[4] = out[4], out[3]
    elif change == "inserted":
        out.insert(3, entry(77))
    return out


@pytest.mark.parametrize("change", ["edited", "removed", "reordered", "inserted"])
def test_rewritten_log_is_caught_by_an_old_checkpoint(change: str) -> None:
    # Attack: the operator edits, removes, reorders or inserts an entry below a size a contributor
    # saw signed, rebuilds the tree and signs a new checkpoint. No consistency proof from the
    # rewritten log (nor the genuine one) links the remembered checkpoint to the new head.
    seen = [checkpoint_at(10)]
    forged_log = build_log(rewritten(change))
    newest = checkpoint_at(20, forged_log)
    for log in (forged_log, LOG):
        with pytest.raises(InconsistentLog, match="not a prefix"):
            check_history(seen, newest, proofs_for(log, seen, newest), COORDINATOR.public_key)


def test_fork_rollback_and_missing_proof_are_caught() -> None:
    forged_log = build_log(rewritten("edited"))
    # Attack: two signed heads for one size (a forked log shown to different people).
    with pytest.raises(InconsistentLog, match="forked"):
        check_history([checkpoint_at(20)], checkpoint_at(20, forged_log), {}, COORDINATOR.public_key)
    # Attack: the coordinator rolls its log back to before a credit was written.
    with pytest.raises(InconsistentLog, match="shrank"):
        check_history([checkpoint_at(20)], checkpoint_at(15), {}, COORDINATOR.public_key)
    # Attack: the coordinator simply withholds the consistency proof.
    with pytest.raises(InconsistentLog, match="no consistency proof"):
        check_history([checkpoint_at(5)], checkpoint_at(20), {}, COORDINATOR.public_key)


def test_history_with_a_foreign_or_altered_checkpoint_is_refused() -> None:
    seen = [checkpoint_at(5)]
    # Attack: a newest checkpoint from another key that a consistent log stands behind.
    with pytest.raises(ForgedCheckpoint):
        check_history(seen, checkpoint_at(20, identity=OTHER), proofs_for(LOG, seen, checkpoint_at(20)),
                      COORDINATOR.public_key)
    # Attack: the remembered checkpoints were edited on disk to match a rewritten log.
    forged_log = build_log(rewritten("edited"))
    tampered = dataclasses.replace(seen[0], root=forged_log.root(5))
    newest = checkpoint_at(20, forged_log)
    with pytest.raises(ForgedCheckpoint):
        check_history([tampered], newest, proofs_for(forged_log, [tampered], newest), COORDINATOR.public_key)


def test_checkpoint_json_is_not_mutated_by_decoding() -> None:
    doc = good_doc()
    before = copy.deepcopy(doc)
    Checkpoint.from_json(doc)
    assert doc == before
