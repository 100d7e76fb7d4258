"""Signed checkpoints of the ledger's Merkle tree, receipts against them, and the check that the
checkpoints one has seen all describe one append-only log.

A checkpoint says "my log had `size` entries with head `root` at `timestamp_ms`", signed by the
coordinator's Ed25519 key. The signed text, after the line format of transparency-dev checkpoints,
is `sparecycles/checkpoint/v1\\n<origin>\\n<size>\\n<root hex>\\n<timestamp_ms>\\n`, under
protocol.signing's domain tag with kind "checkpoint": no other signed message of the project
(envelopes, certificates, HTTP requests) can pass for a checkpoint, nor a checkpoint for one.
`origin` is the coordinator's id (derived from its public key), so a checkpoint or a receipt from
another coordinator is refused by name before its signature is even checked.

Everything decoded here comes from a coordinator under audit: every field is checked, and any fault
is a `CheckpointError` with a sentence saying what was wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from protocol.digests import node_id_from_public_key
from protocol.errors import BadSignature
from protocol.signing import SIGNATURE_SIZE, Identity, verify

from .errors import LedgerError
from .merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MAX_PROOF_HASHES,
    InvalidProof,
    MerkleLog,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

KIND: Final = "checkpoint"
NAMESPACE: Final = b"sparecycles/checkpoint/v1"
MAX_SIZE: Final = 2**63 - 1
"""Sizes and times are stored as SQL bigints."""
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z: the last instant ISO 8601 writes with four year digits."""
MAX_ENTRY_BYTES: Final = 64 * 1024
"""A leaf is a few hundred bytes (a memo is at most 1,000 characters): larger is not an entry."""

_ORIGIN = re.compile(r"[a-z2-7]{1,64}")
_HEX = re.compile(r"[0-9a-f]*")
_CHECKPOINT_KEYS: Final = frozenset({"origin", "size", "root", "timestamp_ms", "signature"})
_RECEIPT_KEYS: Final = frozenset({"entry", "index", "proof", "checkpoint"})


class CheckpointError(LedgerError, ValueError):
    """Root of everything wrong with a checkpoint, a receipt or a history of checkpoints."""


class MalformedCheckpoint(CheckpointError):
    """Undecodable: a missing or extra field, a wrong type, a hex string of the wrong length."""


class ForgedCheckpoint(CheckpointError):
    """Well formed but not signed by the coordinator we trust, or from another coordinator."""


class InconsistentLog(CheckpointError):
    """Signed, but contradicting what we know: a checkpoint that is no extension of one seen
    before (the log shrank, forked or was rewritten), or a receipt whose entry is not in its tree."""


def _checkpoint_text(origin: str, size: int, root: bytes, timestamp_ms: int) -> bytes:
    return b"%s\n%s\n%d\n%s\n%d\n" % (NAMESPACE, origin.encode("ascii"), size, root.hex().encode("ascii"),
                                      timestamp_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoint:
    """A signed tree head. Building one checks its fields (`MalformedCheckpoint`); `verify` checks
    who signed it."""

    origin: str
    size: int
    root: bytes
    timestamp_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not _ORIGIN.fullmatch(self.origin):
            raise MalformedCheckpoint(f"checkpoint origin must be a coordinator id (base32), got {self.origin!r:.80}")
        _check_int("checkpoint size", self.size, MAX_SIZE)
        _check_int("checkpoint timestamp_ms", self.timestamp_ms, MAX_TIMESTAMP_MS)
        _check_bytes("checkpoint root", self.root, HASH_SIZE)
        _check_bytes("checkpoint signature", self.signature, SIGNATURE_SIZE)
        if self.size == 0 and self.root != EMPTY_ROOT:
            raise MalformedCheckpoint("a checkpoint of size 0 must carry the empty tree's root")

    def signed_text(self) -> bytes:
        return _checkpoint_text(self.origin, self.size, self.root, self.timestamp_ms)

    def verify(self, public_key: bytes) -> None:
        """Raise `ForgedCheckpoint` unless the coordinator whose key is `public_key` signed this."""
        expected = node_id_from_public_key(public_key)
        if self.origin != expected:
            raise ForgedCheckpoint(f"checkpoint is from coordinator {self.origin}, expected {expected}")
        try:
            verify(public_key, KIND, self.signed_text(), self.signature)
        except BadSignature as exc:
            raise ForgedCheckpoint(f"checkpoint signature does not verify (size {self.size})") from exc

    def time_iso(self) -> str:
        """The checkpoint time in ISO 8601, UTC, to the millisecond."""
        t = datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)
        return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def to_json(self) -> dict[str, object]:
        """JSON-able form. `time` is for people and is checked against `timestamp_ms` on decoding."""
        return {"origin": self.origin, "size": self.size, "root": self.root.hex(),
                "timestamp_ms": self.timestamp_ms, "time": self.time_iso(), "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, value: object) -> Checkpoint:
        """Decode strictly (no signature check: call `verify`)."""
        if not isinstance(value, dict):
            raise MalformedCheckpoint("a checkpoint is a JSON object")
        keys = set(value) - {"time"}
        if keys != _CHECKPOINT_KEYS:
            raise MalformedCheckpoint(f"checkpoint fields must be {sorted(_CHECKPOINT_KEYS)}, "
                                      f"got {sorted(map(str, value))}")
        checkpoint = cls(origin=value["origin"], size=value["size"],
                         root=_unhex("checkpoint root", value["root"], HASH_SIZE), timestamp_ms=value["timestamp_ms"],
                         signature=_unhex("checkpoint signature", value["signature"], SIGNATURE_SIZE))
        if "time" in value and value["time"] != checkpoint.time_iso():
            raise MalformedCheckpoint(f"checkpoint time {value['time']!r:.40} does not match its timestamp_ms")
        return checkpoint


def sign_checkpoint(identity: Identity, *, size: int, root: bytes, timestamp_ms: int) -> Checkpoint:
    """The coordinator's signed statement that its log had `size` entries with head `root`."""
    _check_int("checkpoint size", size, MAX_SIZE)
    _check_int("checkpoint timestamp_ms", timestamp_ms, MAX_TIMESTAMP_MS)
    _check_bytes("checkpoint root", root, HASH_SIZE)
    signature = identity.sign(KIND, _checkpoint_text(identity.id, size, root, timestamp_ms))
    return Checkpoint(origin=identity.id, size=size, root=root, timestamp_ms=timestamp_ms, signature=signature)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """Proof that `entry` (a ledger entry's leaf bytes) is leaf `index` of the tree a signed
    checkpoint describes: what a node keeps for each credit it earns."""

    entry: bytes
    index: int
    proof: tuple[bytes, ...]
    checkpoint: Checkpoint

    def __post_init__(self) -> None:
        if not isinstance(self.entry, bytes) or not 0 < len(self.entry) <= MAX_ENTRY_BYTES:
            raise MalformedCheckpoint(f"receipt entry must be 1..{MAX_ENTRY_BYTES} bytes")
        _check_int("receipt index", self.index, MAX_SIZE)
        if not isinstance(self.proof, tuple) or len(self.proof) > MAX_PROOF_HASHES:
            raise MalformedCheckpoint(f"receipt proof must be a tuple of at most {MAX_PROOF_HASHES} hashes")
        for i, h in enumerate(self.proof):
            _check_bytes(f"receipt proof hash {i}", h, HASH_SIZE)
        if not isinstance(self.checkpoint, Checkpoint):
            raise MalformedCheckpoint("receipt checkpoint must be a Checkpoint")

    def verify(self, public_key: bytes) -> None:
        """Raise `ForgedCheckpoint` if the checkpoint is not the coordinator's, `InconsistentLog` if
        the entry is not at `index` in the tree it signed."""
        self.checkpoint.verify(public_key)
        try:
            verify_inclusion(leaf_hash(self.entry), self.index, self.checkpoint.size, self.proof,
                             self.checkpoint.root)
        except InvalidProof as exc:
            raise InconsistentLog(f"receipt for leaf {self.index}: {exc}") from exc

    def to_json(self) -> dict[str, object]:
        return {"entry": self.entry.hex(), "index": self.index, "proof": encode_proof(self.proof),
                "checkpoint": self.checkpoint.to_json()}

    @classmethod
    def from_json(cls, value: object) -> Receipt:
        if not isinstance(value, dict) or set(value) != _RECEIPT_KEYS:
            raise MalformedCheckpoint(f"a receipt is a JSON object with fields {sorted(_RECEIPT_KEYS)}")
        entry = value["entry"]
        if not isinstance(entry, str) or len(entry) > 2 * MAX_ENTRY_BYTES:
            raise MalformedCheckpoint(f"receipt entry must be hex of at most {MAX_ENTRY_BYTES} bytes")
        return cls(entry=_unhex("receipt entry", entry, None), index=value["index"],
                   proof=decode_proof(value["proof"]), checkpoint=Checkpoint.from_json(value["checkpoint"]))


def make_receipt(log: MerkleLog, entry: bytes, index: int, checkpoint: Checkpoint) -> Receipt:
    """A receipt for `entry` at `index` against `checkpoint`, which must describe `log`. Raises
    `ValueError` rather than hand out a receipt that would not verify."""
    if checkpoint.size > log.size or log.root(checkpoint.size) != checkpoint.root:
        raise ValueError(f"checkpoint of size {checkpoint.size} does not describe this log")
    if not 0 <= index < checkpoint.size or log.leaf_hash_at(index) != leaf_hash(entry):
        raise ValueError(f"entry is not leaf {index} of the checkpointed tree")
    return Receipt(entry=entry, index=index, proof=tuple(log.inclusion_proof(index, checkpoint.size)),
                   checkpoint=checkpoint)


def encode_proof(proof: Sequence[bytes]) -> list[str]:
    return [h.hex() for h in proof]


def decode_proof(value: object) -> tuple[bytes, ...]:
    """A proof from JSON: a list of at most `MAX_PROOF_HASHES` 64-character lowercase hex strings."""
    if not isinstance(value, list) or len(value) > MAX_PROOF_HASHES:
        raise MalformedCheckpoint(f"a proof is a list of at most {MAX_PROOF_HASHES} hex hashes")
    return tuple(_unhex(f"proof hash {i}", h, HASH_SIZE) for i, h in enumerate(value))


def sizes_to_prove(seen: Iterable[Checkpoint], newest: Checkpoint) -> list[int]:
    """The old sizes for which `check_history` needs a consistency proof up to `newest.size`."""
    return sorted({c.size for c in seen if 0 < c.size < newest.size})


def check_history(seen: Iterable[Checkpoint], newest: Checkpoint, proofs: Mapping[int, Sequence[bytes]],
                  public_key: bytes) -> None:
    """Check that every checkpoint seen before and `newest` were signed by the coordinator with
    `public_key`, and that each seen one is a prefix of `newest`: `proofs[old_size]` is the
    consistency proof from `old_size` to `newest.size` (see `sizes_to_prove`).

    Raises `ForgedCheckpoint` or `InconsistentLog` naming the first checkpoint at fault. After it
    returns, remembering `newest` alone is enough: consistency is transitive, so a later check
    against `newest` also covers everything it extends.
    """
    newest.verify(public_key)
    for old in dict.fromkeys(seen):  # receipts share checkpoints: check each distinct one once
        old.verify(public_key)
        where = f"checkpoint of size {old.size} at {old.time_iso()}"
        if old.size > newest.size:
            raise InconsistentLog(f"{where} is larger than the newest ({newest.size}): the log shrank")
        proof: Sequence[bytes] = ()
        if 0 < old.size < newest.size:
            if old.size not in proofs:
                raise InconsistentLog(f"{where}: no consistency proof to size {newest.size}")
            proof = proofs[old.size]
        try:
            verify_consistency(old.size, newest.size, old.root, newest.root, proof)
        except InvalidProof as exc:
            raise InconsistentLog(f"{where} is not a prefix of the newest of size {newest.size}: {exc}") from exc


def _check_int(what: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise MalformedCheckpoint(f"{what} must be an integer in 0..{maximum}, got {value!r:.40}")


def _check_bytes(what: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedCheckpoint(f"{what} must be {size} bytes")


def _unhex(what: str, value: object, size: int | None) -> bytes:
    """Lowercase hex only: one value has one spelling, so two documents agree byte for byte."""
    if not isinstance(value, str) or not _HEX.fullmatch(value) or len(value) % 2 \
            or (size is not None and len(value) != 2 * size):
        length = f"{2 * size} " if size is not None else ""
        raise MalformedCheckpoint(f"{what} must be {length}lowercase hex characters, got {value!r:.80}")
    return bytes.fromhex(value)
