"""`sparecycles node benchmark`: how fast this machine runs built-in models, through the same
sandboxed runner the daemon uses (node/runner.py), so the figures include what a task costs here
beyond ONNX Runtime itself (the worker process, shipping tensors in and out).

Two models, built here with onnx.helper so nothing is downloaded: a linear classifier (one MatMul,
the cheapest task, where per-task overhead dominates) and an MLP (three dense layers, where the
arithmetic does). Each runs `--seconds` on `--slots` workers at once, tasks of `--rows` rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protocol.cliparse import OneLineParser
from protocol.digests import sha256_hex
from protocol.tensors import Tensor

from .runner import RunLimits, Runner

OPSET, IR_VERSION = 17, 8  # what every onnxruntime since 1.13 loads
OPT_LEVEL = 99


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="sparecycles-benchmark")
    model.ir_version = IR_VERSION
    return bytes(model.SerializeToString())


def _dense(rng: np.random.Generator, name: str, n_in: int, n_out: int) -> list[onnx.TensorProto]:
    scale = 1.0 / np.sqrt(n_in)
    return [numpy_helper.from_array((rng.standard_normal((n_in, n_out)) * scale).astype(np.float32), f"{name}_W"),
            numpy_helper.from_array(np.zeros(n_out, np.float32), f"{name}_b")]


def classifier(features: int = 64, classes: int = 10) -> bytes:
    """probs = Softmax(x @ W + b): x float32 [N, features]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc_W"], ["z"]), helper.make_node("Add", ["z", "fc_b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=_dense(rng, "fc", features, classes))
    return _model(graph)


def mlp(features: int = 64, hidden: int = 256, classes: int = 10) -> bytes:
    """Two hidden ReLU layers of `hidden` units, then Softmax: x float32 [N, features]."""
    rng = np.random.default_rng(1)
    nodes, weights, prev = [], [], "x"
    for i, (n_in, n_out) in enumerate([(features, hidden), (hidden, hidden), (hidden, classes)]):
        name = f"fc{i}"
        weights += _dense(rng, name, n_in, n_out)
        nodes += [helper.make_node("MatMul", [prev, f"{name}_W"], [f"{name}_z"]),
                  helper.make_node("Add", [f"{name}_z", f"{name}_b"], [f"{name}_y"])]
        prev = f"{name}_y"
        if i < 2:
            nodes.append(helper.make_node("Relu", [prev], [f"{name}_a"]))
            prev = f"{name}_a"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
                              initializer=weights)
    return _model(graph)


MODELS: dict[str, Callable[[], bytes]] = {"classifier": classifier, "mlp": mlp}


@dataclass(frozen=True, slots=True)
class Figure:
    model: str
    slots: int
    rows_per_task: int
    tasks: int
    seconds: float
    rows_per_second: float
    ms_per_task: float
    """Wall time of one task as the daemon sees it (median), from request to outputs back."""
    run_ms_per_task: float
    """Inside `InferenceSession.run` alone (median): the rest is the sandbox's cost per task."""
    first_task_ms: float
    """Including the worker's start and the model's load."""


async def measure(name: str, model: bytes, *, slots: int, rows: int, seconds: float, directory: Path) -> Figure:
    path = directory / f"{name}.onnx"
    path.write_bytes(model)
    digest = sha256_hex(model)
    features = onnx.load_from_string(model).graph.input[0].type.tensor_type.shape.dim[1].dim_value
    inputs = {"x": Tensor.from_array(np.random.default_rng(2).standard_normal((rows, features)).astype(np.float32))}
    runner = Runner(slots, sessions=1, limits=RunLimits(max_run_seconds=60.0), idle_seconds=None)
    walls: list[float] = []
    runs: list[float] = []
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(runner.run(path, digest, OPT_LEVEL, inputs) for _ in range(slots)))  # warm up
        first = time.perf_counter() - t0
        deadline = time.perf_counter() + seconds

        async def lane() -> None:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                outcome = await runner.run(path, digest, OPT_LEVEL, inputs)
                walls.append(time.perf_counter() - start)
                runs.append(outcome.elapsed)

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(slots)))
        elapsed = time.perf_counter() - began
    finally:
        await runner.close()
    return Figure(model=name, slots=slots, rows_per_task=rows, tasks=len(walls), seconds=round(elapsed, 3),
                  rows_per_second=round(len(walls) * rows / elapsed, 1),
                  ms_per_task=round(float(np.median(walls)) * 1000, 3),
                  run_ms_per_task=round(float(np.median(runs)) * 1000, 3), first_task_ms=round(first * 1000, 1))


async def run(models: list[str], *, slots: int, rows: int, seconds: float) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="sparecycles-bench-") as tmp:
        return [await measure(name, MODELS[name](), slots=slots, rows=rows, seconds=seconds, directory=Path(tmp))
                for name in models]


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sparecycles node benchmark",
                                description="Measure this machine's speed on built-in models, through the "
                                            "node's sandboxed runner.")
    p.add_argument("--slots", type=_positive(int), default=1,
                   help="workers run at once (default %(default)s: one core's speed); the daemon's --slots for "
                        "the whole machine's")
    p.add_argument("--rows", type=_positive(int), default=256, help="rows per task (default %(default)s)")
    p.add_argument("--seconds", type=_positive(float), default=3.0,
                   help="measuring time per model (default %(default)s)")
    p.add_argument("--model", choices=sorted(MODELS), action="append", help="only this model (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    figures = asyncio.run(run(args.model or list(MODELS), slots=int(args.slots), rows=int(args.rows),
                              seconds=float(args.seconds)))
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "figures": [asdict(f) for f in figures]}, indent=2))
        return 0
    print(f"{'model':<11} {'slots':>5} {'rows/task':>9} {'tasks':>6} {'rows/s':>11} {'ms/task':>8} "
          f"{'run ms':>7} {'first ms':>8}")
    for f in figures:
        print(f"{f.model:<11} {f.slots:>5} {f.rows_per_task:>9} {f.tasks:>6} {f.rows_per_second:>11,.0f} "
              f"{f.ms_per_task:>8.2f} {f.run_ms_per_task:>7.2f} {f.first_task_ms:>8.0f}")
    print("ms/task: one task as the daemon sees it (median); run ms: inside onnxruntime alone; "
          "first ms: with the worker's start and the model's load")
    return 0
