"""`sparecycles ledger verify` from outside, against a real coordinator with real nodes: it passes
after a job and keeps passing while another job is crediting (one snapshot, no false alarm), on
SQLite and on PostgreSQL; and it catches an operator who edits, deletes, reorders or inserts
ledger rows in the live database behind the coordinator's back, each in turn, and passes again
once the row is put back."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from sparecycles.cli.processes import ProcessGroup
from tests import models
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema_sync

from .network import Network, submitter
from .test_ledger_log import wait_for_checkpoint

pytestmark = pytest.mark.integration


def verify(url: str, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sparecycles", "ledger", "verify", "--coordinator", url,
                           "--state-dir", str(state), *extra], capture_output=True, text=True, timeout=120,
                          check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0 and "ledger OK" in result.stdout, result.stdout + result.stderr


def assert_caught(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1 and "FAILED" in result.stdout, result.stdout + result.stderr
    assert all(w in result.stdout for w in words), result.stdout


async def run_job(url: str, rows: int, task_size: int) -> str:
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(rows).standard_normal((rows, 8)).astype(np.float32)
    async with submitter(url) as c:
        job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=task_size)
        status = await c.wait(job["job"], timeout=180)
    assert status["state"] == "done", status
    return str(job["job"])


@pytest.fixture(params=["sqlite", "postgres"])
def network(request: pytest.FixtureRequest, mosquitto_url: str, tmp_path: Path) -> Iterator[Network]:
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        if request.param == "sqlite":
            net.start_coordinator()
            yield net
        else:
            require_service("PostgreSQL", HOST, PORT)
            with fresh_schema_sync() as url:
                net.start_coordinator("--key", str(tmp_path / "coordinator.key"), db_url=url)
                yield net


def test_verify_passes_after_a_job_and_while_another_one_is_being_credited(network: Network,
                                                                             tmp_path: Path) -> None:
    """Attack: none - the false alarm. Entries, accepted results and balances read in separate
    requests while credits keep arriving used to disagree; read as of one signed checkpoint, they
    cannot."""
    network.start_node("alice")
    network.start_node("bob")
    state = tmp_path / "verifier"
    asyncio.run(run_job(network.url, rows=60, task_size=10))
    assert_ok(verify(network.url, state))

    busy = threading.Thread(target=lambda: asyncio.run(run_job(network.url, rows=2000, task_size=5)))
    busy.start()
    try:
        results = [verify(network.url, state) for _ in range(3)]
    finally:
        busy.join(timeout=240)
    assert not busy.is_alive()
    for result in results:
        assert_ok(result)
    # What it remembered from the runs before is consistent with the newest: said in its summary.
    final = verify(network.url, state)
    assert_ok(final)
    assert "earlier checkpoints consistent" in final.stdout and " 0 earlier" not in final.stdout


# (what the operator runs on the live database, what puts it back)
INSERTED = ("INSERT INTO ledger_entries (kind, account, amount, job, task, node, ref, result_digest, memo, created_at) "
            "SELECT kind, account, amount, job, task, node, 'forged', result_digest, memo, created_at "
            "FROM ledger_entries WHERE seq = {k}")
TAMPERING = {
    "edited amount": ("UPDATE ledger_entries SET amount = 999999999, result_digest = 'deadbeef' WHERE seq = {k}",
                      "UPDATE ledger_entries SET amount = {amount}, result_digest = '{digest}' WHERE seq = {k}"),
    "deleted entry": ("DELETE FROM ledger_entries WHERE seq = {k}",
                      "INSERT INTO ledger_entries SELECT * FROM saved WHERE seq = {k}"),
    "reordered entries": (
        "UPDATE ledger_entries SET seq = CASE seq WHEN {k} THEN -1 ELSE seq END WHERE seq = {k};"
        "UPDATE ledger_entries SET seq = {k} WHERE seq = {k} + 1;"
        "UPDATE ledger_entries SET seq = {k} + 1 WHERE seq = -1",
        "DELETE FROM ledger_entries WHERE seq IN ({k}, {k} + 1);"
        "INSERT INTO ledger_entries SELECT * FROM saved WHERE seq IN ({k}, {k} + 1)"),
}

CAUGHT_BY = {"edited amount": "do not hash to the root", "deleted entry": "entries were removed",
             "reordered entries": "do not hash to the root"}


def run_sql(db: Path, script: str) -> None:
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.executescript(f"BEGIN IMMEDIATE; {script}; COMMIT;")


def test_verify_catches_rows_edited_deleted_reordered_or_inserted_in_the_live_database(
        mosquitto_url: str, tmp_path: Path) -> None:
    """Attack: the operator (who holds the coordinator's key, and so could sign anything) changes
    the ledger in the database directly while the coordinator runs. A verifier that remembers an
    earlier checkpoint recomputes the root of the entries served and finds it differs; put back,
    the ledger verifies again."""
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator()
        net.start_node("alice")
        net.start_node("bob")
        state = tmp_path / "verifier"
        asyncio.run(run_job(net.url, rows=60, task_size=10))
        with closing(sqlite3.connect(net.db)) as conn:
            size = conn.execute("SELECT MAX(seq) FROM ledger_entries").fetchone()[0]
            k, amount, digest = conn.execute(
                "SELECT seq, amount, result_digest FROM ledger_entries WHERE kind = 'credit' ORDER BY seq LIMIT 1"
            ).fetchone()
        wait_for_checkpoint(net.url, size, timeout=10)
        assert_ok(verify(net.url, state))
        run_sql(net.db, "CREATE TABLE saved AS SELECT * FROM ledger_entries")

        for name, (tamper, restore) in TAMPERING.items():
            fields = {"k": k, "amount": amount, "digest": digest}
            run_sql(net.db, tamper.format(**fields))
            try:
                assert_caught(verify(net.url, state), CAUGHT_BY[name])
            finally:
                run_sql(net.db, restore.format(**fields))
            assert_ok(verify(net.url, state))

        # An entry added at the end is a new leaf like any other: the coordinator signs it into its
        # next checkpoint. What gives it away is its content: a second credit for a (task, node)
        # whose result was accepted once. (It cannot be taken back: it is in the signed log now.)
        run_sql(net.db, INSERTED.format(k=k))
        wait_for_checkpoint(net.url, size + 1, timeout=10)
        assert_caught(verify(net.url, state), "is credited again")


def test_a_node_keeps_receipts_for_its_credit_and_its_owner_checks_them(mosquitto_url: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: a coordinator that later drops or rewrites a node's credit. The node keeps, in its
    own state directory, each credit with an inclusion proof against a signed checkpoint; its owner
    checks them from outside, and they stop verifying if the log is rewritten under them."""
    monkeypatch.setenv("SPARECYCLES_NODE_RECEIPTS_SECONDS", "0.5")
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator()
        net.start_node("alice")
        net.start_node("bob")
        asyncio.run(run_job(net.url, rows=60, task_size=10))
        deadline = time.monotonic() + 30
        kept: list[str] = []
        while time.monotonic() < deadline:
            kept = [p for p in tmp_path.glob("node*.key.receipts/receipts.jsonl") if p.read_text().strip()]
            if len(kept) == 2:
                break
            time.sleep(0.2)
        assert len(kept) == 2, f"receipts kept by {kept}"
        for path in kept:
            assert (path.parent / "checkpoint.json").exists()
            assert_ok(verify(net.url, tmp_path / f"verifier-{path.parent.name}", "--receipts", str(path.parent)))

        # The operator rewrites one of the receipted credits: the receipt no longer verifies.
        run_sql(net.db, "UPDATE ledger_entries SET amount = amount + 1 WHERE seq = (SELECT MIN(seq) FROM "
                        "ledger_entries WHERE kind = 'credit')")
        results = [verify(net.url, tmp_path / "verifier-after", "--receipts", str(p.parent)) for p in kept]
        assert all(r.returncode == 1 for r in results), [r.stdout for r in results]
