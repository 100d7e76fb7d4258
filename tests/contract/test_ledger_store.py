"""The LedgerStore contract, run against every backend; backend-only checks at the end."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from ledger.entries import Balances, Credit, NodeBalance, OwnerBalance
from ledger.errors import LedgerError, StorageError, StoreClosed
from ledger.factory import open_ledger
from ledger.sqlite import SQLiteLedgerStore, create_schema, insert_credits, read_entries, read_size
from ledger.store import InMemoryLedgerStore, LedgerStore

DIGEST = "ab" * 32


def credit(task: str, node: str, *, owner: str = "alice", job: str = "job-1", amount: int = 5,
           created_at: float = 1_700_000_000.0) -> Credit:
    return Credit(node=node, owner=owner, job=job, task=task, amount=amount, result_digest=DIGEST,
                  created_at=created_at)


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"  # tmp_path is absolute: sqlite:////tmp/...


@pytest.fixture(params=["memory", "sqlite"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    url = "memory" if request.param == "memory" else sqlite_url(tmp_path)
    async with open_ledger(url) as store:
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
    assert entry.credit.amount == 5


async def test_one_task_credits_each_of_its_nodes(ledger: LedgerStore) -> None:
    added = await ledger.append([credit("t1", "n1"), credit("t1", "n2", owner="bob")])

    assert added == 2


async def test_entries_keep_every_field(ledger: LedgerStore) -> None:
    original = credit("t7", "n3", owner="carol", job="job-9", amount=17, created_at=1_700_000_123.25)

    await ledger.append([original])

    [entry] = await ledger.entries()
    assert entry.seq == 1
    assert entry.credit == original


async def test_seq_runs_from_one_without_gaps_despite_duplicates(ledger: LedgerStore) -> None:
    # Prepare: duplicates interleaved with new credits, across and within batches
    await ledger.append([credit("t1", "n1"), credit("t1", "n2")])
    await ledger.append([credit("t1", "n1"), credit("t2", "n1")])
    await ledger.append([credit("t2", "n1"), credit("t2", "n1"), credit("t3", "n1")])

    # Execute
    entries = await ledger.entries()

    # Assert
    assert [e.seq for e in entries] == [1, 2, 3, 4]
    assert [(e.credit.task, e.credit.node) for e in entries] == [("t1", "n1"), ("t1", "n2"), ("t2", "n1"),
                                                                  ("t3", "n1")]
    assert await ledger.size() == 4


async def test_concurrent_appends_are_numbered_without_gaps(ledger: LedgerStore) -> None:
    batches = [[credit(f"t{i}", "n1"), credit(f"t{i}", "n2"), credit(f"t{i - 1}", "n1")] for i in range(20)]

    added = await asyncio.gather(*(ledger.append(b) for b in batches))

    entries = await ledger.entries()
    assert sum(added) == len(entries) == 41  # t-1..t19 on n1, t0..t19 on n2
    assert [e.seq for e in entries] == list(range(1, 42))
    assert len({(e.credit.task, e.credit.node) for e in entries}) == 41


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
                   "total_credits": 2, "entries": 1}


async def test_history_lists_only_that_nodes_entries_in_seq_order(ledger: LedgerStore) -> None:
    await ledger.append([credit("t1", "n1"), credit("t1", "n2"), credit("t2", "n1")])
    await ledger.append([credit("t3", "n2"), credit("t3", "n1")])

    history = await ledger.history("n1")

    assert [(e.seq, e.credit.task) for e in history] == [(1, "t1"), (3, "t2"), (5, "t3")]
    assert all(e.credit.node == "n1" for e in history)
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

    assert entry.to_json() == {"seq": 1, "node": "n1", "owner": "alice", "job": "job-1", "task": "t1",
                               "amount": 5, "result_digest": DIGEST, "created_at": 1_700_000_000.0}


async def test_a_closed_store_refuses_work_and_closes_again_quietly(ledger: LedgerStore) -> None:
    await ledger.close()

    with pytest.raises(StoreClosed):
        await ledger.size()
    with pytest.raises(StoreClosed):
        await ledger.append([credit("t1", "n1")])
    await ledger.close()


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


async def test_open_ledger_private_sqlite_memory_database_works() -> None:
    async with open_ledger("sqlite://") as store:
        assert await store.append([credit("t1", "n1"), credit("t1", "n1")]) == 1


@pytest.mark.parametrize("url", ["", "postgres://localhost/ledger", "sqlite:///", "ledger.db",
                                 "sqlite:/x.db"])
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


def test_insert_credits_in_a_rolled_back_transaction_leaves_nothing(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        # Prepare
        create_schema(conn)
        conn.commit()

        # Execute: the coordinator marks tasks verified and credits in one transaction, then fails
        conn.execute("BEGIN")
        inserted = insert_credits(conn, [credit("t1", "n1"), credit("t1", "n2")])
        conn.rollback()

        # Assert: nothing left, and the rolled-back rows did not use up seq numbers
        assert inserted == 2
        assert read_size(conn) == 0
        insert_credits(conn, [credit("t2", "n1")])
        conn.commit()
        assert [e.seq for e in read_entries(conn, 0, 10)] == [1]


def test_insert_credits_does_not_commit(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as writer, connect(tmp_path / "coordinator.db") as reader:
        create_schema(writer)
        writer.commit()

        insert_credits(writer, [credit("t1", "n1")])

        assert writer.in_transaction
        assert read_size(reader) == 0


def test_insert_credits_counts_only_new_rows(tmp_path: Path) -> None:
    with connect(tmp_path / "coordinator.db") as conn:
        create_schema(conn)
        insert_credits(conn, [credit("t1", "n1")])

        inserted = insert_credits(conn, [credit("t1", "n1"), credit("t2", "n1"), credit("t2", "n1")])

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
        insert_credits(conn, [credit("t1", "n1")])

        [entry] = read_entries(conn, 0, 10)

        assert entry.credit == credit("t1", "n1")


async def test_a_store_and_the_coordinators_connection_share_one_file(tmp_path: Path) -> None:
    # Prepare: credits written the coordinator's way, in its own transaction
    with connect(tmp_path / "ledger.db") as conn:
        create_schema(conn)
        insert_credits(conn, [credit("t1", "n1"), credit("t1", "n2")])
        conn.commit()

    # Execute
    async with open_ledger(sqlite_url(tmp_path)) as store:
        size = await store.size()

    # Assert
    assert size == 2
