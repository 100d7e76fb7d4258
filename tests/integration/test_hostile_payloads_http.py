"""The hostile-payload corpus of tests/unit/test_hostile_payloads.py posted to a real coordinator as
signed job submissions: each is a 4xx with its one-line reason, never a 500, the coordinator's
memory stays modest throughout, and it still takes an honest job afterwards.

Attack: a registered account posts small npz or JSON job bodies built to allocate terabytes
(shapes and dtypes that lie), store a decompression bomb, blow the parser's recursion, or stall
the event loop with a huge JSON body.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import psutil

from coordinator.json_inputs import MAX_JSON_BODY_BYTES
from protocol.npz import to_npz
from tests import models
from tests.unit.test_hostile_payloads import Case, json_cases, npz_cases

from . import signed
from .network import SUBMITTER, Network, submitter

MiB = 1024 * 1024
# An honest coordinator is ~100-200 MiB; "Unable to allocate 149 GiB" or a 2 GB dtype would show.
RSS_GROWTH = 150 * MiB


def test_every_hostile_job_body_is_a_4xx_and_the_coordinator_keeps_serving(network: Network) -> None:
    assert network.coordinator is not None
    coordinator = psutil.Process(network.coordinator.pid)

    async def scenario() -> None:
        async with submitter(network.url), aiohttp.ClientSession() as session:
            audience = await signed.audience(session, network.url)

            async def post(body: bytes, content_type: str, params: dict[str, str] | None = None,
                           *, stream: bool = False) -> tuple[int, object]:
                status, answer, _ = await signed.call(
                    session, network.url, "POST", "/v1/jobs", identity=SUBMITTER, audience=audience, data=body,
                    headers={"Content-Type": content_type}, params=params, stream=stream)
                return status, answer

            status, answer, _ = await signed.call(session, network.url, "PUT", "/v1/models", identity=SUBMITTER,
                                                  audience=audience, data=models.classifier())
            assert status in (200, 201), answer
            digest = str(answer["model"])
            baseline = coordinator.memory_info().rss

            cases: list[tuple[Case, str]] = [(c, "application/x-npz") for c in npz_cases()]
            cases += [(c, "application/json") for c in json_cases()]
            for case, content_type in cases:
                status, answer = await post(case.body, content_type, {"model": digest})
                assert status == case.status, (case.name, status, answer)
                assert isinstance(answer, dict) and case.reason in answer["error"], (case.name, answer)
                grown = coordinator.memory_info().rss - baseline
                assert grown < RSS_GROWTH, f"{case.name}: the coordinator grew by {grown // MiB} MiB"

            # Attack: a JSON body past the JSON limit (json.loads would stall the loop ~70 ms/MiB)
            huge = json.dumps({"model": digest, "inputs": {"x": {"dtype": "float32", "shape": [1],
                                                                 "data": [0] * (MAX_JSON_BODY_BYTES // 2)}}})
            status, answer = await post(huge.encode(), "application/json", stream=True)
            assert status == 413 and "application/x-npz" in answer["error"], (status, answer)  # type: ignore[index]
            assert coordinator.memory_info().rss - baseline < RSS_GROWTH

            # ...and it still serves honest jobs, both ways
            x = np.ones((4, 8), dtype=np.float32)
            status, answer = await post(json.dumps({"model": digest, "inputs": {
                "x": {"dtype": "float32", "shape": [4, 8], "data": x.tolist()}}}).encode(), "application/json")
            assert status == 202, answer
            status, answer = await post(to_npz({"x": x}), "application/x-npz", {"model": digest})
            assert status == 202, answer
            async with session.get(f"{network.url}/v1/health") as r:
                health = await r.json()
            assert r.status == 200 and health["jobs"] == {"running": 2}, health
        assert coordinator.is_running()

    asyncio.run(scenario())
