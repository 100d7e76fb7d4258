"""Real-sized jobs, and a broker that goes away mid-job."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sparecycles.cli.processes import ProcessGroup, free_port
from tests import models

from .network import Network, submitter
from .test_end_to_end import assert_outputs_match, local_run, run_job

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_a_large_job_moves_big_inputs_and_outputs_over_http_not_through_the_broker(network: Network) -> None:
    network.start_node("alice", slots=1)
    network.start_node("bob", slots=1)
    model = models.wide_projection()
    x = np.random.default_rng(8).standard_normal((3200, 1024)).astype(np.float32)
    assert len(model) > 10 * 2**20 and x.nbytes > 10 * 2**20

    status, outputs = asyncio.run(run_job(network, model, {"x": x}, task_size=256))

    assert status["state"] == "done" and status["tasks"]["verified"] == 13
    assert sum(a.nbytes for a in outputs.values()) >= 50 * 2**20  # 4 MiB of results per task
    assert_outputs_match(outputs, local_run(model, {"x": x}))


def own_mosquitto(group: ProcessGroup, tmp: Path, port: int, name: str, binary: str) -> None:
    conf = (ROOT / "deploy" / "mosquitto.conf").read_text().replace("listener 1883", f"listener {port} 127.0.0.1")
    (tmp / "mosquitto.conf").write_text(conf)
    group.start_command([binary, "-c", str(tmp / "mosquitto.conf")], name=name, port=port)


def test_a_broker_restart_mid_job_loses_nothing(tmp_path: Path, mosquitto_binary: str) -> None:
    """Our own Mosquitto (never the shared one) is killed mid-job and started again on the same
    port: coordinator and nodes reconnect with backoff, and the job completes, verified."""
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        own_mosquitto(group, tmp_path, port, "mosquitto", mosquitto_binary)
        net = Network(group=group, tmp=tmp_path, broker_url=f"mqtt://127.0.0.1:{port}")
        # Classic quorum (no audits): every task then needs results that cross the broker after it
        # restarts, which is what this test is about (audits could finish a job with the broker down).
        net.start_coordinator("--lease-seconds", "5", "--untrusted-audit-rate", "0", "--no-adaptive")
        net.start_node("alice")
        net.start_node("bob")
        model = models.deep_mlp()
        x = np.random.default_rng(9).standard_normal((1536, 384)).astype(np.float32)

        async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            async with submitter(net.url) as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=128)
                while (await c.status(job["job"]))["tasks"]["verified"] < 2:
                    await asyncio.sleep(0.05)
                broker = next(p for p in group.processes if p.name == "mosquitto")
                broker.kill()
                await asyncio.sleep(1.0)
                await asyncio.to_thread(own_mosquitto, group, tmp_path, port, "mosquitto-restarted", mosquitto_binary)
                return await c.wait(job["job"], timeout=120), await c.outputs(job["job"])

        t0 = time.monotonic()
        status, outputs = asyncio.run(scenario())
        # Everyone comes back through the restarted broker (the job may have had all its results in
        # before the kill, so reconnecting is checked here, not inferred from the job).
        deadline = time.monotonic() + 30
        for proc in [p for p in group.processes if p.name == "coordinator" or p.name.startswith("node")]:
            while proc.log_text().count(f"connected broker=127.0.0.1:{port}") < 2:
                assert time.monotonic() < deadline, f"{proc.name} did not reconnect:\n{proc.log_tail()}"
                time.sleep(0.1)
    assert status["state"] == "done" and status["tasks"]["verified"] == 12, status
    assert_outputs_match(outputs, local_run(model, {"x": x}))
    assert time.monotonic() - t0 < 120
