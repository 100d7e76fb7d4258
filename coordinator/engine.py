"""The coordinator's state machine, without I/O: messages and `now` in; assignments to send and
operations to persist out.

The MQTT and HTTP adapters call it from one asyncio task at a time, so it needs no locks. It keeps
the hot state (open tasks, live leases, waiting nodes) in memory and appends every change to
`ops`; the store writes those in grouped transactions, so a verdict and its credits commit together.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from ledger.credit import ModelCost, credit_amount
from ledger.entries import Credit, charge_for
from protocol.messages import Assignment, Result
from protocol.tensors import Tensor, digest_tensors, encode_tensor_map, tensors_from_arrays

from .capacity import Capacity
from .queries import JobView, LeaseView, NodeView
from .quorum import Accepted, Undecided, Verdict, Vote, agree, check_finite, decide_quorum
from .records import (
    BlobPut,
    JobFinished,
    JobRecord,
    LeaseClosed,
    LeaseIssued,
    LeaseRecord,
    Op,
    ResultRecorded,
    TaskDecided,
    TaskRecord,
    TaskReopened,
)
from .scheduler import JobState, TaskState, check_transition, may_take, plan_replicas
from .trust import TrustBook

log = logging.getLogger("sparecycles.coordinator.engine")


@dataclass(slots=True)
class Waiting:
    """A node's standing request: it can hold `capacity` leases at once. The coordinator knows
    which leases the node holds, so it grants the difference itself: no race between a request
    and assignments still in flight, and a node is refilled the moment its results arrive."""

    owner: str
    capacity: int
    seq: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A result we would not count, and why (for counters and logs; never an exception)."""

    lease: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuditRequest:
    """The coordinator is to run `task` itself (sandboxed: coordinator/audit.py) and answer with
    `Engine.on_audit`. `why` says what the run decides: a quorum or solo result to check, or
    errors reported by several owners to confirm."""

    task: str
    job: str
    model: str
    input_digest: str
    inputs: Mapping[str, Tensor] | None
    opt_level: int
    rows: int
    why: str


NOTES_KEPT = 6
MIN_LEASE_SECONDS = 15.0
CLOSING_CHECK_SHARE = 0.05  # closing checks per task of a job, at most (Engine._closing_checks)
SLOW_NODE_FLOPS = 25e6  # FLOP/s assumed of a node before any is measured: slow on purpose
READY_WINDOW = 64  # a node is served from a random pick among the oldest ready tasks



class NotCancellable(ValueError):
    """The job is unknown here or already finished; the message says which."""

class Engine:
    def __init__(self, *, lease_seconds: float, max_inline_bytes: int, new_id: Callable[[], str],
                 trust: TrustBook | None = None, rng: random.Random | None = None,
                 silence_seconds: float = 10.0, job_deadline: float = 3600.0) -> None:
        self.lease_seconds = lease_seconds
        self.max_inline_bytes = max_inline_bytes
        self.silence_seconds = silence_seconds
        self.job_deadline = job_deadline
        self._new_id = new_id
        self.trust = trust or TrustBook()
        self.rng = rng or random.Random()
        self.capacity = Capacity(lease_seconds=lease_seconds)
        self.jobs: dict[str, JobRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self._ready: dict[str, int] = {}  # task id -> replicas wanted now, in FIFO order
        self._waiting: dict[str, Waiting] = {}
        self._node_leases: dict[str, set[str]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._job_deadlines: list[tuple[float, str]] = []  # (wall-clock deadline, job)
        self._heard: dict[str, float] = {}  # node -> when we last heard from it (monotonic)
        self._owner_seen: dict[str, float] = {}  # owner -> when a node of it last asked for work (monotonic)
        self._settle_after = 0.0  # no stuck task is settled before this (`resume`)
        self._next_silence_check = 0.0
        self._unconfirmed: set[str] = set()  # restored leases not yet confirmed by their node
        self._auditing: dict[str, Accepted | None] = {}  # task -> the verdict an audit will decide
        self._task_seconds: dict[tuple[str, int], float] = {}  # (model, task size) -> EWMA issue to result
        self._closing: dict[str, set[str]] = {}  # job -> tasks of its closing checks still running
        self._closing_failed: set[str] = set()  # jobs whose current round of closing checks failed one
        self._now = 0.0  # the monotonic time of the call being served
        self.ops: list[Op] = []
        self.audits: list[AuditRequest] = []  # for the service to run, then `on_audit`
        self.blocked: list[tuple[str, str]] = []  # (owner, reason) newly blocked: the service persists it
        self.counters: Counter[str] = Counter()
        self._first_issued: dict[str, float] = {}  # task -> wall time its first lease went out
        # Told each decided task's seconds from first lease to verdict (the service's latency
        # histogram); a plain call, so the engine stays free of any metrics library.
        self.observe_task_seconds: Callable[[float], None] = _ignore

    # ---- jobs -------------------------------------------------------------------------------
    def add_job(self, job: JobRecord, tasks: list[TaskRecord], *, now_wall: float | None = None) -> None:
        """A new job, or one restored after a restart with its open tasks (and their votes)."""
        now_wall = job.spec.created_at if now_wall is None else now_wall
        self.jobs[job.spec.id] = job
        if job.state is JobState.RUNNING:
            deadline = job.spec.deadline_seconds or self.job_deadline
            heapq.heappush(self._job_deadlines, (job.spec.created_at + deadline, job.spec.id))
        for t in tasks:
            self.tasks[t.id] = t
            if t.state is not TaskState.OPEN:
                continue
            t.need = job.spec.replicas
            # Restored votes may already agree (the process died before committing the verdict).
            verdict = self._tally(t, job)
            if isinstance(verdict, Accepted):
                self._decide(t, job, verdict, now_wall)
            else:
                self._replan(t, now_wall=now_wall)
        self._maybe_finish(job, now_wall)

    def forget_jobs(self, job_ids: list[str]) -> None:
        """Drop finished jobs (expired, or deleted by their submitters) and their tasks from memory:
        the store keeps their rows. A running job is kept. Later reopens of their tasks find nothing."""
        gone = {j for j in job_ids if (job := self.jobs.get(j)) is not None and job.state is not JobState.RUNNING}
        for job_id in gone:
            for task_id in self.jobs.pop(job_id).tasks:
                if self.tasks.pop(task_id, None) is not None:
                    self._auditing.pop(task_id, None)
                    self._ready.pop(task_id, None)
                    self._first_issued.pop(task_id, None)
            self._closing.pop(job_id, None)
            self._closing_failed.discard(job_id)
        if gone and any(j in gone for _, j in self._job_deadlines):
            self._job_deadlines = [d for d in self._job_deadlines if d[1] not in gone]
            heapq.heapify(self._job_deadlines)

    def resume(self, *, now: float) -> None:
        """A restarted coordinator knows no node online until each asks again (every 2 s when idle):
        for `silence_seconds` no owner counts as missing, or the first sweeps would find every task
        with results short of owners and run them all itself (`_settle_stuck`)."""
        self._settle_after = now + self.silence_seconds

    def restore_lease(self, lease: LeaseRecord, *, now: float = 0.0) -> None:
        """A lease that was live when the previous process stopped: its node may still answer."""
        task = self.tasks.get(lease.task)
        if task is None or task.state is not TaskState.OPEN:
            return
        self._track(lease, task)
        self._unconfirmed.add(lease.id)
        self._heard.setdefault(lease.node, now)  # a grace period to be heard from again
        self._replan(task)

    # ---- nodes ------------------------------------------------------------------------------
    def on_work_request(self, node: str, owner: str, slots: int, seq: int, *, now: float,
                        now_wall: float, held: tuple[str, ...] = ()) -> dict[str, list[Assignment]]:
        self._heard[node] = now
        current = self._waiting.get(node)
        if current is not None and seq < current.seq:
            self.counters["stale_work_request"] += 1
            return {}
        if owner in self.trust.blocked:
            self.counters["refused_blocked_owner"] += 1
            self._waiting.pop(node, None)
            return {}
        self._reconcile(node, set(held))
        self._waiting[node] = Waiting(owner, slots, seq)
        self._owner_seen[owner] = now
        return self._fill(now, now_wall, only=node)

    def free_slots(self, node: str) -> int:
        waiting = self._waiting.get(node)
        if waiting is None:
            return 0
        # What it asked for, capped by what it has earned (coordinator/capacity.py).
        return self.capacity.grant(node, waiting.capacity, self._now) - len(self._node_leases.get(node, ()))

    def on_release(self, node: str, leases: tuple[str, ...], *, now: float,
                   now_wall: float) -> dict[str, list[Assignment]]:
        self._heard[node] = now
        for lease_id in leases:
            lease = self.leases.get(lease_id)
            if lease is not None and lease.node == node:
                self._close(lease, "released")
        return self._fill(now, now_wall)

    def close_unsent(self, node: str, leases: tuple[str, ...]) -> None:
        """Assignments that never left this process: their leases end without counting as tries."""
        for lease_id in leases:
            lease = self.leases.get(lease_id)
            if lease is not None and lease.node == node:
                self._close(lease, "unsent")

    def forget_waiting(self) -> None:
        """Drop every standing request (the broker connection is gone; nodes will ask again)."""
        self._waiting.clear()

    def on_node_offline(self, node: str, *, now: float, now_wall: float) -> dict[str, list[Assignment]]:
        waiting = self._waiting.pop(node, None)
        if waiting is not None:
            self._owner_seen[waiting.owner] = now  # it may be back soon (`_settle_stuck`)
        for lease_id in list(self._node_leases.get(node, ())):
            self._close(self.leases[lease_id], "offline")
        return self._fill(now, now_wall)

    def sweep(self, *, now: float, now_wall: float) -> dict[str, list[Assignment]]:
        """Expire leases past their deadline, take work back from nodes gone silent, fail what the
        network could not decide by its job's deadline; reissue what was freed."""
        changed = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            lease = self.leases.get(lease_id)
            if lease is not None and lease.deadline <= now:
                self.counters["lease_expired"] += 1
                self.capacity.on_lost(lease.node, now)
                self.tasks[lease.task].avoid[lease.node] = now + self.lease_seconds
                self._close(lease, "expired")
                changed = True
        if now >= self._next_silence_check:
            self._next_silence_check = now + 1.0
            changed |= self._take_back_from_silent(now)
            changed |= self._settle_stuck(now)
        while self._job_deadlines and self._job_deadlines[0][0] <= now_wall:
            _, job_id = heapq.heappop(self._job_deadlines)
            changed |= self._expire_job(self.jobs[job_id], now_wall)
        return self._fill(now, now_wall) if changed else {}

    def _take_back_from_silent(self, now: float) -> bool:
        """A node that holds leases and has sent nothing (not even its heartbeat work request) for
        `silence_seconds` is hung or gone: its leases go to others now, not when they expire, and
        it gets no more until it asks again. A SIGSTOPped node delays a job by about this much."""
        took = False
        for node, leases in list(self._node_leases.items()):
            if not leases or now - self._heard.get(node, now) < self.silence_seconds:
                continue
            self.counters["node_silent"] += 1
            log.info("node silent node=%s leases=%d silent_for=%.1fs", node, len(leases),
                     now - self._heard.get(node, now))
            self._waiting.pop(node, None)
            self.capacity.on_lost(node, now)
            for lease_id in list(leases):
                self.tasks[self.leases[lease_id].task].avoid[node] = now + self.lease_seconds
                self._close(self.leases[lease_id], "silent")
            took = True
        return took

    def _settle_stuck(self, now: float) -> bool:
        """A task that has results but cannot get the further owners it needs (none online that
        has not run it: the others were blocked, or there never were enough) is decided by the
        coordinator's own run instead of waiting for its deadline. An owner counts as online for
        `silence_seconds` after a node of it last asked (the window after which a node counts as
        gone), and every owner does for that long after a restart (`resume`): one that reconnects
        (a restarted node, a broker blip, a restarted coordinator) still gets to confirm the
        results, and is paid for it, instead of the coordinator deciding each task on one owner."""
        if now < self._settle_after:
            return False
        online = {w.owner for w in self._waiting.values()}
        online |= {o for o, seen in self._owner_seen.items() if now - seen < self.silence_seconds}
        online -= self.trust.blocked
        settled = False
        for task_id in list(self._ready):
            task = self.tasks[task_id]
            if not task.votes or task.live or task.auditing or task.truth is not None:
                continue
            if online - task.owners:
                continue  # someone could still take it
            self._request_audit(task, self.jobs[task.job], None,
                                "no further owner online to confirm its results: the coordinator decides")
            settled = True
        return settled

    def _expire_job(self, job: JobRecord, now_wall: float) -> bool:
        if job.state is not JobState.RUNNING:
            return False
        open_tasks = [task for t in job.tasks
                      if (task := self.tasks.get(t)) is not None and task.state is TaskState.OPEN]
        for task in open_tasks:
            self._fail(task, job, f"deadline passed: {self.stall_reason(task)}", now_wall)
        return bool(open_tasks)

    # ---- results ----------------------------------------------------------------------------
    def check_result(self, node: str, result: Result) -> Rejection | None:
        """Reasons to ignore a result before looking at its outputs: unknown, replayed or
        foreign lease, or a result that does not bind to what was leased."""
        lease = self.leases.get(result.lease)
        if lease is None:
            return Rejection(result.lease, "unknown_or_closed_lease")
        if lease.node != node:
            return Rejection(result.lease, "lease_of_another_node")
        task = self.tasks[lease.task]
        if result.task != task.id or result.job != task.job or result.input_digest != task.input_digest:
            return Rejection(result.lease, "result_does_not_match_lease")
        return None

    def on_result(self, node: str, result: Result, outputs: Mapping[str, npt.NDArray[Any]] | None,
                  problem: str | None, *, now: float, now_wall: float) -> dict[str, list[Assignment]]:
        """Count one checked result. `outputs` None with `problem` set: the result is invalid
        (error reported by the node, missing or malformed outputs) and counts as a failed try."""
        self._heard[node] = now
        rejection = self.check_result(node, result)
        if rejection is not None:
            self.counters[rejection.reason] += 1
            return {}
        lease = self.leases[result.lease]
        task = self.tasks[lease.task]
        job = self.jobs[task.job]
        self.capacity.on_result(node, now)
        self._learn_task_time(job, now_wall - lease.issued_at)
        self._close(lease, "reported")
        if problem is None and outputs is not None:
            problem = _check_outputs(outputs, job, task)
        self.ops.append(ResultRecorded(lease.id, task.id, node, lease.owner,
                                       result.output_digest if problem is None else "", problem, now_wall))
        if problem is not None or outputs is None:
            self._invalid(task, job, node, lease.owner, problem or "no outputs", now_wall)
        else:
            vote = Vote(lease.id, node, lease.owner, result.output_digest, outputs, stored=result.outputs is None)
            self.counters["result_counted"] += 1
            self._vote(task, job, vote, now_wall)
        if task.state is TaskState.OPEN:
            self._replan(task, now_wall=now_wall)
        return self._fill(now, now_wall)

    def _vote(self, task: TaskRecord, job: JobRecord, vote: Vote, now_wall: float) -> None:
        if task.truth is not None:
            # The coordinator has run this task itself: a result is judged against that alone.
            if agree(task.truth, vote, job.spec.tolerance):
                self._verify(task, job, Accepted(canonical=vote, agreeing=(vote,)), now_wall, checked=True,
                         audited=True)
            else:
                self._punish(vote.node, vote.owner, "outputs differ from the coordinator's own run of the task",
                             audited=True, now_wall=now_wall)
                task.last_problem = f"result of node {vote.node} differs from the coordinator's run"
                self._note(task, f"rejected node {vote.node}: differs from the coordinator's run")
            return
        task.votes.append(vote)
        if task.auditing:
            return  # the audit under way decides; this vote is judged with the rest afterwards
        verdict = self._tally(task, job)
        if isinstance(verdict, Accepted):
            self._decide(task, job, verdict, now_wall)
        elif task.best_group < len({v.owner for v in task.votes}):  # some owner's result disagrees
            self.counters["disagreement"] += 1
            task.last_problem = "results disagree"
            # Owners that disagree are not outvoted by whoever answers next: the coordinator's own
            # run breaks the tie, and shows who was wrong (no third owner needed, none rewarded
            # for siding with a majority of Sybils).
            self._request_audit(task, job, None, f"break a tie: results of {len(task.votes)} nodes disagree")

    def _invalid(self, task: TaskRecord, job: JobRecord, node: str, owner: str, problem: str,
                 now_wall: float) -> None:
        self.counters["invalid_result"] += 1
        self.trust.errored(node, owner, problem, now=now_wall)
        task.errors += 1
        task.last_problem = problem
        if owner not in task.error_owners:
            task.error_owners.add(owner)
            task.problems[problem] = task.problems.get(problem, 0) + 1
        task.error_nodes.append((node, owner))
        # The node stays excluded (it would likely fail again); its owner's other nodes may try.
        if all(v.owner != owner for v in task.votes):
            task.owners.discard(owner)
        if task.need == 1 and not task.votes:
            task.need = job.spec.replicas  # a solo run failed: back to full replication
        log.info("invalid result task=%s node=%s problem=%r", task.id, node, problem)
        self._note(task, f"invalid result from node {node}: {problem}")
        # Errors fail a task only once confirmed: by the coordinator's own run, requested when
        # enough distinct owners report one (a key, or a few Sybils, cannot fail tasks by lying).
        same = max(task.problems.values())
        if task.truth is None and not task.auditing and \
                (same >= min(job.spec.replicas, job.spec.max_errors) or len(task.error_owners) >= job.spec.max_errors):
            self._request_audit(task, job, None, f"confirm errors reported by {len(task.error_owners)} owners")

    def _decide(self, task: TaskRecord, job: JobRecord, verdict: Accepted, now_wall: float) -> None:
        """Accept a group, or first have the coordinator check it. Agreement of strangers is no
        ground truth: it is audited at the rate of its least trusted member (1.0 for untrusted
        nodes by default); a trusted node's result standing alone is audited now and then."""
        if any(self.trust.is_ground_truth(v.owner) for v in verdict.agreeing):
            self._refute_errors(task, now_wall)
            self._verify(task, job, verdict, now_wall, checked=True)
            return
        if task.error_nodes:
            # "Cannot run" against a result is a disagreement like any other: the coordinator's own
            # run decides it, so a spammer's errors are shown false (and count against it) every time,
            # not only when an audit happens to be drawn.
            self._request_audit(task, job, verdict, f"a result contradicts errors reported by "
                                                    f"{len(task.error_nodes)} node{'s' * (len(task.error_nodes) != 1)}")
            return
        rate = max(self.trust.audit_rate(v.node, v.owner) for v in verdict.agreeing)
        if self.trust.draw_audit(rate, self.rng):
            self._request_audit(task, job, verdict, f"audit drawn at rate {rate:.3f}")
        else:
            self._verify(task, job, verdict, now_wall, checked=False)

    def _request_audit(self, task: TaskRecord, job: JobRecord, verdict: Accepted | None, why: str) -> None:
        task.auditing = True
        self._auditing[task.id] = verdict
        self._ready.pop(task.id, None)
        self.counters["audit_requested"] += 1
        self._note(task, f"audit requested: {why}")
        self.audits.append(AuditRequest(task=task.id, job=job.spec.id, model=job.spec.model,
                                        input_digest=task.input_digest, inputs=task.inputs,
                                        opt_level=job.spec.opt_level, rows=task.rows, why=why))

    def on_audit(self, task_id: str, outputs: Mapping[str, npt.NDArray[Any]] | None, problem: str | None, *,
                 now: float, now_wall: float) -> dict[str, list[Assignment]]:
        """The coordinator's own run of a task: ground truth for the verdict it was asked to check."""
        task = self.tasks.get(task_id)
        if task is None or task_id not in self._auditing:
            return {}
        verdict = self._auditing.pop(task_id)
        task.auditing = False
        if task_id in self._closing.get(task.job, ()):
            self._closing_check_done(task, outputs, problem, now_wall)
            return self._fill(now, now_wall)
        if task.state is not TaskState.OPEN:
            return {}
        job = self.jobs[task.job]
        if problem is None and outputs is not None:
            problem = _check_outputs(outputs, job, task)
        if problem is not None:
            self._audit_failed_to_run(task, job, verdict, problem, now_wall)
        else:
            assert outputs is not None
            truth = Vote("audit", "coordinator", "coordinator",
                         digest_tensors(tensors_from_arrays(outputs)), dict(outputs))
            task.truth = truth
            self._judge(task, job, verdict, truth, now_wall)
        if task.state is TaskState.OPEN:
            self._replan(task, now_wall=now_wall)
        return self._fill(now, now_wall)

    def _audit_failed_to_run(self, task: TaskRecord, job: JobRecord, verdict: Accepted | None, problem: str,
                             now_wall: float) -> None:
        self.counters["audit_unavailable"] += 1
        if verdict is None:
            # Several owners said the task cannot run, and neither can the coordinator: confirmed.
            owners = len(task.error_owners)
            self._fail(task, job, f"{task.last_problem or problem} on {owners} owner{'s' * (owners != 1)}, "
                                  f"confirmed by the coordinator's own run ({problem})", now_wall)
            return
        # The coordinator could not check this group (its own run failed): ground truth is not to
        # be had, so only a full quorum of distinct owners is accepted, and it earns no trust.
        log.warning("audit could not run task=%s problem=%r", task.id, problem)
        self._note(task, f"audit could not run ({problem})")
        if len({v.owner for v in verdict.agreeing}) >= job.spec.replicas:
            self._verify(task, job, verdict, now_wall, checked=False)
        else:
            task.need = job.spec.replicas

    def _judge(self, task: TaskRecord, job: JobRecord, verdict: Accepted | None, truth: Vote,
               now_wall: float) -> None:
        self._refute_errors(task, now_wall)
        right = [v for v in task.votes if agree(truth, v, job.spec.tolerance)]
        for v in task.votes:
            if v not in right:
                self._punish(v.node, v.owner, "failed an audit: outputs differ from the coordinator's own run",
                             audited=True, now_wall=now_wall)
                self._note(task, f"rejected node {v.node}: failed an audit")
        if verdict is not None and right and verdict.canonical in right:
            self.counters["audit_passed"] += 1
        elif verdict is not None:
            self.counters["audit_failed"] += 1
        task.votes = right
        if right:
            group: list[Vote] = []
            for v in right:
                if all(v.owner != g.owner for g in group):
                    group.append(v)
            self._verify(task, job, Accepted(canonical=group[0], agreeing=tuple(group)), now_wall, checked=True,
                         audited=True)
        else:
            task.need = job.spec.replicas
            task.last_problem = "results differed from the coordinator's own run"

    def _refute_errors(self, task: TaskRecord, now_wall: float) -> None:
        """Those who reported the task could not run were wrong: ground truth has its outputs."""
        for node, owner in task.error_nodes:
            self._punish(node, owner, "reported an error the coordinator's own run does not have", audited=True,
                         now_wall=now_wall)
        task.error_nodes.clear()

    def _punish(self, node: str, owner: str, problem: str, *, audited: bool, now_wall: float) -> None:
        penalty = self.trust.failed(node, owner, problem, audited=audited, now=now_wall)
        self.counters["result_shown_wrong"] += 1
        log.warning("result shown wrong node=%s owner=%s problem=%r reissue=%d", node, owner, problem,
                    len(penalty.reissue))
        for task_id, lease in penalty.reissue:
            self._reopen(task_id, lease, f"node {node} was caught returning wrong results ({problem})", now_wall)
        if penalty.block_owner:
            self.counters["owner_blocked"] += 1
            reason = f"{self.trust.owner(owner).invalid} results shown wrong; last: {problem}"
            self.blocked.append((owner, reason))
            for other, waiting in list(self._waiting.items()):
                if waiting.owner == owner:
                    self._waiting.pop(other, None)
            # Its leases end now: nothing a blocked owner's nodes return counts any more.
            for held in [ls for ls in self.leases.values() if ls.owner == owner]:
                self._close(held, "blocked")

    def _reopen(self, task_id: str, bad_lease: str, reason: str, now_wall: float) -> None:
        """A task accepted on trust alone, on a result of a node now caught cheating: reopen it, claw
        its credit back and refund its submitter (by new ledger entries), and run it again."""
        task = self.tasks.get(task_id)
        if task is None or task.state is not TaskState.VERIFIED or bad_lease not in task.paid_leases:
            return
        job = self.jobs[task.job]
        task.state = check_transition(task.state, TaskState.OPEN)
        job.verified -= 1
        reopened_job = job.state is not JobState.RUNNING
        if reopened_job:
            job.state, job.error, job.finished_at = JobState.RUNNING, None, None
            deadline = job.spec.deadline_seconds or self.job_deadline
            heapq.heappush(self._job_deadlines, (now_wall + deadline, job.spec.id))
        self.ops.append(TaskReopened(task=task.id, job=job.spec.id, reason=reason, bad_lease=bad_lease,
                                     credits=task.paid, charge=task.charge, job_reopened=reopened_job, at=now_wall))
        self.counters["task_reopened"] += 1
        bad_nodes = {c.node for c in task.paid}
        task.canonical_digest, task.paid, task.charge, task.paid_leases = None, (), None, ()
        task.unchecked_outputs, task.unchecked_nodes = None, ()
        task.votes, task.truth, task.best_group = [], None, 0
        task.need = job.spec.replicas
        task.nodes, task.owners = set(bad_nodes), set()
        task.attempts, task.errors = 0, 0
        task.error_owners, task.problems, task.error_nodes = set(), {}, []
        self._note(task, f"reopened: {reason}")
        self._replan(task, now_wall=now_wall)

    def _reconcile(self, node: str, held: set[str]) -> None:
        """Leases restored after a restart whose node no longer holds them were answered into
        the void (the previous process took the result but died before committing it): reissue
        them now instead of waiting for them to expire. Only restored leases are checked, so an
        assignment still in flight to the node is never mistaken for a lost one."""
        for lease_id in list(self._node_leases.get(node, ())):
            if lease_id not in self._unconfirmed:
                continue
            self._unconfirmed.discard(lease_id)
            if lease_id not in held:
                self.counters["lease_lost_in_restart"] += 1
                self._close(self.leases[lease_id], "lost")

    # ---- internals --------------------------------------------------------------------------
    def _verify(self, task: TaskRecord, job: JobRecord, verdict: Accepted, now_wall: float, *,
                checked: bool, audited: bool = False) -> None:
        task.state = check_transition(task.state, TaskState.VERIFIED)
        task.canonical_digest = verdict.canonical.output_digest
        if not verdict.canonical.stored:  # only the accepted outputs are ever read back
            self.ops.append(BlobPut(task.canonical_digest,
                                    encode_tensor_map(tensors_from_arrays(verdict.canonical.outputs))))
        # Paid: the canonical vote and the next agreeing votes of distinct owners, at most k - not
        # every agreeing vote. Restored votes can agree in larger groups than k, and the submitter
        # must never pay more than was reserved for the job (coordinator.budget): k credits per
        # task at most; a trusted node's solo result costs one.
        paid, owners = [verdict.canonical], {verdict.canonical.owner}
        for v in verdict.agreeing:
            if len(paid) >= job.spec.replicas:
                break
            if v.owner not in owners:
                paid.append(v)
                owners.add(v.owner)
        amount = credit_amount(ModelCost(job.spec.flops_per_row), task.rows)
        credits = tuple(
            Credit(node=v.node, owner=v.owner, job=job.spec.id, task=task.id, amount=amount,
                   result_digest=v.output_digest, created_at=now_wall, ref=v.lease)
            for v in paid
        )
        # Jobs without a submitter (internal use) are not charged; every other task's credits are
        # paid by its submitter, in the same transaction, so credit is moved and never made.
        charge = charge_for(credits, account=job.spec.submitter, created_at=now_wall) \
            if job.spec.submitter else None
        self.ops.append(TaskDecided(task.id, TaskState.VERIFIED, task.canonical_digest, None,
                                    tuple(v.lease for v in paid), credits, charge))
        task.paid, task.charge, task.paid_leases = credits, charge, tuple(v.lease for v in paid)
        if not checked:
            task.unchecked_outputs = dict(verdict.canonical.outputs)
            task.unchecked_nodes = tuple((v.node, v.owner) for v in paid)
        for v in paid:
            if checked:
                self.trust.confirmed(v.node, v.owner, audited=audited, now=now_wall)
            else:
                self.trust.accepted_unchecked(v.node, v.owner, task.id, v.lease, now=now_wall)
        if checked:
            # Outvoted by a checked result: shown wrong. (Against an unchecked one, only unconfirmed.)
            for v in task.votes:
                if not any(v is p for p in verdict.agreeing) and not agree(verdict.canonical, v, job.spec.tolerance):
                    self._punish(v.node, v.owner, "outvoted: outputs differ from the accepted result", audited=False,
                                 now_wall=now_wall)
        self.counters["task_verified"] += 1
        self.counters["task_verified_checked" if checked else "task_verified_unchecked"] += 1
        self._decided(task, now_wall)
        job.verified += 1
        self._retire(task)
        self._maybe_finish(job, now_wall)

    def cancel_job(self, job_id: str, reason: str, now_wall: float) -> int:
        """Fail every open task of a running job with `reason`; returns how many. The job then
        ends failed by the ordinary path: its verified tasks stay paid for, its live leases' results
        count for nothing, and the rest of its reservation is released. Raises `NotCancellable`
        for an unknown or finished job."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotCancellable(f"unknown job {job_id}")
        if job.state is not JobState.RUNNING:
            raise NotCancellable(f"job {job_id} is already {job.state}: nothing to cancel")
        open_tasks = [t for tid in job.tasks if (t := self.tasks.get(tid)) is not None and t.state is TaskState.OPEN]
        for task in open_tasks:
            self._fail(task, job, reason, now_wall)
        return len(open_tasks)

    def heard_from(self) -> dict[str, float]:
        """When each node was last heard from (monotonic), nodes with work or recently asking."""
        return dict(self._heard)

    def _fail(self, task: TaskRecord, job: JobRecord, reason: str, now_wall: float) -> None:
        task.state = check_transition(task.state, TaskState.FAILED)
        task.error = reason
        self.ops.append(TaskDecided(task.id, TaskState.FAILED, None, reason, (), ()))
        self.counters["task_failed"] += 1
        self._decided(task, now_wall)
        job.failed += 1
        job.failures.append({"task": task.id, "reason": reason})
        log.warning("task failed task=%s reason=%r", task.id, reason)
        self._auditing.pop(task.id, None)
        task.auditing = False
        self._retire(task)
        self._maybe_finish(job, now_wall)

    def _decided(self, task: TaskRecord, now_wall: float) -> None:
        first = self._first_issued.pop(task.id, None)
        if first is not None:  # restored tasks and tasks failed before any lease are not timed
            self.observe_task_seconds(max(0.0, now_wall - first))

    def _retire(self, task: TaskRecord) -> None:
        for lease_id in list(task.live):
            self._close(self.leases[lease_id], "cancelled")
        self._ready.pop(task.id, None)
        task.votes.clear()
        task.truth = None
        task.inputs = None

    def _maybe_finish(self, job: JobRecord, now_wall: float) -> None:
        if job.verified + job.failed < len(job.tasks) or job.state is not JobState.RUNNING:
            return
        if self._closing_checks(job):
            return  # the job is done once its closing checks pass (or reopen what they disprove)
        job.state = JobState.DONE if job.failed == 0 else JobState.FAILED
        if job.failed:
            job.error = f"{job.failed} of {len(job.tasks)} tasks failed; first: {job.failures[0]['reason']}"
        job.finished_at = now_wall
        self.ops.append(JobFinished(job.spec.id, job.state, job.error, now_wall))
        for task_id in job.tasks:  # the closing checks are over: the accepted outputs live in the store
            task = self.tasks.get(task_id)
            if task is not None:
                task.unchecked_outputs = None

    def _closing_checks(self, job: JobRecord) -> bool:
        """Before a job is reported done, one result of each node that ran tasks of it alone on
        trust (adaptive replication) is audited, chosen at random, the nodes with the most such
        results first, for at most CLOSING_CHECK_SHARE of the job's tasks: a node
        that turned bad once trusted is caught before the submitter reads wrong outputs, not after
        (it would be caught in the end anyway, at 1/streak per task). True while checks run."""
        pending = self._closing.get(job.spec.id)
        if pending:
            return True
        if pending is not None:  # this round of checks has passed
            del self._closing[job.spec.id]
            return False
        by_node: dict[str, list[TaskRecord]] = {}
        for task_id in job.tasks:
            task = self.tasks.get(task_id)
            if task is not None and task.unchecked_outputs is not None and len(task.unchecked_nodes) == 1:
                by_node.setdefault(task.unchecked_nodes[0][0], []).append(task)
        if not by_node:
            return False
        nodes = sorted(by_node)
        self.rng.shuffle(nodes)
        nodes.sort(key=lambda n: -len(by_node[n]))  # stable: ties stay in random order
        # CLOSING_CHECK_SHARE of the job's tasks; for a job too small for one whole check, one check
        # with that probability (a one-task job is not audited twice as often as any other task).
        share = CLOSING_CHECK_SHARE * len(job.tasks)
        budget = math.floor(share) + (1 if self.rng.random() < share - math.floor(share) else 0)
        if budget == 0:
            return False
        picked = {self.rng.choice(sorted(by_node[n], key=lambda t: t.index)).id for n in nodes[:budget]}
        self._closing[job.spec.id] = set(picked)
        for task_id in sorted(picked):
            task = self.tasks[task_id]
            self.counters["closing_check"] += 1
            self._note(task, "closing check: a result accepted on trust alone is audited before the job is done")
            self._auditing[task_id] = None
            self.audits.append(AuditRequest(task=task.id, job=job.spec.id, model=job.spec.model,
                                            input_digest=task.input_digest, inputs=task.inputs,
                                            opt_level=job.spec.opt_level, rows=task.rows, why="closing check"))
        return True

    def _closing_check_done(self, task: TaskRecord, outputs: Mapping[str, npt.NDArray[Any]] | None,
                            problem: str | None, now_wall: float) -> None:
        job = self.jobs[task.job]
        pending = self._closing.get(job.spec.id, set())
        pending.discard(task.id)
        if task.state is TaskState.VERIFIED and task.unchecked_outputs is not None and outputs is not None \
                and problem is None:
            accepted = Vote("accepted", "", "", task.canonical_digest or "", task.unchecked_outputs)
            truth = Vote("audit", "coordinator", "coordinator", digest_tensors(tensors_from_arrays(outputs)),
                         dict(outputs))
            if agree(truth, accepted, job.spec.tolerance):
                self.counters["closing_check_passed"] += 1
                for node, owner in task.unchecked_nodes:
                    self.trust.confirmed(node, owner, audited=True, now=now_wall)
            else:
                self.counters["closing_check_failed"] += 1
                self._closing_failed.add(job.spec.id)
                for node, owner in task.unchecked_nodes:
                    # the node's unchecked results (this one among them) are reopened
                    self._punish(node, owner, "a closing check found its result wrong", audited=True,
                                 now_wall=now_wall)
        elif problem is not None:
            self.counters["audit_unavailable"] += 1
        if not pending:
            if job.spec.id in self._closing_failed:
                # something was reopened: when it is decided again, a new round of checks runs
                self._closing_failed.discard(job.spec.id)
                self._closing.pop(job.spec.id, None)
            else:
                self._closing[job.spec.id] = set()  # this round passed
            self._maybe_finish(job, now_wall)

    @staticmethod
    def _tally(task: TaskRecord, job: JobRecord) -> Verdict:
        """Decide the quorum over the task's votes, and remember its best group for `_replan`:
        the comparison (allclose over possibly large outputs) runs once per vote, not once per
        lease that ends."""
        need = task.need or job.spec.replicas
        verdict = decide_quorum(task.votes, k=need, tol=job.spec.tolerance)
        task.best_group = verdict.best_group if isinstance(verdict, Undecided) else need
        return verdict

    def _replan(self, task: TaskRecord, *, now_wall: float | None = None) -> None:
        job = self.jobs[task.job]
        if task.auditing:
            self._ready.pop(task.id, None)
            return
        need = task.need or job.spec.replicas
        if task.truth is not None:
            need = 1  # one result that matches the coordinator's own run decides it
        plan = plan_replicas(k=need, max_results=job.spec.max_results, live=len(task.live),
                             attempts=task.attempts, best_group=0 if task.truth is not None else task.best_group,
                             last_problem=task.last_problem, errors=0, max_errors=job.spec.max_errors)
        if plan.fail_reason is not None:
            self._fail(task, job, plan.fail_reason, now_wall if now_wall is not None else job.spec.created_at)
        elif plan.issue > 0:
            self._ready[task.id] = plan.issue
        else:
            self._ready.pop(task.id, None)

    def _track(self, lease: LeaseRecord, task: TaskRecord) -> None:
        self.leases[lease.id] = lease
        self._node_leases.setdefault(lease.node, set()).add(lease.id)
        task.live.add(lease.id)
        task.nodes.add(lease.node)
        task.owners.add(lease.owner)
        task.attempts += 1
        heapq.heappush(self._deadlines, (lease.deadline, lease.id))

    def _close(self, lease: LeaseRecord, state: str) -> None:
        del self.leases[lease.id]
        self._unconfirmed.discard(lease.id)
        self._node_leases[lease.node].discard(lease.id)
        task = self.tasks[lease.task]
        task.live.discard(lease.id)
        self.ops.append(LeaseClosed(lease.id, state))
        if state != "reported":
            # Only results count as tries (max_results bounds the results computed): a lease given
            # back, expired or abandoned is not one, or nodes that take leases and never answer
            # would use up every task's tries. Hoarders are bounded by their allowance instead
            # (coordinator/capacity.py), and every task by its job's deadline.
            task.attempts -= 1
        if state != "reported" and task.state is TaskState.OPEN:
            # The node never answered: it and its owner may take the task again later, or a
            # network of two owners could never finish a task whose lease once expired. (A hung
            # node gets nothing more until it asks again: `_take_back_from_silent`.)
            if all(v.node != lease.node for v in task.votes):
                task.nodes.discard(lease.node)
            if all(v.owner != lease.owner for v in task.votes):
                task.owners.discard(lease.owner)
            if task.need == 1 and not task.votes:
                task.need = self.jobs[task.job].spec.replicas  # a solo run fell through: replicate
            task.last_problem = f"lease {state} on node {lease.node}"
            self._replan(task)

    def _learn_task_time(self, job: JobRecord, seconds: float) -> None:
        """How long a lease takes from issue to result (queueing at the node included), per model and
        task size, as an EWMA: leases are sized from it (`_lease_span`)."""
        if seconds < 0:
            return
        key = (job.spec.model, job.spec.task_size)
        seen = self._task_seconds.get(key)
        self._task_seconds[key] = seconds if seen is None else 0.8 * seen + 0.2 * seconds

    def _lease_span(self, job: JobRecord) -> float:
        """A lease lasts what its task has been seen to take, with room to spare (4x, at least
        MIN_LEASE_SECONDS), never more than --lease-seconds: a node that takes a task and sits on
        it, heartbeating or not, delays it by about MIN_LEASE_SECONDS once the job's first results
        are in. Before any result of this model at this task size, the task's FLOP count at a
        deliberately slow SLOW_NODE_FLOPS decides (a laptop core runs single-threaded ONNX Runtime at
        a GFLOP/s or more)."""
        seen = self._task_seconds.get((job.spec.model, job.spec.task_size))
        if seen is None:
            seen = job.spec.flops_per_row * job.spec.task_size / SLOW_NODE_FLOPS
        return min(self.lease_seconds, max(MIN_LEASE_SECONDS, 4.0 * seen))

    def _fill(self, now: float, now_wall: float, only: str | None = None) -> dict[str, list[Assignment]]:
        """Serve waiting nodes from ready tasks, oldest job first, at random among the oldest
        READY_WINDOW: a node cannot predict (or choose) which tasks it will meet."""
        self._now = now
        out: dict[str, list[Assignment]] = {}
        if not self._ready:
            return out
        nodes = [only] if only is not None else list(self._waiting)
        for node in nodes:
            waiting = self._waiting.get(node)
            free = self.free_slots(node)
            if waiting is None or free <= 0:
                continue
            window = list(itertools.islice(self._ready, READY_WINDOW))
            self.rng.shuffle(window)
            rest = itertools.islice(self._ready, READY_WINDOW, None) if len(self._ready) > READY_WINDOW else ()
            picked: list[Assignment] = []
            for task_id in itertools.chain(window, list(rest)):
                if len(picked) >= free:
                    break
                task = self.tasks[task_id]
                if task_id not in self._ready or not may_take(node=node, owner=waiting.owner, task_nodes=task.nodes,
                                                              task_owners=task.owners):
                    continue
                if task.avoid and task.avoid.get(node, 0.0) > now:
                    continue  # it let this task's lease lapse: others get it first, for a lease's time
                job = self.jobs[task.job]
                if job.spec.replicas > 1 and task.need == job.spec.replicas and not task.votes and not task.live \
                        and task.truth is None and self.trust.solo(node, waiting.owner):
                    # Adaptive replication: a trusted node runs a fresh task alone (audited now and then).
                    task.need = 1
                    self._ready[task_id] = 1
                    self.counters["solo_issued"] += 1
                picked.append(self._issue(task, node, waiting.owner, now, now_wall))
            if picked:
                out[node] = picked
            if not self._ready:
                break
        return out

    def _issue(self, task: TaskRecord, node: str, owner: str, now: float, now_wall: float) -> Assignment:
        job = self.jobs[task.job]
        span = self._lease_span(job)
        lease = LeaseRecord(id=self._new_id(), task=task.id, job=task.job, node=node, owner=owner,
                            issued_at=now_wall, expires_at=now_wall + span, deadline=now + span)
        self._track(lease, task)
        if task.id not in self._first_issued:
            self._first_issued[task.id] = now_wall
        self.ops.append(LeaseIssued(lease))
        wanted = self._ready[task.id] - 1
        if wanted > 0:
            self._ready[task.id] = wanted
        else:
            del self._ready[task.id]
        return Assignment(task=task.id, job=task.job, lease=lease.id, model=job.spec.model,
                          input_digest=task.input_digest, expires_at=lease.expires_at,
                          inputs=task.inputs, opt_level=job.spec.opt_level)

    def serve_waiting(self, *, now: float, now_wall: float) -> dict[str, list[Assignment]]:
        """Hand ready tasks to nodes whose requests are still open (after a new job arrives)."""
        return self._fill(now, now_wall)

    def live_nodes(self) -> int:
        return len(self._waiting)

    def ready_tasks(self) -> int:
        """Tasks waiting for a node to take them (a replica each, at least)."""
        return len(self._ready)

    # ---- explanations ------------------------------------------------------------------------
    def _note(self, task: TaskRecord, note: str) -> None:
        task.notes.append(note)
        del task.notes[:-NOTES_KEPT]

    def stall_reason(self, task: TaskRecord) -> str:
        """Why an open task is not decided yet, in words a submitter can act on."""
        job = self.jobs[task.job]
        need = task.need or job.spec.replicas
        if task.auditing:
            return "waiting for the coordinator's own run of it (an audit)"
        online = {w.owner for w in self._waiting.values()}
        eligible = online - task.owners
        if task.live:
            nodes = sorted({self.leases[lease].node for lease in task.live if lease in self.leases})
            return f"running on node{'s' * (len(nodes) != 1)} {', '.join(nodes)}"
        if task.error_owners and not task.votes:
            return f"{task.last_problem} on {len(task.error_owners)} owner{'s' * (len(task.error_owners) != 1)}"
        if task.votes:
            owners = len({v.owner for v in task.votes})
            if owners >= 2 and task.best_group < need:
                if not eligible:
                    return f"results of {owners} owners disagree and no further owner is online to break the tie"
                return f"results of {owners} owners disagree: waiting for another owner's result"
            if not eligible:
                return f"{task.best_group} of {need} required owners agree; no further owner is online"
        if not online:
            return f"waiting: 0 of {need} required owners online"
        if not eligible:
            return "waiting: every online owner already ran it"
        return "waiting for a free node"

    def trust_view(self, node: str, owner: str | None = None) -> dict[str, Any]:
        waiting = self._waiting.get(node)
        owner = owner or (waiting.owner if waiting is not None else "")
        rec = self.trust.nodes.get(node)
        return {"node": node, "owner": owner, "trusted": self.trust.trusted(node, owner),
                "blocked": owner in self.trust.blocked, "why": self.trust.why(node, owner),
                "audit_rate": self.trust.audit_rate(node, owner), "record": rec.to_json() if rec else None,
                "allowed_leases": self.capacity.grant(node, 1 << 30, self._now),
                "leases": len(self._node_leases.get(node, ()))}

    # ---- read views (coordinator.queries) -----------------------------------------------------
    def job_view(self, job_id: str) -> JobView | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        status = job.status()
        if job.state is JobState.RUNNING:
            # Why it is not moving, task by task (the first few): a task never waits silently.
            waiting = []
            for task_id in job.tasks:
                task = self.tasks.get(task_id)  # a restarted coordinator holds only open tasks
                if task is not None and task.state is TaskState.OPEN:
                    waiting.append({"task": task.id, "waiting": self.stall_reason(task), "notes": list(task.notes)})
                    if len(waiting) >= 20:
                        break
            status["waiting"] = waiting
        return JobView(id=job_id, state=str(job.state), error=job.error, status=status,
                       submitter=job.spec.submitter, read_token_sha256=job.spec.read_token_sha256)

    def lease_view(self, lease_id: str) -> LeaseView | None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return None
        return LeaseView(id=lease.id, task=lease.task, job=lease.job, node=lease.node,
                         input_digest=self.tasks[lease.task].input_digest, expires_at=lease.expires_at)

    def node_views(self) -> list[NodeView]:
        holding = {n for n, leases in self._node_leases.items() if leases}
        out = []
        for node in sorted(holding | set(self._waiting)):
            waiting = self._waiting.get(node)
            leases = self._node_leases.get(node, set())
            owner = waiting.owner if waiting is not None else self.leases[next(iter(leases))].owner
            out.append(NodeView(node=node, owner=owner, capacity=waiting.capacity if waiting else 0,
                                leases=len(leases)))
        return out


def _ignore(seconds: float) -> None:
    pass


def _check_outputs(outputs: Mapping[str, npt.NDArray[Any]], job: JobRecord, task: TaskRecord) -> str | None:
    names = set(outputs)
    if job.spec.output_names and names != set(job.spec.output_names):
        return f"outputs {sorted(names)} are not the model's {sorted(job.spec.output_names)}"
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != task.rows:
            return f"output {name!r} has shape {arr.shape}, expected {task.rows} rows"
    return check_finite(outputs)
