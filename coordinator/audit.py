"""Audits: the coordinator re-runs a sampled task itself, in a sandboxed worker process.

Trust is earned against ground truth the coordinator controls (DESIGN.md §12), so it runs the
submitted model on the task's inputs and the engine compares with what nodes returned. The model is
a stranger's: it runs only in protocol/sandbox.py's children (empty working directory, minimal
environment, address-space and wall-clock limits, killed by PID), the same sandbox and the same
session recipe (protocol/runrecipe.py) the nodes use, so an honest node's outputs agree with the
audit bit for bit.

A `problem` means the audit could not judge the task, never that a node is wrong: the engine
compares outputs only when there are some.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from protocol import sandbox
from protocol.errors import BadTensor
from protocol.sandbox import SandboxPool
from protocol.tensors import Tensor, decode_tensor_map, tensors_from_arrays

log = logging.getLogger("sparecycles.coordinator.audit")

Arrays = dict[str, npt.NDArray[Any]]

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
_REASONS = {sandbox.MEMORY: OUT_OF_MEMORY, sandbox.TIMEOUT: TIMED_OUT, sandbox.MODEL: MODEL_FAILED,
            sandbox.INPUTS: BAD_INPUTS, sandbox.CRASHED: CRASHED, sandbox.NOT_STARTED: NOT_STARTED,
            sandbox.CLOSED: CLOSED}


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


class Auditor:
    """At most `workers` audits at once, each in a sandboxed child (protocol/sandbox.py); callers queue.

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
        self.memory_bytes = memory_bytes
        self.base_seconds = base_seconds
        self.seconds_per_mb = seconds_per_mb
        self.node_factor = node_factor
        self.max_seconds = max_seconds
        self._pool = SandboxPool(workers=workers, sessions=sessions, start_seconds=start_seconds,
                                 max_output_bytes=max_output_bytes, name="audit")

    @property
    def pending(self) -> int:
        """Audits running or waiting for a worker: the engine can sample less when this grows."""
        return self._pool.pending

    @property
    def pids(self) -> list[int]:
        return self._pool.pids

    def time_limit(self, model_bytes: int, input_bytes: int, node_seconds: float = 0.0) -> float:
        megabytes = (model_bytes + input_bytes) / 1e6
        return min(self.max_seconds, self.base_seconds + self.seconds_per_mb * megabytes
                   + self.node_factor * max(0.0, node_seconds))

    async def run(self, model_bytes: bytes, model_digest: str, inputs: Mapping[str, npt.NDArray[Any]],
                  opt_level: int, *, node_seconds: float = 0.0) -> AuditOutcome:
        """Run the model on `inputs` as a node would. Never raises (except on cancellation): every
        failure is an `AuditOutcome` with a short `problem`."""
        try:
            tensors = tensors_from_arrays(inputs)
        except BadTensor:
            log.exception("audit: inputs of model %s cannot be sent", model_digest[:12])
            return AuditOutcome(None, BAD_INPUTS, 0.0)
        limit = self.time_limit(len(model_bytes), sum(int(a.nbytes) for a in inputs.values()), node_seconds)
        outcome = await self._pool.run(model_bytes, model_digest, tensors, opt_level,
                                       memory_bytes=self.memory_bytes, seconds=limit)
        if outcome.problem is not None:
            log.warning("audit of model %s: %s: %s", model_digest[:12], outcome.problem, outcome.detail)
            return AuditOutcome(None, _REASONS.get(outcome.problem, INTERNAL), outcome.seconds)
        assert outcome.outputs is not None
        return AuditOutcome({n: t.to_array() for n, t in outcome.outputs.items()}, None, outcome.seconds)

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

    async def close(self) -> None:
        """Kill every worker by PID and remove its directory; later audits answer a problem."""
        await self._pool.close()

    async def __aenter__(self) -> Auditor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
