"""Retention and uploads, one contract for every CoordinatorStore backend: a lease holds one upload;
finished jobs expire whole (blobs, leases) while what the ledger is checked against stays; a blob
shared by jobs goes only with the last job that references it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator.jobs import JobOptions, plan_job
from coordinator.records import (
    BlobPut,
    JobFinished,
    JobRecord,
    LeaseIssued,
    Op,
    ResultRecorded,
    TaskDecided,
    TaskRecord,
)
from coordinator.scheduler import JobState
from coordinator.store import CoordinatorStore, Freed
from coordinator.store_factory import open_store
from ledger.verify import find_discrepancies

from .test_coordinator_store import META, accepted_ops, documents, lease, verdict

Planned = tuple[JobRecord, list[TaskRecord], dict[str, bytes]]


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CoordinatorStore]:
    s = open_store(store_url)
    yield s
    await s.close()


def planned(seed: int = 0, submitter: str = "dave") -> Planned:
    """A job of two tasks; jobs planned from the same seed have the same input blobs."""
    x = np.random.default_rng(seed).standard_normal((4, 2)).astype(np.float32)
    return plan_job(META, {"x": x}, JobOptions(replicas=2, task_size=2, max_results=None, final="argmax",
                                               submitter=submitter), now_wall=1.0, max_inline_bytes=1 << 20)


def finished(job: JobRecord, tasks: list[TaskRecord], *, at: float, output: str = "d" * 64) -> list[Op]:
    """Both tasks run by two owners and verified on outputs `output` (stored), the job done at `at`."""
    jid = job.spec.id
    ops: list[Op] = [BlobPut(output, b"outputs " + output.encode())]
    for t in tasks:
        ops += [*accepted_ops(t.id, jid),
                verdict(t.id, jid, (f"{t.id}-l1", f"{t.id}-l2"), submitter=job.spec.submitter)]
    ops = [replace_digest(op, output) for op in ops]
    return [*ops, JobFinished(jid, JobState.DONE, None, at)]


def replace_digest(op: Op, digest: str) -> Op:
    if isinstance(op, ResultRecorded):
        return replace(op, output_digest=digest)
    if isinstance(op, TaskDecided):
        return replace(op, canonical_digest=digest)
    return op


async def stored(store: CoordinatorStore, p: Planned) -> str:
    job, tasks, blobs = p
    await store.create_job(job, tasks, blobs)
    return job.spec.id


# ---- uploads --------------------------------------------------------------------------------
async def test_a_lease_holds_one_upload(store: CoordinatorStore) -> None:
    # Attack: a node with one live lease uploads again and again (other content each time), to
    # store as much as it likes. Refused: the second, different upload stores nothing.
    jid = await stored(store, planned())
    assert await store.put_upload("l1", jid, "a" * 64, b"first") == "a" * 64
    assert await store.put_upload("l1", jid, "a" * 64, b"first") == "a" * 64  # the same again: idempotent
    assert await store.put_upload("l1", jid, "b" * 64, b"second") == "a" * 64
    assert await store.get_blob("a" * 64) == b"first"
    assert await store.get_blob("b" * 64) is None
    assert await store.put_upload("l2", jid, "b" * 64, b"second") == "b" * 64  # another lease: its own


# ---- which jobs have expired ------------------------------------------------------------------
async def test_finished_before_lists_finished_unexpired_jobs_oldest_first(store: CoordinatorStore) -> None:
    running = await stored(store, planned(1))
    late, early, recent = planned(2), planned(3), planned(4)
    for p, at in ((late, 20.0), (early, 10.0), (recent, 50.0)):
        await stored(store, p)
        await store.apply(finished(p[0], p[1], at=at))
    assert await store.finished_before(30.0, 10) == [early[0].spec.id, late[0].spec.id]
    assert await store.finished_before(30.0, 1) == [early[0].spec.id]
    assert await store.finished_before(5.0, 10) == []
    assert running not in await store.finished_before(1e12, 10)
    await store.expire_jobs([early[0].spec.id], at=60.0, reason="expired after the retention of 1 s")
    assert await store.finished_before(30.0, 10) == [late[0].spec.id]


# ---- expiry -----------------------------------------------------------------------------------
async def test_an_expired_job_loses_blobs_and_leases_but_keeps_what_the_ledger_is_checked_against(
        store: CoordinatorStore) -> None:
    job, tasks, blobs = p = planned()
    jid = await stored(store, p)
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    await store.apply(finished(job, tasks, at=10.0))
    await store.put_upload("l-late", jid, "u" * 64, b"an upload whose result never came")
    before = await documents(store)
    assert find_discrepancies(*before) == []

    freed = await store.expire_jobs([jid], at=20.0, reason="expired after the retention of 5 s")

    assert freed.jobs == 1 and freed.blobs == len(blobs) + 2 and freed.leases == 4  # inputs, outputs, upload
    assert freed.bytes == sum(len(b) for b in blobs.values()) + len(b"outputs " + b"d" * 64) + 33
    for digest in [*blobs, "d" * 64, "u" * 64]:
        assert await store.get_blob(digest) is None
    expiry = await store.expiry(jid)
    assert expiry is not None and expiry.at == 20.0 and expiry.reason == "expired after the retention of 5 s"
    assert expiry.job.spec.submitter == "dave" and expiry.job.state == "done"
    # kept: the ledger and what it is checked against
    assert await documents(store) == before and find_discrepancies(*before) == []
    assert await store.canonical_digests(jid) == ["d" * 64, "d" * 64]
    # gone from what a restarted coordinator loads
    rows = await store.load_rows()
    assert rows.jobs == [] and rows.tasks == [] and rows.leases == []
    # once
    assert await store.expire_jobs([jid], at=30.0, reason="deleted by its submitter") == Freed()
    assert (await store.expiry(jid)).at == 20.0  # type: ignore[union-attr]


async def test_a_running_job_never_expires(store: CoordinatorStore) -> None:
    _, tasks, blobs = p = planned()
    jid = await stored(store, p)
    await store.apply([LeaseIssued(lease("l1", tasks[0].id, jid, "n1"))])
    assert await store.expire_jobs([jid, "no-such-job"], at=20.0, reason="deleted by its submitter") == Freed()
    assert await store.expiry(jid) is None
    assert all([await store.get_blob(d) == b for d, b in blobs.items()])
    assert [lv.id for lv in (await store.load()).live_leases] == ["l1"]


async def test_a_blob_shared_by_two_jobs_goes_with_the_last_of_them(store: CoordinatorStore) -> None:
    # Attack: a submitter deletes their job whose inputs and outputs equal another account's job
    # (content-addressed blobs are shared), to make the other job's outputs unreadable.
    # Refused: a blob goes only when no job that has not expired references it.
    mine, theirs = planned(7, "mallory"), planned(7, "alice")  # same rows: the same input blobs
    assert set(mine[2]) == set(theirs[2])
    await stored(store, mine)
    await store.apply(finished(mine[0], mine[1], at=10.0))
    await stored(store, theirs)
    await store.apply(finished(theirs[0], theirs[1], at=11.0))

    freed = await store.expire_jobs([mine[0].spec.id], at=12.0, reason="deleted by its submitter")

    assert freed.jobs == 1 and freed.blobs == 0
    assert await store.canonical_digests(theirs[0].spec.id) == ["d" * 64, "d" * 64]
    assert await store.get_blob("d" * 64) is not None
    assert all([await store.get_blob(d) == b for d, b in theirs[2].items()])
    freed = await store.expire_jobs([theirs[0].spec.id], at=13.0, reason="deleted by its submitter")
    assert freed.blobs == len(theirs[2]) + 1
    assert await store.get_blob("d" * 64) is None


async def test_an_upload_under_a_running_job_keeps_a_blob_an_expired_job_shared(store: CoordinatorStore) -> None:
    old, new = planned(1), planned(2)
    await stored(store, old)
    await store.apply(finished(old[0], old[1], at=10.0, output="e" * 64))
    await stored(store, new)
    assert await store.put_upload("l9", new[0].spec.id, "e" * 64, b"same outputs") == "e" * 64
    await store.expire_jobs([old[0].spec.id], at=20.0, reason="expired after the retention of 1 s")
    assert await store.get_blob("e" * 64) is not None  # the running job's node uploaded it too
    assert all([await store.get_blob(d) == b for d, b in new[2].items()])


# ---- SQLite: the file, older databases, reopening ----------------------------------------------
async def test_sqlite_expiry_survives_reopening_and_gives_pages_back(tmp_path: Path) -> None:
    url, path = f"sqlite:///{tmp_path}/c.db", tmp_path / "c.db"
    s = open_store(url)
    big = planned(3)
    job, tasks, blobs = big
    blobs = {d: b + bytes(200_000) for d, b in blobs.items()}  # ~0.4 MB to give back
    await s.create_job(job, tasks, blobs)
    await s.apply(finished(job, tasks, at=10.0))
    await s.compact()
    grown = path.stat().st_size
    await s.expire_jobs([job.spec.id], at=20.0, reason="expired after the retention of 1 s")
    await s.compact()
    await s.close()
    assert path.stat().st_size < grown - 300_000
    s2 = open_store(url)
    try:
        assert (await s2.expiry(job.spec.id)) is not None
        assert (await s2.load_rows()).jobs == []
    finally:
        await s2.close()


async def test_sqlite_database_of_an_earlier_version_is_migrated_and_its_blobs_expire(tmp_path: Path) -> None:
    url, path = f"sqlite:///{tmp_path}/c.db", tmp_path / "c.db"
    s = open_store(url)
    job, tasks, blobs = planned()
    await s.create_job(job, tasks, blobs)
    await s.apply(finished(job, tasks, at=10.0))
    await s.close()
    with sqlite3.connect(path) as conn:  # what the version before retention left
        conn.executescript("DROP INDEX jobs_to_expire; DROP TABLE blob_refs; DROP TABLE uploads; "
                           "ALTER TABLE jobs DROP COLUMN expiry; ALTER TABLE jobs DROP COLUMN expired_at;")
    s2 = open_store(url)
    try:
        assert await s2.finished_before(15.0, 10) == [job.spec.id]
        freed = await s2.expire_jobs([job.spec.id], at=20.0, reason="expired after the retention of 1 s")
        assert freed.blobs == len(blobs) + 1  # references rebuilt from its tasks and results
        assert await s2.get_blob("d" * 64) is None
    finally:
        await s2.close()
