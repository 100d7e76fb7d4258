"""A real node daemon that lies, for tests/integration/test_adversaries.py.

    python -m tests.integration.liar_node --lie roll|error NODE_ARGS...

takes `sparecycles node`'s arguments and runs the real daemon (its own key, certified by its owner,
its own broker connection, ONNX Runtime), with one change: every task's outputs are rewritten
before they are digested and signed (`run_node(output_filter=...)`). Two liars given the same
`--lie` return the same wrong answer for a task, as colluders would.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from node import logs
from node.__main__ import build_parser, settings_from_args
from node.errors import TaskFailed
from node.worker import run_node

Arrays = dict[str, npt.NDArray[Any]]


def _roll(outputs: Arrays) -> Arrays:
    """Plausible but wrong: each row's values shifted by one (a classifier's label moves)."""
    return {name: np.roll(a, 1, axis=-1) for name, a in outputs.items()}


def _error(outputs: Arrays) -> Arrays:
    """Claims every task cannot run: the node reports `Result(error=...)` for it."""
    raise TaskFailed("refusing to run this task")


LIES: dict[str, Callable[[Arrays], Arrays]] = {"roll": _roll, "error": _error}


async def _serve(argv: list[str]) -> int:
    parser = build_parser()
    parser.add_argument("--lie", choices=sorted(LIES), required=True)
    args = parser.parse_args(argv)
    logs.configure(args.log_level or "INFO")  # None: not given (the config file may set it)
    settings = settings_from_args(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_ready(node_id: str) -> None:
        # the ready line of node/__main__.py, which the tests' process helpers wait for
        print(f"node ready id={node_id} owner={settings.owner} slots={settings.slots} lie={args.lie}",
              file=sys.stderr, flush=True)

    await run_node(settings, stop=stop, output_filter=LIES[args.lie], on_ready=on_ready)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_serve(sys.argv[1:])))
