"""aiohttp handlers, thin: parse, call the coordinator, respond. Errors are JSON with a hint."""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import web

from protocol.certs import NodeCertificate
from protocol.digests import is_sha256_hex, sha256_hex
from protocol.errors import BadCertificate, PeerError
from protocol.npz import from_npz, to_npz
from protocol.tensors import decode_tensor_map, digest_tensors

from .accounts import Account, Refused
from .app_keys import COORDINATOR
from .broker_acl import BrokerAclError
from .budget import InsufficientCredit
from .dashboard_http import add_dashboard_routes
from .events_http import JobAccess, add_view_routes, job_document
from .http_auth import JOB_TOKEN_HEADER, PRINCIPAL, Access, Principal, access, body_limit, refuse
from .jobs import BadJob, JobOptions
from .json_inputs import MAX_JSON_BODY_BYTES, parse_json_job
from .ledger_http import add_ledger_routes
from .metrics import add_metrics_routes
from .model_probe import ProbeBusy
from .models import InvalidModel
from .openapi import OPENAPI_PATH, serve_openapi
from .queries import JobView, LeaseView
from .retention import OutputsGone, UploadRefused, gone_message
from .service import Coordinator, off_loop

__all__ = ["COORDINATOR", "add_routes"]

log = logging.getLogger("sparecycles.coordinator.http")
NPZ = "application/x-npz"


def fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, body: dict[str, Any], name: str) -> int | None:
    """A positive integer from the JSON body (a JSON integer, never `true` or `2.5`) or the query
    string (digits only)."""
    if name in body:
        raw = body[name]
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise BadJob(f"{name} must be a positive integer, got {json.dumps(raw)}")
        value = raw
    else:
        text = request.query.get(name)
        if text is None or text == "":
            return None
        if not text.isdecimal() or len(text) > 9:
            raise BadJob(f"{name} must be a positive integer, got {text!r}")
        value = int(text)
    if value <= 0:
        raise BadJob(f"{name} must be a positive integer, got {value}")
    return value


def refused(c: Coordinator, exc: Refused) -> web.Response:
    c.counters[f"refused_{exc.reason}"] += 1
    return refuse(exc.status, str(exc), retry_after=exc.retry_after)


def principal(request: web.Request) -> Principal:
    """The signer of a request the middleware let through at ACCOUNT, NODE, MEMBER or OPERATOR."""
    return request[PRINCIPAL]


def caller_account(request: web.Request) -> Account:
    account = principal(request).account
    if account is None:  # an operator's own key that is not an account: it submits nothing
        raise web.HTTPForbidden(text=json.dumps({"error": "this needs a registered account"}),
                                content_type="application/json")
    return account


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body is not valid JSON"}),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}),
                                 content_type="application/json")
    return body


def _str_field(body: dict[str, Any], name: str, *, required: bool = True, limit: int = 512) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise web.HTTPBadRequest(text=json.dumps({"error": f'"{name}" must be a string of 1..{limit} characters'}),
                                 content_type="application/json")
    return value


async def health(request: web.Request) -> web.Response:
    """200 either way: "status" says "degraded" (and "broker_connected" false) while the MQTT broker
    is away, for a load balancer or a person to read; the process itself is alive and serving."""
    return web.json_response(request.app[COORDINATOR].health())


async def info(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response({
        "coordinator": c.identity.id, "public_key": c.identity.public_key.hex(), "topic_prefix": c.topics.prefix,
        "max_inline_bytes": c.settings.max_inline_bytes, "max_message_bytes": c.settings.max_message_bytes,
        "protocol": 1, "replicas": c.settings.replicas})


@access(Access.ACCOUNT)
async def put_model(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    if request.content_length is not None and request.content_length > c.settings.max_model_bytes:
        return fail(413, f"model exceeds {c.settings.max_model_bytes} bytes")
    data = await request.read()
    if not data:
        return fail(400, "empty body: send the ONNX file's bytes (PUT /v1/models)")
    account = caller_account(request)
    try:
        c.membership.check_model_quota(account.name, len(data))
        meta, created = await c.add_model(data)
    except InvalidModel as exc:
        return fail(400, str(exc))
    except ProbeBusy as exc:
        return refuse(429, str(exc), retry_after=5)
    except Refused as exc:
        return refused(c, exc)
    if created:
        c.membership.model_stored(account.name, len(data))
    return web.json_response(meta, status=201 if created else 200)


@access(Access.MEMBER)
async def head_model(request: web.Request) -> web.Response:
    known = await request.app[COORDINATOR].model_meta(request.match_info["digest"]) is not None
    return web.Response(status=200 if known else 404)


@access(Access.MEMBER)
async def get_model(request: web.Request) -> web.Response:
    data = await request.app[COORDINATOR].model_bytes(request.match_info["digest"])
    if data is None:
        return fail(404, "unknown model digest")
    return web.Response(body=data, content_type="application/octet-stream")


@access(Access.ACCOUNT)
async def post_job(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    account = caller_account(request)
    if not c.connected.is_set():
        # Accepted now, the job would wait unseen for a broker no node can reach us through.
        c.counters["refused_broker_down"] += 1
        return refuse(503, f"the coordinator cannot reach its MQTT broker at {':'.join(map(str, c.settings.broker))}, "
                           "so no node can get work: try again once /v1/health says \"ok\"", retry_after=5)
    try:
        if request.content_type == NPZ:
            body: dict[str, Any] = {}
            data = await request.read()
            inputs = await off_loop(len(data), from_npz, data, max_bytes=c.settings.max_body_bytes)
            model = request.query.get("model", "")
        elif request.content_type == "application/json":
            if (request.content_length or 0) > MAX_JSON_BODY_BYTES:  # refused before it is read
                return fail(413, f"JSON job bodies are limited to {MAX_JSON_BODY_BYTES} bytes: send inputs "
                                 f"as {NPZ}")
            data = await request.read()
            # json_inputs.py checks depth, dtypes and shapes before anything big is built
            body, inputs = await off_loop(len(data), parse_json_job, data, max_bytes=c.settings.max_body_bytes)
            model = str(body.get("model", ""))
        else:
            return fail(415, f"send inputs as {NPZ} (options in the query) or application/json")
        if not is_sha256_hex(model):
            return fail(400, "model must be the sha256 of an uploaded model (PUT /v1/models first)")
        meta = await c.model_meta(model)
        if meta is None:
            return fail(404, f"unknown model {model}: upload it first with PUT /v1/models")
        final = str(body.get("final", request.query.get("final", "argmax")))
        replicas = _int_param(request, body, "replicas") or c.settings.replicas
        if replicas < c.settings.lowest_replicas:
            # Attack: a submitter asking for one replica runs the job on their own node alone and
            # mints its credit unverified.
            raise BadJob(f"replicas must be at least {c.settings.lowest_replicas} on this coordinator")
        read_token = secrets.token_urlsafe(24)
        options = JobOptions(replicas=replicas, task_size=_int_param(request, body, "task_size"),
                             max_results=_int_param(request, body, "max_results"), final=final,
                             submitter=account.name, read_token_sha256=sha256_hex(read_token.encode()),
                             deadline_seconds=float(_int_param(request, body, "deadline") or 0))
        job = await c.create_job(meta, inputs, options)
    except BadJob as exc:
        c.counters["refused_bad_job"] += 1  # replicas below the minimum land here too: counted like any refusal
        return fail(400, str(exc))
    except PeerError as exc:
        return fail(413 if exc.reason == "oversized" else 400, str(exc))
    except Refused as exc:
        return refused(c, exc)
    except InsufficientCredit as exc:
        c.counters["refused_insufficient_credit"] += 1
        return fail(402, str(exc))
    except InvalidModel as exc:  # its first job's rows could not run in the probe sandbox
        c.counters["refused_model_probe"] += 1
        return fail(400, str(exc))
    except ProbeBusy as exc:
        return refuse(429, str(exc), retry_after=5)
    return web.json_response({"job": job.spec.id, "rows": job.spec.rows, "tasks": len(job.tasks),
                              "task_size": job.spec.task_size, "replicas": job.spec.replicas,
                              "submitter": account.name, "read_token": read_token}, status=202)


def _may_read(request: web.Request, job: JobView) -> web.Response | None:
    """The submitter, an operator, or whoever holds the job's read token; else a 401/403."""
    who = request.get(PRINCIPAL)
    if who is not None and (who.operator or (who.account is not None and who.account.name == job.submitter)):
        return None
    token = request.headers.get(JOB_TOKEN_HEADER)
    if token is not None and job.read_token_sha256 and \
            hmac.compare_digest(sha256_hex(token.encode()), job.read_token_sha256):
        return None
    c = request.app[COORDINATOR]
    if who is None and token is None:
        c.counters["http_auth_missing"] += 1
        return fail(401, f"reading a job needs its submitter's signature or its read token ({JOB_TOKEN_HEADER})")
    c.counters["http_auth_forbidden"] += 1
    return fail(403, "only the job's submitter, an operator or a holder of its read token may read it")


async def _gone(request: web.Request, job_id: str) -> web.Response:
    """A job not held in memory: 410 to whoever may read it if it expired (or was deleted), else 404."""
    expiry = await request.app[COORDINATOR].expired_job(job_id)
    if expiry is None:
        return fail(404, "unknown job")
    spec = expiry.job.spec
    denied = _may_read(request, JobView(id=job_id, state=expiry.job.state, error=expiry.job.error, status={},
                                        submitter=spec.submitter, read_token_sha256=spec.read_token_sha256))
    return denied if denied is not None else fail(410, gone_message(job_id, expiry.reason))


@access(Access.JOB)
async def get_job(request: web.Request) -> web.Response:
    """`?wait=S` long-polls: answers as soon as the job is finished and committed (at most S s)."""
    c = request.app[COORDINATOR]
    job_id = request.match_info["job"]
    job = c.job(job_id)
    if job is None:
        return await _gone(request, job_id)
    denied = _may_read(request, job)
    if denied is not None:
        return denied
    try:
        wait = min(60.0, max(0.0, float(request.query.get("wait", 0))))
    except ValueError:
        return fail(400, "wait must be a number of seconds")
    if wait > 0:
        await c.wait_finished(job_id, wait)
    elif not job.running:
        await c.flush()  # a finished state is reported only once it is committed, so it survives a crash
    document = job_document(c, job_id, public=False)  # the status with "why" and "eta_seconds"
    if document is None:  # expired, or deleted, while we waited
        return await _gone(request, job_id)
    return web.json_response(document)


@access(Access.JOB)
async def get_outputs(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    job = c.job(request.match_info["job"])
    if job is None:
        return await _gone(request, request.match_info["job"])
    denied = _may_read(request, job)
    if denied is not None:
        return denied
    if job.running:
        return fail(409, "job is still running: poll GET /v1/jobs/{job} until state is done")
    if job.state == "failed":
        return fail(422, f"job failed: {job.error}")
    try:
        arrays = await c.job_outputs(job.id)
    except OutputsGone as exc:
        return fail(410, str(exc))
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({n: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
                                  for n, a in arrays.items()})
    return web.Response(body=await off_loop(sum(a.nbytes for a in arrays.values()), to_npz, arrays),
                        content_type=NPZ)


@access(Access.ACCOUNT)
async def delete_job(request: web.Request) -> web.Response:
    """The submitter deletes a finished job's inputs, outputs and leases now (as its expiry would).
    Its status, task and ledger rows stay. Anyone else's job, or an unknown one, is a 404: a
    stranger learns nothing of which jobs exist. A read token does not allow it."""
    c = request.app[COORDINATOR]
    account = caller_account(request)
    job_id = request.match_info["job"]
    job = c.job(job_id)
    if job is None:
        expiry = await c.expired_job(job_id)
        if expiry is None or expiry.job.spec.submitter != account.name:
            return fail(404, "unknown job")
        return web.json_response({"job": job_id, "deleted_at": expiry.at, "reason": expiry.reason})  # again: done
    if job.submitter != account.name:
        c.counters["refused_delete_not_submitter"] += 1
        return fail(404, "unknown job")
    if job.running:
        return fail(409, "job is still running: cancel it first (POST /v1/jobs/{job}/cancel, or "
                         "`sparecycles cancel JOB`), then delete it")
    try:
        await c.delete_job(job_id)
    except ValueError:  # reopened meanwhile (an audit caught a cheat): running again
        return fail(409, "job is running again: wait for it to finish, then delete it")
    expiry = await c.expired_job(job_id)
    if expiry is None:
        return fail(409, "job is running again: wait for it to finish, then delete it")
    return web.json_response({"job": job_id, "deleted_at": expiry.at, "reason": expiry.reason})


def _live_lease(c: Coordinator, request: web.Request) -> LeaseView:
    """The live lease named by ?lease=, held by the node that signed the request: lease ids travel
    over the broker, so knowing one proves nothing."""
    lease = c.live_lease(request.query.get("lease", ""))
    node = principal(request).node
    if lease is None or node is None or lease.node != node.node:
        raise web.HTTPForbidden(text=json.dumps({"error": "a live lease of the signing node is required "
                                                          "(?lease=...)"}),
                                content_type="application/json")
    return lease


@access(Access.NODE)
async def get_blob(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    lease = _live_lease(c, request)
    digest = request.match_info["digest"]
    if lease.input_digest != digest:
        return fail(403, "this lease does not cover that blob")
    data = await c.blob(digest)
    if data is None:
        return fail(404, "unknown blob")
    return web.Response(body=data, content_type="application/msgpack")


async def _upload_limit(request: web.Request) -> tuple[int, str]:
    return await request.app[COORDINATOR].output_limit(request.query.get("lease", ""))


@body_limit(_upload_limit)  # checked before the body is read: only what the lease's task can output
@access(Access.NODE)
async def put_blob(request: web.Request) -> web.Response:
    """Attack: a node with a live lease stores anything of any size (or many things) under it.
    Refused: the body is bounded by the lease's outputs before it is read (413), must decode to the
    model's numeric outputs with the task's rows (400), and a lease holds one upload (409)."""
    c = request.app[COORDINATOR]
    lease = _live_lease(c, request)
    digest = request.match_info["digest"]
    data = await request.read()
    try:
        tensors = await off_loop(len(data), decode_tensor_map, data)
    except PeerError as exc:
        return fail(400, f"blob is not a msgpack tensor map: {exc}")
    if await off_loop(len(data), digest_tensors, tensors) != digest:
        return fail(400, "blob does not match its digest")
    try:
        created = await c.put_output_blob(lease, digest, data, tensors)
    except UploadRefused as exc:
        c.counters["refused_upload"] += 1
        return fail(exc.status, str(exc))
    return web.json_response({"blob": digest, "size": len(data)}, status=201 if created else 200)


# ---- accounts, nodes, operators ---------------------------------------------------------------
@access(Access.SIGNED)
async def post_account(request: web.Request) -> web.Response:
    """Register the signing key as an account named `name` (open policy: rate-limited per source
    address; invite policy: with a one-time `invite`; closed: refused)."""
    c = request.app[COORDINATOR]
    body = await _json_object(request)
    name = _str_field(body, "name", limit=64)
    invite = _str_field(body, "invite", required=False)
    assert name is not None
    try:
        account, created = await c.membership.register(principal(request).public_key, name,
                                                       source=request.remote or "", invite=invite, now=time.time())
    except Refused as exc:
        return refused(c, exc)
    return web.json_response({**account.to_json(), **await c.credit_of(account.name)}, status=201 if created else 200)


@access(Access.ACCOUNT)
async def get_me(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    account = caller_account(request)
    usage = c.membership.usage.get(account.name)
    return web.json_response({
        **account.to_json(), **await c.credit_of(account.name),
        "open_jobs": usage.open_jobs if usage else 0, "stored_bytes": usage.stored_bytes if usage else 0,
        "nodes": [n.to_json() for n in c.membership.accounts.nodes_of(account.name)]})


@access(Access.SIGNED)
async def post_node(request: web.Request) -> web.Response:
    """Register the signing node key under the account whose key signed its certificate. Answers
    the node's broker login when the broker is access-controlled."""
    c = request.app[COORDINATOR]
    body = await _json_object(request)
    text = _str_field(body, "certificate", limit=4096)
    assert text is not None
    try:
        certificate = NodeCertificate.from_text(text)
    except BadCertificate as exc:
        c.counters["refused_bad_certificate"] += 1
        return fail(400, f"certificate is malformed: {exc}")
    try:
        record, mqtt = await c.membership.certify_node(principal(request).public_key, certificate, now=time.time())
    except Refused as exc:
        return refused(c, exc)
    except BrokerAclError as exc:
        log.error("provisioning the node's broker login failed node=%s error=%s", certificate.node_id, exc)
        return fail(503, "the broker did not accept this node's login; retry later")
    return web.json_response({**record.to_json(),
                              "mqtt": None if mqtt is None else {"username": mqtt.username,
                                                                 "password": mqtt.password}})


async def node_trust(request: web.Request) -> web.Response:
    """Public: why a node is or is not trusted, its record, and the leases it may hold."""
    return web.json_response(request.app[COORDINATOR].trust(request.match_info["node"]))


@access(Access.OPERATOR)
async def admin_accounts(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    rows: list[dict[str, object]] = []
    for account in c.membership.accounts.all():
        usage = c.membership.usage.get(account.name)
        rows.append({**account.to_json(), **await c.credit_of(account.name),
                     "nodes": len(c.membership.accounts.nodes_of(account.name)),
                     "open_jobs": usage.open_jobs if usage else 0})
    return web.json_response({"accounts": rows, "registration": str(c.membership.policy)})


@access(Access.OPERATOR)
async def admin_add_account(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    body = await _json_object(request)
    name, key_hex = _str_field(body, "name", limit=64), _str_field(body, "public_key", limit=64)
    assert name is not None and key_hex is not None
    try:
        public_key = bytes.fromhex(key_hex)
    except ValueError:
        public_key = b""
    if len(public_key) != 32:
        return fail(400, '"public_key" must be 64 hex digits (an Ed25519 public key)')
    try:
        account = await c.membership.add(public_key, name, operator=body.get("operator") is True, now=time.time())
    except Refused as exc:
        return refused(c, exc)
    return web.json_response(account.to_json(), status=201)


@access(Access.OPERATOR)
async def admin_block(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    blocked = request.match_info["action"] == "block"
    try:
        account = await c.membership.set_blocked(request.match_info["name"], blocked)
    except Refused as exc:
        return refused(c, exc)
    return web.json_response(account.to_json())


@access(Access.OPERATOR)
async def admin_grant(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    body = await _json_object(request)
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        return fail(400, '"amount" must be a positive whole number of credits')
    memo = _str_field(body, "memo", required=False, limit=200) or "operator grant"
    name = request.match_info["name"]
    try:
        await c.membership.grant(name, amount, memo=memo, now=time.time())
    except Refused as exc:
        return refused(c, exc)
    return web.json_response({"account": name, "granted": amount, **await c.credit_of(name)})


@access(Access.OPERATOR)
async def admin_invite(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response({"invite": await c.membership.issue_invite(time.time())}, status=201)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/info", info)
    app.router.add_put("/v1/models", put_model)
    app.router.add_head("/v1/models/{digest}", head_model)
    app.router.add_get("/v1/models/{digest}", get_model, allow_head=False)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_delete("/v1/jobs/{job}", delete_job)
    app.router.add_get("/v1/jobs/{job}/outputs", get_outputs)
    app.router.add_get("/v1/blobs/{digest}", get_blob)
    app.router.add_put("/v1/blobs/{digest}", put_blob)
    add_ledger_routes(app)
    app.router.add_post("/v1/accounts", post_account)
    app.router.add_get("/v1/accounts/me", get_me)
    app.router.add_post("/v1/nodes", post_node)
    app.router.add_get("/v1/nodes/{node}/trust", node_trust)
    app.router.add_get("/v1/admin/accounts", admin_accounts)
    app.router.add_post("/v1/admin/accounts", admin_add_account)
    app.router.add_post("/v1/admin/accounts/{name}/{action:block|unblock}", admin_block)
    app.router.add_post("/v1/admin/accounts/{name}/grant", admin_grant)
    app.router.add_post("/v1/admin/invites", admin_invite)
    app.router.add_get(OPENAPI_PATH, serve_openapi)
    add_view_routes(app, JobAccess(may_read=_may_read, gone=_gone))  # job and node lists, cancel, events
    add_dashboard_routes(app)  # the page at / and its files
    add_metrics_routes(app)  # GET /metrics and the request timer
