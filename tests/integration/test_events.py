"""The event streams and listings against a real coordinator, real nodes and the real broker:
GET /v1/jobs/{job}/events (progress, then done, then the end), GET /v1/jobs, GET /v1/nodes,
GET /v1/events and its bound on open streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest

from coordinator.events_http import MAX_STREAMS, MAX_STREAMS_PER_ADDRESS
from tests import models

from .network import Network, submitter

pytestmark = pytest.mark.integration


async def read_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    event, data = "message", ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and data:
            out.append((event, json.loads(data)))
            event, data = "message", ""
    return out  # the server ended the stream


def test_a_jobs_stream_says_why_it_waits_reports_progress_and_ends_with_done(network: Network) -> None:
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)

    async def scenario() -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], dict[str, Any]]:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(models.classifier()), {"x": x}, task_size=8)
        token = {"X-Sparecycles-Job-Token": job["read_token"]}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{network.url}/v1/jobs/{job['job']}/events", headers=token) as resp:
                assert resp.status == 200 and resp.content_type == "text/event-stream"
                reader = asyncio.create_task(read_events(resp))
                await asyncio.sleep(1.0)  # the first progress event goes out before any node exists
                for owner in ("alice", "bob"):
                    await asyncio.to_thread(network.start_node, owner)
                events = await asyncio.wait_for(reader, 90)
            async with s.get(f"{network.url}/v1/jobs") as r:  # unsigned: the public summary
                listing = await r.json()
            async with s.get(f"{network.url}/v1/nodes") as r:
                nodes = await r.json()
        return events, listing, nodes

    events, listing, nodes = asyncio.run(scenario())
    kinds = [k for k, _ in events]
    assert kinds[0] == "progress" and kinds[-1] == "done" and kinds.count("done") == 1
    assert events[0][1]["why"] == "waiting: 0 of 2 required owners online"
    assert events[0][1]["eta_seconds"] is None  # nothing online: no honest estimate
    assert events[-1][1]["tasks"]["verified"] == 8 and events[-1][1]["eta_seconds"] == 0.0
    row = listing["jobs"][0]
    assert row["state"] == "done" and row["tasks"]["verified"] == 8 and row["submitter"] == "tester"
    assert row["model"] is None and "failures" not in row  # a stranger does not learn the model's digest
    assert {n["owner"] for n in nodes["nodes"]} == {"alice", "bob"}
    assert all(n["trust"]["level"] in ("trusted", "untrusted") for n in nodes["nodes"])


def test_the_dashboard_stream_sends_snapshots_and_refuses_streams_past_the_bound(network: Network) -> None:
    """Attack: an anonymous client opening thousands of streams, each holding a socket and a task
    on the coordinator. One address gets at most MAX_STREAMS_PER_ADDRESS (it cannot take every place
    from the others); past MAX_STREAMS in all the next is refused at once with 503 and Retry-After;
    closing streams gives their places back. The clients come from distinct loopback addresses
    (127.0.0.2, ...: all of 127/8 is local on Linux)."""
    per_address = MAX_STREAMS_PER_ADDRESS
    addresses = [f"127.0.0.{2 + i}" for i in range(MAX_STREAMS // per_address + 1)]

    def session(address: str) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, local_addr=(address, 0)))

    async def scenario() -> tuple[dict[str, Any], int, int, str | None, int]:
        sessions = [session(a) for a in addresses]
        try:
            first = await sessions[0].get(f"{network.url}/v1/events")
            line = b""
            while not line.startswith(b"data: "):
                line = await first.content.readline()
            snapshot = json.loads(line[6:])
            opened = [first]
            url = f"{network.url}/v1/events"
            opened += await asyncio.gather(*(sessions[0].get(url) for _ in range(per_address - 1)))
            one_more_here = await sessions[0].get(f"{network.url}/v1/events")
            own_status = one_more_here.status
            one_more_here.release()
            for s in sessions[1:-1]:
                opened += await asyncio.gather(*(s.get(f"{network.url}/v1/events") for _ in range(per_address)))
            assert len(opened) == MAX_STREAMS and all(r.status == 200 for r in opened)
            refused = await sessions[-1].get(f"{network.url}/v1/events")
            status, retry = refused.status, refused.headers.get("Retry-After")
            refused.release()
            for r in opened:
                r.close()
            await asyncio.sleep(1.5)  # the server notices the closed sockets at its next write
            again = await sessions[-1].get(f"{network.url}/v1/events")
            again_status = again.status
            again.close()
        finally:
            for s in sessions:
                await s.close()
        return snapshot, own_status, status, retry, again_status

    snapshot, own_status, status, retry, again = asyncio.run(scenario())
    assert own_status == 503  # the 11th from one address, with 90 places still free
    assert set(snapshot) >= {"jobs", "nodes", "throughput", "ledger", "blocked", "unit"}
    assert set(snapshot["ledger"]) >= {"balances", "recent", "checkpoint"}
    assert status == 503 and retry is not None
    assert again == 200
