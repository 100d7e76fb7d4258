"""Verification an adversary cannot game, driven through the pure engine with a controllable clock
and random source: audits, earned trust, adaptive replication, reopening, blocking, hoarding,
silence, deadlines and the reasons a task gives. Each test names the attack it answers."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable

import numpy as np

from coordinator.capacity import Capacity
from coordinator.engine import Engine
from coordinator.jobs import JobOptions, plan_job
from coordinator.records import JobRecord, TaskDecided, TaskReopened
from coordinator.scheduler import JobState, TaskState
from coordinator.trust import TrustBook, TrustPolicy
from protocol.messages import Assignment, Result
from protocol.tensors import digest_tensors, tensors_from_arrays

META = {"model": "a" * 64, "flops_per_row": 1000,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}

Answer = Callable[[Assignment], "np.ndarray | str | None"]  # outputs, an error to report, or silence


def honest(a: Assignment) -> np.ndarray:
    assert a.inputs is not None
    return a.inputs["x"].to_array() * 2


def wrong(a: Assignment) -> np.ndarray:
    return honest(a) + 7


class Net:
    """An engine and a few nodes, each answering with its own behaviour, the clock in our hands."""

    def __init__(self, policy: TrustPolicy | None = None, *, seed: int = 1, silence: float = 10.0,
                 deadline: float = 3600.0, trusted_owners: frozenset[str] = frozenset()) -> None:
        counter = itertools.count()
        self.engine = Engine(lease_seconds=30, max_inline_bytes=1 << 20, new_id=lambda: f"l{next(counter)}",
                             trust=TrustBook(policy or TrustPolicy(), trusted_owners=trusted_owners),
                             rng=random.Random(seed), silence_seconds=silence, job_deadline=deadline)
        self.now = 0.0
        self.seq = itertools.count(1)
        self.audits_run = 0

    def job(self, rows: int, *, replicas: int = 2, task_size: int = 1, submitter: str = "sub") -> JobRecord:
        job, tasks, _ = plan_job(META, {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)},
                                 JobOptions(replicas=replicas, task_size=task_size, max_results=None, final="argmax",
                                            submitter=submitter), now_wall=self.now, max_inline_bytes=1 << 20)
        self.engine.add_job(job, tasks, now_wall=self.now)
        return self.engine.jobs[job.spec.id]

    def run(self, nodes: dict[str, tuple[str, Answer]], *, rounds: int = 200, slots: int = 4) -> None:
        """Rounds of: every node asks, answers what it got (None: stays silent), audits are answered
        with the truth; the clock advances a second per round."""
        for _ in range(rounds):
            self.now += 1.0
            queue: list[tuple[str, Assignment]] = [
                (n, x) for n, items in self.engine.sweep(now=self.now, now_wall=self.now).items() for x in items]
            for node, (owner, _) in nodes.items():
                got = self.engine.on_work_request(node, owner, slots, next(self.seq), now=self.now, now_wall=self.now)
                queue.extend((node, a) for a in got.get(node, []))
            while queue or self.engine.audits:
                queue.extend(self.answer_audits())
                if not queue:
                    continue
                node, a = queue.pop(0)
                out = nodes[node][1](self.with_inputs(a))
                if out is None:
                    continue
                if isinstance(out, str):
                    result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                                    output_digest="", error=out)
                    more = self.engine.on_result(node, result, None, out, now=self.now, now_wall=self.now)
                else:
                    outputs = {"y": out.astype(np.float32)}
                    result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                                    output_digest=digest_tensors(tensors_from_arrays(outputs)), outputs=None)
                    more = self.engine.on_result(node, result, outputs, None, now=self.now, now_wall=self.now)
                queue.extend((n, x) for n, items in more.items() for x in items)
                queue.extend(self.answer_audits())
            if all(j.state is not JobState.RUNNING for j in self.engine.jobs.values()) and not queue:
                return

    def inputs_of(self, task_id: str) -> np.ndarray:
        """A task's rows, as the blob store would serve them (reopened tasks carry no inline inputs)."""
        task = self.engine.tasks[task_id]
        return np.arange(task.start * 2, task.stop * 2, dtype=np.float32).reshape(task.rows, 2)

    def with_inputs(self, a: Assignment) -> Assignment:
        if a.inputs is not None:
            return a
        return dataclasses.replace(a, inputs=tensors_from_arrays({"x": self.inputs_of(a.task)}))

    def answer_audits(self) -> list[tuple[str, Assignment]]:
        out = []
        audits, self.engine.audits = self.engine.audits, []
        for req in audits:
            self.audits_run += 1
            truth = {"y": (self.inputs_of(req.task) * 2).astype(np.float32)}
            more = self.engine.on_audit(req.task, truth, None, now=self.now, now_wall=self.now)
            out.extend((n, x) for n, items in more.items() for x in items)
        return out

    def decided(self) -> list[TaskDecided]:
        return [op for op in self.engine.ops if isinstance(op, TaskDecided)]


def truth_digest(net: Net, task_id: str) -> str:
    task = net.engine.tasks[task_id]
    x = np.arange(task.start * 2, task.stop * 2, dtype=np.float32).reshape(task.rows, 2)
    return digest_tensors(tensors_from_arrays({"y": x * 2}))


def test_two_colluding_strangers_never_get_a_wrong_result_accepted() -> None:
    # Attack: two fresh identities of one person return the same wrong answer and vouch for each other.
    net = Net()
    job = net.job(20)
    net.run({"m1": ("mallory-1", wrong), "m2": ("mallory-2", wrong), "h1": ("honest", honest),
             "h2": ("honest-2", honest)})
    assert job.state is JobState.DONE
    for decided in net.decided():
        assert decided.state is TaskState.VERIFIED and decided.canonical_digest == truth_digest(net, decided.task)
        assert not {c.node for c in decided.credits} & {"m1", "m2"}
    assert {"mallory-1", "mallory-2"} <= net.engine.trust.blocked  # caught by audits, blocked after 3


def test_honest_nodes_earn_trust_and_then_run_tasks_alone_with_rare_audits() -> None:
    net = Net(TrustPolicy(trusted_after=5, min_audit_rate=0.05))
    nodes: dict[str, tuple[str, Answer]] = {f"n{i}": (f"o{i}", honest) for i in range(3)}
    net.job(30)
    net.run(nodes)
    assert all(net.engine.trust.trusted(n, o) for n, (o, _) in nodes.items())
    net.audits_run = 0
    before = sum(1 for op in net.engine.ops if isinstance(op, TaskDecided))
    job = net.job(400)
    net.run(nodes, rounds=400)
    decided = [op for op in net.engine.ops if isinstance(op, TaskDecided)][before:]
    results_per_task = sum(len(d.credits) for d in decided) / len(decided)
    assert job.state is JobState.DONE and len(decided) == 400
    assert results_per_task <= 1.1  # adaptive replication: one result per task, nearly always
    assert 0 < net.audits_run / len(decided) <= 0.2  # audited now and then, never zero


def test_a_node_honest_until_trusted_is_caught_its_unchecked_tasks_reopened_and_credit_clawed_back() -> None:
    # Attack: behave until trusted, then cheat on tasks that run alone.
    policy = TrustPolicy(trusted_after=3, min_audit_rate=0.25)
    net = Net(policy, seed=3)
    turned = {"flag": False}

    def sleeper(a: Assignment) -> np.ndarray:
        return wrong(a) if turned["flag"] else honest(a)

    nodes: dict[str, tuple[str, Answer]] = {"s": ("sleeper", sleeper), "h1": ("o1", honest), "h2": ("o2", honest)}
    net.job(12)
    net.run(nodes)
    assert net.engine.trust.trusted("s", "sleeper")
    turned["flag"] = True
    job = net.job(60)
    net.run(nodes, rounds=400)
    reopened = [op for op in net.engine.ops if isinstance(op, TaskReopened)]
    assert net.engine.trust.nodes["s"].audits_failed >= 1
    assert job.state is JobState.DONE
    # every task the sleeper had run alone unchecked was reopened, its credit clawed back...
    assert reopened and all(any(c.node == "s" for c in op.credits) for op in reopened)
    # ...and in the end no task of the job stands on a wrong result
    final: dict[str, TaskDecided] = {}
    for op in net.engine.ops:
        if isinstance(op, TaskDecided):
            final[op.task] = op
        elif isinstance(op, TaskReopened):
            final.pop(op.task, None)
    for task_id in job.tasks:
        assert final[task_id].canonical_digest == truth_digest(net, task_id)


def test_audits_never_stop_for_a_trusted_node() -> None:
    book = TrustBook(TrustPolicy(trusted_after=10, min_audit_rate=0.05))
    for _ in range(10_000):
        book.confirmed("n", "o", audited=True, now=0.0)
    assert book.trusted("n", "o") and book.audit_rate("n", "o") == 0.05
    assert TrustBook().audit_rate("new", "o") == 1.0  # strangers' agreement is always checked by default


def test_an_operator_trusted_owner_is_ground_truth() -> None:
    net = Net(trusted_owners=frozenset({"lab"}))
    job = net.job(5)
    net.run({"l": ("lab", honest), "x": ("stranger", honest)})
    assert job.state is JobState.DONE and net.audits_run == 0


def test_errors_from_one_owner_never_fail_a_task_and_a_liars_errors_are_disproved() -> None:
    # Attack: a key that answers "error" to everything tries to fail tasks.
    net = Net()

    job = net.job(10)
    net.run({"e": ("spammer", lambda a: "cannot run"), "h1": ("o1", honest), "h2": ("o2", honest)})
    assert job.state is JobState.DONE and job.failed == 0
    assert not any(c.node == "e" for d in net.decided() for c in d.credits)


def test_a_spammers_errors_are_disproved_even_when_the_result_against_them_would_stand_unaudited() -> None:
    # Attack: once honest nodes are trusted their results are audited rarely; a spammer whose
    # "cannot run" lost only to unaudited results used to keep a clean record (errors, never invalid).
    net = Net(TrustPolicy(trusted_after=3, min_audit_rate=0.01))
    honest_nodes: dict[str, tuple[str, Answer]] = {"h1": ("o1", honest), "h2": ("o2", honest)}
    net.job(10)
    net.run(honest_nodes)
    assert all(net.engine.trust.trusted(n, o) for n, (o, _) in honest_nodes.items())
    job = net.job(30)
    net.run({"e": ("spammer", lambda a: "cannot run"), **honest_nodes})
    assert job.state is JobState.DONE and job.failed == 0
    record = net.engine.trust.nodes["e"]
    assert record.errors >= 3 and record.invalid == record.errors  # every error shown false
    assert record.valid == 0


def test_a_hoarder_holds_two_leases_at_most_and_loses_them_when_silent() -> None:
    # Attack: claim 4,096 slots, take leases, never answer.
    net = Net(silence=5.0)
    job = net.job(20)
    got = net.engine.on_work_request("hog", "hoarder", 4096, 1, now=0, now_wall=0)
    assert len(got.get("hog", [])) == 2  # a new node starts small, whatever it claims
    # it goes on asking (heartbeats) but never answers: its leases expire, its allowance halves
    net.run({"hog": ("hoarder", lambda a: None), "h1": ("o1", honest), "h2": ("o2", honest)}, rounds=300)
    assert job.state is JobState.DONE
    # two leases lost in a row with no result between: benched for a lease's time, then one at a time
    assert net.engine.capacity.grant("hog", 4096, net.now) <= 1
    assert net.engine.capacity.speed("hog").lost >= 2


def test_a_silent_node_loses_its_leases_within_the_silence_window() -> None:
    # Attack (or accident): a hung node (SIGSTOP) holds leases until they expire.
    net = Net(silence=10.0)
    net.job(4)
    held = net.engine.on_work_request("hung", "o1", 4, 1, now=0, now_wall=0)["hung"]
    assert held
    net.engine.sweep(now=9.0, now_wall=9.0)
    assert len(net.engine.leases) == len(held)
    net.engine.sweep(now=10.5, now_wall=10.5)
    assert not net.engine.leases and net.engine.counters["node_silent"] == 1
    assert "hung" not in net.engine._waiting  # no more work until it asks again


def test_a_task_that_cannot_be_decided_fails_at_the_deadline_with_a_reason() -> None:
    net = Net(deadline=50.0)
    job = net.job(1)
    net.run({}, rounds=60)  # nobody online: nothing can decide it
    assert job.state is JobState.FAILED
    reason = job.failures[0]["reason"]
    assert reason == "deadline passed: waiting: 0 of 2 required owners online"


def test_a_lone_owners_results_are_decided_by_audit_rather_than_waiting_for_a_second_owner() -> None:
    net = Net(deadline=50.0)
    job = net.job(3)
    net.run({"a": ("alice", honest)}, rounds=60)  # one owner: k=2 can never be met by owners alone
    assert job.state is JobState.DONE and net.audits_run >= 3


def test_a_waiting_task_says_why() -> None:
    net = Net()
    job = net.job(1)
    view = net.engine.job_view(job.spec.id)
    assert view is not None and view.status["waiting"][0]["waiting"] == "waiting: 0 of 2 required owners online"


def test_capacity_grows_with_results_and_halves_on_loss_never_beyond_measured_speed() -> None:
    cap = Capacity(lease_seconds=10)
    assert cap.grant("n", 100) == 2
    for t in range(20):
        cap.on_result("n", float(t) * 2)  # one result every 2 s
    # earned 22 by count, but 0.5 results/s x 10 s x 0.8 = 4 is what it can finish in a lease
    assert cap.grant("n", 100) == 4
    cap.on_lost("n", now=40.0)
    assert cap.grant("n", 100, now=40.0) == 4 and cap.speed("n").allowed == 11.0
    cap.on_lost("n", now=41.0)  # a second loss with no result between: benched for a lease's time
    assert cap.grant("n", 100, now=45.0) == 0 and cap.grant("n", 100, now=51.5) == 4
    cap.on_result("n", 52.0)  # answering again ends the run of losses
    cap.on_lost("n", now=53.0)
    assert cap.grant("n", 100, now=53.0) > 0


def test_once_a_liar_of_a_two_owner_network_is_blocked_its_tasks_are_decided_by_audit() -> None:
    # The honest owner's lone results cannot find a second owner any more: the coordinator's own run
    # decides them, instead of the job waiting for its deadline.
    net = Net(seed=0, deadline=300)
    job = net.job(20)
    net.run({"a": ("alice", honest), "m": ("mallory", wrong)}, rounds=400, slots=2)
    assert "mallory" in net.engine.trust.blocked
    assert job.state is JobState.DONE and job.failed == 0
    for decided in net.decided():
        assert decided.canonical_digest == truth_digest(net, decided.task)


def test_trust_records_round_trip_through_what_the_store_keeps() -> None:
    book = TrustBook(TrustPolicy(trusted_after=3))
    for _ in range(3):
        book.confirmed("n", "o", audited=True, now=1.0)
    book.failed("m", "p", "failed an audit", audited=True, now=2.0)
    saved = book.take_changed()
    assert {(k, n) for k, n, _ in saved} == {("node", "n"), ("owner", "o"), ("node", "m"), ("owner", "p")}
    assert book.take_changed() == []  # nothing changed since
    restored = TrustBook(TrustPolicy(trusted_after=3))
    restored.restore(saved)
    assert restored.trusted("n", "o") and not restored.trusted("m", "p")
    assert restored.nodes["m"].audits_failed == 1 and restored.nodes["m"].last_problem == "failed an audit"
