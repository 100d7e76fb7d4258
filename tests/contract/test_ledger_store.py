"""The LedgerStore contract, run against every backend; backend-only checks at the end."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.entries import (
    AccountBalance,
    Balances,
    Charge,
    Clawback,
    Credit,
    Grant,
    LedgerRecord,
    NodeBalance,
    OwnerBalance,
    Refund,
    charge_for,
    reversal_of,
)
from ledger.errors import LedgerError, StorageError, StoreClosed
from ledger.factory import open_ledger
from ledger.postgres import PostgresLedgerStore
from ledger.sqlite import (
    SQLiteLedgerStore,
    create_schema,
    insert_entries,
    read_account_balance,
    read_entries,
    read_size,
)
from ledger.store import InMemoryLedgerStore, LedgerStore
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema

DIGEST = "ab" * 32


def credit(task: str, node: str, *, owner: str = "alice", job: str = "job-1", amount: int = 5,
           created_at: float = 1_700_000_000.0) -> Credit:
    return Credit(node=node, owner=owner, job=job, task=task, amount=amount, result_digest=DIGEST,
                  created_at=created_at)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"  # tmp_path is absolute: sqlite:////tmp/...


def open_any(url: str) -> LedgerStore:
    """The store `url` names (the factory takes every backend's URL now)."""
    return open_ledger(url)


@pytest.fixture
async def ledger(store_url: str) -> AsyncIterator[LedgerStore]:
    async with open_any(store_url) as store:
        yield store


# --- the contract, every backend -------------------------------------------------------------


async def test_a_new_ledger_is_empty(ledger: LedgerStore) -> None:
    assert await ledger.size() == 0
    assert await ledger.entries() == []
    assert await ledger.history("n1") == []
    assert await ledger.balances() == Balances(nodes=(), owners=(), total_credits=0, entries=0)


async def test_appending_returns_how_many_credits_were_new(ledger: LedgerStore) -> None:
    # Prepare
    await ledger.append([credit("t1", "n1")])

    # Execute
    added = await ledger.append([credit("t1", "n1"), credit("t1", "n2"), credit("t2", "n1")])

    # Assert
    assert added == 2
    assert await ledger.size() == 3


async def test_appending_nothing_adds_nothing(ledger: LedgerStore) -> None:
    assert await ledger.append([]) == 0
    assert await ledger.size() == 0


async def test_crediting_one_task_and_node_twice_adds_one_entry(ledger: LedgerStore) -> None:
    first = await ledger.append([credit("t1", "n1")])
    second = await ledger.append([credit("t1", "n1")])

    assert (first, second) == (1, 0)
    assert await ledger.size() == 1


async def test_crediting_one_task_and_node_concurrently_adds_one_entry(ledger: LedgerStore) -> None:
    added = await asyncio.gather(*(ledger.append([credit("t1", "n1")]) for _ in range(10)))

    assert sorted(added) == [0] * 9 + [1]
    assert await ledger.size() == 1


async def test_a_repeat_within_one_batch_is_stored_once(ledger: LedgerStore) -> None:
    added = await ledger.append([credit("t1", "n1"), credit("t1", "n1")])

    assert added == 1
    assert [e.seq for e in await ledger.entries()] == [1]


async def test_the_first_credit_for_a_task_and_node_stands(ledger: LedgerStore) -> None:
    # Prepare
    await ledger.append([credit("t1", "n1", amount=5)])

    # Execute: a replay with another amount must not overwrite or add
    await ledger.append([credit("t1", "n1", amount=500)])

    # Assert
    [entry] = await ledger.entries()
    assert entry.record.amount == 5


async def test_one_task_credits_each_of_its_nodes(ledger: LedgerStore) -> None:
    added = await ledger.append([credit("t1", "n1"), credit("t1", "n2", owner="bob")])

    assert added == 2


async def test_entries_keep_every_field(ledger: LedgerStore) -> None:
    original = credit("t7", "n3", owner="carol", job="job-9", amount=17, created_at=1_700_000_123.25)

    await ledger.append([original])

    [entry] = await ledger.entries()
    assert entry.seq == 1
    assert entry.record == original


async def test_seq_runs_from_one_without_gaps_despite_duplicates(ledger: LedgerStore) -> None:
    # Prepare: duplicates interleaved with new credits, across and within batches
    await ledger.append([credit("t1", "n1"), credit("t1", "n2")])
    await ledger.append([credit("t1", "n1"), credit("t2", "n1")])
    await ledger.append([credit("t2", "n1"), credit("t2", "n1"), credit("t3", "n1")])

    # Execute
    entries = await ledger.entries()

    # Assert
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert [(e.record.task, e.record.node) for e in entries] == [("t1", "n1"), ("t1", "n2"), ("t2", "n1"),
                                                                  ("t3", "n1")]
    assert await ledger.size() == 4


async def test_concurrent_appends_are_numbered_without_gaps(ledger: LedgerStore) -> None:
    batches = [[credit(f"t{i}", "n1"), credit(f"t{i}", "n2"), credit(f"t{i - 1}", "n1")] for i in range(20)]

    added = await asyncio.gather(*(ledger.append(b) for b in batches))

    entries = await ledger.entries()
    assert sum(added) == len(entries) == 41  # t-1..t19 on n1, t0..t19 on n2
    assert [e.seq for e in entries] == list(range(1, 42))
    assert len({(e.record.task, e.record.node) for e in entries}) == 41


async def test_balances_per_node_and_owner_equal_the_sums_of_entries(ledger: LedgerStore) -> None:
    # Prepare: alice runs n1 and n2, bob runs n3
    await ledger.append([
        credit("t1", "n1", amount=3), credit("t1", "n3", owner="bob", amount=3),
        credit("t2", "n2", amount=4), credit("t2", "n3", owner="bob", amount=4),
        credit("t3", "n1", amount=10),
    ])

    # Execute
    balances = await ledger.balances()

    # Assert
    assert balances == Balances(
        nodes=(NodeBalance("n1", "alice", 13, 2), NodeBalance("n3", "bob", 7, 2),
               NodeBalance("n2", "alice", 4, 1)),
        owners=(OwnerBalance("alice", 17, 3), OwnerBalance("bob", 7, 2)),
        total_credits=24, entries=5,
        accounts=(AccountBalance("alice", 0, 17, 0), AccountBalance("bob", 0, 7, 0)),
    )


async def test_balances_list_equal_credits_by_name(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "nb", owner="zed"), credit("t1", "na", owner="amy"),
                         credit("t1", "nc", owner="kim", amount=6)])

    balances = await ledger.balances()

    assert [b.node for b in balances.nodes] == ["nc", "na", "nb"]
    assert [b.owner for b in balances.owners] == ["kim", "amy", "zed"]


async def test_balances_serialise_to_the_documented_json(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "n1", amount=2)])

    doc = (await ledger.balances()).to_json()

    assert doc == {"nodes": [{"node": "n1", "owner": "alice", "credits": 2, "entries": 1}],
                   "owners": [{"owner": "alice", "credits": 2, "entries": 1}],
                   "total_credits": 2, "entries": 1,
                   "accounts": [{"account": "alice", "granted": 0, "earned": 2, "spent": 0, "balance": 2}],
                   "total_granted": 0}


async def test_history_lists_only_that_nodes_entries_in_seq_order(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "n1"), credit("t1", "n2"), credit("t2", "n1")])
    await ledger.append([credit("t3", "n2"), credit("t3", "n1")])

    history = await ledger.history("n1")

    assert [(e.seq, e.record.task) for e in history] == [(1, "t1"), (3, "t2"), (5, "t3")]
    assert all(e.record.node == "n1" for e in history)
    assert await ledger.history("nobody") == []


async def test_entries_pages_with_after_and_limit(ledger: LedgerStore) -> None:
    await ledger.append([credit(f"t{i}", "n1") for i in range(1, 6)])

    pages = [await ledger.entries(after=after, limit=2) for after in (0, 2, 4, 5)]

    assert [[e.seq for e in page] for page in pages] == [[1, 2], [3, 4], [5], []]
    assert [e.to_json()["task"] for e in pages[1]] == ["t3", "t4"]


async def test_entries_with_a_limit_below_one_returns_nothing(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "n1")])

    assert await ledger.entries(limit=0) == []
    assert await ledger.entries(limit=-1) == []


async def test_entry_json_has_the_documented_keys(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "n1")])

    [entry] = await ledger.entries()

    assert entry.to_json() == {"seq": 1, "kind": "credit", "node": "n1", "owner": "alice", "job": "job-1",
                               "task": "t1", "amount": 5, "result_digest": DIGEST, "created_at": 1_700_000_000.0,
                               "created_at_iso": "2023-11-14T22:13:20.000Z"}


async def test_a_closed_store_refuses_work_and_closes_again_quietly(ledger: LedgerStore) -> None:
    await ledger.close()

    with pytest.raises(StoreClosed):
        await ledger.size()
    with pytest.raises(StoreClosed):
        await ledger.append([credit("t1", "n1")])
    await ledger.close()


# --- the double entry: charges, grants, accounts ---------------------------------------------


def grant(account: str, amount: int, *, key: str = "g1", memo: str = "welcome",
          created_at: float = 1_700_000_000.0) -> Grant:
    return Grant(account=account, amount=amount, key=key, memo=memo, created_at=created_at)


def verified(task: str, submitter: str, paid: list[tuple[str, str]], *, amount: int = 5,
             job: str = "job-1") -> list[Credit | Charge]:
    """What the coordinator appends when a task is verified: a credit per (node, owner) and the
    submitter's charge for their sum, in one call."""
    credits = [credit(task, node, owner=owner, job=job, amount=amount) for node, owner in paid]
    return [*credits, charge_for(credits, account=submitter, created_at=1_700_000_000.0)]


async def test_entries_of_every_kind_keep_every_field(ledger: LedgerStore) -> None:
    records = [grant("alice", 1_000, key="start:acct-1", memo="starting grant"),
               *verified("t1", "alice", [("n1", "bob"), ("n2", "carol")], amount=7)]

    await ledger.append(records)

    entries = await ledger.entries()
    assert [e.record for e in entries] == records
    assert [e.kind for e in entries] == ["grant", "credit", "credit", "charge"]
    assert entries[3].to_json() == {"seq": 4, "kind": "charge", "account": "alice", "job": "job-1", "task": "t1",
                                    "amount": 14, "created_at": 1_700_000_000.0,
                                    "created_at_iso": "2023-11-14T22:13:20.000Z"}
    assert entries[0].to_json() == {"seq": 1, "kind": "grant", "account": "alice", "amount": 1_000,
                                    "key": "start:acct-1", "memo": "starting grant", "created_at": 1_700_000_000.0,
                                    "created_at_iso": "2023-11-14T22:13:20.000Z"}


async def test_a_task_is_charged_once_whatever_the_repeats(ledger: LedgerStore) -> None:
    # Attack: a replayed verdict (a redelivered batch, a restart) must not charge the submitter twice.
    await ledger.append(verified("t1", "alice", [("n1", "bob"), ("n2", "carol")]))

    again = await ledger.append(verified("t1", "alice", [("n1", "bob"), ("n2", "carol")]))
    other_amount = await ledger.append([Charge(account="alice", job="job-1", task="t1", amount=99,
                                               created_at=2.0)])

    assert (again, other_amount) == (0, 0)
    assert await ledger.account_balance("alice") == -10


async def test_a_grant_under_a_key_already_used_adds_nothing(ledger: LedgerStore) -> None:
    # Attack: a retried or replayed grant request must not grant twice, whatever its amount.
    first = await ledger.append([grant("alice", 100, key="start:acct-1")])
    again = await ledger.append([grant("alice", 100, key="start:acct-1"), grant("alice", 10**9, key="start:acct-1")])
    other = await ledger.append([grant("alice", 5, key="op-7")])

    assert (first, again, other) == (1, 0, 1)
    assert await ledger.account_balance("alice") == 105


async def test_keys_of_different_kinds_never_collide(ledger: LedgerStore) -> None:
    # A charge for t1, a credit for (t1, n1) and a grant whose key is "t1" are three entries.
    added = await ledger.append([credit("t1", "n1"), Charge(account="bob", job="job-1", task="t1", amount=5,
                                                             created_at=1.0), grant("carol", 3, key="t1")])

    assert added == 3


async def test_seq_runs_from_one_without_gaps_over_every_kind_despite_repeats(ledger: LedgerStore) -> None:
    await ledger.append([grant("alice", 100, key="a"), *verified("t1", "alice", [("n1", "bob")])])
    await ledger.append([grant("alice", 100, key="a"), *verified("t1", "alice", [("n1", "bob")]),
                         *verified("t2", "alice", [("n2", "carol")])])
    await ledger.append([grant("bob", 1, key="b"), grant("bob", 1, key="b")])

    entries = await ledger.entries()

    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.kind for e in entries] == ["grant", "credit", "charge", "credit", "charge", "grant"]
    assert await ledger.size() == 6


async def test_account_balance_is_granted_plus_earned_minus_spent(ledger: LedgerStore) -> None:
    # Prepare: alice is granted 100 and pays for t1, which bob's and carol's nodes ran; bob also
    # submits t2, which alice's node ran.
    await ledger.append([grant("alice", 100, key="a"), grant("bob", 50, key="b")])
    await ledger.append(verified("t1", "alice", [("n1", "bob"), ("n2", "carol")], amount=10))
    await ledger.append(verified("t2", "bob", [("n3", "alice")], amount=4))

    # Execute
    balances = [await ledger.account_balance(a) for a in ("alice", "bob", "carol", "nobody")]
    rows = (await ledger.balances()).accounts

    # Assert
    assert balances == [100 - 20 + 4, 50 + 10 - 4, 10, 0]
    assert rows == (AccountBalance("alice", 100, 4, 20), AccountBalance("bob", 50, 10, 4),
                    AccountBalance("carol", 0, 10, 0))
    assert sum(r.balance for r in rows) == 150 == (await ledger.balances()).total_granted


async def test_the_contributors_view_counts_credit_entries_only(ledger: LedgerStore) -> None:
    await ledger.append([grant("alice", 100, key="a"), *verified("t1", "alice", [("n1", "bob")], amount=3)])

    balances = await ledger.balances()

    assert (balances.total_credits, balances.entries) == (3, 1)
    assert balances.nodes == (NodeBalance("n1", "bob", 3, 1),)
    assert balances.owners == (OwnerBalance("bob", 3, 1),)
    assert balances.to_json()["accounts"] == [
        {"account": "alice", "granted": 100, "earned": 0, "spent": 3, "balance": 97},
        {"account": "bob", "granted": 0, "earned": 3, "spent": 0, "balance": 3}]
    assert balances.to_json()["total_granted"] == 100


async def test_account_history_lists_every_kind_of_that_account_in_seq_order(ledger: LedgerStore) -> None:
    await ledger.append([grant("alice", 100, key="a"), *verified("t1", "alice", [("n1", "bob")])])
    await ledger.append([*verified("t2", "bob", [("n2", "alice")]), grant("alice", 1, key="b")])

    history = await ledger.account_history("alice")

    assert [(e.seq, e.kind) for e in history] == [(1, "grant"), (3, "charge"), (4, "credit"), (6, "grant")]
    assert sum(e.delta for e in history) == await ledger.account_balance("alice") == 100 - 5 + 5 + 1
    assert await ledger.account_history("nobody") == []


async def test_a_nodes_history_holds_its_credits_only(ledger: LedgerStore) -> None:
    await ledger.append([grant("alice", 100, key="a"), *verified("t1", "alice", [("n1", "bob")])])

    assert [e.kind for e in await ledger.history("n1")] == ["credit"]
    assert await ledger.history("") == []  # charges and grants name no node


async def test_self_dealing_mints_nothing(ledger: LedgerStore) -> None:
    # Attack: mallory submits jobs that only her own nodes run. She pays what her nodes earn.
    await ledger.append([grant("mallory", 100, key="m")])
    for i in range(5):
        await ledger.append(verified(f"t{i}", "mallory", [("m1", "mallory"), ("m2", "mallory")], amount=50))

    balances = await ledger.balances()

    assert await ledger.account_balance("mallory") == 100
    assert balances.total_granted == 100 and balances.total_credits == 500


class _Ops:
    """Hypothesis strategies for a ledger's life: grants (keys may repeat), verified tasks and
    reopened tasks. A task drawn while it stands replays its verdict, as a redelivered batch or a
    restart would; drawn after a reopen it is verified again under new leases. A reopen of a
    standing task claws back its credits and refunds its charge; of a task not standing, it replays
    the last reopen (which must add nothing)."""

    accounts = st.sampled_from(["alice", "bob", "carol", "dave"])
    tasks = st.sampled_from([f"t{i}" for i in range(6)])
    grant = st.tuples(st.just("grant"), accounts, st.integers(1, 10**9), st.sampled_from(["k1", "k2", "k3", "k4"]))
    task = st.tuples(st.just("task"), accounts, tasks,
                     st.lists(st.tuples(st.sampled_from(["n1", "n2", "n3", "n4"]), accounts),
                              min_size=1, max_size=3, unique_by=lambda p: p[0]),
                     st.integers(1, 10**6))
    reopen = st.tuples(st.just("reopen"), tasks)
    batches = st.lists(st.lists(st.one_of(grant, task, reopen), min_size=1, max_size=4), min_size=1, max_size=8)


class _Model:
    """What the coordinator would append for each op, and which credits stand."""

    def __init__(self) -> None:
        self.standing: dict[str, list[Credit | Charge]] = {}  # task -> its verdict while verified
        self.verdicts: dict[str, int] = {}  # task -> verdicts so far: new leases for each
        self.last_reversal: dict[str, list[LedgerRecord]] = {}

    def records(self, op: tuple[Any, ...]) -> list[LedgerRecord]:
        if op[0] == "grant":
            _, account, amount, key = op
            return [grant(account, amount, key=key)]
        if op[0] == "task":
            _, submitter, task, paid, amount = op
            if task not in self.standing:
                n = self.verdicts[task] = self.verdicts.get(task, 0) + 1
                credits = [Credit(node=node, owner=owner, job="job-1", task=task, amount=amount,
                                  result_digest=DIGEST, created_at=1.0, ref=f"{task}-v{n}-{node}")
                           for node, owner in paid]
                self.standing[task] = [*credits, charge_for(credits, account=submitter, created_at=1.0)]
            return list(self.standing[task])
        _, task = op
        verdict = self.standing.pop(task, None)
        if verdict is not None:
            credits = [r for r in verdict if isinstance(r, Credit)]
            [charge] = [r for r in verdict if isinstance(r, Charge)]
            self.last_reversal[task] = reversal_of(credits, charge, bad_lease=credits[0].ref, reason="caught",
                                                   created_at=2.0)
        return list(self.last_reversal.get(task, []))

    def standing_credits(self) -> int:
        return sum(r.amount for verdict in self.standing.values() for r in verdict if isinstance(r, Credit))


@pytest.mark.parametrize("url", ["memory", "sqlite://", "postgres"])
@settings(max_examples=60, deadline=None)
@given(batches=_Ops.batches)
def test_account_balances_always_add_up_to_what_was_granted(url: str, batches: list[list[tuple[Any, ...]]]) -> None:
    """The conservation law, over random sequences of grants, verified tasks and reopened tasks."""
    if url == "postgres":
        require_service("PostgreSQL", HOST, PORT)

    async def run() -> None:
        async with AsyncExitStack() as stack:
            where = await stack.enter_async_context(fresh_schema()) if url == "postgres" else url
            await check(await stack.enter_async_context(open_any(where)))

    async def check(store: LedgerStore) -> None:
        model = _Model()
        for batch in batches:
            records = [r for op in batch for r in model.records(op)]
            await store.append(records)

            balances = await store.balances()
            assert sum(a.balance for a in balances.accounts) == balances.total_granted
            assert balances.total_credits == model.standing_credits()  # net of clawbacks
            for row in balances.accounts:
                history = await store.account_history(row.account)
                assert await store.account_balance(row.account) == row.balance == sum(e.delta for e in history)
        entries = await store.entries(limit=10_000)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        assert len({e.record.unique_key for e in entries}) == len(entries)

    asyncio.run(run())


# --- clawbacks and refunds: reopened tasks (issue 8) -----------------------------------------


def reopened(task: str, submitter: str, paid: list[tuple[str, str]], *, lease: str,
             amount: int = 5) -> tuple[list[Credit | Charge], list[LedgerRecord]]:
    """A verdict paying each (node, owner) under lease `lease`-node, and its reversal under `lease`."""
    credits = [Credit(node=node, owner=owner, job="job-1", task=task, amount=amount, result_digest=DIGEST,
                      created_at=1.0, ref=f"{lease}-{node}") for node, owner in paid]
    charge = charge_for(credits, account=submitter, created_at=1.0)
    return [*credits, charge], reversal_of(credits, charge, bad_lease=lease, reason="failed an audit",
                                           created_at=2.0)


async def test_clawbacks_and_refunds_keep_every_field(ledger: LedgerStore) -> None:
    verdict, reversal = reopened("t1", "alice", [("n1", "bob")], lease="l1", amount=7)

    await ledger.append([*verdict, *reversal])

    entries = await ledger.entries()
    assert [e.record for e in entries] == [*verdict, *reversal]
    assert [e.delta for e in entries] == [7, -7, -7, 7]
    assert entries[2].to_json() == {"seq": 3, "kind": "clawback", "account": "bob", "node": "n1", "job": "job-1",
                                    "task": "t1", "amount": 7, "reason": "failed an audit", "ref": "l1",
                                    "created_at": 2.0, "created_at_iso": "1970-01-01T00:00:02.000Z"}
    assert entries[3].to_json() == {"seq": 4, "kind": "refund", "account": "alice", "job": "job-1", "task": "t1",
                                    "amount": 7, "ref": "l1", "created_at": 2.0,
                                    "created_at_iso": "1970-01-01T00:00:02.000Z"}


async def test_a_reversal_is_written_once_whatever_the_repeats(ledger: LedgerStore) -> None:
    # Attack: a replayed reopen must not claw back or refund twice, nor leave a gap in seq.
    verdict, reversal = reopened("t1", "alice", [("n1", "bob"), ("n2", "carol")], lease="l1")
    await ledger.append([grant("alice", 100, key="a"), *verdict, *reversal])

    again = await ledger.append(reversal)
    other_amount = await ledger.append([Clawback(account="bob", node="n1", job="job-1", task="t1", amount=99,
                                                 reason="", ref="l1", created_at=3.0),
                                        Refund(account="alice", job="job-1", task="t1", amount=99, ref="l1",
                                               created_at=3.0)])

    assert (again, other_amount) == (0, 0)
    assert [e.seq for e in await ledger.entries()] == [1, 2, 3, 4, 5, 6, 7]
    assert [await ledger.account_balance(a) for a in ("alice", "bob", "carol")] == [100, 0, 0]


async def test_a_node_is_credited_again_for_a_task_after_a_clawback(ledger: LedgerStore) -> None:
    first, reversal = reopened("t1", "alice", [("n1", "bob")], lease="l1")
    second, _ = reopened("t1", "alice", [("n1", "bob")], lease="l2")

    added = [await ledger.append(first), await ledger.append(reversal), await ledger.append(second),
             await ledger.append(second)]

    assert added == [2, 2, 2, 0]  # the second verdict once, under its own leases
    assert [(e.kind, e.delta) for e in await ledger.history("n1")] == [("credit", 5), ("clawback", -5),
                                                                         ("credit", 5)]
    assert await ledger.contains(("credit", "t1", "n1", "l2-n1"))
    assert not await ledger.contains(("credit", "t1", "n1", "l3-n1"))


async def test_balances_show_credits_net_of_clawbacks_and_accounts_their_reversals(ledger: LedgerStore) -> None:
    # Prepare: alice pays for t1 (bob's n1 and carol's n2) and t2 (bob's n1); t1 is reopened.
    await ledger.append([grant("alice", 100, key="a")])
    t1, reversal = reopened("t1", "alice", [("n1", "bob"), ("n2", "carol")], lease="l1", amount=10)
    t2, _ = reopened("t2", "alice", [("n1", "bob")], lease="l2", amount=3)
    await ledger.append([*t1, *t2])
    await ledger.append(reversal)

    # Execute
    balances = await ledger.balances()

    # Assert
    assert balances.nodes == (NodeBalance("n1", "bob", 3, 1), NodeBalance("n2", "carol", 0, 0))
    assert balances.owners == (OwnerBalance("bob", 3, 1), OwnerBalance("carol", 0, 0))
    assert (balances.total_credits, balances.entries) == (3, 1)
    assert balances.accounts == (AccountBalance("alice", 100, 0, 23, 0, 20), AccountBalance("bob", 0, 13, 0, 10, 0),
                                 AccountBalance("carol", 0, 10, 0, 10, 0))
    assert [a.balance for a in balances.accounts] == [97, 3, 0]
    assert sum(a.balance for a in balances.accounts) == balances.total_granted == 100
    assert balances.to_json()["accounts"][1] == {"account": "bob", "granted": 0, "earned": 13, "spent": 0,
                                                 "clawed_back": 10, "refunded": 0, "balance": 3}
    assert [await ledger.account_balance(a) for a in ("alice", "bob", "carol")] == [97, 3, 0]


async def test_a_clawback_can_leave_an_owner_below_zero_and_still_conserve(ledger: LedgerStore) -> None:
    # bob spent what his node earned before it was caught: his balance goes negative, and nothing
    # is made or lost overall.
    await ledger.append([grant("alice", 100, key="a")])
    verdict, reversal = reopened("t1", "alice", [("n1", "bob")], lease="l1", amount=40)
    await ledger.append(verdict)
    await ledger.append(reopened("t2", "bob", [("n2", "carol")], lease="l2", amount=40)[0])

    await ledger.append(reversal)

    assert [await ledger.account_balance(a) for a in ("alice", "bob", "carol")] == [100, -40, 40]
    balances = await ledger.balances()
    assert sum(a.balance for a in balances.accounts) == balances.total_granted


# --- choosing a backend ----------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory", ":memory:"])
async def test_open_ledger_memory_gives_the_in_memory_twin(url: str) -> None:
    async with open_ledger(url) as store:
        assert isinstance(store, InMemoryLedgerStore)


async def test_open_ledger_sqlite_url_gives_an_sqlite_store_on_that_file(tmp_path: Path) -> None:
    async with open_ledger(sqlite_url(tmp_path)) as store:
        assert isinstance(store, SQLiteLedgerStore)
        await store.append([credit("t1", "n1")])

    assert (tmp_path / "ledger.db").exists()


async def test_open_ledger_postgresql_url_gives_a_postgres_store_on_that_database() -> None:
    # `--db postgresql://...` used to be refused; the ledger must land in the database (and the
    # schema) the URL names, tables created on first use.
    require_service("PostgreSQL", HOST, PORT)
    async with fresh_schema() as url:
        for spelling in (url, url.replace("postgresql://", "postgres://", 1)):
            async with open_ledger(spelling) as store:
                assert isinstance(store, PostgresLedgerStore)
                await store.append([credit("t1", "n1"), credit("t1", "n1")])
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT seq, kind, task, node FROM ledger_entries")
            tables = {r[0] for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
        finally:
            await conn.close()
    assert [tuple(r) for r in rows] == [(1, "credit", "t1", "n1")]
    assert {"ledger_entries", "ledger_head", "ledger_checkpoints"} <= tables


async def test_open_ledger_private_sqlite_memory_database_works() -> None:
    async with open_ledger("sqlite://") as store:
        assert await store.append([credit("t1", "n1"), credit("t1", "n1")]) == 1


@pytest.mark.parametrize("url", ["", "mysql://localhost/ledger", "sqlite:///", "ledger.db",
                                 "sqlite:/x.db", "postgresql://", "postgres:///?options=x"])
def test_open_ledger_rejects_what_it_cannot_open(url: str) -> None:
    with pytest.raises(LedgerError, match="ledger URL"):
        open_ledger(url)


# --- SQLite only -----------------------------------------------------------------------------


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path)) as conn:
        yield conn


async def test_sqlite_ledger_survives_reopening(tmp_path: Path) -> None:
    # Prepare
    async with open_ledger(sqlite_url(tmp_path)) as store:
        await store.append([credit("t1", "n1"), credit("t1", "n2", owner="bob", amount=7)])
        before = (await store.entries(), await store.balances())

    # Execute
    async with open_ledger(sqlite_url(tmp_path)) as store:
        after = (await store.entries(), await store.balances())
        replayed = await store.append([credit("t1", "n1"), credit("t2", "n1")])
        entries = await store.entries()

    # Assert: same log, the exactly-once key still holds, numbering carries on
    assert after == before
    assert replayed == 1
    assert [e.seq for e in entries] == [1, 2, 3]


async def test_sqlite_store_uses_wal_mode(tmp_path: Path) -> None:
    async with await SQLiteLedgerStore.open(tmp_path / "ledger.db"):
        with connect(tmp_path / "ledger.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_sqlite_open_reports_an_unusable_path_at_once(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as raised:
        await SQLiteLedgerStore.open(tmp_path / "no-such-dir" / "ledger.db")

    assert "no-such-dir" in raised.value.location


def test_insert_entries_in_a_rolled_back_transaction_leaves_nothing(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        # Prepare
        create_schema(conn)
        conn.commit()

        # Execute: the coordinator marks tasks verified and credits in one transaction, then fails
        conn.execute("BEGIN")
        inserted = insert_entries(conn, [credit("t1", "n1"), credit("t1", "n2")])
        conn.rollback()

        # Assert: nothing left, and the rolled-back rows did not use up seq numbers
        assert inserted == 2
        assert read_size(conn) == 0
        insert_entries(conn, [credit("t2", "n1")])
        conn.commit()
        assert [e.seq for e in read_entries(conn, 0, 10)] == [1]


def test_insert_entries_does_not_commit(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as writer, connect(tmp_path / "coordinator.db") as reader:
        create_schema(writer)
        writer.commit()

        insert_entries(writer, [credit("t1", "n1")])

        assert writer.in_transaction
        assert read_size(reader) == 0


def test_insert_entries_counts_only_new_rows(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        create_schema(conn)
        insert_entries(conn, [credit("t1", "n1")])

        inserted = insert_entries(conn, [credit("t1", "n1"), credit("t2", "n1"), credit("t2", "n1")])

        assert inserted == 1


def test_create_schema_leaves_the_callers_transaction_open(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        conn.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO tasks VALUES ('t1')")

        create_schema(conn)
        conn.rollback()

        assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone() == (0,)


def test_read_functions_ignore_the_callers_row_factory(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        conn.row_factory = sqlite3.Row
        create_schema(conn)
        insert_entries(conn, [credit("t1", "n1")])

        [entry] = read_entries(conn, 0, 10)

        assert entry.record == credit("t1", "n1")


async def test_a_store_and_the_coordinators_connection_share_one_file(tmp_path: Path) -> None:
    # Prepare: credits written the coordinator's way, in its own transaction
    with connect(tmp_path / "ledger.db") as conn:
        create_schema(conn)
        insert_entries(conn, [credit("t1", "n1"), credit("t1", "n2")])
        conn.commit()

    # Execute
    async with open_ledger(sqlite_url(tmp_path)) as store:
        size = await store.size()

    # Assert
    assert size == 2


def test_a_credits_only_ledger_of_an_earlier_version_is_migrated_in_place(tmp_path: Path) -> None:
    # Prepare: the table as it was before charges and grants, with two credits
    with connect(tmp_path / "coordinator.db") as conn:
        conn.execute("CREATE TABLE ledger_entries (seq INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, "
                     "owner TEXT NOT NULL, job TEXT NOT NULL, task TEXT NOT NULL, amount INTEGER NOT NULL "
                     "CHECK (amount > 0), result_digest TEXT NOT NULL, created_at REAL NOT NULL, "
                     "UNIQUE (task, node))")
        conn.executemany("INSERT INTO ledger_entries (node, owner, job, task, amount, result_digest, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [("n1", "alice", "job-1", "t1", 5, DIGEST, 1_700_000_000.0),
                          ("n2", "bob", "job-1", "t1", 5, DIGEST, 1_700_000_000.0)])
        conn.commit()

        # Execute
        create_schema(conn)
        conn.commit()
        replayed = insert_entries(conn, [credit("t1", "n1")])
        insert_entries(conn, [grant("alice", 7, key="a")])
        conn.commit()

        # Assert: same entries at the same seqs, still exactly once, numbering carries on
        entries = read_entries(conn, 0, 10)
        assert replayed == 0
        assert [(e.seq, e.record) for e in entries[:2]] == [(1, credit("t1", "n1")),
                                                             (2, credit("t1", "n2", owner="bob"))]
        assert [(e.seq, e.kind) for e in entries[2:]] == [(3, "grant")]
        assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master")} >= {
            "ledger_entries", "ledger_entries_node", "ledger_entries_account"}
        assert "ledger_entries_typed" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


def test_a_rolled_back_verdict_leaves_neither_credits_nor_charge(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        create_schema(conn)
        conn.commit()

        conn.execute("BEGIN")
        insert_entries(conn, verified("t1", "alice", [("n1", "bob"), ("n2", "carol")]))
        conn.rollback()

        assert read_size(conn) == 0
        assert read_account_balance(conn, "alice") == 0
