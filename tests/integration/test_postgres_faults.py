"""PostgreSQL going away mid-run, on a server of the test's own (tests/pg_server.py; the shared one
is never stopped): calls fail within a bounded time with a clear `StoreError` instead of hanging,
and work again once the server is back; a coordinator process rides the outage out and finishes
its job with every result credited once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.postgres_store import PostgresStore
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.store import StoreError
from sparecycles.cli.processes import ProcessGroup
from tests.conftest import IN_CI
from tests.pg_server import OwnPostgres, bindir, own_postgres

from .cpu_load import spinner
from .network import Network, submitter
from .test_end_to_end import assert_outputs_match, local_run
from .test_faults import assert_credited_once_per_result, health, ledger_consistent

pytestmark = pytest.mark.integration


@pytest.fixture
def pg() -> Iterator[OwnPostgres]:
    if bindir() is None:
        if IN_CI:
            pytest.fail("PostgreSQL's initdb and pg_ctl must be installed in CI")
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed; CI fails instead of skipping")
    with own_postgres() as server:
        yield server


async def test_calls_fail_fast_while_the_database_is_down_or_frozen_and_work_once_it_is_back(
        pg: OwnPostgres) -> None:
    store = PostgresStore(pg.url, connect_timeout=2.0, command_timeout=2.0)
    try:
        assert await store.grant("dave", 1, key="k1", memo="", created_at=1.0)

        # Down: the server stops as in a crash, connections drop.
        pg.stop()
        started = time.monotonic()
        with pytest.raises(StoreError, match="database unavailable"):
            await store.grant("dave", 1, key="k2", memo="", created_at=1.0)
        with pytest.raises(StoreError, match="database unavailable"):
            await store.account_balance("dave")
        assert time.monotonic() - started < 10

        # Back: the pool connects afresh; the failed grant was not half-written.
        pg.start()
        assert await store.grant("dave", 1, key="k2", memo="", created_at=1.0)
        assert await store.account_balance("dave") == 2

        # Frozen: the server accepts nothing and answers nothing (a hung host, a full disk stalling
        # writes). The statement timeout bounds the wait; nothing is committed.
        frozen = pg.processes()
        for p in frozen:
            p.suspend()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="database unavailable: no answer in time"):
                await store.grant("dave", 1, key="k3", memo="", created_at=1.0)
            assert time.monotonic() - started < 10
        finally:
            for p in frozen:
                p.resume()
        assert await store.grant("dave", 1, key="k3", memo="", created_at=1.0)
        assert [e.seq for e in await store.account_history("dave")] == [1, 2, 3]
    finally:
        await store.close()


async def test_a_store_opened_while_the_database_is_down_works_once_it_is_up(pg: OwnPostgres) -> None:
    pg.stop()
    store = PostgresStore(pg.url, connect_timeout=2.0, command_timeout=2.0)
    try:
        with pytest.raises(StoreError, match="database unavailable"):
            await store.load_rows()
        pg.start()
        assert (await store.load_rows()).jobs == []  # the schema is created now
    finally:
        await store.close()


@pytest.mark.timeout(240)  # on a loaded 2-core machine the job alone has taken 90 s
def test_a_coordinator_rides_out_a_database_outage_and_credits_each_result_once(
        pg: OwnPostgres, mosquitto_url: str, tmp_path: Path) -> None:
    """Attack/fault: PostgreSQL gone (3 s or more) while nodes keep returning results. Every commit fails
    and is retried; the audits asked for meanwhile (agreement of untrusted owners is audited at rate
    1.0) cannot read the model: they wait for the database instead of dying, which left their tasks
    waiting for an answer forever and the job never done (the flake this test had, under load)."""
    # 16 tasks of ~20 ms a node run (inputs inline, 64 KiB a task): light enough for a loaded
    # machine, and still running when the database goes (deep_mlp's 48 tasks are all in within
    # 0.5 s now, so the outage used to hit no result at all unless the machine was slow).
    model, x = spinner(), np.random.default_rng(5).standard_normal((1024, 256)).astype(np.float32)
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator("--key", str(tmp_path / "coordinator.key"), db_url=pg.url)
        net.start_node("alice")
        net.start_node("bob")

        async def submit_and_wait_for_progress() -> str:
            async with submitter(net.url) as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=64)
                while (await c.status(job["job"]))["tasks"]["verified"] < 2:
                    await asyncio.sleep(0.05)
                return str(job["job"])

        job_id = asyncio.run(submit_and_wait_for_progress())
        pg.stop()
        # Results keep arriving; every commit fails and is retried. Down for 3 s, and until an
        # audit asked for meanwhile has found the database away (a slow, loaded machine takes
        # longer to return the results whose agreement is audited).
        assert net.coordinator is not None
        down = time.monotonic()
        while time.monotonic() - down < 3.0 or "waits for the store" not in net.coordinator.log_text():
            assert time.monotonic() - down < 60, "no audit was asked for while the database was away"
            time.sleep(0.1)
        assert net.coordinator.running()
        pg.start()

        async def finish() -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
            async with submitter(net.url) as c:
                during = await c.status(job_id)
                return during, await c.wait(job_id, timeout=120), await c.outputs(job_id)

        during, status, outputs = asyncio.run(finish())
        assert during["tasks"]["verified"] < 16, "the job ended before the outage: it tested nothing"
        assert status["state"] == "done"
        assert_outputs_match(outputs, local_run(model, {"x": x}))
        problems, _, credits = asyncio.run(ledger_consistent(net))
        assert problems == []
        assert_credited_once_per_result(credits, tasks=16)
        counters = asyncio.run(health(net))["counters"]
        # every task audited and passed: none failed or went unchecked because of the outage
        assert counters["audit_passed"] == counters["audit_requested"] and "audit_unavailable" not in counters
        log = net.coordinator.log_path.read_text()
        assert "persisting a batch failed" in log and "database unavailable" in log
        assert "never retrieved" not in log  # no audit task died


async def test_trust_changes_whose_save_failed_are_saved_with_the_next_one(pg: OwnPostgres, tmp_path: Path) -> None:
    """Fault: the database away when the trust records are saved. `take_changed` hands the changes
    out once; dropped with the failed save, a penalty (a reset streak) would be gone after the next
    restart, and a node caught cheating would be trusted again."""
    c = Coordinator(CoordinatorSettings(db_url=pg.url, key_path=str(tmp_path / "coord.key")))
    try:
        c.engine.trust.failed("n1", "mallory", "wrong outputs", audited=True, now=1.0)
        pg.stop()
        with pytest.raises(StoreError, match="database unavailable"):
            await c._save_trust()
        pg.start()
        c.engine.trust.confirmed("n2", "bob", audited=True, now=2.0)
        await c._save_trust()
        saved = {(kind, name): record for kind, name, record in await c.store.load_trust()}
        assert saved[("node", "n1")]["invalid"] == 1 and saved[("owner", "mallory")]["invalid"] == 1
        assert ("node", "n2") in saved
    finally:
        await c.stop()
