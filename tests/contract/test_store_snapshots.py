"""Issue 11's store additions, on every CoordinatorStore backend: signed checkpoints kept one per
size, ledger reads as of a size (`upto`) that stay the same while the log grows, `verdict_seq` on
accepted results, a job's entries; and databases of the previous release opening with them."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import asyncpg
import pytest

from coordinator.postgres_schema import MIGRATIONS
from coordinator.store import CoordinatorStore
from coordinator.store_factory import open_store
from ledger.checkpoint import Checkpoint, MalformedCheckpoint, sign_checkpoint
from ledger.merkle import EMPTY_ROOT
from ledger.verify import find_discrepancies
from protocol.signing import Identity
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema

from .test_coordinator_store import new_job, paid_verdict, ran, reopen

KEY = Identity.generate()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CoordinatorStore]:
    s = open_store(store_url)
    yield s
    await s.close()


def checkpoint(size: int, *, timestamp_ms: int = 1_700_000_000_000) -> Checkpoint:
    # Any 32 bytes but the empty tree's: the store keeps roots and never checks them.
    root = hashlib.sha256(b"root %d %d" % (size, timestamp_ms)).digest() if size else EMPTY_ROOT
    return sign_checkpoint(KEY, size=size, root=root, timestamp_ms=timestamp_ms)


async def verified_tasks(store: CoordinatorStore, count: int, *, granted: bool = True) -> tuple[str, list[str]]:
    """dave's job (two tasks) granted 1,000 credits, and its first `count` tasks each verified in a
    batch of its own by n1 and n2: 1 grant + 3 entries per task. Returns the job and its tasks."""
    job, tasks, blobs = new_job(submitter="dave")
    jid = job.spec.id
    await store.create_job(job, tasks, blobs)
    if granted:
        await store.grant("dave", 1_000, key=f"start:{jid}", memo="", created_at=1.0)
    for t in tasks[:count]:
        await store.apply([*ran(t.id, jid, {"n1": f"{t.id}-a", "n2": f"{t.id}-b"}),
                           paid_verdict(t.id, jid, {"n1": f"{t.id}-a", "n2": f"{t.id}-b"}, amount=1)])
    return jid, [t.id for t in tasks]  # amount 1: what 2 rows of 10 FLOPs are worth, so verify passes


# --- checkpoints -------------------------------------------------------------------------------


async def test_a_new_store_has_no_checkpoint(store: CoordinatorStore) -> None:
    assert await store.latest_checkpoint() is None
    assert await store.checkpoints() == []


async def test_a_store_keeps_one_checkpoint_per_size_the_first_one_and_lists_them_in_order(
        store: CoordinatorStore) -> None:
    # Attack: a coordinator re-signing an old size with another root (a rewritten history) must not
    # replace the checkpoint verifiers were shown before; the first one of each size stands.
    first = {size: checkpoint(size) for size in (5, 0, 12, 3)}

    for cp in first.values():
        await store.save_checkpoint(cp)
    await store.save_checkpoint(checkpoint(5, timestamp_ms=1_700_000_999_000))
    await store.save_checkpoint(first[12])

    assert await store.checkpoints(after_size=-1) == [first[s] for s in (0, 3, 5, 12)]
    assert await store.checkpoints() == [first[s] for s in (3, 5, 12)]  # size > after_size = 0
    assert await store.latest_checkpoint() == first[12]
    assert await store.checkpoints(after_size=3) == [first[5], first[12]]
    assert await store.checkpoints(limit=2) == [first[3], first[5]]
    assert await store.checkpoints(after_size=12) == []
    assert await store.checkpoints(limit=0) == []
    assert await store.checkpoints(after_size=2**70) == []  # out of SQL range: nothing, not a crash


async def test_a_checkpoint_comes_back_byte_for_byte_and_still_verifies(store: CoordinatorStore) -> None:
    cp = checkpoint(7)

    await store.save_checkpoint(cp)

    back = await store.latest_checkpoint()
    assert back == cp and back is not None
    back.verify(KEY.public_key)


# --- upto: consistent snapshots ---------------------------------------------------------------


async def test_reads_upto_a_size_stay_identical_while_entries_are_appended_after_it(store: CoordinatorStore) -> None:
    # Attack (on the verifier): reading entries, accepted results and balances in three requests
    # while credits commit in between gave false alarms; read as of one size they must agree
    # however much is written after it.
    jid, tasks = await verified_tasks(store, 1)
    size = len(await store.ledger_entries(0, 1000))
    entries = await store.ledger_entries(0, 1000, upto=size)
    accepted = await store.accepted(0, 1000, upto=size)
    balances = await store.ledger_balances(upto=size)
    assert find_discrepancies([e.to_json() for e in entries], accepted, balances.to_json()) == []

    await store.apply([*ran(tasks[1], jid, {"n1": f"{tasks[1]}-a", "n3": f"{tasks[1]}-c"}),
                       paid_verdict(tasks[1], jid, {"n1": f"{tasks[1]}-a", "n3": f"{tasks[1]}-c"})])
    await store.grant("erin", 50, key="g-erin", memo="", created_at=3.0)

    assert len(await store.ledger_entries(0, 1000)) == size + 4
    assert await store.ledger_entries(0, 1000, upto=size) == entries
    assert await store.accepted(0, 1000, upto=size) == accepted
    assert await store.ledger_balances(upto=size) == balances
    assert await store.ledger_balances() != balances
    assert len(await store.accepted(0, 1000)) == len(accepted) + 2


async def test_upto_pages_like_the_full_reads(store: CoordinatorStore) -> None:
    await verified_tasks(store, 2)  # 1 grant + 2 x (2 credits + 1 charge) = 7 entries

    assert [e.seq for e in await store.ledger_entries(2, 3, upto=4)] == [3, 4]
    assert [e.seq for e in await store.ledger_entries(0, 2, upto=7)] == [1, 2]
    assert await store.ledger_entries(5, 10, upto=4) == []
    assert await store.ledger_entries(0, 10, upto=0) == []
    assert await store.ledger_entries(0, 100, upto=2**70) == await store.ledger_entries(0, 100)
    assert (await store.ledger_balances(upto=0)).accounts == ()
    assert await store.ledger_balances(upto=2**70) == await store.ledger_balances()


async def test_accepted_rows_carry_the_ledger_size_after_their_verdict(store: CoordinatorStore) -> None:
    _, tasks = await verified_tasks(store, 2)  # grant = 1; task 0 -> 2..4; task 1 -> 5..7

    rows = await store.accepted(0, 100)

    assert [(r["task"], r["verdict_seq"]) for r in rows] == [(tasks[0], 4), (tasks[0], 4), (tasks[1], 7),
                                                             (tasks[1], 7)]
    assert [r["task"] for r in await store.accepted(0, 100, upto=6)] == [tasks[0], tasks[0]]
    assert await store.accepted(0, 100, upto=3) == []
    assert [r["seq"] for r in await store.accepted(rows[0]["seq"], 1, upto=7)] == [rows[1]["seq"]]


async def test_a_verdict_reopened_and_decided_again_carries_the_newest_size(store: CoordinatorStore) -> None:
    # A reopen claws back (2 entries: clawback, refund); the new verdict after it is what the row's
    # verdict_seq must name, or a snapshot before the new credits would list the new results.
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    first = paid_verdict(t0, jid, {"n1": f"{t0}-a"})
    await store.apply([*ran(t0, jid, {"n1": f"{t0}-a"}), first])  # entries 2, 3
    await store.apply([reopen(first, jid, f"{t0}-a")])  # 4, 5
    assert await store.accepted(0, 100) == []

    second = paid_verdict(t0, jid, {"n2": f"{t0}-b"})
    await store.apply([*ran(t0, jid, {"n2": f"{t0}-b"}), second])  # 6, 7

    rows = await store.accepted(0, 100)
    assert [(r["node"], r["verdict_seq"]) for r in rows] == [("n2", 7)]
    assert await store.accepted(0, 100, upto=6) == []


async def test_a_replayed_verdict_keeps_its_first_verdict_seq(store: CoordinatorStore) -> None:
    # Attack: a redelivered batch must not move a verified task's verdict out of the snapshots
    # that already hold its credits.
    jid, tasks = await verified_tasks(store, 1)
    await store.grant("erin", 5, key="g-erin", memo="", created_at=3.0)

    await store.apply([paid_verdict(tasks[0], jid, {"n1": f"{tasks[0]}-a", "n2": f"{tasks[0]}-b"})])

    assert {r["verdict_seq"] for r in await store.accepted(0, 100)} == {4}


# --- a job's entries ----------------------------------------------------------------------------


async def test_a_jobs_entries_are_its_credits_charges_and_reversals_in_order(store: CoordinatorStore) -> None:
    jid, tasks = await verified_tasks(store, 1)
    other, _ = await verified_tasks(store, 1, granted=False)
    first = paid_verdict(tasks[0], jid, {"n1": f"{tasks[0]}-a", "n2": f"{tasks[0]}-b"})
    await store.apply([reopen(first, jid, f"{tasks[0]}-a")])

    entries = await store.ledger_job(jid)

    assert [e.kind for e in entries] == ["credit", "credit", "charge", "clawback", "clawback", "refund"]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert all(getattr(e.record, "job", None) == jid for e in entries)
    assert [e.kind for e in await store.ledger_job(other)] == ["credit", "credit", "charge"]
    assert await store.ledger_job("no-such-job") == []


# --- databases of the previous release --------------------------------------------------------


async def test_a_sqlite_database_without_the_new_table_and_column_opens_and_works(tmp_path: Path) -> None:
    # The previous release's database: a verified task, no verdict_seq, no ledger_checkpoints.
    path = tmp_path / "old.db"
    old = open_store(f"sqlite:///{path}")
    jid, tasks = await verified_tasks(old, 1)
    await old.close()
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("ALTER TABLE tasks DROP COLUMN verdict_seq")
        conn.execute("DROP TABLE ledger_checkpoints")
        conn.commit()

    store = open_store(f"sqlite:///{path}")
    try:
        await works_after_migration(store, jid, tasks)
    finally:
        await store.close()


async def test_a_postgres_database_of_the_previous_version_migrates_and_works() -> None:
    require_service("PostgreSQL", HOST, PORT)
    async with fresh_schema() as url:
        old = open_store(url)
        jid, tasks = await verified_tasks(old, 1)
        await old.close()
        conn = await asyncpg.connect(url)
        try:  # back to version 1, as the previous release left it
            await conn.execute("ALTER TABLE tasks DROP COLUMN verdict_seq")
            await conn.execute("DROP TABLE ledger_checkpoints")
            await conn.execute("UPDATE schema_version SET version = 1")
        finally:
            await conn.close()

        store = open_store(url)
        try:
            await works_after_migration(store, jid, tasks)
        finally:
            await store.close()
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT version FROM schema_version") == len(MIGRATIONS) == 2
        finally:
            await conn.close()


async def works_after_migration(store: CoordinatorStore, jid: str, tasks: list[str]) -> None:
    """The old task's results are in every snapshot (verdict_seq 0); new verdicts and checkpoints
    are recorded as on a new database."""
    assert [r["verdict_seq"] for r in await store.accepted(0, 100)] == [0, 0]
    assert len(await store.accepted(0, 100, upto=0)) == 2
    assert await store.latest_checkpoint() is None
    lease = {"n1": f"{tasks[1]}-a"}
    await store.apply([*ran(tasks[1], jid, lease), paid_verdict(tasks[1], jid, lease)])
    await store.save_checkpoint(checkpoint(6))
    assert [r["verdict_seq"] for r in await store.accepted(0, 100)] == [0, 0, 6]
    assert await store.latest_checkpoint() == checkpoint(6)


async def test_a_hand_edited_checkpoint_row_is_named_not_served(tmp_path: Path) -> None:
    # Attack: an operator editing a stored checkpoint into garbage must get an error saying what is
    # wrong, not a checkpoint with a truncated root served to verifiers.
    path = tmp_path / "c.db"
    store = open_store(f"sqlite:///{path}")
    try:
        await store.save_checkpoint(checkpoint(3))
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("UPDATE ledger_checkpoints SET root = x'00'")
            conn.commit()
        with pytest.raises(MalformedCheckpoint, match="root must be 32 bytes"):
            await store.latest_checkpoint()
    finally:
        await store.close()
