"""The coordinator's notary: the ledger's Merkle tree held in memory, signed checkpoints of it, and
the proofs and receipts that let anyone hold the coordinator to them. Pure: no I/O, no clock.

Leaf i (0-based) is `leaf_hash(entry.record.leaf_bytes())` of the entry with seq i + 1. The notary
is fed entries in seq order and refuses a gap or a repeat: a tree that silently skipped or doubled
an entry would sign a log nobody else can rebuild from the database. Leaf hashes live in one
bytearray (`merkle.LeafHashList`, 32 bytes a leaf) plus the subtree cache (1/64 of that again), so
a million entries cost about 34 MB, measured by tests/unit/test_notary.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from protocol.signing import Identity

from .checkpoint import Checkpoint, ForgedCheckpoint, InconsistentLog, Receipt, sign_checkpoint
from .entries import Entry
from .errors import LedgerError
from .merkle import MerkleLog, leaf_hash


class NotaryError(LedgerError):
    """Entries offered out of order: a gap (an entry missing) or a repeat (absorbed before).
    `expected` is the seq the notary needed, `got` the one it was offered."""

    def __init__(self, message: str, *, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class LedgerMismatch(InconsistentLog):
    """The entries read from the database do not make the tree a stored checkpoint signed: they
    were changed, deleted or inserted behind the coordinator's back. `checkpoint` is the one they
    contradict."""

    def __init__(self, message: str, *, checkpoint: Checkpoint) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class Notary:
    """The ledger's tree and the key that signs it. `absorb` entries as they are committed, `sign`
    a checkpoint now and then, answer proofs against any size up to the tree's."""

    def __init__(self, identity: Identity) -> None:
        self._identity = identity
        self._log = MerkleLog()

    @property
    def size(self) -> int:
        return self._log.size

    @property
    def origin(self) -> str:
        return self._identity.id

    @property
    def public_key(self) -> bytes:
        return self._identity.public_key

    def root(self, size: int | None = None) -> bytes:
        return self._log.root(size)

    def absorb(self, entries: Iterable[Entry]) -> int:
        """Add entries that continue the log (seq = size + 1, + 2, ...); all or none. Returns how
        many were added. Raises `NotaryError` on a gap or a repeat, before adding any."""
        batch = list(entries)
        for offset, entry in enumerate(batch):
            expected = self._log.size + 1 + offset
            if entry.seq != expected:
                what = (f"entry seq {entry.seq} repeats one already in the tree of {self._log.size} entries"
                        if entry.seq < expected else
                        f"entries jump from seq {expected - 1} to {entry.seq}: seq {expected} is missing")
                raise NotaryError(what, expected=expected, got=entry.seq)
        for entry in batch:
            self._log.append(leaf_hash(entry.record.leaf_bytes()))
        return len(batch)

    def sign(self, now_ms: int) -> Checkpoint:
        """A checkpoint of the whole tree now, signed with the coordinator's key."""
        return sign_checkpoint(self._identity, size=self._log.size, root=self._log.root(), timestamp_ms=now_ms)

    def check(self, checkpoint: Checkpoint) -> None:
        """Is this stored checkpoint ours, and is the tree an extension of the one it signed?
        `ForgedCheckpoint` if another key signed it (or nobody did); `LedgerMismatch`, whose
        message says what to do, if the entries no longer make the signed tree."""
        where = f"ledger does not match its checkpoint of size {checkpoint.size} signed at {checkpoint.time_iso()}"
        if checkpoint.origin != self.origin:
            raise ForgedCheckpoint(f"the ledger's latest checkpoint (size {checkpoint.size}, {checkpoint.time_iso()}) "
                                   f"was signed by coordinator {checkpoint.origin}, not by this one ({self.origin}): "
                                   "start with the key that wrote this ledger (--key FILE)")
        checkpoint.verify(self.public_key)
        if checkpoint.size > self._log.size:
            raise LedgerMismatch(f"{where}: the database holds only {self._log.size} entries, so entries were "
                                 "deleted outside the coordinator; restore the database from a backup",
                                 checkpoint=checkpoint)
        if self._log.root(checkpoint.size) != checkpoint.root:
            raise LedgerMismatch(f"{where}: its first {checkpoint.size} entries hash to another root, so entries "
                                 "were changed outside the coordinator; restore the database from a backup",
                                 checkpoint=checkpoint)

    def leaf_hash_at(self, seq: int) -> bytes:
        """The leaf hash the tree holds for the entry with this seq (1-based)."""
        return self._log.leaf_hash_at(seq - 1)

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """The audit path of entry `seq` (leaf seq - 1) in the tree of `size` entries, seq <= size
        <= the tree's size. `ValueError` with a sentence otherwise."""
        self._check_size(size)
        if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= size:
            raise ValueError(f"seq must be in 1..{size} (the size the proof is against), got {seq!r}")
        return self._log.inclusion_proof(seq - 1, size)

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """Proof that the tree of `old` entries is a prefix of the tree of `new`, 0 <= old <= new <=
        the tree's size. `ValueError` with a sentence otherwise."""
        self._check_size(new)
        if isinstance(old, bool) or not isinstance(old, int) or not 0 <= old <= new:
            raise ValueError(f"old must be in 0..{new} (the new size), got {old!r}")
        return self._log.consistency_proof(old, new)

    def receipts(self, entries: Sequence[Entry], checkpoint: Checkpoint) -> list[Receipt]:
        """A receipt for each entry against `checkpoint`, which must be a checkpoint of this tree
        (`ValueError` otherwise), as must each entry be its leaf (`LedgerMismatch`: the database
        changed under us; a receipt that would not verify is never handed out)."""
        if checkpoint.origin != self.origin or checkpoint.size > self._log.size \
                or self._log.root(checkpoint.size) != checkpoint.root:
            raise ValueError(f"checkpoint of size {checkpoint.size} is not one of this tree")
        out: list[Receipt] = []
        for entry in entries:
            if not 1 <= entry.seq <= checkpoint.size:
                raise ValueError(f"entry seq {entry.seq} is not in the checkpoint of size {checkpoint.size}")
            data = entry.record.leaf_bytes()
            if leaf_hash(data) != self._log.leaf_hash_at(entry.seq - 1):
                raise LedgerMismatch(f"entry seq {entry.seq} in the database is not the one signed at "
                                     f"{checkpoint.time_iso()}: it was changed outside the coordinator",
                                     checkpoint=checkpoint)
            out.append(Receipt(entry=data, index=entry.seq - 1,
                               proof=tuple(self._log.inclusion_proof(entry.seq - 1, checkpoint.size)),
                               checkpoint=checkpoint))
        return out

    def _check_size(self, size: object) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self._log.size:
            raise ValueError(f"size must be in 0..{self._log.size} (the entries checkpointed so far), got {size!r}")
