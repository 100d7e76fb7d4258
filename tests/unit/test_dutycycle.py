"""The duty-cycle CPU cap: the pure schedule on a fake clock, and the SIGSTOP/SIGCONT adapter on a
real busy child process, measured with psutil."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from node.dutycycle import DEFAULT_PERIOD_SECONDS, DutyCycle, DutyCycler, Phase

PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())


def test_half_cap_runs_then_pauses_half_of_each_period() -> None:
    cycle = DutyCycle(0.5, 0.1)
    assert (cycle.run_seconds, cycle.pause_seconds) == (0.05, 0.05)
    assert cycle.phase(0.0) == Phase(True, 0.05)
    for at, running, remaining in [(0.02, True, 0.03), (0.05, False, 0.05), (0.09, False, 0.01)]:
        phase = cycle.phase(at)
        assert phase.running is running and phase.remaining == pytest.approx(remaining), at
    assert cycle.phase(1.001).running
    assert cycle.phase(-3.0) == Phase(True, 0.05)


@pytest.mark.parametrize("cap", [0.1, 0.25, 0.5, 0.9])
def test_over_a_long_run_the_running_share_is_the_cap(cap: float) -> None:
    cycle = DutyCycle(cap)
    step = 0.0005
    running = sum(cycle.phase(i * step).running for i in range(20_000))
    assert running / 20_000 == pytest.approx(cap, abs=0.01)


def test_a_full_cap_never_pauses() -> None:
    cycle = DutyCycle(1.0)
    assert not cycle.throttles and cycle.pause_seconds == 0
    assert all(cycle.phase(t / 7) == Phase(True, math.inf) for t in range(100))


def test_the_default_period_is_cpulimits_100_ms() -> None:
    assert DutyCycle(0.5).period == DEFAULT_PERIOD_SECONDS == 0.1


@pytest.mark.parametrize("cap", [0.0, -0.5, 1.01, 50.0, float("nan"), float("inf")])
def test_a_cap_outside_zero_to_one_is_refused_with_the_reason(cap: float) -> None:
    with pytest.raises(ValueError, match=r"CPU cap must be a fraction of a core in \(0, 1\]"):
        DutyCycle(cap)


@pytest.mark.parametrize("period", [0.0, -1.0, 0.001, float("nan")])
def test_a_period_too_short_to_keep_is_refused(period: float) -> None:
    with pytest.raises(ValueError, match="period"):
        DutyCycle(0.5, period)


@pytest.fixture
def hog() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield proc
    finally:
        proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def status(pid: int) -> str:
    return str(psutil.Process(pid).status())


async def core_share(pid: int, seconds: float) -> float:
    """The fraction of one core `pid` used over the next `seconds`."""
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)


@pytest.mark.integration
async def test_a_half_cap_holds_a_busy_process_near_half_a_core(hog: subprocess.Popen[bytes]) -> None:
    await asyncio.sleep(0.3)  # past the interpreter's start-up
    # The machine is shared: uncapped, the hog may get less than a core, and a cap scales what it
    # gets. So each capped window is bracketed by uncapped ones, and a window spoilt by someone
    # else's burst is retried; the upper bound must hold in every window.
    seen: list[tuple[float, float]] = []
    for _ in range(3):
        before = await core_share(hog.pid, 0.5)
        cycler = DutyCycler(DutyCycle(0.5), lambda: [hog.pid])
        task = asyncio.create_task(cycler.run())
        try:
            capped = await core_share(hog.pid, 2.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert cycler.stopped == frozenset() and status(hog.pid) != psutil.STATUS_STOPPED
        uncapped = (before + await core_share(hog.pid, 0.5)) / 2
        assert capped <= 0.65, f"a 50 % cap let the process use {capped:.0%} of a core"
        seen.append((capped, uncapped))
        if abs(capped - 0.5 * uncapped) <= 0.15:
            break
    else:
        pytest.fail(f"capped vs uncapped share of a core, per attempt: {seen}")


@pytest.mark.integration
async def test_cancelling_mid_pause_continues_what_it_stopped(hog: subprocess.Popen[bytes]) -> None:
    # a 2 s period: runs 0..1 s, pauses 1..2 s; cancel at 1.5 s, in the middle of the pause
    cycler = DutyCycler(DutyCycle(0.5, period=2.0), lambda: [hog.pid])
    task = asyncio.create_task(cycler.run())
    await asyncio.sleep(1.5)
    assert status(hog.pid) == psutil.STATUS_STOPPED and cycler.stopped == {hog.pid}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert cycler.stopped == frozenset()
    assert status(hog.pid) != psutil.STATUS_STOPPED
    cpu0 = cpu_seconds(hog.pid)
    await asyncio.sleep(0.3)
    assert cpu_seconds(hog.pid) > cpu0  # it is really computing again


@pytest.mark.integration
async def test_a_full_cap_never_stops_anything(hog: subprocess.Popen[bytes]) -> None:
    asked: list[int] = []

    def pids() -> list[int]:
        asked.append(hog.pid)
        return [hog.pid]

    cycler = DutyCycler(DutyCycle(1.0), pids)
    task = asyncio.create_task(cycler.run())
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert asked == [] and status(hog.pid) != psutil.STATUS_STOPPED


@pytest.mark.parametrize("bad", [0, -1, "self"])
async def test_it_refuses_to_stop_a_process_group_everyone_or_itself(bad: int | str) -> None:
    # what a bug in the PID source could do: kill(0) stops the daemon's whole process group,
    # kill(-1) every process the user owns, stopping itself leaves no one to send SIGCONT
    pid = os.getpid() if bad == "self" else int(bad)
    cycler = DutyCycler(DutyCycle(0.5, period=0.02), lambda: [pid])
    with pytest.raises(ValueError, match="refusing to stop"):
        await asyncio.wait_for(cycler.run(), 1.0)


async def test_a_worker_that_no_longer_exists_is_skipped() -> None:
    # a PID above pid_max names no process and never will (a reaped child's PID could already
    # belong to someone else's process on this shared machine, so the test must not use one)
    nobody = PID_MAX + 1
    cycler = DutyCycler(DutyCycle(0.5, period=0.02), lambda: [nobody])
    task = asyncio.create_task(cycler.run())
    await asyncio.sleep(0.1)
    assert not task.done() and cycler.stopped == frozenset()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
