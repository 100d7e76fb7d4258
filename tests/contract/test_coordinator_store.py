"""One contract, every CoordinatorStore backend (after Flower's StateTest)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.jobs import JobOptions, plan_job
from coordinator.records import (
    BlobPut,
    JobFinished,
    LeaseClosed,
    LeaseIssued,
    LeaseRecord,
    Op,
    ResultRecorded,
    TaskDecided,
)
from coordinator.scheduler import JobState, TaskState
from coordinator.store import CoordinatorStore
from coordinator.store_factory import open_store
from ledger.entries import Credit, Grant, charge_for
from ledger.errors import InvalidEntry

META = {"model": "a" * 64, "flops_per_row": 10,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CoordinatorStore]:
    s = open_store("memory" if request.param == "memory" else f"sqlite:///{tmp_path}/c.db")
    yield s
    await s.close()


def new_job(submitter: str = ""):  # type: ignore[no-untyped-def]
    return plan_job(META, {"x": np.ones((4, 2), dtype=np.float32)},
                    JobOptions(replicas=2, task_size=2, max_results=None, final="argmax", submitter=submitter),
                    now_wall=1.0, max_inline_bytes=1 << 20)


def lease(lid: str, task: str, job: str, node: str) -> LeaseRecord:
    return LeaseRecord(id=lid, task=task, job=job, node=node, owner=f"owner-{node}", issued_at=1.0,
                       expires_at=100.0, deadline=0.0)


def verdict(task: str, job: str, leases: tuple[str, ...], *, submitter: str = "") -> TaskDecided:
    credits = tuple(Credit(node=f"n{i}", owner=f"owner-n{i}", job=job, task=task, amount=5,
                           result_digest="d" * 64, created_at=2.0) for i in (1, 2))
    charge = charge_for(credits, account=submitter, created_at=2.0) if submitter else None
    return TaskDecided(task, TaskState.VERIFIED, "d" * 64, None, leases, credits, charge)


def accepted_ops(task: str, job: str) -> list[Op]:
    """Two nodes of two owners lease, run and report `task` with the same outputs."""
    return [LeaseIssued(lease(f"{task}-l1", task, job, "n1")), LeaseIssued(lease(f"{task}-l2", task, job, "n2")),
            ResultRecorded(f"{task}-l1", task, "n1", "owner-n1", "d" * 64, None, 2.0),
            ResultRecorded(f"{task}-l2", task, "n2", "owner-n2", "d" * 64, None, 2.0),
            LeaseClosed(f"{task}-l1", "reported"), LeaseClosed(f"{task}-l2", "reported")]


async def test_models_and_blobs_are_content_addressed_and_idempotent(store: CoordinatorStore) -> None:
    assert await store.put_model("m" * 64, b"onnx", {"model": "m" * 64}) is True
    assert await store.put_model("m" * 64, b"onnx", {"model": "m" * 64}) is False
    assert await store.get_model("m" * 64) == b"onnx"
    assert await store.model_meta("x" * 64) is None
    await store.put_blob("b" * 64, b"data")
    await store.put_blob("b" * 64, b"data")
    assert await store.get_blob("b" * 64) == b"data"


async def test_a_verdict_applied_twice_credits_once(store: CoordinatorStore) -> None:
    job, tasks, blobs = new_job()
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    ops = [LeaseIssued(lease("l1", t0, jid, "n1")), LeaseIssued(lease("l2", t0, jid, "n2")),
           ResultRecorded("l1", t0, "n1", "owner-n1", "d" * 64, None, 2.0),
           ResultRecorded("l2", t0, "n2", "owner-n2", "d" * 64, None, 2.0),
           LeaseClosed("l1", "reported"), LeaseClosed("l2", "reported"), BlobPut("d" * 64, b"out")]
    await store.apply([*ops, verdict(t0, jid, ("l1", "l2"))])
    await store.apply([verdict(t0, jid, ("l1", "l2"))])
    balances = await store.ledger_balances()
    assert balances.entries == 2 and balances.total_credits == 10
    accepted = await store.accepted(0, 100)
    assert {(a["task"], a["node"], a["task_state"]) for a in accepted} == {
        (t0, "n1", "verified"), (t0, "n2", "verified")}


async def test_load_returns_open_tasks_with_their_live_leases_and_votes(store: CoordinatorStore) -> None:
    job, tasks, blobs = new_job()
    jid, t0, t1 = job.spec.id, tasks[0].id, tasks[1].id
    await store.create_job(job, tasks, blobs)
    await store.apply([
        LeaseIssued(lease("l1", t0, jid, "n1")), LeaseIssued(lease("l2", t0, jid, "n2")),
        LeaseIssued(lease("l3", t1, jid, "n1")), LeaseIssued(lease("l4", t1, jid, "n2")),
        ResultRecorded("l3", t1, "n1", "owner-n1", "d" * 64, None, 2.0),
        ResultRecorded("l4", t1, "n2", "owner-n2", "d" * 64, None, 2.0),
        LeaseClosed("l3", "reported"), LeaseClosed("l4", "reported"),
        verdict(t1, jid, ("l3", "l4")),
        ResultRecorded("l1", t0, "n1", "owner-n1", "e" * 64, None, 2.0), LeaseClosed("l1", "reported"),
    ])
    snap = await store.load()
    assert [j.spec.id for j in snap.jobs] == [jid]
    assert snap.jobs[0].verified == 1 and snap.jobs[0].state is JobState.RUNNING
    open_task = next(t for t in snap.tasks if t.id == t0)
    assert {t.id for t in snap.tasks} == {t0}
    assert open_task.nodes == {"n1", "n2"} and open_task.attempts == 1
    assert [lv.id for lv in snap.live_leases] == ["l2"]
    assert [(v.lease, v.output_digest) for v in snap.votes] == [("l1", "e" * 64)]


async def test_a_restart_excludes_only_nodes_that_reported_or_still_hold_a_lease(store: CoordinatorStore) -> None:
    # Attack: after a restart, a node whose lease once expired must not be shut out of the task for
    # good: on a two-owner network that stalled the job. The restored exclusions must be the ones
    # the running engine kept.
    job, tasks, blobs = new_job()
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.apply([
        *(LeaseIssued(lease(f"l{i}", t0, jid, f"n{i}")) for i in range(1, 7)),
        LeaseClosed("l1", "expired"), LeaseClosed("l2", "offline"), LeaseClosed("l3", "released"),
        ResultRecorded("l4", t0, "n4", "owner-n4", "", "outputs contain NaN", 2.0), LeaseClosed("l4", "reported"),
        ResultRecorded("l5", t0, "n5", "owner-n5", "d" * 64, None, 2.0), LeaseClosed("l5", "reported"),
    ])
    snap = await store.load()
    task = next(t for t in snap.tasks if t.id == t0)
    assert task.nodes == {"n4", "n5", "n6"}
    assert task.owners == {"owner-n5", "owner-n6"}
    assert task.attempts == 4 and task.errors == 1  # expired, offline, two reported; released is no try
    assert [lv.id for lv in snap.live_leases] == ["l6"]
    assert [v.lease for v in snap.votes] == ["l5"]


async def test_a_lease_closes_once(store: CoordinatorStore) -> None:
    # A late duplicate (a QoS-1 redelivery, a sweep racing a result) must not rewrite how a lease
    # ended: a lease given back unrun stays "released" and never becomes a counted try.
    job, tasks, blobs = new_job()
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.apply([LeaseIssued(lease("l1", t0, jid, "n1")), LeaseClosed("l1", "released")])
    await store.apply([LeaseClosed("l1", "expired")])
    (task,) = [t for t in (await store.load()).tasks if t.id == t0]
    assert task.attempts == 0 and task.nodes == set()


async def test_finished_jobs_load_with_their_state_and_no_open_tasks(store: CoordinatorStore) -> None:
    job, tasks, blobs = new_job()
    await store.create_job(job, tasks, blobs)
    await store.apply([TaskDecided(t.id, TaskState.FAILED, None, "boom", (), ()) for t in tasks]
                      + [JobFinished(job.spec.id, JobState.FAILED, "2 of 2 tasks failed", 3.0)])
    snap = await store.load()
    assert snap.jobs[0].state is JobState.FAILED and snap.jobs[0].failed == 2 and not snap.tasks
    assert await store.canonical_digests(job.spec.id) == [None, None]


async def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    s = open_store(url)
    job, tasks, blobs = new_job()
    await s.create_job(job, tasks, blobs)
    await s.apply([verdict(tasks[0].id, job.spec.id, ())])
    await s.close()
    s2 = open_store(url)
    try:
        assert (await s2.ledger_balances()).entries == 2
        assert len((await s2.load()).tasks) == 1
    finally:
        await s2.close()


# --- the double entry: grants, charges, accounts ----------------------------------------------


async def test_a_verdict_charges_its_submitter_once_with_its_credits(store: CoordinatorStore) -> None:
    # Attack: a replayed verdict (a retried batch, a restart) must neither pay nor charge twice.
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    assert await store.grant("dave", 100, key="start:dave", memo="starting grant", created_at=1.0) is True

    await store.apply([*accepted_ops(t0, jid), verdict(t0, jid, (f"{t0}-l1", f"{t0}-l2"), submitter="dave")])
    await store.apply([verdict(t0, jid, (f"{t0}-l1", f"{t0}-l2"), submitter="dave")])

    assert await store.account_balance("dave") == 90
    assert [await store.account_balance(o) for o in ("owner-n1", "owner-n2", "nobody")] == [5, 5, 0]
    assert [(e.seq, e.kind, e.amount) for e in await store.account_history("dave")] == [
        (1, "grant", 100), (4, "charge", 10)]
    balances = await store.ledger_balances()
    assert balances.entries == 2 and balances.total_credits == 10
    assert sum(a.balance for a in balances.accounts) == balances.total_granted == 100


async def test_a_grant_under_a_used_key_adds_nothing(store: CoordinatorStore) -> None:
    # Attack: replaying an operator's grant request, or re-registering to get the starting grant again.
    first = await store.grant("dave", 100, key="start:acct-1", memo="", created_at=1.0)
    again = await store.grant("dave", 1_000, key="start:acct-1", memo="again", created_at=2.0)

    assert (first, again) == (True, False)
    assert await store.account_balance("dave") == 100
    [entry] = await store.account_history("dave")
    assert entry.record == Grant(account="dave", amount=100, key="start:acct-1", memo="", created_at=1.0)


async def test_an_invalid_grant_is_refused_before_it_reaches_the_ledger(store: CoordinatorStore) -> None:
    for amount in (0, -5):
        with pytest.raises(InvalidEntry):
            await store.grant("dave", amount, key=f"bad{amount}", memo="", created_at=1.0)

    assert await store.account_history("dave") == []


async def test_accepted_results_name_their_jobs_submitter(store: CoordinatorStore) -> None:
    # ledger verify needs the submitter to know who must have been charged for each verified task.
    paid, paid_tasks, paid_blobs = new_job(submitter="dave")
    free, free_tasks, free_blobs = new_job()
    await store.create_job(paid, paid_tasks, paid_blobs)
    await store.create_job(free, free_tasks, free_blobs)
    p0, f0 = paid_tasks[0].id, free_tasks[0].id

    await store.apply([*accepted_ops(p0, paid.spec.id), verdict(p0, paid.spec.id, (f"{p0}-l1",), submitter="dave"),
                       *accepted_ops(f0, free.spec.id), verdict(f0, free.spec.id, (f"{f0}-l1",))])

    rows = await store.accepted(0, 100)
    assert [(r["task"], r["submitter"]) for r in rows] == [(p0, "dave"), (f0, "")]
