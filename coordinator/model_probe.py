"""Try an untrusted model in a sandbox before volunteers are asked to run it.

A model passes `onnx.checker` and the model policy and still can be hostile: a 196-byte graph whose
constant ONNX Runtime folds at load time took 1.8 GB and 4 s here. Volunteers would pay that on
every node, so the coordinator pays it once, in protocol/sandbox.py's children (empty working
directory, minimal environment, address-space and time limits, killed by PID), and refuses with
one short, generic reason; the runtime's text goes to the log only (it can carry bytes the model
made the runtime read, and the model's own strings).

Two checks, each on what is real:
- at upload, the model is loaded (load-time folding bombs, unloadable graphs);
- the first job of a model (per optimisation level) runs its first task's rows, before the job is
  accepted. Not invented rows: filling dynamic dimensions with 1 refused real models (an audio
  model needs at least 2 samples), and rows of zeros cannot show what the submitter's values do.
Bombs driven by later rows' values are the nodes' sandboxes' business (node/runner.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

from protocol import sandbox
from protocol.digests import sha256_hex
from protocol.sandbox import SandboxPool
from protocol.tensors import Tensor

from .models import InvalidModel

log = logging.getLogger("sparecycles.coordinator.model_probe")

NOT_LOADED = "the model could not be loaded"
NOT_RUN = "the model could not run on the job's first rows"
OUT_OF_MEMORY = "the model ran out of memory"
TOO_SLOW = "the model took too long"
BAD_INPUTS = "the job's inputs do not match the model's inputs"


class ProbeBusy(Exception):
    """Every probe slot is taken: the caller answers 429 rather than queueing without bound."""


class Prober:
    """At most `limit` probes at once, in long-lived sandboxed workers (a warm worker checks a
    small model in milliseconds; a cold one costs a spawn and the runtime's import, ~0.3 s). No
    waiting line: each probe may take `memory_bytes` + 4x its model."""

    def __init__(self, *, limit: int, memory_bytes: int, seconds: float, idle_seconds: float = 60.0) -> None:
        self.limit = limit
        self.memory_bytes = memory_bytes
        self.seconds = seconds
        self.running = 0
        self._pool = SandboxPool(workers=limit, sessions=2, idle_seconds=idle_seconds,
                                 start_seconds=max(30.0, seconds), name="probe")

    @property
    def pids(self) -> list[int]:
        return self._pool.pids

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        if self.running >= self.limit:
            raise ProbeBusy(f"{self.limit} model checks are running: try again shortly")
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    async def check(self, data: bytes, *, rows: Mapping[str, Tensor] | None = None, opt_level: int = 99) -> None:
        """Raise `InvalidModel` unless the model loads (and, given `rows`, runs on them) within the
        limits; `ProbeBusy` when every slot is taken."""
        digest = sha256_hex(data)
        with self._slot():
            outcome = await self._pool.run(data, digest, rows, opt_level, memory_bytes=self.memory_bytes,
                                           seconds=self.seconds)
        if outcome.problem is None:
            return
        stage = "load" if rows is None else "run on the job's first rows"
        log.info("model probe refused model %s (%s): %s: %s", digest[:12], stage, outcome.problem, outcome.detail)
        match outcome.problem:
            case sandbox.MEMORY:
                raise InvalidModel(OUT_OF_MEMORY)
            case sandbox.TIMEOUT:
                raise InvalidModel(TOO_SLOW)
            case sandbox.INPUTS:
                raise InvalidModel(BAD_INPUTS)
            case sandbox.MODEL | sandbox.CRASHED:
                raise InvalidModel(NOT_LOADED if rows is None else NOT_RUN)
            case _:  # ours, not the model's: the submitter may simply try again
                raise ProbeBusy("the model check could not run: try again shortly")

    async def close(self) -> None:
        await self._pool.close()
