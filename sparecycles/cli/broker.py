"""Embedded MQTT broker for a machine with no servers: `python -m sparecycles.cli.broker --listen HOST:PORT`.

amqtt is pure Python (MQTT 3.1.1 only, ~2k QoS-1 msg/s): fine for the demo and tests, not for
production, where Mosquitto takes its place. It supports what the coordinator relies on — QoS 1,
retained messages and a Will published when a client's socket dies — which
tests/integration/test_embedded_broker.py checks against this very process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from typing import Any

from amqtt.broker import Broker

from protocol.cliparse import OneLineParser

DEFAULT_LISTEN = "127.0.0.1:1883"
LISTENER = "default"  # amqtt requires a listener named "default"; the others inherit its settings
SHUTDOWN_TIMEOUT = 10.0


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); port 0 asks the kernel for a free one (see the ready line)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt 0.12 `BrokerConfig` as a dict (keys read from amqtt/contexts.py, not guessed).

    Giving `plugins` explicitly replaces amqtt's defaults, which add a packet logger, an event
    logger and a `$SYS` publisher every 20 s; authentication still needs one plugin that answers,
    or every CONNECT is refused.
    """
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "listeners": {LISTENER: {"type": "tcp", "bind": bind, "max_connections": 0}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class NoDelayBroker(Broker):  # type: ignore[misc]  # amqtt ships no type hints
    """An amqtt Broker that turns Nagle off on every accepted connection.

    asyncio already sets TCP_NODELAY on TCP transports (asyncio/selector_events.py), so this is
    belt and braces: without it a QoS-1 round trip took 88 ms here instead of 0.54 ms (DESIGN §3),
    and the cost of saying so explicitly is one syscall per connection.
    """

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await super().stream_connected(reader, writer, listener_name)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        """Send retained messages only for filters this session subscribed to.

        amqtt 0.12.1 bug: on every CONNECT, `_handle_client_session` calls this for each filter in
        the broker's *whole* subscription table, so a node connecting after the coordinator
        subscribed to `status/+` was handed every other node's retained status (seen as a 6-byte
        "online" the node had to drop as malformed). The check below makes that call a no-op for
        filters of other clients; the call after a SUBSCRIBE (the session is in the table by
        then) is unaffected. An amqtt without this private method never calls the override.
        """
        topic_filter = subscription[0]
        subscribers = self._subscriptions.get(topic_filter, ())
        if any(sub.client_id == session.client_id for sub, _qos in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def bound_port(broker: Broker, requested: int) -> int:
    """The port actually listened on, so `--listen HOST:0` can report it.

    amqtt has no public accessor for its servers; `_servers` is read only when port 0 was asked for.
    """
    if requested:
        return requested
    server = getattr(broker, "_servers", {}).get(LISTENER)
    sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise RuntimeError("amqtt did not expose the bound port; pass an explicit --listen port")


async def serve(host: str, port: int) -> None:
    """Run the broker until SIGTERM or SIGINT, then shut it down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    broker = NoDelayBroker(broker_config(host, port))
    await broker.start()
    try:
        shown = f"[{host}]" if ":" in host else host
        # The demo and tests wait for this exact line before connecting.
        print(f"broker ready mqtt://{shown}:{bound_port(broker, port)}", file=sys.stderr, flush=True)
        await stop.wait()
        print("broker stopping", file=sys.stderr, flush=True)
    finally:
        # amqtt's shutdown waits on each session's handler; bound it so SIGTERM always ends us.
        try:
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_TIMEOUT)
        except TimeoutError:
            print("broker shutdown timed out; exiting anyway", file=sys.stderr, flush=True)
    print("broker stopped", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m sparecycles.cli.broker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=parse_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free port)",
    )
    parser.add_argument("--verbose", action="store_true", help="show amqtt's INFO logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # amqtt logs every connection and state transition at INFO; the demo runs several of these.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    host, port = args.listen
    try:
        asyncio.run(serve(host, port))
    except OSError as exc:  # typically the port is taken
        print(f"broker failed: cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
