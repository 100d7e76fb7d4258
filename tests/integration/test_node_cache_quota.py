"""The model cache's disk quota with real daemons: a node with a small `--cache-quota-mb` runs jobs
on more models than fit, evicts the least recently used file, and every job still completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from protocol.digests import sha256_hex
from tests import models
from tests.integration.cpu_load import poll_status

from .network import Network, submitter

pytestmark = pytest.mark.integration

QUOTA_MB = 2


def local_run(model: bytes, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out


def test_a_cache_over_quota_evicts_the_least_recently_used_model_and_jobs_complete(network: Network) -> None:
    """Failure defended: a volunteer's disk filling with other people's models. The quota holds
    two of these models; using A again before C arrives makes B the least recently used, so an
    eviction by age of arrival (A first) would be caught."""
    small = network.start_node("alice", "--cache-quota-mb", str(QUOTA_MB))
    network.start_node("bob")  # the second owner a task's two replicas need
    cache_dir = network.tmp / "cache0"
    a, b, c = (models.deep_mlp(width=256, depth=3, seed=seed) for seed in (1, 2, 3))
    assert all(len(m) > QUOTA_MB * 2**20 / 3 for m in (a, b, c))  # any three exceed the quota
    assert 2 * len(a) < QUOTA_MB * 2**20  # while two fit
    x = np.random.default_rng(5).standard_normal((64, 256)).astype(np.float32)

    async def run(model: bytes) -> np.ndarray:
        async with submitter(network.url) as client:
            job = await client.submit(await client.ensure_model(model), {"x": x}, task_size=32)
            status = await client.wait(job["job"], timeout=120)
            assert status["state"] == "done", status
            out: np.ndarray = (await client.outputs(job["job"]))["probs"]
            return out

    for model in (a, b, a, c):
        np.testing.assert_allclose(asyncio.run(run(model)), local_run(model, x), rtol=1e-4, atol=1e-5)

    cached = {p.name.removesuffix(".onnx") for p in Path(cache_dir).glob("*.onnx")}
    assert cached == {sha256_hex(a), sha256_hex(c)}, cached
    assert sum(p.stat().st_size for p in Path(cache_dir).glob("*.onnx")) <= QUOTA_MB * 2**20
    assert f"model_evicted model={sha256_hex(b)[:12]}" in small.log_text()
    # the status file is rewritten every few seconds: wait for the one after the last job
    _, document = poll_status(network.tmp / "node0.key", lambda d: d["models"]["count"] == 2, timeout=15)
    assert document["models"]["bytes"] == len(a) + len(c) and document["tasks"]["failed"] == 0, document
