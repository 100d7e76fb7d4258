"""Who is asking: the HTTP middleware that checks signed requests (protocol/httpauth.py) and
decides, per route, who may call it. Handlers declare their access level with `@access(...)`;
a route without one is public.

Levels: PUBLIC (health, identity, ledger reads), SIGNED (any key proving itself: registration),
ACCOUNT (a registered, unblocked account), NODE (a node with a valid certificate of an unblocked
owner), MEMBER (an account or such a node: model downloads), OPERATOR (the coordinator's own key,
an operator account, or a key given with --operator), JOB (the job's submitter, an operator, or
anyone holding the job's read token; checked by the handler against the job).

Every refusal is a 401 (who are you?) or 403 (not you) with one line saying why, counted, and
nothing done; past an account's request rate, a 429 with Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol, TypeVar

from aiohttp import web

from protocol.digests import sha256_hex
from protocol.errors import AuthError
from protocol.httpauth import verify_request

from .accounts import Account, NodeRecord
from .ratelimit import retry_after_header

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (most bytes, why) a request's body may have, decided from its line and headers alone
BodyLimit = Callable[[web.Request], Awaitable[tuple[int, str]]]
H = TypeVar("H", bound=Handler)
JOB_TOKEN_HEADER: Final = "X-Sparecycles-Job-Token"
OFF_LOOP_BYTES: Final = 1 << 20


class Access(StrEnum):
    PUBLIC = "public"
    SIGNED = "signed"
    ACCOUNT = "account"
    NODE = "node"
    MEMBER = "member"
    OPERATOR = "operator"
    JOB = "job"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who signed a request that verified. Any of the three may be None/False."""

    key_id: str
    public_key: bytes
    account: Account | None
    node: NodeRecord | None
    operator: bool


PRINCIPAL: Final = web.RequestKey("principal", Principal)  # absent: the request was not signed


def access(level: Access) -> Callable[[H], H]:
    def mark(handler: H) -> H:
        handler.sc_access = level  # type: ignore[attr-defined]
        return handler

    return mark


def body_limit(limit: BodyLimit) -> Callable[[H], H]:
    """A handler whose body is bounded per request (a blob upload by its lease's outputs): the
    middleware refuses a larger Content-Length with 413 before reading, and stops reading a body
    that grows past the limit (chunked, or compressed) at the limit."""
    def mark(handler: H) -> H:
        handler.sc_body_limit = limit  # type: ignore[attr-defined]
        return handler

    return mark


def level_of(request: web.Request) -> Access:
    handler = getattr(request.match_info, "handler", None)
    return getattr(handler, "sc_access", Access.PUBLIC)


def refuse(status: int, message: str, *, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": retry_after_header(retry_after)} if retry_after is not None else None
    return web.json_response({"error": message}, status=status, headers=headers)


class Gate(Protocol):
    """What the middleware needs from the coordinator: kept small so the middleware can be tested
    against any object that provides it (coordinator/membership.py's Membership does)."""

    audience: str

    def resolve(self, public_key: bytes, key_id: str, now: float) -> Principal: ...

    def fresh_nonce(self, key_id: str, nonce: str, ts: float, now: float) -> bool: ...

    def request_wait(self, principal: Principal, now: float) -> float: ...

    def count(self, reason: str) -> None: ...


def make_middleware(gate: Callable[[web.Request], Gate]) -> Any:
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        level = level_of(request)
        if level is Access.PUBLIC:
            return await handler(request)
        g = gate(request)
        header = request.headers.get("Authorization")
        if header is None and level is Access.JOB:
            return await handler(request)  # the job's read token may stand in; the handler decides
        arrived = time.time()
        limit_of: BodyLimit | None = getattr(getattr(request.match_info, "handler", None), "sc_body_limit", None)
        if limit_of is not None:
            limit, why = await limit_of(request)
            if request.content_length is not None and request.content_length > limit:
                g.count("body_over_limit")
                return refuse(413, f"body of {request.content_length} bytes refused: {why}")
            request = request.clone(client_max_size=max(1, limit))  # aiohttp reads no further than this
        try:
            body = await request.read()  # kept by aiohttp: the handler reads the same bytes again
        except web.HTTPRequestEntityTooLarge:
            if limit_of is None:
                raise
            g.count("body_over_limit")
            return refuse(413, f"body refused past {limit} bytes: {why}")
        if len(body) >= OFF_LOOP_BYTES:
            import asyncio

            digest = await asyncio.to_thread(sha256_hex, body)
        else:
            digest = sha256_hex(body)
        try:
            signed = verify_request(header, method=request.method, path_qs=request.raw_path, body_sha256=digest,
                                    audience=g.audience, now=arrived)
        except AuthError as exc:
            g.count("auth_failed")
            return refuse(401, f"authentication failed: {exc}; sign requests with your key "
                               "(the sparecycles CLI and SDK do)")
        if not g.fresh_nonce(signed.key_id, signed.nonce, signed.ts, arrived):
            g.count("auth_replayed")
            return refuse(401, "authentication failed: this request was already used (replayed nonce)")
        who = g.resolve(signed.public_key, signed.key_id, arrived)
        problem = _denied(level, who)
        if problem is not None:
            g.count("auth_forbidden")
            return refuse(403, problem)
        wait = g.request_wait(who, arrived)
        if wait > 0:
            g.count("rate_limited")
            return refuse(429, f"too many requests from this key: retry in {wait:.1f} s", retry_after=wait)
        request[PRINCIPAL] = who
        return await handler(request)

    return authenticate


def _denied(level: Access, who: Principal) -> str | None:
    account = who.account
    if account is not None and account.blocked and level is not Access.SIGNED:
        return f"account {account.name!r} is blocked"
    if level is Access.SIGNED or who.operator:
        return None
    if level is Access.OPERATOR:
        return "this needs an operator's key"
    if level is Access.NODE:
        return None if who.node is not None else "this needs a registered node with a valid certificate"
    if level is Access.MEMBER:
        return None if (who.node is not None or account is not None) else "this needs a registered account or node"
    # ACCOUNT and JOB
    return None if account is not None else "this key is not a registered account: register it first " \
                                            "(POST /v1/accounts; the sparecycles CLI does so on first use)"
