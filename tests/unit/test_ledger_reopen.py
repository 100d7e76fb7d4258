"""Reopened tasks in the ledger's values and in `ledger verify` (issue 8): clawback and refund
entries, credits and charges keyed by lease, and the rounds verify checks a task's entries by."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest

from ledger.entries import (
    Balances,
    Charge,
    Clawback,
    Credit,
    Entry,
    Grant,
    LedgerRecord,
    Refund,
    balances_of,
    charge_for,
    reversal_of,
)
from ledger.errors import InvalidEntry
from ledger.verify import find_discrepancies

DIGEST = "cd" * 32
Doc = dict[str, Any]


def _clawback(**changes: object) -> Clawback:
    fields: dict[str, Any] = {"account": "bob", "node": "n1", "job": "j1", "task": "t1", "amount": 3,
                              "reason": "failed an audit", "ref": "l1", "created_at": 1_700_000_000.0}
    return Clawback(**(fields | changes))


def _refund(**changes: object) -> Refund:
    fields: dict[str, Any] = {"account": "dave", "job": "j1", "task": "t1", "amount": 6, "ref": "l1",
                              "created_at": 1_700_000_000.0}
    return Refund(**(fields | changes))


def _credit(node: str = "n1", owner: str = "bob", *, task: str = "t1", ref: str = "", amount: int = 3) -> Credit:
    return Credit(node=node, owner=owner, job="j1", task=task, amount=amount, result_digest=DIGEST,
                  created_at=1_700_000_000.0, ref=ref)


# --- the entries themselves ------------------------------------------------------------------


def test_clawback_and_refund_leaves_are_tagged_arrays_in_fixed_field_order() -> None:
    assert msgpack.unpackb(_clawback().leaf_bytes()) == ["clawback", "bob", "n1", "j1", "t1", 3, "failed an audit",
                                                         "l1", 1_700_000_000.0]
    assert msgpack.unpackb(_refund().leaf_bytes()) == ["refund", "dave", "j1", "t1", 6, "l1", 1_700_000_000.0]


@pytest.mark.parametrize(("make", "changes"), [
    (_clawback, [("account", "carol"), ("node", "n2"), ("job", "j2"), ("task", "t2"), ("amount", 4),
                 ("reason", ""), ("ref", "l2"), ("created_at", 1.5)]),
    (_refund, [("account", "erin"), ("job", "j2"), ("task", "t2"), ("amount", 7), ("ref", "l2"),
               ("created_at", 1.5)]),
])
def test_reversal_leaves_differ_when_any_field_differs(make: Any, changes: list[tuple[str, object]]) -> None:
    base = make().leaf_bytes()

    changed = [make(**{name: value}).leaf_bytes() for name, value in changes]

    assert base not in changed and len(set(changed)) == len(changed)


def test_a_credits_ref_is_in_its_leaf_only_when_set() -> None:
    # Leaves written before issue 8 (no ref) must hash as they did; a ref makes a different leaf.
    assert msgpack.unpackb(_credit().leaf_bytes()) == ["credit", "n1", "bob", "j1", "t1", 3, DIGEST, 1_700_000_000.0]
    assert msgpack.unpackb(_credit(ref="l1").leaf_bytes())[-1] == "l1"
    assert "ref" not in _credit().to_json() and _credit(ref="l1").to_json()["ref"] == "l1"


def test_leaves_of_a_credit_and_its_clawback_never_read_alike() -> None:
    credit = _credit(ref="l1")
    [clawback] = reversal_of([credit], None, bad_lease="l1", reason="", created_at=credit.created_at)

    assert credit.leaf_bytes() != clawback.leaf_bytes()
    assert credit.unique_key != clawback.unique_key


def test_a_charge_takes_the_ref_of_its_verdicts_first_credit() -> None:
    charge = charge_for([_credit("n1", ref="l7"), _credit("n2", "carol", ref="l8")], account="dave", created_at=1.0)

    assert (charge.ref, charge.amount, charge.unique_key) == ("l7", 6, ("charge", "t1", "", "l7"))


def test_reversal_of_claws_back_each_credit_and_refunds_the_charge_under_the_bad_lease() -> None:
    credits = [_credit("n1", ref="l1"), _credit("n2", "carol", ref="l2")]
    charge = charge_for(credits, account="dave", created_at=1.0)

    records = reversal_of(credits, charge, bad_lease="l1", reason="audit", created_at=5.0)

    assert records == [
        Clawback(account="bob", node="n1", job="j1", task="t1", amount=3, reason="audit", ref="l1", created_at=5.0),
        Clawback(account="carol", node="n2", job="j1", task="t1", amount=3, reason="audit", ref="l1",
                 created_at=5.0),
        Refund(account="dave", job="j1", task="t1", amount=6, ref="l1", created_at=5.0)]
    assert sum(Entry(i, r).delta for i, r in enumerate([*credits, charge, *records], start=1)) == 0


@pytest.mark.parametrize(("make", "field", "value"), [
    (_clawback, "amount", 0), (_clawback, "ref", ""), (_clawback, "node", ""), (_clawback, "reason", None),
    (_clawback, "reason", "x" * 1001), (_refund, "amount", True), (_refund, "ref", ""), (_refund, "account", ""),
])
def test_a_reversal_that_breaks_the_ledgers_invariants_cannot_be_built(make: Any, field: str, value: object) -> None:
    with pytest.raises(InvalidEntry):
        make(**{field: value})


# --- ledger verify across reopened tasks ---------------------------------------------------------


def docs(records: list[LedgerRecord]) -> tuple[list[Doc], Doc]:
    entries = [Entry(seq, r) for seq, r in enumerate(records, start=1)]
    return [e.to_json() for e in entries], balances_of(entries).to_json()


def accepted(task: str, nodes: list[tuple[str, str]], *, state: str = "verified") -> list[Doc]:
    return [{"task": task, "job": "j1", "node": node, "owner": owner, "output_digest": DIGEST, "task_state": state,
             "submitter": "dave"} for node, owner in nodes]


def honest() -> tuple[list[LedgerRecord], list[Doc]]:
    """dave's t1 is accepted on bob's n1 alone, reopened when n1 is caught, then verified again by
    n1 (on a new lease) and carol's n2; t2 stands throughout."""
    first = [_credit("n1", ref="l1")]
    first_charge = charge_for(first, account="dave", created_at=1.0)
    t2 = [_credit("n3", "erin", task="t2", ref="l9")]
    second = [_credit("n1", ref="l3"), _credit("n2", "carol", ref="l4")]
    records: list[LedgerRecord] = [
        Grant(account="dave", amount=100, key="start:dave", memo="", created_at=1.0),
        *first, first_charge, *t2, charge_for(t2, account="dave", created_at=1.0),
        *reversal_of(first, first_charge, bad_lease="l1", reason="n1 failed an audit", created_at=2.0),
        *second, charge_for(second, account="dave", created_at=3.0)]
    return records, [*accepted("t1", [("n1", "bob"), ("n2", "carol")]), *accepted("t2", [("n3", "erin")])]


def test_an_honest_reopen_and_second_verdict_verify() -> None:
    records, record = honest()
    entries, balances = docs(records)

    assert find_discrepancies(entries, record, balances) == []
    assert balances["total_credits"] == 9 and balances["entries"] == 3


def test_a_reopened_task_still_open_verifies_without_accepted_results() -> None:
    records, record = honest()
    entries, balances = docs(records[:7])  # up to the refund: t1 is open again

    assert find_discrepancies(entries, record[2:], balances) == []


def test_a_missing_clawback_is_reported() -> None:
    # Attack: the coordinator refunds the submitter but lets the caught node keep its credit.
    records, record = honest()
    records = [r for r in records if not isinstance(r, Clawback)]
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[0] == "seq 2 (task t1, node n1): task t1 was reopened (lease l1), but this credit was not clawed back"
    assert found[-1] == "account balances add up to 103, but 100 credits were granted: 3 credits were made from nothing"


def test_a_missing_refund_is_reported() -> None:
    records, record = honest()
    records = [r for r in records if not isinstance(r, Refund)]
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[0] == "seq 3 (charge, task t1): task t1 was reopened (lease l1), but this charge was not refunded"
    assert found[-1] == "account balances add up to 97, but 100 credits were granted: 3 credits vanished"


def test_a_clawback_of_another_amount_or_owner_is_reported() -> None:
    records, record = honest()
    index = next(i for i, r in enumerate(records) if isinstance(r, Clawback))
    records[index] = _clawback(account="carol", amount=2)
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[:2] == ["seq 6 (clawback, task t1, node n1): clawback of 2 does not equal the 3 paid at seq 2",
                         "seq 6 (clawback, task t1, node n1): clawback to carol, but the owner at seq 2 is bob"]


def test_a_clawback_of_nothing_is_reported() -> None:
    # Attack: money taken from an owner under the name of a reopen that reverses no credit of theirs.
    records, record = honest()
    records.append(_clawback(node="n9", account="erin", task="t7", ref="l5"))
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[0] == ("seq 11 (clawback, task t7, node n9): claws back nothing: no credit of node n9 for task t7 "
                        "stands before it")


def test_a_second_credit_in_one_verdict_under_another_ref_is_reported() -> None:
    # Attack: the exactly-once key includes the lease, so a forged second lease must not pay twice.
    records, record = honest()
    records.insert(9, _credit("n1", ref="l3-forged"))
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[0] == ("seq 10 (task t1, node n1): node n1 is credited again for task t1 without a clawback "
                        "of its credit at seq 8")


def test_a_replayed_clawback_is_a_duplicate() -> None:
    records, record = honest()
    records.append(next(r for r in records if isinstance(r, Clawback)))
    entries, balances = docs(records)

    found = find_discrepancies(entries, record, balances)

    assert found[0] == ("seq 11 (clawback, task t1, node n1): duplicate clawback for this (task, node, lease), "
                        "already clawed back at seq 6")


def test_an_account_row_hiding_its_clawbacks_is_reported() -> None:
    records, record = honest()
    entries, balances = docs(records)
    forged = copy.deepcopy(balances)
    [bob] = [r for r in forged["accounts"] if r["account"] == "bob"]
    del bob["clawed_back"], bob["refunded"]
    bob["balance"] = bob["earned"]

    found = find_discrepancies(entries, record, forged)

    assert found[0] == ("balance for account bob is granted 0, earned 6, spent 0, but its entries sum to "
                        "granted 0, earned 6, spent 0, clawed back 3, refunded 0")
    assert found[-1] == "account balances add up to 103, but 100 credits were granted: 3 credits were made from nothing"


def test_a_reopened_task_still_listed_as_accepted_is_reported() -> None:
    # The coordinator reopened t1 but still claims n1's result stands: its credit was clawed back.
    records, record = honest()
    entries, balances = docs(records[:7])

    found = find_discrepancies(entries, record, balances)

    assert "task t1 is verified and node n1's result was accepted, but the ledger has no credit for it" in found


def test_account_rows_without_reversals_keep_their_json() -> None:
    charge = Charge(account="dave", job="j1", task="t1", amount=3, created_at=1.0)
    balances = balances_of([Entry(1, _credit()), Entry(2, charge)])

    assert balances.to_json()["accounts"] == [{"account": "bob", "granted": 0, "earned": 3, "spent": 0, "balance": 3},
                                              {"account": "dave", "granted": 0, "earned": 0, "spent": 3,
                                               "balance": -3}]
    assert isinstance(balances, Balances)
