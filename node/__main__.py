"""`python -m node` / `sparecycles node`: run the node daemon until SIGTERM or SIGINT.

The first signal drains (queued work is released, running tasks finish and report, the node
announces itself offline); a second one exits at once. Settings come from flags, SPARECYCLES_NODE_*
variables and a TOML file (node/config.py); one daemon runs per key (node/instance.py) and tells
what it does in `<key>.status.json` (node/status.py).

`sparecycles node status` (node/status_report.py) reads that document; `sparecycles node benchmark`
(node/benchmark.py) measures this machine. Both are words before any flag.

Exit codes: 0 stopped cleanly; 1 failed (refused by the coordinator, an unexpected error);
2 bad configuration, or another daemon already runs with this key; 130 stopped by a second signal.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys

from protocol.cliparse import OneLineParser
from protocol.errors import ProtocolError
from protocol.logformat import ENV_LOG_FORMAT, LOG_FORMATS, announce

from . import config, logs
from .errors import NodeError
from .instance import AlreadyRunning, InstanceLock
from .membership import Refused
from .settings import NodeSettings
from .status import NodeState, StatusBoard, status_path
from .worker import run_node

log = logging.getLogger("node")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SUBCOMMANDS = {"status": "node.status_report", "benchmark": "node.benchmark"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="sparecycles node",
        description="Lend this machine's idle cores to a sparecycles coordinator. Settings: flags, then "
                    f"{config.ENV_PREFIX}<KEY> variables, then the --config file (docs/node.md).",
        epilog="other commands: `sparecycles node status [--json]` (what the daemon is doing), "
               "`sparecycles node benchmark` (this machine's speed). Exit codes: 0 stopped, 1 failed "
               "(e.g. refused), 2 bad configuration or another daemon runs with this key, 130 second signal.")
    config.add_arguments(p)
    # Not a config.OPTIONS key: how the daemon writes its log is the service manager's business (a
    # unit file or compose sets SPARECYCLES_LOG_FORMAT for every process), not the volunteer's file.
    p.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get(ENV_LOG_FORMAT) or "text",
                   help=f"text lines, or one JSON object per line for a log collector (default: ${ENV_LOG_FORMAT}, "
                        "else text)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparecycles")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def settings_from_args(args: argparse.Namespace) -> NodeSettings:
    """NodeSettings from parsed flags, the environment and the config file (ConfigError if wrong)."""
    return config.load(vars(args), os.environ).settings


async def _serve(settings: NodeSettings, board: StatusBoard, log_format: str) -> int:
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
        print(announce(f"node ready id={node_id} owner={settings.owner} slots={settings.slots}", log_format,
                       "node"), file=sys.stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    writer = asyncio.create_task(board.run(), name="status")
    code, why = 0, "stopped"
    try:
        await run_node(settings, stop=stop, on_ready=on_ready, status=board)
    except asyncio.CancelledError:
        code, why = EXIT_INTERRUPTED, "stopped at once by a second signal"
    except Refused as exc:
        board.set_state(NodeState.REFUSED, str(exc))
        log.error(logs.kv("node_refused", error=str(exc)))
        code, why = EXIT_FAILED, str(exc)
    except (NodeError, ProtocolError, OSError) as exc:
        log.error(logs.kv("node_failed", error=f"{type(exc).__name__}: {exc}"))
        code, why = EXIT_FAILED, f"failed: {type(exc).__name__}: {exc}"
    finally:
        writer.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        board.close(why)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        command: int = importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return command
    args = build_parser().parse_args(argv)
    if args.log_format not in LOG_FORMATS:  # from the environment, which argparse does not check
        print(f"sparecycles node: {ENV_LOG_FORMAT} must be one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config.load(vars(args), os.environ)
    except config.ConfigError as exc:
        print(f"sparecycles node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(cfg.log_level, args.log_format)
    settings = cfg.settings
    try:
        lock = InstanceLock.acquire(settings.key_path)
    except AlreadyRunning as exc:
        print(f"sparecycles node: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"sparecycles node: cannot lock {settings.key_path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    with lock:
        log.info(logs.kv("node_starting", pid=os.getpid(), key=str(settings.key_path),
                         config=str(cfg.file) if cfg.file else "-", owner=settings.owner, slots=settings.slots))
        board = StatusBoard(status_path(settings.key_path), settings=settings)
        board.write()
        try:
            code = asyncio.run(_serve(settings, board, args.log_format))
        except KeyboardInterrupt:  # a signal before the handlers were installed
            code = EXIT_INTERRUPTED
    return code


if __name__ == "__main__":
    sys.exit(main())
