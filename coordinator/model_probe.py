"""Load an untrusted model in a child process with a memory limit before accepting it.

A model passes `onnx.checker` and still can be hostile: a 196-byte graph whose constant ONNX
Runtime folds at load time took 1.8 GB and 4 s here. Volunteers would pay that on every node, so the
coordinator pays it once, in a process it can cap (RLIMIT_AS) and kill (timeout), and refuses the
upload with the reason. Run as `python -m coordinator.model_probe LIMIT_BYTES` with the model on
stdin; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys

# onnxruntime's type names -> numpy dtypes, for the one-row trial run
_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
              "tensor(uint64)": "uint64", "tensor(bool)": "bool"}


async def probe_model(data: bytes, *, memory_bytes: int, seconds: float) -> None:
    """Raise `InvalidModel` unless onnxruntime loads `data` and runs it on one row of zeros within
    `memory_bytes` of address space and `seconds`. Loading alone is not enough: under a tight limit
    onnxruntime skips folding a huge constant and would then build it on every run instead."""
    from .models import InvalidModel  # here, not at the top: the child process needs none of it

    limit = memory_bytes + 4 * len(data)  # room for the weights themselves, several copies while loading
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator.model_probe", str(limit),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InvalidModel(f"onnxruntime did not load and run the model within {seconds:g} s") from None
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise InvalidModel(f"loading the model crashed onnxruntime (exit code {proc.returncode}): "
                           f"{err.decode(errors='replace')[-300:]}") from None
    if not answer.get("ok"):
        raise InvalidModel(f"onnxruntime cannot {answer.get('stage', 'load')} the model within {limit >> 20} MiB "
                           f"of memory: {answer.get('error')}")


def main(argv: list[str]) -> int:
    limit = int(argv[0])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    data = sys.stdin.buffer.read()
    import numpy as np
    import onnxruntime as ort  # after the limit: the runtime's own allocations count too

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the nodes load it
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    stage = "load"
    try:
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        stage = "run one row of"
        feeds = {}
        for i in session.get_inputs():
            dtype = _ORT_TYPES.get(i.type)
            if dtype is None:
                raise ValueError(f"input {i.name!r} has type {i.type}, which the protocol cannot carry")
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]  # symbolic dims: 1
            feeds[i.name] = np.zeros(shape, dtype=dtype)
        session.run(None, feeds)
    except Exception as exc:
        print(json.dumps({"ok": False, "stage": stage, "error": str(exc)[:500]}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
