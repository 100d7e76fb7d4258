"""The protocol's error tree, split by whose fault it is (after h11's Local/RemoteProtocolError).

A `PeerError` means a peer sent something bad: reject it, count it, log it, keep serving.
A `LocalError` means we misused the protocol ourselves: a bug, fail loudly.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every protocol failure."""

    reason: str = "protocol_error"


class PeerError(ProtocolError):
    """Something a peer sent is unacceptable. Carries a short machine-readable `reason`."""

    reason = "peer_error"

    def __init__(self, message: str, *, size: int | None = None) -> None:
        super().__init__(message)
        self.size = size


class MalformedMessage(PeerError):
    reason = "malformed"


class OversizedMessage(PeerError):
    reason = "oversized"


class UnsupportedVersion(PeerError):
    reason = "unsupported_version"


class BadSignature(PeerError):
    reason = "bad_signature"


class WrongSender(PeerError):
    """A validly signed message arrived from a key other than the one the topic or field names."""

    reason = "wrong_sender"


class BadTensor(PeerError):
    reason = "bad_tensor"


class BadCertificate(PeerError):
    """A node certificate that is undecodable, forged, expired, not yet valid or for another key.
    The message is a short human reason ("certificate expired at 2026-01-02T03:04:05Z")."""

    reason = "bad_certificate"


class AuthError(PeerError):
    """A signed HTTP request that does not authenticate: missing or malformed header, a clock too
    far off, a signature that does not verify. The message is one line, fit for a 401 body."""

    reason = "auth_failed"


class LocalError(ProtocolError):
    """We built something the protocol forbids: a bug on this side."""

    reason = "local_error"
