"""A node that computes only while its machine is spare, against real load: real spinning
processes beside real daemons, a real coordinator and broker, and the daemon's own status file.

The threshold, and why it is honest on a 2-core test box: the load signal (node/load_signals.py)
counts as "other" everything outside the node's own process tree, so this test's own network
(coordinator, broker, the second node) is "other" load too, as it would be on a volunteer's
desktop. Rather than teaching the daemon to ignore named processes (a knob no volunteer needs),
the test keeps the two loads far apart and puts the threshold between them:
- the network's load stays low: the second node runs one slot capped at 50 % of a core (the
  daemon's own duty cycle), and both owners are trusted so the coordinator audits nothing;
  measured from the busy node, "other" stays around 30 % of the machine;
- the hog is one spinning process per core. It reads as about 100 %: each run worker leads its own
  session, hence its own scheduler autogroup, and sets that group's nice to 19 as well
  (protocol/sandbox.py), so it gives way to the hog. (Before that it kept ~1/3 of the CPU against
  the hog, which read only 62-76 %.)
The threshold is 60 %: above the network, well below the hog. An unrelated load on the box above
it suspends the node early; the test then waits (it needs the node working before the hog starts,
and a suspension for the hog's reason) instead of failing on a wrong one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from node.load_signals import LoadReader
from sparecycles.cli.processes import ProcessGroup
from tests.integration.cpu_load import CpuHog, poll_status, read_status, spinner

from .network import Network, submitter

pytestmark = pytest.mark.integration

THRESHOLD = 60.0
ROWS_PER_TASK = 384  # ~0.2 s of one core a task here
TASKS = 48


@pytest.fixture
def trusted_network(mosquitto_url: str, tmp_path: Path) -> Iterator[Network]:
    """One replica a task and trusted owners: a task released by one node can only be finished by
    the other, and the coordinator adds no audit runs of its own to the machine's load."""
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)
        net.start_coordinator("--replicas", "1", "--trusted-owner", "alice", "--trusted-owner", "bob")
        yield net


def local_run(model: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    out: np.ndarray = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out


def other_cpu_percent(pid: int, *, seconds: float) -> float:
    """What the daemon `pid` reads as other processes' CPU over `seconds` (its tree found by scan)."""
    reader = LoadReader(root_pid=pid)
    time.sleep(seconds)
    return reader.sample().other_cpu_percent


def test_a_cpu_hog_suspends_a_busy_node_its_work_moves_and_it_resumes_after(trusted_network: Network) -> None:
    """Attack/failure defended: the node taking CPU from its machine's owner. When another process
    wants the cores the node must stop computing within about a second, hand back what it has not
    started (so the job does not wait for it), and come back only after the machine is spare."""
    net = trusted_network
    model = spinner()
    x = np.random.default_rng(11).standard_normal((TASKS * ROWS_PER_TASK, 256)).astype(np.float32)
    busy_key = net.tmp / "node0.key"
    busy = net.start_node("alice", "--idle-only", "true", "--max-other-cpu-percent", str(THRESHOLD),
                   "--resume-after-seconds", "1", "--prefetch", "3")
    other_key = net.tmp / "node1.key"
    net.start_node("bob", "--cpu-cap-percent", "50", "--nice", "0")

    async def submit() -> str:
        async with submitter(net.url) as client:
            job = await client.submit(await client.ensure_model(model), {"x": x}, task_size=ROWS_PER_TASK)
            return str(job["job"])

    job = asyncio.run(submit())
    # Prepare: the node is computing (and holds prefetched, unstarted leases) before the owner shows up.
    poll_status(busy_key, lambda d: d["state"] == "working" and d["tasks"]["done"] >= 1, timeout=60)
    network_load = other_cpu_percent(busy.pid, seconds=1.0)

    with CpuHog(os.cpu_count() or 2) as hog:
        seen, suspended = poll_status(busy_key, lambda d: d["state"] == "suspended"
                                      and d["reason"].startswith("other processes use "), timeout=10)
        latency = seen - hog.started_at
        # Execute: while suspended, the busy node computes nothing and the other node carries on.
        time.sleep(0.5)  # a result already on its way when the hog started may still be counted
        done_then = read_status(busy_key)["tasks"]["done"]
        other_then = read_status(other_key)["tasks"]["done"]
        _, other = poll_status(other_key, lambda d: d["tasks"]["done"] >= other_then + 2, timeout=60)
        still = read_status(busy_key)

    # Assert: suspended within about a second (the goal is 1 s; the median and worst are
    # measured by benchmarks/bench_node.py: a shared CI box gets a little slack here), for the
    # reason a volunteer would want to read, and the unstarted leases went back.
    print(f"network load seen by the busy node {network_load:.0f} %; suspended {latency:.2f} s after the hog "
          f"started: {suspended['reason']}")
    assert latency < 2.0, f"suspended {latency:.2f} s after the hog started"
    assert suspended["reason"].startswith("other processes use "), suspended
    assert suspended["healthy"], suspended
    # the status file is rewritten at state changes and then about once a second: the release
    # follows the suspension by a few milliseconds, so it shows in a later write
    poll_status(busy_key, lambda d: d["tasks"]["released"] >= 1, timeout=10)
    assert still["state"] == "suspended" and still["tasks"]["done"] == done_then, (still, done_then)
    assert other["tasks"]["done"] >= other_then + 2

    # Hysteresis: back to work once the machine has been spare for resume_after_seconds.
    _, resumed = poll_status(busy_key, lambda d: d["state"] != "suspended", timeout=30)
    assert resumed["state"] in ("working", "waiting") and resumed["healthy"], resumed

    async def finish() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(net.url) as client:
            return await client.wait(job, timeout=120), await client.outputs(job)

    status, outputs = asyncio.run(finish())
    assert status["state"] == "done", status
    np.testing.assert_allclose(outputs["y"], local_run(model, x), rtol=1e-4, atol=1e-5)
    final = [read_status(key)["tasks"] for key in (busy_key, other_key)]
    assert sum(t["done"] for t in final) >= TASKS, final
