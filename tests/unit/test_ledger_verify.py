"""`find_discrepancies` on a small consistent ledger, then on each kind of tampering: first the
contributors' side (credits against accepted results), then the double entry (charges, grants,
account balances, conservation)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ledger.entries import Charge, Credit, Entry, Grant, LedgerRecord, balances_of, charge_for, reversal_of
from ledger.verify import find_discrepancies

DIGEST = "cd" * 32
Doc = dict[str, Any]

# The coordinator's record: t1 and t2 verified with two accepted nodes each; t3 still waiting.
# Their jobs have no submitter (internal use): nobody is charged for them.
ACCEPTED: list[Doc] = [
    {"task": task, "job": job, "node": node, "owner": owner, "output_digest": DIGEST, "task_state": state,
     "submitter": ""}
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
    accounts: dict[str, list[int]] = {}
    credits = [e for e in entries if e["kind"] == "credit"]
    for e in credits:
        for tally in (nodes.setdefault((e["node"], e["owner"]), [0, 0]),
                      owners.setdefault(e["owner"], [0, 0])):
            tally[0] += e["amount"]
            tally[1] += 1
    for e in entries:
        account = e["owner"] if e["kind"] == "credit" else e["account"]
        accounts.setdefault(account, [0, 0, 0])[("grant", "credit", "charge").index(e["kind"])] += e["amount"]
    return {"nodes": [{"node": n, "owner": o, "credits": c, "entries": k}
                      for (n, o), (c, k) in nodes.items()],
            "owners": [{"owner": o, "credits": c, "entries": k} for o, (c, k) in owners.items()],
            "total_credits": sum(e["amount"] for e in credits), "entries": len(credits),
            "accounts": [{"account": a, "granted": g, "earned": e, "spent": s, "balance": g + e - s}
                         for a, (g, e, s) in accounts.items()],
            "total_granted": sum(g for g, _, _ in accounts.values())}


CONSISTENT = [("t1", "n1"), ("t1", "n2"), ("t2", "n1"), ("t2", "n3")]


def test_a_consistent_ledger_has_no_discrepancies() -> None:
    entries, balances = ledger_of(CONSISTENT)

    assert find_discrepancies(entries, ACCEPTED, balances) == []


def test_an_empty_ledger_with_nothing_verified_is_consistent() -> None:
    assert find_discrepancies([], ACCEPTED[4:], {"nodes": [], "owners": [], "total_credits": 0, "entries": 0,
                                                 "accounts": [], "total_granted": 0}) == []


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

    assert len(found) == 2
    assert "seq 5 (task t9, node n1)" in found[0] and "not in the coordinator's record" in found[0]
    assert found[1] == ("account balances add up to 17, but 0 credits were granted (plus 16 credited for jobs "
                        "without a submitter): 1 credits were made from nothing")


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
        "balance entries count is 3, but there are 4 credit entries",
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
    entries[1] = {"seq": 2, "kind": "credit", "task": "t1", "node": "n2", "amount": "lots"}
    accepted = [*ACCEPTED, {"task": "t4"}]
    accepted[1] = {k: v for k, v in accepted[1].items() if k != "submitter"}
    balances["nodes"].append("nonsense")

    # Execute
    found = find_discrepancies(entries, accepted, balances)

    # Assert
    assert "accepted result #6 is malformed: field 'job' is missing or not a non-empty string" in found
    assert "accepted result #2 is malformed: field 'submitter' is missing or not a string" in found
    assert "entry #2 is malformed: field 'owner' is missing or not a non-empty string" in found
    assert any(d.startswith("balance row #4 of 'nodes' is malformed") for d in found)
    assert not any("gap" in d for d in found)  # the malformed entry's seq still counts


# --- the double entry ------------------------------------------------------------------------

# Job j5, submitted by dave: t5 run by alice's and bob's nodes, t6 by alice's and carol's; t7 is
# still waiting. dave was granted 100 when his account opened.
PAID_ACCEPTED: list[Doc] = [
    {"task": task, "job": "j5", "node": node, "owner": owner, "output_digest": DIGEST, "task_state": state,
     "submitter": "dave"}
    for task, node, owner, state in [
        ("t5", "n1", "alice", "verified"), ("t5", "n2", "bob", "verified"),
        ("t6", "n1", "alice", "verified"), ("t6", "n3", "carol", "verified"),
        ("t7", "n2", "bob", "reported"),
    ]
]


def paid_records(*, t6_amount: int = 4) -> list[LedgerRecord]:
    """dave's grant, then each verified task's credits and charge, as the coordinator writes them."""
    records: list[LedgerRecord] = [Grant(account="dave", amount=100, key="start:dave", memo="", created_at=1.0)]
    for task, paid, amount in [("t5", [("n1", "alice"), ("n2", "bob")], 3),
                               ("t6", [("n1", "alice"), ("n3", "carol")], t6_amount)]:
        credits = [Credit(node=node, owner=owner, job="j5", task=task, amount=amount, result_digest=DIGEST,
                          created_at=2.0) for node, owner in paid]
        records += [*credits, charge_for(credits, account="dave", created_at=2.0)]
    return records


def paid_ledger(records: list[LedgerRecord] | None = None) -> tuple[list[Doc], Doc]:
    entries = [Entry(seq, r) for seq, r in enumerate(records or paid_records(), start=1)]
    return [e.to_json() for e in entries], balances_of(entries).to_json()


def test_a_consistent_double_entry_ledger_has_no_discrepancies() -> None:
    entries, balances = paid_ledger()

    assert find_discrepancies(entries, PAID_ACCEPTED, balances) == []
    assert {a["account"]: a["balance"] for a in balances["accounts"]} == {
        "dave": 100 - 6 - 8, "alice": 7, "bob": 3, "carol": 4}


def test_a_charge_that_differs_from_the_tasks_credits_is_reported() -> None:
    # Attack: the coordinator charges the submitter more than the contributors were paid.
    entries, _ = paid_ledger()
    [charge] = [e for e in entries if e["kind"] == "charge" and e["task"] == "t6"]
    charge["amount"] = 9

    found = find_discrepancies(entries, PAID_ACCEPTED, summed(entries))

    assert found == [
        "seq 7 (charge, task t6): charge of 9 does not equal the task's credits, 8",
        "account balances add up to 99, but 100 credits were granted: 1 credits vanished",
    ]


def test_a_verified_task_of_a_submitted_job_without_a_charge_is_reported() -> None:
    # Attack: free work - the contributors are paid but the submitter never is charged, so credit
    # is made from nothing.
    entries, _ = paid_ledger([r for r in paid_records() if not (isinstance(r, Charge) and r.task == "t5")])

    found = find_discrepancies(entries, PAID_ACCEPTED, summed(entries))

    assert found == [
        "task t5 is verified and job j5 was submitted by dave, but the ledger has no charge for it",
        "account balances add up to 106, but 100 credits were granted: 6 credits were made from nothing",
    ]


def test_a_charge_to_someone_other_than_the_submitter_is_reported() -> None:
    records = paid_records()
    records[3] = Charge(account="bob", job="j5", task="t5", amount=6, created_at=2.0)
    entries, balances = paid_ledger(records)

    found = find_discrepancies(entries, PAID_ACCEPTED, balances)

    assert found == ["seq 4 (charge, task t5): bob is charged, but job j5 was submitted by dave"]


def test_a_charge_for_a_job_without_a_submitter_or_an_unverified_task_is_reported() -> None:
    records: list[LedgerRecord] = [
        Charge(account="mallory", job="j1", task="t1", amount=6, created_at=2.0),
        Charge(account="mallory", job="j2", task="t3", amount=1, created_at=2.0)]
    entries = [e.to_json() for e in (Entry(seq, r) for seq, r in enumerate(records, start=1))]

    found = find_discrepancies(entries, ACCEPTED, summed(entries))

    assert found[:3] == [
        "seq 1 (charge, task t1): job j1 has no submitter, so nobody may be charged for it",
        "seq 2 (charge, task t3): task t3 is 'reported', not verified",
        "seq 2 (charge, task t3): job j2 has no submitter, so nobody may be charged for it",
    ]


def test_a_duplicate_charge_or_grant_is_reported() -> None:
    # Attack: the submitter pays twice for one task; a grant is replayed.
    records = paid_records()
    records += [records[3], Grant(account="dave", amount=100, key="start:dave", memo="", created_at=3.0)]
    entries, balances = paid_ledger(records)

    found = find_discrepancies(entries, PAID_ACCEPTED, balances)

    assert found[:2] == [
        "seq 8 (charge, task t5): duplicate charge for this task, already charged at seq 4",
        "seq 9 (grant start:dave): duplicate grant under this key, already granted at seq 1",
    ]


def test_a_forged_account_row_is_reported() -> None:
    # Prepare: the coordinator claims dave spent less than his charges say, and keeps the row's
    # own arithmetic straight so only the entries can give it away.
    entries, balances = paid_ledger()
    forged = copy.deepcopy(balances)
    [row] = [r for r in forged["accounts"] if r["account"] == "dave"]
    row["spent"] -= 8
    row["balance"] += 8

    # Execute
    found = find_discrepancies(entries, PAID_ACCEPTED, forged)

    # Assert
    assert found == [
        "balance for account dave is granted 100, earned 0, spent 6, but its entries sum to granted 100, "
        "earned 0, spent 14",
        "account balances add up to 108, but 100 credits were granted: 8 credits were made from nothing",
    ]


def test_an_account_row_whose_balance_is_not_its_sum_is_reported() -> None:
    entries, balances = paid_ledger()
    [row] = [r for r in balances["accounts"] if r["account"] == "alice"]
    row["balance"] = 70

    found = find_discrepancies(entries, PAID_ACCEPTED, balances)

    assert found == ["balance for account alice is 70, but granted 0 + earned 7 - spent 0 is 7",
                     "account balances add up to 163, but 100 credits were granted: 63 credits were made "
                     "from nothing"]


def test_a_forged_total_granted_is_reported() -> None:
    entries, balances = paid_ledger()
    balances["total_granted"] = 1_000

    found = find_discrepancies(entries, PAID_ACCEPTED, balances)

    assert found == ["balance total_granted is 1000, but the grants sum to 100"]


def test_an_entry_of_unknown_kind_is_malformed() -> None:
    entries, balances = paid_ledger()
    entries[0]["kind"] = "gift"

    found = find_discrepancies(entries, PAID_ACCEPTED, balances)

    assert found[0] == ("entry #1 is malformed: field 'kind' is 'gift', "
                        "not one of credit, charge, grant, clawback, refund")


class _Name(str):
    """A str subclass: no JSON decoder makes one, so the fast path leaves it to the careful parser."""


@pytest.mark.parametrize("value", [None, True, 0, -3, 1.5, "", "x", _Name("n1"), [], {}, "DELETE"])
def test_the_fast_parser_reads_every_entry_as_the_careful_one(value: object) -> None:
    """Entries are parsed by a fast path when they look as the coordinator writes them. Attack: an
    entry crafted to slip through it (a bool for a seq, an empty or non-string name, a missing
    field, a kind that is not a string) and be read differently than `_parse_entry` reads it: the
    two must agree on every entry, sentence for sentence."""
    from ledger.verify import _parse_entry, parse_entries

    recs: list[LedgerRecord] = [Grant(account="dave", amount=10, key="k", memo="", created_at=1.0)]
    credit = Credit(node="n1", owner="alice", job="j1", task="t1", amount=3, result_digest=DIGEST, created_at=2.0,
                    ref="lease")
    recs += [credit, charge_for([credit], account="dave", created_at=2.0),
             *reversal_of([credit], charge_for([credit], account="dave", created_at=2.0), bad_lease="lease",
                          reason="", created_at=3.0)]
    docs = [Entry(seq, r).to_json() for seq, r in enumerate(recs, start=1)]
    for doc in docs:
        for name in [*doc, "ref", "result_digest"]:
            changed = dict(doc)
            if value == "DELETE":
                changed.pop(name, None)
            else:
                changed[name] = value

            assert parse_entries([changed]) == [_parse_entry(changed)], (name, value)
