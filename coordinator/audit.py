"""Audits: the coordinator re-runs a sampled task itself, in a sandboxed worker process.

Trust is earned against ground truth the coordinator controls (DESIGN.md §12), so it runs the
submitted model on the task's inputs and the engine compares with what nodes returned. The model is
a stranger's: it runs only in a long-lived child (spawned, never forked from the coordinator) with
an empty temporary working directory, a per-run address-space limit (RLIMIT_AS) and a wall-clock
limit past which the child is killed by PID. Sessions are built exactly as node/runner.py builds
them (single-threaded, sequential, the job's pinned optimisation level), so an honest node's outputs
agree with the audit bit for bit.

A `problem` means the audit could not judge the task, never that a node is wrong: the engine
compares outputs only when there are some. The child talks length-prefixed msgpack frames on
stdin/stdout, tensors in the protocol's wire form (checked on the way back, never pickled).
Run as `python -m coordinator.audit SESSIONS` only by `Auditor`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import msgpack
import numpy.typing as npt

from protocol.digests import sha256_hex
from protocol.errors import BadTensor
from protocol.tensors import Tensor, decode_tensor_map, tensors_from_arrays, tensors_from_wire, tensors_to_wire

log = logging.getLogger("sparecycles.coordinator.audit")

Arrays = dict[str, npt.NDArray[Any]]

# node/runner.py's OPT_LEVELS by name (the coordinator may not import node/, nor load onnxruntime
# outside the child); tests/unit/test_audit.py checks that the two stay the same.
OPT_LEVEL_NAMES: Mapping[int, str] = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED",
                                      99: "ORT_ENABLE_ALL"}
_HEADER = struct.Struct("<Q")
_ROOT = str(Path(__file__).resolve().parents[1])  # where the child finds `coordinator` and `protocol`

# The reasons an audit gives; raw runtime text goes to the log only (it can carry a model's
# strings, and the engine should branch on a short fixed set).
OUT_OF_MEMORY = "audit ran out of memory"
TIMED_OUT = "audit timed out"
MODEL_FAILED = "audit failed: model could not run"
BAD_INPUTS = "audit failed: inputs do not match the model"
CRASHED = "audit failed: the worker crashed"
NOT_STARTED = "audit failed: the worker did not start"
NOT_STORED = "audit not run: model or inputs are not stored"
INTERNAL = "audit failed: internal error"
CLOSED = "audit not run: the auditor is closed"
_CHILD_KINDS = {"memory": OUT_OF_MEMORY, "model": MODEL_FAILED, "inputs": BAD_INPUTS}


@dataclass(frozen=True, slots=True)
class AuditOutcome:
    outputs: Arrays | None
    problem: str | None
    seconds: float
    """Wall time of the audit itself: a worker's start and the session's load count, the wait
    for a free worker does not."""


class AuditRequestLike(Protocol):
    """The fields of the engine's `AuditRequest` that an audit needs."""

    @property
    def model(self) -> str: ...
    @property
    def input_digest(self) -> str: ...
    @property
    def inputs(self) -> Mapping[str, Tensor] | None: ...
    @property
    def opt_level(self) -> int: ...


class ModelAndBlobs(Protocol):
    async def get_model(self, digest: str) -> bytes | None: ...
    async def get_blob(self, digest: str) -> bytes | None: ...


class _BadReply(Exception):
    """The child answered something we did not ask for: kill it, never trust its next frame."""


class _WorkerGone(Exception):
    """The worker's stdin was closed before a request reached it: safe to try a fresh worker."""


async def _hashes_to(data: bytes, digest: str) -> bool:
    # ~2 ms per MB here: a large model is hashed off the event loop
    if len(data) > 1 << 20:
        return await asyncio.to_thread(sha256_hex, data) == digest
    return sha256_hex(data) == digest


@dataclass(slots=True)
class _Worker:
    proc: asyncio.subprocess.Process
    cwd: str
    loaded: set[tuple[str, int]] = field(default_factory=set)  # the child's sessions, as it last said


class Auditor:
    """At most `workers` audits at once, each in its own sandboxed child; callers queue in front.

    Limits per run: address space `memory_bytes` + 4x the model above what the worker already
    maps (the probe's rule, coordinator/model_probe.py, made relative because a long-lived worker
    keeps a few sessions; an idle worker maps ~200 MiB); wall clock `base_seconds` + `seconds_per_mb`
    for every MB of model and inputs (hashing, shipping and loading a new model took ~8 ms/MB here,
    12.6 MB in 96 ms: a 10x margin) + `node_factor` x the run time the node reported, at most
    `max_seconds`. Past either limit the worker is killed and a new one starts on the next audit (a
    spawn and ORT import: ~0.25 s here). A warm audit of a tiny model costs ~0.45 ms more than an
    in-process run: nothing beside a task's trip through the broker."""

    def __init__(self, *, workers: int = 1, memory_bytes: int = 1 << 30, base_seconds: float = 10.0,
                 seconds_per_mb: float = 0.1, node_factor: float = 10.0, max_seconds: float = 300.0,
                 start_seconds: float = 60.0, sessions: int = 4, max_output_bytes: int = 512 << 20) -> None:
        if workers < 1 or sessions < 1:
            raise ValueError("an auditor needs at least one worker and one session")
        self.memory_bytes = memory_bytes
        self.base_seconds = base_seconds
        self.seconds_per_mb = seconds_per_mb
        self.node_factor = node_factor
        self.max_seconds = max_seconds
        self.start_seconds = start_seconds
        self.sessions = sessions
        self.max_output_bytes = max_output_bytes
        self._slots: list[_Worker | None] = [None] * workers
        self._idle: asyncio.Queue[int] = asyncio.Queue()
        for i in range(workers):
            self._idle.put_nowait(i)
        self._pending = 0
        self._closed = False

    @property
    def pending(self) -> int:
        """Audits running or waiting for a worker: the engine can sample less when this grows."""
        return self._pending

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._slots if w is not None and w.proc.returncode is None]

    def time_limit(self, model_bytes: int, input_bytes: int, node_seconds: float = 0.0) -> float:
        megabytes = (model_bytes + input_bytes) / 1e6
        return min(self.max_seconds, self.base_seconds + self.seconds_per_mb * megabytes
                   + self.node_factor * max(0.0, node_seconds))

    async def run(self, model_bytes: bytes, model_digest: str, inputs: Mapping[str, npt.NDArray[Any]],
                  opt_level: int, *, node_seconds: float = 0.0) -> AuditOutcome:
        """Run the model on `inputs` as a node would. Never raises (except on cancellation): every
        failure is an `AuditOutcome` with a short `problem`."""
        self._pending += 1
        try:
            slot = await self._idle.get()
            try:
                start = time.perf_counter()
                try:
                    outputs, problem = await self._audit(slot, model_bytes, model_digest, inputs, opt_level,
                                                         node_seconds)
                except Exception:  # our bug, not the model's: logged, and the loop goes on
                    log.exception("audit of model %s failed", model_digest[:12])
                    outputs, problem = None, INTERNAL
                return AuditOutcome(outputs, problem, time.perf_counter() - start)
            finally:
                self._idle.put_nowait(slot)
        finally:
            self._pending -= 1

    async def run_request(self, request: AuditRequestLike, store: ModelAndBlobs, *,
                          node_seconds: float = 0.0) -> AuditOutcome:
        """`run` for an engine request: the model from the store, inputs inline or from their blob."""
        model = await store.get_model(request.model)
        tensors = request.inputs
        if tensors is None:
            blob = await store.get_blob(request.input_digest)
            try:
                tensors = decode_tensor_map(blob) if blob is not None else None
            except BadTensor:
                log.exception("audit: stored inputs %s do not decode", request.input_digest[:12])
                tensors = None
        if model is None or tensors is None:
            return AuditOutcome(None, NOT_STORED, 0.0)
        arrays = {name: t.to_array() for name, t in tensors.items()}
        return await self.run(model, request.model, arrays, request.opt_level, node_seconds=node_seconds)

    async def _audit(self, slot: int, model_bytes: bytes, digest: str, inputs: Mapping[str, npt.NDArray[Any]],
                     opt_level: int, node_seconds: float) -> tuple[Arrays | None, str | None]:
        if self._closed:
            return None, CLOSED
        if opt_level not in OPT_LEVEL_NAMES:
            return None, MODEL_FAILED
        try:
            wire = tensors_to_wire(tensors_from_arrays(inputs))
        except BadTensor:
            log.exception("audit: inputs of model %s cannot be sent", digest[:12])
            return None, BAD_INPUTS
        budget = self.memory_bytes + 4 * len(model_bytes)
        request = {"model": digest, "opt": opt_level, "budget": budget, "inputs": wire, "bytes": None}
        limit = self.time_limit(len(model_bytes), sum(int(a.nbytes) for a in inputs.values()), node_seconds)
        for _ in range(2):  # a second time only if the worker died while idle, before it read the request
            worker = self._slots[slot]
            if worker is None or worker.proc.returncode is not None:
                await self._stop(slot)
                worker = await self._start(slot)
                if worker is None:
                    return None, NOT_STARTED
            if (digest, opt_level) not in worker.loaded and not await _hashes_to(model_bytes, digest):
                # The session would be cached under the digest and answer for another model.
                log.error("audit: the bytes given for model %s do not hash to it", digest[:12])
                return None, INTERNAL
            try:
                return await self._attempt(slot, worker, request, model_bytes, limit)
            except _WorkerGone:
                log.warning("audit worker %d was gone before it read a request: starting another", worker.proc.pid)
                await self._stop(slot)
        return None, CRASHED

    async def _attempt(self, slot: int, worker: _Worker, request: dict[str, Any], model_bytes: bytes,
                       limit: float) -> tuple[Arrays | None, str | None]:
        pid, model = worker.proc.pid, request["model"][:12]
        try:
            reply = await asyncio.wait_for(self._exchange(worker, {**request}, model_bytes), limit)
        except _WorkerGone:
            raise
        except TimeoutError:
            await self._stop(slot)
            log.warning("audit of model %s timed out after %.1f s: killed worker %d", model, limit, pid)
            return None, TIMED_OUT
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            await self._stop(slot)
            log.warning("audit worker %d died (exit %s) running model %s: %r", pid, worker.proc.returncode, model, exc)
            return None, CRASHED
        except _BadReply as exc:
            await self._stop(slot)
            log.error("audit worker %d answered badly for model %s: %s", pid, model, exc)
            return None, INTERNAL
        except BaseException:  # cancelled (or our bug) mid-exchange: its next frame would answer the wrong call
            await self._stop(slot)
            raise
        if reply.get("ok"):
            try:
                return {n: t.to_array() for n, t in tensors_from_wire(reply.get("outputs")).items()}, None
            except BadTensor as exc:
                await self._stop(slot)
                log.error("audit worker %d sent bad outputs for model %s: %s", pid, model, exc)
                return None, INTERNAL
        kind = str(reply.get("kind"))
        log.warning("audit of model %s: %s: %s", model, kind, str(reply.get("error"))[:2000])
        if kind == "memory":
            await self._stop(slot)  # past its limit a worker may hold half-built state: start afresh
        return None, _CHILD_KINDS.get(kind, INTERNAL)

    async def _exchange(self, worker: _Worker, request: dict[str, Any], model_bytes: bytes) -> dict[str, Any]:
        if (request["model"], request["opt"]) not in worker.loaded:
            request["bytes"] = model_bytes  # checked against the digest by _audit
        reply = await self._call(worker, request)
        if reply.get("kind") == "need_model" and request["bytes"] is None:
            # Our copy of the child's session list is its last reply's, so this is a bug, but cheap to survive.
            if not await _hashes_to(model_bytes, request["model"]):
                raise _BadReply(f"model bytes do not hash to {request['model'][:12]}")
            reply = await self._call(worker, {**request, "bytes": model_bytes})
        worker.loaded = {(str(d), int(o)) for d, o in reply.get("loaded", ())}
        return reply

    async def _call(self, worker: _Worker, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = worker.proc.stdin, worker.proc.stdout
        assert stdin is not None and stdout is not None
        payload = msgpack.packb(request, use_bin_type=True)
        try:
            stdin.write(_HEADER.pack(len(payload)))
            stdin.write(payload)
            if stdin.is_closing():  # the write met a closed pipe (EPIPE); drain would notice a loop turn late
                raise ConnectionResetError("the worker's stdin is closed")
            await stdin.drain()
        except ConnectionError as exc:
            # Its end of the pipe is closed: the worker died before this request, which never ran.
            raise _WorkerGone from exc
        (size,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
        if size > self.max_output_bytes:
            raise _BadReply(f"a reply of {size} bytes exceeds {self.max_output_bytes}")
        reply = msgpack.unpackb(await stdout.readexactly(size), raw=False)
        if not isinstance(reply, dict):
            raise _BadReply("the reply is not a map")
        return reply

    async def _start(self, slot: int) -> _Worker | None:
        cwd = tempfile.mkdtemp(prefix="sc-audit-")
        # Only what Python needs: the coordinator's environment (database URLs, broker passwords)
        # is none of the model's business.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                # -P: the empty cwd is not put on sys.path (nothing there to import, and no surprises)
                sys.executable, "-P", "-m", "coordinator.audit", str(self.sessions), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, cwd=cwd, env=env, start_new_session=True)
        except BaseException as exc:
            shutil.rmtree(cwd, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise  # cancelled: asyncio kills a half-made child itself
            log.exception("audit worker could not be spawned")
            return None
        worker = _Worker(proc, cwd)
        self._slots[slot] = worker
        try:
            hello = await asyncio.wait_for(self._greeting(proc), self.start_seconds)
            if not isinstance(hello, dict) or hello.get("ready") != proc.pid:
                raise _BadReply(f"unexpected greeting {hello!r}")
        except (TimeoutError, asyncio.IncompleteReadError, _BadReply, ValueError) as exc:
            log.error("audit worker %d did not start: %r", proc.pid, exc)
            await self._stop(slot)
            return None
        except BaseException:  # cancelled: its greeting, unread, would pass for the next audit's reply
            await self._stop(slot)
            raise
        return worker

    @staticmethod
    async def _greeting(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        (size,) = _HEADER.unpack(await proc.stdout.readexactly(_HEADER.size))
        if size > 4096:
            raise _BadReply(f"a greeting of {size} bytes")
        return msgpack.unpackb(await proc.stdout.readexactly(size), raw=False)

    async def _stop(self, slot: int) -> None:
        worker, self._slots[slot] = self._slots[slot], None
        if worker is None:
            return
        if worker.proc.returncode is None:
            try:
                worker.proc.kill()
            except ProcessLookupError:
                pass
        await worker.proc.wait()
        shutil.rmtree(worker.cwd, ignore_errors=True)

    async def close(self) -> None:
        """Kill every worker by PID and remove its directory; later audits answer a problem."""
        self._closed = True
        for slot in range(len(self._slots)):
            await self._stop(slot)

    async def __aenter__(self) -> Auditor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---- the child ---------------------------------------------------------------------------------

def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    chunks, left = [], size
    while left:
        chunk = stream.read(min(left, 1 << 24))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    payload = msgpack.packb(message, use_bin_type=True)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(budget: int | None) -> None:
    """Cap address space at what is mapped now plus `budget`; None lifts the cap again."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = hard if budget is None else _mapped_bytes() + budget
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _failure_kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    memory = ("bad_alloc", "bad allocation", "failed to allocate", "out of memory", "memoryerror")
    return "memory" if isinstance(exc, MemoryError) or any(m in text for m in memory) else "model"


class _Child:
    def __init__(self, sessions: int) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.max_sessions = sessions
        self.sessions: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def _options(self, opt_level: int) -> Any:
        """As node/runner.session_options builds them: the same options give the same bits."""
        ort = self.ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVEL_NAMES[opt_level])
        opts.log_severity_level = 3
        return opts

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        key = (str(request["model"]), int(request["opt"]))
        reply: dict[str, Any]
        try:
            _limit_memory(int(request["budget"]))
            try:
                reply = self._run(key, request)
            finally:
                _limit_memory(None)
        except Exception as exc:  # ORT raises its own types; MemoryError is an Exception too
            reply = {"ok": False, "kind": _failure_kind(exc), "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if reply.get("ok"):
            try:
                reply["outputs"] = tensors_to_wire(tensors_from_arrays(reply["outputs"]))
            except BadTensor as exc:
                reply = {"ok": False, "kind": "model", "error": f"outputs: {exc}"}
        reply["loaded"] = [list(k) for k in self.sessions]
        return reply

    def _run(self, key: tuple[str, int], request: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.get(key)
        if session is None:
            if request.get("bytes") is None:
                return {"ok": False, "kind": "need_model"}
            session = self.ort.InferenceSession(request["bytes"], sess_options=self._options(key[1]),
                                                providers=["CPUExecutionProvider"])
            self.sessions[key] = session
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        inputs = {n: t.to_array() for n, t in tensors_from_wire(request["inputs"]).items()}
        expected = {i.name for i in session.get_inputs()}
        if set(inputs) != expected:
            return {"ok": False, "kind": "inputs", "error": f"inputs {sorted(inputs)}, model wants {sorted(expected)}"}
        # Numeric tensor outputs only, as node/runner.sendable_outputs asks for them.
        names = [o.name for o in session.get_outputs() if o.type.startswith("tensor(") and o.type != "tensor(string)"]
        if not names:
            return {"ok": False, "kind": "model", "error": "no numeric tensor outputs"}
        values = session.run(names, inputs)
        return {"ok": True, "outputs": dict(zip(names, values, strict=True))}


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash near the limit must not dump a GB of core
    # The frames get private copies of stdin/stdout; anything native code prints goes to stderr
    # instead of corrupting them.
    frames_in = os.fdopen(os.dup(0), "rb")
    frames_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    child = _Child(int(argv[0]))
    _write_frame(frames_out, {"ready": os.getpid()})
    while (frame := _read_frame(frames_in)) is not None:
        _write_frame(frames_out, child.handle(msgpack.unpackb(frame, raw=False)))
    return 0  # the coordinator closed our stdin (or died): nothing more to do


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
