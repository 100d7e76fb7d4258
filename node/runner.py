"""ONNX Runtime execution: one single-threaded session per slot thread.

ORT releases the GIL inside `run`, so `slots` threads of one process run in parallel; measured on
2 cores, two single-threaded sessions ran 1.97x the rate of one, where one session with two
intra-op threads managed 1.74x (DESIGN.md §7). Each thread keeps its own sessions in a
`threading.local`: sessions are never shared between threads, and a warm one is reused.
"""

from __future__ import annotations

import asyncio
import platform
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .errors import TaskFailed

Arrays = dict[str, npt.NDArray[Any]]

OPT_LEVELS: Mapping[int, ort.GraphOptimizationLevel] = {
    0: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROVIDERS = ["CPUExecutionProvider"]
# A run predicted to take less than this goes on the calling (event loop) thread: handing it to a
# slot thread and back cost more than the run itself for small tasks (~10% of a node's CPU in a
# profile, against ~4% in ORT).
INLINE_SECONDS = 0.0002


def runtime_fingerprint() -> str:
    """What makes two nodes' outputs bitwise comparable: ORT version, ISA, Python."""
    return f"ort={ort.__version__};isa={platform.machine()};py={platform.python_version()}"


def session_options(opt_level: int) -> ort.SessionOptions:
    """Single-threaded, sequential, with the job's pinned graph optimisation level."""
    level = OPT_LEVELS.get(opt_level)
    if level is None:
        raise TaskFailed(f"unknown graph optimisation level {opt_level} (known: {sorted(OPT_LEVELS)})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = level
    opts.log_severity_level = 3  # errors only: a warning per session would flood the log
    return opts


def sendable_outputs(session: ort.InferenceSession) -> list[str]:
    """Names of the outputs that are numeric tensors, the only kind the protocol carries.

    Sequences, maps (e.g. skl2onnx's ZipMap probabilities) and string tensors are not requested,
    so ORT does not compute them; a model with no numeric tensor output at all cannot be served."""
    names = [o.name for o in session.get_outputs() if o.type.startswith("tensor(") and o.type != "tensor(string)"]
    if not names:
        raise TaskFailed("the model has no numeric tensor outputs to send")
    return names


@dataclass(frozen=True, slots=True)
class RunOutcome:
    outputs: Arrays
    elapsed: float
    """Seconds spent in `InferenceSession.run` alone (not loading, not fetching)."""


def load_session(model_path: Path, digest: str, opt_level: int) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), sess_options=session_options(opt_level), providers=PROVIDERS)
    except TaskFailed:
        raise
    except Exception as exc:
        raise TaskFailed(f"model {digest[:12]} failed to load: {type(exc).__name__}: {exc}") from exc


class _Sessions(threading.local):
    def __init__(self) -> None:
        self.by_key: OrderedDict[tuple[str, int], ort.InferenceSession] = OrderedDict()


class Runner:
    """A pool of `slots` threads, each with its own ORT sessions keyed by (model digest, opt level)."""

    def __init__(self, slots: int, *, sessions_per_thread: int = 4) -> None:
        self.slots = slots
        self._max_sessions = sessions_per_thread
        self._local = _Sessions()
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="sc-slot")
        self._busy = 0
        self._busy_lock = threading.Lock()
        # Seconds per input element, per (model, opt level): per element rather than per row, so a
        # job with longer sequences on a dynamic axis is not mistaken for a tiny one. Updated on the
        # loop thread; it rises at once when a run is slower and decays slowly, so a heavy task is
        # never run on the event loop twice.
        self._seconds_per_element: dict[tuple[str, int], float] = {}

    @property
    def busy(self) -> int:
        """Runs in progress right now (threads inside ORT or loading a session)."""
        with self._busy_lock:
            return self._busy

    async def run(self, model_path: Path, digest: str, opt_level: int, inputs: Mapping[str, npt.NDArray[Any]]
                  ) -> RunOutcome:
        key = (digest, opt_level)
        elements = max(1, sum(int(a.size) for a in inputs.values()))
        per_element = self._seconds_per_element.get(key)
        if per_element is not None and per_element * elements < INLINE_SECONDS:
            if key not in self._local.by_key:
                # This (event loop) thread's own session: loaded in a worker, so that a large
                # model never stalls the loop while it loads.
                loaded = await asyncio.to_thread(load_session, model_path, digest, opt_level)
                self._cache(key, loaded)
            outcome = self.run_sync(model_path, digest, opt_level, inputs)
        else:
            loop = asyncio.get_running_loop()
            outcome = await loop.run_in_executor(self._pool, self.run_sync, model_path, digest, opt_level, inputs)
        seen = outcome.elapsed / elements
        self._seconds_per_element[key] = (seen if per_element is None or seen > per_element
                                          else 0.8 * per_element + 0.2 * seen)
        return outcome

    def run_sync(self, model_path: Path, digest: str, opt_level: int,
                 inputs: Mapping[str, npt.NDArray[Any]]) -> RunOutcome:
        """Run every row as one batch: a task is never re-split, because rows run alone can differ
        from rows run inside a batch by more than the agreement tolerance (DESIGN.md §4)."""
        with self._busy_lock:
            self._busy += 1
        try:
            session = self._session(model_path, digest, opt_level)
            names = sendable_outputs(session)
            expected = {i.name for i in session.get_inputs()}
            if set(inputs) != expected:
                raise TaskFailed(f"inputs {sorted(inputs)} do not match the model's {sorted(expected)}")
            start = time.perf_counter()
            try:
                values = session.run(names, dict(inputs))
            except Exception as exc:  # ORT raises its own exception types for bad shapes, dtypes, ...
                raise TaskFailed(f"onnxruntime: {type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - start
            return RunOutcome({n: np.asarray(v) for n, v in zip(names, values, strict=True)}, elapsed)
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _session(self, model_path: Path, digest: str, opt_level: int) -> ort.InferenceSession:
        key = (digest, opt_level)
        session = self._local.by_key.get(key)
        if session is not None:
            self._local.by_key.move_to_end(key)
            return session
        return self._cache(key, load_session(model_path, digest, opt_level))

    def _cache(self, key: tuple[str, int], session: ort.InferenceSession) -> ort.InferenceSession:
        """Keep `session` as the calling thread's, evicting its least recently used beyond the limit."""
        sessions = self._local.by_key
        sessions[key] = session
        while len(sessions) > self._max_sessions:
            sessions.popitem(last=False)
        return session

    def close(self, *, wait: bool = True) -> None:
        """Stop the pool. With wait=False, runs in progress finish in the background."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
