"""The node's side of the coordinator's HTTP API (docs/http-api.md): info, input and output blobs."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgpack
from yarl import URL

from protocol import PROTOCOL_VERSION
from protocol.errors import PeerError
from protocol.tensors import Tensor, decode_tensor_map, digest_tensors
from protocol.topics import Topics

from .errors import CoordinatorUnavailable, TaskFailed
from .logs import kv
from .membership import RequestSigner

log = logging.getLogger(__name__)

INFO_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class CoordinatorInfo:
    coordinator: str
    public_key: bytes
    topic_prefix: str
    max_inline_bytes: int
    max_message_bytes: int

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @classmethod
    def from_json(cls, raw: Any, *, default_inline: int, default_message: int) -> CoordinatorInfo:
        if not isinstance(raw, dict):
            raise CoordinatorUnavailable("/v1/info did not answer a JSON object")
        protocol = raw.get("protocol", PROTOCOL_VERSION)
        if protocol != PROTOCOL_VERSION:
            raise CoordinatorUnavailable(
                f"coordinator speaks protocol {protocol!r}, this node {PROTOCOL_VERSION}")
        try:
            public_key = bytes.fromhex(str(raw["public_key"]))
            prefix = str(raw["topic_prefix"])
            Topics(prefix)
        except (KeyError, ValueError) as exc:
            raise CoordinatorUnavailable(f"/v1/info lacks a valid public_key or topic_prefix: {exc}") from exc
        if len(public_key) != 32:
            raise CoordinatorUnavailable("/v1/info public_key is not a 32-byte Ed25519 key")
        inline, message = raw.get("max_inline_bytes"), raw.get("max_message_bytes")
        return cls(coordinator=str(raw.get("coordinator", "")), public_key=public_key, topic_prefix=prefix,
                   max_inline_bytes=inline if isinstance(inline, int) and inline > 0 else default_inline,
                   max_message_bytes=message if isinstance(message, int) and message > 0 else default_message)


async def fetch_info(session: aiohttp.ClientSession, base_url: str, *, stop: asyncio.Event,
                     default_inline: int, default_message: int,
                     backoff_min: float = 0.2, backoff_max: float = 10.0,
                     rng: random.Random | None = None) -> CoordinatorInfo | None:
    """GET /v1/info, retrying with backoff until it answers. None if `stop` is set first.

    A malformed answer is retried too: a coordinator half-way through starting, or the wrong
    address, may turn into the right one; the log says what is wrong meanwhile."""
    rng = rng or random.Random()
    delay = backoff_min
    attempt = 0
    while not stop.is_set():
        attempt += 1
        request = asyncio.create_task(_get_info(session, base_url, default_inline, default_message))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([request, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            request.cancel()
            await asyncio.gather(request, stopped, return_exceptions=True)
        if stop.is_set():
            break
        try:
            return request.result()
        except (aiohttp.ClientError, TimeoutError, ValueError, CoordinatorUnavailable) as exc:
            level = logging.WARNING if attempt in (1, 5) or attempt % 20 == 0 else logging.DEBUG
            log.log(level, kv("coordinator_unreachable", url=f"{base_url}/v1/info", attempt=attempt,
                              error=f"{type(exc).__name__}: {exc}", retry_in=round(delay, 2),
                              hint="start the coordinator or pass --coordinator http://HOST:PORT"))
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay * (0.5 + rng.random()))
        except TimeoutError:
            pass
        delay = min(delay * 2, backoff_max)
    return None


async def _get_info(session: aiohttp.ClientSession, base_url: str, default_inline: int,
                    default_message: int) -> CoordinatorInfo:
    # a short timeout: something listening that is not a coordinator must not stall start-up
    async with session.get(f"{base_url}/v1/info", timeout=aiohttp.ClientTimeout(total=INFO_TIMEOUT)) as resp:
        resp.raise_for_status()
        return CoordinatorInfo.from_json(await resp.json(), default_inline=default_inline,
                                         default_message=default_message)


def decode_tensor_blob(body: bytes, expected_digest: str) -> dict[str, Tensor]:
    """A msgpack tensor map as served by /v1/blobs; raise TaskFailed unless it hashes to the digest."""
    try:
        tensors = decode_tensor_map(body)
    except PeerError as exc:
        raise TaskFailed(f"input blob is malformed: {exc}") from exc
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise TaskFailed(f"input blob is not msgpack: {type(exc).__name__}: {exc}") from exc
    actual = digest_tensors(tensors)
    if actual != expected_digest:
        raise TaskFailed(f"input blob digest {actual[:12]} does not match {expected_digest[:12]}")
    return tensors


async def get_inputs(session: aiohttp.ClientSession, base_url: str, digest: str, lease: str, *,
                     max_bytes: int, signer: RequestSigner | None = None) -> dict[str, Tensor]:
    url = f"{base_url}/v1/blobs/{digest}"
    target = URL(url).with_query(lease=lease)
    headers = signer.headers("GET", target) if signer is not None else None
    try:
        async with session.get(target, headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:200]
                raise TaskFailed(f"GET {url}: HTTP {resp.status} {text}", transient=resp.status >= 500)
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise TaskFailed(f"input blob of {resp.content_length} bytes exceeds {max_bytes}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(1024 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise TaskFailed(f"input blob exceeds {max_bytes} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TaskFailed(f"GET {url}: {type(exc).__name__}: {exc}", transient=True) from exc
    return await asyncio.to_thread(decode_tensor_blob, bytes(body), digest)


async def put_outputs(session: aiohttp.ClientSession, base_url: str, digest: str, lease: str,
                      body: bytes, *, signer: RequestSigner | None = None) -> None:
    url = f"{base_url}/v1/blobs/{digest}"
    target = URL(url).with_query(lease=lease)
    headers = {"Content-Type": "application/x-msgpack"}
    if signer is not None:
        headers.update(signer.headers("PUT", target, body))
    try:
        async with session.put(target, data=body, headers=headers) as resp:
            if resp.status not in (200, 201, 204):
                text = (await resp.text(errors="replace"))[:200]
                raise TaskFailed(f"PUT {url}: HTTP {resp.status} {text}", transient=resp.status >= 500)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TaskFailed(f"PUT {url}: {type(exc).__name__}: {exc}", transient=True) from exc
