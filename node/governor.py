"""The node computes only while the machine is spare, and never above its CPU cap.

The decisions are node/idleness.py's (pure, with hysteresis) over node/load_signals.py's readings;
this module applies them to the run workers (node/runner.py) and tells the daemon:
- suspend: within one sample (0.25 s) the workers are stopped with SIGSTOP, so nothing computes;
  runs whose lease ends before the node could resume (`resume_after_seconds` at the soonest) are
  abandoned at once (their workers killed, memory given back) and their leases handed back;
- resume: workers continue (SIGCONT), the daemon asks for work again;
- cap: below 1.0, node/dutycycle.py holds the workers to that share of each slot. It is cancelled
  before a suspension stops the workers, as that module requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from .dutycycle import DutyCycle, DutyCycler
from .idleness import Decision, IdleGate, IdlePolicy
from .load_signals import SAMPLE_SECONDS, LoadReader
from .logs import kv
from .runner import Runner

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class GovernorSettings:
    idle_only: bool = True
    """Compute only while the machine is spare; False: whenever there is work (a dedicated server)."""
    policy: IdlePolicy = field(default_factory=IdlePolicy)
    cpu_cap: float = 1.0
    """Share of each slot's core the workers may use (0 < cap <= 1), by duty-cycling."""
    sample_seconds: float = SAMPLE_SECONDS


class Governor:
    def __init__(self, settings: GovernorSettings, runner: Runner, *,
                 on_change: Callable[[Decision], None], lease_ends: Callable[[], list[float]],
                 reader: LoadReader | None = None) -> None:
        """`on_change` hears every change of state (the daemon stops asking for work and releases
        what it holds unstarted); `lease_ends` gives the monotonic end of each running lease."""
        self.settings = settings
        self.runner = runner
        self._on_change = on_change
        self._lease_ends = lease_ends
        self._reader = reader
        self._gate: IdleGate | None = None
        self._cycler: asyncio.Task[None] | None = None
        self.decision: Decision | None = None

    @property
    def suspended(self) -> bool:
        return self.decision is not None and not self.decision.running

    async def run(self) -> None:
        """Until cancelled; the workers are left running (SIGCONT) whatever ends it."""
        loop = asyncio.get_running_loop()
        self._start_cycler()
        if not self.settings.idle_only:
            try:
                await asyncio.Event().wait()
            finally:
                await self._stop_cycler()
        reader = self._reader or LoadReader.for_this_machine(own_pids=lambda: self.runner.pids)
        self._gate = IdleGate(self.settings.policy, now=loop.time())
        try:
            while True:
                await asyncio.sleep(self.settings.sample_seconds)
                decision = self._gate.observe(await reader.read())
                if decision.changed or self.decision is None or decision.reason != self.decision.reason:
                    await self._apply(decision, now=loop.time())
        finally:
            await self._stop_cycler()
            self.runner.resume()

    async def _apply(self, decision: Decision, *, now: float) -> None:
        was_running = self.decision is None or self.decision.running
        self.decision = decision
        if decision.running and not was_running:
            self.runner.resume()
            self._start_cycler()
            log.info(kv("resumed", reason=decision.reason))
        elif not decision.running and was_running:
            await self._stop_cycler()  # before the stop: its next resume would restart the workers
            self.runner.pause()
            soonest = now + self.settings.policy.resume_after_seconds
            abandoned = any(end < soonest for end in self._lease_ends())
            if abandoned:
                await self.runner.abandon()  # they cannot finish in time: hand the leases back now
            log.info(kv("suspended", reason=decision.reason, abandoned_runs=abandoned))
        self._on_change(decision)

    def _start_cycler(self) -> None:
        cycle = DutyCycle(self.settings.cpu_cap)
        if cycle.throttles and self._cycler is None:
            self._cycler = asyncio.create_task(DutyCycler(cycle, lambda: self.runner.pids).run(), name="cpu-cap")

    async def _stop_cycler(self) -> None:
        if self._cycler is not None:
            self._cycler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cycler
            self._cycler = None
