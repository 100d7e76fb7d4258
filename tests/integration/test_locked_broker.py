"""The whole network on a locked-down broker (Mosquitto with dynamic security, as docker-compose.yml
runs it): the coordinator provisions a login per registered node, a job completes, and what a node's
login may do on the broker is only what its role allows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import numpy as np
import pytest

from protocol.certs import issue_certificate
from protocol.signing import Identity
from sparecycles.cli.processes import ProcessGroup
from tests import models

from . import signed
from .dynsec import DynsecBroker, dynsec_broker  # noqa: F401 - the fixture
from .network import Network, submitter
from .test_end_to_end import assert_outputs_match, local_run

pytestmark = pytest.mark.integration


async def health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/health") as r:
        return dict(await r.json())


async def refused(broker: DynsecBroker, **kwargs: Any) -> str | None:
    """The broker's refusal when connecting with these settings, or None if it let the client in."""
    try:
        async with aiomqtt.Client(broker.host, broker.port, timeout=5, **kwargs):
            return None
    except aiomqtt.MqttError as exc:
        return str(exc)


def test_a_job_completes_on_a_locked_broker_and_nodes_get_only_their_own_topics(
        dynsec_broker: DynsecBroker, tmp_path: Path) -> None:  # noqa: F811 - pytest fixture by name
    broker = dynsec_broker
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=tmp_path, broker_url=f"mqtt://{broker.host}:{broker.port}")
        coordinator = net.start_coordinator("--broker-admin", f"{broker.admin_user}:{broker.admin_password}")
        net.start_node("alice")
        net.start_node("bob")
        model, x = models.classifier(), np.random.default_rng(4).standard_normal((40, 8)).astype(np.float32)

        async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
            async with submitter(net.url) as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=4)
                status = await c.wait(job["job"], timeout=60)
                outputs = await c.outputs(job["job"])
            async with aiohttp.ClientSession() as s, s.get(f"{net.url}/v1/info") as r:
                info = await r.json()
            return status, outputs, info

        status, outputs, info = asyncio.run(scenario())
        assert status["state"] == "done" and status["tasks"]["verified"] == 10
        assert_outputs_match(outputs, local_run(model, {"x": x}))
        assert "not access-controlled" not in coordinator.log_text()
        prefix = info["topic_prefix"]

        # Attack: an anonymous client reads every input and result, or forges a node's status.
        assert asyncio.run(refused(broker)) is not None
        # Attack: a stranger takes over the coordinator's persistent session by its client id. The
        # node processes' logins exist now; none of them may use the coordinator's id, and a wrong
        # password for the coordinator's login is refused.
        coordinator_id = f"coord-{info['coordinator'][:16]}"
        assert asyncio.run(refused(broker, identifier=coordinator_id, username=coordinator_id,
                                   password="guess")) is not None

        # The nodes connected with the logins the coordinator provisioned (no credentials were given
        # to them): the coordinator's own counters show their results were accepted, not refused.
        counters = asyncio.run(health(net.url))["counters"]
        assert counters.get("rejected_unregistered_node", 0) == 0
        assert not any(k.startswith("rejected_wrong_sender") for k in counters)

        # What the broker holds for the nodes: one client per node, bound to its own id, whose role
        # writes its own topics only (checked against the plugin's own account of it).
        async def node_roles() -> dict[str, Any]:
            from coordinator.broker_acl import DynamicSecurity

            async with DynamicSecurity(broker.host, broker.port, username=broker.admin_user,
                                       password=broker.admin_password) as dynsec:
                answers = await dynsec.run([{"command": "listClients", "verbose": True}])
            return answers[0]

        listing = asyncio.run(node_roles())
        clients = {c["username"]: c for c in listing["data"]["clients"]}
        node_ids = [line.split("id=")[1].split()[0] for p in net.nodes for line in p.log_text().splitlines()
                    if "node ready id=" in line]
        assert len(node_ids) == 2
        for node in node_ids:
            assert clients[node]["clientid"] == node
            assert [r["rolename"] for r in clients[node]["roles"]] == [f"sc-node-{node}"]
        assert all("broker_login=per-node" in p.log_text() for p in net.nodes)

        # Attack: a registered node (mallory's, with the login the coordinator gave it) listens to
        # every node's assignments and results while a job runs, and publishes on alice's topics.
        async def mallory() -> tuple[int, int, dict[str, Any]]:
            me, owner = Identity.generate(), Identity.generate()
            async with aiohttp.ClientSession() as s:
                aud = await signed.audience(s, net.url)
                await signed.call(s, net.url, "POST", "/v1/accounts", json={"name": "mallory"}, identity=owner,
                                  audience=aud)
                cert = issue_certificate(owner, me.public_key, now=time.time())
                status, answer, _ = await signed.call(s, net.url, "POST", "/v1/nodes", identity=me, audience=aud,
                                                      json={"certificate": cert.to_text()})
            assert status == 200 and answer["owner"] == "mallory", answer
            login = answer["mqtt"]
            before = (await health(net.url))["counters"]
            heard: list[str] = []
            async with aiomqtt.Client(broker.host, broker.port, identifier=me.id, username=login["username"],
                                      password=login["password"]) as spy:
                for topic in (f"{prefix}/assign/+", f"{prefix}/result/+", f"{prefix}/work/+", "#"):
                    await spy.subscribe(topic, qos=1)
                listening = asyncio.create_task(_collect(spy, heard))
                alice = node_ids[0]
                for kind in ("status", "work", "result"):
                    await spy.publish(f"{prefix}/{kind}/{alice}", b"offline", qos=1)
                async with submitter(net.url) as c:
                    job = await c.submit(await c.ensure_model(model), {"x": x[:8]}, task_size=2)
                    done = await c.wait(job["job"], timeout=60)
                listening.cancel()
            after = (await health(net.url))["counters"]
            assert done["state"] == "done"
            return len(heard), sum(after.values()) - sum(before.values()), after

        heard, _, after = asyncio.run(mallory())
        assert heard == 0  # not one assignment, result or request of the other nodes reached it
        assert after.get("rejected_malformed", 0) == counters.get("rejected_malformed", 0)  # nothing got through


async def _collect(client: aiomqtt.Client, into: list[str]) -> None:
    async for message in client.messages:
        into.append(str(message.topic))
