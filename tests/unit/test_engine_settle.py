"""When the coordinator decides a task on its own run because no further owner is online
(`Engine._settle_stuck`), and when it waits instead: an owner that is only reconnecting (after a
coordinator restart, or a node of it dropping off the broker) is not missing."""

from __future__ import annotations

import itertools

import numpy as np

from coordinator.engine import Engine
from coordinator.jobs import JobOptions, plan_job
from coordinator.quorum import Vote
from coordinator.records import TaskDecided
from coordinator.scheduler import JobState
from coordinator.trust import TrustBook, TrustPolicy
from protocol.messages import Assignment, Result
from protocol.tensors import digest_tensors, tensors_from_arrays

META = {"model": "a" * 64, "flops_per_row": 1000,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}
SILENCE = 10.0


def engine_with_job(rows: int, *, alice_voted: bool = False) -> Engine:
    """k = 2 with neither audits of agreeing strangers nor solo runs (as --untrusted-audit-rate 0
    --no-adaptive): only a stuck task's audit can decide on fewer than two owners. With
    `alice_voted`, every task already holds alice's result, as restored after a restart."""
    counter = itertools.count()
    engine = Engine(lease_seconds=30, max_inline_bytes=1 << 20, new_id=lambda: f"l{next(counter)}",
                    trust=TrustBook(TrustPolicy(untrusted_audit_rate=0.0, adaptive=False)), silence_seconds=SILENCE)
    job, tasks, _ = plan_job(META, {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)},
                             JobOptions(replicas=2, task_size=2, max_results=None, final="argmax"),
                             now_wall=0.0, max_inline_bytes=1 << 20)
    if alice_voted:
        for t in tasks:
            assert t.inputs is not None
            outputs = {"y": t.inputs["x"].to_array() * 2}
            t.votes = [Vote(f"old-{t.index}", "na", "alice", digest_tensors(tensors_from_arrays(outputs)), outputs,
                            stored=True)]
            t.nodes, t.owners, t.attempts = {"na"}, {"alice"}, 1
    engine.add_job(job, tasks, now_wall=0.0)
    return engine


def answer(engine: Engine, node: str, assignments: list[Assignment], now: float) -> list[Assignment]:
    """Answer honestly; what the engine hands the node next (it refills a standing request)."""
    more: list[Assignment] = []
    for a in assignments:
        assert a.inputs is not None
        outputs = {"y": a.inputs["x"].to_array() * 2}
        result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                        output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=None)
        more += engine.on_result(node, result, outputs, None, now=now, now_wall=now).get(node, [])
    return more


def answer_audits(engine: Engine, now: float) -> int:
    audits, engine.audits = engine.audits, []
    for req in audits:
        assert req.inputs is not None
        engine.on_audit(req.task, {"y": req.inputs["x"].to_array() * 2}, None, now=now, now_wall=now)
    return len(audits)


def credited_owners(engine: Engine) -> list[set[str]]:
    return [{c.owner for c in op.credits} for op in engine.ops if isinstance(op, TaskDecided)]


def test_after_a_restart_one_owners_results_wait_for_the_other_owner_to_reconnect() -> None:
    # Fault: the coordinator restarts while every task holds alice's result only. No node has asked
    # the new process for work yet, so its first sweep found no other owner online and decided every
    # task on alice's result and its own run: bob, reconnecting a second later, lost the work and its
    # credit, and the coordinator ran the whole job itself. Now nobody counts as missing until
    # SILENCE has passed since the restart: bob runs every task and both owners are paid.
    engine = engine_with_job(8, alice_voted=True)
    engine.resume(now=100.0)
    assert engine.on_work_request("na", "alice", 4, 1, now=100.1, now_wall=100.1) == {}  # she ran them all
    assert engine.sweep(now=100.5, now_wall=100.5) == {} and engine.audits == []
    got = engine.on_work_request("nb", "bob", 4, 1, now=101.0, now_wall=101.0)["nb"]
    while got:
        got = answer(engine, "nb", got, now=102.0)
    assert engine.counters["audit_requested"] == 0
    assert credited_owners(engine) == [{"alice", "bob"}] * 4
    assert next(iter(engine.jobs.values())).state is JobState.DONE


def test_after_a_restart_a_lone_owners_results_are_decided_by_audit_once_nobody_else_returns() -> None:
    # The grace is not a way to stall a job: past it, the coordinator's own run decides (the one
    # case where a task is accepted on a single owner without trust: its result matched that run).
    engine = engine_with_job(4, alice_voted=True)
    engine.resume(now=100.0)
    for t in range(1, 11):
        engine.on_work_request("na", "alice", 4, t, now=100.0 + t, now_wall=100.0 + t)
        engine.sweep(now=100.0 + t, now_wall=100.0 + t)
    assert answer_audits(engine, now=111.0) == 2
    assert credited_owners(engine) == [{"alice"}] * 2
    assert next(iter(engine.jobs.values())).state is JobState.DONE


def test_an_owner_whose_node_dropped_off_is_waited_for_before_the_coordinator_decides_alone() -> None:
    # Fault: bob's node drops off the broker (its Will: offline) holding the task alice has answered,
    # and reconnects. The next sweep used to decide the task on alice and an audit at once.
    engine = engine_with_job(2)
    a = engine.on_work_request("na", "alice", 1, 1, now=0.0, now_wall=0.0)["na"]
    engine.on_work_request("nb", "bob", 1, 1, now=0.0, now_wall=0.0)
    answer(engine, "na", a, now=1.0)
    engine.on_node_offline("nb", now=1.0, now_wall=1.0)
    engine.on_work_request("na", "alice", 1, 2, now=2.0, now_wall=2.0)
    assert engine.sweep(now=2.0, now_wall=2.0) == {} and engine.audits == []
    again = engine.on_work_request("nb", "bob", 1, 2, now=4.0, now_wall=4.0)["nb"]
    answer(engine, "nb", again, now=5.0)
    assert engine.counters["audit_requested"] == 0 and credited_owners(engine) == [{"alice", "bob"}]

    # Had bob not come back, the coordinator would decide once he had been gone for SILENCE.
    engine = engine_with_job(2)
    a = engine.on_work_request("na", "alice", 1, 1, now=0.0, now_wall=0.0)["na"]
    engine.on_work_request("nb", "bob", 1, 1, now=0.0, now_wall=0.0)
    answer(engine, "na", a, now=1.0)
    engine.on_node_offline("nb", now=1.0, now_wall=1.0)
    engine.sweep(now=1.0 + SILENCE - 0.5, now_wall=1.0 + SILENCE - 0.5)
    assert engine.audits == []
    engine.sweep(now=1.0 + SILENCE + 0.5, now_wall=1.0 + SILENCE + 0.5)  # the check after, once a second
    assert answer_audits(engine, now=1.0 + SILENCE + 0.5) == 1 and credited_owners(engine) == [{"alice"}]
