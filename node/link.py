"""The current broker connection, shared by the loops that publish on it.

A connection comes and goes; a publisher that failed on one waits for the next rather than
retrying in a tight loop against a connection that is already dead.
"""

from __future__ import annotations

import asyncio
import socket

import aiomqtt

from protocol.topics import Topics

from .settings import BrokerAddress

# TCP_NODELAY on the MQTT socket: a QoS-1 round trip took 88 ms without it, 0.54 ms with (DESIGN §3).
# aiomqtt applies `socket_options` to paho's socket right after it connects.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def new_client(broker: BrokerAddress, node_id: str, topics: Topics, *, will: bytes) -> aiomqtt.Client:
    """`will` is the signed "offline" Status the broker publishes (retained) if this connection dies."""
    return aiomqtt.Client(
        broker.host, broker.port, identifier=node_id,
        # Mosquitto's ACL `pattern write sc/v1/+/%u` needs the username to be the node id.
        username=broker.username if broker.username is not None else node_id,
        password=broker.password,
        will=aiomqtt.Will(topics.status(node_id), will, qos=1, retain=True),
        # A persistent session: assignments published while we reconnect are queued by the
        # broker instead of lost (they would otherwise wait out their lease).
        clean_session=False,
        socket_options=NODELAY, keepalive=30)


class BrokerLink:
    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None
        self._cond = asyncio.Condition()

    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, or None while disconnected."""
        return self._client

    async def set(self, client: aiomqtt.Client | None) -> None:
        async with self._cond:
            self._client = client
            self._cond.notify_all()

    async def connected(self, *, not_this: aiomqtt.Client | None = None) -> aiomqtt.Client:
        """Wait for a connected client other than `not_this` (the one a publish just failed on)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self._client is not None and self._client is not not_this)
            assert self._client is not None
            return self._client
