"""What submitters and volunteers see at the edges: JSON jobs, failed jobs, a node leaving
politely, and the demo on the embedded broker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from protocol.npz import to_npz
from tests import models

from . import signed
from .network import SUBMITTER, Network, submitter
from .test_end_to_end import assert_outputs_match, cli, local_run

pytestmark = pytest.mark.integration


def test_a_small_job_can_travel_as_json_both_ways(network: Network) -> None:
    network.start_node("alice")
    network.start_node("bob")
    model = models.two_inputs()
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones((3, 4), dtype=np.float32)

    async def scenario() -> tuple[int, dict[str, Any]]:
        async with submitter(network.url) as c:
            digest = await c.ensure_model(model)
        async with aiohttp.ClientSession() as s:
            body = {"model": digest, "task_size": 2,
                    "inputs": {n: {"dtype": "float32", "shape": list(v.shape), "data": v.tolist()}
                               for n, v in (("a", a), ("b", b))}}
            aud = await signed.audience(s, network.url)
            _, created, _ = await signed.call(s, network.url, "POST", "/v1/jobs", json=body, identity=SUBMITTER,
                                              audience=aud)
            # Whoever holds the job's read token may read it, unsigned (e.g. with curl).
            token = {"X-Sparecycles-Job-Token": created["read_token"]}
            async with s.get(f"{network.url}/v1/jobs/{created['job']}", params={"wait": "30"}, headers=token) as r:
                assert (await r.json())["state"] == "done"
            async with s.get(f"{network.url}/v1/jobs/{created['job']}/outputs",
                             headers={"Accept": "application/json", **token}) as r:
                return r.status, await r.json()

    status, outputs = asyncio.run(scenario())
    assert status == 200
    got = {n: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for n, v in outputs.items()}
    assert_outputs_match(got, local_run(model, {"a": a, "b": b}))


def test_a_job_that_cannot_be_verified_fails_with_a_reason_the_submitter_reads(network: Network,
                                                                              tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    network.start_node("carol")
    (tmp_path / "nan.onnx").write_bytes(models.nan_model())
    (tmp_path / "in.npz").write_bytes(to_npz({"x": np.ones((4, 4), dtype=np.float32)}))

    done = cli("submit", str(tmp_path / "nan.onnx"), str(tmp_path / "in.npz"), "--coordinator", network.url,
               "--task-size", "4", "-o", str(tmp_path / "out.npz"))

    assert done.returncode == 1
    assert "NaN" in done.stderr + done.stdout
    assert not (tmp_path / "out.npz").exists()
    status = cli("ledger", "balances", "--coordinator", network.url, "--json")
    assert '"entries": 0' in status.stdout  # nothing credited for results that were never accepted


def test_a_node_stopped_with_sigterm_mid_job_exits_cleanly_and_the_job_completes(network: Network) -> None:
    for owner in ("alice", "bob", "carol"):
        network.start_node(owner)
    model, x = models.deep_mlp(), np.random.default_rng(6).standard_normal((2048, 384)).astype(np.float32)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray], int]:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=64)
            while (await c.status(job["job"]))["tasks"]["verified"] < 2:
                await asyncio.sleep(0.05)
            code = await asyncio.to_thread(network.nodes[0].terminate, 40.0)
            return await c.wait(job["job"], timeout=120), await c.outputs(job["job"]), code

    status, outputs, code = asyncio.run(scenario())
    assert code == 0, network.nodes[0].log_tail()
    assert status["state"] == "done" and status["tasks"]["verified"] == 32
    assert_outputs_match(outputs, local_run(model, {"x": x}))


def test_the_demo_runs_a_real_job_on_the_embedded_broker_and_stops_everything(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sparecycles", "demo", "--nodes", "2"], capture_output=True, text=True,
                          timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "embedded MQTT broker" in out
    assert "29/29" in out and "1797/1797 labels identical" in out
    assert "all stopped cleanly" in out
