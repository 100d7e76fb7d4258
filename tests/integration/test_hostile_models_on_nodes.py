"""Bombs driven by the rows' values reach real nodes, and the network shrugs them off.

Attack (issue 9): a model author uploads a graph that is harmless on honest rows (it passes the
upload check and its first job's probe), then submits rows that make it loop for hours (Loop
trip count from the input) or allocate 40 GB (ConstantOfShape from the input). Before the node
ran tasks in sandboxed workers, the loop froze a node's event loop for 27.9 s (no heartbeat) and
slowed a concurrent job to 25.9 s; the allocation took two nodes to ~2 GiB each.

Shown here with real processes: while a normal job runs, both bombs are stopped on the nodes by
their limits, the normal job completes with the right outputs and in about its usual time, the
node processes stay alive and under their memory limit, and each bomb's job fails with a reason.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from sparecycles.errors import JobFailed
from tests import models

from .network import Network, submitter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RUN_MEMORY_MB = 256


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_loop_and_memory_bombs_fail_their_jobs_while_a_normal_job_completes(network: Network) -> None:
    nodes = [network.start_node(owner, "--run-memory-mb", str(RUN_MEMORY_MB)) for owner in ("alice", "bob")]
    mlp = models.deep_mlp()
    rng = np.random.default_rng(11)
    # Two batches, not one: a job whose tasks were computed before is answered from the store.
    x_alone, x = (rng.standard_normal((1024, 384)).astype(np.float32) for _ in range(2))
    session = ort.InferenceSession(mlp, providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]

    async def scenario() -> None:
        async with submitter(network.url) as c:
            normal = await c.ensure_model(mlp)
            loop_model = await c.ensure_model(models.loop_bomb())
            alloc_model = await c.ensure_model(models.alloc_bomb())
            honest = {"x": np.ones((4, 1), np.float32)}
            # Harmless rows first: each bomb model passes the probe on them and is measured fast on the nodes.
            for digest in (loop_model, alloc_model):
                job = await c.submit(digest, honest, task_size=1)
                assert (await c.wait(job["job"], timeout=60))["state"] == "done"

            start = time.monotonic()
            job = await c.submit(normal, {"x": x_alone}, task_size=16)
            assert (await c.wait(job["job"], timeout=120))["state"] == "done"
            alone = time.monotonic() - start

            peak = 0
            sampling = True

            async def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, *(tree_rss(n.pid) for n in nodes))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample())
            start = time.monotonic()
            job = await c.submit(normal, {"x": x}, task_size=16)
            loop_job = await c.submit(loop_model, {"x": np.array([[1e12]], np.float32)}, task_size=1)
            alloc_job = await c.submit(alloc_model, {"x": np.array([[1e10]], np.float32)}, task_size=1)
            status = await c.wait(job["job"], timeout=120)
            with_bombs = time.monotonic() - start
            assert status["state"] == "done"
            [got] = (await c.outputs(job["job"])).values()
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

            with pytest.raises(JobFailed):
                await c.wait(loop_job["job"], timeout=120)
            with pytest.raises(JobFailed):
                await c.wait(alloc_job["job"], timeout=120)
            loop_status, alloc_status = await c.status(loop_job["job"]), await c.status(alloc_job["job"])
            sampling = False
            await sampler
            assert loop_status["state"] == "failed", loop_status
            assert "time limit" in loop_status["error"], loop_status
            assert alloc_status["state"] == "failed", alloc_status
            assert "memory limit" in alloc_status["error"], alloc_status

            print(f"normal job alone {alone:.1f} s, beside the bombs {with_bombs:.1f} s; "
                  f"largest node process tree {peak >> 20} MiB")  # for the notes (pytest -s)
            # "On time": the bombs cost the normal job a few killed runs of a couple of seconds
            # each, not the bombs' hours (nor the 25.9 s the old in-process runner lost).
            assert with_bombs < alone + 20, (alone, with_bombs)
            # The daemon, its workers and all: the run limit plus the runtime, never the bomb's 40 GB.
            assert peak < (RUN_MEMORY_MB + 600) << 20, f"a node's process tree reached {peak >> 20} MiB"
            health = await c._json("GET", "/v1/health")
            assert health["counters"].get("node_silent", 0) == 0, "a node went silent: its loop stalled"

    asyncio.run(scenario())
    assert all(n.returncode is None for n in nodes), "a node died"
