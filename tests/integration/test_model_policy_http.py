"""The model policy and the sandboxed probe, against a real coordinator process.

Attack (issue 9): an account uploads a model whose tensors name the coordinator's key file by a
relative `location`; before the fix ORT's error text carried the key's bytes back in the 400.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp

from tests import models
from tests.unit.test_model_policy import SECRET, hostile_models

from . import signed
from .network import SUBMITTER, Network, submitter


async def _put(session: aiohttp.ClientSession, url: str, audience: str,
               data: bytes) -> tuple[int, Any, dict[str, str]]:
    return await signed.call(session, url, "PUT", "/v1/models", identity=SUBMITTER, audience=audience, data=data,
                             stream=True)


def test_hostile_models_are_400_with_a_short_reason_and_never_the_secret(network: Network) -> None:
    """Attack: external data in every place ONNX allows it, custom domains, over-deep graphs, and a
    load-time memory bomb; the secret beside the database must appear nowhere in any answer."""
    secret = network.db.parent / "coordinator.db.fake.key"
    secret.write_bytes(SECRET)
    location = os.path.relpath(secret, os.getcwd())  # the coordinator runs in the test's cwd

    async def scenario() -> None:
        async with submitter(network.url), aiohttp.ClientSession() as session:
            audience = await signed.audience(session, network.url)
            for name, (data, reason) in hostile_models(location).items():
                status, answer, _ = await _put(session, network.url, audience, data)
                assert status == 400, (name, status, answer)
                assert isinstance(answer, dict) and reason in answer["error"], (name, answer)
                assert SECRET.decode() not in str(answer), name
            status, answer, _ = await _put(session, network.url, audience, models.memory_bomb())
            assert status == 400 and answer["error"] == "the model ran out of memory", answer
            status, answer, _ = await _put(session, network.url, audience, models.classifier())
            assert status in (200, 201), answer

    asyncio.run(scenario())


def test_probes_beyond_the_limit_get_429_with_retry_after(network: Network) -> None:
    """Attack: many uploads at once, each a 1 GiB probe child; beyond --model-probes the coordinator
    answers 429 instead of starting more children or queueing without bound."""
    assert network.coordinator is not None
    network.coordinator.terminate()  # the fixture's coordinator, by its PID; the same database and port
    network.start_coordinator("--model-probes", "1")

    async def scenario() -> None:
        async with submitter(network.url), aiohttp.ClientSession() as session:
            audience = await signed.audience(session, network.url)
            uploads = [models.deep_mlp(seed=s) for s in range(6)]
            answers = await asyncio.gather(*(_put(session, network.url, audience, d) for d in uploads))
            statuses = [status for status, _, _ in answers]
            assert 429 in statuses and any(s in (200, 201) for s in statuses), statuses
            for status, _, headers in answers:
                if status == 429:
                    assert int(headers["Retry-After"]) > 0

    asyncio.run(scenario())
