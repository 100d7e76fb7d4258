"""The embedded broker (`python -m sparecycles.cli.broker`, amqtt) as a real process, checked for the three
things the coordinator relies on: QoS-1 delivery, retained messages and a Will when a client dies."""

from __future__ import annotations

import asyncio
import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from sparecycles.cli.processes import ManagedProcess, ProcessGroup, free_port

pytestmark = pytest.mark.integration

RECEIVE_TIMEOUT = 10.0
QUIET_SECONDS = 0.5

# A client that announces itself "online" (retained) with a Will of "offline" (retained), then
# waits to be killed: the node daemon's status topic in miniature.
DYING_CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    import aiomqtt

    async def main() -> None:
        port, topic = int(sys.argv[1]), sys.argv[2]
        will = aiomqtt.Will(topic, b"offline", qos=1, retain=True)
        async with aiomqtt.Client("127.0.0.1", port, will=will, keepalive=60) as client:
            await client.publish(topic, b"online", qos=1, retain=True)
            print("client connected", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


class Broker:
    def __init__(self, process: ManagedProcess, port: int) -> None:
        self.process = process
        self.port = port

    def client(self, **kwargs: object) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", self.port, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        proc = group.start("sparecycles.cli.broker", ["--listen", f"127.0.0.1:{port}"], ready=r"broker ready",
                           timeout=30)
        yield Broker(proc, port)
    # The group stopped exactly this PID; a clean SIGTERM shutdown exits 0.
    assert proc.returncode == 0, proc.log_tail()


def unique_topic(kind: str) -> str:
    return f"test/{kind}/{uuid.uuid4().hex}"


async def next_message(client: aiomqtt.Client, seconds: float = RECEIVE_TIMEOUT) -> aiomqtt.Message:
    async with asyncio.timeout(seconds):
        return await anext(aiter(client.messages))


async def no_message(client: aiomqtt.Client, seconds: float = QUIET_SECONDS) -> bool:
    try:
        await next_message(client, seconds)
    except TimeoutError:
        return True
    return False


async def test_a_qos1_message_reaches_a_subscriber_with_qos1(broker: Broker) -> None:
    topic = unique_topic("qos1")
    async with broker.client() as subscriber, broker.client() as publisher:
        await subscriber.subscribe(topic, qos=1)

        await publisher.publish(topic, b"payload-1", qos=1)

        message = await next_message(subscriber)
    assert message.topic.value == topic
    assert message.payload == b"payload-1"
    assert message.qos == 1


async def test_a_retained_message_reaches_a_late_subscriber_and_an_empty_one_clears_it(
    broker: Broker,
) -> None:
    topic = unique_topic("retained")
    async with broker.client() as publisher:
        await publisher.publish(topic, b"kept", qos=1, retain=True)

    async with broker.client() as late:
        await late.subscribe(topic, qos=1)
        message = await next_message(late)
    assert (message.payload, message.retain) == (b"kept", True)

    async with broker.client() as publisher:
        await publisher.publish(topic, b"", qos=1, retain=True)
    async with broker.client() as later:
        await later.subscribe(topic, qos=1)
        assert await no_message(later)


async def test_a_connecting_client_gets_no_retained_messages_for_other_clients_subscriptions(
    broker: Broker,
) -> None:
    prefix = unique_topic("isolation")
    async with broker.client() as coordinator:
        await coordinator.subscribe(f"{prefix}/status/+", qos=1)
        async with broker.client() as node_a:
            await node_a.publish(f"{prefix}/status/a", b"online", qos=1, retain=True)
        assert (await next_message(coordinator)).payload == b"online"

        # amqtt 0.12.1 alone hands this client node a's status, because the coordinator's
        # subscription matches it; cli.broker patches that out.
        async with broker.client() as node_b:
            await node_b.subscribe(f"{prefix}/assign/b", qos=1)
            assert await no_message(node_b)


async def test_a_killed_clients_will_is_delivered_and_retained(broker: Broker, tmp_path: Path) -> None:
    topic = unique_topic("status")
    (tmp_path / "dying_client.py").write_text(DYING_CLIENT)
    async with broker.client() as watcher:
        await watcher.subscribe(topic, qos=1)
        with ProcessGroup(tmp_path / "logs", env={"PYTHONPATH": str(tmp_path)}) as clients:
            client = clients.start("dying_client", [str(broker.port), topic], ready=r"client connected")
            assert (await next_message(watcher)).payload == b"online"

            # SIGKILL: the client sends no DISCONNECT; the kernel closes its socket.
            client.kill()

            will = await next_message(watcher)
    assert will.payload == b"offline"

    async with broker.client() as late:
        await late.subscribe(topic, qos=1)
        message = await next_message(late)
    assert (message.payload, message.retain) == (b"offline", True)


async def test_a_clean_disconnect_does_not_send_the_will(broker: Broker) -> None:
    topic = unique_topic("clean")
    async with broker.client() as watcher:
        await watcher.subscribe(topic, qos=1)
        async with broker.client(will=aiomqtt.Will(topic, b"offline", qos=1)):
            pass
        assert await no_message(watcher)


def test_port_zero_reports_the_bound_port_and_sigterm_exits_zero(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        proc = group.start("sparecycles.cli.broker", ["--listen", "127.0.0.1:0"])
        match = proc.wait_for_line(r"broker ready mqtt://127\.0\.0\.1:(\d+)$", timeout=30)
        assert int(match.group(1)) > 0

        assert proc.terminate(timeout=10) == 0
    assert "broker stopped" in proc.log_text()
    assert os.path.exists(proc.log_path)
