"""The whole path with real processes, the real Mosquitto and real ONNX Runtime:
job → tasks → assignment → run → signed result → quorum → ledger credit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from protocol.npz import from_npz, to_npz
from tests import models

from .network import Network, submitter

pytestmark = pytest.mark.integration


def local_run(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs), strict=True))


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sparecycles", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def assert_outputs_match(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, arr in want.items():
        assert got[name].shape == arr.shape and got[name].dtype == arr.dtype, name
        np.testing.assert_allclose(got[name], arr, rtol=1e-4, atol=1e-5, err_msg=name)


async def run_job(net: Network, model: bytes, inputs: dict[str, np.ndarray], **options: int) -> tuple[dict, dict]:
    async with submitter(net.url) as c:
        digest = await c.ensure_model(model)
        job = await c.submit(digest, inputs, **options)
        status = await c.wait(job["job"], timeout=120)
        return status, await c.outputs(job["job"])


def test_a_job_submitted_with_the_cli_is_verified_by_two_owners_and_credited(network: Network,
                                                                            tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    (tmp_path / "m.onnx").write_bytes(model)
    (tmp_path / "in.npz").write_bytes(to_npz({"x": x}))

    done = cli("submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), "--coordinator", network.url,
               "--task-size", "32", "-o", str(tmp_path / "out.npz"))

    assert done.returncode == 0, done.stderr
    assert_outputs_match(from_npz((tmp_path / "out.npz").read_bytes()), local_run(model, {"x": x}))
    balances = cli("ledger", "balances", "--coordinator", network.url, "--json")
    assert balances.returncode == 0, balances.stderr
    data = json.loads(balances.stdout)
    owners = {o["owner"]: o for o in data["owners"]}
    assert set(owners) == {"alice", "bob"}
    assert owners["alice"]["entries"] == owners["bob"]["entries"] == 10  # 300 rows / 32 -> 10 tasks
    assert data["total_credits"] == sum(n["credits"] for n in data["nodes"])
    verify = cli("ledger", "verify", "--coordinator", network.url)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_models_with_several_inputs_integer_inputs_and_a_dynamic_axis_run_end_to_end(network: Network) -> None:
    network.start_node("alice", slots=2)
    network.start_node("bob", slots=2)
    rng = np.random.default_rng(1)
    cases = [
        (models.two_inputs(), {"a": rng.standard_normal((50, 4)).astype(np.float32),
                               "b": rng.standard_normal((50, 4)).astype(np.float32)}),
        (models.int_input(), {"ids": rng.integers(0, 50, size=(40, 6)).astype(np.int64)}),
        (models.int32_input(), {"ids": rng.integers(0, 50, size=(40, 6)).astype(np.int32)}),
        (models.dynamic_seq(), {"tokens": rng.standard_normal((30, 11)).astype(np.float32)}),
    ]

    async def run_all() -> list[tuple[dict, dict]]:
        return list(await asyncio.gather(*(run_job(network, m, i, task_size=8) for m, i in cases)))

    for (model, inputs), (status, outputs) in zip(cases, asyncio.run(run_all()), strict=True):
        assert status["state"] == "done"
        assert_outputs_match(outputs, local_run(model, inputs))
    # the dotted output name of two_inputs() survives the round trip
    assert "sum.out" in asyncio.run(run_job(network, cases[0][0], cases[0][1]))[1]


def test_a_job_submitted_before_any_node_connects_waits_and_then_completes(network: Network) -> None:
    model = models.classifier()
    x = np.ones((20, 8), dtype=np.float32)

    async def scenario() -> tuple[dict, dict]:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=5)
            await asyncio.sleep(1.0)
            assert (await c.status(job["job"]))["state"] == "running"
            await asyncio.to_thread(network.start_node, "alice")
            await asyncio.to_thread(network.start_node, "bob")
            return await c.wait(job["job"], timeout=60), await c.outputs(job["job"])

    status, outputs = asyncio.run(scenario())
    assert status["tasks"]["verified"] == 4
    assert_outputs_match(outputs, local_run(model, {"x": x}))
