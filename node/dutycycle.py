"""A CPU cap by duty-cycling: let the workers run for `cap` of each period, stop them for the rest.

`DutyCycle` is the pure schedule (which phase a moment falls in, and for how much longer);
`DutyCycler` is the thin adapter that sends SIGSTOP / SIGCONT by PID on that schedule. Stopping a
process for part of each period holds it to that fraction of its core whatever it is doing, the
way `cpulimit` does; nice values cannot do this (a niced process still takes a whole idle core).

The period is 100 ms, cpulimit's time slot: each period costs two event-loop wake-ups and two
signals per worker (a few tens of µs), and asyncio.sleep oversleeps by about a millisecond, so
much shorter periods spend more and hold the cap less exactly; much longer ones show the owner
full-speed bursts (a fan spinning up, a stutter) of half a second or more.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DEFAULT_PERIOD_SECONDS = 0.1
MIN_PERIOD_SECONDS = 0.01  # below this asyncio's own timer slack is a large share of each phase


@dataclass(frozen=True, slots=True)
class Phase:
    running: bool
    remaining: float
    """Seconds until the phase flips; infinite when the cycle never pauses."""


@dataclass(frozen=True, slots=True)
class DutyCycle:
    """Run `cap` of every `period` seconds, pause the rest; the period starts with the run."""

    cap: float
    period: float = DEFAULT_PERIOD_SECONDS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.cap) and 0 < self.cap <= 1):
            raise ValueError(
                f"CPU cap must be a fraction of a core in (0, 1], got {self.cap}: "
                "0 would never run, and a slot cannot use more than its core"
            )
        if not (math.isfinite(self.period) and self.period >= MIN_PERIOD_SECONDS):
            raise ValueError(f"duty-cycle period must be at least {MIN_PERIOD_SECONDS} s, got {self.period}")

    @property
    def throttles(self) -> bool:
        """False for cap 1.0: the workers are never paused."""
        return self.cap < 1

    @property
    def run_seconds(self) -> float:
        return self.cap * self.period

    @property
    def pause_seconds(self) -> float:
        return self.period - self.run_seconds

    def phase(self, elapsed: float) -> Phase:
        """The phase `elapsed` seconds after the cycle started (negative counts as 0).

        Phases are placed on a fixed grid from the start rather than chained from the last wake-up,
        so a late wake-up shortens the next phase instead of shifting every later one."""
        if not self.throttles:
            return Phase(True, math.inf)
        into = max(0.0, elapsed) % self.period
        if into < self.run_seconds:
            return Phase(True, self.run_seconds - into)
        return Phase(False, self.period - into)


class DutyCycler:
    """Holds worker processes to `cycle.cap` of their cores with SIGSTOP / SIGCONT.

    `pids()` is asked at the start of every pause for the processes to stop; a worker started
    mid-cycle is caught by the next pause. The PIDs must be children the daemon has not yet
    reaped (a Popen it has not waited for), so a PID cannot have been reused by a stranger.

    Cancel-safe: however `run()` ends (cancelled mid-pause included) every process it stopped
    gets SIGCONT before it returns. Another pauser (the idleness suspension) must therefore
    cancel and await this task first and stop the workers after, or this task's next resume
    would restart work the other had stopped."""

    def __init__(self, cycle: DutyCycle, pids: Callable[[], Iterable[int]],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.cycle = cycle
        self._pids = pids
        self._clock = clock
        self._stopped: set[int] = set()

    @property
    def stopped(self) -> frozenset[int]:
        """The PIDs this cycler has stopped and not yet continued."""
        return frozenset(self._stopped)

    async def run(self) -> None:
        """Cycle until cancelled."""
        try:
            if not self.cycle.throttles:
                await asyncio.Event().wait()  # nothing to do until cancelled
            start = self._clock()
            while True:
                phase = self.cycle.phase(self._clock() - start)
                if phase.running:
                    self._resume()
                else:
                    self._pause()
                await asyncio.sleep(phase.remaining)
        finally:
            self._resume()

    def _pause(self) -> None:
        pids = set(self._pids())
        # kill(0 or -n) signals a whole process group and kill(-1) every process we may signal;
        # stopping ourselves leaves nobody to send the SIGCONT
        if any(pid <= 0 or pid == os.getpid() for pid in pids):
            raise ValueError(f"refusing to stop {sorted(pids)}: only positive PIDs of worker processes")
        for pid in pids - self._stopped:
            if _signal(pid, signal.SIGSTOP):
                self._stopped.add(pid)

    def _resume(self) -> None:
        for pid in self._stopped:
            _signal(pid, signal.SIGCONT)
        self._stopped.clear()


def _signal(pid: int, signum: signal.Signals) -> bool:
    """Send `signum`; False when the process is gone or not ours (a worker that just exited)."""
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True
