"""Faults and hostile peers on the real network: nothing accepted twice, nothing credited twice,
no task lost (brief: Standards)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import msgpack
import numpy as np
import pytest

from ledger.verify import find_discrepancies
from node.settings import NodeSettings
from node.worker import run_node
from protocol.codec import seal
from protocol.messages import Result, Results, WorkRequest
from protocol.signing import Identity
from protocol.tensors import digest_tensors, tensors_from_arrays
from tests import models

from . import signed
from .network import SUBMITTER, Network, submitter
from .test_end_to_end import assert_outputs_match, local_run

pytestmark = pytest.mark.integration


async def health(net: Network) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{net.url}/v1/health") as r:
        return dict(await r.json())


async def ledger_consistent(net: Network) -> tuple[list[str], dict[str, Any], list[dict[str, Any]]]:
    async with submitter(net.url) as c:
        entries, accepted, balances = await c.entries(), await c.accepted(), await c.balances()
    credits = [e for e in entries if e.get("kind", "credit") == "credit"]
    return find_discrepancies(entries, accepted, balances), balances, credits


def assert_credited_once_per_result(credits: list[dict[str, Any]], *, tasks: int) -> None:
    """Every task paid, each (task, node) at most once, at most k=2 per task: 2 while nodes are
    untrusted, 1 once a trusted node ran a task alone (adaptive replication)."""
    per_task = Counter(e["task"] for e in credits)
    assert len(per_task) == tasks and all(1 <= n <= 2 for n in per_task.values()), per_task
    assert len(credits) == len({(e["task"], e["node"]) for e in credits})


def test_a_node_killed_mid_task_loses_nothing_and_its_task_completes_elsewhere(network: Network) -> None:
    for owner in ("alice", "bob", "carol"):
        network.start_node(owner)
    model, x = models.deep_mlp(), np.random.default_rng(2).standard_normal((1024, 384)).astype(np.float32)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=128)
            while (await health(network))["live_leases"] < 3:
                await asyncio.sleep(0.05)
            network.nodes[0].kill()  # SIGKILL: no goodbye, only the broker's last will
            return await c.wait(job["job"], timeout=120), await c.outputs(job["job"])

    status, outputs = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"]["verified"] == 8
    assert_outputs_match(outputs, local_run(model, {"x": x}))
    problems, _, entries = asyncio.run(ledger_consistent(network))
    assert problems == []
    assert_credited_once_per_result(entries, tasks=8)


def test_a_node_returning_wrong_outputs_is_never_accepted_nor_credited(network: Network, tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(3).standard_normal((200, 8)).astype(np.float32)
    liar_ready: list[str] = []

    def lie(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: np.roll(a, 1, axis=-1) for name, a in outputs.items()}  # plausible, but wrong

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        stop = asyncio.Event()
        settings = NodeSettings(broker_url=network.broker_url, coordinator_url=network.url,
                                key_path=tmp_path / "liar.key", owner="mallory", slots=2,
                                cache_dir=tmp_path / "liar-cache", idle_only=False)
        liar = asyncio.create_task(run_node(settings, stop=stop, output_filter=lie, on_ready=liar_ready.append))
        try:
            while not liar_ready:
                await asyncio.sleep(0.05)
            async with submitter(network.url) as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=10)
                return await c.wait(job["job"], timeout=120), await c.outputs(job["job"])
        finally:
            stop.set()
            await asyncio.wait_for(liar, 30)

    status, outputs = asyncio.run(scenario())
    assert status["state"] == "done"
    assert_outputs_match(outputs, local_run(model, {"x": x}))
    problems, balances, _ = asyncio.run(ledger_consistent(network))
    assert problems == []
    assert "mallory" not in {o["owner"] for o in balances["owners"]}
    assert liar_ready and liar_ready[0] not in {n["node"] for n in balances["nodes"]}
    assert asyncio.run(health(network))["counters"].get("disagreement", 0) > 0


def test_a_coordinator_killed_mid_job_resumes_after_restart_and_credits_nothing_twice(network: Network) -> None:
    network.start_node("alice")
    network.start_node("bob")
    model, x = models.deep_mlp(), np.random.default_rng(4).standard_normal((1536, 384)).astype(np.float32)

    async def submit_and_wait_for_progress() -> str:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=128)
            while (await c.status(job["job"]))["tasks"]["verified"] < 2:
                await asyncio.sleep(0.05)
            return str(job["job"])

    job_id = asyncio.run(submit_and_wait_for_progress())
    assert network.coordinator is not None
    network.coordinator.kill()
    time.sleep(0.5)
    network.start_coordinator()

    async def finish() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(network.url) as c:
            return await c.wait(job_id, timeout=120), await c.outputs(job_id)

    status, outputs = asyncio.run(finish())
    assert status["state"] == "done" and status["tasks"]["verified"] == 12
    assert_outputs_match(outputs, local_run(model, {"x": x}))
    problems, _, entries = asyncio.run(ledger_consistent(network))
    assert problems == []
    assert_credited_once_per_result(entries, tasks=12)


def test_malformed_and_oversized_http_requests_get_clear_errors_and_the_coordinator_keeps_serving(
        network: Network) -> None:
    assert network.coordinator is not None
    network.coordinator.terminate()
    network.start_coordinator("--max-body-mb", "4")

    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        out = []
        async with submitter(network.url):  # registers the account
            pass
        async with aiohttp.ClientSession() as s:
            aud = await signed.audience(s, network.url)

            async def call(method: str, path: str, **kw: Any) -> Any:
                status, body, _ = await signed.call(s, network.url, method, path, identity=SUBMITTER, audience=aud,
                                                    **kw)
                out.append((status, body))
                return body

            await call("PUT", "/v1/models", data=models.invalid_model_bytes())
            await call("POST", "/v1/jobs", data=b"{not json", headers={"Content-Type": "application/json"})
            await call("POST", "/v1/jobs", json={"model": "0" * 64, "inputs": {}})
            await call("POST", "/v1/jobs", data=b"garbage", headers={"Content-Type": "application/x-npz"},
                       params={"model": "0" * 64})
            await call("POST", "/v1/jobs", data=b"x", headers={"Content-Type": "text/plain"})
            await call("GET", "/v1/jobs/nope")
            digest = (await call("PUT", "/v1/models", data=models.classifier()))["model"]
            out.pop()
            await call("POST", "/v1/jobs", json={"model": digest, "inputs": {"x": {"dtype": "float32", "shape": [1, 3],
                                                                                   "data": [[1, 2, 3]]}}})
            await call("POST", "/v1/jobs", json={"model": digest, "inputs": {"wrong": {
                "dtype": "float32", "shape": [1, 8], "data": [[0] * 8]}}})
            await call("POST", "/v1/jobs", data=b"\0" * (5 * 2**20), stream=True,
                       headers={"Content-Type": "application/x-npz"}, params={"model": digest})
            await call("GET", "/v1/health")
        return out

    results = asyncio.run(scenario())
    statuses = [s for s, _ in results]
    assert statuses == [400, 400, 400, 400, 415, 404, 400, 400, 413, 200], results
    assert all("error" in body for _, body in results[:-1])
    assert "inputs" in results[7][1]["error"]  # says which names the model wants


def test_hostile_mqtt_messages_are_rejected_counted_and_the_coordinator_keeps_working(network: Network) -> None:
    async def scenario() -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(network.url + "/v1/info") as r:
            prefix = (await r.json())["topic_prefix"]
        mallory, victim = Identity.generate(), Identity.generate()
        out = tensors_from_arrays({"probs": np.ones((1, 4), dtype=np.float32)})
        forged_result = Results(node=victim.id, runtime="x", items=(Result(
            task="t", job="j", lease="nope", input_digest="0" * 64, output_digest=digest_tensors(out),
            outputs=out),))
        async with aiomqtt.Client("127.0.0.1", 1883) as client:
            await client.publish(f"{prefix}/result/{mallory.id}", b"\x00garbage", qos=1)
            await client.publish(f"{prefix}/result/{mallory.id}", b"\xc1" * 100, qos=1)
            # mallory signs a result and posts it on the victim's topic
            await client.publish(f"{prefix}/result/{victim.id}", seal(forged_result, mallory, namespace=prefix), qos=1)
            # a well-signed result for a lease nobody holds (a replay, or a guess)
            await client.publish(f"{prefix}/result/{victim.id}", seal(forged_result, victim, namespace=prefix), qos=1)
            await client.publish(f"{prefix}/work/{mallory.id}", msgpack.packb({"v": 1, "kind": "work"}), qos=1)
            await client.publish(f"{prefix}/result/{mallory.id}", b"\x00" * (9 * 2**20), qos=1)  # over 8 MiB
            request = seal(WorkRequest(node=mallory.id, owner="m", slots=1), mallory, namespace=prefix)
            await client.publish(f"{prefix}/work/{mallory.id}", request + b"x", qos=1)
        await asyncio.sleep(1.0)
        return await health(network)

    counters = asyncio.run(scenario())["counters"]
    assert counters.get("rejected_malformed", 0) >= 4
    assert counters.get("rejected_wrong_sender", 0) == 1
    assert counters.get("rejected_oversized", 0) == 1
    # a well-signed result from a key no owner certified counts for nothing, lease or not
    assert counters.get("rejected_unregistered_node", 0) == 1
    # and it still runs a job afterwards
    network.start_node("alice")
    network.start_node("bob")
    model, x = models.classifier(), np.ones((10, 8), dtype=np.float32)

    async def job() -> dict[str, Any]:
        async with submitter(network.url) as c:
            j = await c.submit(await c.ensure_model(model), {"x": x})
            return await c.wait(j["job"], timeout=60)

    assert asyncio.run(job())["state"] == "done"



def test_a_model_that_would_exhaust_a_volunteers_memory_is_refused_at_upload(network: Network) -> None:
    async def scenario() -> tuple[int, dict[str, Any], int]:
        async with submitter(network.url):  # registers the account
            pass
        async with aiohttp.ClientSession() as s:
            aud = await signed.audience(s, network.url)
            status, body, _ = await signed.call(s, network.url, "PUT", "/v1/models", data=models.memory_bomb(),
                                                identity=SUBMITTER, audience=aud)
            afterwards, _, _ = await signed.call(s, network.url, "PUT", "/v1/models", data=models.classifier(),
                                                 identity=SUBMITTER, audience=aud)
            return status, body, afterwards

    status, body, afterwards = asyncio.run(scenario())
    assert status == 400 and "of memory" in body["error"]
    assert afterwards == 201
