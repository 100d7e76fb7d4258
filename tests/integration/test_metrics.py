"""`GET /metrics` scraped during a real job (real coordinator, nodes, Mosquitto, ONNX Runtime): the
counters move, the gauges say what runs, the histograms fill, and nothing identifies a job or node."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import models

from .network import Network, submitter

pytestmark = pytest.mark.integration
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> tuple[Samples, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_while_a_real_job_runs(network: Network) -> None:
    network.start_node("alice")
    network.start_node("bob")
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(3).standard_normal((240, 8)).astype(np.float32)

    async def scenario() -> tuple[Samples, list[Samples], Samples, str, dict[str, Any]]:
        before, _ = await scrape(network.url)
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=20)
            during: list[Samples] = []
            waiter = asyncio.create_task(c.wait(job["job"], timeout=120))
            while not waiter.done():
                during.append((await scrape(network.url))[0])
                await asyncio.sleep(0.05)
            status = await waiter
        after, text = await scrape(network.url)
        return before, during, after, text, {**status, "id": job["job"]}

    before, during, after, text, status = asyncio.run(scenario())

    assert status["state"] == "done" and status["tasks"]["verified"] == 12
    assert value(before, "sparecycles_tasks_decided_total", outcome="verified_checked") == 0
    assert value(before, "sparecycles_broker_connected") == 1
    # while it ran, a scrape saw it running (the first scrape comes right after the submit)
    assert any(value(s, "sparecycles_jobs", state="running") == 1 for s in during)
    assert value(after, "sparecycles_jobs", state="done") == 1
    assert value(after, "sparecycles_jobs", state="running") == 0
    assert value(after, "sparecycles_tasks", state="verified") == 12
    assert value(after, "sparecycles_tasks", state="open") == 0
    decided = sum(value(after, "sparecycles_tasks_decided_total", outcome=o)
                  for o in ("verified_checked", "verified_unchecked"))
    assert decided == 12
    assert value(after, "sparecycles_results_total", verdict="accepted") >= 12
    assert value(after, "sparecycles_nodes_online") == 2
    assert value(after, "sparecycles_task_seconds_count") == 12
    assert value(after, "sparecycles_task_seconds_sum") > 0
    assert value(after, "sparecycles_http_request_seconds_count", route="/v1/jobs", method="POST", status="202") == 1
    assert value(after, "sparecycles_queue_depth", queue="live_leases") == 0
    # Attack: labels from request paths would let anyone grow /metrics without bound and would
    # publish job ids; only route templates appear.
    assert status["id"] not in text and "/v1/jobs/{job}" in text
