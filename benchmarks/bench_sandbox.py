"""What the node's process boundary costs: a task run in-process against a run in a sandboxed worker.

    python benchmarks/bench_sandbox.py [--runs 3000]

Issue 9 moved every task into protocol/sandbox.py's workers (node/runner.py). This measures the
price on the tiny classifier (68 FLOP/row, where the boundary weighs most) and on the deep MLP,
for one-row and batched tasks, side by side in one run: tasks/s and the median per-task time of a
plain single-threaded onnxruntime session in this process, and of `Runner.run` through a warm
worker (ship inputs, run, ship outputs back, check them). The network benchmark
(benchmarks/bench_network.py) shows what that costs a whole verified task.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.runner import Runner
from protocol.digests import sha256_hex
from protocol.runrecipe import session_options
from protocol.tensors import tensors_from_arrays
from tests.models import classifier, deep_mlp


def in_process(model: bytes, x: np.ndarray, runs: int) -> list[float]:
    session = ort.InferenceSession(model, sess_options=session_options(ort, 99), providers=["CPUExecutionProvider"])
    session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = session.run(None, {"x": x})
        tensors_from_arrays({"y": out[0]})  # the node builds wire tensors from the outputs either way
        times.append(time.perf_counter() - t0)
    return times


async def sandboxed(path: Path, digest: str, x: np.ndarray, runs: int) -> list[float]:
    runner = Runner(1)
    try:
        inputs = tensors_from_arrays({"x": x})
        await runner.run(path, digest, 99, inputs)  # start the worker, load the session
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            await runner.run(path, digest, 99, inputs)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        await runner.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3000, help="runs per case (default %(default)s)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'case':<34} {'in-process tasks/s':>18} {'sandboxed tasks/s':>18} {'median in / sandboxed':>24} "
          f"{'extra per task':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("tiny classifier, 1 row", classifier(8, 4), 8, 1, args.runs),
                 ("tiny classifier, 4096 rows", classifier(8, 4), 8, 4096, args.runs // 5),
                 ("deep MLP, 16 rows", deep_mlp(), 384, 16, args.runs // 10))
        for name, model, width, rows, runs in cases:
            path = Path(tmp) / f"{name[:4]}.onnx"
            path.write_bytes(model)
            x = rng.standard_normal((rows, width)).astype(np.float32)
            inside = in_process(model, x, runs)
            outside = asyncio.run(sandboxed(path, sha256_hex(model), x, runs))
            mi, mo = statistics.median(inside), statistics.median(outside)
            print(f"{name:<34} {runs / sum(inside):>18,.0f} {runs / sum(outside):>18,.0f} "
                  f"{mi * 1e6:>10.1f} / {mo * 1e6:>7.1f} µs {(mo - mi) * 1e6:>11.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
