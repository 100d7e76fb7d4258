"""An append-only Merkle tree in the manner of RFC 6962 / RFC 9162 (certificate transparency).

Leaf hash `SHA-256(0x00 || leaf)`, node hash `SHA-256(0x01 || left || right)`; the tree head of n
leaves splits at the largest power of two below n, so a leaf's position never changes as the log
grows and an older head is always a prefix of a newer one. The 0x00/0x01 prefixes keep a leaf from
ever hashing like an inner node (a second-preimage attack on the tree shape).

`MerkleLog` keeps the root with a compact frontier (one hash per set bit of the size), reads leaf
hashes through the small `LeafHashes` protocol (a list here, a database table later), and caches
the hashes of complete subtrees of `2**cache_level` leaves and more, so that a proof against any
past size reads at most two blocks of leaf hashes and hashes at most a few hundred times. The
verifiers are pure functions of their arguments and follow RFC 9162 §2.1.3.2 and §2.1.4.2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final, Protocol, runtime_checkable

from .errors import LedgerError

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""The tree head of the empty log (RFC 9162 §2.1.1: MTH({}) = HASH())."""

MAX_PROOF_HASHES: Final = 128
"""No valid proof for a log below 2**64 leaves is longer (inclusion ≤ 64, consistency ≤ 65): a
longer one is refused before any hashing."""

DEFAULT_CACHE_LEVEL: Final = 6
"""Complete subtrees of 64 leaves and up are cached: 1 MiB for a million leaves, and a proof
reads at most two blocks of 64 leaf hashes from the store."""

_SYNC_CHUNK: Final = 1 << 16
_sha256 = hashlib.sha256


class InvalidProof(LedgerError, ValueError):
    """A proof, root or leaf hash that does not check out; the message says which check failed."""


class LeafHashes(Protocol):
    """Read access to the leaf hashes of a log, in order; what a database table must offer."""

    def __len__(self) -> int: ...

    def hash_range(self, start: int, end: int) -> Sequence[bytes]:
        """The leaf hashes with indices in [start, end), 0 <= start <= end <= len(self)."""
        ...


@runtime_checkable
class AppendableLeafHashes(LeafHashes, Protocol):
    def append(self, leaf_hash: bytes) -> None: ...


class LeafHashList:
    """In-memory `LeafHashes`: 32 bytes a leaf in one bytearray, no object per leaf."""

    __slots__ = ("_data",)

    def __init__(self, hashes: Iterable[bytes] = ()) -> None:
        self._data = bytearray()
        for h in hashes:
            self.append(h)

    def __len__(self) -> int:
        return len(self._data) // HASH_SIZE

    def append(self, leaf_hash: bytes) -> None:
        _require_hash(leaf_hash)
        self._data += leaf_hash

    def hash_range(self, start: int, end: int) -> list[bytes]:
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"leaf range [{start}, {end}) outside [0, {len(self)})")
        data = self._data
        return [bytes(data[i:i + HASH_SIZE]) for i in range(start * HASH_SIZE, end * HASH_SIZE, HASH_SIZE)]


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def root_of(leaf_hashes: Iterable[bytes]) -> bytes:
    """The tree head of these leaf hashes in one pass and O(log n) memory: a full-log check."""
    stack: list[bytes] = []
    count = 0
    for h in leaf_hashes:
        c = count
        while c & 1:  # each trailing 1 bit of the old size is a subtree the new leaf completes
            h = _sha256(b"\x01" + stack.pop() + h).digest()
            c >>= 1
        stack.append(h)
        count += 1
    return _fold(stack)


def _fold(frontier: Sequence[bytes]) -> bytes:
    """Root from the perfect subtrees of a size, largest first: the smaller ones join on the right."""
    if not frontier:
        return EMPTY_ROOT
    r = frontier[-1]
    for h in reversed(frontier[:-1]):
        r = _sha256(b"\x01" + h + r).digest()
    return r


def _split(n: int) -> int:
    """The largest power of two strictly below n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleLog:
    """The tree over a `LeafHashes` store. `append` when the store is appendable (the in-memory
    default); `sync` after others appended to the store (a database commit), to catch up."""

    def __init__(self, leaves: LeafHashes | None = None, *, cache_level: int = DEFAULT_CACHE_LEVEL) -> None:
        if not 0 <= cache_level <= 32:
            raise ValueError(f"cache_level must be in 0..32, got {cache_level}")
        self._leaves: LeafHashes = LeafHashList() if leaves is None else leaves
        # checked once: a runtime Protocol check costs microseconds, as much as the append itself
        self._appendable = self._leaves if isinstance(self._leaves, AppendableLeafHashes) else None
        self._cache_level = cache_level
        self._block = 1 << cache_level
        self._size = 0
        self._frontier: list[bytes] = []
        self._root: bytes | None = EMPTY_ROOT
        # _levels[j]: hashes of the complete subtrees of 2**(cache_level + j) leaves, left to right
        self._levels: list[bytearray] = []
        self.sync()

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Add one leaf hash to the store and the tree; return its index."""
        leaves = self._appendable
        if leaves is None:
            raise TypeError("this log's leaf store is read-only: append to the store, then call sync()")
        if len(leaves) != self._size:
            raise LedgerError(f"leaf store holds {len(leaves)} leaves, the tree {self._size}: call sync()")
        _require_hash(leaf_hash)
        leaves.append(leaf_hash)
        self._absorb(leaf_hash)
        return self._size - 1

    def append_data(self, data: bytes) -> int:
        return self.append(leaf_hash(data))

    def sync(self) -> int:
        """Fold in the leaves the store gained since the last call; return how many."""
        total = len(self._leaves)
        if total < self._size:
            raise LedgerError(f"leaf store shrank from {self._size} to {total} leaves: the log is append-only")
        before = self._size
        while self._size < total:
            start, end = self._size, min(total, self._size + _SYNC_CHUNK)
            for h in self._fetch(start, end):
                if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                    raise LedgerError(f"leaf store holds a malformed hash at index {self._size}")
                self._absorb(h)
        return self._size - before

    def _absorb(self, h: bytes) -> None:
        c, level, base = self._size, 0, self._cache_level
        if base == 0:
            self._store(0, h)
        while c & 1:
            h = _sha256(b"\x01" + self._frontier.pop() + h).digest()
            c >>= 1
            level += 1
            if level >= base:
                self._store(level - base, h)
        self._frontier.append(h)
        self._size += 1
        self._root = None

    def _store(self, j: int, h: bytes) -> None:
        while len(self._levels) <= j:
            self._levels.append(bytearray())
        self._levels[j] += h

    def root(self, size: int | None = None) -> bytes:
        """The tree head at `size` leaves (default: now); any past size, 0 included."""
        size = self._check_size(size)
        if size == self._size:
            if self._root is None:
                self._root = _fold(self._frontier)
            return self._root
        return EMPTY_ROOT if size == 0 else self._range_hash(0, size, {})

    def leaf_hash_at(self, index: int) -> bytes:
        if not 0 <= index < self._size:
            raise IndexError(f"leaf {index} outside a log of {self._size}")
        return self._fetch(index, index + 1)[0]

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.3.1 PATH(index, D[size]): siblings from the leaf up to the root."""
        size = self._check_size(size)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
            raise ValueError(f"leaf index {index!r} outside a tree of {size} leaves")
        blocks: dict[int, Sequence[bytes]] = {}
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:  # walk down from the root; each step's other half is a sibling
            k = _split(end - start)
            if index < start + k:
                proof.append(self._range_hash(start + k, end, blocks))
                end = start + k
            else:
                proof.append(self._range_hash(start, start + k, blocks))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 §2.1.4.1 PROOF(old_size, D[new_size]); empty when old_size is 0 or new_size."""
        new_size = self._check_size(new_size)
        old_size = self._check_size(old_size)
        if old_size > new_size:
            raise ValueError(f"old size {old_size} exceeds new size {new_size}")
        if old_size in (0, new_size):
            return []
        blocks: dict[int, Sequence[bytes]] = {}
        proof: list[bytes] = []
        start, end, m, whole = 0, new_size, old_size, True  # SUBPROOF(m, D[start:end], whole)
        while end - start != m:
            k = _split(end - start)
            if m <= k:
                proof.append(self._range_hash(start + k, end, blocks))
                end = start + k
            else:
                proof.append(self._range_hash(start, start + k, blocks))
                start, m, whole = start + k, m - k, False
        if not whole:  # the old head is not a node of the new tree: give the subtree it ends in
            proof.append(self._range_hash(start, end, blocks))
        proof.reverse()
        return proof

    def _check_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self._size:
            raise ValueError(f"tree size {size!r} outside 0..{self._size}")
        return size

    def _range_hash(self, start: int, end: int, blocks: dict[int, Sequence[bytes]]) -> bytes:
        """MTH(D[start:end]) for a range of RFC shape (start a multiple of the power of two at or
        above its length) within the current size. `blocks` memoises leaf reads for one proof."""
        n = end - start
        k = n.bit_length() - 1
        if n == 1 << k and k >= self._cache_level:
            offset = (start >> k) * HASH_SIZE
            return bytes(self._levels[k - self._cache_level][offset:offset + HASH_SIZE])
        if n <= self._block:
            first = start - start % self._block
            leaves = blocks.get(first)
            if leaves is None:
                leaves = blocks[first] = self._fetch(first, min(first + self._block, self._size))
            return root_of(leaves[start - first:end - first])
        k = _split(n)
        return node_hash(self._range_hash(start, start + k, blocks), self._range_hash(start + k, end, blocks))

    def _fetch(self, start: int, end: int) -> Sequence[bytes]:
        hashes = self._leaves.hash_range(start, end)
        if len(hashes) != end - start:
            raise LedgerError(f"leaf store returned {len(hashes)} hashes for [{start}, {end})")
        return hashes


# -- verifiers (pure) -------------------------------------------------------------------------------

def verify_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Raise `InvalidProof` unless `proof` shows the leaf at `index` in the tree of `size` leaves
    whose head is `root` (RFC 9162 §2.1.3.2)."""
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root", root)
    _check_count("leaf index", index)
    _check_count("tree size", size)
    _check_proof(proof)
    if index >= size:
        raise InvalidProof(f"leaf index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise InvalidProof("inclusion proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            r = _sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("inclusion proof is shorter than the path to the root")
    if r != root:
        raise InvalidProof(f"inclusion proof of leaf {index} does not lead to the root of tree size {size}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Raise `InvalidProof` unless `proof` shows the tree (`old_size`, `old_root`) is a prefix of
    (`new_size`, `new_root`) (RFC 9162 §2.1.4.2, whose algorithm assumes 0 < old < new; the cases
    around it are decided here: equal sizes need equal roots and an empty proof, and the empty tree,
    whose head must be `EMPTY_ROOT`, is a prefix of every tree with an empty proof)."""
    _check_count("old size", old_size)
    _check_count("new size", new_size)
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    if old_size > new_size:
        raise InvalidProof(f"old size {old_size} exceeds new size {new_size}: the log would have shrunk")
    for size, root, which in ((old_size, old_root, "old"), (new_size, new_root, "new")):
        if size == 0 and root != EMPTY_ROOT:
            raise InvalidProof(f"the {which} root is not the empty tree's, yet its size is 0")
    if old_size == new_size or old_size == 0:
        if proof:
            raise InvalidProof(f"a consistency proof from size {old_size} to {new_size} is empty")
        if old_size == new_size and old_root != new_root:
            raise InvalidProof(f"two different roots for tree size {old_size}: the log forked")
        return
    if not proof:
        raise InvalidProof("empty consistency proof between different sizes")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # the old tree is a complete subtree: its head starts the path
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof("consistency proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            fr = _sha256(b"\x01" + c + fr).digest()
            sr = _sha256(b"\x01" + c + sr).digest()
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("consistency proof is shorter than the path to the root")
    if fr != old_root:
        raise InvalidProof(f"consistency proof does not rebuild the old root of size {old_size}")
    if sr != new_root:
        raise InvalidProof(f"consistency proof does not rebuild the new root of size {new_size}")


def _require_hash(value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ValueError(f"a leaf hash is {HASH_SIZE} bytes (use leaf_hash(data)), got {value!r:.80}")


def _check_hash(what: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvalidProof(f"{what} must be {HASH_SIZE} bytes")


def _check_count(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidProof(f"{what} must be a non-negative integer, got {value!r}")


def _check_proof(proof: Sequence[bytes]) -> None:
    if isinstance(proof, bytes | str) or len(proof) > MAX_PROOF_HASHES:
        raise InvalidProof(f"a proof is a list of at most {MAX_PROOF_HASHES} hashes")
    for i, h in enumerate(proof):
        _check_hash(f"proof hash {i}", h)
