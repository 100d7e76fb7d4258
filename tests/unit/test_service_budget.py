"""The coordinator reserves a job's cost before accepting it, settles charges as they commit, and
rebuilds reservations after a restart. Real stores (memory, SQLite); no broker: the engine is fed
directly, as the MQTT loop would."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from coordinator.budget import InsufficientCredit, estimate
from coordinator.jobs import JobOptions
from coordinator.models import inspect_model
from coordinator.records import JobRecord
from coordinator.scheduler import JobState
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from protocol.messages import Assignment, Result
from protocol.tensors import digest_tensors, tensors_from_arrays
from tests import models

MODEL = models.doubler(2)  # y = 2x, what run_tasks' honest nodes answer
# The cost per row is pinned so that the prices below are round numbers.
META = {**inspect_model(MODEL), "flops_per_row": 4_000}
INPUTS = {"x": np.arange(12, dtype=np.float32).reshape(6, 2)}
COST = estimate(4_000, [2, 2, 2], 2)  # 6 rows in tasks of 2, two replicas: 8 credits a task replica


def options(submitter: str) -> JobOptions:
    return JobOptions(replicas=2, task_size=2, max_results=None, final="argmax", submitter=submitter)


async def coordinator(db_url: str, tmp_path: Path) -> Coordinator:
    # Classic quorum, no audits: these tests are about reservations and charges, and feed the engine
    # directly (no service loop runs the audits it would ask for).
    c = Coordinator(CoordinatorSettings(db_url=db_url, key_path=str(tmp_path / "coord.key"),
                                        untrusted_audit_rate=0.0, adaptive=False))
    await c.store.put_model(META["model"], MODEL, META)  # a model's first job runs in the probe
    return c


_seq = itertools.count(1)


async def run_tasks(c: Coordinator, owners: tuple[str, ...], *, limit: int) -> None:
    """Nodes of `owners` answer honestly until `limit` tasks are verified, then commit. Every
    assignment the engine hands out, on a request or after a result, is answered."""
    pending: list[tuple[str, Assignment]] = []
    for i, owner in enumerate(owners):
        handed = c.engine.on_work_request(f"n{i}", owner, 1, next(_seq), now=0, now_wall=1)
        pending += [(node, a) for node, items in handed.items() for a in items]
    while sum(j.verified for j in c.engine.jobs.values()) < limit:
        assert pending, "no work left to hand out"
        node, a = pending.pop(0)
        assert a.inputs is not None
        outputs = {"y": a.inputs["x"].to_array() * 2}
        result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                        output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=None)
        handed = c.engine.on_result(node, result, outputs, None, now=1, now_wall=2)
        pending += [(n, b) for n, items in handed.items() for b in items]
    await c.flush()


@pytest.mark.parametrize("db", ["memory", "sqlite"])
async def test_a_job_the_submitter_cannot_pay_for_is_refused_whole(db: str, tmp_path: Path) -> None:
    # Attack: submitting work without the credit to pay for it.
    c = await coordinator("memory" if db == "memory" else f"sqlite:///{tmp_path}/c.db", tmp_path)
    try:
        await c.store.grant("dave", COST - 1, key="start:dave", memo="", created_at=1.0)

        with pytest.raises(InsufficientCredit) as refused:
            await c.create_job(META, INPUTS, options("dave"))

        assert refused.value.missing == 1
        assert c.engine.jobs == {} and (await c.store.load()).jobs == []
        assert c.budget.reserved("dave") == 0
    finally:
        await c.stop()


async def test_a_paid_job_reserves_its_cost_and_is_charged_exactly_that(tmp_path: Path) -> None:
    c = await coordinator("memory", tmp_path)
    try:
        # Prepare
        await c.store.grant("dave", COST + 5, key="start:dave", memo="", created_at=1.0)

        # Execute: reserved at submission; a second job no longer fits
        job = await c.create_job(META, INPUTS, options("dave"))
        assert c.budget.reserved("dave") == COST
        with pytest.raises(InsufficientCredit, match="dave has 5 available"):
            await c.create_job(META, INPUTS, options("dave"))
        await run_tasks(c, ("alice", "bob"), limit=3)

        # Assert: charged the estimate, nothing left reserved, credit conserved
        assert c.engine.jobs[job.spec.id].state is JobState.DONE
        assert await c.store.account_balance("dave") == 5
        assert c.budget.reserved("dave") == 0
        balances = await c.store.ledger_balances()
        assert sum(a.balance for a in balances.accounts) == balances.total_granted == COST + 5
    finally:
        await c.stop()


async def test_jobs_without_a_submitter_are_neither_reserved_nor_charged(tmp_path: Path) -> None:
    c = await coordinator("memory", tmp_path)
    try:
        await c.create_job(META, INPUTS, options(""))
        await run_tasks(c, ("alice", "bob"), limit=3)

        balances = await c.store.ledger_balances()
        assert balances.total_credits == COST and balances.total_granted == 0
        assert [e.kind for e in await c.store.ledger_entries(0, 100)] == ["credit"] * 6
    finally:
        await c.stop()


async def test_a_restart_reserves_what_the_open_tasks_can_still_cost(tmp_path: Path) -> None:
    # Prepare: one of three tasks verified and charged, then the process stops
    url = f"sqlite:///{tmp_path}/c.db"
    first = await coordinator(url, tmp_path)
    try:
        await first.store.grant("dave", 1_000, key="start:dave", memo="", created_at=1.0)
        job: JobRecord = await first.create_job(META, INPUTS, options("dave"))
        await run_tasks(first, ("alice", "bob"), limit=1)
        assert first.budget.reserved("dave") == COST * 2 // 3
    finally:
        await first.stop()

    # Execute
    second = await coordinator(url, tmp_path)
    try:
        await second._restore()

        # Assert: two open tasks reserved; the balance already paid for the first
        assert second.budget.reserved("dave") == COST * 2 // 3
        assert await second.store.account_balance("dave") == 1_000 - COST // 3
        await run_tasks(second, ("alice", "bob"), limit=3)
        assert second.engine.jobs[job.spec.id].state is JobState.DONE
        assert second.budget.reserved("dave") == 0
        assert await second.store.account_balance("dave") == 1_000 - COST
    finally:
        await second.stop()
