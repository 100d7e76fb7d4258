"""The psutil load reader on the real machine: a CPU hog outside the node's tree is "other" CPU, the
same hog inside it is the node's own and never "other", and user idleness comes from xprintidle
only where there is an X display.

The machine is shared, so others' load adds to every "other" reading: assertions compare the
reader with what psutil says the hog itself got, rather than with fixed figures."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from node.idleness import LoadSample
from node.load_signals import SAMPLE_SECONDS, LoadReader, XUserIdle, on_battery

HOG = "while True: pass"


class Hog:
    """A busy process's share of the whole machine between two readings (it may get less than a
    core when others load the machine)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.share = 0.0
        self._last = self._now()

    def _now(self) -> tuple[float, float]:
        t = self.proc.cpu_times()
        return t.user + t.system, time.monotonic()

    def read(self) -> float:
        now = self._now()
        self.share = 100 * (now[0] - self._last[0]) / ((now[1] - self._last[1]) * (os.cpu_count() or 1))
        self._last = now
        return self.share


def poll(reader: LoadReader, hog: Hog | None, until: Callable[[LoadSample], bool], within: float) -> list[LoadSample]:
    """Samples (and the hog's share alongside) every SAMPLE_SECONDS until `until` holds or `within`
    seconds pass."""
    samples: list[LoadSample] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_SECONDS)
        samples.append(reader.sample())
        if hog is not None:
            hog.read()
        if until(samples[-1]):
            break
    return samples


@pytest.fixture
def stranger_hog() -> Iterator[Callable[[], int]]:
    """Starts (when called) a busy process outside this test's process tree: through a short-lived
    intermediate, so it is reparented away from us, as the owner's programs are not the node's."""
    started: list[int] = []

    def start() -> int:
        # the hog must not inherit the launcher's stdout, or reading it would wait for the hog to end
        launch = ("import subprocess, sys; d = subprocess.DEVNULL; "
                  f"print(subprocess.Popen([sys.executable, '-c', {HOG!r}], stdin=d, stdout=d, stderr=d).pid)")
        out = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, check=True, timeout=30)
        started.append(int(out.stdout))
        assert psutil.Process(started[-1]).ppid() != os.getpid()
        return started[-1]

    try:
        yield start
    finally:
        for pid in started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.integration
def test_a_hog_outside_the_tree_is_other_cpu_not_own(stranger_hog: Callable[[], int]) -> None:
    reader = LoadReader()
    hog = Hog(stranger_hog())
    rising = poll(reader, hog, lambda s: s.other_cpu_percent > 30, within=1.5)
    assert rising[-1].other_cpu_percent > 30, [round(s.other_cpu_percent) for s in rising]

    # (the launcher we started and reaped counted as ours; from here on this process only sleeps)
    during: list[tuple[float, float, float]] = []  # other, own, the hog's share
    for _ in range(3):
        time.sleep(SAMPLE_SECONDS)
        other = reader.sample().other_cpu_percent
        during.append((other, reader.own_cpu_percent, hog.read()))
    assert all(other >= share - 10 for other, _, share in during), during
    assert all(own < 10 for _, own, _ in during), f"the hog counted as the node's own: {during}"


@pytest.mark.integration
def test_other_cpu_falls_when_the_outside_load_ends(stranger_hog: Callable[[], int]) -> None:
    # Others share this machine and their load comes and goes, which would hide the hog's end. So
    # here everything but the hog counts as "own": "other" is then the hog alone (plus the few
    # points of interrupt time no process is charged with), whatever else runs.
    pid = stranger_hog()
    reader = LoadReader(own_pids=lambda: [p for p in psutil.pids() if p != pid])
    hog = Hog(pid)
    rising = poll(reader, hog, lambda s: hog.share > 15 and s.other_cpu_percent >= hog.share - 10, within=1.5)
    assert hog.share > 15 and rising[-1].other_cpu_percent >= hog.share - 10, (hog.share, rising)

    os.kill(pid, signal.SIGKILL)
    low: list[float] = []

    def two_low_in_a_row(sample: LoadSample) -> bool:
        low.append(sample.other_cpu_percent)
        return len(low) >= 2 and max(low[-2:]) < 10

    # two in a row: in the reading where init reaps the hog all of its past time lands in init's
    # children counters at once (own jumps, other reads 0); the next one is a plain reading
    poll(reader, None, two_low_in_a_row, within=3.0)
    assert len(low) >= 2 and max(low[-2:]) < 10, [round(v) for v in low]


@pytest.mark.integration
@pytest.mark.parametrize("find_tree", ["scan", "named"])
def test_a_hog_inside_the_tree_is_own_cpu_not_other(find_tree: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        reader = LoadReader(own_pids=(lambda: [child.pid]) if find_tree == "named" else None)
        hog = Hog(child.pid)
        # the hog is the node's own work: it shows in own CPU (what it got of the machine, give or
        # take the 10 points the two readings' slightly different windows allow), never in other
        counted = poll(reader, hog, lambda s: hog.share > 15 and reader.own_cpu_percent >= hog.share - 10, within=2.0)
        assert hog.share > 15 and reader.own_cpu_percent >= hog.share - 10, (reader.own_cpu_percent, hog.share)
        assert counted[-1].other_cpu_percent == pytest.approx(
            max(0.0, reader.total_cpu_percent - reader.own_cpu_percent))
    finally:
        child.kill()
        child.wait()
    # the hog's last interval moved into our children_* counters when it was reaped: still ours
    poll(reader, None, lambda s: reader.own_cpu_percent < 10, within=2.0)
    assert reader.own_cpu_percent < 10


def test_a_reader_of_a_headless_machine_cannot_tell_user_idleness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    assert XUserIdle.detect() is None
    assert LoadReader.for_this_machine().sample().user_idle_seconds is None


def test_battery_state_follows_psutil() -> None:
    battery = psutil.sensors_battery()
    expected = None if battery is None or battery.power_plugged is None else not battery.power_plugged
    assert on_battery() == expected
    assert LoadReader().sample().on_battery == expected


def fake_xprintidle(directory: Path, body: str) -> str:
    """An executable standing in for xprintidle (none is installed here): it logs each run."""
    script = directory / "xprintidle"
    script.write_text(f"#!/bin/sh\necho run >> {directory / 'runs'}\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def runs(directory: Path) -> int:
    log = directory / "runs"
    return len(log.read_text().splitlines()) if log.exists() else 0


async def test_xprintidle_milliseconds_become_seconds_extrapolated_between_runs(tmp_path: Path) -> None:
    now = [100.0]
    probe = XUserIdle(fake_xprintidle(tmp_path, "echo 12345"), refresh=1.0, clock=lambda: now[0])
    assert probe.seconds() is None  # nothing read yet
    await probe.refresh_if_due()
    assert probe.seconds() == pytest.approx(12.345)
    now[0] += 0.5
    await probe.refresh_if_due()  # not due: no new process
    assert runs(tmp_path) == 1 and probe.seconds() == pytest.approx(12.845)
    now[0] += 0.5
    await probe.refresh_if_due()
    assert runs(tmp_path) == 2 and probe.seconds() == pytest.approx(12.345)


@pytest.mark.parametrize("body", ["echo 'could not open display' >&2; exit 1", "echo soon"])
async def test_a_failing_or_garbled_xprintidle_means_cannot_tell(tmp_path: Path, body: str) -> None:
    probe = XUserIdle(fake_xprintidle(tmp_path, body))
    await probe.refresh_if_due()
    assert runs(tmp_path) == 1 and probe.seconds() is None


async def test_a_reader_with_an_x_probe_reports_user_idleness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    fake_xprintidle(tmp_path, "echo 200000")
    reader = LoadReader.for_this_machine()
    assert reader.user_idle is not None
    sample = await reader.read()
    assert sample.user_idle_seconds is not None and 200 <= sample.user_idle_seconds < 201
