"""`sparecycles coordinator ...` / `python -m coordinator ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from .app import make_app
from .http_api import COORDINATOR
from .settings import CoordinatorSettings, parse_hostport


def build_parser() -> argparse.ArgumentParser:
    d = CoordinatorSettings()
    p = argparse.ArgumentParser(prog="sparecycles coordinator",
                                description="Run the coordinator: HTTP API, MQTT dispatch, verification, ledger.")
    p.add_argument("--broker", default=d.broker_url, help="MQTT broker URL (default %(default)s)")
    p.add_argument("--db", default=d.db_url, help="sqlite:////abs/path.db or memory (default %(default)s)")
    p.add_argument("--http", default=f"{d.http_host}:{d.http_port}", help="HOST:PORT to serve (default %(default)s)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="default k per job (default %(default)s)")
    p.add_argument("--key", default=None, help="coordinator key file (default: beside the database)")
    p.add_argument("--topic-prefix", default=None, help="MQTT topic prefix (default sc/v1/<coordinator id>)")
    p.add_argument("--lease-seconds", type=float, default=d.lease_seconds)
    p.add_argument("--max-inline-kb", type=int, default=d.max_inline_bytes // 1024)
    p.add_argument("--max-body-mb", type=int, default=d.max_body_bytes // 2**20)
    p.add_argument("--log-level", default="INFO")
    return p


def settings_from_args(args: argparse.Namespace) -> CoordinatorSettings:
    host, port = parse_hostport(args.http, 8080)
    return CoordinatorSettings(broker_url=args.broker, db_url=args.db, http_host=host, http_port=port,
                               replicas=args.replicas, key_path=args.key, topic_prefix=args.topic_prefix,
                               lease_seconds=args.lease_seconds, max_inline_bytes=args.max_inline_kb * 1024,
                               max_body_bytes=args.max_body_mb * 2**20)


async def serve(settings: CoordinatorSettings) -> None:
    app = make_app(settings)
    # A stuck long poll must not hold up SIGTERM for aiohttp's default 60 s.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    coordinator = app[COORDINATOR]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(coordinator.connected.wait(), timeout=30)
    except TimeoutError:
        logging.getLogger("sparecycles.coordinator").warning(
            "broker %s not reachable yet; serving HTTP and retrying MQTT in the background", settings.broker_url)
    print(f"coordinator ready http://{settings.http_host}:{settings.http_port} id={coordinator.identity.id} "
          f"prefix={coordinator.topics.prefix}", file=sys.stderr, flush=True)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The event loop hands work to the SQLite thread and back many times per job; at CPython's
    # default 5 ms GIL switch interval each hand-off can wait that long behind the busy loop.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = settings_from_args(args)
        settings.broker  # noqa: B018 - validates the URL before anything starts
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"error: cannot serve HTTP on {args.http}: {exc}. Pick another --http HOST:PORT.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
