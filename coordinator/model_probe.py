"""Load an untrusted model in a child process with a memory limit before accepting it.

A model passes `onnx.checker` and still can be hostile: a 196-byte graph whose constant ONNX
Runtime folds at load time took 1.8 GB and 4 s here. Volunteers would pay that on every node, so the
coordinator pays it once, in a process it can cap (RLIMIT_AS) and kill (timeout), and refuses the
upload with one short, generic reason (the runtime's text goes to the log only).
Run as `python -m coordinator.model_probe LIMIT_BYTES` with the model on
stdin; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sparecycles.coordinator.model_probe")

# onnxruntime's type names -> numpy dtypes, for the one-row trial run
_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
              "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
              "tensor(uint64)": "uint64", "tensor(bool)": "bool"}


# The reasons a submitter hears; ORT's own text goes to the coordinator's log only (it can carry
# bytes the model made the runtime read, and the model's own strings).
NOT_LOADED = "the model could not be loaded"
OUT_OF_MEMORY = "the model ran out of memory"
TOO_SLOW = "the model took too long"
_ROOT = str(Path(__file__).resolve().parents[1])  # where the child finds `coordinator`


class ProbeBusy(Exception):
    """Every probe slot is taken: the caller answers 429 rather than queueing without bound."""


class ProbeSlots:
    """At most `limit` probes at once; no waiting line (each probe costs a 1 GiB child)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.running >= self.limit:
            raise ProbeBusy(f"{self.limit} model checks are running: try again shortly")
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


_SLOTS: weakref.WeakKeyDictionary[object, ProbeSlots] = weakref.WeakKeyDictionary()


def slots_for(owner: object, limit: int) -> ProbeSlots:
    """The probe slots of one coordinator (kept beside it, not in it, and gone with it)."""
    slots = _SLOTS.get(owner)
    if slots is None:
        slots = _SLOTS[owner] = ProbeSlots(limit)
    return slots


async def probe_model(data: bytes, *, memory_bytes: int, seconds: float) -> None:
    """Raise `InvalidModel` unless onnxruntime loads `data` and runs it on one row of zeros within
    `memory_bytes` of address space and `seconds`. Loading alone is not enough: under a tight limit
    onnxruntime skips folding a huge constant and would then build it on every run instead.

    The child is sandboxed as coordinator/audit.py's workers are (the same recipe, not its class:
    an audit worker is long-lived and keeps sessions, a probe is one-shot): an empty temporary
    working directory, so no relative path in a model can name the coordinator's files (its key
    sits beside the database); a minimal environment; `-P` so the empty cwd is not on sys.path;
    its own session, killed by PID. The reason raised is one of three fixed sentences."""
    from .models import InvalidModel  # here, not at the top: the child process needs none of it

    limit = memory_bytes + 4 * len(data)  # room for the weights themselves, several copies while loading
    cwd = tempfile.mkdtemp(prefix="sc-probe-")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "coordinator.model_probe", str(limit), cwd=cwd, env=env,
            start_new_session=True, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), seconds)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.info("model probe: no load and run within %g s", seconds)
            raise InvalidModel(TOO_SLOW) from None
        finally:
            if proc.returncode is None:  # cancelled: never leave a 1 GiB child behind
                proc.kill()
                await proc.wait()
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        log.warning("model probe crashed (exit code %s): %s", proc.returncode, err.decode(errors="replace")[-500:])
        raise InvalidModel(OUT_OF_MEMORY if proc.returncode and proc.returncode < 0 else NOT_LOADED) from None
    if not answer.get("ok"):
        log.info("model probe refused a model (%s, limit %d MiB): %s", answer.get("stage"), limit >> 20,
                 answer.get("error"))
        raise InvalidModel(OUT_OF_MEMORY if answer.get("memory") else NOT_LOADED)


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
        text = str(exc)
        memory = isinstance(exc, MemoryError) or "bad_alloc" in text or "allocat" in text.lower()
        print(json.dumps({"ok": False, "stage": stage, "memory": memory, "error": text[:500]}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
