"""Exactly once under faults (issue 11): a coordinator killed by SIGKILL at each point where credits
are being recorded comes back with every accepted result credited once and its log verifying, on
SQLite and on PostgreSQL (a schema of the shared server at 127.0.0.1:5432; nothing is stopped).

The crash points are the coordinator's failpoints (coordinator/failpoints.py), armed through
SPARECYCLES_FAILPOINTS in the crashing run only:
- ledger.after_insert: inside the verdict transaction, the ledger entries inserted, not committed.
  Attack/fault: a half-written batch (credits without their verdict, or a seq taken twice after
  the restart) would be paid twice or leave a gap in the log.
- ledger.after_commit: the batch committed, nothing else done. The nodes' results are recorded but
  the process never acted on it: the restart must not decide (and pay for) those tasks again.
- checkpoint.before_save: entries absorbed and signed, the checkpoint lost. The next start must
  sign the same log (no entry skipped or counted twice in the tree).
- checkpoint.after_save: the checkpoint saved, the process dead. The next start must accept its own
  checkpoint and extend it: a checkpoint seen before the crash stays a prefix of every later one.

Each run: a first coordinator (no failpoint) registers two nodes and the submitter, whose starting
grants are the first entries, and signs a checkpoint a verifier would remember. It stops cleanly;
the second, same key, same database, armed, gets the job and dies at the point; the third, not
armed, finishes it. Then: outputs equal a local run; each task paid once per agreeing owner
(assert_credited_once_per_result) and the ledger's own cross-checks pass; the newest checkpoint is
signed by the key, its root equals the root recomputed from every entry read straight from the
database; and the checkpoint remembered before the job and the last one saved before the crash are
both proven prefixes of it, over HTTP, by `ledger.outside.check` (what `sparecycles ledger verify`
runs) and by RFC 6962 consistency proofs checked here.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.failpoints import ENV as FAILPOINTS
from coordinator.failpoints import POINTS
from coordinator.store_factory import open_store
from ledger.checkpoint import Checkpoint, decode_proof
from ledger.entries import Entry
from ledger.merkle import leaf_hash, root_of, verify_consistency
from ledger.outside import Evidence, check
from sparecycles.cli.processes import ProcessGroup
from tests import models
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema_sync

from .network import Network, submitter
from .test_end_to_end import assert_outputs_match, local_run
from .test_faults import assert_credited_once_per_result, ledger_consistent
from .test_ledger_log import get, wait_for_checkpoint

pytestmark = pytest.mark.integration

TASKS = 40
# The Nth hit of each point: the second batch of verdicts (the first one's credits committed before
# the crash), or the first checkpoint of the job (the pre-job one was signed by the unarmed run).
ARMED = {"ledger.after_insert": 2, "ledger.after_commit": 2, "checkpoint.before_save": 1,
         "checkpoint.after_save": 1}
# Classic quorum, no audits: a verdict commits as soon as its second result is in, so the job's
# verdicts come in many batches (with audits, a loaded machine's slow first sandbox start lets
# them pile up into one or two, and a point armed for the 2nd batch may never be reached). What
# is recorded at each point is the same either way.
COORDINATOR_ARGS = ("--checkpoint-seconds", "0.2", "--untrusted-audit-rate", "0", "--no-adaptive")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'coordinator.db'}"
        return
    require_service("PostgreSQL", HOST, PORT)
    with fresh_schema_sync() as url:
        yield url


def test_every_crash_point_is_armed_here() -> None:
    # A point added to coordinator/failpoints.py without a crash test here would go untested.
    assert set(ARMED) == set(POINTS)


async def stored(url: str) -> tuple[list[Entry], Checkpoint | None]:
    """Every entry and the newest checkpoint, read from the database itself (not over HTTP)."""
    store = open_store(url)
    try:
        return await store.ledger_entries(0, 1_000_000), await store.latest_checkpoint()
    finally:
        await store.close()


def consistency(url: str, old: Checkpoint, new: Checkpoint) -> list[bytes]:
    if old.size == new.size:
        return []
    body = get(f"{url}/v1/ledger/proof/consistency?old={old.size}&new={new.size}")
    return list(decode_proof(body["proof"]))


def outside_check(url: str, newest: Checkpoint, public_key: bytes, remembered: list[Checkpoint],
                  proofs: dict[int, list[bytes]]) -> list[str]:
    """`ledger.outside.check` on one snapshot at the newest checkpoint's size, as served over HTTP."""
    entries = get(f"{url}/v1/ledger/entries?after=0&limit={newest.size}&upto={newest.size}")["entries"]
    accepted = get(f"{url}/v1/ledger/accepted?after=0&limit=100000&upto={newest.size}")["accepted"]
    balances = get(f"{url}/v1/ledger/balances?upto={newest.size}")
    return check(Evidence(checkpoint=newest, public_key=public_key, entries=entries, accepted=accepted,
                          balances=balances, remembered=remembered,
                          consistency={size: proof for size, proof in proofs.items() if size < newest.size}))


@pytest.mark.parametrize("point", list(ARMED))
def test_a_coordinator_killed_at_a_crash_point_credits_each_result_once_and_its_log_verifies(
        point: str, db_url: str, mosquitto_url: str, tmp_path: Path) -> None:
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(11).standard_normal((TASKS * 5, 8)).astype(np.float32)
    args = ("--key", str(tmp_path / "coordinator.key"), *COORDINATOR_ARGS)
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator(*args, db_url=db_url)
        net.start_node("alice")
        net.start_node("bob")
        url = net.url
        public_key = bytes.fromhex(get(f"{url}/v1/info")["public_key"])

        async def register() -> None:
            async with submitter(url):
                pass

        asyncio.run(register())
        # The three starting grants, under a checkpoint a contributor would have remembered.
        before_job, _ = wait_for_checkpoint(url, 3, 10.0)
        assert net.coordinator is not None and net.coordinator.terminate() == 0

        group.env[FAILPOINTS] = f"{point}:{ARMED[point]}"
        try:
            armed = net.start_coordinator(*args, db_url=db_url)
        finally:
            del group.env[FAILPOINTS]  # the nodes and the next coordinator run unarmed

        async def submit() -> str:
            async with submitter(url) as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=5)
                return str(job["job"])

        job_id = asyncio.run(submit())
        code = armed.wait(60)
        assert code == -signal.SIGKILL, f"the coordinator did not die at {point}: {code}\n{armed.log_tail()}"
        assert f"failpoint {point} hit {ARMED[point]}: SIGKILL" in armed.log_text()
        entries_at_crash, last_before_crash = asyncio.run(stored(db_url))
        assert last_before_crash is not None and last_before_crash.size >= before_job.size
        if point == "checkpoint.after_save":
            assert last_before_crash.size > before_job.size  # it saved one covering the job's credits
        time.sleep(0.2)
        net.start_coordinator(*args, db_url=db_url)

        async def finish() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            async with submitter(url) as c:
                return await c.wait(job_id, timeout=120), await c.outputs(job_id)

        status, outputs = asyncio.run(finish())
        assert status["state"] == "done" and status["tasks"]["verified"] == TASKS
        assert_outputs_match(outputs, local_run(model, {"x": x}))
        problems, _, credits = asyncio.run(ledger_consistent(net))
        assert problems == []
        assert_credited_once_per_result(credits, tasks=TASKS)

        # The log: every entry (straight from the database) under the newest signed checkpoint.
        everything = len(get(f"{url}/v1/ledger/entries?after=0&limit=100000")["entries"])
        newest, _ = wait_for_checkpoint(url, everything, 10.0)
        newest.verify(public_key)
        entries, latest = asyncio.run(stored(db_url))
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1)) and len(entries) == newest.size
        assert entries[:len(entries_at_crash)] == entries_at_crash  # committed before the crash: untouched
        assert latest == newest
        assert root_of(leaf_hash(e.record.leaf_bytes()) for e in entries) == newest.root

        # The checkpoints seen before the crash are prefixes of the newest: proven here and by
        # the outside verifier, which also recomputes the root from the entries served over HTTP.
        proofs: dict[int, list[bytes]] = {}
        for old in (before_job, last_before_crash):
            old.verify(public_key)
            proofs[old.size] = consistency(url, old, newest)
            verify_consistency(old.size, newest.size, old.root, newest.root, proofs[old.size])
        assert outside_check(url, newest, public_key, [before_job, last_before_crash], proofs) == []
