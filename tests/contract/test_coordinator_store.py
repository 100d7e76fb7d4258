"""One contract, every CoordinatorStore backend (after Flower's StateTest)."""

from __future__ import annotations

from collections.abc import AsyncIterator

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
    TaskReopened,
)
from coordinator.scheduler import JobState, TaskState
from coordinator.store import CoordinatorStore, StoreError
from coordinator.store_factory import open_store
from ledger.entries import Charge, Credit, Grant, charge_for
from ledger.errors import InvalidEntry
from ledger.verify import find_discrepancies

META = {"model": "a" * 64, "flops_per_row": 10,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CoordinatorStore]:
    s = open_store(store_url)
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
    ops: list[Op] = [LeaseIssued(lease("l1", t0, jid, "n1")), LeaseIssued(lease("l2", t0, jid, "n2")),
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
    assert task.attempts == 2 and task.errors == 1  # only results are tries: the two reported leases
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


async def test_state_survives_reopening(durable_url: str) -> None:
    url = durable_url
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


# --- reopened tasks: clawbacks, refunds, and a second verdict (issue 8) ------------------------


def paid_verdict(task: str, job: str, nodes: dict[str, str], *, submitter: str = "dave",
                 amount: int = 5) -> TaskDecided:
    """A verdict paying each node (node -> the lease accepted from it) under that lease's ref, as
    the engine writes it."""
    credits = tuple(Credit(node=node, owner=f"owner-{node}", job=job, task=task, amount=amount,
                           result_digest="d" * 64, created_at=2.0, ref=lid) for node, lid in nodes.items())
    charge = charge_for(credits, account=submitter, created_at=2.0) if submitter else None
    return TaskDecided(task, TaskState.VERIFIED, "d" * 64, None, tuple(nodes.values()), credits, charge)


def ran(task: str, job: str, nodes: dict[str, str], digest: str = "d" * 64) -> list[Op]:
    """Each node leases, runs and reports `task` (node -> its lease)."""
    ops: list[Op] = []
    for node, lid in nodes.items():
        ops += [LeaseIssued(lease(lid, task, job, node)),
                ResultRecorded(lid, task, node, f"owner-{node}", digest, None, 2.0), LeaseClosed(lid, "reported")]
    return ops


def reopen(decided: TaskDecided, job: str, bad_lease: str, *, job_reopened: bool = False) -> TaskReopened:
    return TaskReopened(task=decided.task, job=job, reason="node n1 failed an audit", bad_lease=bad_lease,
                        credits=decided.credits, charge=decided.charge, job_reopened=job_reopened, at=3.0)


async def documents(store: CoordinatorStore) -> tuple[list[dict[str, object]], list[dict[str, object]],
                                                      dict[str, object]]:
    """What `sparecycles ledger verify` fetches: entries, accepted results, balances."""
    entries = [e.to_json() for e in await store.ledger_entries(0, 10_000)]
    # The amounts here are made up to tell verdicts apart, not priced: leave out the cost model's
    # inputs so that verify checks the bookkeeping only (pricing: the test below this one).
    accepted = [{k: v for k, v in row.items() if k not in ("rows", "flops_per_row")}
                for row in await store.accepted(0, 10_000)]
    return entries, accepted, (await store.ledger_balances()).to_json()


async def test_accepted_rows_carry_what_prices_their_credit(store: CoordinatorStore) -> None:
    """Attack: an operator pays a friend's node more than its rows are worth. The accepted rows carry
    the task's rows and the job's FLOPs per row, so a verifier recomputes every amount."""
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.apply([*ran(t0, jid, {"n1": f"{t0}-a"}), paid_verdict(t0, jid, {"n1": f"{t0}-a"}, amount=1)])
    [row] = await store.accepted(0, 10)
    assert (row["rows"], row["flops_per_row"]) == (tasks[0].stop - tasks[0].start, META["flops_per_row"])
    entries = [e.to_json() for e in await store.ledger_entries(0, 100)]
    balances = (await store.ledger_balances()).to_json()
    assert find_discrepancies(entries, [row], balances) == []  # 2 rows x 10 FLOPs: 1 credit, the minimum
    inflated = [{**e, "amount": 9} if e["kind"] in ("credit", "charge") else e for e in entries]
    assert any("does not follow from the cost model" in p for p in find_discrepancies(inflated, [row], balances))


async def assert_conserved(store: CoordinatorStore) -> None:
    balances = await store.ledger_balances()
    assert sum(a.balance for a in balances.accounts) == balances.total_granted
    for row in balances.accounts:
        assert await store.account_balance(row.account) == row.balance


async def submitted_and_verified(store: CoordinatorStore) -> tuple[str, str, str, TaskDecided]:
    """dave's job, granted 100; its first task run by n1 alone (a trusted node's solo result) and
    verified. Returns the job, that task, the other task, and the verdict."""
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    decided = paid_verdict(t0, jid, {"n1": f"{t0}-a"}, amount=7)
    await store.apply([*ran(t0, jid, {"n1": f"{t0}-a"}), decided])
    return jid, t0, tasks[1].id, decided


async def test_a_reopen_claws_back_and_refunds_exactly_once(store: CoordinatorStore) -> None:
    # Attack: a replayed reopen (a retried batch, a restart) must neither claw back nor refund twice.
    jid, t0, _, decided = await submitted_and_verified(store)
    assert [await store.account_balance(a) for a in ("dave", "owner-n1")] == [93, 7]

    await store.apply([reopen(decided, jid, f"{t0}-a")])
    await store.apply([reopen(decided, jid, f"{t0}-a")])

    kinds = [(e.kind, e.account, e.amount) for e in await store.ledger_entries(0, 100)]
    assert kinds == [("grant", "dave", 100), ("credit", "owner-n1", 7), ("charge", "dave", 7),
                     ("clawback", "owner-n1", 7), ("refund", "dave", 7)]
    assert [await store.account_balance(a) for a in ("dave", "owner-n1")] == [100, 0]
    balances = await store.ledger_balances()
    assert (balances.total_credits, balances.entries) == (0, 0)  # the contributors' view is net
    [owner] = [a for a in balances.accounts if a.account == "owner-n1"]
    assert (owner.earned, owner.clawed_back, owner.balance) == (7, 7, 0)
    assert [e.kind for e in await store.ledger_history("n1")] == ["credit", "clawback"]
    assert await store.canonical_digests(jid) == [None, None]
    assert await store.accepted(0, 100) == []  # a result clawed back is no longer accepted
    await assert_conserved(store)


async def test_a_reopened_task_takes_a_new_verdict_that_credits_and_charges_again(store: CoordinatorStore) -> None:
    # The caught node's task runs again; n1 (say, cleared) and n2 both run it, so n1 is credited a
    # second time for the same task, under its new lease.
    jid, t0, _, first = await submitted_and_verified(store)
    await store.apply([reopen(first, jid, f"{t0}-a")])

    second = paid_verdict(t0, jid, {"n1": f"{t0}-b", "n2": f"{t0}-c"}, amount=7)
    await store.apply([*ran(t0, jid, {"n1": f"{t0}-b", "n2": f"{t0}-c"}), second])

    assert [await store.account_balance(a) for a in ("dave", "owner-n1", "owner-n2")] == [86, 7, 7]
    assert [(e.kind, e.amount) for e in await store.ledger_history("n1")] == [
        ("credit", 7), ("clawback", 7), ("credit", 7)]
    assert await store.canonical_digests(jid) == ["d" * 64, None]
    assert {(r["node"], r["task_state"]) for r in await store.accepted(0, 100)} == {
        ("n1", "verified"), ("n2", "verified")}
    await assert_conserved(store)


async def test_replays_after_a_second_verdict_change_nothing(store: CoordinatorStore) -> None:
    # Attack: an old batch replayed late must not re-verify the task on the result no longer believed,
    # nor reopen the task again, nor pay or charge anyone twice.
    jid, t0, _, first = await submitted_and_verified(store)
    second = paid_verdict(t0, jid, {"n2": f"{t0}-b", "n3": f"{t0}-c"})
    await store.apply([reopen(first, jid, f"{t0}-a")])
    await store.apply([*ran(t0, jid, {"n2": f"{t0}-b", "n3": f"{t0}-c"}), second])
    size = len(await store.ledger_entries(0, 100))

    await store.apply([first])
    await store.apply([reopen(first, jid, f"{t0}-a")])
    await store.apply([second])

    assert len(await store.ledger_entries(0, 100)) == size
    assert await store.canonical_digests(jid) == ["d" * 64, None]
    assert {r["node"] for r in await store.accepted(0, 100)} == {"n2", "n3"}
    assert [await store.account_balance(a) for a in ("dave", "owner-n1", "owner-n2")] == [90, 0, 5]


async def test_an_old_verdict_replayed_onto_the_reopened_task_is_dropped(store: CoordinatorStore) -> None:
    # Attack: the verdict that stood on the cheat's result, redelivered while the task is open again.
    jid, t0, _, first = await submitted_and_verified(store)
    await store.apply([reopen(first, jid, f"{t0}-a")])

    await store.apply([first])

    assert await store.canonical_digests(jid) == [None, None]
    assert [t.id for t in (await store.load()).tasks if t.id == t0] == [t0]
    assert await store.account_balance("owner-n1") == 0


async def test_verdict_reopen_and_new_verdict_in_one_batch_apply_in_order(store: CoordinatorStore) -> None:
    jid, t0, _, first = await submitted_and_verified(store)
    second = paid_verdict(t0, jid, {"n2": f"{t0}-b"}, amount=7)

    await store.apply([reopen(first, jid, f"{t0}-a"), *ran(t0, jid, {"n2": f"{t0}-b"}), second])

    assert [e.kind for e in await store.ledger_entries(0, 100)] == [
        "grant", "credit", "charge", "clawback", "refund", "credit", "charge"]
    assert await store.canonical_digests(jid) == ["d" * 64, None]
    assert [await store.account_balance(a) for a in ("dave", "owner-n1", "owner-n2")] == [93, 0, 7]


async def test_verdicts_built_without_refs_are_keyed_by_their_accepted_leases(store: CoordinatorStore) -> None:
    # Without a ref the second charge would share the refunded charge's key: the submitter would
    # not pay for the second verdict while its contributors are paid.
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    first = verdict(t0, jid, (f"{t0}-l1", f"{t0}-l2"), submitter="dave")
    await store.apply([*accepted_ops(t0, jid), first])
    await store.apply([reopen(first, jid, f"{t0}-l1")])

    again = verdict(t0, jid, (f"{t0}-l3", f"{t0}-l4"), submitter="dave")  # n1 and n2 once more
    await store.apply([again])
    await store.apply([first, again])  # replays of both verdicts

    entries = await store.ledger_entries(0, 100)
    assert [(e.kind, getattr(e.record, "ref", "")) for e in entries[-3:]] == [
        ("credit", f"{t0}-l3"), ("credit", f"{t0}-l4"), ("charge", f"{t0}-l3")]
    assert len(entries) == 1 + 3 + 3 + 3
    assert [await store.account_balance(a) for a in ("dave", "owner-n1", "owner-n2")] == [90, 5, 5]
    await assert_conserved(store)


async def test_a_new_verdict_sharing_some_keys_with_the_old_one_is_refused_whole(store: CoordinatorStore) -> None:
    # A caller's bug: written, it would pay without charging (or charge without paying). Refused
    # loudly, and nothing of the batch is written.
    jid, t0, _, first = await submitted_and_verified(store)
    await store.apply([reopen(first, jid, f"{t0}-a")])
    size = len(await store.ledger_entries(0, 100))
    clash = TaskDecided(t0, TaskState.VERIFIED, "e" * 64, None, (f"{t0}-a",), first.credits,
                        Charge(account="dave", job=jid, task=t0, amount=7, created_at=5.0, ref=f"{t0}-c"))

    with pytest.raises(StoreError, match="reuses ledger keys"):
        await store.apply([clash])

    assert len(await store.ledger_entries(0, 100)) == size
    assert await store.canonical_digests(jid) == [None, None]


async def test_a_reopen_of_a_task_not_verified_changes_nothing(store: CoordinatorStore) -> None:
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    never = paid_verdict(t0, jid, {"n1": f"{t0}-a"})

    await store.apply([reopen(never, jid, f"{t0}-a", job_reopened=True)])

    assert await store.ledger_entries(0, 100) == []


async def test_a_reopened_job_loads_running_with_the_task_open_and_fresh(store: CoordinatorStore) -> None:
    # Attack: after a restart, the caught node's vote must not come back and verify the task again.
    jid, t0, t1, first = await submitted_and_verified(store)
    await store.apply([*ran(t1, jid, {"n2": f"{t1}-a", "n3": f"{t1}-b"}),
                       paid_verdict(t1, jid, {"n2": f"{t1}-a", "n3": f"{t1}-b"}),
                       JobFinished(jid, JobState.DONE, None, 4.0)])
    assert (await store.load()).jobs[0].state is JobState.DONE

    await store.apply([reopen(first, jid, f"{t0}-a", job_reopened=True), LeaseIssued(lease(f"{t0}-b", t0, jid, "n2"))])

    snap = await store.load()
    [job] = snap.jobs
    assert (job.state, job.finished_at, job.verified) == (JobState.RUNNING, None, 1)
    [task] = snap.tasks
    assert (task.id, task.state, task.attempts, task.errors) == (t0, TaskState.OPEN, 0, 0)
    assert task.nodes == {"n2"} and snap.votes == []
    assert [lv.id for lv in snap.live_leases] == [f"{t0}-b"]


async def test_a_reopened_job_is_running_after_reopening_the_database(durable_url: str) -> None:
    url = durable_url
    s = open_store(url)
    try:
        jid, t0, t1, first = await submitted_and_verified(s)
        await s.apply([paid_verdict(t1, jid, {"n2": f"{t1}-a"}), JobFinished(jid, JobState.DONE, None, 4.0)])
        await s.apply([reopen(first, jid, f"{t0}-a", job_reopened=True)])
    finally:
        await s.close()

    s2 = open_store(url)
    try:
        snap = await s2.load()
        assert snap.jobs[0].state is JobState.RUNNING and [t.id for t in snap.tasks] == [t0]
        assert snap.votes == [] and await s2.account_balance("dave") == 95
        await s2.apply([paid_verdict(t0, jid, {"n3": f"{t0}-b"})])
        assert await s2.canonical_digests(jid) == ["d" * 64, "d" * 64]
        await assert_conserved(s2)
    finally:
        await s2.close()


async def test_the_ledger_verifies_across_a_reopen_and_a_second_verdict(store: CoordinatorStore) -> None:
    jid, t0, t1, first = await submitted_and_verified(store)
    await store.apply([*ran(t1, jid, {"n2": f"{t1}-a", "n3": f"{t1}-b"}),
                       paid_verdict(t1, jid, {"n2": f"{t1}-a", "n3": f"{t1}-b"})])
    assert find_discrepancies(*await documents(store)) == []

    await store.apply([reopen(first, jid, f"{t0}-a")])
    assert find_discrepancies(*await documents(store)) == []

    await store.apply([*ran(t0, jid, {"n1": f"{t0}-b", "n2": f"{t0}-c"}),
                       paid_verdict(t0, jid, {"n1": f"{t0}-b", "n2": f"{t0}-c"})])
    assert find_discrepancies(*await documents(store)) == []
    await assert_conserved(store)


async def test_verify_flags_a_reopen_that_missed_a_clawback(store: CoordinatorStore) -> None:
    # Attack: the task is reopened and its submitter refunded, but one contributor keeps the
    # credit for the result no longer believed: credit made from nothing.
    job, tasks, blobs = new_job(submitter="dave")
    jid, t0 = job.spec.id, tasks[0].id
    await store.create_job(job, tasks, blobs)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    first = paid_verdict(t0, jid, {"n1": f"{t0}-a", "n2": f"{t0}-b"})
    await store.apply([*ran(t0, jid, {"n1": f"{t0}-a", "n2": f"{t0}-b"}), first])

    short = TaskReopened(task=t0, job=jid, reason="audit failed", bad_lease=f"{t0}-a", credits=first.credits[:1],
                         charge=first.charge, job_reopened=False, at=3.0)
    await store.apply([short])

    found = find_discrepancies(*await documents(store))
    assert found[0] == (f"seq 3 (task {t0}, node n2): task {t0} was reopened (lease {t0}-a), "
                        "but this credit was not clawed back")
    assert found[-1] == "account balances add up to 105, but 100 credits were granted: 5 credits were made from nothing"
