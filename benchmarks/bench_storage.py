"""The storage figure of issue 9: the coordinator's SQLite database after 10,000 finished jobs, with
retention off and on.

    python benchmarks/bench_storage.py [--jobs 10000] [--rows 8] [--task-size 4] [--retain 1000] [--every 500]

Each job is what a submitter of scikit-learn's handwritten digits sends: `--rows` real 8x8 digits
(64 float32 features, each job's rows its own), split into tasks of `--task-size` rows, each task run
by two nodes of two owners (two leases, two results), verified on outputs stored as a classifier's
(an int64 label and ten float32 probabilities per row), two credits and a charge in the ledger, then
the job done. They go through the real store (`coordinator.sqlite_store.SQLiteStore`) with the ops
the engine writes, in group commits as the service does, on a clock that advances one second a job.

Retention on: every `--every` jobs the sweep the service runs (`finished_before` + `expire_jobs` +
`compact`) expires the jobs that finished more than `--retain` seconds (= jobs) before; at the end
one more sweep after every job has aged past it. Prints the file size (database + WAL) as jobs
accumulate, rows per table at the end, and checks the ledger (`ledger.verify`) in both cases.
Takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.jobs import JobOptions, plan_job  # noqa: E402
from coordinator.records import (  # noqa: E402
    BlobPut,
    JobFinished,
    LeaseClosed,
    LeaseIssued,
    LeaseRecord,
    Op,
    ResultRecorded,
    TaskDecided,
)
from coordinator.retention import expired_after  # noqa: E402
from coordinator.scheduler import JobState, TaskState  # noqa: E402
from coordinator.sqlite_store import SQLiteStore  # noqa: E402
from ledger.entries import Credit, charge_for  # noqa: E402
from ledger.verify import find_discrepancies  # noqa: E402
from protocol.tensors import digest_tensors, encode_tensor_map, tensors_from_arrays  # noqa: E402

META: dict[str, Any] = {
    "model": "d" * 64, "flops_per_row": 20_000,
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 64]}],
    "outputs": [{"name": "label", "dtype": "int64", "shape": ["N"]},
                {"name": "probabilities", "dtype": "float32", "shape": ["N", 10]}]}
TABLES = ("jobs", "tasks", "leases", "results", "blobs", "blob_refs", "uploads", "ledger_entries")
COMMIT_JOBS = 50  # jobs whose ops go in one group commit (the service commits whatever accumulated)


def digits() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
        return np.asarray(load_digits().data, dtype=np.float32)
    except ImportError:  # the same shape and range, if scikit-learn is not installed
        return np.random.default_rng(0).integers(0, 17, size=(1797, 64)).astype(np.float32)


def file_bytes(path: Path) -> tuple[int, int]:
    """The database file and its write-ahead log, in bytes."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def job_ops(job: Any, tasks: list[Any], x: np.ndarray, at: float) -> list[Op]:
    """What the engine writes for a job run by two owners and verified: leases, results, the
    accepted outputs, credits and a charge per task, then the finish."""
    ops: list[Op] = []
    jid = job.spec.id
    for t in tasks:
        rows = x[t.start:t.stop]
        logits = rows @ np.linspace(-1, 1, 640, dtype=np.float32).reshape(64, 10)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        outputs = tensors_from_arrays({"label": probs.argmax(axis=1).astype(np.int64),
                                       "probabilities": (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)})
        digest = digest_tensors(outputs)
        leases = (f"{t.id}-a", f"{t.id}-b")
        credits = []
        for lease, node in zip(leases, ("node-a", "node-b"), strict=True):
            ops += [LeaseIssued(LeaseRecord(id=lease, task=t.id, job=jid, node=node, owner=f"owner-{node}",
                                            issued_at=at, expires_at=at + 60, deadline=0.0)),
                    ResultRecorded(lease, t.id, node, f"owner-{node}", digest, None, at),
                    LeaseClosed(lease, "reported")]
            credits.append(Credit(node=node, owner=f"owner-{node}", job=jid, task=t.id, amount=t.rows,
                                  result_digest=digest, created_at=at, ref=lease))
        ops += [BlobPut(digest, encode_tensor_map(outputs)),
                TaskDecided(t.id, TaskState.VERIFIED, digest, None, leases, tuple(credits),
                            charge_for(tuple(credits), account="submitter", created_at=at))]
    return [*ops, JobFinished(jid, JobState.DONE, None, at)]


async def sweep(store: SQLiteStore, now: float, retain: float) -> int:
    """The service's sweep (Coordinator.expire_finished) on the store alone."""
    expired = 0
    while ids := await store.finished_before(now - retain, 500):
        expired += (await store.expire_jobs(ids, at=now, reason=expired_after(retain))).jobs
    await store.compact()
    return expired


async def run(path: Path, *, jobs: int, rows: int, task_size: int, retain: float | None,
              every: int) -> dict[str, Any]:
    store = SQLiteStore(str(path))
    data = digits()
    await store.grant("submitter", 10**12, key="start:submitter", memo="bench", created_at=0.0)
    sizes: list[tuple[int, tuple[int, int]]] = []
    pending: list[Op] = []
    started = time.perf_counter()
    for j in range(jobs):
        at = float(j + 1)
        picks = np.random.default_rng(j).integers(0, len(data), size=rows)
        x = data[picks] + np.float32(j % 7) / 16  # each job's rows its own, as different submitters' are
        job, tasks, blobs = plan_job(META, {"x": x}, JobOptions(replicas=2, task_size=task_size, max_results=None,
                                                                final="argmax", submitter="submitter"),
                                     now_wall=at, max_inline_bytes=1 << 20)
        await store.create_job(job, tasks, blobs)
        pending += job_ops(job, tasks, x, at)
        if (j + 1) % COMMIT_JOBS == 0:
            await store.apply(pending)
            pending = []
        if (j + 1) % every == 0:
            if retain is not None:
                await store.apply(pending)
                pending = []
                await sweep(store, at, retain)
            sizes.append((j + 1, file_bytes(path)))
    await store.apply(pending)
    seconds = time.perf_counter() - started
    if retain is not None:
        await sweep(store, float(jobs) + retain + 1, retain)  # every job has aged past the retention
    await store.close()  # checkpoints the WAL into the file
    with sqlite3.connect(path) as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        blob_bytes = db.execute("SELECT COALESCE(sum(length(data)), 0) FROM blobs").fetchone()[0]
        pages, free, page_size = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                  for p in ("page_count", "freelist_count", "page_size"))
    reopened = SQLiteStore(str(path))
    try:
        entries = [e.to_json() for e in await reopened.ledger_entries(0, 10**7)]
        accepted = await reopened.accepted(0, 10**7)
        verify = find_discrepancies(entries, accepted, (await reopened.ledger_balances()).to_json())
    finally:
        await reopened.close()
    return {"sizes": sizes, "final": file_bytes(path)[0], "counts": counts, "blob_bytes": blob_bytes,
            "pages": pages, "free": free, "page_size": page_size, "seconds": seconds, "verify": verify,
            "accepted": len(accepted)}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=8, help="digits per job")
    parser.add_argument("--task-size", type=int, default=4)
    parser.add_argument("--retain", type=float, default=1000.0, help="retention, in seconds = jobs finished")
    parser.add_argument("--every", type=int, default=500, help="jobs between sweeps (and size samples)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = asyncio.run(run(Path(tmp) / "off.db", jobs=args.jobs, rows=args.rows, task_size=args.task_size,
                              retain=None, every=args.every))
        on = asyncio.run(run(Path(tmp) / "on.db", jobs=args.jobs, rows=args.rows, task_size=args.task_size,
                             retain=args.retain, every=args.every))
    tasks = -(-args.rows // args.task_size)
    print(f"{args.jobs} finished jobs of {args.rows} digits (64 float32 each), {tasks} tasks of {args.task_size} "
          f"rows, 2 results and 2 credits per task; retention on = {args.retain:g} s (the last "
          f"{args.retain:g} jobs), swept every {args.every} jobs\n")
    print("| jobs finished | retention off: file + WAL | retention on: file + WAL |\n|---:|---:|---:|")
    for (n, a), (_, b) in zip(off["sizes"], on["sizes"], strict=True):
        if n % (args.every * 4) == 0 or n == args.every:
            print(f"| {n} | {mib(a[0])} + {mib(a[1])} | {mib(b[0])} + {mib(b[1])} |")
    print(f"| {args.jobs}, all past the retention, closed (WAL written back) | {mib(off['final'])} | "
          f"{mib(on['final'])} |")
    print("\n| rows at the end | retention off | retention on |\n|---|---:|---:|")
    for t in TABLES:
        print(f"| {t} | {off['counts'][t]} | {on['counts'][t]} |")
    print(f"| blob bytes | {mib(off['blob_bytes'])} | {mib(on['blob_bytes'])} |")
    for name, r in (("retention off", off), ("retention on", on)):
        print(f"\n{name}: {r['pages']} pages of {r['page_size']} B ({r['free']} free); "
              f"{args.jobs / r['seconds']:.0f} jobs/s stored; ledger verify over {r['accepted']} accepted results: "
              f"{'consistent' if not r['verify'] else r['verify'][:3]}")


if __name__ == "__main__":
    main()
