"""`find_discrepancies` on a small consistent ledger, then on each kind of tampering."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ledger.entries import Credit, Entry, balances_of
from ledger.verify import find_discrepancies

DIGEST = "cd" * 32
Doc = dict[str, Any]

# The coordinator's record: t1 and t2 verified with two accepted nodes each; t3 still waiting.
ACCEPTED: list[Doc] = [
    {"task": task, "job": job, "node": node, "owner": owner, "output_digest": DIGEST, "task_state": state}
    for task, job, node, owner, state in [
        ("t1", "j1", "n1", "alice", "verified"),
        ("t1", "j1", "n2", "bob", "verified"),
        ("t2", "j1", "n1", "alice", "verified"),
        ("t2", "j1", "n3", "carol", "verified"),
        ("t3", "j2", "n2", "bob", "reported"),
    ]
]
AMOUNTS = {"t1": 3, "t2": 5}


def ledger_of(credited: list[tuple[str, str]]) -> tuple[list[Doc], Doc]:
    """Entries (seq 1..n) crediting each (task, node) as the accepted record says, and their balances."""
    records = {(r["task"], r["node"]): r for r in ACCEPTED}
    entries = []
    for seq, (task, node) in enumerate(credited, start=1):
        record = records.get((task, node), {"job": "j1", "owner": "mallory"})
        entries.append(Entry(seq, Credit(node=node, owner=record["owner"], job=record["job"], task=task,
                                         amount=AMOUNTS.get(task, 1), result_digest=DIGEST,
                                         created_at=1_700_000_000.0 + seq)))
    return [e.to_json() for e in entries], balances_of(entries).to_json()


def summed(entries: list[Doc]) -> Doc:
    """Balances summed by hand from tampered entries, so that only the tampering itself is reported."""
    nodes: dict[tuple[str, str], list[int]] = {}
    owners: dict[str, list[int]] = {}
    for e in entries:
        for tally in (nodes.setdefault((e["node"], e["owner"]), [0, 0]),
                      owners.setdefault(e["owner"], [0, 0])):
            tally[0] += e["amount"]
            tally[1] += 1
    return {"nodes": [{"node": n, "owner": o, "credits": c, "entries": k}
                      for (n, o), (c, k) in nodes.items()],
            "owners": [{"owner": o, "credits": c, "entries": k} for o, (c, k) in owners.items()],
            "total_credits": sum(e["amount"] for e in entries), "entries": len(entries)}


CONSISTENT = [("t1", "n1"), ("t1", "n2"), ("t2", "n1"), ("t2", "n3")]


def test_a_consistent_ledger_has_no_discrepancies() -> None:
    entries, balances = ledger_of(CONSISTENT)

    assert find_discrepancies(entries, ACCEPTED, balances) == []


def test_an_empty_ledger_with_nothing_verified_is_consistent() -> None:
    assert find_discrepancies([], ACCEPTED[4:], {"nodes": [], "owners": [], "total_credits": 0,
                                                 "entries": 0}) == []


def test_a_duplicate_credit_is_reported_with_both_seqs() -> None:
    # Prepare: (t1, n1) credited again at seq 5
    entries, balances = ledger_of([*CONSISTENT, ("t1", "n1")])

    # Execute
    found = find_discrepancies(entries, ACCEPTED, balances)

    # Assert
    assert found == ["seq 5 (task t1, node n1): duplicate credit for this (task, node), "
                     "already credited at seq 1"]


def test_a_credit_for_an_unverified_task_is_reported() -> None:
    entries, balances = ledger_of([*CONSISTENT, ("t3", "n2")])

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["seq 5 (task t3, node n2): task t3 is 'reported', not verified"]


def test_a_credit_for_a_node_whose_result_was_not_accepted_is_reported() -> None:
    entries, balances = ledger_of([*CONSISTENT, ("t1", "n3")])

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["seq 5 (task t1, node n3): node n3's result was not accepted for task t1"]


def test_a_credit_for_a_task_the_coordinator_never_accepted_is_reported() -> None:
    entries, balances = ledger_of([*CONSISTENT, ("t9", "n1")])

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert len(found) == 1
    assert "seq 5 (task t9, node n1)" in found[0] and "not in the coordinator's record" in found[0]


def test_a_credit_naming_another_job_or_owner_is_reported() -> None:
    # Prepare
    entries, _ = ledger_of(CONSISTENT)
    entries[1]["job"] = "j7"
    entries[2]["owner"] = "mallory"

    # Execute
    found = find_discrepancies(entries, ACCEPTED, summed(entries))

    # Assert
    assert found == [
        "seq 2 (task t1, node n2): job j7 does not match the accepted result's job j1",
        "seq 3 (task t2, node n1): owner mallory does not match the accepted result's owner alice",
    ]


def test_an_accepted_result_of_a_verified_task_without_credit_is_reported() -> None:
    entries, balances = ledger_of(CONSISTENT[:3])

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["task t2 is verified and node n3's result was accepted, "
                     "but the ledger has no credit for it"]


def test_a_wrong_node_balance_is_reported() -> None:
    # Prepare: n1 earned 3 + 5 over two entries; the coordinator claims one credit more
    entries, balances = ledger_of(CONSISTENT)
    forged = copy.deepcopy(balances)
    [row] = [r for r in forged["nodes"] if r["node"] == "n1"]
    row["credits"] += 1

    # Execute
    found = find_discrepancies(entries, ACCEPTED, forged)

    # Assert
    assert found == ["balance for node n1 (owner alice) is 9 credits over 2 entries, "
                     "but its entries sum to 8 credits over 2 entries"]


def test_wrong_owner_balance_and_totals_are_reported() -> None:
    entries, balances = ledger_of(CONSISTENT)
    forged = copy.deepcopy(balances)
    forged["owners"] = [r for r in forged["owners"] if r["owner"] != "carol"]
    forged["total_credits"] += 100
    forged["entries"] = 3

    found = find_discrepancies(entries, ACCEPTED, forged)

    assert found == [
        "balance for owner carol is missing; its entries sum to 5 credits over 1 entries",
        "balance total_credits is 116, but the entries sum to 16",
        "balance entries count is 3, but there are 4 entries",
    ]


def test_a_balance_for_a_node_without_entries_is_reported() -> None:
    entries, balances = ledger_of(CONSISTENT)
    balances["nodes"].append({"node": "n9", "owner": "mallory", "credits": 0, "entries": 0})

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["balance lists node n9 (owner mallory) with 0 credits over 0 entries, "
                     "but no entry credits it"]


def test_a_gap_in_seq_is_reported() -> None:
    # Prepare: the entries after seq 2 are renumbered as if seq 3 had been cut out
    entries, balances = ledger_of(CONSISTENT)
    for entry in entries[2:]:
        entry["seq"] += 1

    # Execute
    found = find_discrepancies(entries, ACCEPTED, balances)

    # Assert
    assert found == ["seq 4 (task t2, node n1): gap in seq, 3 missing"]


def test_a_seq_that_does_not_increase_is_reported() -> None:
    entries, balances = ledger_of(CONSISTENT)
    entries[2]["seq"], entries[3]["seq"] = 4, 3

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["seq 4 (task t2, node n1): gap in seq, 3 missing",
                     "seq 3 (task t2, node n3): seq does not increase, it follows seq 4"]


def test_a_seq_that_does_not_start_at_one_is_reported() -> None:
    entries, balances = ledger_of(CONSISTENT)
    for entry in entries:
        entry["seq"] += 2

    found = find_discrepancies(entries, ACCEPTED, balances)

    assert found == ["seq 3 (task t1, node n1): gap in seq, 1..2 missing"]


@pytest.mark.parametrize("amount", [0, -4])
def test_an_amount_that_is_not_positive_is_reported(amount: int) -> None:
    entries, _ = ledger_of(CONSISTENT)
    entries[1]["amount"] = amount

    found = find_discrepancies(entries, ACCEPTED, summed(entries))

    assert found == [f"seq 2 (task t1, node n2): amount {amount} is not positive"]


def test_discrepancies_come_in_entry_order() -> None:
    # Prepare: tamper with seq 4 and seq 2
    entries, _ = ledger_of(CONSISTENT)
    entries[3]["job"] = "j7"
    entries[1]["owner"] = "mallory"

    # Execute
    found = find_discrepancies(entries, ACCEPTED, summed(entries))

    # Assert
    assert [d.split(":")[0] for d in found] == ["seq 2 (task t1, node n2)", "seq 4 (task t2, node n3)"]


def test_malformed_documents_are_reported_not_raised() -> None:
    # Prepare
    entries, balances = ledger_of(CONSISTENT)
    entries[1] = {"seq": 2, "task": "t1", "node": "n2", "amount": "lots"}
    accepted = [*ACCEPTED, {"task": "t4"}]
    balances["nodes"].append("nonsense")

    # Execute
    found = find_discrepancies(entries, accepted, balances)

    # Assert
    assert "accepted result #6 is malformed: field 'job' is missing or not a non-empty string" in found
    assert "entry #2 is malformed: field 'owner' is missing or not a non-empty string" in found
    assert any(d.startswith("balance row #4 of 'nodes' is malformed") for d in found)
    assert not any("gap" in d for d in found)  # the malformed entry's seq still counts
