"""Task runs in sandboxed worker processes, one per slot, with memory and wall-clock limits.

A volunteer runs models strangers uploaded, so onnxruntime never runs in the daemon itself: each
slot is a long-lived child of protocol/sandbox.py (empty working directory, minimal environment,
RLIMIT_AS per run, killed by PID past its time). The daemon's event loop only ships frames, so its
heartbeats and MQTT link stay live whatever a model does (an input-driven loop bomb ran 27.9 s on
the old in-process runner's event loop). Workers start when work arrives and stop after
`idle_seconds` without it, so an idle daemon gives their memory back.

The wall-clock limit comes from the model's measured cost on this machine: `run_factor` times the
predicted time (at least `min_run_seconds`, plus `load_seconds` when the worker must load the model
first), never past the lease (a late result counts for nothing: the run stops a second early so
that its error counts) nor `max_run_seconds`. The first run of a model has no measure yet and gets
the lease's remaining time.

Slots are processes rather than threads of one process (DESIGN.md §7 measured threads as faster
and ~45 MB leaner per slot); the sandbox is what a volunteer network needs, and issue 9's
benchmark keeps its cost in view (benchmarks/bench_network.py).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from protocol import sandbox
from protocol.runrecipe import runtime_fingerprint
from protocol.sandbox import SandboxPool
from protocol.tensors import Tensor

from .errors import NodeError, TaskFailed

__all__ = ["RunInterrupted", "RunOutcome", "Runner", "runtime_fingerprint"]

LEASE_MARGIN_SECONDS = 1.0


class RunInterrupted(NodeError):
    """The node stopped the run itself (suspended for its owner): the lease goes back, unrun, and
    counts against nobody."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    outputs: dict[str, Tensor]
    elapsed: float
    """Seconds spent in `InferenceSession.run` alone (not loading, not shipping)."""


@dataclass(frozen=True, slots=True)
class RunLimits:
    memory_bytes: int = 1 << 30
    """Address space one run may add to what its worker maps already (plus 4x the model's size,
    the room its weights take while loading)."""
    min_run_seconds: float = 2.0
    run_factor: float = 20.0
    load_seconds: float = 5.0
    max_run_seconds: float = 600.0


class Runner:
    """`slots` sandboxed workers, each keeping up to `sessions` models loaded."""

    def __init__(self, slots: int, *, sessions: int = 4, limits: RunLimits | None = None,
                 idle_seconds: float | None = 60.0, nice: int = 0) -> None:
        self.slots = slots
        self.limits = limits or RunLimits()
        self._pool = SandboxPool(workers=slots, sessions=sessions, idle_seconds=idle_seconds, nice=nice,
                                 name="node-run")
        # Seconds per input element, per (model, opt level): per element rather than per row, so a
        # job with longer sequences on a dynamic axis is not mistaken for a tiny one. It rises at
        # once when a run is slower and decays slowly, so one fast run cannot shrink the limit.
        self._seconds_per_element: dict[tuple[str, int], float] = {}
        self.paused = False
        self._interruptions = 0  # pauses and abandons so far: a run that saw one ended by our hand
        self.cpu_share = 1.0
        """The share of a core the workers get (a duty-cycled CPU cap): time limits stretch by 1/share."""

    @property
    def busy(self) -> int:
        """Runs in progress right now."""
        return self._pool.busy

    @property
    def interruptions(self) -> int:
        """Pauses and abandons so far: a run that saw one took longer than the model needs."""
        return self._interruptions

    @property
    def pids(self) -> list[int]:
        """The live workers' PIDs."""
        return self._pool.pids

    def time_limit(self, digest: str, opt_level: int, elements: int, *, load: bool,
                   lease_seconds: float | None) -> float:
        lim = self.limits
        per_element = self._seconds_per_element.get((digest, opt_level))
        if per_element is None:
            limit = lim.max_run_seconds
        else:
            limit = max(lim.min_run_seconds, lim.run_factor * per_element * elements)
            if load:
                limit += lim.load_seconds
        limit /= self.cpu_share
        if lease_seconds is not None:
            # Stopped a little before the lease ends, so that the error reaches the coordinator
            # while the lease is live: a late report is refused, and the task would wait for a
            # lease expiry (and a longer lease) instead of counting this owner's error.
            margin = min(LEASE_MARGIN_SECONDS, lease_seconds / 2)
            limit = min(limit, max(lease_seconds - margin, 0.1))
        return min(limit, lim.max_run_seconds)

    async def run(self, model_path: Path, digest: str, opt_level: int, inputs: Mapping[str, Tensor], *,
                  lease_seconds: float | None = None) -> RunOutcome:
        """Run every row as one batch: a task is never re-split, because rows run alone can differ
        from rows run inside a batch by more than the agreement tolerance (DESIGN.md §4).
        `lease_seconds`: how long the lease has left. Raises `TaskFailed` with a reason."""
        if self.paused:
            raise RunInterrupted("the node is suspended")
        key = (digest, opt_level)
        elements = max(1, sum(math.prod(t.shape) for t in inputs.values()))
        interruptions = self._interruptions

        def limit(load: bool) -> float:
            return self.time_limit(digest, opt_level, elements, load=load, lease_seconds=lease_seconds)

        async def model_bytes() -> bytes:  # read only when the worker must load the model
            return await asyncio.to_thread(model_path.read_bytes)

        outcome = await self._pool.run(model_bytes, digest, inputs, opt_level, seconds=limit,
                                       memory_bytes=self.limits.memory_bytes)
        if outcome.problem is not None:
            if self._interruptions != interruptions and outcome.problem in (sandbox.TIMEOUT, sandbox.CRASHED):
                raise RunInterrupted("the node was suspended during the run")
            raise TaskFailed(_reason(outcome, self.limits))
        assert outcome.outputs is not None
        seen = outcome.run_seconds / elements
        per_element = self._seconds_per_element.get(key)
        self._seconds_per_element[key] = (seen if per_element is None or seen > per_element
                                          else 0.8 * per_element + 0.2 * seen)
        return RunOutcome(outcome.outputs, outcome.run_seconds)

    def pause(self) -> None:
        """Stop every worker where it is (SIGSTOP): nothing computes until `resume`."""
        self.paused = True
        self._interruptions += 1
        self._pool.suspend(True)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._pool.suspend(False)

    async def abandon(self) -> None:
        """Kill the workers (their runs raise `RunInterrupted`) and give their memory back."""
        self._interruptions += 1
        await self._pool.kill_all()

    async def close(self) -> None:
        """Kill the workers by PID: a run past the drain deadline is abandoned, not awaited."""
        await self._pool.close()


def _reason(outcome: sandbox.Outcome, limits: RunLimits) -> str:
    """The error a Result carries: the node's own words, and the runtime's text only where it is
    about the model (its cwd is empty, so it cannot carry this machine's files)."""
    match outcome.problem:
        case sandbox.TIMEOUT:
            # No measured seconds in the text: owners' reports of one problem must read the same to
            # be counted together (coordinator/engine.py confirms errors by identical reasons).
            return "run stopped: over this node's time limit for the model"
        case sandbox.MEMORY:
            return f"run stopped: over this node's memory limit ({limits.memory_bytes >> 20} MiB per run)"
        case sandbox.MODEL:
            return f"onnxruntime could not run the model: {outcome.detail[:300]}"
        case sandbox.INPUTS:
            return f"inputs do not match the model: {outcome.detail[:300]}"
        case sandbox.CRASHED:
            return "the run's worker process died"
        case _:
            return f"the node could not run the task ({outcome.problem})"
