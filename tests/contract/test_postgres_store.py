"""PostgreSQL-only checks of the coordinator's store and the ledger on it: the schema and its version,
seq numbers without gaps across failed transactions and concurrent writers, and URLs that never show
their password. Going away and coming back: tests/integration/test_postgres_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from coordinator.postgres_schema import MIGRATIONS
from coordinator.store import CoordinatorStore, StoreError
from coordinator.store_factory import open_store
from ledger.entries import Grant
from ledger.postgres import PostgresLedgerStore, redact
from sparecycles.cli.processes import free_port
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema, schema_url

from .test_coordinator_store import accepted_ops, new_job, paid_verdict, reopen, verdict


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    require_service("PostgreSQL", HOST, PORT)
    async with fresh_schema() as url:
        yield url


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[CoordinatorStore]:
    s = open_store(pg_url)
    yield s
    await s.close()


async def test_the_schema_is_created_on_first_use_at_the_current_version(pg_url: str, store: CoordinatorStore) -> None:
    await store.load_rows()

    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT version FROM schema_version") == len(MIGRATIONS)
        tables = {r[0] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()")}
    finally:
        await conn.close()
    assert {"jobs", "tasks", "leases", "results", "blobs", "blob_refs", "ledger_entries", "ledger_head"} <= tables


async def test_two_coordinators_starting_together_migrate_once(pg_url: str) -> None:
    stores = [open_store(pg_url) for _ in range(3)]
    try:
        await asyncio.gather(*(s.load_rows() for s in stores))
    finally:
        for s in stores:
            await s.close()

    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetch("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    finally:
        await conn.close()


async def test_a_database_of_a_newer_version_is_refused(pg_url: str, store: CoordinatorStore) -> None:
    await store.load_rows()
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("UPDATE schema_version SET version = version + 1")
    finally:
        await conn.close()

    newer = open_store(pg_url)
    try:
        with pytest.raises(StoreError, match="newer than this coordinator"):
            await newer.load_rows()
    finally:
        await newer.close()


async def test_a_search_path_naming_no_schema_is_a_clear_error() -> None:
    require_service("PostgreSQL", HOST, PORT)
    store = open_store(schema_url("no_such_schema_here"))
    try:
        with pytest.raises(StoreError, match="no schema to create"):
            await store.load_rows()
    finally:
        await store.close()


async def test_a_failed_batch_leaves_no_gap_in_the_ledgers_seq(store: CoordinatorStore) -> None:
    # A sequence would burn the numbers of the rolled-back entries; the ledger numbers them itself.
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0, t1 = job.spec.id, tasks[0].id, tasks[1].id
    await store.create_job(job, tasks, blobs)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    first = paid_verdict(t0, jid, {"n1": f"{t0}-a"})
    await store.apply([*accepted_ops(t0, jid), first])
    await store.apply([reopen(first, jid, f"{t0}-a")])
    clash = paid_verdict(t1, jid, {"n2": f"{t1}-a"})  # fine on its own, written before the clash
    with pytest.raises(StoreError, match="reuses ledger keys"):
        await store.apply([clash, paid_verdict(t0, jid, {"n1": f"{t0}-a", "n2": f"{t0}-b"})])

    await store.apply([clash])

    entries = await store.ledger_entries(0, 100)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.kind for e in entries[-2:]] == ["credit", "charge"]


async def test_two_coordinators_on_one_database_number_the_ledger_without_gaps(pg_url: str) -> None:
    # Several coordinators on one database (DESIGN.md §10) share one log: their writers take turns.
    stores = [open_store(pg_url) for _ in range(2)]
    try:
        await asyncio.gather(*(s.grant(f"acct{i}", 1, key=f"k{s_i}-{i}", memo="", created_at=1.0)
                               for s_i, s in enumerate(stores) for i in range(25)))
        entries = await stores[0].ledger_entries(0, 100)
    finally:
        for s in stores:
            await s.close()

    assert [e.seq for e in entries] == list(range(1, 51))


async def test_the_ledger_store_reads_what_the_coordinator_wrote_and_carries_on(pg_url: str,
                                                                                 store: CoordinatorStore) -> None:
    job, tasks, blobs = new_job()
    await store.create_job(job, tasks, blobs)
    await store.apply([*accepted_ops(tasks[0].id, job.spec.id), verdict(tasks[0].id, job.spec.id, ("a", "b"))])

    async with PostgresLedgerStore(pg_url) as ledger:
        assert await ledger.size() == 2
        assert await ledger.append([Grant(account="dave", amount=5, key="g", memo="", created_at=2.0)]) == 1
    async with PostgresLedgerStore(pg_url) as ledger:
        assert [e.seq for e in await ledger.entries()] == [1, 2, 3]


def test_a_url_is_shown_without_its_password() -> None:
    shown = redact("postgresql://coord:s3cret@db.example:5432/sc?password=s3cret&options=-csearch_path%3Dx")

    assert "s3cret" not in shown
    assert shown.startswith("postgresql://coord:***@db.example:5432/sc?")


async def test_an_unreachable_server_fails_fast_and_never_shows_the_password() -> None:
    # Attack (on the operator's secret): a failing connection's error ends up in logs that more
    # people read than the configuration; the password must not be in it.
    store = open_store(f"postgresql://coord:s3cret@127.0.0.1:{free_port()}/sc")
    try:
        with pytest.raises(StoreError, match="database unavailable") as raised:
            await asyncio.wait_for(store.load_rows(), 10)
    finally:
        await store.close()
    assert "s3cret" not in str(raised.value) and "coord:***@127.0.0.1" in str(raised.value)


def test_a_postgres_url_without_a_database_is_refused() -> None:
    with pytest.raises(StoreError, match="names a server and a database"):
        open_store("postgresql://")

