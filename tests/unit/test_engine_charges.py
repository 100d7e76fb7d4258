"""What the engine pays and charges when a task is verified: the first k agreeing owners are
credited, and the job's submitter is charged their sum in the same verdict."""

from __future__ import annotations

import itertools

import numpy as np

from coordinator.budget import estimate
from coordinator.engine import Engine
from coordinator.jobs import JobOptions, plan_job
from coordinator.quorum import Vote
from coordinator.records import JobRecord, TaskDecided, TaskRecord
from coordinator.scheduler import TaskState
from coordinator.trust import TrustBook, TrustPolicy
from ledger.entries import Charge
from protocol.messages import Assignment, Result
from protocol.tensors import digest_tensors, tensors_from_arrays

META = {"model": "a" * 64, "flops_per_row": 1500,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}


def new_job(*, rows: int = 4, task_size: int = 2, replicas: int = 2,
            submitter: str = "dave") -> tuple[JobRecord, list[TaskRecord]]:
    job, tasks, _ = plan_job(META, {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)},
                             JobOptions(replicas=replicas, task_size=task_size, max_results=None, final="argmax",
                                        submitter=submitter),
                             now_wall=0.0, max_inline_bytes=1 << 20)
    return job, tasks


def new_engine() -> Engine:
    # Classic quorum (no audits, no adaptive replication): these tests are about what a verdict
    # pays and charges; tests/unit/test_verification.py covers audits and trust.
    counter = itertools.count()
    return Engine(lease_seconds=10, max_inline_bytes=1 << 20, new_id=lambda: f"lease{next(counter)}",
                  trust=TrustBook(TrustPolicy(untrusted_audit_rate=0.0, adaptive=False)))


_seq = itertools.count(1)  # work-request sequence numbers: each request is newer than the last


def run(engine: Engine, owners: list[str]) -> None:
    """Every node answers honestly, including what a result frees up for others, until nothing is
    left to hand out."""
    node_owner = {f"n{i}": owner for i, owner in enumerate(owners)}
    while True:
        queue = [(node, a) for node, owner in node_owner.items()
                 for a in engine.on_work_request(node, owner, 4, next(_seq), now=0, now_wall=1).get(node, [])]
        if not queue:
            return
        while queue:
            node, a = queue.pop()
            result, outputs = answer(a)
            more = engine.on_result(node, result, outputs, None, now=1, now_wall=2)
            queue.extend((n, x) for n, items in more.items() for x in items)


def answer(a: Assignment) -> tuple[Result, dict[str, np.ndarray]]:
    assert a.inputs is not None
    outputs = {"y": (a.inputs["x"].to_array() * 2).astype(np.float32)}
    result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                    output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=None)
    return result, outputs


def verdicts(engine: Engine) -> list[TaskDecided]:
    return [op for op in engine.ops if isinstance(op, TaskDecided)]


def test_a_verified_task_charges_its_submitter_the_sum_of_its_credits() -> None:
    engine = new_engine()
    job, tasks = new_job(rows=2, task_size=2)
    engine.add_job(job, tasks)

    run(engine, ["alice", "bob"])

    [decided] = verdicts(engine)
    assert decided.state is TaskState.VERIFIED
    # keyed by the canonical result's lease: a reopened task's next verdict charges again, once
    assert decided.charge == Charge(account="dave", job=job.spec.id, task=decided.task,
                                    amount=sum(c.amount for c in decided.credits), created_at=2.0,
                                    ref=decided.accepted_leases[0])
    assert [c.ref for c in decided.credits] == list(decided.accepted_leases)
    assert {c.owner for c in decided.credits} == {"alice", "bob"}


def test_a_job_without_a_submitter_is_not_charged() -> None:
    engine = new_engine()
    job, tasks = new_job(submitter="")
    engine.add_job(job, tasks)

    run(engine, ["alice", "bob"])

    assert [d.charge for d in verdicts(engine)] == [None, None]
    assert all(len(d.credits) == 2 for d in verdicts(engine))


def test_a_whole_job_is_charged_exactly_what_the_budget_reserved() -> None:
    # The charge must be predictable: the reservation made at submission is what the job costs.
    engine = new_engine()
    job, tasks = new_job(rows=7, task_size=3, replicas=3)
    engine.add_job(job, tasks)

    run(engine, ["alice", "bob", "carol", "erin"])

    charged = [d.charge.amount for d in verdicts(engine) if d.charge is not None]
    assert len(charged) == 3
    assert sum(charged) == estimate(job.spec.flops_per_row, [t.rows for t in tasks], job.spec.replicas)


def test_only_the_first_k_agreeing_owners_are_credited_and_charged_for() -> None:
    # Prepare: a restart finds three agreeing votes of three owners for a task that needs two.
    job, tasks = new_job(rows=2, task_size=2, replicas=2)
    outputs = {"y": np.full((2, 2), 2.0, dtype=np.float32)}
    digest = digest_tensors(tensors_from_arrays(outputs))
    tasks[0].votes = [Vote(f"l{i}", f"n{i}", f"o{i}", digest, outputs, stored=True) for i in (1, 2, 3)]
    engine = new_engine()

    # Execute
    engine.add_job(job, tasks, now_wall=5.0)

    # Assert
    [decided] = verdicts(engine)
    assert [c.node for c in decided.credits] == ["n1", "n2"]
    assert decided.accepted_leases == ("l1", "l2")
    assert decided.charge is not None and decided.charge.amount == 2 * decided.credits[0].amount
    assert decided.charge.amount == estimate(job.spec.flops_per_row, [tasks[0].rows], 2)


def test_two_agreeing_votes_of_one_owner_are_paid_once() -> None:
    # Attack: an owner running several nodes is paid for one vote per task, like everyone else.
    job, tasks = new_job(rows=2, task_size=2, replicas=2)
    outputs = {"y": np.full((2, 2), 2.0, dtype=np.float32)}
    digest = digest_tensors(tensors_from_arrays(outputs))
    tasks[0].votes = [Vote("l1", "n1", "mallory", digest, outputs, stored=True),
                      Vote("l2", "n2", "mallory", digest, outputs, stored=True),
                      Vote("l3", "n3", "bob", digest, outputs, stored=True)]
    engine = new_engine()

    engine.add_job(job, tasks, now_wall=5.0)

    [decided] = verdicts(engine)
    assert [(c.node, c.owner) for c in decided.credits] == [("n1", "mallory"), ("n3", "bob")]


def test_a_failed_task_charges_nobody() -> None:
    engine = new_engine()
    job, tasks = new_job(rows=2, task_size=2)
    engine.add_job(job, tasks)

    for i in range(2):  # two owners report the same error...
        [a] = engine.on_work_request(f"n{i}", f"o{i}", 1, 1, now=0, now_wall=1)[f"n{i}"]
        result, _ = answer(a)
        engine.on_result(f"n{i}", result, None, "node error", now=1, now_wall=2)
    (audit,) = engine.audits  # ...and the coordinator's own run fails too: the task fails
    engine.on_audit(audit.task, None, "audit failed: model could not run", now=2, now_wall=3)

    [decided] = verdicts(engine)
    assert decided.state is TaskState.FAILED and decided.charge is None and decided.credits == ()
