"""Full-ledger verification rate from outside (issue 11, "Speed": goal at least 100,000 entries/s).

    python benchmarks/bench_ledger_verify.py [--tasks 100000] [--remembered 8]

Builds the documents `sparecycles ledger verify` holds after fetching a snapshot: a grant, then
per task two credits and one charge (so 3 * tasks + 1 entries), as JSON dicts like the coordinator
serves them; the accepted rows (with the cost model's inputs); the balances; a signed checkpoint;
`--remembered` older checkpoints with their consistency proofs; and one receipt per 1,000 credits.
Then, after `gc.freeze()` as the CLI does, times `ledger.outside.check` (the pure part: parse
every entry once, rebuild its leaf bytes, hash, fold the tree, check history and receipts, then
`find_discrepancies` on the parsed entries), and each stage alone; and, for comparison, the careful
path a malformed entry takes (`record_from_json`). No network and no JSON decoding: those are the
fetch, not the check. Single-threaded. The first line includes importing `ledger.credit` (onnx,
~0.15-0.25 s once) for the cost model, as a `ledger verify` run pays it.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ledger.checkpoint import make_receipt, sign_checkpoint  # noqa: E402
from ledger.entries import Charge, Credit, Entry, Grant, LedgerRecord, balances_of, record_from_json  # noqa: E402
from ledger.merkle import MerkleLog, leaf_hash  # noqa: E402
from ledger.outside import Evidence, _leaf_hashes, check, prefix_roots  # noqa: E402
from ledger.verify import collector_paused, find_discrepancies, parse_entries  # noqa: E402
from protocol.signing import Identity  # noqa: E402

FLOPS, ROWS, AMOUNT = 13_000, 64, 832


def build(tasks: int) -> list[LedgerRecord]:
    out: list[LedgerRecord] = [Grant(account="dave", amount=10**15, key="start:dave", memo="", created_at=1.0)]
    for t in range(tasks):
        credits = [Credit(node=f"node{(2 * t + k) % 500:04d}", owner=f"owner{(2 * t + k) % 97}", job=f"job{t // 1000}",
                          task=f"task{t}", amount=AMOUNT, result_digest=f"{t:064x}",
                          created_at=1_767_225_600.0 + t / 100, ref=f"lease{t}-{k}") for k in range(2)]
        out += [*credits, Charge(account="dave", job=f"job{t // 1000}", task=f"task{t}", amount=2 * AMOUNT,
                                 created_at=1_767_225_600.0 + t / 100, ref=credits[0].ref)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--remembered", type=int, default=8)
    args = parser.parse_args()

    identity = Identity.generate()
    recs = build(args.tasks)
    entries = [Entry(seq, r) for seq, r in enumerate(recs, start=1)]
    docs = [e.to_json() for e in entries]
    accepted = [{"seq": e.seq, "task": r.task, "job": r.job, "node": r.node, "owner": r.owner,
                 "output_digest": r.result_digest, "task_state": "verified", "submitter": "dave",
                 "verdict_seq": e.seq + 1, "flops_per_row": FLOPS, "rows": ROWS}
                for e in entries if isinstance(r := e.record, Credit)]
    balances = balances_of(entries).to_json()
    log = MerkleLog()
    for r in recs:
        log.append(leaf_hash(r.leaf_bytes()))
    n = log.size

    def sign(size: int) -> object:
        return sign_checkpoint(identity, size=size, root=log.root(size), timestamp_ms=1_767_225_600_000 + size)

    newest = sign_checkpoint(identity, size=n, root=log.root(), timestamp_ms=1_767_225_700_000)
    remembered = [sign_checkpoint(identity, size=m, root=log.root(m), timestamp_ms=1_767_225_600_000 + m)
                  for m in (n * (i + 1) // (args.remembered + 1) for i in range(args.remembered))]
    receipts = [make_receipt(log, recs[i].leaf_bytes(), i, remembered[-1] if remembered else newest)
                for i in range(1, (remembered[-1].size if remembered else n), 3000)]
    proofs = {m.size: log.consistency_proof(m.size) for m in remembered}
    proofs |= {r.checkpoint.size: log.consistency_proof(r.checkpoint.size) for r in receipts}
    evidence = Evidence(checkpoint=newest, public_key=identity.public_key, entries=docs, accepted=accepted,
                        balances=balances, remembered=remembered, consistency=proofs, receipts=receipts)

    gc.freeze()  # as `ledger verify` does once the documents are fetched: no collector passes over them
    t0 = time.perf_counter()
    problems = check(evidence)
    total = time.perf_counter() - t0
    assert problems == [], problems[:3]

    with collector_paused():  # as check runs them
        t0 = time.perf_counter()
        items = parse_entries(docs)
        parse = time.perf_counter() - t0
        t0 = time.perf_counter()
        leaves = _leaf_hashes(docs, items, n, [], None)
        hash_ = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefix_roots(leaves, [n])
        fold = time.perf_counter() - t0
        t0 = time.perf_counter()
        find_discrepancies(docs, accepted, balances, parsed=items)
        discrepancies = time.perf_counter() - t0
        t0 = time.perf_counter()
        careful = [leaf_hash(record_from_json(d).leaf_bytes()) for d in docs]
        careful_hash = time.perf_counter() - t0
    assert careful == leaves

    print(f"| {n:,} entries ({args.tasks:,} tasks), {len(remembered)} remembered checkpoints, "
          f"{len(receipts)} receipts | seconds | entries/s |")
    print("|---|---:|---:|")
    for name, seconds in (("ledger.outside.check, all of it (with the cost model's import)", total),
                          ("  parse the entries once (ledger.verify.parse_entries)", parse),
                          ("  leaf bytes + leaf hash (ledger.outside's fast path)", hash_),
                          ("  fold the tree (prefix_roots)", fold),
                          ("  find_discrepancies on the parsed entries (accepted results, cost model, balances)",
                           discrepancies),
                          ("  for comparison: record_from_json + leaf bytes + leaf hash (the careful path)",
                           careful_hash)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} |")


if __name__ == "__main__":
    main()
