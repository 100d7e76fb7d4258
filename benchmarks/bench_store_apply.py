"""How fast each CoordinatorStore commits the engine's batches: `apply` rate on SQLite and PostgreSQL.

    python benchmarks/bench_store_apply.py [--tasks 20000] [--batch 500] [--pg postgresql://postgres@127.0.0.1:5432/test]

One job of `--tasks` tasks; each task is what the engine writes when two nodes of two owners run it:
two leases issued, two results recorded, two leases closed, the outputs' blob, and the verdict with
two credits and a charge - 10 ops, 3 ledger entries. Batches of `--batch` tasks (a group commit)
go through `apply`, one transaction each, as the service's persist loop sends them. PostgreSQL runs
in a schema of its own, dropped afterwards. Prints tasks/s and ops/s per store, the median of the
batches, side by side, and checks the ledger (`ledger.verify`) of each, also as of a size half-way
(`upto`: the snapshot must agree with itself). `cpu` is this process's CPU time per task (the SQLite
thread's work included, PostgreSQL's server not): steadier than wall time on a shared machine.

Issue 11 wrote tasks.verdict_seq in each verdict's transaction. Before and after, the two trees run
alternately three times on this (shared, loaded) 2-core machine, 20,000 tasks, median of the runs:
  before: sqlite 11,672 tasks/s, cpu 78 us/task; postgresql 5,823 tasks/s, cpu 43 us/task
  after:  sqlite 11,707 tasks/s, cpu 77 us/task; postgresql 5,825 tasks/s, cpu 41 us/task
(run to run, one tree's medians varied from 6,500 to 12,700 tasks/s on SQLite: other jobs' load).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import asyncpg
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.jobs import JobOptions, plan_job  # noqa: E402
from coordinator.records import (  # noqa: E402
    BlobPut,
    LeaseClosed,
    LeaseIssued,
    LeaseRecord,
    Op,
    ResultRecorded,
    TaskDecided,
    TaskRecord,
)
from coordinator.scheduler import TaskState  # noqa: E402
from coordinator.store import CoordinatorStore  # noqa: E402
from coordinator.store_factory import open_store  # noqa: E402
from ledger.entries import Credit, charge_for  # noqa: E402
from ledger.verify import find_discrepancies  # noqa: E402

META = {"model": "a" * 64, "flops_per_row": 10,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}]}
OPS_PER_TASK = 10


def task_ops(t: TaskRecord, i: int) -> list[Op]:
    digest = f"{i:064x}"
    leases = (f"{t.id}-1", f"{t.id}-2")
    ops: list[Op] = []
    for n, lid in enumerate(leases, 1):
        ops.append(LeaseIssued(LeaseRecord(id=lid, task=t.id, job=t.job, node=f"n{n}", owner=f"o{n}",
                                           issued_at=1.0, expires_at=100.0, deadline=0.0)))
    for n, lid in enumerate(leases, 1):
        ops.append(ResultRecorded(lid, t.id, f"n{n}", f"o{n}", digest, None, 2.0))
    ops += [LeaseClosed(lid, "reported") for lid in leases]
    ops.append(BlobPut(digest, b"outputs " + digest.encode()))
    credits = tuple(Credit(node=f"n{n}", owner=f"o{n}", job=t.job, task=t.id, amount=5, result_digest=digest,
                           created_at=2.0, ref=lid) for n, lid in enumerate(leases, 1))
    ops.append(TaskDecided(t.id, TaskState.VERIFIED, digest, None, leases, credits,
                           charge_for(credits, account="dave", created_at=2.0)))
    return ops


async def run(store: CoordinatorStore, tasks: int, batch: int) -> tuple[list[float], list[float]]:
    """Per batch: tasks/s (wall) and CPU microseconds per task in this process."""
    job, planned, blobs = plan_job(META, {"x": np.ones((tasks, 2), dtype=np.float32)},
                                   JobOptions(replicas=2, task_size=1, max_results=None, final="argmax",
                                              submitter="dave"), now_wall=1.0, max_inline_bytes=1 << 20)
    await store.create_job(job, planned, blobs)
    await store.grant("dave", 10**12, key="start:dave", memo="", created_at=1.0)
    rates, cpu = [], []
    for start in range(0, tasks, batch):
        ops = [op for i, t in enumerate(planned[start:start + batch], start) for op in task_ops(t, i)]
        began, began_cpu = time.perf_counter(), time.process_time()
        await store.apply(ops)
        n = len(ops) / OPS_PER_TASK
        rates.append(n / (time.perf_counter() - began))
        cpu.append((time.process_time() - began_cpu) / n * 1e6)
    entries = [e.to_json() for e in await store.ledger_entries(0, 10 * tasks)]
    accepted, balances = await store.accepted(0, 10 * tasks), (await store.ledger_balances()).to_json()
    problems = find_discrepancies(entries, accepted, balances)
    assert problems == [] and len(entries) == 1 + 3 * tasks, problems[:3]
    # A committed size half-way (after a whole batch): the snapshot there must verify by itself.
    half = 1 + 3 * min(tasks, batch * (len(rates) // 2))
    entries = [e.to_json() for e in await store.ledger_entries(0, 10 * tasks, upto=half)]
    accepted = await store.accepted(0, 10 * tasks, upto=half)
    problems = find_discrepancies(entries, accepted, (await store.ledger_balances(upto=half)).to_json())
    assert problems == [] and len(entries) == half, problems[:3]
    return rates, cpu


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = p.parse_args()
    results: dict[str, tuple[list[float], list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/bench.db")
        try:
            results["sqlite"] = await run(store, args.tasks, args.batch)
        finally:
            await store.close()
    schema = f"bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.pg)
    await admin.execute(f"CREATE SCHEMA {schema}")
    try:
        store = open_store(f"{args.pg}?options={quote(f'-csearch_path={schema}', safe='')}")
        try:
            results["postgresql"] = await run(store, args.tasks, args.batch)
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    print(f"{args.tasks} tasks in batches of {args.batch} ({OPS_PER_TASK} ops, 3 ledger entries a task)")
    for name, (rates, cpu) in results.items():
        median = statistics.median(rates)
        print(f"  {name:<10} median {median:9,.0f} tasks/s  {median * OPS_PER_TASK:10,.0f} ops/s  "
              f"cpu {statistics.median(cpu):5,.0f} us/task  "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f} tasks/s over {len(rates)} batches)")
    ratio = statistics.median(results["postgresql"][0]) / statistics.median(results["sqlite"][0])
    print(f"  ratio postgresql/sqlite: {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
