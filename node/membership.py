"""How a node joins a coordinator: prove its owner with a certificate, get a broker login, and
sign every HTTP request it makes (model and blob downloads, output uploads).

On an open coordinator `--owner NAME` needs nothing more: with no owner key yet, the node creates
one beside its own key (mode 0600), registers the account NAME with it and certifies itself. With a
certificate made elsewhere (`sparecycles owner certify NODE_PUBKEY` on the owner's machine), pass
`--cert FILE` and no owner key is needed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from protocol.certs import NodeCertificate, issue_certificate
from protocol.errors import BadCertificate
from protocol.httpauth import sign_request
from protocol.signing import Identity

from .errors import NodeError
from .logs import kv

log = logging.getLogger(__name__)

CERT_VALID_SECONDS = 365 * 24 * 3600.0


class Refused(NodeError):
    """The coordinator will not have this node (or its owner): retrying will not help."""


class RequestSigner:
    """Signs requests for one coordinator (`audience` = its id) with one key."""

    def __init__(self, identity: Identity, audience: str) -> None:
        self.identity = identity
        self.audience = audience

    def headers(self, method: str, url: URL, body: bytes = b"") -> dict[str, str]:
        # The signature covers the request target exactly as sent: aiohttp sends `url.raw_path_qs`
        # of the yarl URL it is given, so callers pass this same URL object.
        return {"Authorization": sign_request(self.identity, method=method, path_qs=url.raw_path_qs, body=body,
                                              audience=self.audience, now=time.time())}


@dataclass(frozen=True, slots=True)
class Registration:
    owner: str
    expires_at: float
    mqtt_username: str | None
    mqtt_password: str | None


def owner_key_path(node_key: Path, owner: str) -> Path:
    return node_key.parent / f"owner-{owner}.key"


async def _post(http: aiohttp.ClientSession, signer: RequestSigner, url: URL,
                payload: dict[str, Any]) -> tuple[int, Any]:
    body = json.dumps(payload).encode()
    headers = {**signer.headers("POST", url, body), "Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as resp:
        try:
            answer = await resp.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            answer = {"error": (await resp.text(errors="replace"))[:200]}
        return resp.status, answer


def _error(answer: Any) -> str:
    return str(answer.get("error")) if isinstance(answer, dict) else str(answer)[:200]


async def certificate_for(http: aiohttp.ClientSession, base_url: str, audience: str, node: Identity, *,
                          owner: str, owner_key: Path, cert_path: Path | None) -> NodeCertificate:
    """The node's certificate: read from `cert_path` if given, else issued here by the owner's key,
    registering the owner's account first (idempotent for the same key and name)."""
    if cert_path is not None:
        try:
            text = await asyncio.to_thread(cert_path.read_text)
            return NodeCertificate.from_text(text.strip())
        except OSError as exc:
            raise Refused(f"cannot read certificate {cert_path}: {exc.strerror or exc}") from exc
        except BadCertificate as exc:
            raise Refused(f"{cert_path} is not a node certificate: {exc}") from exc
    owner_identity = await asyncio.to_thread(Identity.load_or_create, owner_key)
    signer = RequestSigner(owner_identity, audience)
    status, answer = await _post(http, signer, URL(f"{base_url}/v1/accounts"), {"name": owner})
    if status in (200, 201):
        if status == 201:
            log.info(kv("owner_registered", owner=owner, account=owner_identity.id, key=str(owner_key)))
    elif status == 409:
        raise Refused(f"owner {owner!r} on this coordinator belongs to another key than {owner_key}: pass that "
                      f"key with --owner-key, a certificate from its holder with --cert, or another --owner "
                      f"({_error(answer)})")
    elif status in (401, 403):
        raise Refused(f"the coordinator refused to register owner {owner!r}: {_error(answer)}; ask its operator, "
                      "or bring a certificate from your owner account (sparecycles owner certify) with --cert")
    else:
        raise NodeError(f"registering owner {owner!r}: HTTP {status} {_error(answer)}")
    return issue_certificate(owner_identity, node.public_key, now=time.time(), valid_seconds=CERT_VALID_SECONDS)


async def register_node(http: aiohttp.ClientSession, base_url: str, signer: RequestSigner,
                        certificate: NodeCertificate) -> Registration:
    status, answer = await _post(http, signer, URL(f"{base_url}/v1/nodes"), {"certificate": certificate.to_text()})
    if status in (400, 401, 403, 409):
        raise Refused(f"the coordinator refused this node: {_error(answer)}")
    if status != 200 or not isinstance(answer, dict):
        raise NodeError(f"registering the node: HTTP {status} {_error(answer)}")
    mqtt = answer.get("mqtt") if isinstance(answer.get("mqtt"), dict) else None
    return Registration(owner=str(answer.get("owner")), expires_at=float(answer.get("expires_at") or 0.0),
                        mqtt_username=None if mqtt is None else str(mqtt.get("username")),
                        mqtt_password=None if mqtt is None else str(mqtt.get("password")))


async def join(http: aiohttp.ClientSession, base_url: str, audience: str, node: Identity, *, owner: str,
               owner_key: Path, cert_path: Path | None, stop: asyncio.Event, backoff_min: float = 0.2,
               backoff_max: float = 10.0) -> Registration | None:
    """Certify and register the node, retrying with jittered backoff while the coordinator is
    unreachable or failing (5xx); a refusal (`Refused`) is final. None if `stop` is set first."""
    signer = RequestSigner(node, audience)
    delay, attempt = backoff_min, 0
    while not stop.is_set():
        attempt += 1
        try:
            certificate = await certificate_for(http, base_url, audience, node, owner=owner, owner_key=owner_key,
                                                cert_path=cert_path)
            return await register_node(http, base_url, signer, certificate)
        except Refused:
            raise
        except (aiohttp.ClientError, TimeoutError, NodeError) as exc:
            log.warning(kv("registration_retry", attempt=attempt, error=f"{type(exc).__name__}: {exc}",
                           retry_in=round(delay, 2)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay * (0.5 + random.random()))
        delay = min(delay * 2, backoff_max)
    return None
