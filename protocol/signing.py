"""Ed25519 keys and domain-tagged signatures.

The signed bytes are `b"sparecycles/v1/" + kind + b"\\x00" + body`, where `body` is the message's
msgpack encoding exactly as sent: the domain tag stops a signature over one kind of message being
replayed as another kind, and signing the bytes as sent means no re-encoding before verifying.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .digests import node_id_from_public_key
from .errors import BadSignature, LocalError

DOMAIN = b"sparecycles/v1/"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def signed_bytes(kind: str, body: bytes) -> bytes:
    return DOMAIN + kind.encode("ascii") + b"\x00" + body


class Identity:
    """A private key with its public key and derived id. Node and coordinator both have one."""

    __slots__ = ("_private", "id", "public_key")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key: bytes = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id: str = node_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        """Read the raw 32-byte seed at `path`, or create one there with mode 0600."""
        if path.exists():
            seed = path.read_bytes()
            if len(seed) != 32:
                raise LocalError(f"key file {path} holds {len(seed)} bytes, expected a 32-byte Ed25519 seed")
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL with mode 0600: the key is never readable by others, not even for an instant.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(identity.seed())
        return identity

    def seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def sign(self, kind: str, body: bytes) -> bytes:
        return self._private.sign(signed_bytes(kind, body))


def verify(public_key: bytes, kind: str, body: bytes, signature: bytes) -> None:
    """Raise `BadSignature` unless `signature` is `public_key`'s over (kind, body)."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise BadSignature("public key or signature has the wrong length")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, signed_bytes(kind, body))
    except (InvalidSignature, ValueError) as exc:
        raise BadSignature(f"signature does not verify for kind {kind!r}") from exc
