"""Content addresses and identities: sha256 hex digests and node ids derived from public keys."""

from __future__ import annotations

import base64
import hashlib
import re

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256_hex(value: str) -> bool:
    return bool(_HEX64.match(value))


def node_id_from_public_key(public_key: bytes) -> str:
    """26 lowercase base32 characters of sha256(pk)[:16]: stable, topic-safe, not forgeable
    without the key. Used as MQTT topic level and client id, so it must avoid `+`, `#` and `/`."""
    digest = hashlib.sha256(public_key).digest()[:16]
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()
