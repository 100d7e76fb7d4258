"""Raw HTTP requests signed as the coordinator expects, for tests that send what the SDK never would
(malformed bodies, other people's jobs, replays)."""

from __future__ import annotations

import io
import json as jsonlib
import time
from typing import Any

import aiohttp
from yarl import URL

from protocol.httpauth import sign_request
from protocol.signing import Identity


async def audience(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/v1/info") as r:
        return str((await r.json())["coordinator"])


async def call(session: aiohttp.ClientSession, base: str, method: str, path: str, *,
               identity: Identity | None, audience: str = "", data: bytes = b"", json: Any = None,
               headers: dict[str, str] | None = None, params: dict[str, str] | None = None,
               authorization: str | None = None, stream: bool = False) -> tuple[int, Any, dict[str, str]]:
    """One request, signed by `identity` (or carrying `authorization` as given); returns the status,
    the JSON answer (or text) and the response headers. `stream` sends the body from a file object
    (aiohttp then copes with a server that answers before reading it all, as a 413 does)."""
    url = URL(f"{base}{path}")
    if params:
        url = url.with_query(params)
    hdrs = dict(headers or {})
    if json is not None:
        data = jsonlib.dumps(json).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if authorization is not None:
        hdrs["Authorization"] = authorization
    elif identity is not None:
        hdrs["Authorization"] = sign_request(identity, method=method, path_qs=url.raw_path_qs, body=data,
                                             audience=audience, now=time.time())
    body_arg: Any = (io.BytesIO(data) if stream else data) or None
    async with session.request(method, url, data=body_arg, headers=hdrs) as r:
        try:
            body: Any = await r.json(content_type=None)
        except ValueError:
            body = await r.text()
        return r.status, body, dict(r.headers)
