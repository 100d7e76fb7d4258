"""The coordinator's state machine, without I/O: messages and `now` in; assignments to send and
operations to persist out.

The MQTT and HTTP adapters call it from one asyncio task at a time, so it needs no locks. It keeps
the hot state (open tasks, live leases, waiting nodes) in memory and appends every change to
`ops`; the store writes those in grouped transactions, so a verdict and its credits commit together.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from ledger.credit import ModelCost, credit_amount
from ledger.entries import Credit, charge_for
from protocol.messages import Assignment, Result
from protocol.tensors import encode_tensor_map, tensors_from_arrays

from .queries import JobView, LeaseView, NodeView
from .quorum import Accepted, Undecided, Verdict, Vote, check_finite, decide_quorum
from .records import (
    NEVER_RAN,
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
)
from .scheduler import JobState, TaskState, check_transition, may_take, plan_replicas

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


class Engine:
    def __init__(self, *, lease_seconds: float, max_inline_bytes: int, new_id: Callable[[], str]) -> None:
        self.lease_seconds = lease_seconds
        self.max_inline_bytes = max_inline_bytes
        self._new_id = new_id
        self.jobs: dict[str, JobRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.leases: dict[str, LeaseRecord] = {}
        self._ready: dict[str, int] = {}  # task id -> replicas wanted now, in FIFO order
        self._waiting: dict[str, Waiting] = {}
        self._node_leases: dict[str, set[str]] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._unconfirmed: set[str] = set()  # restored leases not yet confirmed by their node
        self.ops: list[Op] = []
        self.counters: Counter[str] = Counter()

    # ---- jobs -------------------------------------------------------------------------------
    def add_job(self, job: JobRecord, tasks: list[TaskRecord], *, now_wall: float | None = None) -> None:
        """A new job, or one restored after a restart with its open tasks (and their votes)."""
        now_wall = job.spec.created_at if now_wall is None else now_wall
        self.jobs[job.spec.id] = job
        for t in tasks:
            self.tasks[t.id] = t
            if t.state is not TaskState.OPEN:
                continue
            # Restored votes may already agree (the process died before committing the verdict).
            verdict = self._tally(t, job)
            if isinstance(verdict, Accepted):
                self._verify(t, job, verdict, now_wall)
            else:
                self._replan(t, now_wall=now_wall)
        self._maybe_finish(job, now_wall)

    def restore_lease(self, lease: LeaseRecord) -> None:
        """A lease that was live when the previous process stopped: its node may still answer."""
        task = self.tasks.get(lease.task)
        if task is None or task.state is not TaskState.OPEN:
            return
        self._track(lease, task)
        self._unconfirmed.add(lease.id)
        self._replan(task)

    # ---- nodes ------------------------------------------------------------------------------
    def on_work_request(self, node: str, owner: str, slots: int, seq: int, *, now: float,
                        now_wall: float, held: tuple[str, ...] = ()) -> dict[str, list[Assignment]]:
        current = self._waiting.get(node)
        if current is not None and seq < current.seq:
            self.counters["stale_work_request"] += 1
            return {}
        self._reconcile(node, set(held))
        self._waiting[node] = Waiting(owner, slots, seq)
        return self._fill(now, now_wall, only=node)

    def free_slots(self, node: str) -> int:
        waiting = self._waiting.get(node)
        if waiting is None:
            return 0
        return waiting.capacity - len(self._node_leases.get(node, ()))

    def on_release(self, node: str, leases: tuple[str, ...], *, now: float,
                   now_wall: float) -> dict[str, list[Assignment]]:
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
        self._waiting.pop(node, None)
        for lease_id in list(self._node_leases.get(node, ())):
            self._close(self.leases[lease_id], "offline")
        return self._fill(now, now_wall)

    def sweep(self, *, now: float, now_wall: float) -> dict[str, list[Assignment]]:
        """Expire leases past their deadline and reissue their tasks."""
        expired = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, lease_id = heapq.heappop(self._deadlines)
            lease = self.leases.get(lease_id)
            if lease is not None and lease.deadline <= now:
                self.counters["lease_expired"] += 1
                self._close(lease, "expired")
                expired = True
        return self._fill(now, now_wall) if expired else {}

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
        rejection = self.check_result(node, result)
        if rejection is not None:
            self.counters[rejection.reason] += 1
            return {}
        lease = self.leases[result.lease]
        task = self.tasks[lease.task]
        job = self.jobs[task.job]
        self._close(lease, "reported")
        if problem is None and outputs is not None:
            problem = _check_outputs(outputs, job, task)
        self.ops.append(ResultRecorded(lease.id, task.id, node, lease.owner,
                                       result.output_digest if problem is None else "", problem, now_wall))
        if problem is not None or outputs is None:
            self.counters["invalid_result"] += 1
            task.errors += 1
            task.last_problem = problem or "no outputs"
            # The node stays excluded (it would likely fail again); its owner's other nodes may try.
            if all(v.owner != lease.owner for v in task.votes):
                task.owners.discard(lease.owner)
            log.info("invalid result task=%s node=%s problem=%r", task.id, node, task.last_problem)
        else:
            task.votes.append(Vote(lease.id, node, lease.owner, result.output_digest, outputs,
                                   stored=result.outputs is None))
            verdict = self._tally(task, job)
            if isinstance(verdict, Accepted):
                self._verify(task, job, verdict, now_wall)
                return self._fill(now, now_wall)
            if len(task.votes) > 1:
                self.counters["disagreement"] += 1
                task.last_problem = "results disagree"
        self._replan(task, now_wall=now_wall)
        return self._fill(now, now_wall)

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
    def _verify(self, task: TaskRecord, job: JobRecord, verdict: Accepted, now_wall: float) -> None:
        task.state = check_transition(task.state, TaskState.VERIFIED)
        task.canonical_digest = verdict.canonical.output_digest
        if not verdict.canonical.stored:  # only the accepted outputs are ever read back
            self.ops.append(BlobPut(task.canonical_digest,
                                    encode_tensor_map(tensors_from_arrays(verdict.canonical.outputs))))
        # Paid: the canonical vote and the next agreeing votes of distinct owners, k in all - not
        # every agreeing vote. Restored votes can agree in larger groups than k, and the submitter
        # must pay what was reserved for the job (coordinator.budget): k credits per task, always.
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
                   result_digest=v.output_digest, created_at=now_wall)
            for v in paid
        )
        # Jobs without a submitter (internal use) are not charged; every other task's credits are
        # paid by its submitter, in the same transaction, so credit is moved and never made.
        charge = charge_for(credits, account=job.spec.submitter, created_at=now_wall) \
            if job.spec.submitter else None
        self.ops.append(TaskDecided(task.id, TaskState.VERIFIED, task.canonical_digest, None,
                                    tuple(v.lease for v in paid), credits, charge))
        self.counters["task_verified"] += 1
        job.verified += 1
        self._retire(task)
        self._maybe_finish(job, now_wall)

    def _fail(self, task: TaskRecord, job: JobRecord, reason: str, now_wall: float) -> None:
        task.state = check_transition(task.state, TaskState.FAILED)
        task.error = reason
        self.ops.append(TaskDecided(task.id, TaskState.FAILED, None, reason, (), ()))
        self.counters["task_failed"] += 1
        job.failed += 1
        job.failures.append({"task": task.id, "reason": reason})
        log.warning("task failed task=%s reason=%r", task.id, reason)
        self._retire(task)
        self._maybe_finish(job, now_wall)

    def _retire(self, task: TaskRecord) -> None:
        for lease_id in list(task.live):
            self._close(self.leases[lease_id], "cancelled")
        self._ready.pop(task.id, None)
        task.votes.clear()
        task.inputs = None

    def _maybe_finish(self, job: JobRecord, now_wall: float) -> None:
        if job.verified + job.failed < len(job.tasks) or job.state is not JobState.RUNNING:
            return
        job.state = JobState.DONE if job.failed == 0 else JobState.FAILED
        if job.failed:
            job.error = f"{job.failed} of {len(job.tasks)} tasks failed; first: {job.failures[0]['reason']}"
        job.finished_at = now_wall
        self.ops.append(JobFinished(job.spec.id, job.state, job.error, now_wall))

    @staticmethod
    def _tally(task: TaskRecord, job: JobRecord) -> Verdict:
        """Decide the quorum over the task's votes, and remember its best group for `_replan`:
        the comparison (allclose over possibly large outputs) runs once per vote, not once per
        lease that ends."""
        verdict = decide_quorum(task.votes, k=job.spec.replicas, tol=job.spec.tolerance)
        task.best_group = verdict.best_group if isinstance(verdict, Undecided) else job.spec.replicas
        return verdict

    def _replan(self, task: TaskRecord, *, now_wall: float | None = None) -> None:
        job = self.jobs[task.job]
        plan = plan_replicas(k=job.spec.replicas, max_results=job.spec.max_results, live=len(task.live),
                             attempts=task.attempts, best_group=task.best_group, last_problem=task.last_problem,
                             errors=task.errors, max_errors=job.spec.max_errors)
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
        if state in NEVER_RAN:
            task.attempts -= 1  # a lease given back unrun is not a try (max_results counts tries)
        if state != "reported" and task.state is TaskState.OPEN:
            # The node never answered: it and its owner may take the task again later, or a
            # network of two owners could never finish a task whose lease once expired.
            if all(v.node != lease.node for v in task.votes):
                task.nodes.discard(lease.node)
            if all(v.owner != lease.owner for v in task.votes):
                task.owners.discard(lease.owner)
            task.last_problem = f"lease {state} on node {lease.node}"
            self._replan(task)

    def _fill(self, now: float, now_wall: float, only: str | None = None) -> dict[str, list[Assignment]]:
        """Serve waiting nodes from ready tasks, oldest job first."""
        out: dict[str, list[Assignment]] = {}
        if not self._ready:
            return out
        nodes = [only] if only is not None else list(self._waiting)
        for node in nodes:
            waiting = self._waiting.get(node)
            free = self.free_slots(node)
            if waiting is None or free <= 0:
                continue
            picked: list[Assignment] = []
            for task_id in list(self._ready):
                if len(picked) >= free:
                    break
                task = self.tasks[task_id]
                if not may_take(node=node, owner=waiting.owner, task_nodes=task.nodes, task_owners=task.owners):
                    continue
                picked.append(self._issue(task, node, waiting.owner, now, now_wall))
            if picked:
                out[node] = picked
            if not self._ready:
                break
        return out

    def _issue(self, task: TaskRecord, node: str, owner: str, now: float, now_wall: float) -> Assignment:
        job = self.jobs[task.job]
        lease = LeaseRecord(id=self._new_id(), task=task.id, job=task.job, node=node, owner=owner,
                            issued_at=now_wall, expires_at=now_wall + self.lease_seconds,
                            deadline=now + self.lease_seconds)
        self._track(lease, task)
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

    # ---- read views (coordinator.queries) -----------------------------------------------------
    def job_view(self, job_id: str) -> JobView | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        return JobView(id=job_id, state=str(job.state), error=job.error, status=job.status(),
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


def _check_outputs(outputs: Mapping[str, npt.NDArray[Any]], job: JobRecord, task: TaskRecord) -> str | None:
    names = set(outputs)
    if job.spec.output_names and names != set(job.spec.output_names):
        return f"outputs {sorted(names)} are not the model's {sorted(job.spec.output_names)}"
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != task.rows:
            return f"output {name!r} has shape {arr.shape}, expected {task.rows} rows"
    return check_finite(outputs)
