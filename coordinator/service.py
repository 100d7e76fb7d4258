"""The coordinator process's runtime: the engine, the store, the MQTT connection and the loops
that feed them. Adapters stay thin: decode, check, call the engine, send, persist."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiomqtt
import numpy.typing as npt

from ledger.checkpoint import Checkpoint
from ledger.entries import Balances, Entry
from protocol.codec import open_envelope, seal
from protocol.digests import node_id_from_public_key, sha256_hex
from protocol.errors import PeerError
from protocol.messages import Assignment, Assignments, Release, Results, Status, WorkRequest
from protocol.signing import Identity
from protocol.tensors import Tensor, concat_rows, decode_tensor_map, digest_tensors
from protocol.topics import Topics, namespace_prefix

from . import failpoints
from .audit import Auditor
from .broker_acl import DynamicSecurity, parse_admin
from .budget import Budget
from .engine import AuditRequest, Engine
from .jobs import JobOptions, plan_job
from .ledger_notary import LedgerNotary
from .membership import Membership
from .model_probe import Prober
from .models import InvalidModel, inspect_model
from .queries import CoordinatorQueries, JobView, LeaseView, NodeView
from .quorum import Vote
from .records import JobFinished, JobRecord, TaskDecided, TaskRecord, TaskReopened
from .retention import (
    DELETED,
    OutputsGone,
    UploadRefused,
    check_upload,
    expired_after,
    expiry_cutoff,
    gone_message,
    upload_limit,
)
from .scheduler import JobState
from .settings import CoordinatorSettings
from .store import CoordinatorStore, Expiry, Freed, StoreError
from .store_factory import open_store
from .trust import TrustBook, TrustPolicy

log = logging.getLogger("sparecycles.coordinator")
T = TypeVar("T")


OFF_LOOP_BYTES = 1 << 20
MAX_PENDING_UPLOADS = 100_000
REQUEST_MAX_AGE = 300.0  # seconds: a work request older than this (by its seq) is a replay
EXPIRE_BATCH = 500  # jobs expired per store transaction: the SQLite thread also serves results


async def off_loop(size: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run CPU work on `size` bytes in a thread when it is large (the event loop serves MQTT
    meanwhile), inline when it is small (a thread hop costs more than the work)."""
    if size >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.store: CoordinatorStore = open_store(settings.db_url)
        key_path = self._key_path()
        # An in-memory coordinator keeps nothing, its identity included: a key of its own per run
        # also gives it a topic namespace of its own.
        self.identity = Identity.generate() if key_path is None else Identity.load_or_create(Path(key_path))
        self.topics = Topics(settings.topic_prefix or namespace_prefix(self.identity.id[:12]))
        policy = TrustPolicy(trusted_after=settings.trusted_after, min_audit_rate=settings.min_audit_rate,
                             untrusted_audit_rate=settings.untrusted_audit_rate, block_after=settings.block_after,
                             adaptive=settings.adaptive)
        self.engine = Engine(lease_seconds=settings.lease_seconds, max_inline_bytes=settings.max_inline_bytes,
                             new_id=lambda: secrets.token_hex(16),
                             trust=TrustBook(policy, trusted_owners=frozenset(settings.trusted_owners)),
                             rng=random.Random(), silence_seconds=settings.silence_seconds,
                             job_deadline=settings.job_deadline)
        self.auditor = Auditor(workers=settings.audit_workers)
        self.prober = Prober(limit=settings.model_probes, memory_bytes=settings.model_probe_bytes,
                             seconds=settings.model_probe_seconds)
        self._proven: set[tuple[str, int]] = set()  # (model, opt level) run on a job's real rows
        self._audit_tasks: set[asyncio.Task[None]] = set()
        self._uploads: dict[str, str] = {}  # lease -> the output digest its node uploaded under it
        self._trust_saved_at = 0.0
        self._unsaved_trust: dict[tuple[str, str], dict[str, Any]] = {}  # taken from the book, not yet saved
        self.counters: Counter[str] = Counter()
        self._client: aiomqtt.Client | None = None
        self._dirty = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = asyncio.Event()
        self.broker_error: str | None = None  # why the last MQTT connection attempt failed; None once connected
        self.broker_failed = asyncio.Event()  # set while the last attempt failed (the start-up line waits on it)
        self._finished: dict[str, asyncio.Event] = {}
        self._outgoing: dict[str, list[Assignment]] = {}
        self._model_meta: dict[str, dict[str, Any]] = {}  # models are immutable: their metadata too
        self._node_since: dict[str, int] = {}  # node -> the connection (Status.since) it last announced
        self.budget = Budget()  # credit reserved by each account's running jobs
        self.membership = Membership(settings=settings, store=self.store, audience=self.identity.id,
                                     coordinator_key=self.identity.public_key, counters=self.counters)
        self._mqtt_login: tuple[str | None, str | None] = settings.broker_login
        self.broker_access_controlled = False
        self.ledger_notary = LedgerNotary(self.store, self.identity)

    def _key_path(self) -> str | None:
        if self.settings.key_path:
            return self.settings.key_path
        if self.settings.db_url.startswith("sqlite:///"):
            return self.settings.db_url[len("sqlite:///"):] + ".key"
        return None

    # ---- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            # First: a ledger changed behind our back refuses to start before anything acts on it.
            await self.ledger_notary.open()
        except BaseException:
            await self.auditor.close()
            await self.prober.close()
            await self.store.close()
            raise
        await self.membership.load()
        await self._setup_broker_access()
        self.engine.trust.restore(await self.store.load_trust())
        await self._restore()
        self._tasks = [asyncio.create_task(self._mqtt_loop(), name="mqtt"),
                       asyncio.create_task(self._persist_loop(), name="persist"),
                       asyncio.create_task(self._sweep_loop(), name="sweep"),
                       asyncio.create_task(self._retention_loop(), name="retention"),
                       asyncio.create_task(self.ledger_notary.run(self.settings.checkpoint_seconds),
                                           name="notary")]

    async def stop(self) -> None:
        for t in [*self._tasks, *self._audit_tasks]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._audit_tasks, return_exceptions=True)
        await self.auditor.close()
        await self.prober.close()
        try:
            await self._save_trust()
            await self._flush_now()
        except StoreError as exc:
            # Lost with this process: the work is redone after a restart (its leases time out and
            # the tasks run again), and nothing is credited twice.
            log.error("stopping without committing the last %d changes: %s", len(self.engine.ops), exc)
        try:
            await self.ledger_notary.tick(time.time_ns() // 1_000_000)  # the last entries leave signed
        except Exception:
            log.exception("signing the last checkpoint failed; the next start signs it")
        await self.store.close()

    async def _restore(self) -> None:
        snap = await self.store.load()
        by_job: dict[str, list[Any]] = {}
        tasks_by_id = {t.id: t for t in snap.tasks}
        for t in snap.tasks:
            by_job.setdefault(t.job, []).append(t)
            if t.input_bytes <= self.settings.max_inline_bytes:
                blob = await self.store.get_blob(t.input_digest)
                t.inputs = decode_tensor_map(blob) if blob is not None else None
        for v in snap.votes:
            blob = await self.store.get_blob(v.output_digest)
            task = tasks_by_id[v.task]
            if blob is None:
                # Outputs of an undecided result live only in memory: that vote is gone, so its
                # node and owner may run the task again (or a network of two owners would stall).
                task.nodes.discard(v.node)
                task.owners.discard(v.owner)
                task.attempts -= 1
                continue
            arrays = {n: t.to_array() for n, t in decode_tensor_map(blob).items()}
            task.votes.append(Vote(v.lease, v.node, v.owner, v.output_digest, arrays, stored=True))
        # Reservations before add_job: it may verify restored tasks at once, and their charges
        # settle against these when they are committed.
        self.budget.rebuild((job.spec, [t.rows for t in by_job.get(job.spec.id, [])])
                            for job in snap.jobs if job.state is JobState.RUNNING)
        now, wall = time.monotonic(), time.time()
        for job in snap.jobs:
            if job.spec.submitter:
                self.membership.job_opened(job.spec.submitter, job.spec.input_bytes)
                if job.state is not JobState.RUNNING:
                    self.membership.job_closed(job.spec.submitter)
            self.engine.add_job(job, by_job.get(job.spec.id, []), now_wall=wall)
        for lease in snap.live_leases:
            self.engine.restore_lease(replace(lease, deadline=now + max(0.0, lease.expires_at - wall)), now=now)
        resumed = sum(1 for j in snap.jobs if j.state == "running")
        if resumed:
            self.engine.resume(now=now)  # nodes are not back yet: none is missing for a while
        if snap.jobs:
            log.info("restored jobs=%d running=%d open_tasks=%d live_leases=%d votes=%d", len(snap.jobs),
                     resumed, len(snap.tasks), len(snap.live_leases), len(snap.votes))
        self._mark_dirty()

    async def _setup_broker_access(self) -> None:
        """With the broker's dynamic-security admin (--broker-admin), lock the broker down: anonymous
        clients get nothing, our client id and topics are ours alone, and each registered node gets
        a login that may write only its own topics and read only its own assignments. Without it,
        say once that the topics are not access-controlled: signatures still protect integrity."""
        if self.settings.broker_admin is None:
            log.warning("broker %s: topics are not access-controlled (no --broker-admin): anyone on the broker "
                        "can read inputs and results; signatures still protect integrity. Use Mosquitto with "
                        "deploy/mosquitto-dynsec.conf and --broker-admin USER:PASSWORD to lock it down.",
                        self.settings.broker_url)
            return
        host, port = self.settings.broker
        admin_user, admin_password = parse_admin(self.settings.broker_admin)
        client_id = self.mqtt_client_id
        # Derived from our key: stable across restarts, known to nobody without the key file.
        password = hmac.new(self.identity.seed(), b"sparecycles mqtt password", hashlib.sha256).hexdigest()
        async with DynamicSecurity(host, port, username=admin_user, password=admin_password) as dynsec:
            await dynsec.lock_down()
            await dynsec.ensure_coordinator(username=client_id, password=password, client_id=client_id,
                                            prefix=self.topics.prefix)
        self._mqtt_login = (client_id, password)
        self.broker_access_controlled = True

        async def provision(node: str) -> str:
            async with DynamicSecurity(host, port, username=admin_user, password=admin_password) as d:
                return await d.provision_node(node, self.topics.prefix)

        self.membership.provision = provision
        log.info("broker access control on broker=%s:%d client=%s", host, port, client_id)

    @property
    def mqtt_client_id(self) -> str:
        return f"coord-{self.identity.id[:16]}"

    # ---- models -------------------------------------------------------------------------------
    async def model_meta(self, digest: str) -> dict[str, Any] | None:
        meta = self._model_meta.get(digest)
        if meta is None:
            meta = await self.store.model_meta(digest)
            if meta is not None:
                self._model_meta[digest] = meta
        return meta

    async def add_model(self, data: bytes) -> tuple[dict[str, Any], bool]:
        """Check, probe and store a model; returns its metadata and whether it was new.
        Raises `InvalidModel` with a reason the submitter can act on, `ProbeBusy` when every probe
        slot is taken."""
        digest = sha256_hex(data)
        meta = await self.model_meta(digest)
        if meta is not None:
            return meta, False
        meta = inspect_model(data, max_bytes=self.settings.max_model_bytes)
        await self.prober.check(data)  # loads it, sandboxed; beyond --model-probes `ProbeBusy` (a 429)
        await self.store.put_model(digest, data, meta)
        return meta, True

    async def model_bytes(self, digest: str) -> bytes | None:
        return await self.store.get_model(digest)

    # ---- blobs --------------------------------------------------------------------------------
    async def blob(self, digest: str) -> bytes | None:
        return await self.store.get_blob(digest)

    async def output_limit(self, lease_id: str) -> tuple[int, str]:
        """The most bytes an upload under `lease_id` may have, and why, decided before its body is
        read: the encoded size of its task's rows of the model's output shapes (or --max-output-mb
        when a non-batch axis is symbolic). 0 without a live lease."""
        lease = self.engine.leases.get(lease_id)
        if lease is None:
            return 0, "PUT /v1/blobs takes a node's outputs only under a live lease of it (?lease=...)"
        rows = self.engine.tasks[lease.task].rows
        meta = await self.model_meta(self.engine.jobs[lease.job].spec.model)
        limit = upload_limit(meta["outputs"] if meta else [], rows, fallback=self.settings.max_output_bytes,
                             ceiling=self.settings.max_body_bytes)
        return limit, f"the outputs of this lease's task ({rows} rows) take at most {limit} bytes"

    async def put_output_blob(self, lease: LeaseView, digest: str, data: bytes,
                              tensors: Mapping[str, Tensor]) -> bool:
        """A node's outputs, too large to go inline, uploaded under its own live lease (checked by
        the caller, as is the digest). Only this upload can back that lease's result: a node that
        names the digest of another node's upload without uploading has copied, and counts nothing.
        Raises `UploadRefused` for outputs the task cannot produce (names, dtypes, shapes of the
        model's numeric outputs, the task's rows) and for a second, different upload under the
        lease: each lease stores one. True if stored now, False if the same upload came before."""
        task, job = self.engine.tasks.get(lease.task), self.engine.jobs.get(lease.job)
        if task is None or job is None:
            raise UploadRefused(409, "the lease's job is no longer running")
        meta = await self.model_meta(job.spec.model)
        problem = check_upload(tensors, meta["outputs"] if meta else [], task.rows)
        if problem is not None:
            raise UploadRefused(400, problem)
        held = await self.store.put_upload(lease.id, lease.job, digest, data)
        if held != digest:
            raise UploadRefused(409, f"this lease already holds an upload ({held[:12]}...): one per lease")
        new = self._uploads.get(lease.id) != digest
        self._uploads[lease.id] = digest
        while len(self._uploads) > MAX_PENDING_UPLOADS:  # uploads whose result never came
            del self._uploads[next(iter(self._uploads))]
        return new

    async def put_blob(self, digest: str, data: bytes) -> None:
        """Store a blob whose digest the caller has checked against its content."""
        await self.store.put_blob(digest, data)

    # ---- queries (coordinator.queries.CoordinatorQueries) -------------------------------------
    def job(self, job_id: str) -> JobView | None:
        return self.engine.job_view(job_id)

    def live_lease(self, lease_id: str) -> LeaseView | None:
        return self.engine.lease_view(lease_id)

    def nodes(self) -> list[NodeView]:
        return self.engine.node_views()

    def trust(self, node: str) -> dict[str, Any]:
        """Why a node is or is not trusted, its record, and how many leases it may hold."""
        record = self.membership.accounts.node(node)
        return self.engine.trust_view(node, record.owner if record is not None else None)

    # ---- ledger reads -------------------------------------------------------------------------
    async def ledger_balances(self, upto: int | None = None) -> Balances:
        """Over the whole ledger, or over entries with seq <= `upto` (a checkpoint's size: a
        snapshot that never changes)."""
        if upto is None:
            await self.flush()  # credits of verdicts already reported must show
        return await self.store.ledger_balances(upto=upto)

    async def ledger_entries(self, after: int, limit: int, upto: int | None = None) -> list[Entry]:
        return await self.store.ledger_entries(after, limit, upto=upto)

    async def ledger_history(self, node: str) -> list[Entry]:
        return await self.store.ledger_history(node)

    async def ledger_account(self, name: str) -> list[Entry]:
        """Every entry of the account `name` (grants, credits, charges), in seq order."""
        await self.flush()  # charges and credits of verdicts already reported must show
        return await self.store.account_history(name)

    async def ledger_accepted(self, after: int, limit: int, upto: int | None = None) -> list[dict[str, Any]]:
        return await self.store.accepted(after, limit, upto=upto)

    async def ledger_job(self, job: str) -> list[Entry]:
        """Every entry of `job` (credits, charges, clawbacks, refunds), in seq order."""
        await self.flush()
        return await self.store.ledger_job(job)

    async def ledger_checkpoints(self, after_size: int, limit: int) -> list[Checkpoint]:
        return await self.store.checkpoints(after_size, limit)

    async def credit_of(self, account: str) -> dict[str, int]:
        """An account's committed balance, what its running jobs have reserved, and the rest."""
        balance = await self.store.account_balance(account)
        reserved = self.budget.reserved(account)
        return {"balance": balance, "reserved": reserved, "available": balance - reserved}

    # ---- jobs ---------------------------------------------------------------------------------
    async def create_job(self, meta: Mapping[str, Any], inputs: Mapping[str, npt.NDArray[Any]],
                         options: JobOptions) -> JobRecord:
        # Slicing, hashing and encoding a large batch takes a while: off the event loop, so the
        # MQTT loop keeps verifying results meanwhile. A small one costs less than the thread hop.
        size = sum(a.nbytes for a in inputs.values())
        job, tasks, blobs = await off_loop(size, plan_job, meta, inputs, options, now_wall=time.time(),
                                           max_inline_bytes=self.settings.max_inline_bytes)
        await self._prove_model(job, tasks[0], blobs)
        submitter = job.spec.submitter
        if submitter:
            self.membership.check_job_quota(submitter, job.spec.input_bytes)
            # The whole cost is reserved before the job exists; `InsufficientCredit` refuses it.
            # No await between reading the balance and reserving: concurrent jobs of one account
            # each see the others' reservations.
            cost = self.budget.estimate(job.spec.flops_per_row, [t.rows for t in tasks], job.spec.replicas)
            balance = await self.store.account_balance(submitter)
            self.budget.reserve(submitter, job.spec.id, cost, balance)
        try:
            await self.store.create_job(job, tasks, blobs)
        except BaseException:
            self.budget.release(job.spec.id)
            raise
        if submitter:
            self.membership.job_opened(submitter, job.spec.input_bytes)
        self.engine.add_job(job, tasks)
        log.info("job created job=%s rows=%d tasks=%d replicas=%d submitter=%s", job.spec.id, job.spec.rows,
                 len(tasks), job.spec.replicas, submitter)
        await self._send(self.engine.serve_waiting(now=time.monotonic(), now_wall=time.time()))
        await self._publish_outgoing()
        self._mark_dirty()
        return job

    async def _prove_model(self, job: JobRecord, first: TaskRecord, blobs: Mapping[str, bytes]) -> None:
        """The first job of a model runs its first task's rows in the probe sandbox before it is
        accepted: `InvalidModel` (a 400 with a short reason) if they cannot run, `ProbeBusy`."""
        key = (job.spec.model, job.spec.opt_level)
        if key in self._proven:
            return
        data = await self.store.get_model(job.spec.model)
        if data is None:
            raise InvalidModel(f"model {job.spec.model} is not stored: upload it again")
        rows = first.inputs if first.inputs is not None else decode_tensor_map(blobs[first.input_digest])
        await self.prober.check(data, rows=rows, opt_level=job.spec.opt_level)
        self._proven.add(key)

    async def wait_finished(self, job_id: str, seconds: float) -> None:
        """Return once the job's final state is committed, or after `seconds`."""
        job = self.engine.jobs[job_id]
        if job.state != "running":
            await self.flush()
            return
        event = self._finished.setdefault(job_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass

    async def job_outputs(self, job_id: str) -> dict[str, npt.NDArray[Any]]:
        await self.flush()
        digests = await self.store.canonical_digests(job_id)
        parts: list[bytes] = []
        for d in digests:
            blob = None if d is None else await self.store.get_blob(d)
            if blob is None:
                expiry = await self.store.expiry(job_id)  # expired or deleted while we read
                if expiry is not None:
                    raise OutputsGone(gone_message(job_id, expiry.reason))
                raise RuntimeError(f"job {job_id} has a task without stored outputs")
            parts.append(blob)

        def assemble() -> dict[str, npt.NDArray[Any]]:
            return {n: t.to_array() for n, t in concat_rows([decode_tensor_map(b) for b in parts]).items()}

        return await off_loop(sum(len(b) for b in parts), assemble)

    # ---- retention (coordinator/retention.py) -------------------------------------------------
    async def expired_job(self, job_id: str) -> Expiry | None:
        """A job whose inputs and outputs are gone (expired or deleted), or None."""
        return await self.store.expiry(job_id)

    async def delete_job(self, job_id: str) -> Freed:
        """Delete a finished job's inputs, outputs and leases now, as its expiry would; the caller
        has checked that its submitter asks. ValueError for a job not finished here (running, unknown)."""
        await self.flush()  # its finish is committed: the store expires finished jobs only
        job = self.engine.jobs.get(job_id)
        if job is None or job.state is JobState.RUNNING:
            raise ValueError(f"job {job_id} is not a finished job held here")
        return await self._expire([job_id], at=time.time(), reason=DELETED)

    async def expire_finished(self, *, now_wall: float) -> Freed:
        """Expire every job that finished more than --retention seconds before `now_wall`."""
        cutoff = expiry_cutoff(now_wall, self.settings.retention_seconds)
        total = Freed()
        if cutoff is None:
            return total
        await self.flush()  # finishes reported so far are in the store
        reason = expired_after(self.settings.retention_seconds)
        while True:
            found = await self.store.finished_before(cutoff, EXPIRE_BATCH)
            # reopened meanwhile (an audit caught a cheat): running again, it stays
            ids = [j for j in found if (job := self.engine.jobs.get(j)) is None or job.state is not JobState.RUNNING]
            if ids:
                total += await self._expire(ids, at=now_wall, reason=reason)
            if len(ids) < EXPIRE_BATCH:
                break
        if total.jobs:
            await self.store.compact()
            self.counters["jobs_expired"] += total.jobs
            log.info("retention expired jobs=%d blobs=%d bytes=%d leases=%d", total.jobs, total.blobs,
                     total.bytes, total.leases)
        return total

    async def _expire(self, ids: list[str], *, at: float, reason: str) -> Freed:
        # Out of memory first, with no await before: a reopen arriving while the store works finds
        # nothing to rerun on inputs about to go.
        for job_id in ids:
            job = self.engine.jobs.get(job_id)
            if job is not None and job.spec.submitter:
                self.membership.job_expired(job.spec.submitter, job.spec.input_bytes)
            self._finished.pop(job_id, None)
        self.engine.forget_jobs(ids)
        return await self.store.expire_jobs(ids, at=at, reason=reason)

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.retention_sweep_seconds)
            try:
                await self.expire_finished(now_wall=time.time())
            except Exception:
                log.exception("retention sweep failed; retrying at the next sweep")

    # ---- persistence --------------------------------------------------------------------------
    def _mark_dirty(self) -> None:
        if self.engine.audits or self.engine.blocked:
            self._hand_off_engine_events()
        if self.engine.ops:
            self._dirty.set()

    def _hand_off_engine_events(self) -> None:
        """Start the audits the engine asked for (each in the sandboxed auditor, answered to the
        engine when done), and persist the owners it blocked."""
        audits, self.engine.audits = self.engine.audits, []
        for request in audits:
            task = asyncio.create_task(self._audit(request), name=f"audit-{request.task}")
            self._audit_tasks.add(task)
            task.add_done_callback(self._audit_tasks.discard)
        blocked, self.engine.blocked = self.engine.blocked, []
        for owner, reason in blocked:
            log.warning("owner blocked owner=%s reason=%r", owner, reason)
            task = asyncio.create_task(self._block(owner), name=f"block-{owner}")
            self._audit_tasks.add(task)
            task.add_done_callback(self._audit_tasks.discard)

    async def _audit(self, request: AuditRequest) -> None:
        # The audit reads the model and inputs from the store. With the database away, it waits
        # for it: an audit that died here would leave its task waiting for an answer forever (the
        # job never finishes), and answering "could not run" would fail or downgrade a task over
        # an outage that says nothing about it.
        delay = 0.5
        while True:
            try:
                outcome = await self.auditor.run_request(request, self.store)
                break
            except StoreError as exc:
                log.warning("audit of task=%s waits for the store: %s; retrying in %.1f s", request.task, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        self.counters["audits_run"] += 1
        self.counters["audit_ms"] += round(outcome.seconds * 1000)
        if outcome.problem is not None:
            log.warning("audit could not run task=%s problem=%r", request.task, outcome.problem)
        await self._send(self.engine.on_audit(request.task, outcome.outputs, outcome.problem, now=time.monotonic(),
                                              now_wall=time.time()))
        await self._publish_outgoing()
        self._mark_dirty()

    async def _block(self, owner: str) -> None:
        try:
            await self.membership.set_blocked(owner, True)
        except Exception:
            log.exception("persisting the block of owner=%s failed", owner)

    async def _flush_now(self) -> None:
        """Commit every op produced so far, in one transaction, after any commit in flight."""
        async with self._flush_lock:
            ops, self.engine.ops = self.engine.ops, []
            if not ops:
                return
            try:
                await self.store.apply(ops)
                failpoints.hit("ledger.after_commit", lambda: any(isinstance(op, TaskDecided) for op in ops))
            except BaseException:
                self.engine.ops[:0] = ops  # not committed: keep them, in order, for the next try
                raise
            for op in ops:
                if isinstance(op, TaskDecided) and op.charge is not None:
                    self.budget.settle(op.charge.job, op.charge.amount)  # committed: the balance has dropped
                if isinstance(op, TaskReopened) and op.charge is not None:
                    self.budget.reopen(op.charge.account, op.job, op.charge.amount)
                if isinstance(op, JobFinished):
                    self.budget.release(op.job)
                    job = self.engine.jobs.get(op.job)
                    # Told once committed: a job reported done here survives a crash.
                    log.info("job finished job=%s state=%s tasks=%d failed=%d seconds=%.1f reason=%r", op.job,
                             op.state, len(job.tasks) if job else 0, job.failed if job else 0,
                             op.finished_at - job.spec.created_at if job else 0.0, op.error)
                    if job is not None and job.spec.submitter:
                        self.membership.job_closed(job.spec.submitter)
                    if op.job in self._finished:
                        self._finished.pop(op.job).set()

    async def _persist_loop(self) -> None:
        # Group commit: whatever accumulated while the previous transaction ran goes in the next.
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._flush_now()
                # Trust records are saved once a second, and at once after a penalty (a reset streak
                # must not come back after a crash); not with every batch, which would add a
                # transaction to each job's path.
                now = time.monotonic()
                if self._unsaved_trust or self.engine.trust.penalised or now - self._trust_saved_at >= 1.0:
                    self._trust_saved_at = now
                    await self._save_trust()
            except StoreError as exc:  # the database away or full: one line, not a traceback a second
                log.error("persisting a batch failed: %s; retrying in 1 s", exc)
                await asyncio.sleep(1)
                self._dirty.set()
            except Exception:
                log.exception("persisting a batch failed; retrying in 1 s")
                await asyncio.sleep(1)
                self._dirty.set()

    async def _save_trust(self) -> None:
        """Save the trust records changed since the last save. `take_changed` forgets what it hands
        out, so the records of a save that failed (the database away) are kept here and go with the
        next try: lost, a penalty's reset streak would be back after the next restart."""
        for kind, name, record in self.engine.trust.take_changed():
            self._unsaved_trust[(kind, name)] = record  # a newer record of the same one replaces it
        if not self._unsaved_trust:
            return
        saving = dict(self._unsaved_trust)
        await self.store.save_trust([(kind, name, record) for (kind, name), record in saving.items()])
        for key, record in saving.items():
            if self._unsaved_trust.get(key) is record:  # not replaced by a newer one meanwhile
                del self._unsaved_trust[key]

    async def flush(self) -> None:
        """Return once every op produced so far is committed."""
        await self._flush_now()

    # ---- MQTT ---------------------------------------------------------------------------------
    async def _mqtt_loop(self) -> None:
        host, port = self.settings.broker
        backoff = 0.2
        while True:
            try:
                async with aiomqtt.Client(
                    host, port, identifier=self.mqtt_client_id,
                    username=self._mqtt_login[0], password=self._mqtt_login[1],
                    socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                    max_inflight_messages=1000, keepalive=15,
                    # A persistent session under a stable client id: while this process restarts,
                    # the broker queues the nodes' results and requests for it instead of dropping them.
                    clean_session=False,
                ) as client:
                    self._client = client
                    for kind in ("work", "result", "status"):
                        await client.subscribe(self.topics.all_of(kind), qos=1)
                    self.connected.set()
                    self.broker_error = None
                    self.broker_failed.clear()
                    backoff = 0.2
                    log.info("mqtt connected broker=%s:%d prefix=%s", host, port, self.topics.prefix)
                    async for message in client.messages:
                        await self._on_message(str(message.topic), message.payload)
                        # Publish once the backlog is drained: under load, the assignments that
                        # many results freed go out as one message per node; when idle, at once.
                        if len(client.messages) == 0:
                            await self._publish_outgoing()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.broker_error = str(exc) or type(exc).__name__
                self.broker_failed.set()
                self._client = None
                # Standing requests went with the connection; nodes re-announce when they reconnect.
                self.engine.forget_waiting()
                log.warning("mqtt connection lost broker=%s:%d error=%r; retrying in %.1fs", host, port,
                            str(exc), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _on_message(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, bytes | bytearray):
            self.counters["rejected_malformed"] += 1
            return
        try:
            kind, node = self.topics.parse(topic)
            if kind == "status" and not payload:
                return  # a cleared retained status
            opened = open_envelope(bytes(payload), namespace=self.topics.prefix,
                                   max_size=self.settings.max_message_bytes)
            signer = node_id_from_public_key(opened.public_key)
            msg = opened.message
            if signer != node or getattr(msg, "node", None) != node:
                self.counters["rejected_wrong_sender"] += 1
                log.warning("rejected message topic=%s signer=%s: a node may only write its own topics",
                            topic, signer)
                return
            now, wall = time.monotonic(), time.time()
            if kind == "status" and isinstance(msg, Status):
                await self._on_status(msg, now=now, wall=wall)
            elif kind == "work" and isinstance(msg, WorkRequest):
                if msg.seq < (wall - REQUEST_MAX_AGE) * 1000:
                    # Its seq is the node's wall clock in ms: an old request replayed (after our
                    # restart, when nothing newer from the node is known yet) is refused.
                    self.counters["rejected_stale_work_request"] += 1
                    return
                # The owner is the one the node's certificate names, never the one it claims.
                owner = self.membership.owner_of(node, wall)
                if owner is None:
                    self.counters["rejected_unregistered_node"] += 1
                    self.membership.log_refused_node(node, wall)
                    return
                await self._send(self.engine.on_work_request(node, owner, msg.slots, msg.seq, now=now,
                                                             now_wall=wall, held=msg.held))
            elif kind == "work" and isinstance(msg, Release):
                await self._send(self.engine.on_release(node, msg.leases, now=now, now_wall=wall))
            elif kind == "result" and isinstance(msg, Results):
                await self._on_results(node, msg)
            else:
                self.counters["rejected_wrong_kind"] += 1
        except PeerError as exc:
            self.counters[f"rejected_{exc.reason}"] += 1
            log.warning("rejected message topic=%s reason=%s detail=%r size=%d", topic, exc.reason, str(exc),
                        len(payload))
        except Exception:
            # Our bug, not the peer's: log it loudly, but one bad message must not stop the loop
            # that every other node depends on.
            self.counters["internal_error"] += 1
            log.exception("internal error handling message topic=%s size=%d", topic, len(payload))
        finally:
            self._mark_dirty()

    async def _on_status(self, msg: Status, *, now: float, wall: float) -> None:
        """Act on a node's signed presence. An "offline" counts only for the connection the node
        last announced (or, before any announcement since our start, for the newest seen): an old
        Will replayed by anyone on an open broker revokes nothing."""
        current = self._node_since.get(msg.node, -1)
        if msg.since < current or (msg.state == "offline" and msg.since != current and current != -1):
            self.counters["rejected_stale_status"] += 1
            return
        self._node_since[msg.node] = msg.since
        if msg.state == "offline":
            log.info("node left node=%s owner=%s", msg.node, self.membership.owner_of(msg.node, wall))
            await self._send(self.engine.on_node_offline(msg.node, now=now, now_wall=wall))
        elif msg.since != current:  # a new connection, not the retained message seen again
            log.info("node joined node=%s owner=%s", msg.node, self.membership.owner_of(msg.node, wall))

    async def _on_results(self, node: str, msg: Results) -> None:
        if self.membership.owner_of(node, time.time()) is None:
            # Blocked owner or expired certificate since the lease went out: nothing it says counts.
            self.counters["rejected_unregistered_node"] += len(msg.items)
            self.membership.log_refused_node(node, time.time())
            return
        for result in msg.items:
            rejection = self.engine.check_result(node, result)
            if rejection is not None:
                self.counters[f"rejected_{rejection.reason}"] += 1
                log.info("rejected result lease=%s node=%s reason=%s", result.lease, node, rejection.reason)
                continue
            outputs, problem = None, result.error
            if problem is None:
                outputs, problem = await self._load_outputs(result.outputs, result.output_digest, result.lease)
            wall = time.time()
            await self._send(self.engine.on_result(node, result, outputs, problem, now=time.monotonic(),
                                                   now_wall=wall))

    async def _load_outputs(self, inline: Mapping[str, Tensor] | None, digest: str,
                            lease: str) -> tuple[dict[str, npt.NDArray[Any]] | None, str | None]:
        if inline is not None:
            if digest_tensors(inline) != digest:
                return None, "outputs do not match their digest"
            # Not stored yet: the engine stores only the accepted outputs, when it accepts them.
            return {n: t.to_array() for n, t in inline.items()}, None
        if self._uploads.pop(lease, None) != digest:
            return None, "outputs were neither inline nor uploaded under this node's lease"
        blob = await self.store.get_blob(digest)
        if blob is None:
            return None, "outputs were neither inline nor uploaded"
        try:
            tensors = decode_tensor_map(blob)
        except PeerError as exc:
            return None, f"uploaded outputs are malformed: {exc}"
        return {n: t.to_array() for n, t in tensors.items()}, None

    async def _send(self, outgoing: Mapping[str, list[Assignment]]) -> None:
        """Queue assignments; the MQTT loop publishes them when its backlog is drained."""
        for node, items in outgoing.items():
            self._outgoing.setdefault(node, []).extend(items)

    async def _publish_outgoing(self) -> None:
        outgoing, self._outgoing = self._outgoing, {}
        client = self._client
        for node, items in outgoing.items():
            unsent: list[Assignment] = []
            if client is None:
                unsent = items
            else:
                for chunk in _chunks(items, self.settings.max_message_bytes // 2):
                    payload = seal(Assignments(node=node, items=tuple(chunk)), self.identity,
                                   namespace=self.topics.prefix)
                    try:
                        await client.publish(self.topics.assign(node), payload, qos=1)
                    except aiomqtt.MqttError as exc:
                        unsent.extend(chunk)
                        log.warning("publishing assignments failed node=%s error=%r", node, str(exc))
            if unsent:
                # Never delivered: give the leases back now rather than wait for them to expire.
                self.counters["assignments_unsent"] += len(unsent)
                self.engine.close_unsent(node, tuple(a.lease for a in unsent))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_seconds)
            try:
                await self._send(self.engine.sweep(now=time.monotonic(), now_wall=time.time()))
                await self._publish_outgoing()
            finally:
                self._mark_dirty()

    def health(self) -> dict[str, Any]:
        states = Counter(str(j.state) for j in self.engine.jobs.values())
        return {"status": "ok" if self.connected.is_set() else "degraded",
                "broker_connected": self.connected.is_set(), "jobs": dict(states),
                "nodes_waiting": self.engine.live_nodes(), "live_leases": len(self.engine.leases),
                "counters": dict(self.counters + self.engine.counters)}

    def queue_depths(self) -> dict[str, int]:
        """What is waiting, for /metrics: read at scrape time, nothing counted on the hot path."""
        return {"ready_tasks": self.engine.ready_tasks(), "live_leases": len(self.engine.leases),
                "pending_ops": len(self.engine.ops), "audits_running": len(self._audit_tasks),
                "outgoing_assignments": sum(len(v) for v in self._outgoing.values())}


def _chunks(items: list[Assignment], budget: int) -> list[list[Assignment]]:
    """Split assignments so that each envelope stays under the broker's message limit."""
    out: list[list[Assignment]] = [[]]
    size = 0
    for a in items:
        cost = 512 + (sum(len(t.data) + 64 for t in a.inputs.values()) if a.inputs is not None else 0)
        if out[-1] and size + cost > budget:
            out.append([])
            size = 0
        out[-1].append(a)
        size += cost
    return out


if TYPE_CHECKING:
    def _answers_queries(c: Coordinator) -> CoordinatorQueries:
        return c  # mypy checks that the coordinator keeps the query interface its adapters rely on
