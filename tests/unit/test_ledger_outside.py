"""`ledger.outside.check`: a ledger verified from outside, with real Ed25519 checkpoints over a real
RFC 6962 tree (ledger.merkle), receipts made by `make_receipt`, and entries, accepted results and
balances built the way the coordinator builds them.

The attacker is the coordinator's operator: they edit, remove, reorder or insert entries in the
database by hand (and fix up the balances and accepted results to match), re-sign the log after
rewriting it, inflate an amount, credit a result other than the one accepted, or hand out a
checkpoint or receipt signed by another key. Each test names its attack."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from ledger.checkpoint import Checkpoint, Receipt, make_receipt, sign_checkpoint
from ledger.credit import ModelCost, credit_amount
from ledger.entries import (
    Charge,
    Credit,
    Entry,
    Grant,
    LedgerRecord,
    balances_of,
    charge_for,
    record_from_json,
    reversal_of,
)
from ledger.errors import InvalidEntry
from ledger.merkle import MerkleLog, leaf_hash, root_of
from ledger.outside import Evidence, check, prefix_roots, sizes_to_prove
from protocol.signing import Identity

COORDINATOR = Identity.generate()
OTHER = Identity.generate()
FLOPS, ROWS = 13_000, 64
AMOUNT = credit_amount(ModelCost(FLOPS), ROWS)  # 832: the demo's digits MLP on a 64-row task
NODES = (("n1", "alice"), ("n2", "bob"))
Doc = dict[str, Any]


def records(tasks: int) -> list[LedgerRecord]:
    """dave's grant, then per task two credits (alice's and bob's nodes) and dave's charge."""
    out: list[LedgerRecord] = [Grant(account="dave", amount=10**9, key="start:dave", memo="start", created_at=1.0)]
    for t in range(tasks):
        credits = [Credit(node=node, owner=owner, job="j1", task=f"t{t}", amount=AMOUNT, result_digest=f"{t:064x}",
                          created_at=1_700_000_000.25 + t, ref=f"lease-{t}-{node}") for node, owner in NODES]
        out += [*credits, Charge(account="dave", job="j1", task=f"t{t}", amount=2 * AMOUNT,
                                 created_at=1_700_000_000.25 + t, ref=credits[0].ref)]
    return out


def accepted_of(recs: list[LedgerRecord]) -> list[Doc]:
    """The coordinator's accepted rows for these credits, carrying the cost model's inputs; a task's
    verdict is recorded with its charge (`verdict_seq`, the ledger's size after that transaction)."""
    charged = {r.task: seq for seq, r in enumerate(recs, start=1) if isinstance(r, Charge)}
    return [{"seq": i, "task": r.task, "job": r.job, "node": r.node, "owner": r.owner, "output_digest": r.result_digest,
             "task_state": "verified", "submitter": "dave", "verdict_seq": charged.get(r.task, i),
             "flops_per_row": FLOPS, "rows": ROWS}
            for i, r in enumerate(recs, start=1) if isinstance(r, Credit)]


@dataclass
class Ledger:
    """A coordinator's log as it would serve it: entries, its tree, and checkpoints it signed."""

    recs: list[LedgerRecord]
    identity: Identity = COORDINATOR
    log: MerkleLog = field(default_factory=MerkleLog)

    def __post_init__(self) -> None:
        for r in self.recs:
            self.log.append(leaf_hash(r.leaf_bytes()))

    def sign(self, size: int | None = None) -> Checkpoint:
        size = self.log.size if size is None else size
        return sign_checkpoint(self.identity, size=size, root=self.log.root(size),
                               timestamp_ms=1_700_000_000_000 + size)

    def receipt(self, seq: int, checkpoint: Checkpoint) -> Receipt:
        return make_receipt(self.log, self.recs[seq - 1].leaf_bytes(), seq - 1, checkpoint)

    def entries(self) -> list[Doc]:
        return [Entry(seq, r).to_json() for seq, r in enumerate(self.recs, start=1)]

    def evidence(self, *, remembered: tuple[Checkpoint, ...] = (), receipts: tuple[Receipt, ...] = (),
                 entries: list[Doc] | None = None, key: bytes | None = None) -> Evidence:
        """What `ledger verify` would hold: the newest checkpoint, the proofs this log gives for the
        remembered sizes, and documents consistent with `entries` (balances summed from them)."""
        newest = self.sign()
        docs = self.entries() if entries is None else entries
        served = [Entry(d["seq"], record_from_json(d)) for d in docs]
        sizes = sizes_to_prove(remembered, receipts, newest)
        return Evidence(checkpoint=newest, public_key=key or COORDINATOR.public_key, entries=docs,
                        accepted=accepted_of([e.record for e in served]), balances=balances_of(served).to_json(),
                        remembered=remembered, consistency={m: self.log.consistency_proof(m) for m in sizes},
                        receipts=receipts)


def renumbered(docs: list[Doc]) -> list[Doc]:
    return [{**d, "seq": seq} for seq, d in enumerate(docs, start=1)]


def test_an_honest_ledger_with_history_and_receipts_verifies() -> None:
    honest = Ledger(records(6))
    early = honest.sign(7)
    receipts = (honest.receipt(2, early), honest.receipt(3, honest.sign(10)))

    assert check(honest.evidence(remembered=(early, honest.sign(4)), receipts=receipts)) == []


def test_an_entry_edited_in_the_database_is_caught_and_located_by_a_remembered_checkpoint() -> None:
    """Attack: the operator sets one credit's amount to 999,999,999 and its digest to deadbeef in the
    database, and fixes up the balances and accepted results to match; the checkpoint stands."""
    honest = Ledger(records(6))
    seen = honest.sign(9)
    docs = honest.entries()
    docs[11] = {**docs[11], "amount": 999_999_999, "result_digest": "deadbeef"}

    problems = check(honest.evidence(remembered=(seen,), entries=docs))

    assert problems[0].startswith("the 19 entries served do not hash to the root the coordinator signed")
    assert "the first change is in seq 10..19 (seq 1..9 still match a checkpoint you saw)" in problems[0]


def test_an_edited_entry_is_pinpointed_by_the_contributors_receipt() -> None:
    """Attack: the operator lowers one of alice's credits; alice holds a receipt for it."""
    honest = Ledger(records(4))
    receipt = honest.receipt(5, honest.sign())
    docs = honest.entries()
    docs[4] = {**docs[4], "amount": 1}

    problems = check(honest.evidence(receipts=(receipt,), entries=docs))

    assert "seq 5: the entry your receipt holds is no longer served: it was edited or removed" in problems


def test_a_removed_entry_is_caught() -> None:
    """Attack: the operator deletes a credit row and renumbers the rest to hide the gap."""
    honest = Ledger(records(4))
    docs = renumbered(honest.entries()[:5] + honest.entries()[6:])

    problems = check(honest.evidence(remembered=(honest.sign(3),), entries=docs))

    assert problems[0] == "the coordinator served 12 entries for a checkpoint of 13: entries were removed or " \
                          "added behind the checkpoint"
    assert "compared with the checkpoints seen before; seq 1..3 still match the checkpoint of size 3 you saw, " \
           "so the change is after it" in problems


def test_reordered_entries_are_caught_and_the_receipt_says_where_its_entry_went() -> None:
    """Attack: the operator swaps two entries (seq 2 and 5), keeping every row and every sum."""
    honest = Ledger(records(3))
    receipt = honest.receipt(2, honest.sign(4))
    docs = honest.entries()
    docs[1], docs[4] = docs[4], docs[1]

    problems = check(honest.evidence(receipts=(receipt,), entries=renumbered(docs)))

    assert problems[0].startswith("the 10 entries served do not hash to the root")
    assert "the first change is in seq 1..4" in problems[0]
    assert "seq 2: the entry your receipt holds is now served at seq 5: entries were removed, inserted or " \
           "reordered before it" in problems


def test_an_inserted_entry_in_a_log_signed_again_breaks_consistency_with_what_was_seen() -> None:
    """Attack: the operator inserts a grant to a friend at seq 4, then lets the coordinator sign the
    rewritten log afresh; a contributor remembers a checkpoint from before."""
    honest = Ledger(records(4))
    seen = honest.sign(8)
    friend = Grant(account="mallory", amount=500, key="x", memo="", created_at=2.0)
    rewritten = Ledger([*honest.recs[:3], friend, *honest.recs[3:]])

    problems = check(rewritten.evidence(remembered=(seen,)))

    assert problems[0].startswith("a checkpoint seen before does not agree with the newest: checkpoint of size 8")
    assert "is not a prefix of the newest of size 14" in problems[0]
    assert any(p.startswith("the ledger was rewritten after a checkpoint seen before, and signed again; "
                            "the first change is in seq 1..8") for p in problems)


def test_a_log_that_shrank_below_a_remembered_checkpoint_is_caught() -> None:
    """Attack: the operator truncates the log and re-signs it smaller."""
    honest = Ledger(records(4))
    seen = honest.sign()
    truncated = Ledger(honest.recs[:7])

    problems = check(truncated.evidence(remembered=(seen,)))

    assert "is larger than the newest (7): the log shrank" in problems[0]


def test_a_checkpoint_signed_by_another_key_is_refused_before_anything_else() -> None:
    """Attack: a man in the middle (or a new key on the coordinator) signs the checkpoint itself."""
    forged = Ledger(records(2), identity=OTHER)

    problems = check(forged.evidence())

    assert problems == [f"the newest checkpoint is not the coordinator's: checkpoint is from coordinator "
                        f"{OTHER.id}, expected {COORDINATOR.id}"]


def test_a_receipt_from_another_coordinator_is_refused() -> None:
    """Attack: a receipt from another coordinator's log is offered as proof of credit here."""
    honest, other = Ledger(records(2)), Ledger(records(2), identity=OTHER)

    problems = check(honest.evidence(receipts=(other.receipt(2, other.sign()),)))

    assert problems == [f"receipt for seq 2 (checkpoint of size 7): checkpoint is from coordinator {OTHER.id}, "
                        f"expected {COORDINATOR.id}"]


def test_a_receipt_whose_proof_does_not_match_its_entry_is_refused() -> None:
    """Attack: a forged receipt: a real signed checkpoint, a credit the log never held."""
    honest = Ledger(records(2))
    real = honest.receipt(2, honest.sign())
    fake = replace(real, entry=replace(honest.recs[1], amount=10**6).leaf_bytes())

    problems = check(honest.evidence(receipts=(fake,)))

    assert len(problems) == 1 and problems[0].startswith("receipt for seq 2 (checkpoint of size 7): receipt for leaf 1")


def test_an_amount_the_cost_model_does_not_give_is_caught_though_signed() -> None:
    """Attack: the coordinator itself pays a friend's node more than the cost model says, signs it,
    and keeps the balances and the charge in step; only the cost model shows it."""
    recs = records(2)
    recs[1] = replace(recs[1], amount=AMOUNT * 10)
    recs[3] = replace(recs[3], amount=AMOUNT * 11)

    problems = check(Ledger(recs).evidence())

    assert problems == [f"seq 2 (task t0, node n1): amount {AMOUNT * 10} does not follow from the cost model: "
                        f"{ROWS} rows of {FLOPS} FLOPs each are worth {AMOUNT} credits"]


def test_a_credit_for_outputs_other_than_the_accepted_ones_is_caught() -> None:
    """Attack: the coordinator credits a result that is not the one it accepted."""
    honest = Ledger(records(2))
    evidence = honest.evidence()
    accepted = [dict(row) for row in evidence.accepted]
    accepted[0]["output_digest"] = "ee" * 32

    problems = check(replace(evidence, accepted=accepted))

    assert problems == ["seq 2 (task t0, node n1): credits result 0000000000000000..., but the accepted result's "
                        "outputs are eeeeeeeeeeeeeeee..."]


def test_balances_that_disagree_with_the_signed_entries_are_caught() -> None:
    """Attack: the entries are untouched, but the balances served inflate alice."""
    honest = Ledger(records(2))
    evidence = honest.evidence()
    balances = copy.deepcopy(dict(evidence.balances))
    balances["owners"][0]["credits"] += 1

    assert any(p.startswith("balance for owner") for p in check(replace(evidence, balances=balances)))


def test_an_entry_that_is_no_record_is_named_and_the_others_keep_their_positions() -> None:
    """Attack: garbage in an entry row, hoping the checker skips it."""
    honest = Ledger(records(2))
    evidence = honest.evidence(remembered=(honest.sign(3),))
    docs = honest.entries()
    docs[4] = {**docs[4], "amount": "lots"}

    problems = check(replace(evidence, entries=docs))

    assert any(p.startswith("entry #5 cannot be hashed: credit amount must be an int") for p in problems)
    assert "the first change is in seq 4..7 (seq 1..3 still match a checkpoint you saw)" in problems[1]


def test_every_kind_served_as_json_hashes_back_to_its_leaf() -> None:
    for r in records(1):
        assert record_from_json(Entry(1, r).to_json()).leaf_bytes() == r.leaf_bytes()
    with pytest.raises(InvalidEntry):
        record_from_json({"kind": "credit", "node": "n"})


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 100])
def test_prefix_roots_equal_the_trees_own_roots(size: int) -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(size)]
    log = MerkleLog()
    for h in leaves:
        log.append(h)

    roots = prefix_roots(leaves, list(range(size + 1)))

    assert roots == {n: log.root(n) for n in range(size + 1)}
    assert roots[size] == root_of(leaves)


def every_kind() -> list[LedgerRecord]:
    """One record of each kind, with and without a ref where a ref is optional."""
    credits = [Credit(node="n1", owner="alice", job="j1", task="t0", amount=AMOUNT, result_digest="ab",
                      created_at=1_700_000_000.25, ref=ref) for ref in ("", "lease-1")]
    return [Grant(account="dave", amount=10**9, key="start:dave", memo="start", created_at=1.0), *credits,
            charge_for(credits[:1], account="dave", created_at=1_700_000_000.5),
            charge_for(credits[1:], account="dave", created_at=1_700_000_000.5),
            *reversal_of(credits[1:], charge_for(credits[1:], account="dave", created_at=2.0), bad_lease="lease-1",
                         reason="wrong outputs", created_at=1_700_000_001.999)]


def test_entries_hash_to_their_leaves_however_they_are_served() -> None:
    """Entries are hashed by a fast path, not by `record_from_json`, when served as the coordinator
    serves them; served any other way they go the careful way. Either way the leaf must be the
    record's own: otherwise an honest ledger would fail to verify, or a forged one pass."""
    recs = every_kind()
    docs = Ledger(recs).entries()
    variants = [
        docs,
        [{**d, "ref": ""} if d["kind"] in ("credit", "charge") and "ref" not in d else d for d in docs],
        [{**d, "created_at": int(d["created_at"])} if d["created_at"] == int(d["created_at"]) else d
         for d in docs],  # an integral time served as an int hashes as the float it is
        [{k: v for k, v in d.items() if k != "created_at_iso"} for d in docs],
        [dict(sorted(d.items())) for d in docs],
    ]
    # These records are no consistent ledger (find_discrepancies has its say); only the hashing is
    # under test here: every way of serving them must leave exactly the same sentences.
    baseline = check(Ledger(recs).evidence())
    assert baseline and not any("hash" in p or "checkpoint" in p for p in baseline)
    for served in variants:
        assert check(Ledger(recs).evidence(entries=served)) == baseline, served


def test_a_hostile_entry_is_reported_and_never_hashed_by_the_fast_path() -> None:
    """Attack: an entry whose fields the fast path could misread (a bool for an amount, a time too
    large for a float, a time that disagrees with its ISO form, an unknown field): each is named as
    a problem, nothing raises, and the other entries still verify against the checkpoint."""
    recs = every_kind()
    honest = Ledger(recs)
    for index in range(len(recs)):
        for change in ({"amount": True}, {"amount": 2**63}, {"created_at": 10**400}, {"created_at": float("inf")},
                       {"created_at_iso": "1970-01-01T00:00:00.000Z"}, {"created_at_iso": None},
                       {"extra": 1}, {"memo": "x" * 1001}, {"reason": 5}, {"ref": 7}):
            docs = honest.entries()
            docs[index] = {**docs[index], **change}

            problems = check(replace(honest.evidence(), entries=docs))

            assert any(p.startswith(f"entry #{index + 1} cannot be hashed: ") for p in problems), (index, change)
