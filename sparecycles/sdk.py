"""Async SDK over the coordinator's HTTP API (docs/http-api.md).

    async with Client("http://127.0.0.1:8080") as c:
        model = await c.ensure_model(onnx_bytes)
        job = await c.submit(model, {"x": rows})
        await c.wait(job["job"], on_progress=print)
        outputs = await c.outputs(job["job"])
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import numpy.typing as npt

from protocol.digests import sha256_hex
from protocol.tensors import ALLOWED_DTYPES

from .errors import CoordinatorUnavailable, JobFailed, RequestRejected, SparecyclesError, WaitTimeout
from .npz import from_npz, to_npz

NPZ = "application/x-npz"
PAGE_LIMIT = 1000
CONNECT_TIMEOUT = 10.0
# While waiting, polls back off from `poll` to this ceiling when the coordinator does not answer.
MAX_RETRY_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes


def _normalise_base_url(base_url: str) -> str:
    url = base_url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url  # "127.0.0.1:8080" is what people type
    return url


class Client:
    """One aiohttp session to one coordinator; use as `async with Client(url) as c:`."""

    def __init__(self, base_url: str, *, timeout: float = 300.0) -> None:
        self.base_url = _normalise_base_url(base_url)
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
    ) -> _Answer:
        """One request; connection trouble becomes `CoordinatorUnavailable`, statuses are not checked."""
        session = self._ensure_session()
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with session.request(
                method, self.base_url + path, params=query,
                # a stream, not raw bytes: aiohttp would copy a large body on the event loop
                data=None if data is None else io.BytesIO(data), headers=dict(headers or {})
            ) as resp:
                return _Answer(resp.status, await resp.read())
        except aiohttp.ClientConnectionError as exc:
            # ClientConnectorError is an OSError: its strerror is the short "Connect call failed (...)"
            cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise CoordinatorUnavailable(self.base_url, cause) from exc
        except TimeoutError as exc:
            raise CoordinatorUnavailable(self.base_url, f"no answer within {self.timeout:g} s") from exc

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int | float | None] | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        answer = await self._send(method, path, params=params, data=data, headers=headers)
        if answer.status >= 400:
            raise RequestRejected(answer.status, _error_message(answer), method=method, path=path)
        return answer.body

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        body = await self._call(method, path, **kwargs)
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SparecyclesError(f"{method} {path}: the coordinator's answer is not JSON") from exc

    # -- models and jobs ---------------------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        return _as_dict(await self._json("GET", "/v1/info"), "/v1/info")

    async def has_model(self, digest: str) -> bool:
        path = f"/v1/models/{quote(digest, safe='')}"
        answer = await self._send("HEAD", path)
        if answer.status == 404:
            return False
        if answer.status >= 400:
            raise RequestRejected(answer.status, _error_message(answer), method="HEAD", path=path)
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
    ) -> dict[str, Any]:
        """POST the inputs as NPZ; returns `{"job", "rows", "tasks"}`."""
        arrays = {name: np.asarray(value) for name, value in inputs.items()}
        for name, arr in arrays.items():
            # the coordinator would refuse these too, but only after the whole upload
            if arr.dtype.name not in ALLOWED_DTYPES:
                raise SparecyclesError(
                    f"input {name!r} has dtype {arr.dtype.name}; allowed: {', '.join(sorted(ALLOWED_DTYPES))}"
                )
        params = {"model": model_digest, "replicas": replicas, "task_size": task_size, "final": final}
        answer = await self._json("POST", "/v1/jobs", params=params, data=to_npz(arrays),
                                  headers={"Content-Type": NPZ})
        return _as_dict(answer, "/v1/jobs")

    async def status(self, job: str, *, wait: float = 0.0) -> dict[str, Any]:
        """The job's status; with `wait`, the coordinator holds the answer up to `wait` seconds
        until the job finishes (a long poll: the result arrives without a polling delay)."""
        path = f"/v1/jobs/{quote(job, safe='')}"
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        return _as_dict(await self._json("GET", path, params=params), path)

    async def wait(
        self,
        job: str,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        poll: float = 0.2,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the SDK's contract; one deadline, not per call
    ) -> dict[str, Any]:
        """Poll until the job is done (returns its status) or failed (raises `JobFailed`).

        `on_progress` sees each status that differs from the last one reported. An unreachable
        coordinator (a restart) is retried with backoff for `unavailable_grace` seconds, then
        `CoordinatorUnavailable` is raised; after `timeout` seconds, `WaitTimeout`.
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
                    st = await self.status(job, wait=poll)
                else:
                    async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                        st = await self.status(job, wait=min(poll, max(deadline - loop.time(), 0.0)))
            except TimeoutError as exc:
                raise WaitTimeout(job, timeout or 0.0, last) from exc
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

    async def outputs(self, job: str) -> dict[str, npt.NDArray[Any]]:
        """The finished job's outputs, one array per ONNX output name, rows in input order."""
        body = await self._call("GET", f"/v1/jobs/{quote(job, safe='')}/outputs", headers={"Accept": NPZ})
        return from_npz(body)

    # -- ledger ------------------------------------------------------------------------------------

    async def balances(self) -> dict[str, Any]:
        return _as_dict(await self._json("GET", "/v1/ledger/balances"), "/v1/ledger/balances")

    async def history(self, node: str) -> dict[str, Any]:
        path = f"/v1/ledger/nodes/{quote(node, safe='')}"
        return _as_dict(await self._json("GET", path), path)

    async def entries(self) -> list[dict[str, Any]]:
        """Every ledger entry, in sequence order, following the `next` cursor page by page."""
        return await self._paged("/v1/ledger/entries", "entries")

    async def accepted(self) -> list[dict[str, Any]]:
        """Every accepted (task, node) pair the coordinator recorded, following `next`."""
        return await self._paged("/v1/ledger/accepted", "accepted")

    async def _paged(self, path: str, field: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after: Any = None
        while True:
            page = _as_dict(await self._json("GET", path, params={"after": after, "limit": PAGE_LIMIT}), path)
            rows = page.get(field)
            if not isinstance(rows, list):
                raise SparecyclesError(f"{path}: answer has no list {field!r}")
            items.extend(rows)
            nxt = page.get("next")
            if nxt is None:
                return items
            if nxt == after:
                # a cursor that does not move would loop forever
                raise SparecyclesError(f"{path}: paging cursor did not advance past {after!r}")
            after = nxt


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
