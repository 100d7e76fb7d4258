"""coordinator.audit against the real onnxruntime in real child processes: the coordinator's re-runs
of tasks agree bit for bit with a node's, and a hostile model costs a killed worker, never the
coordinator (DESIGN.md §12)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from coordinator.audit import (
    BAD_INPUTS,
    CRASHED,
    MODEL_FAILED,
    NOT_STORED,
    OUT_OF_MEMORY,
    TIMED_OUT,
    Auditor,
)
from coordinator.engine import AuditRequest
from coordinator.memory_store import MemoryStore
from node.runner import Runner
from protocol.digests import sha256_hex
from protocol.tensors import Tensor, encode_tensor_map, tensors_from_arrays
from tests import models

pytestmark = pytest.mark.timeout(60)
# Each spawns and kills several workers (~1-2 s): `-m "not integration"` leaves them out.
SLOW = pytest.mark.integration


def loop_inputs(n: float) -> dict[str, np.ndarray]:
    """One row for tests/models.py's loop bomb: `n` iterations, chosen by whoever picks the inputs."""
    return {"x": np.array([[n]], dtype=np.float32)}


CLASSIFIER = models.classifier()
ROWS = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)


def audit_children() -> list[int]:
    """PIDs of live audit workers whose parent is this test process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"protocol.sandbox" in cmdline:
            found.append(int(entry.name))
    return found


def kill_and_wait(pid: int) -> None:
    """SIGKILL `pid` and block (the event loop too, on purpose: the auditor must not have noticed)
    until it has exited."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = read_proc(pid, "stat").rsplit(b")", 1)[1].split()[0]
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return
        if state == b"Z" and len(threads) == 1:
            # A leader shows Z while its other threads (OpenBLAS's) still exit holding the shared
            # file table: the pipes close only when the last one is gone.
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} survived SIGKILL")


def read_proc(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


@pytest.fixture
async def auditor() -> AsyncIterator[Auditor]:
    async with Auditor() as a:
        yield a


async def run_classifier(a: Auditor) -> Mapping[str, np.ndarray]:
    outcome = await a.run(CLASSIFIER, sha256_hex(CLASSIFIER), {"x": ROWS}, 99)
    assert outcome.problem is None and outcome.outputs is not None
    return outcome.outputs


def test_the_time_limit_grows_with_the_work_and_stops_at_the_cap() -> None:
    a = Auditor(base_seconds=10, seconds_per_mb=0.1, node_factor=10, max_seconds=60)
    assert a.time_limit(0, 0) == 10
    assert a.time_limit(20_000_000, 0, node_seconds=1.0) == pytest.approx(10 + 2 + 10)
    assert a.time_limit(0, 0, node_seconds=1e6) == 60  # a node claiming a huge run time buys no more


async def test_audit_outputs_equal_a_nodes_bit_for_bit_at_each_optimisation_level(
        auditor: Auditor, tmp_path: Path) -> None:
    mlp = models.deep_mlp()
    rows = np.random.default_rng(5).standard_normal((8, 384)).astype(np.float32)
    cases = [(CLASSIFIER, ROWS), (mlp, rows)]
    runner = Runner(1)
    try:
        for data, x in cases:
            digest = sha256_hex(data)
            path = tmp_path / f"{digest}.onnx"
            path.write_bytes(data)
            for opt_level in (0, 99):
                ran = await runner.run(path, digest, opt_level, tensors_from_arrays({"x": x}))
                node = {n: t.to_array() for n, t in ran.outputs.items()}
                audit = await auditor.run(data, digest, {"x": x}, opt_level)
                assert audit.problem is None and audit.outputs is not None
                assert audit.outputs.keys() == node.keys()
                for name, ours in audit.outputs.items():
                    theirs = node[name]
                    assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape)
                    assert ours.tobytes() == theirs.tobytes()
    finally:
        await runner.close()
    assert len(auditor.pids) == 1  # one long-lived worker served all four sessions


async def test_an_audit_runs_in_an_empty_directory_without_the_coordinators_environment(
        auditor: Auditor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: a model reads files beside the coordinator's working directory (external data by a
    relative path) or its secrets from the environment."""
    monkeypatch.setenv("SPARECYCLES_AUDIT_TEST_SECRET", "hunter2")
    await run_classifier(auditor)
    (pid,) = auditor.pids
    cwd = os.readlink(f"/proc/{pid}/cwd")
    assert cwd != os.getcwd() and os.listdir(cwd) == []
    assert b"hunter2" not in read_proc(pid, "environ")


@SLOW
async def test_a_model_that_allocates_without_bound_is_stopped_and_the_worker_recovers() -> None:
    """Attack: a 196-byte model that builds a 0.9 GB constant, at load (folded, opt level 99) or on
    every run (folding disabled, opt level 0), to exhaust the coordinator's memory."""
    bomb = models.memory_bomb()
    async with Auditor(memory_bytes=256 << 20) as a:
        for opt_level in (99, 0):
            outcome = await a.run(bomb, sha256_hex(bomb), {"x": np.ones(4, np.float32)}, opt_level)
            assert outcome.outputs is None and outcome.problem == OUT_OF_MEMORY
            assert a.pids == []  # the worker that hit its limit is gone
        np.testing.assert_array_equal((await run_classifier(a))["probs"].shape, (16, 4))


@SLOW
async def test_a_model_that_runs_too_long_times_out_and_the_worker_recovers() -> None:
    """Attack: a Loop whose trip count comes from the inputs keeps the coordinator busy forever."""
    data = models.loop_bomb()
    async with Auditor(base_seconds=1.0) as a:
        short = await a.run(data, sha256_hex(data), loop_inputs(5), 99)
        assert short.problem is None and short.outputs is not None
        assert short.outputs["y"].tolist() == [[10.0]]  # 5 + 5 iterations: only the trip count is hostile
        (pid,) = a.pids
        endless = await a.run(data, sha256_hex(data), loop_inputs(10**15), 99)
        assert endless.problem == TIMED_OUT and endless.outputs is None
        assert 1.0 <= endless.seconds < 5.0
        assert pid not in audit_children()
        await run_classifier(a)
        assert a.pids != [pid]


async def test_a_worker_killed_between_or_during_audits_is_replaced(auditor: Auditor) -> None:
    await run_classifier(auditor)
    (first,) = auditor.pids
    kill_and_wait(first)  # a crash between audits costs the next audit nothing
    await run_classifier(auditor)
    (second,) = auditor.pids
    assert second != first

    data = models.loop_bomb()
    busy = asyncio.create_task(auditor.run(data, sha256_hex(data), loop_inputs(10**15), 99))
    await asyncio.sleep(0.5)
    os.kill(second, signal.SIGKILL)
    outcome = await busy
    assert outcome.problem == CRASHED and outcome.outputs is None
    await run_classifier(auditor)
    assert auditor.pids not in ([first], [second])


async def test_an_audit_cancelled_while_its_worker_starts_or_runs_kills_the_worker(auditor: Auditor) -> None:
    # A worker still busy with a cancelled audit (or with its greeting unread) would answer the
    # next audit with the old frame.
    starting = asyncio.create_task(run_classifier(auditor))
    while not auditor.pids:  # spawned, and still importing onnxruntime when cancelled
        await asyncio.sleep(0.002)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert audit_children() == []

    await run_classifier(auditor)
    data = models.loop_bomb()
    busy = asyncio.create_task(auditor.run(data, sha256_hex(data), loop_inputs(10**15), 99))
    await asyncio.sleep(0.3)
    (pid,) = auditor.pids
    busy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await busy
    assert audit_children() == [] and auditor.pending == 0
    await run_classifier(auditor)
    assert auditor.pids != [pid]


async def test_close_leaves_no_process_and_no_directory() -> None:
    a = Auditor(workers=2)
    await asyncio.gather(run_classifier(a), run_classifier(a))
    pids = a.pids
    assert len(pids) == 2 and sorted(audit_children()) == sorted(pids)
    cwds = [os.readlink(f"/proc/{pid}/cwd") for pid in pids]
    await a.close()
    assert audit_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any(map(os.path.lexists, cwds))
    after = await a.run(CLASSIFIER, sha256_hex(CLASSIFIER), {"x": ROWS}, 99)
    assert after.problem is not None and audit_children() == []


async def test_audits_beyond_the_worker_count_wait_their_turn(auditor: Auditor) -> None:
    runs = [asyncio.create_task(run_classifier(auditor)) for _ in range(3)]
    await asyncio.sleep(0)
    assert auditor.pending == 3
    results = await asyncio.gather(*runs)
    assert all(r["probs"].tobytes() == results[0]["probs"].tobytes() for r in results)
    assert auditor.pending == 0 and len(audit_children()) == 1


async def test_a_model_that_fails_gives_a_generic_reason_and_keeps_the_worker(auditor: Auditor) -> None:
    await run_classifier(auditor)
    (pid,) = auditor.pids
    wrong = await auditor.run(CLASSIFIER, sha256_hex(CLASSIFIER), {"y": ROWS}, 99)
    assert wrong.problem == BAD_INPUTS
    bad = models.invalid_model_bytes()
    broken = await auditor.run(bad, sha256_hex(bad), {"x": ROWS}, 99)
    assert broken.problem == MODEL_FAILED  # onnxruntime's own text stays in the log
    unknown_level = await auditor.run(CLASSIFIER, sha256_hex(CLASSIFIER), {"x": ROWS}, 3)
    assert unknown_level.problem == MODEL_FAILED
    assert auditor.pids == [pid]


async def test_bytes_that_are_not_the_digests_model_are_never_run(auditor: Auditor) -> None:
    """Attack (or a corrupt store): other bytes cached under a model's digest would answer every
    later audit of that model."""
    other = models.two_inputs()
    outcome = await auditor.run(other, sha256_hex(CLASSIFIER), {"x": ROWS}, 99)
    assert outcome.outputs is None and outcome.problem is not None
    await run_classifier(auditor)


def request(model: str, input_digest: str, inputs: Mapping[str, Tensor] | None) -> AuditRequest:
    return AuditRequest(task="t1", job="j1", model=model, input_digest=input_digest, inputs=inputs,
                        opt_level=99, rows=len(ROWS), why="check")


async def test_an_audit_request_reads_its_model_and_input_blob_from_the_store(auditor: Auditor) -> None:
    store = MemoryStore()
    digest = sha256_hex(CLASSIFIER)
    await store.put_model(digest, CLASSIFIER, {})
    blob = encode_tensor_map(tensors_from_arrays({"x": ROWS}))
    await store.put_blob(sha256_hex(blob), blob)
    from_blob = await auditor.run_request(request(digest, sha256_hex(blob), None), store)
    inline = await auditor.run_request(request(digest, "", tensors_from_arrays({"x": ROWS})), store)
    assert from_blob.outputs is not None and inline.outputs is not None
    assert from_blob.outputs["probs"].tobytes() == inline.outputs["probs"].tobytes()
    missing = await auditor.run_request(request(digest, "0" * 64, None), store)
    assert missing.problem == NOT_STORED
