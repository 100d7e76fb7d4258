"""Routes for listing jobs and nodes, cancelling a job, and the server-sent event streams the
CLI, the SDK and the dashboard follow. Thin: gather the coordinator's state, hand it to the pure
coordinator/views.py, answer. Everything here is computed when asked (or once a second for every
stream at once), never on the hot path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from .app_keys import COORDINATOR
from .engine import NotCancellable
from .http_auth import PRINCIPAL, Access, access, refuse
from .ledger_http import UNIT, entry_json
from .queries import JobView
from .scheduler import JobState
from .service import Coordinator
from .views import BadQuery, NodeFacts, Throughput, job_eta, job_row, job_why, node_rows, parse_listing

CANCELLED = "cancelled by its submitter"

log = logging.getLogger("sparecycles.coordinator.events")

# Attack: an anonymous client opening thousands of streams, each holding a socket and a task.
# Past this many open streams (both kinds together) a new one gets 503 with Retry-After.
MAX_STREAMS: Final = 100
# ... and one address alone may not take them all (a dashboard tab or two, a few CLIs).
MAX_STREAMS_PER_ADDRESS: Final = 10
JOB_CHECK_SECONDS: Final = 0.5
SNAPSHOT_SECONDS: Final = 1.0
HEARTBEAT_SECONDS: Final = 15.0
SNAPSHOT_JOBS: Final = 50
TOP_OWNERS: Final = 20
RECENT_ENTRIES: Final = 20


@dataclass
class Streams:
    """Open streams, and the dashboard's snapshot computed once per tick for all of them."""

    open: int = 0
    by_address: Counter[str] = field(default_factory=Counter)
    throughput: Throughput = field(default_factory=Throughput)
    snapshot: bytes = b""
    snapshot_at: float = -1e9
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


STREAMS: Final = web.AppKey("event_streams", Streams)


@dataclass(frozen=True)
class JobAccess:
    """coordinator/http_api.py's read check for a job and its answer for a job no longer held:
    passed in by `add_view_routes` (importing them back would make an import cycle)."""

    may_read: Callable[[web.Request, JobView], web.Response | None]
    gone: Callable[[web.Request, str], Awaitable[web.Response]]


JOB_ACCESS: Final = web.AppKey("job_access", JobAccess)


def fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- gathering (the adapter's half: reads the coordinator, hands plain values to views.py) ------
def leases_by_job(c: Coordinator) -> Counter[str]:
    return Counter(lease.job for lease in c.engine.leases.values())


def node_facts(c: Coordinator, *, now_wall: float, now_mono: float) -> list[NodeFacts]:
    engine = c.engine
    serving = {v.node: v for v in c.nodes()}
    heard = engine.heard_from()
    out = []
    for node in sorted(set(serving) | set(heard)):
        view = serving.get(node)
        record = c.membership.accounts.node(node)
        owner = view.owner if view is not None else (record.owner if record is not None else "")
        seen = heard.get(node)
        trust_rec = engine.trust.nodes.get(node)
        out.append(NodeFacts(
            node=node, owner=owner, slots=view.capacity if view is not None else 0,
            leases=view.leases if view is not None else 0, asking=view is not None and view.capacity > 0,
            rate=engine.capacity.speed(node).rate() if node in serving or seen is not None else None,
            trusted=engine.trust.trusted(node, owner), blocked=owner in engine.trust.blocked,
            streak=trust_rec.streak if trust_rec is not None else 0,
            trusted_after=engine.trust.policy.trusted_after, audit_rate=engine.trust.audit_rate(node, owner),
            last_seen=None if seen is None else now_wall - max(0.0, now_mono - seen)))
    return out


def _online(facts: list[NodeFacts]) -> list[NodeFacts]:
    return [f for f in facts if f.asking or f.leases > 0]


def job_document(c: Coordinator, job_id: str, *, public: bool, leases: Counter[str] | None = None,
                 facts: list[NodeFacts] | None = None, now: float | None = None) -> dict[str, Any] | None:
    """The job's status with "why" and "eta_seconds" (and, for `public`, only the summary)."""
    view = c.job(job_id)
    if view is None:
        return None
    now = time.time() if now is None else now
    leases = leases_by_job(c) if leases is None else leases
    facts = node_facts(c, now_wall=now, now_mono=time.monotonic()) if facts is None else facts
    online = _online(facts)
    status = dict(view.status)
    out = leases.get(job_id, 0)
    why = job_why(status, leases_out=out)
    eta = job_eta(status, now=now, node_rates=[f.rate for f in online], online_nodes=len(online), leases_out=out)
    if public:
        return job_row(status, why=why, eta=eta, public=True, submitter=view.submitter)
    waiting = status.get("waiting")
    row = job_row(status, why=why, eta=eta, public=False, submitter=view.submitter)
    return row if waiting is None else {**row, "waiting": waiting}


def list_jobs(c: Coordinator, *, state: str, limit: int, submitter: str | None,
              public: bool) -> list[dict[str, Any]]:
    """Newest first; `submitter` narrows to one account's jobs."""
    records = [j for j in c.engine.jobs.values()
               if (state == "all" or str(j.state) == state) and (submitter is None or j.spec.submitter == submitter)]
    records.sort(key=lambda j: (-j.spec.created_at, j.spec.id))
    now = time.time()
    leases = leases_by_job(c)
    facts = node_facts(c, now_wall=now, now_mono=time.monotonic())
    rows = []
    for record in records[:limit]:
        doc = job_document(c, record.spec.id, public=public, leases=leases, facts=facts, now=now)
        if doc is not None:
            rows.append(job_row(doc, why=doc["why"], eta=doc["eta_seconds"], public=public,
                                submitter=record.spec.submitter))
    return rows


# ---- listings ------------------------------------------------------------------------------------
@access(Access.JOB)  # unsigned passes (the public summary); a signature must be an account's
async def get_jobs(request: web.Request) -> web.Response:
    """Unsigned: every job's public summary. Signed by an account: its own jobs in full. Signed
    by an operator: every job in full."""
    c = request.app[COORDINATOR]
    try:
        state, limit = parse_listing(request.query.get("state"), request.query.get("limit"))
    except BadQuery as exc:
        return fail(400, str(exc))
    who = request.get(PRINCIPAL)
    if who is None:
        rows = list_jobs(c, state=state, limit=limit, submitter=None, public=True)
    elif who.operator:
        rows = list_jobs(c, state=state, limit=limit, submitter=None, public=False)
    else:
        name = who.account.name if who.account is not None else ""  # the middleware let only accounts by
        rows = list_jobs(c, state=state, limit=limit, submitter=name, public=False)
    return web.json_response({"jobs": rows})


async def get_nodes(request: web.Request) -> web.Response:
    """Public: node ids and owners are in the public ledger already."""
    c = request.app[COORDINATOR]
    now = time.time()
    return web.json_response({"nodes": node_rows(node_facts(c, now_wall=now, now_mono=time.monotonic()), now=now)})


@access(Access.ACCOUNT)
async def post_cancel(request: web.Request) -> web.Response:
    """The submitter (or an operator) cancels a running job: its open tasks fail with the reason
    "cancelled by its submitter", the job ends failed, the unspent reservation is released. Another
    account's job is a 404, as for DELETE. A read token does not do."""
    c = request.app[COORDINATOR]
    who = request[PRINCIPAL]
    job_id = request.match_info["job"]
    view = c.job(job_id)
    if view is None or not (who.operator or (who.account is not None and who.account.name == view.submitter)):
        return fail(404, "unknown job")
    try:
        cancelled = c.engine.cancel_job(job_id, CANCELLED, time.time())
    except NotCancellable as exc:
        return fail(409, str(exc))
    await c.flush()
    log.info("job cancelled job=%s tasks=%d by=%s", job_id, cancelled, who.account.name if who.account else "operator")
    doc = job_document(c, job_id, public=False)
    return web.json_response({"job": job_id, "cancelled_tasks": cancelled,
                              "state": doc["state"] if doc else "failed"})


# ---- server-sent events --------------------------------------------------------------------------
def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse | None:
    """The response, prepared, or None when MAX_STREAMS are open (the caller answers 503)."""
    streams = request.app[STREAMS]
    address = request.remote or ""
    if streams.open >= MAX_STREAMS or streams.by_address[address] >= MAX_STREAMS_PER_ADDRESS:
        request.app[COORDINATOR].counters["refused_event_streams"] += 1
        return None
    streams.open += 1
    streams.by_address[address] += 1
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")
    except BaseException:
        _close_stream(request)
        raise
    return resp


def _close_stream(request: web.Request) -> None:
    streams = request.app[STREAMS]
    address = request.remote or ""
    streams.open -= 1
    streams.by_address[address] -= 1
    if streams.by_address[address] <= 0:
        del streams.by_address[address]


def _busy() -> web.Response:
    return refuse(503, f"{MAX_STREAMS} event streams are open, the most this coordinator serves; retry later "
                       "or poll GET /v1/jobs/{job}", retry_after=10)


@access(Access.JOB)
async def job_events(request: web.Request) -> web.StreamResponse:
    """`progress` with the job's JSON whenever its counts change (checked every 0.5 s), then `done`
    or `failed` and the end; a heartbeat comment every 15 s. Same access as GET /v1/jobs/{job}."""
    c = request.app[COORDINATOR]
    job_id = request.match_info["job"]
    view = c.job(job_id)
    if view is None:
        return await request.app[JOB_ACCESS].gone(request, job_id)
    denied = request.app[JOB_ACCESS].may_read(request, view)
    if denied is not None:
        return denied
    resp = await _open_stream(request)
    if resp is None:
        return _busy()
    last_key: str | None = None
    beat = time.monotonic()
    try:
        while True:
            view = c.job(job_id)
            if view is None:  # expired or deleted while followed
                await resp.write(_sse("failed", {"job": job_id, "state": "gone",
                                                 "error": "the job expired or was deleted"}))
                break
            if not view.running:
                await c.flush()  # a final state is told only once committed, as GET /v1/jobs/{job} does
            doc = job_document(c, job_id, public=False)
            if doc is None:
                continue
            key = json.dumps([doc.get("state"), doc.get("tasks"), doc.get("why")], sort_keys=True)
            if doc["state"] in (JobState.DONE, JobState.FAILED):
                await resp.write(_sse(str(doc["state"]), doc))
                break
            if key != last_key:
                await resp.write(_sse("progress", doc))
                last_key, beat = key, time.monotonic()
            elif time.monotonic() - beat >= HEARTBEAT_SECONDS:
                await resp.write(b": heartbeat\n\n")
                beat = time.monotonic()
            await asyncio.sleep(JOB_CHECK_SECONDS)
    except (ConnectionResetError, ConnectionError):
        pass  # the client went away: nothing to clean up but the count
    finally:
        _close_stream(request)
    return resp


async def snapshot(c: Coordinator, streams: Streams) -> bytes:
    """The dashboard's `snapshot` event, computed at most once per SNAPSHOT_SECONDS for every
    stream together."""
    async with streams.lock:
        if time.monotonic() - streams.snapshot_at < SNAPSHOT_SECONDS * 0.9:
            return streams.snapshot
        now = time.time()
        jobs = list_jobs(c, state="all", limit=SNAPSHOT_JOBS, submitter=None, public=True)
        nodes = node_rows(node_facts(c, now_wall=now, now_mono=time.monotonic()), now=now)
        rate = streams.throughput.sample(now=time.monotonic(), verified_total=c.engine.counters["task_verified"])
        balances = await c.ledger_balances()
        owners = sorted(balances.owners, key=lambda o: (-o.credits, o.owner))
        size = c.ledger_notary.notary.size
        recent = (await c.ledger_entries(max(0, size - RECENT_ENTRIES), 10 * RECENT_ENTRIES))[-RECENT_ENTRIES:]
        latest = c.ledger_notary.latest
        blocked = sorted({a.name for a in c.membership.accounts.all() if a.blocked} | c.engine.trust.blocked)
        doc = {"jobs": jobs, "nodes": nodes, "throughput": {"tasks_per_second": round(rate, 3), "at": now},
               "ledger": {"balances": [o.to_json() for o in owners[:TOP_OWNERS]],
                          "recent": [entry_json(e) for e in reversed(recent)],
                          "checkpoint": None if latest is None else latest.to_json(),
                          "total_credits": balances.total_credits, "entries": balances.entries},
               "blocked": blocked, "unit": UNIT}
        streams.snapshot, streams.snapshot_at = _sse("snapshot", doc), time.monotonic()
        return streams.snapshot


async def events(request: web.Request) -> web.StreamResponse:
    """Public: a `snapshot` event every second for the dashboard (jobs as public summaries)."""
    c = request.app[COORDINATOR]
    streams = request.app[STREAMS]
    resp = await _open_stream(request)
    if resp is None:
        return _busy()
    try:
        while True:
            await resp.write(await snapshot(c, streams))
            await asyncio.sleep(SNAPSHOT_SECONDS)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        _close_stream(request)
    return resp


def add_view_routes(app: web.Application, access: JobAccess) -> None:
    app[STREAMS] = Streams()
    app[JOB_ACCESS] = access
    app.router.add_get("/v1/jobs", get_jobs)
    app.router.add_get("/v1/nodes", get_nodes)
    app.router.add_post("/v1/jobs/{job}/cancel", post_cancel)
    app.router.add_get("/v1/jobs/{job}/events", job_events)
    app.router.add_get("/v1/events", events)
