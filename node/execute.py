"""One assignment from start to Result: model, inputs, ONNX Runtime, outputs (inline or uploaded).

Anything that goes wrong becomes `Result(error=...)`, which the coordinator counts as "this node
could not run it" (not a vote) and reissues elsewhere. `NotRun` is different: the node gives the
lease back unrun (expired before a slot came free) and the worker sends a Release.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import numpy.typing as npt

from protocol.errors import PeerError
from protocol.messages import Assignment, Result
from protocol.sandbox import MAX_BATCH
from protocol.tensors import Tensor, digest_tensors, encode_tensor_map, encoded_size_bound, tensors_from_arrays

from . import api, batching
from .cache import ModelCache
from .errors import NodeError, TaskFailed
from .logs import kv
from .membership import RequestSigner
from .rungate import RunGate
from .runner import RunInterrupted, Runner

log = logging.getLogger(__name__)

T = TypeVar("T")
Arrays = dict[str, npt.NDArray[Any]]
OutputFilter = Callable[[Arrays], Arrays]


class NotRun(NodeError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def failed(a: Assignment, reason: str, *, elapsed: float = 0.0) -> Result:
    return Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest, output_digest="",
                  outputs=None, elapsed=elapsed, error=reason[:500])


class Pipeline:
    """Runs assignments; at most `runner.slots` at once inside ONNX Runtime, any number fetching."""

    def __init__(self, *, cache: ModelCache, runner: Runner, http: aiohttp.ClientSession, base_url: str,
                 inline_limit: int, max_blob_bytes: int, fetch_attempts: int = 3,
                 output_filter: OutputFilter | None = None, clock: Callable[[], float] = time.time,
                 signer: RequestSigner | None = None) -> None:
        self._cache = cache
        self._signer = signer
        self._runner = runner
        self._http = http
        self._base_url = base_url
        self._inline_limit = inline_limit
        self._max_blob_bytes = max_blob_bytes
        self._attempts = fetch_attempts
        self._filter = output_filter
        self._clock = clock
        # Several runs per slot may be handed to the runner at once: it sends them to a worker
        # together (protocol/sandbox.py), which is what makes small tasks cheap.
        self.gate = RunGate(runner.slots)
        """Runs handed to the runner at once: `set_depth` follows the measured task time."""
        self.started: set[str] = set()
        """Leases whose run has begun: on drain these finish, the rest are released."""

    def set_depth(self, task_seconds: float | None) -> None:
        """Runs per slot handed to the runner at once, from how long tasks take here (at most a
        worker's frame, MAX_BATCH)."""
        self.gate.set_limit(self._runner.slots * batching.runs_per_slot(task_seconds=task_seconds, most=MAX_BATCH))

    async def execute(self, a: Assignment) -> Result:
        """A Result (possibly an error result), or `NotRun` if the lease should be released."""
        try:
            return await self._execute(a)
        except TaskFailed as exc:
            log.warning(kv("task_failed", task=a.task, lease=a.lease, model=a.model[:12], reason=exc.reason))
            return failed(a, exc.reason)

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self._attempts + 1):
            try:
                return await call()
            except TaskFailed as exc:
                if not exc.transient or attempt >= self._attempts:
                    raise
                delay = 0.5 * 2 ** (attempt - 1)
                log.info(kv("fetch_retry", what=what, attempt=attempt, retry_in=delay, error=exc.reason))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _inputs(self, a: Assignment) -> dict[str, Tensor]:
        if a.inputs is None:
            return await self._retry("inputs", lambda: api.get_inputs(
                self._http, self._base_url, a.input_digest, a.lease, max_bytes=self._max_blob_bytes,
                signer=self._signer))
        if digest_tensors(a.inputs) != a.input_digest:
            raise TaskFailed("inline inputs do not hash to the assignment's input_digest")
        return dict(a.inputs)

    async def _execute(self, a: Assignment) -> Result:
        with self._cache.pinned(a.model):
            path = await self._retry("model", lambda: self._cache.fetch(a.model))
            inputs = await self._inputs(a)
            async with self.gate:
                left = a.expires_at - self._clock()
                if left <= 0:
                    raise NotRun("lease expired before a slot was free")
                self.started.add(a.lease)
                try:
                    outcome = await self._runner.run(path, a.model, a.opt_level, inputs, lease_seconds=left)
                except RunInterrupted as exc:
                    raise NotRun(exc.args[0]) from exc
        tensors = outcome.outputs
        if self._filter is not None:
            try:
                tensors = tensors_from_arrays(self._filter({n: t.to_array() for n, t in tensors.items()}))
            except PeerError as exc:  # e.g. a string output: not a dtype the protocol carries
                raise TaskFailed(f"model output cannot be sent: {exc}") from exc
        digest = digest_tensors(tensors)
        inline = encoded_size_bound(tensors) <= self._inline_limit  # measured without encoding
        if not inline:
            packed = encode_tensor_map(tensors)
            await self._retry("outputs", lambda: api.put_outputs(
                self._http, self._base_url, digest, a.lease, packed, signer=self._signer))
        if log.isEnabledFor(logging.DEBUG):  # not built per task unless someone reads it
            log.debug(kv("task_done", task=a.task, lease=a.lease, elapsed=round(outcome.elapsed, 6),
                         output=digest[:12], inline=inline))
        return Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                      output_digest=digest, outputs=tensors if inline else None, elapsed=outcome.elapsed)
