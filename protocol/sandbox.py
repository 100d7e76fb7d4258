"""Run a stranger's model where it cannot hurt the process that asked: sandboxed worker children.

Used by the node daemon for every task and by the coordinator for audits (DESIGN.md §12). A model
runs only in a long-lived child, spawned (never forked from an asyncio process with threads), with
an empty temporary working directory (no relative path in a model names anything), a minimal
environment (no database URLs, no broker passwords), a per-run address-space limit (RLIMIT_AS),
and a wall-clock limit past which the child is killed by PID. The caller's event loop never runs
onnxruntime: it only writes a request frame and awaits the reply, so heartbeats and the MQTT link
stay live whatever a model does.

Parent and child talk length-prefixed msgpack frames on the child's stdin/stdout, tensors in the
protocol's wire form (checked on the way back, never pickled). Run as
`python -m protocol.sandbox SESSIONS NICE` only by `SandboxPool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from .digests import sha256_hex
from .errors import BadTensor
from .runrecipe import OPT_LEVEL_NAMES, PROVIDERS, sendable_output_names, session_options
from .tensors import Tensor, tensors_from_arrays, tensors_from_wire, tensors_to_wire

log = logging.getLogger("sparecycles.sandbox")

_HEADER = struct.Struct("<Q")
PIPE_BYTES = 1 << 20
MAX_BATCH = 32  # runs sent to a worker in one frame
MAX_BATCH_BYTES = 4 << 20  # of inputs: a big task goes alone, so that small ones are not held behind many
_ROOT = str(Path(__file__).resolve().parents[1])  # where the child finds `protocol`

# What went wrong, as a short fixed word the caller turns into its own sentence. Raw runtime text
# goes to the log only: it can carry the model's strings, and callers branch on this set.
MEMORY = "memory"          # the run passed its address-space limit
TIMEOUT = "timeout"        # the run passed its wall-clock limit; the worker was killed
MODEL = "model"            # onnxruntime refused to load or run the model
INPUTS = "inputs"          # the inputs do not match the model's
CRASHED = "crashed"        # the worker died mid-run
NOT_STARTED = "not_started"
INTERNAL = "internal"      # our bug, or a worker answering nonsense
CLOSED = "closed"

ModelBytes = bytes | Callable[[], Awaitable[bytes]]
"""The model's bytes, or a way to get them: read only when the worker has no session for it."""


@dataclass(frozen=True, slots=True)
class Outcome:
    outputs: dict[str, Tensor] | None
    problem: str | None
    """None on success, else one of the kinds above."""
    run_seconds: float
    """Time inside `InferenceSession.run` alone, as the child measured it (0 on failure)."""
    seconds: float
    """Wall time of the whole call once a worker was free: a start and a model load count."""
    detail: str = ""
    """For the log: what the runtime or the worker said. Never for a stranger's eyes."""


class _BadReply(Exception):
    """The child answered something we did not ask for: kill it, never trust its next frame."""


class _WorkerGone(Exception):
    """The worker's stdin was closed before a request reached it: safe to try a fresh worker."""


async def _hashes_to(data: bytes, digest: str) -> bool:
    # ~2 ms per MB here: a large model is hashed off the event loop
    if len(data) > 1 << 20:
        return await asyncio.to_thread(sha256_hex, data) == digest
    return sha256_hex(data) == digest


_Result = tuple[dict[str, Tensor] | None, str | None, float, str]  # outputs, problem, run seconds, detail


@dataclass(eq=False, slots=True)
class _Job:
    model: ModelBytes
    digest: str
    inputs: Mapping[str, Tensor] | None
    opt_level: int
    memory_bytes: int
    seconds: float | Callable[[bool], float]
    future: asyncio.Future[Outcome]


@dataclass(slots=True)
class _Worker:
    proc: asyncio.subprocess.Process
    cwd: str
    loaded: set[tuple[str, int]] = field(default_factory=set)  # the child's sessions, as it last said
    last_used: float = field(default_factory=time.monotonic)


class SandboxPool:
    """At most `workers` runs at once, each in its own sandboxed child; callers queue in front.

    A worker keeps up to `sessions` models loaded. With `idle_seconds`, a worker unused that long
    is stopped, giving its memory back (the node daemon's idle footprint); the next run starts a
    new one (a spawn and the runtime's import: ~0.25 s here). `nice` lowers the children's
    scheduling priority (volunteers' machines run their owners' work first)."""

    def __init__(self, *, workers: int = 1, sessions: int = 4, start_seconds: float = 60.0,
                 idle_seconds: float | None = None, nice: int = 0, max_output_bytes: int = 512 << 20,
                 name: str = "sandbox") -> None:
        if workers < 1 or sessions < 1:
            raise ValueError("a sandbox pool needs at least one worker and one session")
        self.sessions = sessions
        self.start_seconds = start_seconds
        self.idle_seconds = idle_seconds
        self.nice = nice
        self.max_output_bytes = max_output_bytes
        self.name = name
        self._slots: list[_Worker | None] = [None] * workers
        self._queue: deque[_Job] = deque()  # runs waiting for a free worker
        self._drivers: set[asyncio.Task[None]] = set()  # one per busy slot: a batch in flight
        self._batches: dict[int, tuple[list[_Job], asyncio.Task[None]]] = {}  # slot -> its batch and driver
        self._running: dict[int, _Job] = {}  # slot -> the run its worker is on now
        self._busy: set[int] = set()
        self.suspended = False
        self._deadlines: set[_Deadline] = set()  # the limits of the runs in flight, paused with the pool
        """While set, nothing new is sent to a worker (the node's owner needs the machine)."""
        self._pending = 0
        self._closed = False
        self._reaper: asyncio.TimerHandle | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def workers(self) -> int:
        return len(self._slots)

    @property
    def pending(self) -> int:
        """Runs in progress or waiting for a worker."""
        return self._pending

    @property
    def busy(self) -> int:
        """Runs in progress right now."""
        return len(self._busy)

    @property
    def pids(self) -> list[int]:
        """The live workers' PIDs (to pause, resume or measure them)."""
        return [w.proc.pid for w in self._slots if w is not None and w.proc.returncode is None]

    async def run(self, model: ModelBytes, digest: str, inputs: Mapping[str, Tensor] | None, opt_level: int, *,
                  memory_bytes: int, seconds: float | Callable[[bool], float]) -> Outcome:
        """Run the model on `inputs` in a worker. `memory_bytes`: address space the run may add to
        what the worker maps already (plus 4x the model's size when it loads it); `seconds`: its
        wall-clock limit, or a function of whether the model must be loaded first. `inputs` None:
        load the model only. Never raises (except on cancellation): every failure is an `Outcome`
        with a `problem`.

        Runs queued together go to a free worker in one frame (at most `MAX_BATCH`), and the worker
        answers each as soon as it has run it: a round trip to a process costs more than a tiny
        model's run, so many small tasks pay for one. Each run keeps its own time limit."""
        if self._closed:
            return Outcome(None, CLOSED, 0.0, 0.0, "the pool is closed")
        if opt_level not in OPT_LEVEL_NAMES:
            return Outcome(None, MODEL, 0.0, 0.0, f"unknown optimisation level {opt_level}")
        job = _Job(model, digest, inputs, opt_level, memory_bytes, seconds, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._pending += 1
        self._dispatch()
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self._queue:  # not sent yet: it never runs
                self._queue.remove(job)
                self._pending -= 1
            else:
                await self._abandon(job)
            raise

    async def _abandon(self, job: _Job) -> None:
        """A caller gave up on a run already handed to a worker: stop what no caller waits for (a
        hung model would otherwise hold the worker until its time limit)."""
        for slot, (batch, driver) in list(self._batches.items()):
            if job not in batch:
                continue
            if all(j.future.done() for j in batch):  # nobody waits for any of them
                driver.cancel()
                await asyncio.gather(driver, return_exceptions=True)
            elif self._running.get(slot) is job:  # the others are sent again to a new worker
                await self._stop(slot)
            return

    def _dispatch(self) -> None:
        if self.suspended:
            return
        for slot in range(len(self._slots)):
            if not self._queue:
                return
            if slot in self._busy:
                continue
            batch: list[_Job] = []
            size = 0
            while self._queue and len(batch) < MAX_BATCH and (not batch or size < MAX_BATCH_BYTES):
                job = self._queue.popleft()
                batch.append(job)
                size += sum(len(t.data) for t in (job.inputs or {}).values())
            self._busy.add(slot)
            driver = asyncio.get_running_loop().create_task(self._drive(slot, batch), name=f"{self.name}-{slot}")
            self._drivers.add(driver)
            driver.add_done_callback(self._drivers.discard)
            self._batches[slot] = (batch, driver)

    async def _drive(self, slot: int, batch: list[_Job]) -> None:
        start, count = time.perf_counter(), len(batch)
        try:
            while batch:
                done, batch = await self._run_batch(slot, batch)
                if batch and self.suspended:  # the rest are not to run now: their callers hear why
                    done += [(job, (None, CRASHED, 0.0, "the pool is suspended")) for job in batch]
                    batch = []
                for job, (outputs, problem, run_s, detail) in done:
                    if not job.future.done():
                        job.future.set_result(Outcome(outputs, problem, run_s, time.perf_counter() - start, detail))
        except Exception as exc:  # our bug, not a model's: logged, and the callers go on
            log.exception("%s: a batch of %d runs failed", self.name, len(batch))
            for job in batch:
                if not job.future.done():
                    job.future.set_result(Outcome(None, INTERNAL, 0.0, time.perf_counter() - start, repr(exc)))
        finally:
            for job in batch:  # cancelled: the pool is closing
                if not job.future.done():
                    job.future.set_result(Outcome(None, CLOSED, 0.0, 0.0, "the pool closed"))
            worker = self._slots[slot]
            if worker is not None:
                worker.last_used = time.monotonic()
            self._batches.pop(slot, None)
            self._running.pop(slot, None)
            self._pending -= count
            self._busy.discard(slot)
            if not self._closed:
                self._arm_reaper()
                self._dispatch()

    async def _run_batch(self, slot: int, jobs: list[_Job]) -> tuple[list[tuple[_Job, _Result]], list[_Job]]:
        """Send `jobs` to the slot's worker; the answered ones, and those to send again (not run:
        a run before them brought the worker down)."""
        for _ in range(2):  # a second time only if the worker died while idle, before it read the frame
            worker = self._slots[slot]
            if worker is None or worker.proc.returncode is not None:
                await self._stop(slot)
                worker = await self._start(slot)
                if worker is None:
                    return [(job, (None, NOT_STARTED, 0.0, "the worker did not start")) for job in jobs], []
            done: list[tuple[_Job, _Result]] = []
            sent: list[tuple[_Job, dict[str, Any], float]] = []
            loading = set(worker.loaded)
            for job in jobs:
                key = (job.digest, job.opt_level)
                request: dict[str, Any] = {"model": job.digest, "opt": job.opt_level, "budget": job.memory_bytes,
                                           "inputs": None if job.inputs is None else tensors_to_wire(job.inputs),
                                           "bytes": None}
                load = key not in loading
                if load:
                    data = job.model if isinstance(job.model, bytes) else await job.model()
                    if not await _hashes_to(data, job.digest):
                        # The session would be cached under the digest and answer for another model.
                        done.append((job, (None, INTERNAL, 0.0, f"the bytes given for model {job.digest[:12]} "
                                                                "do not hash to it")))
                        continue
                    request["bytes"] = data
                    request["budget"] = job.memory_bytes + 4 * len(data)  # its weights, copies while loading
                    loading.add(key)
                limit = job.seconds(load) if callable(job.seconds) else job.seconds
                sent.append((job, request, limit))
            if not sent:
                return done, []
            try:
                answered, failure = await self._attempt(slot, worker, sent)
            except _WorkerGone:
                log.warning("%s worker %d was gone before it read a request: starting another",
                            self.name, worker.proc.pid)
                await self._stop(slot)
                continue
            done += answered
            rest = [job for job, _, _ in sent[len(answered) + (failure is not None):]]
            if failure is not None:
                done.append((sent[len(answered)][0], failure))
            return done, rest
        return [(job, (None, CRASHED, 0.0, "two workers died before reading the request")) for job in jobs], []

    async def _attempt(self, slot: int, worker: _Worker, sent: list[tuple[_Job, dict[str, Any], float]]
                       ) -> tuple[list[tuple[_Job, _Result]], _Result | None]:
        """The answers in order, up to the first run that ended the worker (and what it did)."""
        pid = worker.proc.pid
        answered: list[tuple[_Job, _Result]] = []
        expired = False

        def expire() -> None:  # a timer rather than wait_for: no task per run on the hot path
            nonlocal expired
            expired = True
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()

        loop = asyncio.get_running_loop()
        try:
            await self._send(worker, {"batch": [request for _, request, _ in sent]})
            for job, _, limit in sent:
                model = job.digest[:12]
                self._running[slot] = job
                timer = _Deadline(loop, limit, expire, paused=self.suspended)
                self._deadlines.add(timer)
                try:
                    reply = await self._receive(worker)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    await self._stop(slot)
                    if expired:
                        return answered, (None, TIMEOUT, 0.0, f"killed worker {pid} after {limit:.1f} s, model {model}")
                    return answered, (None, CRASHED, 0.0,
                                      f"worker {pid} died (exit {worker.proc.returncode}) on model {model}: {exc!r}")
                finally:
                    timer.cancel()
                    self._deadlines.discard(timer)
                if expired:  # the reply beat the kill by a hair: the worker is dead all the same
                    await self._stop(slot)
                    return answered, (None, TIMEOUT, 0.0, f"killed worker {pid} after {limit:.1f} s on model {model}")
                worker.loaded = {(str(d), int(o)) for d, o in reply.get("loaded", ())}
                result = self._result(reply, pid, model)
                answered.append((job, result))
                if result[1] in (MEMORY, INTERNAL):
                    # past its limit a worker may hold half-built state: start afresh for the rest
                    await self._stop(slot)
                    return answered, None
        except _BadReply as exc:
            await self._stop(slot)
            log.error("%s worker %d answered badly: %s", self.name, pid, exc)
            return answered, (None, INTERNAL, 0.0, str(exc))
        except BaseException:  # cancelled (or our bug) mid-exchange: its next frame would answer the wrong call
            await self._stop(slot)
            raise
        return answered, None

    @staticmethod
    def _result(reply: dict[str, Any], pid: int, model: str) -> _Result:
        if reply.get("ok"):
            try:
                return tensors_from_wire(reply.get("outputs")), None, float(reply.get("run_seconds", 0.0)), ""
            except (BadTensor, TypeError, ValueError) as exc:
                return None, INTERNAL, 0.0, f"worker {pid} sent bad outputs for model {model}: {exc}"
        kind = str(reply.get("kind"))
        known = kind in (MEMORY, MODEL, INPUTS)
        return None, kind if known else INTERNAL, 0.0, str(reply.get("error"))[:2000]

    async def _send(self, worker: _Worker, message: dict[str, Any]) -> None:
        stdin = worker.proc.stdin
        assert stdin is not None
        payload = msgpack.packb(message, use_bin_type=True)
        try:
            stdin.write(_HEADER.pack(len(payload)) + payload)
            if stdin.is_closing():  # the write met a closed pipe (EPIPE); drain would notice a loop turn late
                raise ConnectionResetError("the worker's stdin is closed")
            await stdin.drain()
        except ConnectionError as exc:
            # Its end of the pipe is closed: the worker died before this request, which never ran.
            raise _WorkerGone from exc

    async def _receive(self, worker: _Worker) -> dict[str, Any]:
        stdout = worker.proc.stdout
        assert stdout is not None
        (size,) = _HEADER.unpack(await stdout.readexactly(_HEADER.size))
        if size > self.max_output_bytes:
            raise _BadReply(f"a reply of {size} bytes exceeds {self.max_output_bytes}")
        reply = msgpack.unpackb(await stdout.readexactly(size), raw=False)
        if not isinstance(reply, dict):
            raise _BadReply("the reply is not a map")
        return reply

    async def _start(self, slot: int) -> _Worker | None:
        cwd = tempfile.mkdtemp(prefix=f"sc-{self.name}-")
        # Only what Python needs: the parent's environment (database URLs, broker passwords) is
        # none of the model's business.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                # -P: the empty cwd is not put on sys.path (nothing there to import, and no surprises)
                sys.executable, "-P", "-m", "protocol.sandbox", str(self.sessions), str(self.nice),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=cwd, env=env,
                start_new_session=True)
        except BaseException as exc:
            shutil.rmtree(cwd, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise  # cancelled: asyncio kills a half-made child itself
            log.exception("%s worker could not be spawned", self.name)
            return None
        _widen_pipes(proc)
        worker = _Worker(proc, cwd)
        self._slots[slot] = worker
        try:
            hello = await asyncio.wait_for(self._greeting(proc), self.start_seconds)
            if not isinstance(hello, dict) or hello.get("ready") != proc.pid:
                raise _BadReply(f"unexpected greeting {hello!r}")
        except (TimeoutError, asyncio.IncompleteReadError, _BadReply, ValueError) as exc:
            log.error("%s worker %d did not start: %r", self.name, proc.pid, exc)
            await self._stop(slot)
            return None
        except BaseException:  # cancelled: its greeting, unread, would pass for the next run's reply
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
        if worker is not None:
            await _kill(worker)

    def suspend(self, suspended: bool) -> None:
        """Stop (SIGSTOP) every worker and send nothing new, or continue (SIGCONT) and go on."""
        self.suspended = suspended
        self.signal_all(signal.SIGSTOP if suspended else signal.SIGCONT)
        for deadline in self._deadlines:  # a stopped run is not using its time
            if suspended:
                deadline.pause()
            else:
                deadline.resume()
        if not suspended:
            self._dispatch()

    def signal_all(self, signum: int) -> None:
        """Send `signum` to every live worker (SIGSTOP to pause them all, SIGCONT to go on)."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    async def kill_all(self) -> None:
        """Kill every worker now (their runs end as CRASHED); later runs start new ones."""
        for slot in range(len(self._slots)):
            await self._stop(slot)

    def _arm_reaper(self) -> None:
        if self.idle_seconds is None or self._closed or self._reaper is not None:
            return
        loop = asyncio.get_running_loop()
        self._reaper = loop.call_later(self.idle_seconds / 4, self._reap)

    def _reap(self) -> None:
        """Stop workers idle for `idle_seconds`; runs on the loop, between runs, so an idle slot
        (in the queue, not busy) cannot be handed out while its worker is being stopped."""
        self._reaper = None
        assert self.idle_seconds is not None
        now = time.monotonic()
        for slot, worker in enumerate(self._slots):
            if worker is not None and slot not in self._busy and now - worker.last_used >= self.idle_seconds:
                self._slots[slot] = None
                task = asyncio.get_running_loop().create_task(_kill(worker))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        if any(w is not None for w in self._slots):
            self._arm_reaper()

    async def close(self) -> None:
        """Kill every worker by PID and remove its directory; later runs answer CLOSED."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_result(Outcome(None, CLOSED, 0.0, 0.0, "the pool closed"))
        for driver in list(self._drivers):
            driver.cancel()
        await asyncio.gather(*self._drivers, return_exceptions=True)
        for slot in range(len(self._slots)):
            await self._stop(slot)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    async def __aenter__(self) -> SandboxPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _widen_pipes(proc: asyncio.subprocess.Process) -> None:
    """1 MiB pipes instead of Linux's 64 KiB: a task's inputs or outputs of a few hundred KiB then
    cross in one write and one wake-up instead of several (Linux only; elsewhere a no-op)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    # the read side's transport is private in asyncio: without it only the write side widens
    transports = (getattr(proc.stdin, "transport", None), getattr(proc.stdout, "_transport", None))
    for transport in transports:
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        if pipe is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), set_size, PIPE_BYTES)


async def _kill(worker: _Worker) -> None:
    if worker.proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.kill()
    # Close its pipes too: asyncio wakes wait() only once both pipes are closed, and a stdout left
    # unread past its buffer (a batch's replies after a failed run) is paused and never sees EOF:
    # wait() hung for good (found with a memory bomb in a batch of 60 runs on a loaded machine).
    transport = getattr(worker.proc, "_transport", None)
    if transport is not None:
        transport.close()
    await worker.proc.wait()
    shutil.rmtree(worker.cwd, ignore_errors=True)


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


def _limit_memory(budget: int) -> None:
    """Cap address space at what is mapped now plus `budget`."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = _mapped_bytes() + budget
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _failure_kind(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    memory = ("bad_alloc", "bad allocation", "failed to allocate", "out of memory", "memoryerror")
    return MEMORY if isinstance(exc, MemoryError) or any(m in text for m in memory) else MODEL


class _Child:
    def __init__(self, sessions: int) -> None:
        import onnxruntime as ort

        self.budget: int | None = None  # the address-space budget the current cap was set for

        ort.set_default_logger_severity(4)  # fatal only: failures travel in the replies, not on stderr
        self.ort = ort
        self.max_sessions = sessions
        self.sessions: OrderedDict[tuple[str, int], tuple[Any, list[str], set[str]]] = OrderedDict()

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        key = (str(request["model"]), int(request["opt"]))
        reply: dict[str, Any]
        try:
            budget = int(request["budget"])
            if budget != self.budget:
                # Set when the budget changes, not per run (two syscalls and a /proc read): a load
                # comes with a larger budget, and the next run's plain one re-caps above the new
                # session. The cap stays between runs; the parent kills a worker that hit it.
                _limit_memory(budget)
                self.budget = budget
            reply = self._run(key, request)
        except Exception as exc:  # ORT raises its own types; MemoryError is an Exception too
            reply = {"ok": False, "kind": _failure_kind(exc), "error": f"{type(exc).__name__}: {exc}"[:2000]}
        if reply.get("ok"):
            try:
                reply["outputs"] = tensors_to_wire(tensors_from_arrays(reply["outputs"]))
            except BadTensor as exc:
                reply = {"ok": False, "kind": MODEL, "error": f"outputs: {exc}"}
        reply["loaded"] = [list(k) for k in self.sessions]
        return reply

    def _run(self, key: tuple[str, int], request: dict[str, Any]) -> dict[str, Any]:
        entry = self.sessions.get(key)
        if entry is None:
            if request.get("bytes") is None:
                return {"ok": False, "kind": INTERNAL, "error": "model bytes needed: the session is not loaded"}
            session = self.ort.InferenceSession(request["bytes"], sess_options=session_options(self.ort, key[1]),
                                                providers=PROVIDERS)
            entry = (session, sendable_output_names(session), {i.name for i in session.get_inputs()})
            self.sessions[key] = entry
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(key)
        session, names, expected = entry
        if request["inputs"] is None:  # a load-only check
            return {"ok": True, "outputs": {}, "run_seconds": 0.0}
        inputs = {n: t.to_array() for n, t in tensors_from_wire(request["inputs"]).items()}
        if set(inputs) != expected:
            return {"ok": False, "kind": INPUTS, "error": f"inputs {sorted(inputs)}, model wants {sorted(expected)}"}
        if not names:
            return {"ok": False, "kind": MODEL, "error": "the model has no numeric tensor outputs to send"}
        start = time.perf_counter()
        values = session.run(names, inputs)
        elapsed = time.perf_counter() - start
        return {"ok": True, "outputs": dict(zip(names, values, strict=True)), "run_seconds": elapsed}


class _Deadline:
    """A run's time limit that stops counting while the pool is suspended: a run paused for the
    machine's owner must not be killed for the time it was not allowed to run."""

    __slots__ = ("_fn", "_handle", "_left", "_loop", "_started")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, fn: Callable[[], None], *,
                 paused: bool) -> None:
        self._loop, self._left, self._fn = loop, seconds, fn
        self._handle: asyncio.TimerHandle | None = None
        self._started = 0.0
        if not paused:
            self.resume()

    def pause(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._left = max(0.0, self._left - (self._loop.time() - self._started))

    def resume(self) -> None:
        if self._handle is None:
            self._started = self._loop.time()
            self._handle = self._loop.call_later(self._left, self._fn)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash near the limit must not dump a GB of core
    if len(argv) > 1 and int(argv[1]) > 0:
        os.nice(int(argv[1]))
        # Each worker leads a session of its own, and with the kernel's autogroup scheduling a new
        # session is a scheduling group of its own at nice 0: its threads' nice ranks them only
        # inside that group, so it kept about a third of the CPU against the owner's programs. The
        # group's nice is what competes with them. (Absent without autogroup: nothing to do.)
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(argv[1])
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
        for request in msgpack.unpackb(frame, raw=False)["batch"]:
            _write_frame(frames_out, child.handle(request))  # each answered as soon as it has run
    return 0  # the parent closed our stdin (or died): nothing more to do


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
