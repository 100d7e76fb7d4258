"""Node certificates: an account's key vouches that a node key acts for it (DESIGN.md §12).

A node may claim any owner in its messages; only a certificate signed by the owner's account key
makes the claim count. The signed part is the canonical msgpack array
`["sparecycles/node-cert", 1, node_pk, owner_pk, issued_at, expires_at]`, signed under
protocol.signing's domain tag with kind "cert" (so no other signed message can pass for one).
The wire form appends the signature to that array; decoding re-encodes and insists on the very
same bytes, so one certificate has exactly one byte form and one text form.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

from .digests import node_id_from_public_key
from .errors import BadCertificate, BadSignature, LocalError
from .signing import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, verify

KIND = "cert"
TAG = "sparecycles/node-cert"
VERSION = 1
DEFAULT_VALID_SECONDS = 365 * 24 * 3600.0
# The encoding is ~170 bytes; anything much larger is not a certificate and is refused unread.
MAX_CERT_BYTES = 512
MAX_CERT_TEXT = (MAX_CERT_BYTES * 4 + 2) // 3
# Clocks of the issuing laptop and the coordinator differ: a certificate issued "in the future" by
# up to this much is still accepted (expiry gets no such grace: the owner chose it).
DEFAULT_MAX_SKEW = 300.0

_BASE64URL = re.compile(r"^[A-Za-z0-9_-]*$")


def _signed_part(node_public_key: bytes, owner_public_key: bytes, issued_at: float, expires_at: float) -> bytes:
    # floats are always packed as float64, so the same values give the same bytes everywhere
    return bytes(msgpack.packb([TAG, VERSION, node_public_key, owner_public_key, float(issued_at),
                                float(expires_at)], use_bin_type=True))


def _utc(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {ts:.0f}"


@dataclass(frozen=True, slots=True)
class NodeCertificate:
    """`owner_public_key`'s signature saying `node_public_key` acts for it from `issued_at` until
    `expires_at` (wall-clock unix seconds: the certificate crosses machines)."""

    node_public_key: bytes
    owner_public_key: bytes
    issued_at: float
    expires_at: float
    signature: bytes

    def __post_init__(self) -> None:
        for name, value, size in (("node_public_key", self.node_public_key, PUBLIC_KEY_SIZE),
                                  ("owner_public_key", self.owner_public_key, PUBLIC_KEY_SIZE),
                                  ("signature", self.signature, SIGNATURE_SIZE)):
            if not isinstance(value, bytes) or len(value) != size:
                raise BadCertificate(f"{name} must be {size} bytes")
        for name, t in (("issued_at", self.issued_at), ("expires_at", self.expires_at)):
            if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
                raise BadCertificate(f"{name} must be a finite unix time")
        if self.expires_at <= self.issued_at:
            raise BadCertificate("certificate expires before it is issued")

    @property
    def node_id(self) -> str:
        return node_id_from_public_key(self.node_public_key)

    @property
    def owner_id(self) -> str:
        return node_id_from_public_key(self.owner_public_key)

    def signed_part(self) -> bytes:
        return _signed_part(self.node_public_key, self.owner_public_key, self.issued_at, self.expires_at)

    def verify(self, *, now: float, node_public_key: bytes | None = None,
               max_skew: float = DEFAULT_MAX_SKEW) -> None:
        """Raise `BadCertificate` unless the owner signed this, it is valid at `now`, and (when
        given) it names `node_public_key`: the key that signed the message presenting it."""
        if node_public_key is not None and node_public_key != self.node_public_key:
            raise BadCertificate("certificate is for another node key")
        try:
            verify(self.owner_public_key, KIND, self.signed_part(), self.signature)
        except BadSignature as exc:
            raise BadCertificate("signature does not verify") from exc
        if now < self.issued_at - max_skew:
            raise BadCertificate(f"not yet valid: valid from {_utc(self.issued_at)}")
        if now >= self.expires_at:
            raise BadCertificate(f"certificate expired at {_utc(self.expires_at)}")

    # -- bytes and text ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return bytes(msgpack.packb([TAG, VERSION, self.node_public_key, self.owner_public_key,
                                    float(self.issued_at), float(self.expires_at), self.signature],
                                   use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> NodeCertificate:
        """Decode strictly; anything but the canonical encoding is `BadCertificate`. Does not
        verify the signature: call `verify`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadCertificate("certificate must be bytes")
        if len(data) > MAX_CERT_BYTES:
            raise BadCertificate(f"certificate of {len(data)} bytes exceeds {MAX_CERT_BYTES}", size=len(data))
        data = bytes(data)
        raw = _unpack(data)
        if not isinstance(raw, list) or len(raw) != 7:
            raise BadCertificate("certificate is not a 7-item array", size=len(data))
        tag, version, node_pk, owner_pk, issued_at, expires_at, sig = raw
        if tag != TAG:
            raise BadCertificate("not a node certificate", size=len(data))
        if version != VERSION or isinstance(version, bool):
            raise BadCertificate(f"unsupported certificate version {version!r}", size=len(data))
        if not isinstance(issued_at, float) or not isinstance(expires_at, float):
            raise BadCertificate("issued_at and expires_at must be float64", size=len(data))
        cert = cls(node_public_key=node_pk, owner_public_key=owner_pk, issued_at=issued_at,
                   expires_at=expires_at, signature=sig)
        if cert.to_bytes() != data:
            raise BadCertificate("certificate is not canonically encoded", size=len(data))
        return cert

    def to_text(self) -> str:
        """Unpadded base64url of `to_bytes()`: one line, safe in files, JSON and URLs."""
        return base64.urlsafe_b64encode(self.to_bytes()).rstrip(b"=").decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> NodeCertificate:
        """Inverse of `to_text`; surrounding whitespace (a file's newline) is ignored, padding
        is optional, any other character is `BadCertificate`."""
        if not isinstance(text, str):
            raise BadCertificate("certificate text must be a string")
        stripped = text.strip().rstrip("=")
        if len(stripped) > MAX_CERT_TEXT:
            raise BadCertificate(f"certificate text of {len(stripped)} characters exceeds {MAX_CERT_TEXT}")
        if not _BASE64URL.match(stripped) or len(stripped) % 4 == 1:
            raise BadCertificate("certificate text is not base64url")
        try:
            data = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
        except (binascii.Error, ValueError) as exc:
            raise BadCertificate("certificate text is not base64url") from exc
        cert = cls.from_bytes(data)
        if cert.to_text() != stripped:  # stray low bits in the last character: not our encoding
            raise BadCertificate("certificate text is not canonically encoded")
        return cert


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                               max_bin_len=MAX_CERT_BYTES, max_str_len=MAX_CERT_BYTES,
                               max_array_len=16, max_map_len=16, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            UnicodeDecodeError) as exc:
        raise BadCertificate(f"undecodable certificate: {exc}", size=len(data)) from exc


def issue_certificate(owner: Identity, node_public_key: bytes, *, now: float,
                      valid_seconds: float = DEFAULT_VALID_SECONDS) -> NodeCertificate:
    """The owner's signature over `node_public_key`, valid from `now` for `valid_seconds`."""
    if not isinstance(node_public_key, bytes) or len(node_public_key) != PUBLIC_KEY_SIZE:
        raise LocalError(f"a node public key is {PUBLIC_KEY_SIZE} raw bytes")
    if not math.isfinite(valid_seconds) or valid_seconds <= 0:
        raise LocalError(f"valid_seconds must be positive, not {valid_seconds}")
    if not math.isfinite(now):
        raise LocalError(f"now must be a finite unix time, not {now}")
    issued_at, expires_at = float(now), float(now) + float(valid_seconds)
    signature = owner.sign(KIND, _signed_part(node_public_key, owner.public_key, issued_at, expires_at))
    return NodeCertificate(node_public_key=node_public_key, owner_public_key=owner.public_key,
                           issued_at=issued_at, expires_at=expires_at, signature=signature)
