"""A saboteur simulation (issue 8, "Proof, measured"): many simulated nodes, a fraction of them
hostile, driven through the real coordinator state machine (coordinator/engine.py) in-process, over
a simulated clock and seeded random sources.

What is real: the `Engine`, its `TrustBook`, `Capacity`, quorum and scheduler, with the service's
defaults (60 s leases, 10 s silence, 2 s heartbeats, `TrustPolicy()`). What is simulated: the nodes
(a task takes a uniform 0.2-0.6 s), the network (no latency), and the coordinator's sandboxed audit,
which answers with the truth (`inputs * 2`) after `audit_seconds` on one audit worker, FIFO, as
`audit_workers = 1` does. Every engine output is drained the way coordinator/service.py drains it
(`ops`, `audits`, `blocked`), and the harness reads the engine's state only (`trust.trusted` lets a
cheater know when it is trusted: the trust view is readable over HTTP).

Copying, at this level: the engine sees a result's digest and outputs, never who computed them, so
a copy of another node's bytes is indistinguishable from computing them: it is a collusion on the
right answer (`COPY` measures what that gains: credit and trust without computing, and the solo
tasks a trusted copier then cannot copy). The defences sit one layer up: broker ACLs keep a node
from reading others' results, and the service counts a result whose outputs were neither inline nor
uploaded under the node's own lease as invalid (coordinator/service.py); `COPY_DIGEST` feeds the
engine exactly that problem, which is what the service does with a digest-only copy.

Deterministic for a seed: ids are counters (plan_job's random job id is replaced), every random
draw comes from the scenario's seed, and the table came out the same under several PYTHONHASHSEEDs.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.engine import AuditRequest, Engine
from coordinator.jobs import JobOptions, plan_job
from coordinator.records import JobFinished, JobRecord, LeaseClosed, ResultRecorded, TaskDecided, TaskReopened
from coordinator.scheduler import JobState, TaskState
from coordinator.trust import TrustBook, TrustPolicy
from protocol.messages import Assignment, Result
from protocol.tensors import Tensor, digest_tensors, tensors_from_arrays

META: Mapping[str, Any] = {
    "model": "d" * 64, "flops_per_row": 1000,
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}
# What coordinator/service.py hands the engine for a result naming outputs it never got from that node.
NOT_UPLOADED = "outputs were neither inline nor uploaded under this node's lease"
NODE_ERROR = "node reported: model failed to run"
HOARD_SLOTS = 4096

Arrays = dict[str, npt.NDArray[Any]]


class Behaviour(StrEnum):
    HONEST = "honest"
    RANDOM = "random"  # a different wrong answer every time
    COLLUDE = "collude"  # every colluder (each its own owner) returns the same wrong answer for a task
    TRUSTED_CHEAT = "trusted_cheat"  # honest until trusted, then the colluders' wrong answer on every task
    SOMETIMES = "sometimes"  # honest until trusted, then wrong on `cheat_rate` of its tasks only
    SYBIL = "sybil"  # one party, many accounts: wrong when two of its accounts hold a task, or when trusted
    COPY = "copy"  # returns another node's digest and outputs for the task once it saw one, else silent
    COPY_DIGEST = "copy_digest"  # the same, with the digest only: the service finds no upload (see above)
    HOARD = "hoard"  # asks for 4096 slots, never answers, keeps heartbeating
    ERROR_SPAM = "error_spam"  # always reports an error


# Saboteurs whose owners should end blocked; the rest must be without effect (see `Report`).
BLOCKABLE = frozenset({Behaviour.RANDOM, Behaviour.COLLUDE, Behaviour.TRUSTED_CHEAT, Behaviour.SYBIL,
                       Behaviour.COPY_DIGEST, Behaviour.ERROR_SPAM})


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    behaviour: Behaviour = Behaviour.HONEST
    fraction: float = 0.0  # of the nodes that behave so; the rest are honest
    nodes: int = 50
    jobs: int = 4  # submitted one after another: the next when the previous has ended
    tasks_per_job: int = 250
    rows_per_task: int = 1
    warmup_jobs: int = 1  # "steady" figures count the jobs after these
    replicas: int = 2
    slots: int = 2  # leases an honest node asks for
    compute_seconds: tuple[float, float] = (0.2, 0.6)
    audit_seconds: float = 0.05
    heartbeat_seconds: float = 2.0
    sweep_seconds: float = 0.25
    lease_seconds: float = 60.0
    silence_seconds: float = 10.0
    job_deadline: float = 3600.0
    cheat_rate: float = 0.5  # SOMETIMES: the share of its tasks a trusted one cheats on
    policy: TrustPolicy = field(default_factory=TrustPolicy)
    seed: int = 1
    max_seconds: float = 40_000.0  # simulated; past it the run stops with jobs still running

    @property
    def saboteurs(self) -> int:
        return 0 if self.behaviour is Behaviour.HONEST else round(self.fraction * self.nodes)


@dataclass(frozen=True, slots=True)
class Blocked:
    at: float  # simulated seconds
    own_results: int  # results the owner had returned when blocked
    accepted: int  # tasks verified network-wide by then


@dataclass(slots=True)
class Report:
    scenario: Scenario
    saboteur_owners: list[str]
    accepted: int = 0  # tasks verified at the end
    wrong_final: int = 0  # ...whose canonical output is wrong
    wrong_kept_after_caught: int = 0  # ...of those, accepted from a node shown wrong after it was accepted
    wrong_at_finish: int = 0  # wrong tasks in each job when it first finished (what its submitter got)
    finished_tasks: int = 0  # tasks of jobs that finished, counted at their first finish
    wrong_ever: int = 0  # verdicts that accepted a wrong output, reopened later or not
    reopened: int = 0
    results: int = 0  # results returned by nodes (valid or not), re-runs included
    invalid_results: int = 0
    audits: int = 0
    steady_accepted: int = 0
    steady_results: int = 0
    steady_audits: int = 0
    blocked: dict[str, Blocked] = field(default_factory=dict)
    honest_blocked: int = 0
    jobs_ended: bool = False
    job_states: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    job_seconds: list[float] = field(default_factory=list)  # submit to first finish, per job
    makespan: float = 0.0
    credit_total: float = 0.0  # net of claw-backs
    credit_saboteurs: float = 0.0
    credit_by_owner: Counter[str] = field(default_factory=Counter)  # net of claw-backs
    copies: int = 0
    saboteur_results: int = 0
    lease_endings: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)

    # ---- derived figures ----------------------------------------------------------------------
    @property
    def wrong_rate(self) -> float:
        return self.wrong_final / self.accepted if self.accepted else 0.0

    @property
    def wrong_at_finish_rate(self) -> float:
        return self.wrong_at_finish / self.finished_tasks if self.finished_tasks else 0.0

    @property
    def results_per_task(self) -> float:
        return self.results / self.accepted if self.accepted else math.inf

    @property
    def audits_per_task(self) -> float:
        return self.audits / self.accepted if self.accepted else math.inf

    @property
    def steady_results_per_task(self) -> float:
        return self.steady_results / self.steady_accepted if self.steady_accepted else math.inf

    @property
    def steady_audits_per_task(self) -> float:
        return self.steady_audits / self.steady_accepted if self.steady_accepted else math.inf

    @property
    def never_blocked(self) -> list[str]:
        return [o for o in self.saboteur_owners if o not in self.blocked]

    @property
    def results_until_blocked(self) -> list[int]:
        return [self.blocked[o].own_results for o in self.saboteur_owners if o in self.blocked]

    @property
    def credit_share(self) -> float:
        return self.credit_saboteurs / self.credit_total if self.credit_total else 0.0

    @property
    def spot_check(self) -> tuple[float, int, float]:
        """(q, n, s) for Sarmenta's bound. q: the chance that a saboteur's wrong result is checked
        against ground truth when it first cheats - a trusted node's first audit rate for those that
        cheat only once trusted, the untrusted audit rate for the rest; n: the mean number of results
        a saboteur returned; s: the share of its results a saboteur makes wrong."""
        sc, policy = self.scenario, self.scenario.policy
        trust_gated = sc.behaviour in (Behaviour.TRUSTED_CHEAT, Behaviour.SOMETIMES, Behaviour.SYBIL)
        q = max(policy.min_audit_rate, 1 / policy.trusted_after) if trust_gated else policy.untrusted_audit_rate
        n = round(self.saboteur_results / len(self.saboteur_owners)) if self.saboteur_owners else 0
        s = sc.cheat_rate if sc.behaviour is Behaviour.SOMETIMES else 1.0
        return q, n, s


def first_two_agree(f: float) -> float:
    """Wrong results accepted by 'the first two agreeing answers' when a fraction f collude on one
    wrong answer: both first replicas are colluders (f^2), or they split and a colluder breaks the
    tie (2f(1-f)f)."""
    return f * f * (3 - 2 * f)


def sarmenta(f: float, q: float, n: int, s: float = 1.0) -> float:
    """Sarmenta's spot-checking bound with blacklisting: a fraction f of saboteurs, each wrong on a
    share s of its n results, each result spot-checked with probability q:
    s f (1-qs)^n / ((1-f) + f (1-qs)^n); with s = 1, f(1-q)^n / ((1-f) + f(1-q)^n)."""
    survive = f * (1 - q * s) ** n
    return s * survive / ((1 - f) + survive) if f else 0.0


@dataclass(slots=True)
class SimNode:
    id: str
    owner: str
    behaviour: Behaviour
    rng: random.Random
    seq: int = 0
    held: dict[str, Assignment] = field(default_factory=dict)
    returned: int = 0


class Simulation:
    """One scenario, run once: `Simulation(scenario).run()` returns its `Report`."""

    def __init__(self, scenario: Scenario) -> None:
        self.sc = scenario
        ids = itertools.count()
        self.engine = Engine(lease_seconds=scenario.lease_seconds, max_inline_bytes=1 << 20,
                             new_id=lambda: f"L{next(ids)}", trust=TrustBook(scenario.policy),
                             rng=random.Random(scenario.seed), silence_seconds=scenario.silence_seconds,
                             job_deadline=scenario.job_deadline)
        self.rng = random.Random(scenario.seed + 1_000_003)
        self.now = 0.0
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        behaviours = [scenario.behaviour] * scenario.saboteurs + \
            [Behaviour.HONEST] * (scenario.nodes - scenario.saboteurs)
        self.rng.shuffle(behaviours)  # saboteurs spread through the engine's node order
        self.nodes: dict[str, SimNode] = {}
        for i, b in enumerate(behaviours):
            # Every node its own owner; a Sybil party's accounts are distinct owners too, run by one mind.
            owner = f"sybil{i:03d}" if b is Behaviour.SYBIL else f"{b.value}{i:03d}"
            self.nodes[f"n{i:03d}"] = SimNode(f"n{i:03d}", owner, b, random.Random(self.rng.random()))
        self.truth: dict[str, str] = {}  # task -> digest of its right outputs
        self.blobs: dict[str, npt.NDArray[Any]] = {}  # input digest -> the task's inputs (the blob store)
        self.job_ids: list[str] = []
        self.submitted_at: dict[str, float] = {}
        self.published: dict[str, list[tuple[str, str, Arrays]]] = {}  # task -> (node, digest, outputs)
        self.party_holders: dict[str, set[str]] = {}  # Sybil party: task -> its accounts that held it
        self.party_cheats: dict[str, bool] = {}  # Sybil party: task -> its one decision for the task
        self._audit_free_at = 0.0
        saboteurs = sorted({n.owner for n in self.nodes.values() if n.behaviour is not Behaviour.HONEST})
        self.report = Report(scenario=scenario, saboteur_owners=saboteurs)
        self._returned_by_owner: Counter[str] = Counter()
        self._job_of_task: dict[str, str] = {}
        self._steady_jobs: set[str] = set()
        self._first_finish: set[str] = set()
        self._wrong_accepts: dict[str, list[tuple[str, int]]] = {}  # task -> (credited node, its invalid count then)

    # ---- driving --------------------------------------------------------------------------------
    def run(self) -> Report:
        self._submit_next()
        for node in self.nodes.values():
            self._at(self.rng.uniform(0, self.sc.heartbeat_seconds), "heartbeat", node)
        self._at(self.sc.sweep_seconds, "sweep", None)
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if t > self.sc.max_seconds:
                break
            self.now = t
            getattr(self, f"_on_{kind}")(payload)
            if self._advance():
                break
        return self._finish_report()

    def _at(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _advance(self) -> bool:
        """True once every job is submitted and none is running; submits the next job when the last
        one has ended (jobs run one after another, so the warm-up and steady jobs are apart)."""
        if any(self.engine.jobs[j].state is JobState.RUNNING for j in self.job_ids):
            return False
        if len(self.job_ids) < self.sc.jobs:
            self._submit_next()
            return False
        return True

    def _submit_next(self) -> None:
        sc, index = self.sc, len(self.job_ids)
        rows = sc.tasks_per_job * sc.rows_per_task
        x = np.random.default_rng(self.rng.getrandbits(64)).standard_normal((rows, 2)).astype(np.float32)
        job, tasks, _ = plan_job(META, {"x": x}, JobOptions(replicas=sc.replicas, task_size=sc.rows_per_task,
                                                            max_results=None, final="argmax"),
                                 now_wall=self.now, max_inline_bytes=1 << 20)
        job_id = f"job{index}"  # plan_job draws a random id: a counter keeps runs repeatable
        for t in tasks:
            t.id, t.job = f"{job_id}-{t.index:05d}", job_id
            self.truth[t.id] = _digest({"y": x[t.start:t.stop] * 2})
            self.blobs[t.input_digest] = x[t.start:t.stop]
            self._job_of_task[t.id] = job_id
        job = JobRecord(spec=dataclasses.replace(job.spec, id=job_id), tasks=[t.id for t in tasks])
        self.job_ids.append(job_id)
        self.submitted_at[job_id] = self.now
        if index >= sc.warmup_jobs:
            self._steady_jobs.add(job_id)
        self.engine.add_job(job, tasks, now_wall=self.now)
        self._after(self.engine.serve_waiting(now=self.now, now_wall=self.now))

    # ---- events ---------------------------------------------------------------------------------
    def _on_heartbeat(self, node: SimNode) -> None:
        node.seq += 1
        for lease, a in list(node.held.items()):
            if a.expires_at <= self.now:  # a node forgets a lease past its expiry
                del node.held[lease]
        slots = HOARD_SLOTS if node.behaviour is Behaviour.HOARD else self.sc.slots
        self._after(self.engine.on_work_request(node.id, node.owner, slots, node.seq, now=self.now,
                                                now_wall=self.now, held=tuple(node.held)))
        self._at(self.now + self.sc.heartbeat_seconds, "heartbeat", node)

    def _on_sweep(self, _: None) -> None:
        self._after(self.engine.sweep(now=self.now, now_wall=self.now))
        self._at(self.now + self.sc.sweep_seconds, "sweep", None)

    def _on_audit(self, req: AuditRequest) -> None:
        truth = {"y": self._inputs(req.input_digest, req.inputs) * 2}
        self._after(self.engine.on_audit(req.task, truth, None, now=self.now, now_wall=self.now))

    def _on_finish(self, item: tuple[SimNode, str]) -> None:
        node, lease = item
        a = node.held.pop(lease, None)
        if a is None:
            return
        truth = self._inputs(a.input_digest, a.inputs) * 2
        if node.behaviour is Behaviour.ERROR_SPAM:
            self._send(node, a, None, "", NODE_ERROR)
            return
        outputs = {"y": truth + self._offset(node, a)}
        digest = _digest(outputs)
        self.published.setdefault(a.task, []).append((node.id, digest, outputs))
        self._send(node, a, outputs, digest, None)

    def _on_poll(self, item: tuple[SimNode, str]) -> None:
        """A copier waits for someone else's result for its task; silent if none comes in time."""
        node, lease = item
        a = node.held.get(lease)
        if a is None:
            return
        seen = [p for p in self.published.get(a.task, ()) if p[0] != node.id]
        if seen:
            del node.held[lease]
            _, digest, outputs = seen[0]
            self.report.copies += 1
            if node.behaviour is Behaviour.COPY:
                self._send(node, a, outputs, digest, None)
            else:
                self._send(node, a, None, digest, NOT_UPLOADED)
        elif self.now + 0.25 < a.expires_at:
            self._at(self.now + 0.25, "poll", item)

    def _inputs(self, digest: str, inline: Mapping[str, Tensor] | None) -> npt.NDArray[Any]:
        """A task's inputs: inline, or (a reopened task's, whose inline copy the engine dropped) from
        the blob store by digest, as a node or the auditor fetches them over HTTP."""
        return inline["x"].to_array() if inline is not None else self.blobs[digest]

    # ---- node behaviour -------------------------------------------------------------------------
    def _offset(self, node: SimNode, a: Assignment) -> float:
        """0 for the right answer; what a saboteur adds to it otherwise (far outside tolerance)."""
        b = node.behaviour
        trusted = self.engine.trust.trusted(node.id, node.owner)  # read-only: the trust view over HTTP
        if b is Behaviour.RANDOM:
            return node.rng.uniform(1.0, 100.0)
        if b is Behaviour.COLLUDE or (b is Behaviour.TRUSTED_CHEAT and trusted):
            return 1.0  # the one wrong answer every colluder gives for the task
        if b is Behaviour.SOMETIMES and trusted and node.rng.random() < self.sc.cheat_rate:
            return 1.0
        if b is Behaviour.SYBIL:
            # The party answers each task one way across all its accounts: wrong when two of them
            # hold it (they outvote a stranger) or when this account is trusted (it may stand alone).
            cheat = self.party_cheats.get(a.task)
            if cheat is None:
                cheat = self.party_cheats[a.task] = len(self.party_holders.get(a.task, ())) >= 2 or trusted
            return 1.0 if cheat else 0.0
        return 0.0

    def _send(self, node: SimNode, a: Assignment, outputs: Arrays | None, digest: str, problem: str | None) -> None:
        node.returned += 1
        result = Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                        output_digest=digest, outputs=None, error=NODE_ERROR if problem == NODE_ERROR else None)
        self._after(self.engine.on_result(node.id, result, outputs, problem, now=self.now, now_wall=self.now))

    # ---- the service's side: route assignments, drain what the engine emits --------------------
    def _after(self, out: Mapping[str, list[Assignment]]) -> None:
        for node_id, items in out.items():
            node = self.nodes[node_id]
            for a in items:
                node.held[a.lease] = a
                if node.behaviour is Behaviour.SYBIL:
                    self.party_holders.setdefault(a.task, set()).add(node.id)
                if node.behaviour is Behaviour.HOARD:
                    continue
                if node.behaviour in (Behaviour.COPY, Behaviour.COPY_DIGEST):
                    self._at(self.now + 0.1, "poll", (node, a.lease))
                else:
                    self._at(self.now + node.rng.uniform(*self.sc.compute_seconds), "finish", (node, a.lease))
        audits, self.engine.audits = self.engine.audits, []
        for req in audits:
            self.report.audits += 1
            if req.job in self._steady_jobs:
                self.report.steady_audits += 1
            self._audit_free_at = max(self.now, self._audit_free_at) + self.sc.audit_seconds
            self._at(self._audit_free_at, "audit", req)
        ops, self.engine.ops = self.engine.ops, []
        for op in ops:
            self._account(op)
        blocked, self.engine.blocked = self.engine.blocked, []
        for owner, _reason in blocked:
            self.report.blocked.setdefault(owner, Blocked(self.now, self._returned_by_owner[owner],
                                                          self.engine.counters["task_verified"]))

    def _account(self, op: object) -> None:
        r = self.report
        saboteurs = set(r.saboteur_owners)
        if isinstance(op, ResultRecorded):
            r.results += 1
            r.invalid_results += op.problem is not None
            self._returned_by_owner[op.owner] += 1
            r.saboteur_results += op.owner in saboteurs
            if self._job_of_task[op.task] in self._steady_jobs:
                r.steady_results += 1
        elif isinstance(op, TaskDecided) and op.state is TaskState.VERIFIED:
            if op.canonical_digest != self.truth[op.task]:
                r.wrong_ever += 1
                self._wrong_accepts[op.task] = [(c.node, self.engine.trust.node(c.node).invalid) for c in op.credits]
            for c in op.credits:
                r.credit_total += c.amount
                r.credit_by_owner[c.owner] += c.amount
                r.credit_saboteurs += c.amount if c.owner in saboteurs else 0
        elif isinstance(op, TaskReopened):
            r.reopened += 1
            for c in op.credits:  # clawed back by new ledger entries
                r.credit_total -= c.amount
                r.credit_by_owner[c.owner] -= c.amount
                r.credit_saboteurs -= c.amount if c.owner in saboteurs else 0
        elif isinstance(op, JobFinished) and op.job not in self._first_finish:
            self._first_finish.add(op.job)
            job = self.engine.jobs[op.job]
            r.finished_tasks += len(job.tasks)
            r.wrong_at_finish += sum(self._wrong(t) for t in job.tasks)
            r.job_seconds.append(self.now - self.submitted_at[op.job])
        elif isinstance(op, LeaseClosed):
            r.lease_endings[op.state] += 1

    def _wrong(self, task_id: str) -> bool:
        task = self.engine.tasks[task_id]
        return task.state is TaskState.VERIFIED and task.canonical_digest != self.truth[task_id]

    def _finish_report(self) -> Report:
        r = self.report
        r.makespan = self.now
        for job_id in self.job_ids:
            job = self.engine.jobs[job_id]
            r.job_states.append(str(job.state))
            if job.state is JobState.FAILED:
                r.failures.append(f"{job_id}: {job.error}")
            for task_id in job.tasks:
                if self.engine.tasks[task_id].state is TaskState.VERIFIED:
                    r.accepted += 1
                    if self._wrong(task_id):
                        r.wrong_final += 1
                        r.wrong_kept_after_caught += any(
                            self.engine.trust.node(node).invalid > then for node, then in self._wrong_accepts[task_id])
                    r.steady_accepted += job_id in self._steady_jobs
        r.jobs_ended = len(self.job_ids) == self.sc.jobs and all(
            self.engine.jobs[j].state is JobState.DONE
            or (self.engine.jobs[j].state is JobState.FAILED and bool(self.engine.jobs[j].error))
            for j in self.job_ids)
        r.honest_blocked = sum(o not in set(r.saboteur_owners) for o in r.blocked)
        r.counters = Counter(self.engine.counters)
        return r


def _digest(outputs: Mapping[str, npt.NDArray[Any]]) -> str:
    return digest_tensors(tensors_from_arrays(outputs))


def run(**kw: Any) -> Report:
    return Simulation(Scenario(**kw)).run()


# ---- the table (benchmarks/bench_sabotage.py) -------------------------------------------------------
COLUMNS = ("behaviour", "f", "bad nodes", "accepted", "wrong at end (rate; kept after caught)",
           "wrong at job end (rate)", "ever accepted wrong, reopened", "results/task: all (steady)",
           "audits/task: all (steady)", "own results until blocked: median, max; never", "jobs",
           "job seconds: median, max", "saboteur credit (net)", "theory: first-two-agree",
           "theory: Sarmenta (q, n, s)")


def row(r: Report) -> list[str]:
    sc = r.scenario
    until = r.results_until_blocked
    blocked = f"{statistics.median(until):g}, {max(until)}" if until else "-"
    if r.saboteur_owners:
        blocked += f"; never {len(r.never_blocked)}"
    if r.honest_blocked:
        blocked += f" (honest owners blocked: {r.honest_blocked})"
    jobs = "all ended" if r.jobs_ended else "NOT all ended"
    if r.failures:
        jobs += f", {len(r.failures)} failed"
    colluding = sc.behaviour in (Behaviour.COLLUDE, Behaviour.SYBIL, Behaviour.TRUSTED_CHEAT, Behaviour.SOMETIMES)
    q, n, s = r.spot_check
    f = sc.saboteurs / sc.nodes
    return [sc.behaviour.value, f"{f:.2f}", str(sc.saboteurs), str(r.accepted),
            f"{r.wrong_final} ({r.wrong_rate:.1e}; {r.wrong_kept_after_caught})",
            f"{r.wrong_at_finish} ({r.wrong_at_finish_rate:.1e})", f"{r.wrong_ever}, {r.reopened}",
            f"{r.results_per_task:.3f} ({r.steady_results_per_task:.3f})",
            f"{r.audits_per_task:.3f} ({r.steady_audits_per_task:.3f})", blocked, jobs,
            f"{statistics.median(r.job_seconds):.1f}, {max(r.job_seconds):.1f}" if r.job_seconds else "-",
            f"{r.credit_share:.1%}", f"{first_two_agree(f):.3g}" if colluding else "-",
            f"{sarmenta(f, q, n, s):.2g} ({q:g}, {n}, {s:g})" if r.saboteur_owners else "-"]


def markdown(reports: list[Report]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in reports]
    return "\n".join(lines)
