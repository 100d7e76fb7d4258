"""Async SDK over the coordinator's HTTP API (docs/http-api.md).

    async with Client("http://127.0.0.1:8080", identity=load_or_create_key()) as c:
        model = await c.ensure_model(onnx_bytes)
        job = await c.submit(model, {"x": rows})
        await c.wait(job["job"], on_progress=print)
        outputs = await c.outputs(job["job"])

With an identity, every request carries `Authorization: Sparecycles-Ed25519 ...`
(protocol/httpauth.py) signed for the coordinator's id, which is fetched once from /v1/info.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import numpy as np
import numpy.typing as npt
from yarl import URL

from protocol.digests import sha256_hex
from protocol.httpauth import sign_request
from protocol.signing import Identity
from protocol.tensors import ALLOWED_DTYPES

from .errors import (
    CoordinatorUnavailable,
    JobFailed,
    RateLimited,
    RequestRejected,
    SparecyclesError,
    WaitTimeout,
    rejection,
)
from .npz import from_npz, to_npz

NPZ = "application/x-npz"
PAGE_LIMIT = 1000
CONNECT_TIMEOUT = 10.0
# 429s with a Retry-After up to this many seconds are waited out, at most this many times.
RATE_LIMIT_WAIT = 5.0
RATE_LIMIT_RETRIES = 3
# While waiting, polls back off from `poll` to this ceiling when the coordinator does not answer.
MAX_RETRY_DELAY = 5.0
JOB_TOKEN_HEADER = "X-Sparecycles-Job-Token"
# Hashing a body to sign it runs at ~1 GB/s: above this size it goes to a thread, off the loop.
HASH_IN_THREAD = 1024 * 1024
# An event stream silent this long is dead (the coordinator sends a comment every 15 s).
STREAM_SILENCE = 60.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    retry_after: float | None = None


def _normalise_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # "127.0.0.1:8080" is what people type
    return url


class Client:
    """One aiohttp session to one coordinator; use as `async with Client(url) as c:`.

    With `identity` (an account's or a node's key, see `sparecycles.identity.load_or_create_key`)
    every request is signed for `audience`, the coordinator's id; when that is not given it is
    read once from /v1/info (a man in the middle who answers with another id only gets requests
    signed for that id, which the real coordinator refuses)."""

    def __init__(self, base_url: str, *, identity: Identity | None = None, audience: str | None = None,
                 timeout: float = 300.0) -> None:
        self.base_url = _normalise_base_url(base_url)
        self.identity = identity
        self._audience = audience
        self._audience_lock = asyncio.Lock()
        self.timeout = timeout
        # How long `wait` keeps retrying an unreachable coordinator (a restart) before giving up.
        self.unavailable_grace = 60.0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._ensure_session()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A coordinator that takes this long to accept a connection is unreachable; fail fast
            # instead of waiting out the whole (upload-sized) total timeout.
            connect = min(self.timeout, CONNECT_TIMEOUT)
            timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=connect)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    # -- transport ---------------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float | None] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        sign: bool = True,
    ) -> _Answer:
        """One request; connection trouble becomes `CoordinatorUnavailable`, statuses are not checked."""
        session = self._ensure_session()
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        # The URL is built and encoded here and sent as is (encoded=True), so the path and query
        # that are signed are byte for byte the ones on the request line.
        url = URL(self.base_url + path + ("?" + urlencode(query, quote_via=quote) if query else ""),
                  encoded=True)
        all_headers = dict(headers or {})
        if sign and self.identity is not None:
            all_headers["Authorization"] = await self._authorization(method, url.raw_path_qs, data or b"")
        try:
            async with session.request(
                method, url,
                # a stream, not raw bytes: aiohttp would copy a large body on the event loop
                data=None if data is None else io.BytesIO(data), headers=all_headers
            ) as resp:
                return _Answer(resp.status, await resp.read(), _retry_after(resp.headers.get("Retry-After")))
        except aiohttp.ClientConnectionError as exc:
            # ClientConnectorError is an OSError: its strerror is the short "Connect call failed (...)"
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise CoordinatorUnavailable(self.base_url, cause) from exc
        except TimeoutError as exc:
            raise CoordinatorUnavailable(self.base_url, f"no answer within {self.timeout:g} s") from exc

    async def _authorization(self, method: str, path_qs: str, body: bytes) -> str:
        assert self.identity is not None
        identity, audience = self.identity, await self.audience()

        def sign() -> str:
            return sign_request(identity, method=method, path_qs=path_qs, body=body, audience=audience,
                                now=time.time())

        return await asyncio.to_thread(sign) if len(body) > HASH_IN_THREAD else sign()

    async def audience(self) -> str:
        """The coordinator id requests are signed for: given to the constructor, or read once
        from /v1/info."""
        async with self._audience_lock:
            if self._audience is None:
                coordinator = (await self.info()).get("coordinator")
                if not isinstance(coordinator, str) or not coordinator:
                    raise SparecyclesError("/v1/info has no coordinator id to sign requests for")
                self._audience = coordinator
            return self._audience

    def _require_identity(self, what: str) -> Identity:
        if self.identity is None:
            raise SparecyclesError(f"{what} needs an account key: Client(url, identity=load_or_create_key())")
        return self.identity

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float | None] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        sign: bool = True,
    ) -> bytes:
        answer = await self._send(method, path, params=params, data=data, headers=headers, sign=sign)
        for _ in range(RATE_LIMIT_RETRIES):
            # A short 429 is sat out and retried (the coordinator kept nothing of the refused
            # request, so even a POST is safe to repeat); a long one is the caller's to handle.
            if answer.status != 429 or answer.retry_after is None or answer.retry_after > RATE_LIMIT_WAIT:
                break
            await asyncio.sleep(answer.retry_after)
            answer = await self._send(method, path, params=params, data=data, headers=headers, sign=sign)
        if answer.status >= 400:
            raise rejection(answer.status, _error_message(answer), method=method, path=path,
                            retry_after=answer.retry_after)
        return answer.body

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        body = await self._call(method, path, **kwargs)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SparecyclesError(f"{method} {path}: the coordinator's answer is not JSON") from exc

    # -- models and jobs ---------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        # public, and what a signing client reads its audience from: never signed
        return _as_dict(await self._json("GET", "/v1/info", sign=False), "/v1/info")

    # -- accounts ----------------------------------------------------------------------------------

    async def register(self, name: str, *, invite: str | None = None) -> dict[str, Any]:
        """Bind `name` to this client's key as a new account (the signed request proves the key)."""
        self._require_identity("register")
        body = json.dumps({"name": name, "invite": invite}).encode()
        answer = await self._json("POST", "/v1/accounts", data=body, headers={"Content-Type": "application/json"})
        return _as_dict(answer, "/v1/accounts")

    async def me(self) -> dict[str, Any]:
        """The account this client's key belongs to, as the coordinator sees it."""
        self._require_identity("me")
        return _as_dict(await self._json("GET", "/v1/accounts/me"), "/v1/accounts/me")

    # -- operator (an account with "operator": the coordinator refuses others with 403) -------------

    async def _post_json(self, path: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        answer = await self._json("POST", path, data=json.dumps(payload).encode(),
                                  headers={"Content-Type": "application/json"})
        return _as_dict(answer, path)

    async def admin_accounts(self) -> dict[str, Any]:
        self._require_identity("admin_accounts")
        return _as_dict(await self._json("GET", "/v1/admin/accounts"), "/v1/admin/accounts")

    async def admin_add(self, name: str, public_key: str, *, operator: bool = False) -> dict[str, Any]:
        """Create an account for `public_key` (64 hex) without an invite."""
        self._require_identity("admin_add")
        return await self._post_json("/v1/admin/accounts",
                                     {"name": name, "public_key": public_key, "operator": operator})

    async def admin_block(self, name: str, *, blocked: bool = True) -> dict[str, Any]:
        self._require_identity("admin_block")
        action = "block" if blocked else "unblock"
        return await self._post_json(f"/v1/admin/accounts/{quote(name, safe='')}/{action}", {})

    async def admin_grant(self, name: str, amount: int, *, memo: str | None = None) -> dict[str, Any]:
        self._require_identity("admin_grant")
        return await self._post_json(f"/v1/admin/accounts/{quote(name, safe='')}/grant",
                                     {"amount": amount, "memo": memo})

    async def admin_invite(self) -> dict[str, Any]:
        self._require_identity("admin_invite")
        return await self._post_json("/v1/admin/invites", {})

    async def has_model(self, digest: str) -> bool:
        path = f"/v1/models/{quote(digest, safe='')}"
        answer = await self._send("HEAD", path)
        if answer.status == 404:
            return False
        if answer.status >= 400:
            raise rejection(answer.status, _error_message(answer), method="HEAD", path=path,
                            retry_after=answer.retry_after)
        return True

    async def ensure_model(self, model: bytes) -> str:
        """Upload `model` unless the coordinator already has it; returns its sha256 hex digest."""
        digest = sha256_hex(model)
        if not await self.has_model(digest):
            answer = _as_dict(
                await self._json("PUT", "/v1/models", data=model,
                                 headers={"Content-Type": "application/octet-stream"}),
                "/v1/models",
            )
            if answer.get("model") != digest:
                raise SparecyclesError(
                    f"the coordinator stored the model as {answer.get('model')!r}, expected sha256 {digest}"
                )
        return digest

    async def submit(
        self,
        model_digest: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        replicas: int | None = None,
        task_size: int | None = None,
        final: str | None = None,
        deadline: int | None = None,
    ) -> dict[str, Any]:
        """POST the inputs as NPZ; returns `{"job", "rows", "tasks"}` and, from a coordinator with
        accounts, `"read_token"`: pass it as `read_token=` to `status`, `wait` and `outputs`.
        `deadline`: seconds for every task to be decided, else it fails with the reason (default:
        the coordinator's `--job-deadline`)."""
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        for name, arr in arrays.items():
            # the coordinator would refuse these too, but only after the whole upload
            if arr.dtype.name not in ALLOWED_DTYPES:
                raise SparecyclesError(
                    f"input {name!r} has dtype {arr.dtype.name}; allowed: {', '.join(sorted(ALLOWED_DTYPES))}"
                )
        params = {"model": model_digest, "replicas": replicas, "task_size": task_size, "final": final,
                  "deadline": deadline}
        answer = await self._json("POST", "/v1/jobs", params=params, data=to_npz(arrays),
                                  headers={"Content-Type": NPZ})
        return _as_dict(answer, "/v1/jobs")

    async def status(self, job: str, *, wait: float = 0.0, read_token: str | None = None) -> dict[str, Any]:
        """The job's status; with `wait`, the coordinator holds the answer up to `wait` seconds
        until the job finishes (a long poll: the result arrives without a polling delay)."""
        path = f"/v1/jobs/{quote(job, safe='')}"
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        return _as_dict(await self._json("GET", path, params=params, headers=_token(read_token)), path)

    async def wait(
        self,
        job: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.2,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the SDK's contract; one deadline, not per call
        read_token: str | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is done (returns its status) or failed (raises `JobFailed`).

        `on_progress` sees each status that differs from the last one reported. An unreachable
        coordinator (a restart) is retried with backoff for `unavailable_grace` seconds, then
        `CoordinatorUnavailable` is raised; after `timeout` seconds, `WaitTimeout`. A 429 waits
        the coordinator's Retry-After and polls on.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        down_since: float | None = None
        retry_delay = max(poll, 0.05)
        last: dict[str, Any] | None = None
        last_key: str | None = None
        while True:
            asked = loop.time()
            try:
                if deadline is None:
                    st = await self.status(job, wait=poll, read_token=read_token)
                else:
                    async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                        st = await self.status(job, wait=min(poll, max(deadline - loop.time(), 0.0)),
                                               read_token=read_token)
            except TimeoutError as exc:
                raise WaitTimeout(job, timeout or 0.0, last) from exc
            except RateLimited as exc:
                # the coordinator is up and says when to come back: not an outage, no grace used up
                delay = max(poll, exc.retry_after if exc.retry_after is not None else retry_delay)
            except (CoordinatorUnavailable, RequestRejected) as exc:
                if isinstance(exc, RequestRejected) and not exc.transient:
                    raise
                now = loop.time()
                down_since = now if down_since is None else down_since
                left = self.unavailable_grace - (now - down_since)
                if left <= 0:
                    raise
                delay = min(retry_delay, left)  # one last try right at the end of the grace period
                retry_delay = min(retry_delay * 2, MAX_RETRY_DELAY)
            else:
                # the long poll already waited; sleep only what a coordinator without it did not
                delay = max(0.0, poll - (loop.time() - asked))
                down_since, retry_delay, last = None, max(poll, 0.05), st
                key = json.dumps([st.get("state"), st.get("tasks")], sort_keys=True, default=str)
                if on_progress is not None and key != last_key:
                    on_progress(st)
                last_key = key
                if st.get("state") == "done":
                    return st
                if st.get("state") == "failed":
                    raise JobFailed(st)
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitTimeout(job, timeout or 0.0, last)
                delay = min(delay, remaining)
            await asyncio.sleep(delay)

    async def outputs(self, job: str, *, read_token: str | None = None) -> dict[str, npt.NDArray[Any]]:
        """The finished job's outputs, one array per ONNX output name, rows in input order."""
        body = await self._call("GET", f"/v1/jobs/{quote(job, safe='')}/outputs",
                                headers={"Accept": NPZ, **_token(read_token)})
        return from_npz(body)

    async def jobs(self, *, state: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first: with an identity, this account's own jobs in full; without, every
        job's public summary. `state`: running, done, failed or all (default)."""
        answer = await self._json("GET", "/v1/jobs", params={"state": state, "limit": limit},
                                  sign=self.identity is not None)
        return _list_of(_as_dict(answer, "/v1/jobs"), "jobs", "/v1/jobs")

    async def cancel(self, job: str) -> dict[str, Any]:
        """Cancel a running job of this account: `{"job", "cancelled_tasks", "state"}`."""
        self._require_identity("cancel")
        path = f"/v1/jobs/{quote(job, safe='')}/cancel"
        return _as_dict(await self._json("POST", path), path)

    async def events(self, job: str, *, read_token: str | None = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events as (event, job JSON): `progress` while it runs, then
        `done` or `failed`, after which the stream ends."""
        path = f"/v1/jobs/{quote(job, safe='')}/events"
        async for event in self._stream(path, _token(read_token)):
            yield event

    async def _stream(self, path: str, headers: Mapping[str, str]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        session = self._ensure_session()
        url = URL(self.base_url + path, encoded=True)
        all_headers = {"Accept": "text/event-stream", **headers}
        if self.identity is not None and JOB_TOKEN_HEADER not in headers:
            all_headers["Authorization"] = await self._authorization("GET", url.raw_path_qs, b"")
        # No total timeout: a stream lasts as long as the job. The coordinator sends a comment every
        # 15 s, so a read silent for STREAM_SILENCE means the connection is dead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=STREAM_SILENCE)
        try:
            async with session.get(url, headers=all_headers, timeout=timeout) as resp:
                if resp.status >= 400:
                    answer = _Answer(resp.status, await resp.read(), _retry_after(resp.headers.get("Retry-After")))
                    raise rejection(answer.status, _error_message(answer), method="GET", path=path,
                                    retry_after=answer.retry_after)
                parser = SseParser()
                async for line in resp.content:
                    for event in parser.feed(line):
                        yield event
        except aiohttp.ClientConnectionError as exc:
            raise CoordinatorUnavailable(self.base_url, str(exc) or type(exc).__name__) from exc
        except TimeoutError as exc:
            silent = f"the event stream was silent for {STREAM_SILENCE:g} s"
            raise CoordinatorUnavailable(self.base_url, silent) from exc

    async def follow(
        self,
        job: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - one deadline for the whole follow, as `wait`
        read_token: str | None = None,
    ) -> dict[str, Any]:
        """Like `wait`, fed by the job's event stream (progress arrives as it happens, with "why"
        and "eta_seconds"); falls back to polling when the stream is refused or drops."""
        try:
            async with asyncio.timeout(timeout):
                async for event, doc in self.events(job, read_token=read_token):
                    if on_progress is not None:
                        on_progress(doc)
                    if event == "done":
                        return doc
                    if event == "failed":
                        raise JobFailed(doc)
        except TimeoutError as exc:
            raise WaitTimeout(job, timeout or 0.0, None) from exc
        except (CoordinatorUnavailable, RequestRejected) as exc:
            if isinstance(exc, RequestRejected) and not _stream_unavailable(exc):
                raise
        # An older coordinator without the stream, too many streams open, or the stream dropped.
        return await self.wait(job, on_progress=on_progress, timeout=timeout, read_token=read_token)

    async def run(self, model: bytes | str | os.PathLike[str], inputs: Mapping[str, npt.ArrayLike], *,
                  on_progress: Callable[[dict[str, Any]], None] | None = None,
                  timeout: float | None = None, **options: Any) -> dict[str, npt.NDArray[Any]]:  # noqa: ASYNC109
        """One call: upload `model` (ONNX bytes, or a file path) if needed, submit `inputs`, follow the job to the
        end and return its outputs. `options`: replicas, task_size, final, deadline (see `submit`).
        Raises `JobFailed` when it fails, `WaitTimeout` after `timeout` seconds."""
        data = model if isinstance(model, bytes) else await asyncio.to_thread(Path(model).read_bytes)
        digest = await self.ensure_model(data)
        job = await self.submit(digest, inputs, **options)
        job_id = str(job["job"])
        await self.follow(job_id, on_progress=on_progress, timeout=timeout)
        return await self.outputs(job_id)

    async def nodes(self) -> list[dict[str, Any]]:
        """Nodes online (and seen in the last 5 minutes): owner, slots, state, speed, trust, last seen."""
        return _list_of(_as_dict(await self._json("GET", "/v1/nodes", sign=False), "/v1/nodes"), "nodes", "/v1/nodes")

    # -- nodes -------------------------------------------------------------------------------------

    async def trust(self, node: str) -> dict[str, Any]:
        """Why `node` is or is not trusted (or is blocked), its record against the coordinator's own
        checks (streak, valid, invalid, errors, audits passed and failed, last problem), the audit
        rate of its results, and the leases it holds and may hold. Public: no key needed."""
        path = f"/v1/nodes/{quote(node, safe='')}/trust"
        return _as_dict(await self._json("GET", path, sign=False), path)

    # -- ledger (public reads: anyone may check the ledger) -------------------------------------------

    async def _ledger(self, path: str, params: Mapping[str, str | int | float | None] | None = None) -> dict[str, Any]:
        return _as_dict(await self._json("GET", path, params=params, sign=False), path)

    async def balances(self, *, upto: int | None = None) -> dict[str, Any]:
        """Balances per node, owner and account; with `upto`, over the entries with seq <= upto only
        (one consistent snapshot, e.g. at a checkpoint's size)."""
        return await self._ledger("/v1/ledger/balances", {"upto": upto})

    async def history(self, node: str) -> dict[str, Any]:
        """One node's credit entries (404 for a name that is no node: see `account`)."""
        return await self._ledger(f"/v1/ledger/nodes/{quote(node, safe='')}")

    async def account(self, name: str) -> dict[str, Any]:
        """One account's entries (grants, credits earned, charges paid) and its balance."""
        return await self._ledger(f"/v1/ledger/accounts/{quote(name, safe='')}")

    async def job_ledger(self, job: str) -> dict[str, Any]:
        """A job's entries, what it cost its submitter and who computed it."""
        return await self._ledger(f"/v1/ledger/jobs/{quote(job, safe='')}")

    async def checkpoint(self) -> dict[str, Any]:
        """`{"checkpoint": {...}, "public_key": hex}`: the newest signed checkpoint."""
        return await self._ledger("/v1/ledger/checkpoint")

    async def checkpoints(self, *, after: int = 0, limit: int = PAGE_LIMIT) -> list[dict[str, Any]]:
        """Signed checkpoints of size > `after`, ascending, at most `limit`."""
        answer = await self._ledger("/v1/ledger/checkpoints", {"after": after, "limit": limit})
        return _list_of(answer, "checkpoints", "/v1/ledger/checkpoints")

    async def inclusion_proof(self, seq: int, size: int) -> dict[str, Any]:
        """`{"seq", "index", "size", "entry": leaf hex, "proof": [hex...]}` for entry `seq` in the tree of `size`."""
        return await self._ledger("/v1/ledger/proof/inclusion", {"seq": seq, "size": size})

    async def consistency_proof(self, old: int, new: int) -> list[str]:
        """The hashes proving the tree of size `old` is a prefix of the tree of size `new`."""
        answer = await self._ledger("/v1/ledger/proof/consistency", {"old": old, "new": new})
        proof = answer.get("proof")
        if not isinstance(proof, list) or answer.get("old") != old or answer.get("new") != new:
            raise SparecyclesError(f"/v1/ledger/proof/consistency: no proof from {old} to {new} in the answer")
        return proof

    async def receipts(self, node: str, *, after: int = 0, limit: int = PAGE_LIMIT) -> dict[str, Any]:
        """`{"checkpoint", "receipts": [{"seq", "entry", "index", "proof", "checkpoint"}...]}`: the
        node's credits and clawbacks with after < seq <= the checkpoint's size."""
        return await self._ledger(f"/v1/ledger/receipts/{quote(node, safe='')}", {"after": after, "limit": limit})

    async def entries(self, *, upto: int | None = None) -> list[dict[str, Any]]:
        """Every ledger entry (seq <= `upto` if given), in sequence order, following `next` page by page."""
        return [e async for page in self.entry_pages(upto=upto) for e in page]

    async def accepted(self, *, upto: int | None = None) -> list[dict[str, Any]]:
        """Every accepted (task, node) pair the coordinator recorded (with `upto`, whose verdict was
        recorded at ledger size <= upto), following `next`."""
        return [row async for page in self._pages("/v1/ledger/accepted", "accepted", upto) for row in page]

    def entry_pages(self, *, upto: int | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """The ledger page by page: for an export that never holds the whole ledger in memory."""
        return self._pages("/v1/ledger/entries", "entries", upto)

    async def _pages(self, path: str, field: str, upto: int | None) -> AsyncIterator[list[dict[str, Any]]]:
        after: Any = None
        while True:
            page = await self._ledger(path, {"after": after, "limit": PAGE_LIMIT, "upto": upto})
            yield _list_of(page, field, path)
            nxt = page.get("next")
            if nxt is None:
                return
            if nxt == after:
                # a cursor that does not move would loop forever
                raise SparecyclesError(f"{path}: paging cursor did not advance past {after!r}")
            after = nxt


class SseParser:
    """Server-sent events from lines of bytes: yields (event, JSON data) at each blank line;
    comments (heartbeats) and `retry:` are skipped, data that is not a JSON object too."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, raw: bytes) -> list[tuple[str, dict[str, Any]]]:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            if line.startswith(":"):
                return []
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
            return []
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        if not data:
            return []
        try:
            doc = json.loads(data)
        except json.JSONDecodeError:
            return []
        return [(event, doc)] if isinstance(doc, dict) else []


def _stream_unavailable(exc: RequestRejected) -> bool:
    """Too many streams open (503), or a coordinator that has no stream route (404/405 that is
    not about the job): polling serves instead."""
    return exc.status == 503 or (exc.status in (404, 405) and "unknown job" not in exc.message)


def _list_of(answer: Mapping[str, Any], field: str, path: str) -> list[dict[str, Any]]:
    rows = answer.get(field)
    if not isinstance(rows, list):
        raise SparecyclesError(f"{path}: answer has no list {field!r}")
    return rows


def _token(read_token: str | None) -> dict[str, str]:
    return {} if read_token is None else {JOB_TOKEN_HEADER: read_token}


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _as_dict(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SparecyclesError(f"{path}: expected a JSON object from the coordinator")
    return value


def _error_message(answer: _Answer) -> str:
    try:
        body = json.loads(answer.body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        text = answer.body.decode("utf-8", "replace").strip()
        return text[:300] or "(no message)"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return json.dumps(body)[:300]
