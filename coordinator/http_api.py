"""aiohttp handlers, thin: parse, call the coordinator, respond. Errors are JSON with a hint."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web

from protocol.digests import is_sha256_hex
from protocol.errors import PeerError
from protocol.npz import from_npz, to_npz
from protocol.tensors import decode_tensor_map, digest_tensors

from .jobs import BadJob, JobOptions
from .models import InvalidModel
from .queries import LeaseView
from .service import Coordinator, off_loop

COORDINATOR: web.AppKey[Coordinator] = web.AppKey("coordinator", Coordinator)
NPZ = "application/x-npz"


def fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _int_param(request: web.Request, body: dict[str, Any], name: str) -> int | None:
    raw = body.get(name, request.query.get(name))
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadJob(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise BadJob(f"{name} must be positive")
    return value


async def health(request: web.Request) -> web.Response:
    return web.json_response(request.app[COORDINATOR].health())


async def info(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response({
        "coordinator": c.identity.id, "public_key": c.identity.public_key.hex(), "topic_prefix": c.topics.prefix,
        "max_inline_bytes": c.settings.max_inline_bytes, "max_message_bytes": c.settings.max_message_bytes,
        "protocol": 1, "replicas": c.settings.replicas})


async def put_model(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    if request.content_length is not None and request.content_length > c.settings.max_model_bytes:
        return fail(413, f"model exceeds {c.settings.max_model_bytes} bytes")
    data = await request.read()
    if not data:
        return fail(400, "empty body: send the ONNX file's bytes (PUT /v1/models)")
    try:
        meta, created = await c.add_model(data)
    except InvalidModel as exc:
        return fail(400, str(exc))
    return web.json_response(meta, status=201 if created else 200)


async def head_model(request: web.Request) -> web.Response:
    known = await request.app[COORDINATOR].model_meta(request.match_info["digest"]) is not None
    return web.Response(status=200 if known else 404)


async def get_model(request: web.Request) -> web.Response:
    data = await request.app[COORDINATOR].model_bytes(request.match_info["digest"])
    if data is None:
        return fail(404, "unknown model digest")
    return web.Response(body=data, content_type="application/octet-stream")


def _json_inputs(raw: Any) -> dict[str, np.ndarray[Any, Any]]:
    if not isinstance(raw, dict) or not raw:
        raise BadJob('"inputs" must map each input name to {"dtype", "shape", "data"}')
    out = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not {"dtype", "shape", "data"} <= spec.keys():
            raise BadJob(f'input {name!r} needs "dtype", "shape" and "data"')
        try:
            out[name] = np.asarray(spec["data"], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
        except (TypeError, ValueError) as exc:
            raise BadJob(f"input {name!r} is not a {spec['dtype']} array of shape {spec['shape']}: {exc}") from exc
    return out


async def post_job(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    try:
        if request.content_type == NPZ:
            body: dict[str, Any] = {}
            data = await request.read()
            inputs = await off_loop(len(data), from_npz, data, max_bytes=c.settings.max_body_bytes)
            model = request.query.get("model", "")
        elif request.content_type == "application/json":
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                return fail(400, "body is not valid JSON")
            if not isinstance(body, dict):
                return fail(400, "body must be a JSON object")
            inputs = _json_inputs(body.get("inputs"))
            model = str(body.get("model", ""))
        else:
            return fail(415, f"send inputs as {NPZ} (options in the query) or application/json")
        if not is_sha256_hex(model):
            return fail(400, "model must be the sha256 of an uploaded model (PUT /v1/models first)")
        meta = await c.model_meta(model)
        if meta is None:
            return fail(404, f"unknown model {model}: upload it first with PUT /v1/models")
        final = str(body.get("final", request.query.get("final", "argmax")))
        options = JobOptions(replicas=_int_param(request, body, "replicas") or c.settings.replicas,
                             task_size=_int_param(request, body, "task_size"),
                             max_results=_int_param(request, body, "max_results"), final=final)
        job = await c.create_job(meta, inputs, options)
    except BadJob as exc:
        return fail(400, str(exc))
    except PeerError as exc:
        return fail(413 if exc.reason == "oversized" else 400, str(exc))
    return web.json_response({"job": job.spec.id, "rows": job.spec.rows, "tasks": len(job.tasks),
                              "task_size": job.spec.task_size, "replicas": job.spec.replicas}, status=202)


async def get_job(request: web.Request) -> web.Response:
    """`?wait=S` long-polls: answers as soon as the job is finished and committed (at most S s)."""
    c = request.app[COORDINATOR]
    job_id = request.match_info["job"]
    job = c.job(job_id)
    if job is None:
        return fail(404, "unknown job")
    try:
        wait = min(60.0, max(0.0, float(request.query.get("wait", 0))))
    except ValueError:
        return fail(400, "wait must be a number of seconds")
    if wait > 0:
        await c.wait_finished(job_id, wait)
    elif not job.running:
        await c.flush()  # a finished state is reported only once it is committed, so it survives a crash
    job = c.job(job_id)
    assert job is not None  # jobs are never forgotten while the process runs
    return web.json_response(dict(job.status))


async def get_outputs(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    job = c.job(request.match_info["job"])
    if job is None:
        return fail(404, "unknown job")
    if job.running:
        return fail(409, "job is still running: poll GET /v1/jobs/{job} until state is done")
    if job.state == "failed":
        return fail(422, f"job failed: {job.error}")
    arrays = await c.job_outputs(job.id)
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({n: {"dtype": a.dtype.name, "shape": list(a.shape), "data": a.tolist()}
                                  for n, a in arrays.items()})
    return web.Response(body=await off_loop(sum(a.nbytes for a in arrays.values()), to_npz, arrays),
                        content_type=NPZ)


def _live_lease(c: Coordinator, request: web.Request) -> LeaseView:
    lease = c.live_lease(request.query.get("lease", ""))
    if lease is None:
        raise web.HTTPForbidden(text=json.dumps({"error": "a live lease is required (?lease=...)"}),
                                content_type="application/json")
    return lease


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


async def put_blob(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    _live_lease(c, request)
    digest = request.match_info["digest"]
    data = await request.read()
    try:
        tensors = decode_tensor_map(data)
    except PeerError as exc:
        return fail(400, f"blob is not a msgpack tensor map: {exc}")
    if digest_tensors(tensors) != digest:
        return fail(400, "blob does not match its digest")
    await c.put_blob(digest, data)
    return web.json_response({"blob": digest, "size": len(data)}, status=201)


def _paging(request: web.Request) -> tuple[int, int]:
    try:
        after = max(0, int(request.query.get("after", 0)))
        limit = min(10_000, max(1, int(request.query.get("limit", 1000))))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "after and limit must be integers"}),
                                 content_type="application/json") from None
    return after, limit


async def ledger_balances(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    return web.json_response((await c.ledger_balances()).to_json())


async def ledger_node(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    node = request.match_info["node"]
    entries = await c.ledger_history(node)
    if not entries:
        return fail(404, f"no credits for node {node}")
    return web.json_response({"node": node, "owner": entries[0].credit.owner,
                              "credits": sum(e.credit.amount for e in entries),
                              "entries": [e.to_json() for e in entries]})


async def ledger_entries(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    after, limit = _paging(request)
    entries = await c.ledger_entries(after, limit)
    return web.json_response({"entries": [e.to_json() for e in entries],
                              "next": entries[-1].seq if len(entries) == limit else None})


async def ledger_accepted(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    after, limit = _paging(request)
    rows = await c.ledger_accepted(after, limit)
    return web.json_response({"accepted": rows, "next": rows[-1]["seq"] if len(rows) == limit else None})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/info", info)
    app.router.add_put("/v1/models", put_model)
    app.router.add_head("/v1/models/{digest}", head_model)
    app.router.add_get("/v1/models/{digest}", get_model, allow_head=False)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_get("/v1/jobs/{job}/outputs", get_outputs)
    app.router.add_get("/v1/blobs/{digest}", get_blob)
    app.router.add_put("/v1/blobs/{digest}", put_blob)
    app.router.add_get("/v1/ledger/balances", ledger_balances)
    app.router.add_get("/v1/ledger/nodes/{node}", ledger_node)
    app.router.add_get("/v1/ledger/entries", ledger_entries)
    app.router.add_get("/v1/ledger/accepted", ledger_accepted)
