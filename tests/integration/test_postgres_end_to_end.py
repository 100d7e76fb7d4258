"""The end-to-end path once on PostgreSQL: a coordinator process on a schema of the shared server
(127.0.0.1:5432, database `test`), two nodes of two owners on the real Mosquitto, a job submitted
with the CLI, its outputs checked against a local run, and the ledger verified - then the
coordinator killed mid-job and restarted on the same database, crediting nothing twice."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protocol.npz import from_npz, to_npz
from sparecycles.cli.processes import ProcessGroup
from tests import models
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fetch, fresh_schema_sync

from .network import Network, submitter
from .test_end_to_end import assert_outputs_match, cli, local_run
from .test_faults import assert_credited_once_per_result, ledger_consistent

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_url() -> Iterator[str]:
    require_service("PostgreSQL", HOST, PORT)
    with fresh_schema_sync() as url:
        yield url


@pytest.fixture
def pg_network(mosquitto_url: str, pg_url: str, tmp_path: Path) -> Iterator[Network]:
    """A coordinator on `pg_url`, with its key in a file so that a restart keeps its identity (and
    with it its topic namespace): beside a SQLite file is the default, and there is none here."""
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator("--key", str(tmp_path / "coordinator.key"), db_url=pg_url)
        yield net


def restart(net: Network, pg_url: str) -> None:
    assert net.coordinator is not None
    net.coordinator.kill()  # SIGKILL: whatever was not committed is lost, and must be redone once
    time.sleep(0.5)
    net.start_coordinator("--key", str(net.tmp / "coordinator.key"), db_url=pg_url)


def test_a_job_on_postgresql_is_verified_credited_and_the_ledger_verifies(pg_network: Network, pg_url: str,
                                                                           tmp_path: Path) -> None:
    pg_network.start_node("alice")
    pg_network.start_node("bob")
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    (tmp_path / "m.onnx").write_bytes(model)
    (tmp_path / "in.npz").write_bytes(to_npz({"x": x}))

    done = cli("submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), "--coordinator", pg_network.url,
               "--task-size", "32", "-o", str(tmp_path / "out.npz"))

    assert done.returncode == 0, done.stderr
    assert_outputs_match(from_npz((tmp_path / "out.npz").read_bytes()), local_run(model, {"x": x}))
    balances = cli("ledger", "balances", "--coordinator", pg_network.url, "--json")
    assert balances.returncode == 0, balances.stderr
    owners = {o["owner"]: o for o in json.loads(balances.stdout)["owners"]}
    assert owners["alice"]["entries"] == owners["bob"]["entries"] == 10  # 300 rows / 32 -> 10 tasks
    verify = cli("ledger", "verify", "--coordinator", pg_network.url)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # ... and it all lives in PostgreSQL: no SQLite file, the credits in the schema's ledger
    assert not pg_network.db.exists()
    kinds = Counter(r["kind"] for r in asyncio.run(fetch(pg_url, "SELECT kind FROM ledger_entries")))
    assert kinds["credit"] == 20 and kinds["charge"] == 10
    seqs = [r[0] for r in asyncio.run(fetch(pg_url, "SELECT seq FROM ledger_entries ORDER BY seq"))]
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_coordinator_on_postgresql_killed_mid_job_resumes_and_credits_nothing_twice(pg_network: Network,
                                                                                       pg_url: str) -> None:
    pg_network.start_node("alice")
    pg_network.start_node("bob")
    model, x = models.deep_mlp(), np.random.default_rng(4).standard_normal((1536, 384)).astype(np.float32)

    async def submit_and_wait_for_progress() -> str:
        async with submitter(pg_network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=128)
            while (await c.status(job["job"]))["tasks"]["verified"] < 2:
                await asyncio.sleep(0.05)
            return str(job["job"])

    job_id = asyncio.run(submit_and_wait_for_progress())
    restart(pg_network, pg_url)

    async def finish() -> tuple[dict[str, object], dict[str, np.ndarray]]:
        async with submitter(pg_network.url) as c:
            return await c.wait(job_id, timeout=120), await c.outputs(job_id)

    status, outputs = asyncio.run(finish())
    assert status["state"] == "done"
    assert_outputs_match(outputs, local_run(model, {"x": x}))
    problems, _, credits = asyncio.run(ledger_consistent(pg_network))
    assert problems == []
    assert_credited_once_per_result(credits, tasks=12)
