"""The coordinator's state machine, driven directly: no sockets, the clock passed in."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from coordinator.engine import Engine
from coordinator.jobs import JobOptions, plan_job
from coordinator.quorum import Vote
from coordinator.records import JobFinished, LeaseClosed, TaskDecided
from coordinator.scheduler import JobState, TaskState
from coordinator.trust import TrustBook, TrustPolicy
from protocol.messages import Assignment, Result
from protocol.tensors import digest_tensors, tensors_from_arrays

META = {"model": "a" * 64, "flops_per_row": 1000,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}


def make_engine(rows: int = 4, task_size: int = 2, replicas: int = 2, max_results: int | None = None,
                prefix: str = "lease") -> Engine:
    counter = itertools.count()
    # Classic quorum (no audits, no adaptive replication): the state machine's plumbing;
    # tests/unit/test_verification.py covers audits and trust.
    engine = Engine(lease_seconds=10, max_inline_bytes=1 << 20, new_id=lambda: f"{prefix}{next(counter)}",
                    trust=TrustBook(TrustPolicy(untrusted_audit_rate=0.0, adaptive=False)))
    job, tasks, _ = plan_job(META, {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)},
                             JobOptions(replicas=replicas, task_size=task_size, max_results=max_results,
                                        final="argmax"), now_wall=0.0, max_inline_bytes=1 << 20)
    engine.add_job(job, tasks)
    return engine


def answer(a: Assignment, values: np.ndarray) -> tuple[Result, dict[str, np.ndarray]]:
    outputs = {"y": values.astype(np.float32)}
    result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                    output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=None)
    return result, outputs


def honest(a: Assignment) -> np.ndarray:
    assert a.inputs is not None
    return a.inputs["x"].to_array() * 2


def test_two_nodes_of_different_owners_verify_a_task_and_each_earns_one_credit() -> None:
    engine = make_engine(rows=2, task_size=2)
    a1 = engine.on_work_request("n1", "o1", 4, 1, now=0, now_wall=0)["n1"]
    a2 = engine.on_work_request("n2", "o2", 4, 1, now=0, now_wall=0)["n2"]
    assert len(a1) == len(a2) == 1 and a1[0].task == a2[0].task and a1[0].lease != a2[0].lease
    for node, a in (("n1", a1[0]), ("n2", a2[0])):
        result, outputs = answer(a, honest(a))
        engine.on_result(node, result, outputs, None, now=1, now_wall=1)
    decided = [op for op in engine.ops if isinstance(op, TaskDecided)]
    assert len(decided) == 1 and decided[0].state is TaskState.VERIFIED
    assert sorted(c.node for c in decided[0].credits) == ["n1", "n2"]
    assert any(isinstance(op, JobFinished) and op.state is JobState.DONE for op in engine.ops)


def test_a_node_never_gets_two_replicas_of_one_task_and_one_owner_never_two() -> None:
    engine = make_engine(rows=2, task_size=2)
    first = engine.on_work_request("n1", "o1", 4, 1, now=0, now_wall=0)
    again = engine.on_work_request("n1", "o1", 4, 2, now=0, now_wall=0)
    same_owner = engine.on_work_request("n9", "o1", 4, 1, now=0, now_wall=0)
    assert len(first["n1"]) == 1 and again == {} and same_owner == {}


def test_a_replayed_result_is_rejected_and_counted() -> None:
    engine = make_engine(rows=2, task_size=2)
    a = engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    result, outputs = answer(a, honest(a))
    engine.on_result("n1", result, outputs, None, now=1, now_wall=1)
    engine.on_result("n1", result, outputs, None, now=1, now_wall=1)
    assert engine.counters["unknown_or_closed_lease"] == 1
    assert len(engine.tasks[a.task].votes) == 1


def test_a_result_for_another_nodes_lease_is_rejected() -> None:
    engine = make_engine(rows=2, task_size=2)
    a = engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    result, outputs = answer(a, honest(a))
    engine.on_result("n2", result, outputs, None, now=1, now_wall=1)
    assert engine.counters["lease_of_another_node"] == 1


def test_an_expired_lease_is_reissued_to_another_node() -> None:
    engine = make_engine(rows=2, task_size=2)
    engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)
    engine.on_work_request("n2", "o2", 1, 1, now=0, now_wall=0)
    engine.on_work_request("n3", "o3", 1, 1, now=0, now_wall=0)
    out = engine.sweep(now=11, now_wall=11)
    assert any(isinstance(op, LeaseClosed) and op.state == "expired" for op in engine.ops)
    # The nodes that let their leases lapse do not get the task straight back: the third does now,
    # and they may again only after a lease's time, if nobody else has taken it by then.
    assert {node: [a.task for a in items] for node, items in out.items()} == {"n3": [next(iter(engine.tasks))]}
    assert engine.on_work_request("n1", "o1", 1, 2, now=12, now_wall=12) == {}
    later = engine.on_work_request("n1", "o1", 1, 3, now=22, now_wall=22)
    assert [a.task for a in later["n1"]] == [next(iter(engine.tasks))]


def test_a_released_lease_may_go_back_to_the_same_owner_when_nobody_else_can_take_it() -> None:
    engine = make_engine(rows=2, task_size=2)
    a = engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    engine.on_work_request("n1", "o1", 0, 2, now=0, now_wall=0)  # draining: capacity 0
    engine.on_release("n1", (a.lease,), now=1, now_wall=1)
    again = engine.on_work_request("n1", "o1", 1, 3, now=2, now_wall=2)
    assert [x.task for x in again["n1"]] == [a.task]


def test_capacity_counts_the_leases_a_node_already_holds() -> None:
    engine = make_engine(rows=8, task_size=2)
    first = engine.on_work_request("n1", "o1", 3, 1, now=0, now_wall=0)["n1"]
    repeat = engine.on_work_request("n1", "o1", 3, 2, now=0, now_wall=0)
    # A new node holds at most 2 leases, whatever it asks for (coordinator/capacity.py), and a
    # repeated request grants nothing while it still holds them.
    assert len(first) == 2 and repeat == {}


def test_a_node_going_offline_gives_its_leases_back_at_once() -> None:
    engine = make_engine(rows=2, task_size=2)
    engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)
    engine.on_work_request("n3", "o3", 0, 1, now=0, now_wall=0)
    engine.on_work_request("n3", "o3", 1, 2, now=0, now_wall=0)  # takes the second replica
    engine.on_work_request("n4", "o4", 1, 1, now=0, now_wall=0)
    out = engine.on_node_offline("n1", now=1, now_wall=1)
    assert "n4" in out


def test_a_liar_is_outvoted_and_not_credited() -> None:
    engine = make_engine(rows=2, task_size=2)
    lie = engine.on_work_request("liar", "evil", 1, 1, now=0, now_wall=0)["liar"][0]
    good = engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    engine.on_result("liar", *answer(lie, honest(lie) + 5), None, now=1, now_wall=1)
    out = engine.on_result("n1", *answer(good, honest(good)), None, now=1, now_wall=1)
    assert out == {}
    # Two owners disagree: the coordinator's own run breaks the tie (no third owner needed).
    (audit,) = engine.audits
    assert audit.task == good.task and "tie" in audit.why
    assert engine.on_work_request("n2", "o2", 1, 1, now=1, now_wall=1) == {}  # nothing to hand out meanwhile
    assert audit.inputs is not None
    engine.on_audit(audit.task, {"y": audit.inputs["x"].to_array() * 2}, None, now=2, now_wall=2)
    decided = next(op for op in engine.ops if isinstance(op, TaskDecided))
    assert {c.node for c in decided.credits} == {"n1"}
    assert engine.trust.nodes["liar"].invalid == 1 and engine.trust.nodes["n1"].streak == 1


def test_a_task_fails_with_a_reason_once_the_coordinator_confirms_the_owners_errors() -> None:
    engine = make_engine(rows=2, task_size=2, max_results=2)
    for i in range(2):
        a = engine.on_work_request(f"n{i}", f"o{i}", 1, 1, now=0, now_wall=0)[f"n{i}"][0]
        result, _ = answer(a, honest(a))
        engine.on_result(f"n{i}", result, None, "output 'y' contains NaN or Inf", now=1, now_wall=1)
    job = next(iter(engine.jobs.values()))
    assert job.state is JobState.RUNNING  # two owners' word is not enough to fail it...
    (audit,) = engine.audits  # ...the coordinator runs it too
    engine.on_audit(audit.task, {"y": np.full((2, 2), np.nan, dtype=np.float32)}, None, now=2, now_wall=2)
    assert job.state is JobState.FAILED and job.failed == 1
    reason = job.failures[0]["reason"]
    assert "NaN" in reason and "2 owners" in reason and "confirmed by the coordinator" in reason


def test_outputs_with_the_wrong_row_count_are_invalid() -> None:
    engine = make_engine(rows=2, task_size=2)
    a = engine.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    result, outputs = answer(a, np.zeros((1, 2)))
    engine.on_result("n1", result, outputs, None, now=1, now_wall=1)
    assert engine.counters["invalid_result"] == 1 and not engine.tasks[a.task].votes


def test_after_a_restart_a_restored_lease_its_node_no_longer_holds_is_reissued_at_once() -> None:
    before = make_engine(rows=2, task_size=2)
    a = before.on_work_request("n1", "o1", 1, 1, now=0, now_wall=0)["n1"][0]
    b = before.on_work_request("n2", "o2", 1, 1, now=0, now_wall=0)["n2"][0]
    after = make_engine(rows=2, task_size=2, prefix="new")  # a fresh process over the same job
    task = next(iter(after.tasks.values()))
    for lease in (before.leases[a.lease], before.leases[b.lease]):
        after.restore_lease(replace(lease, task=task.id, job=task.job))

    out = after.on_work_request("n1", "o1", 1, 5, now=1, now_wall=1, held=())  # n1 answered into the void
    after.on_work_request("n2", "o2", 1, 5, now=1, now_wall=1, held=(b.lease,))  # n2 still works on it

    assert [x.task for x in out["n1"]] == [task.id]
    assert b.lease in after.leases and a.lease not in after.leases
    assert after.counters["lease_lost_in_restart"] == 1


def test_restored_votes_that_already_agree_are_decided_at_once() -> None:
    job, tasks, _ = plan_job(META, {"x": np.ones((2, 2), dtype=np.float32)},
                             JobOptions(replicas=2, task_size=2, max_results=None, final="argmax"),
                             now_wall=0.0, max_inline_bytes=1 << 20)
    outputs = {"y": np.full((2, 2), 2.0, dtype=np.float32)}
    digest = digest_tensors(tensors_from_arrays(outputs))
    tasks[0].votes = [Vote(f"l{i}", f"n{i}", f"o{i}", digest, outputs, stored=True) for i in (1, 2)]
    engine = Engine(lease_seconds=10, max_inline_bytes=1 << 20, new_id=lambda: "unused")

    engine.add_job(job, tasks, now_wall=5.0)  # a restart: the verdict had not been committed
    # Agreement of two strangers is checked against the coordinator's own run before it counts.
    (audit,) = engine.audits
    engine.on_audit(audit.task, outputs, None, now=5, now_wall=5)

    decided = next(op for op in engine.ops if isinstance(op, TaskDecided))
    assert decided.state is TaskState.VERIFIED and {c.node for c in decided.credits} == {"n1", "n2"}
    assert engine.jobs[job.spec.id].state is JobState.DONE
    assert engine.on_work_request("n3", "o3", 1, 1, now=6, now_wall=6) == {}  # nothing left to issue


def test_read_views_follow_jobs_leases_and_nodes_without_exposing_the_engine() -> None:
    engine = make_engine(rows=2, task_size=2)
    job_id = next(iter(engine.jobs))
    assert engine.job_view("nope") is None and engine.lease_view("nope") is None
    running = engine.job_view(job_id)
    assert running is not None and running.running and running.status["tasks"]["open"] == 1
    a = engine.on_work_request("n1", "o1", 3, 1, now=0, now_wall=0)["n1"][0]
    engine.on_work_request("n2", "o2", 2, 1, now=0, now_wall=0)
    lease = engine.lease_view(a.lease)
    assert lease is not None and (lease.node, lease.input_digest, lease.job) == ("n1", a.input_digest, job_id)
    assert [(n.node, n.owner, n.capacity, n.leases) for n in engine.node_views()] == [
        ("n1", "o1", 3, 1), ("n2", "o2", 2, 1)]
    engine.forget_waiting()  # the broker link dropped: n1 still holds its lease and is still listed
    assert [(n.node, n.owner, n.capacity, n.leases) for n in engine.node_views()] == [
        ("n1", "o1", 0, 1), ("n2", "o2", 0, 1)]
    result, outputs = answer(a, honest(a))
    engine.on_result("n1", result, outputs, None, now=1, now_wall=1)
    assert engine.lease_view(a.lease) is None  # answered leases are no longer live
