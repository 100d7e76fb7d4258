"""Merkle tree figures of issue 11 ("Speed"): the pure core in memory, no database.

    python benchmarks/bench_merkle.py [--leaves 1000000] [--proofs 20000] [--seed 1]

Builds a log of `--leaves` ledger entries (real `Credit.leaf_bytes()`), then measures:
- append: leaf hash + `MerkleLog.append` (frontier and subtree cache kept up to date), leaves/s;
- inclusion proofs at random indices against the full size: generation and verification rates,
  and their length (the goal at 1,000,000 is at most 20 hashes);
- consistency proofs from random old sizes to the full size: generation and verification rates
  and their length;
- full-log recomputation, what `ledger verify` does from outside: the leaf bytes of every entry
  rebuilt from the records, hashed and folded into the root (goal: at least 100,000 entries/s);
  also the hashing alone, from leaf bytes;
- the coordinator's notary (ledger/notary.py): append with proofs (entries absorbed in commits of
  `--batch`, a signed checkpoint per commit and an inclusion proof for each entry against it, as
  receipts need) and the full-tree rebuild from entries (what a coordinator does at start), in
  memory; and, with `--sqlite`, the rebuild paged from a real SQLite coordinator database
  (coordinator/ledger_notary.py, 10,000 entries a page); and the tree's memory (tracemalloc).
Prints a markdown table. Single-threaded; takes a minute or two on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger.entries import Credit, Entry  # noqa: E402
from ledger.merkle import MerkleLog, leaf_hash, root_of, verify_consistency, verify_inclusion  # noqa: E402
from ledger.notary import Notary  # noqa: E402
from protocol.signing import Identity  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--proofs", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1000, help="entries per commit for append with proofs")
    parser.add_argument("--sqlite", action="store_true", help="also rebuild the tree from a SQLite coordinator db")
    parser.add_argument("--stores", default="", help="comma-separated: sqlite,postgresql - append with proofs "
                        "through a real ledger store (PostgreSQL: a fresh schema at 127.0.0.1:5432/test)")
    parser.add_argument("--store-entries", type=int, default=100_000, help="entries appended per store")
    args = parser.parse_args()
    n, rng = args.leaves, random.Random(args.seed)

    records = [Credit(node=f"node{i % 500:04d}", owner=f"owner{i % 97}", job=f"job{i // 1000}", task=f"task{i}",
                      amount=800 + i % 100, result_digest=f"{i:064x}", created_at=1_767_225_600.0 + i / 100,
                      ref=f"lease{i}") for i in range(n)]
    leaves = [r.leaf_bytes() for r in records]
    rows: list[tuple[str, str]] = []

    log = MerkleLog()
    t = timed(lambda: [log.append(leaf_hash(b)) for b in leaves])
    root = log.root()
    rows.append((f"append {n:,} leaves (leaf hash + append)", f"{n / t:,.0f} leaves/s"))

    indices = [rng.randrange(n) for _ in range(args.proofs)]
    proofs: list[list[bytes]] = []
    t = timed(lambda: proofs.extend(log.inclusion_proof(i) for i in indices))
    rows.append(("inclusion proof generation", f"{len(indices) / t:,.0f} proofs/s"))
    hashes = [leaf_hash(leaves[i]) for i in indices]
    t = timed(lambda: [verify_inclusion(h, i, n, p, root) for h, i, p in zip(hashes, indices, proofs, strict=True)])
    rows.append(("inclusion proof verification", f"{len(indices) / t:,.0f} proofs/s"))
    worst = max(len(p) for p in proofs)
    rows.append((f"inclusion proof size at {n:,}", f"max {worst}, mean {sum(map(len, proofs)) / len(proofs):.1f}"
                 f" hashes (ceil(log2 n) = {math.ceil(math.log2(n))})"))
    assert worst <= math.ceil(math.log2(n)), worst

    olds = [rng.randrange(1, n) for _ in range(args.proofs // 4)]
    cproofs: list[list[bytes]] = []
    t = timed(lambda: cproofs.extend(log.consistency_proof(m) for m in olds))
    rows.append(("consistency proof generation (random old size)", f"{len(olds) / t:,.0f} proofs/s"))
    old_roots = [log.root(m) for m in olds]
    t = timed(lambda: [verify_consistency(m, n, r, root, p) for m, r, p in zip(olds, old_roots, cproofs, strict=True)])
    rows.append(("consistency proof verification", f"{len(olds) / t:,.0f} proofs/s"))
    rows.append((f"consistency proof size to {n:,}", f"max {max(map(len, cproofs))}, "
                 f"mean {sum(map(len, cproofs)) / len(cproofs):.1f} hashes"))
    t = timed(lambda: [log.root(m) for m in olds])
    rows.append(("root at a past size", f"{len(olds) / t:,.0f} roots/s"))

    recomputed: list[bytes] = []
    t = timed(lambda: recomputed.append(root_of(leaf_hash(r.leaf_bytes()) for r in records)))
    assert recomputed[0] == root
    rows.append(("full-log recomputation from records (leaf bytes + hash + root)", f"{n / t:,.0f} entries/s"))
    t = timed(lambda: recomputed.append(root_of(leaf_hash(b) for b in leaves)))
    assert recomputed[1] == root
    rows.append(("full-log recomputation from leaf bytes (hash + root)", f"{n / t:,.0f} entries/s"))

    entries = [Entry(i + 1, r) for i, r in enumerate(records)]
    identity = Identity.generate()
    rows.append(append_with_proofs(entries, identity, args.batch))
    notary = Notary(identity)
    t = timed(lambda: notary.absorb(entries))
    assert notary.root() == root
    rows.append((f"notary rebuild from {n:,} entries in memory (leaf bytes + hash + tree)", f"{n / t:,.0f} entries/s"))
    rows.append(tree_memory(entries, identity))
    if args.sqlite:
        rows.extend(asyncio.run(rebuild_from_sqlite(records, identity, root)))
    for kind in filter(None, args.stores.split(",")):
        rows.append(asyncio.run(append_through_store(kind, records[:args.store_entries], identity, args.batch)))

    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


def append_with_proofs(entries: list[Entry], identity: Identity, batch: int) -> tuple[str, str]:
    """Commits of `batch` entries: absorb, sign a checkpoint, an inclusion proof for each entry."""
    notary = Notary(identity)

    def run() -> None:
        for start in range(0, len(entries), batch):
            page = entries[start:start + batch]
            notary.absorb(page)
            cp = notary.sign(1_767_225_600_000 + start)
            for e in page:
                notary.inclusion_proof(e.seq, cp.size)

    t = timed(run)
    return (f"notary append with proofs (commits of {batch:,}: absorb, sign, a proof per entry)",
            f"{len(entries) / t:,.0f} entries/s")


async def append_through_store(kind: str, records: list[Credit], identity: Identity,
                               batch: int) -> tuple[str, str]:
    """What the coordinator does, through a real database: each commit appends `batch` entries in
    one transaction; the notary reads them back, absorbs them, signs a checkpoint, and an inclusion
    proof is made for each entry (a receipt)."""
    from ledger.factory import open_ledger

    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sqlite":
            url, schema = f"sqlite:///{Path(tmp) / 'ledger.db'}", None
        elif kind == "postgresql":
            import asyncpg

            schema = f"bench_{random.randrange(16**8):08x}"
            admin = "postgresql://postgres@127.0.0.1:5432/test"
            conn = await asyncpg.connect(admin)
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.close()
            url = f"{admin}?options=-csearch_path%3D{schema}"
        else:
            raise SystemExit(f"--stores: unknown store {kind!r} (sqlite, postgresql)")
        store = open_ledger(url)
        notary = Notary(identity)
        try:
            t0 = time.perf_counter()
            for start in range(0, len(records), batch):
                await store.append(records[start:start + batch])
                page = await store.entries(notary.size, batch)
                notary.absorb(page)
                cp = notary.sign(1_767_225_600_000 + start)
                for e in page:
                    notary.inclusion_proof(e.seq, cp.size)
            t = time.perf_counter() - t0
        finally:
            await store.close()
            if schema is not None:
                conn = await asyncpg.connect(admin)
                await conn.execute(f"DROP SCHEMA {schema} CASCADE")
                await conn.close()
    n = len(records)
    return (f"append with proofs through {kind} ({n:,} entries, commits of {batch:,})", f"{n / t:,.0f} entries/s")


async def rebuild_from_sqlite(records: list[Credit], identity: Identity, root: bytes) -> list[tuple[str, str]]:
    """The coordinator's start: every entry paged out of a real SQLite database into the tree."""
    import sqlite3

    from coordinator.ledger_notary import LedgerNotary
    from coordinator.store_factory import open_store
    from ledger import sqlite as ledger_sql

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "coordinator.db"
        store = open_store(f"sqlite:///{path}")
        await store.close()  # creates the schema
        with sqlite3.connect(path) as conn:
            for start in range(0, len(records), 100_000):
                ledger_sql.insert_entries(conn, records[start:start + 100_000])
        store = open_store(f"sqlite:///{path}")
        try:
            adapter = LedgerNotary(store, identity)
            t0 = time.perf_counter()
            await adapter.open()
            t = time.perf_counter() - t0
            assert adapter.notary.root() == root
        finally:
            await store.close()
    n = len(records)
    return [(f"coordinator start: rebuild from SQLite, {n:,} entries (paged read + tree)", f"{n / t:,.0f} entries/s")]


def tree_memory(entries: list[Entry], identity: Identity) -> tuple[str, str]:
    """What the notary's tree holds once built: the entries exist already, so the rest is the tree."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        notary = Notary(identity)
        notary.absorb(entries)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return f"notary tree memory at {len(entries):,} entries (tracemalloc)", f"{held / 2**20:,.1f} MiB"


if __name__ == "__main__":
    main()
