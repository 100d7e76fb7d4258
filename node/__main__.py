"""`python -m node` / `sparecycles node`: run the node daemon until SIGTERM or SIGINT.

The first signal drains (queued work is released, running tasks finish and report, the node
announces itself offline); a second one exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from protocol.errors import ProtocolError

from . import logs
from .errors import NodeError
from .settings import NodeSettings, default_cache_dir, default_key_path, default_owner, default_slots
from .worker import run_node

log = logging.getLogger("node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparecycles node",
                                description="Lend this machine's idle cores to a sparecycles coordinator.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="mqtt://HOST:PORT",
                   help="MQTT broker (default %(default)s)")
    p.add_argument("--coordinator", default="http://127.0.0.1:8080", metavar="http://HOST:PORT",
                   help="coordinator HTTP API (default %(default)s)")
    p.add_argument("--key", type=Path, default=default_key_path(), metavar="PATH",
                   help="node key file, created with mode 0600 if absent (default %(default)s)")
    p.add_argument("--owner", default=default_owner(),
                   help="the account that gets the credit (default: $USER); on an open coordinator it is "
                        "registered on first use with a key kept beside the node key")
    p.add_argument("--owner-key", type=Path, default=None, metavar="PATH",
                   help="the owner account's key (default: owner-<OWNER>.key beside --key, created if absent)")
    p.add_argument("--cert", type=Path, default=None, metavar="FILE",
                   help="a certificate from the owner (sparecycles owner certify NODE_PUBKEY); no owner key needed")
    p.add_argument("--slots", type=int, default=default_slots(),
                   help="tasks run at once, one core each (default: all %(default)s cores)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), metavar="DIR",
                   help="model cache directory (default %(default)s)")
    p.add_argument("--cache-quota-mb", type=int, default=2048, metavar="MB",
                   help="model cache size limit (default %(default)s MB)")
    p.add_argument("--prefetch", type=int, default=None, metavar="N",
                   help="assignments held beyond --slots, fetched ahead (default: as many as --slots)")
    p.add_argument("--drain-seconds", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, how long running tasks may take to finish (default %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   type=str.upper, help="(default %(default)s)")
    return p


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    return NodeSettings(broker_url=args.broker, coordinator_url=args.coordinator,
                        key_path=args.key.expanduser(), owner=args.owner, slots=args.slots,
                        cache_dir=args.cache_dir.expanduser(),
                        cache_quota_bytes=args.cache_quota_mb * 1024 * 1024, prefetch=args.prefetch,
                        drain_seconds=args.drain_seconds,
                        owner_key_path=None if args.owner_key is None else args.owner_key.expanduser(),
                        cert_path=None if args.cert is None else args.cert.expanduser())


async def _serve(settings: NodeSettings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning(logs.kv("signal", name=sig.name, action="exit now"))
            if main_task is not None:
                main_task.cancel()
            return
        log.info(logs.kv("signal", name=sig.name, action="drain", drain_seconds=settings.drain_seconds))
        stop.set()

    def on_ready(node_id: str) -> None:
        # tests and scripts wait for this exact line
        print(f"node ready id={node_id} owner={settings.owner} slots={settings.slots}",
              file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await run_node(settings, stop=stop, on_ready=on_ready)
    except asyncio.CancelledError:
        return 130
    except (NodeError, ProtocolError, OSError) as exc:
        log.error(logs.kv("node_failed", error=f"{type(exc).__name__}: {exc}"))
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _abandoned_runs() -> bool:
    """Slot threads still inside ONNX Runtime after the drain deadline (they cannot be stopped)."""
    busy = [t for t in threading.enumerate() if t.name.startswith("sc-slot") and t.is_alive()]
    for thread in busy:
        thread.join(timeout=1.0)
    return any(t.is_alive() for t in busy)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    # Slot threads hand every result back to the event loop; at CPython's default 5 ms GIL switch
    # interval that hand-off can wait behind a busy loop (measured: ~10% of a one-task job's latency).
    sys.setswitchinterval(0.0005)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        code = asyncio.run(_serve(settings))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        code = 130
    if _abandoned_runs():
        # Interpreter exit would join those threads and wait out the runs: leave without them.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
