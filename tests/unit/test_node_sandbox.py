"""The node runs strangers' models only in sandboxed workers (node/runner.py, protocol/sandbox.py):
real onnxruntime in real child processes, hostile models built in tests/models.py.

Attack: a model author ships a graph whose cost is driven by the rows' values (a Loop whose trip
count, or a ConstantOfShape whose size, comes from the input). Checks of the graph and runs on
invented rows see nothing; on the volunteer it would freeze the daemon (27.9 s without a heartbeat
on the old in-process runner) or take its memory. Each test shows the run is stopped, reported as
the task's error, and the node carries on."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from node.errors import TaskFailed
from node.runner import RunInterrupted, RunLimits, Runner
from protocol.digests import sha256_hex
from protocol.sandbox import TIMEOUT, SandboxPool
from protocol.tensors import tensors_from_arrays
from tests import models

pytestmark = pytest.mark.timeout(90)


def rows(*values: float) -> dict:
    return tensors_from_arrays({"x": np.array([[v] for v in values], dtype=np.float32)})


def saved(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    digest = sha256_hex(data)
    path = tmp_path / f"{digest}.onnx"
    path.write_bytes(data)
    return path, digest


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    r = Runner(1, limits=RunLimits(memory_bytes=256 << 20, min_run_seconds=1.0, max_run_seconds=60.0))
    yield r
    await r.close()
    assert r.pids == []


async def ticking(seconds_between: list[float], stop: asyncio.Event) -> None:
    """Stands in for the daemon's heartbeat: how long did the event loop go without a turn?"""
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        seconds_between.append(now - last)
        last = now


async def test_runs_happen_in_a_niced_worker_in_an_empty_directory_without_our_environment(
        tmp_path: Path) -> None:
    # Attack: a model that reads files relative to its working directory, or the daemon's secrets.
    os.environ["SPARECYCLES_TEST_SECRET"] = "do-not-leak"
    runner = Runner(1, nice=7)
    try:
        path, digest = saved(tmp_path, models.loop_bomb())
        out = await runner.run(path, digest, 99, rows(2.0))
        assert out.outputs["y"].to_array().tolist() == [[4.0]]
        [pid] = runner.pids
        assert pid != os.getpid()
        worker = psutil.Process(pid)
        assert worker.nice() == 7
        assert os.listdir(worker.cwd()) == []
        assert "SPARECYCLES_TEST_SECRET" not in worker.environ()
    finally:
        del os.environ["SPARECYCLES_TEST_SECRET"]
        await runner.close()


async def test_a_loop_bomb_is_stopped_at_its_measured_cost_and_the_loop_never_stalls(
        tmp_path: Path, runner: Runner) -> None:
    path, digest = saved(tmp_path, models.loop_bomb())
    for _ in range(3):  # the model is measured tiny on honest rows
        await runner.run(path, digest, 99, rows(3.0))
    gaps: list[float] = []
    stop = asyncio.Event()
    heartbeat = asyncio.create_task(ticking(gaps, stop))
    start = time.monotonic()
    with pytest.raises(TaskFailed, match="over this node's time limit"):
        await runner.run(path, digest, 99, rows(1e12), lease_seconds=30.0)
    took = time.monotonic() - start
    stop.set()
    await heartbeat
    assert took < 5.0  # min_run_seconds (1 s) plus a kill, not the lease's 30 s
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
    # the slot carries on: a fresh worker answers the next task
    out = await runner.run(path, digest, 99, rows(1.0, 2.0))
    assert out.outputs["y"].to_array().ravel().tolist() == [3.0, 4.0]


async def test_a_first_run_is_bounded_by_the_lease(tmp_path: Path, runner: Runner) -> None:
    # Nothing measured yet: the only bound is the lease (a result after it counts for nothing).
    path, digest = saved(tmp_path, models.loop_bomb())
    start = time.monotonic()
    with pytest.raises(TaskFailed, match="time limit"):
        await runner.run(path, digest, 99, rows(1e12), lease_seconds=1.5)
    assert time.monotonic() - start < 5.0


async def test_an_allocation_bomb_fails_its_task_and_the_worker_stays_under_the_limit(
        tmp_path: Path, runner: Runner) -> None:
    path, digest = saved(tmp_path, models.alloc_bomb())
    await runner.run(path, digest, 99, rows(4.0))
    [pid] = runner.pids
    peak = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, psutil.Process(pid).memory_info().rss)
            except psutil.NoSuchProcess:
                return
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    with pytest.raises(TaskFailed, match="memory limit"):
        await runner.run(path, digest, 99, rows(1e10))  # 40 GB of ones
    stop.set()
    await watcher
    assert peak < (256 << 20) + (300 << 20), f"the worker reached {peak >> 20} MiB"
    out = await runner.run(path, digest, 99, rows(2.0))
    assert out.outputs["y"].to_array().tolist() == [[4.0]]


async def test_idle_workers_stop_and_give_their_memory_back(tmp_path: Path) -> None:
    runner = Runner(2, idle_seconds=0.4)
    try:
        path, digest = saved(tmp_path, models.loop_bomb())
        await asyncio.gather(*(runner.run(path, digest, 99, rows(1.0)) for _ in range(4)))
        started = runner.pids
        assert started

        def alive() -> list[int]:
            return [p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

        deadline = time.monotonic() + 5
        while (runner.pids or alive()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert runner.pids == [] and alive() == []
        out = await runner.run(path, digest, 99, rows(1.0))  # work again: a worker starts again
        assert out.outputs["y"].to_array().tolist() == [[2.0]]
    finally:
        await runner.close()


async def test_a_suspended_node_stops_its_runs_at_once_and_hands_back_what_cannot_finish(tmp_path: Path) -> None:
    # The volunteer's promise: when the owner needs the machine, nothing of ours computes. A run
    # stopped by the node itself is not the model's failure: it must not count as an error.
    runner = Runner(1, limits=RunLimits(min_run_seconds=30.0, max_run_seconds=60.0))
    try:
        path, digest = saved(tmp_path, models.loop_bomb())
        await runner.run(path, digest, 99, rows(1.0))
        running = asyncio.create_task(runner.run(path, digest, 99, rows(1e12), lease_seconds=50.0))
        await asyncio.sleep(0.3)
        [pid] = runner.pids
        runner.pause()
        deadline = time.monotonic() + 1.0
        while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
        with pytest.raises(RunInterrupted):  # nothing new starts while suspended
            await runner.run(path, digest, 99, rows(1.0))
        await runner.abandon()  # its lease ends before the node could resume: hand it back
        with pytest.raises(RunInterrupted):
            await running
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        runner.resume()
        out = await runner.run(path, digest, 99, rows(1.0))
        assert out.outputs["y"].to_array().tolist() == [[2.0]]
    finally:
        await runner.close()


async def test_a_runs_time_limit_does_not_count_while_the_pool_is_suspended(tmp_path: Path) -> None:
    """Attack: none - the volunteer's own use. A run stopped because the owner needs the machine
    must not be killed for time it was not allowed to run: it gets its whole limit once resumed."""
    pool = SandboxPool(workers=1, sessions=1, name="test")
    data = models.loop_bomb()
    try:
        await pool.run(data, sha256_hex(data), None, 99, memory_bytes=256 << 20, seconds=30.0)  # loaded
        start = time.monotonic()
        run = asyncio.create_task(pool.run(data, sha256_hex(data), rows(1e12), 99,
                                           memory_bytes=256 << 20, seconds=1.0))
        await asyncio.sleep(0.3)
        pool.suspend(True)
        await asyncio.sleep(2.0)
        assert not run.done(), "the limit ran on while the run was stopped"
        pool.suspend(False)
        outcome = await run
        assert outcome.problem == TIMEOUT
        # 0.3 s before the pause, the 0.7 s left after it: killed about 3 s in, not at 1 s
        assert time.monotonic() - start >= 2.9
    finally:
        await pool.close()
