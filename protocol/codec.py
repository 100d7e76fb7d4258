"""The signed envelope: msgpack `{"v", "kind", "body", "sig", "pk"}`. Bytes in, messages out.

`body` is the msgpack encoding of the message and is verified exactly as received; every decode
has a size limit and strict map keys, so hostile msgpack is a `PeerError`, never a crash.

The signature covers the deployment's namespace (its topic prefix) besides the kind and the body:
a message captured on one deployment's topics does not verify when replayed into another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from . import PROTOCOL_VERSION
from .errors import MalformedMessage, OversizedMessage, PeerError, UnsupportedVersion
from .messages import MESSAGE_TYPES, Message
from .signing import Identity, verify

DEFAULT_MAX_MESSAGE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Opened:
    """A decoded, signature-checked envelope. `public_key` is who signed it."""

    kind: str
    message: Message
    public_key: bytes


def _unpack(data: bytes, max_size: int) -> Any:
    if len(data) > max_size:
        raise OversizedMessage(f"{len(data)} bytes exceeds the {max_size}-byte limit", size=len(data))
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True,
                               use_list=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError) as exc:
        raise MalformedMessage(f"undecodable msgpack: {exc}", size=len(data)) from exc


def scoped_kind(namespace: str, kind: str) -> str:
    """What the signature's domain tag names: `namespace NUL kind`. A namespace holds no NUL (topic
    prefixes are checked), so no two (namespace, kind) pairs share a tag."""
    return f"{namespace}\x00{kind}"


def seal(message: Message, identity: Identity, *, namespace: str) -> bytes:
    body: bytes = msgpack.packb(message.to_wire(), use_bin_type=True)
    kind = message.KIND
    return bytes(msgpack.packb(
        {"v": PROTOCOL_VERSION, "kind": kind, "body": body, "sig": identity.sign(scoped_kind(namespace, kind), body),
         "pk": identity.public_key},
        use_bin_type=True,
    ))


def open_envelope(data: bytes, *, namespace: str, max_size: int = DEFAULT_MAX_MESSAGE,
                  expect_kind: str | None = None) -> Opened:
    """Decode and verify for `namespace`. Raises a `PeerError` subclass for anything a peer got wrong."""
    env = _unpack(data, max_size)
    if not isinstance(env, dict):
        raise MalformedMessage("envelope is not a map", size=len(data))
    if env.get("v") != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"envelope version {env.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    kind, body, sig, pk = env.get("kind"), env.get("body"), env.get("sig"), env.get("pk")
    if not isinstance(kind, str) or not isinstance(body, bytes) or not isinstance(sig, bytes) \
            or not isinstance(pk, bytes):
        raise MalformedMessage("envelope needs kind (str), body, sig and pk (bytes)", size=len(data))
    cls = MESSAGE_TYPES.get(kind)
    if cls is None or (expect_kind is not None and kind != expect_kind):
        raise MalformedMessage(f"unexpected message kind {kind!r}", size=len(data))
    verify(pk, scoped_kind(namespace, kind), body, sig)  # before decoding the body: unsigned bytes get no further
    raw = _unpack(body, max_size)
    if not isinstance(raw, dict):
        raise MalformedMessage("message body is not a map", size=len(data))
    try:
        message = cls.from_wire(raw)
    except PeerError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise MalformedMessage(f"invalid {kind} message: {exc}", size=len(data)) from exc
    return Opened(kind, message, pk)
