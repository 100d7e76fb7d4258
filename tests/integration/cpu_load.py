"""Real CPU load for the node's idleness tests and benchmarks: a model whose tasks keep a core busy
for a known while, a CPU hog of real spinning processes (stopped by PID), and the status file read
directly (a `node status` subprocess takes ~1 s to start: too slow to time a suspension)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from node.status import status_path
from tests.models import _model

SPIN = "while True: pass\n"


def spinner(width: int = 256, depth: int = 1000, seed: int = 5) -> bytes:
    """`depth` MatMul+Tanh layers sharing one [width, width] weight: ~131 MFLOP a row in a 280 KB
    model with 1 KiB of input a row, so a task of a few hundred rows keeps a core busy for a
    fraction of a second while its inputs stay small (deep_mlp needs 60 MB of inputs for that)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "spinner", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
                              [numpy_helper.from_array(w, name="w")])
    return _model(graph)


class CpuHog:
    """`count` Python processes spinning at nice 0 (the machine's owner compiling, say), started on
    entry and killed by PID on exit or `stop()`."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started_at = 0.0

    def start(self) -> CpuHog:
        self.started_at = time.monotonic()
        self.procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL)
                      for _ in range(self.count)]
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()  # Popen.kill polls first: a reaped (maybe reused) PID is never signalled
        for proc in self.procs:
            proc.wait()
        self.procs = []

    def __enter__(self) -> CpuHog:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def read_status(key: Path) -> dict[str, Any]:
    """The daemon's status document beside `key`, or {} while it has not written one."""
    try:
        document: dict[str, Any] = json.loads(status_path(key).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return document


def poll_status(key: Path, until: Callable[[dict[str, Any]], bool], *, timeout: float,
                every: float = 0.02) -> tuple[float, dict[str, Any]]:
    """Poll the status file until `until(document)`; returns (monotonic time seen, document)."""
    deadline = time.monotonic() + timeout
    while True:
        document = read_status(key)
        now = time.monotonic()
        if document and until(document):
            return now, document
        if now >= deadline:
            raise AssertionError(f"status never matched within {timeout} s; last: {document}")
        time.sleep(every)
