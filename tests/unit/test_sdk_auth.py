"""The SDK's signed requests and account calls, against a small real aiohttp server that checks
every request with protocol.httpauth.verify_request and a NonceCache, as the coordinator will;
and the key file helpers in sparecycles/identity.py."""

from __future__ import annotations

import io
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from protocol.digests import sha256_hex
from protocol.errors import AuthError
from protocol.httpauth import NonceCache, SignedRequest, verify_request
from protocol.signing import Identity
from sparecycles import (
    AuthenticationFailed,
    InsufficientCredit,
    RateLimited,
    RequestRejected,
    SparecyclesError,
    config_dir,
    load_or_create_key,
)
from sparecycles.identity import ACCOUNT_KEY
from sparecycles.sdk import JOB_TOKEN_HEADER, Client

COORD_ID = "coordinatorcccccccccccccccc"
MODEL = b"\x08\x07fake onnx bytes"
TOKEN = "read-token-123"
ALICE = Identity.generate()
SIGNER = web.RequestKey("signer", SignedRequest)


@dataclass
class VerifyingServer:
    """Answers just enough of the API and authenticates every request but GET /v1/info."""

    nonces: NonceCache = field(default_factory=NonceCache)
    signed: list[tuple[str, str, SignedRequest]] = field(default_factory=list)  # method, raw path, signer
    info_requests: list[str | None] = field(default_factory=list)  # their Authorization headers
    captured: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    accounts: dict[str, str] = field(default_factory=dict)  # key id -> name
    queue: list[web.Response] = field(default_factory=list)  # canned answers, served first

    def app(self) -> web.Application:
        @web.middleware
        async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path.endswith("/v1/info"):
                self.info_requests.append(request.headers.get("Authorization"))
                response: web.StreamResponse = await handler(request)
                return response
            arrived = time.time()  # the clock is read when the request arrives, before the body
            body = await request.read()
            self.captured.append((request.method, request.raw_path, dict(request.headers), body))
            try:
                signer = verify_request(request.headers.get("Authorization"), method=request.method,
                                        path_qs=request.raw_path, body_sha256=sha256_hex(body),
                                        audience=COORD_ID, now=arrived)
            except AuthError as exc:
                self.refusals.append(str(exc))
                return web.json_response({"error": str(exc)}, status=401)
            if not self.nonces.check_and_remember(signer.key_id, signer.nonce, signer.ts, arrived):
                self.refusals.append("replayed request")
                return web.json_response({"error": "replayed request"}, status=401)
            self.signed.append((request.method, request.raw_path, signer))
            request[SIGNER] = signer
            if self.queue:
                return self.queue.pop(0)
            response = await handler(request)
            return response

        app = web.Application(middlewares=[authenticate], client_max_size=16 * 1024 * 1024)
        app.router.add_get("/v1/info", self.info)
        app.router.add_post("/v1/accounts", self.register)
        app.router.add_get("/v1/accounts/me", self.me)
        app.router.add_head("/v1/models/{digest}", self.head_model)
        app.router.add_put("/v1/models", self.put_model)
        app.router.add_post("/v1/jobs", self.post_job)
        app.router.add_get("/v1/jobs/{job}", self.get_job)
        app.router.add_get("/v1/jobs/{job}/outputs", self.get_outputs)
        app.router.add_get("/v1/ledger/balances", self.balances)
        app.router.add_route("*", "/v1/admin/{tail:.*}", self.echo)
        return app

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"coordinator": COORD_ID, "public_key": "00" * 32})

    async def register(self, request: web.Request) -> web.Response:
        signer = request[SIGNER]
        payload = await request.json()
        self.accounts[signer.key_id] = payload["name"]
        return web.json_response({"account": signer.key_id, "name": payload["name"],
                                  "invite": payload["invite"]}, status=201)

    async def me(self, request: web.Request) -> web.Response:
        key_id = request[SIGNER].key_id
        if key_id not in self.accounts:
            return web.json_response({"error": "no account for this key: register first"}, status=403)
        return web.json_response({"account": key_id, "name": self.accounts[key_id]})

    async def head_model(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def put_model(self, request: web.Request) -> web.Response:
        return web.json_response({"model": sha256_hex(await request.read())}, status=201)

    async def post_job(self, request: web.Request) -> web.Response:
        return web.json_response({"job": "j/1", "rows": 2, "tasks": 1, "read_token": TOKEN}, status=202)

    def token_refused(self, request: web.Request) -> web.Response | None:
        if request.headers.get(JOB_TOKEN_HEADER) != TOKEN:
            return web.json_response({"error": "this job's read token is required"}, status=403)
        return None

    async def get_job(self, request: web.Request) -> web.Response:
        return self.token_refused(request) or web.json_response(
            {"job": request.match_info["job"], "state": "done", "tasks": {"total": 1, "verified": 1}})

    async def get_outputs(self, request: web.Request) -> web.Response:
        buf = io.BytesIO()
        np.savez(buf, y=np.arange(2, dtype=np.float32))
        return self.token_refused(request) or web.Response(body=buf.getvalue(), content_type="application/x-npz")

    async def balances(self, request: web.Request) -> web.Response:
        return web.json_response({"owners": []})

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.json() if request.method == "POST" else None
        return web.json_response({"method": request.method, "path": request.raw_path, "body": body})


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def test_every_request_of_a_client_with_a_key_is_signed_and_verifies() -> None:
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        account = await client.register("alice", invite="inv-1")
        me = await client.me()
        digest = await client.ensure_model(MODEL)
        job = await client.submit(digest, {"x": np.ones((2, 3), dtype=np.float32)}, replicas=2,
                                  final="exact&evil=1 /?")  # a value that must be percent-encoded
        status = await client.wait(job["job"], read_token=job["read_token"], poll=0.01)
        outputs = await client.outputs(job["job"], read_token=job["read_token"])

    assert server.refusals == []
    assert account == {"account": ALICE.id, "name": "alice", "invite": "inv-1"}
    assert me == {"account": ALICE.id, "name": "alice"}
    assert status["state"] == "done" and status["job"] == "j/1"
    np.testing.assert_array_equal(outputs["y"], np.arange(2, dtype=np.float32))
    assert {signer.key_id for _, _, signer in server.signed} == {ALICE.id}
    paths = [(method, path) for method, path, _ in server.signed]
    assert paths[:4] == [("POST", "/v1/accounts"), ("GET", "/v1/accounts/me"),
                         ("HEAD", f"/v1/models/{digest}"), ("PUT", "/v1/models")]
    assert paths[4] == ("POST", f"/v1/jobs?model={digest}&replicas=2&final=exact%26evil%3D1%20%2F%3F")
    assert paths[5][1].startswith("/v1/jobs/j%2F1?wait=")  # job ids are quoted, the query signed too
    assert paths[-1] == ("GET", "/v1/jobs/j%2F1/outputs")
    assert server.info_requests == [None]  # the audience is fetched once, unsigned


async def test_a_client_under_a_path_prefix_signs_the_full_path_it_sends() -> None:
    server = VerifyingServer()
    root = web.Application()
    root.add_subapp("/sc/", server.app())
    async with TestServer(root) as ts, Client(str(ts.make_url("/sc")), identity=ALICE) as client:
        await client.register("alice")

    assert server.refusals == []
    assert [path for _, path, _ in server.signed] == ["/sc/v1/accounts"]


async def test_a_request_replayed_byte_for_byte_is_refused() -> None:
    """Attack: someone who captured Alice's signed request (a log, a proxy) sends it again."""
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        await client.register("alice")
        method, raw_path, headers, body = server.captured[-1]
        async with aiohttp.ClientSession() as session, session.request(
                method, ts.make_url(raw_path),
                headers={"Authorization": headers["Authorization"], "Content-Type": "application/json"},
                data=body) as resp:
            answer = await resp.json()

    assert resp.status == 401
    assert answer == {"error": "replayed request"}
    assert len(server.signed) == 1


async def test_a_client_signing_for_another_coordinator_is_refused() -> None:
    """Attack: a request signed for one deployment (here: the client was told another id) is
    presented to this one."""
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, \
            Client(str(ts.make_url("/")), identity=ALICE, audience="someothercoordinator") as client:
        with pytest.raises(AuthenticationFailed) as caught:
            await client.me()

    assert caught.value.status == 401
    assert caught.value.message == "signature does not verify"
    assert server.info_requests == []  # a pinned audience is never looked up


async def test_a_client_without_a_key_is_refused_and_cannot_register() -> None:
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/"))) as client:
        with pytest.raises(SparecyclesError, match="needs an account key"):
            await client.me()
        with pytest.raises(SparecyclesError, match="needs an account key"):
            await client.register("alice")

    assert server.captured == []  # neither reached the network


async def test_status_and_outputs_without_the_read_token_are_refused() -> None:
    """Attack: another account (or anyone) reads a job's inputs' results by guessing its id."""
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        with pytest.raises(AuthenticationFailed) as caught:
            await client.status("j1")
        with pytest.raises(AuthenticationFailed):
            await client.outputs("j1", read_token="wrong")
        assert (await client.status("j1", read_token=TOKEN))["state"] == "done"

    assert caught.value.status == 403
    assert caught.value.message == "this job's read token is required"


async def test_statuses_map_to_their_errors_with_retry_after() -> None:
    server = VerifyingServer()
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))
    server.queue = [error(402, "job costs 40 credits, balance 3"), error(429, "slow down", **{"Retry-After": "7"}),
                    error(429, "slow down", **{"Retry-After": when}), error(429, "slow down"),
                    error(409, "name taken")]
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        with pytest.raises(InsufficientCredit, match="balance 3") as credit:
            await client.me()
        limited = []
        for _ in range(3):
            with pytest.raises(RateLimited) as caught:
                await client.me()
            limited.append(caught.value.retry_after)
        with pytest.raises(RequestRejected) as other:
            await client.register("taken")

    assert credit.value.status == 402
    assert limited[0] == 7.0
    assert limited[1] is not None and 100 < limited[1] <= 120
    assert limited[2] is None
    assert type(other.value) is RequestRejected and other.value.status == 409


async def test_wait_waits_out_a_429_and_carries_on() -> None:
    server = VerifyingServer()
    server.queue = [error(429, "slow down", **{"Retry-After": "0"}) for _ in range(2)]
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        client.unavailable_grace = 0.0  # a 429 is not an outage: it must not use up the grace
        status = await client.wait("j1", read_token=TOKEN, poll=0.01, timeout=10)

    assert status["state"] == "done"
    assert len(server.signed) == 3


async def test_concurrent_requests_get_distinct_nonces_and_all_verify() -> None:
    import asyncio

    server = VerifyingServer()
    server.accounts[ALICE.id] = "alice"
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        await asyncio.gather(*(client.me() for _ in range(20)))

    assert server.refusals == [] and len(server.signed) == 20
    assert len({signer.nonce for _, _, signer in server.signed}) == 20
    assert server.info_requests == [None]  # twenty callers, one audience lookup


async def test_a_large_upload_is_signed_off_the_event_loop_and_verifies() -> None:
    server = VerifyingServer()
    big = os.urandom(3 * 1024 * 1024)
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        digest = await client.ensure_model(big)

    assert digest == sha256_hex(big)
    assert server.refusals == []


async def test_operator_calls_are_signed_and_send_what_the_coordinator_reads() -> None:
    server = VerifyingServer()
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        answers = [await client.admin_accounts(),
                   await client.admin_add("bob", "ab" * 32, operator=True),
                   await client.admin_block("bob smith"),
                   await client.admin_block("bob", blocked=False),
                   await client.admin_grant("bob", 40, memo="welcome"),
                   await client.admin_invite()]

    assert server.refusals == []
    assert answers == [
        {"method": "GET", "path": "/v1/admin/accounts", "body": None},
        {"method": "POST", "path": "/v1/admin/accounts",
         "body": {"name": "bob", "public_key": "ab" * 32, "operator": True}},
        {"method": "POST", "path": "/v1/admin/accounts/bob%20smith/block", "body": {}},
        {"method": "POST", "path": "/v1/admin/accounts/bob/unblock", "body": {}},
        {"method": "POST", "path": "/v1/admin/accounts/bob/grant", "body": {"amount": 40, "memo": "welcome"}},
        {"method": "POST", "path": "/v1/admin/invites", "body": {}},
    ]


# -- key files --------------------------------------------------------------------------------------


def test_config_dir_prefers_the_explicit_variable_then_xdg_then_home(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPARECYCLES_CONFIG_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert config_dir() == tmp_path / "home" / ".config" / "sparecycles"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    assert config_dir() == tmp_path / "home" / ".config" / "sparecycles"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "sparecycles"
    monkeypatch.setenv("SPARECYCLES_CONFIG_DIR", str(tmp_path / "explicit"))
    assert config_dir() == tmp_path / "explicit"


def test_a_key_is_created_with_mode_0600_and_loads_back_the_same(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARECYCLES_CONFIG_DIR", str(tmp_path / "cfg"))
    first = load_or_create_key()
    path = tmp_path / "cfg" / ACCOUNT_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path).public_key == first.public_key


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """Attack: another user on the machine reads the account key and acts as the account."""
    path = tmp_path / "account.key"
    load_or_create_key(path)
    path.chmod(0o644)
    with pytest.raises(SparecyclesError, match="chmod 600"):
        load_or_create_key(path)


def test_a_key_file_of_the_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "account.key"
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(SparecyclesError, match="32-byte"):
        load_or_create_key(path)


async def test_a_short_429_is_sat_out_and_the_request_retried() -> None:
    # The coordinator keeps nothing of a refused request, so repeating it after Retry-After is safe.
    server = VerifyingServer()
    server.queue = [error(429, "slow down", **{"Retry-After": "0"})]
    server.accounts[ALICE.id] = "alice"
    async with TestServer(server.app()) as ts, Client(str(ts.make_url("/")), identity=ALICE) as client:
        me = await client.me()
    assert me["name"] == "alice" and server.queue == []
