"""The real machine's load, read with psutil, as the `LoadSample`s that `node.idleness` consumes.

Every reading is a difference of cumulative counters since the previous one (the way
`psutil.cpu_percent(interval=None)` works, but with state of our own, so another caller of that
function in the process cannot steal our deltas): nothing sleeps. Measured here with 96 processes
on the machine, a sample costs 0.05 ms when the daemon names its workers (`own_pids`), 1.3 ms when
its tree is found by scanning every process (psutil's `children(recursive=True)`): at four samples
a second that is 0.02 % against 0.5 % of a core, so the daemon should name them.

"Other" CPU is the machine's busy time minus the node's own tree: the daemon, its workers, and
children they have reaped (a reaped child's time moves into its parent's `children_*` counters,
so a worker exiting between two samples is still counted as ours, not as the owner's). With
`own_pids`, name every child that does real work: an unnamed child's whole lifetime lands in the
daemon's counters when it is reaped, and that reading understates "other" once. Steal time (a
hypervisor serving other guests) is neither ours nor the owner's and counts as idle.

User idleness: Linux only, and only with an X display and `xprintidle` installed (it asks the X
screensaver extension); headless machines, Wayland sessions and other platforms answer None, which
the idleness policy reads as "cannot tell" and ignores. `xprintidle` runs at most once a second,
asynchronously; between runs the idle time is extrapolated, so input is noticed within about a
second.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable

import psutil

from .idleness import LoadSample

SAMPLE_SECONDS = 0.25
"""How often the daemon should sample. A load spike that starts mid-interval shows up diluted in
that interval's average, so detection can take up to two intervals: 0.5 s at this rate, inside the
issue's 1 s from spike to suspension."""
USER_IDLE_REFRESH_SECONDS = 1.0
XPRINTIDLE_TIMEOUT_SECONDS = 2.0


def machine_cpu_seconds() -> tuple[float, float]:
    """Busy and total CPU seconds so far, all cores together; the fields vary by platform."""
    times: dict[str, float] = psutil.cpu_times()._asdict()
    # Linux counts guest time inside user and nice already
    total = sum(times.values()) - times.get("guest", 0.0) - times.get("guest_nice", 0.0)
    idle = times.get("idle", 0.0) + times.get("iowait", 0.0) + times.get("steal", 0.0)
    return total - idle, total


def on_battery() -> bool | None:
    """True on battery, False on mains, None without a battery or when the platform cannot tell."""
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError, RuntimeError):
        return None
    if battery is None or battery.power_plugged is None:
        return None
    return not battery.power_plugged


class XUserIdle:
    """Seconds since the last X input, from `xprintidle`, refreshed at most once a `refresh` seconds."""

    def __init__(self, command: str, *, refresh: float = USER_IDLE_REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.command = command
        self.refresh = refresh
        self._clock = clock
        self._idle: float | None = None
        self._measured_at = 0.0
        self._checked_at: float | None = None

    @classmethod
    def detect(cls) -> XUserIdle | None:
        """A probe when this looks like a Linux X session with xprintidle installed, else None."""
        if not os.environ.get("DISPLAY") or not sys.platform.startswith("linux"):
            return None
        command = shutil.which("xprintidle")
        return cls(command) if command else None

    def seconds(self) -> float | None:
        """The last reading plus the time since (None until one succeeded, or after one failed)."""
        if self._idle is None:
            return None
        return self._idle + max(0.0, self._clock() - self._measured_at)

    async def refresh_if_due(self) -> None:
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self.refresh:
            return
        self._checked_at = now
        self._idle = await self._run()
        self._measured_at = self._clock()

    async def _run(self) -> float | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
        except OSError:
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), XPRINTIDLE_TIMEOUT_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        if proc.returncode != 0:
            return None  # no X server reachable, no screensaver extension: cannot tell
        try:
            milliseconds = int(out.strip())
        except ValueError:
            return None
        return max(0, milliseconds) / 1000


class LoadReader:
    """Reads total, own and other CPU, battery and user idleness.

    `own_pids()` names the daemon's worker processes (cheap); without it the whole tree under
    `root_pid` is found by scanning every process on each sample. The root is always counted.
    The first reading covers the time since construction."""

    def __init__(self, *, root_pid: int | None = None, own_pids: Callable[[], Iterable[int]] | None = None,
                 user_idle: XUserIdle | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = psutil.Process(root_pid if root_pid is not None else os.getpid())
        self._own_pids = own_pids
        self.user_idle = user_idle
        self._clock = clock
        self._procs: dict[int, psutil.Process] = {}
        self._busy, self._total = machine_cpu_seconds()
        self._own = self._own_cpu_seconds()
        self.total_cpu_percent = 0.0
        self.own_cpu_percent = 0.0

    @classmethod
    def for_this_machine(cls, *, own_pids: Callable[[], Iterable[int]] | None = None) -> LoadReader:
        """The daemon's reader: rooted at this process, with xprintidle when there is an X display."""
        return cls(own_pids=own_pids, user_idle=XUserIdle.detect())

    def sample(self) -> LoadSample:
        """Read the counters now; never blocks and never starts a process (see `read()`)."""
        busy, total = machine_cpu_seconds()
        own = self._own_cpu_seconds()
        d_total = total - self._total
        if d_total > 0:  # otherwise too soon after the last reading: keep the last figures
            d_busy = min(d_total, max(0.0, busy - self._busy))
            # a process that left the tree unreaped takes its past time with it: never below 0
            d_own = min(d_busy, max(0.0, own - self._own))
            self.total_cpu_percent = 100 * d_busy / d_total
            self.own_cpu_percent = 100 * d_own / d_total
            self._busy, self._total, self._own = busy, total, own
        other = max(0.0, self.total_cpu_percent - self.own_cpu_percent)
        return LoadSample(
            at=self._clock(),
            other_cpu_percent=other,
            user_idle_seconds=self.user_idle.seconds() if self.user_idle else None,
            on_battery=on_battery(),
        )

    async def read(self) -> LoadSample:
        """`sample()`, after refreshing the user-idle reading when it is due (the one slow part)."""
        if self.user_idle is not None:
            await self.user_idle.refresh_if_due()
        return self.sample()

    def _tree(self) -> list[psutil.Process]:
        if self._own_pids is None:
            try:
                return [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
        procs = [self.root]
        for pid in set(self._own_pids()) - {self.root.pid}:
            # keep Process objects: psutil checks a kept one's start time, so a reused PID is not ours
            proc = self._procs.get(pid)
            if proc is None:
                try:
                    proc = self._procs[pid] = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
            procs.append(proc)
        return procs

    def _own_cpu_seconds(self) -> float:
        seconds = 0.0
        live: set[int] = set()
        for proc in self._tree():
            try:
                if not proc.is_running():  # gone, or its PID now belongs to another process
                    continue
                t = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            live.add(proc.pid)
            seconds += t.user + t.system + t.children_user + t.children_system
        for pid in set(self._procs) - live:
            del self._procs[pid]
        return seconds
