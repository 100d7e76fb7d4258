"""The RFC 6962 / 9162 Merkle tree (ledger/merkle.py): published vectors, a from-the-definition
reference, property tests over random trees, and every corruption of a proof being refused.

An attacker here is a coordinator (or anyone relaying its answers) who wants a verifier to accept
an entry that is not in the signed tree, or a rewritten log as an extension of an old one: each
rejection test says what it tries."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.errors import LedgerError
from ledger.merkle import (
    EMPTY_ROOT,
    MAX_PROOF_HASHES,
    InvalidProof,
    LeafHashList,
    MerkleLog,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# -- published vectors ----------------------------------------------------------------------------
# From github.com/transparency-dev/merkle (Apache-2.0), the continuation of the certificate
# transparency reference tests: leaves and roots from testonly/constants.go (LeafInputs,
# RootHashes, NodeHashes); proofs from testonly/reference_test.go (TestRefInclusionProof,
# TestRefConsistencyProof) and proof/verify_test.go (inclusionProofs with 1-based leaf numbers there,
# 0-based indices here; consistencyProofs).
LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                     "606162636465666768696a6b6c6d6e6f")]
ROOTS = [bytes.fromhex(h) for h in (
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # size 0: SHA-256("")
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
)]
LEAF_HASHES = [bytes.fromhex(h) for h in (
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
)]
_H = {  # named node hashes of the vector tree: leaves 0..7 are h0..h7, "h01" is their parent, ...
    "h0": LEAF_HASHES[0], "h1": LEAF_HASHES[1], "h4": LEAF_HASHES[4], "h6": LEAF_HASHES[6],
    "h23": bytes.fromhex("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
    "h45": bytes.fromhex("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
    "h67": bytes.fromhex("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
    "h0123": bytes.fromhex("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
    "h4567": bytes.fromhex("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
    "h01": bytes.fromhex("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
}
INCLUSION_VECTORS = [  # (index, size, proof)
    (0, 1, []), (0, 2, ["h1"]), (1, 2, ["h0"]), (2, 3, ["h01"]), (1, 5, ["h0", "h23", "h4"]),
    (0, 8, ["h1", "h23", "h4567"]), (5, 8, ["h4", "h67", "h0123"]),
]
CONSISTENCY_VECTORS = [  # (old size, new size, proof)
    (1, 1, []), (1, 8, ["h1", "h23", "h4567"]), (2, 5, ["h23", "h4"]), (6, 8, ["h45", "h67", "h0123"]),
    (6, 7, ["h45", "h6", "h0123"]),
]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")



def vector_log(cache_level: int) -> MerkleLog:
    log = MerkleLog(cache_level=cache_level)
    for data in LEAVES:
        log.append_data(data)
    return log


# -- reference: RFC 9162 §2.1 written out as recursion over lists, no caching ----------------------

def ref_root(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1 << ((len(hashes) - 1).bit_length() - 1)
    return node_hash(ref_root(hashes[:k]), ref_root(hashes[k:]))


def ref_path(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    if len(hashes) == 1:
        return []
    k = 1 << ((len(hashes) - 1).bit_length() - 1)
    if m < k:
        return [*ref_path(m, hashes[:k]), ref_root(hashes[k:])]
    return [*ref_path(m - k, hashes[k:]), ref_root(hashes[:k])]


def ref_subproof(m: int, hashes: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if whole else [ref_root(hashes)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*ref_subproof(m, hashes[:k], whole), ref_root(hashes[k:])]
    return [*ref_subproof(m - k, hashes[k:], False), ref_root(hashes[:k])]


def ref_proof(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    return [] if m in (0, len(hashes)) else ref_subproof(m, hashes, True)


def hashes_for(n: int) -> list[bytes]:
    return [leaf_hash(b"entry %d" % i) for i in range(n)]


# -- vectors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_level", [0, 1, 2, 6])
def test_roots_match_published_vectors(cache_level: int) -> None:
    log = vector_log(cache_level)
    assert [leaf_hash(d) for d in LEAVES] == LEAF_HASHES
    assert [log.root(size) for size in range(9)] == ROOTS
    assert [root_of(LEAF_HASHES[:size]) for size in range(9)] == ROOTS
    assert EMPTY_ROOT == hashlib.sha256(b"").digest() == ROOTS[0]


def test_reference_agrees_with_vectors() -> None:
    for index, size, names in INCLUSION_VECTORS:
        assert ref_path(index, LEAF_HASHES[:size]) == [_H[n] for n in names]
    for old, new, names in CONSISTENCY_VECTORS:
        assert ref_proof(old, LEAF_HASHES[:new]) == [_H[n] for n in names]


@pytest.mark.parametrize("cache_level", [0, 1, 2, 6])
def test_generated_proofs_match_published_vectors(cache_level: int) -> None:
    log = vector_log(cache_level)
    for index, size, names in INCLUSION_VECTORS:
        proof = [_H[n] for n in names]
        assert log.inclusion_proof(index, size) == proof
        verify_inclusion(LEAF_HASHES[index], index, size, proof, ROOTS[size])
    for old, new, names in CONSISTENCY_VECTORS:
        proof = [_H[n] for n in names]
        assert log.consistency_proof(old, new) == proof
        verify_consistency(old, new, ROOTS[old], ROOTS[new], proof)


# -- corruptions (after corruptInclusionProof / corruptConsistencyProof in verify_test.go) ---------

Probe = tuple[str, tuple[object, ...]]


def flip(proof: Sequence[bytes], i: int, mask: int = 8) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ mask]) + out[i][1:]
    return out


def inclusion_probes(index: int, size: int, proof: list[bytes], root: bytes, leaf: bytes) -> list[Probe]:
    # Attack: make a verifier accept `leaf` somewhere it is not, or something else at `index`.
    probes: list[Probe] = [
        ("index - 1", (leaf, index - 1, size, proof, root)),
        ("index + 1", (leaf, index + 1, size, proof, root)),
        ("index ^ 2", (leaf, index ^ 2, size, proof, root)),
        ("size * 2", (leaf, index, size * 2, proof, root)),
        ("size // 2", (leaf, index, size // 2, proof, root)),
        ("wrong leaf", (leaf_hash(b"WrongLeaf"), index, size, proof, root)),
        ("empty root", (leaf, index, size, proof, EMPTY_ROOT)),
        ("random root", (leaf, index, size, proof, SOME_HASH)),
        ("trailing garbage", (leaf, index, size, [*proof, b""], root)),
        ("trailing root", (leaf, index, size, [*proof, root], root)),
        ("preceding garbage", (leaf, index, size, [b"", *proof], root)),
        ("preceding root", (leaf, index, size, [root, *proof], root)),
        ("short leaf hash", (leaf[:31], index, size, proof, root)),
        ("bool index", (leaf, bool(index), size, proof, root)),  # True == 1, yet no index
    ]
    probes += [(f"proof[{i}] bit 3 flipped", (leaf, index, size, flip(proof, i), root)) for i in range(len(proof))]
    if proof:
        probes.append(("removed component", (leaf, index, size, proof[:-1], root)))
    if len(proof) > 1:
        probes.append(("inserted component", (leaf, index, size, [proof[0], SOME_HASH, *proof[1:]], root)))
    return probes


def consistency_probes(old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> list[Probe]:
    # Attack: pass off a rewritten log (other roots) or other sizes as an extension of the old head.
    probes: list[Probe] = [
        ("old - 1", (old - 1, new, old_root, new_root, proof)),
        ("old + 1", (old + 1, new, old_root, new_root, proof)),
        ("old ^ 2", (old ^ 2, new, old_root, new_root, proof)),
        ("new * 2", (old, new * 2, old_root, new_root, proof)),
        ("new // 2", (old, new // 2, old_root, new_root, proof)),
        ("wrong old root", (old, new, SOME_HASH, new_root, proof)),
        ("wrong new root", (old, new, old_root, SOME_HASH, proof)),
        ("swapped roots", (old, new, new_root, old_root, proof)),
        ("empty proof", (old, new, old_root, new_root, [])),
        ("trailing garbage", (old, new, old_root, new_root, [*proof, b""])),
        ("trailing old root", (old, new, old_root, new_root, [*proof, old_root])),
        ("trailing new root", (old, new, old_root, new_root, [*proof, new_root])),
        ("preceding garbage", (old, new, old_root, new_root, [b"", *proof])),
        ("preceding old root", (old, new, old_root, new_root, [old_root, *proof])),
        ("preceding new root", (old, new, old_root, new_root, [new_root, *proof])),
        ("preceding proof[0]", (old, new, old_root, new_root, [proof[0], *proof])),
        ("truncated", (old, new, old_root, new_root, proof[:-1])),
    ]
    probes += [(f"proof[{i}] bit 4 flipped", (old, new, old_root, new_root, flip(proof, i, 16)))
               for i in range(len(proof))]
    return probes


def assert_all_rejected(verifier: object, probes: list[Probe]) -> None:
    accepted = []
    for desc, args in probes:
        try:
            verifier(*args)  # type: ignore[operator]
        except InvalidProof:
            continue
        accepted.append(desc)
    assert accepted == [], f"accepted corrupted proofs: {accepted}"


def test_corrupted_vector_proofs_are_rejected() -> None:
    for index, size, names in INCLUSION_VECTORS:
        assert_all_rejected(verify_inclusion, inclusion_probes(index, size, [_H[n] for n in names], ROOTS[size],
                                                               LEAF_HASHES[index]))
    for old, new, names in CONSISTENCY_VECTORS:
        if old == new:
            continue
        assert_all_rejected(verify_consistency, consistency_probes(old, new, ROOTS[old], ROOTS[new],
                                                                   [_H[n] for n in names]))


def test_single_leaf_tree() -> None:
    # Root and leaf hash of a 1-leaf tree are the same and the proof is empty (verify_test.go).
    h = leaf_hash(b"data")
    verify_inclusion(h, 0, 1, [], h)
    for leaf, root in ((h, b""), (b"", h), (b"", b"")):
        with pytest.raises(InvalidProof):
            verify_inclusion(leaf, 0, 1, [], root)


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 0), (2, 1), (1, 1), (-1, 1)])
def test_inclusion_outside_the_tree_is_rejected(index: int, size: int) -> None:
    # Attack: a "proof" for a leaf past the end of the tree, or in the empty tree.
    for leaf, root in ((SOME_HASH, b""), (b"", EMPTY_ROOT), (SOME_HASH, EMPTY_ROOT), (SOME_HASH, SOME_HASH)):
        with pytest.raises(InvalidProof):
            verify_inclusion(leaf, index, size, [], root)


@pytest.mark.parametrize(("old", "new", "old_root", "new_root", "proof", "ok"), [
    # equal sizes: one root, empty proof
    (0, 0, EMPTY_ROOT, EMPTY_ROOT, [], True),
    (1, 1, SOME_HASH, SOME_HASH, [], True),
    (1, 1, EMPTY_ROOT, SOME_HASH, [], False),  # attack: two heads for one size (a fork)
    (1, 1, SOME_HASH, SOME_HASH, [EMPTY_ROOT], False),
    (0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT], False),
    # the empty tree is a prefix of any tree; its head must be the empty hash (stricter than
    # transparency-dev, which ignores root1 when size1 is 0)
    (0, 1, EMPTY_ROOT, SOME_HASH, [], True),
    (0, 1, SOME_HASH, SOME_HASH, [], False),
    (0, 1, EMPTY_ROOT, SOME_HASH, [EMPTY_ROOT], False),
    (0, 0, SOME_HASH, SOME_HASH, [], False),
    (1, 0, SOME_HASH, EMPTY_ROOT, [], False),  # attack: the log shrank ("time travel to the past")
    (2, 1, SOME_HASH, SOME_HASH, [], False),
    (1, 2, SOME_HASH, EMPTY_ROOT, [], False),  # growing needs a proof
    (-1, 1, SOME_HASH, SOME_HASH, [], False),
    (True, 1, SOME_HASH, SOME_HASH, [], False),
    (1, 1, SOME_HASH[:31], SOME_HASH[:31], [], False),
])
def test_consistency_edge_cases(old: int, new: int, old_root: bytes, new_root: bytes, proof: list[bytes],
                                ok: bool) -> None:
    if ok:
        verify_consistency(old, new, old_root, new_root, proof)
    else:
        with pytest.raises(InvalidProof):
            verify_consistency(old, new, old_root, new_root, proof)


def test_oversized_and_ill_typed_proofs_are_refused_before_hashing() -> None:
    # Attack: a proof of a million hashes to make the verifier spin, or bytes posing as a list.
    log = vector_log(6)
    with pytest.raises(InvalidProof, match="at most"):
        verify_inclusion(LEAF_HASHES[0], 0, 8, [SOME_HASH] * (MAX_PROOF_HASHES + 1), ROOTS[8])
    with pytest.raises(InvalidProof):
        verify_inclusion(LEAF_HASHES[0], 0, 8, b"".join(log.inclusion_proof(0)), ROOTS[8])  # type: ignore[arg-type]
    with pytest.raises(InvalidProof):
        verify_consistency(1, 8, ROOTS[1], ROOTS[8], [h.hex() for h in log.consistency_proof(1)])  # type: ignore[misc]


# -- against the reference, exhaustively for small trees and by hypothesis up to 300 leaves -------

@pytest.mark.parametrize("cache_level", [0, 1, 3, 6])
def test_every_proof_of_small_trees_matches_the_reference(cache_level: int) -> None:
    hashes = hashes_for(40)
    log = MerkleLog(LeafHashList(hashes), cache_level=cache_level)
    for size in range(41):
        assert log.root(size) == ref_root(hashes[:size])
        for index in range(size):
            assert log.inclusion_proof(index, size) == ref_path(index, hashes[:size])
        for old in range(size + 1):
            assert log.consistency_proof(old, size) == ref_proof(old, hashes[:size])


BIG = 300
BIG_HASHES = hashes_for(BIG)
BIG_LOGS = {level: MerkleLog(LeafHashList(BIG_HASHES), cache_level=level) for level in (0, 2, 6)}


@st.composite
def tree_and_index(draw: st.DrawFn) -> tuple[int, int, int]:
    size = draw(st.integers(1, BIG))
    return draw(st.sampled_from(sorted(BIG_LOGS))), size, draw(st.integers(0, size - 1))


@settings(max_examples=300, deadline=None)
@given(tree_and_index())
def test_every_inclusion_proof_verifies_and_every_corruption_fails(case: tuple[int, int, int]) -> None:
    level, size, index = case
    log = BIG_LOGS[level]
    proof = log.inclusion_proof(index, size)
    root = log.root(size)
    assert proof == ref_path(index, BIG_HASHES[:size])
    assert root == ref_root(BIG_HASHES[:size])
    assert len(proof) <= math.ceil(math.log2(size)) if size > 1 else proof == []
    verify_inclusion(BIG_HASHES[index], index, size, proof, root)
    # Attack: show this proof for another position, or for another signed size (with that size's
    # own root, as a signed checkpoint would pair them), or for a neighbouring entry.
    probes = [(d, a) for d, a in inclusion_probes(index, size, proof, root, BIG_HASHES[index])
              if d not in ("size * 2", "size // 2", "index - 1", "index + 1", "index ^ 2")]
    for other in {size - 1, size + 1, size * 2, size // 2} - {size}:
        if index < other <= BIG:
            probes.append((f"size {other} with its root", (BIG_HASHES[index], index, other, proof,
                                                             BIG_LOGS[6].root(other))))
    for other in {index - 1, index + 1, index ^ 2, index ^ 1} - {index}:
        if 0 <= other < size:
            probes.append((f"index {other}", (BIG_HASHES[index], other, size, proof, root)))
            probes.append((f"leaf {other} at index {index}", (BIG_HASHES[other], index, size, proof, root)))
    assert_all_rejected(verify_inclusion, probes)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 2, 6]), st.integers(1, BIG), st.data())
def test_every_consistency_proof_verifies_and_every_corruption_fails(level: int, new: int, data: st.DataObject) -> None:
    old = data.draw(st.integers(0, new))
    log = BIG_LOGS[level]
    proof = log.consistency_proof(old, new)
    assert proof == ref_proof(old, BIG_HASHES[:new])
    assert len(proof) <= math.ceil(math.log2(new)) + 1
    old_root, new_root = log.root(old), log.root(new)
    verify_consistency(old, new, old_root, new_root, proof)
    if not proof:
        return
    probes = [(d, a) for d, a in consistency_probes(old, new, old_root, new_root, proof)
              if d not in ("old - 1", "old + 1", "old ^ 2", "new * 2", "new // 2")]
    # Attack: the same proof for other sizes, each with its own (genuinely signed) root.
    for o, n in {(old - 1, new), (old + 1, new), (old ^ 2, new), (old, new + 1), (old, new - 1), (old, new * 2)}:
        if 0 <= o <= n <= BIG and (o, n) != (old, new):
            probes.append((f"sizes {o}->{n} with their roots", (o, n, log.root(o), log.root(n), proof)))
    # Attack: a log with one entry rewritten below `old` is no extension of the old head.
    edited = list(BIG_HASHES[:new])
    edited[data.draw(st.integers(0, old - 1))] = SOME_HASH
    probes.append(("rewritten history", (old, new, old_root, ref_root(edited), proof)))
    assert_all_rejected(verify_consistency, probes)


# -- the log itself -------------------------------------------------------------------------------

class ReadOnlyStore:
    """A `LeafHashes` someone else appends to, as a database table would be."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []
        self.reads = 0

    def __len__(self) -> int:
        return len(self.hashes)

    def hash_range(self, start: int, end: int) -> list[bytes]:
        self.reads += 1
        return self.hashes[start:end]


def test_log_over_a_store_catches_up_with_sync() -> None:
    store = ReadOnlyStore()
    store.hashes = hashes_for(100)
    log = MerkleLog(store)
    assert log.size == 100 and log.root() == ref_root(store.hashes)
    store.hashes += hashes_for(150)[100:]
    assert log.sync() == 50
    assert log.root() == ref_root(store.hashes) and log.root(100) == ref_root(store.hashes[:100])
    with pytest.raises(TypeError, match="read-only"):
        log.append(SOME_HASH)
    store.reads = 0
    assert log.inclusion_proof(77, 149) == ref_path(77, store.hashes[:149])
    assert store.reads <= 2  # the index's block and the right edge's: the cache covers the rest


def test_a_shrunk_or_corrupt_store_is_refused() -> None:
    # Attack: entries deleted from the database under a running coordinator.
    store = ReadOnlyStore()
    store.hashes = hashes_for(10)
    log = MerkleLog(store)
    store.hashes = store.hashes[:9]
    with pytest.raises(LedgerError, match="shrank"):
        log.sync()
    store.hashes = [*hashes_for(10), b"short"]
    with pytest.raises(LedgerError, match="malformed"):
        log.sync()


def test_append_checks_its_input_and_sizes() -> None:
    log = MerkleLog()
    assert log.root() == EMPTY_ROOT
    with pytest.raises(ValueError, match="32 bytes"):
        log.append(b"not a hash")
    assert log.append_data(b"a") == 0 and log.append(leaf_hash(b"b")) == 1
    assert log.leaf_hash_at(1) == leaf_hash(b"b")
    for bad in ((0, 3), (2, 2), (-1, 2), (True, 2)):
        with pytest.raises(ValueError):
            log.inclusion_proof(*bad)
    for old, new in ((3, 2), (2, 1), (-1, 2)):
        with pytest.raises(ValueError):
            log.consistency_proof(old, new)
    with pytest.raises(ValueError):
        MerkleLog(cache_level=33)
