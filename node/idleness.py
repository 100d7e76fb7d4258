"""Whether the machine is spare: a pure state machine over load samples, with hysteresis.

No clock is read and nothing sleeps: each `LoadSample` carries its own time (monotonic seconds),
so tests drive the gate with a fake clock and the daemon with `node.load_signals`.

Suspending is immediate: the first sample on which any condition fails suspends, with no
smoothing, because the owner should never wait for the node (the issue asks for ≤ 1 s). Resuming
is slow: the conditions must hold on every sample for `resume_after_seconds` in a row, and one bad
sample restarts that wait, so a bursty owner (a compile, a page load) does not see the node bounce
back between bursts.

Contract with the signal reader: `other_cpu_percent` must leave out the node's own process tree
(the daemon and every worker it started, alive or reaped). Otherwise the node's own work reads as
the owner's, suspends the node, the load vanishes, it resumes, and it bounces forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

State = Literal["running", "suspended"]

RUNNING_REASON = "running: machine is spare"
NO_SAMPLE_REASON = "suspended: no load reading yet"


@dataclass(frozen=True, slots=True)
class LoadSample:
    """What the machine looked like at `at` (monotonic seconds)."""

    at: float
    other_cpu_percent: float
    """CPU used by processes outside the node's tree, 0..100 of the whole machine (all cores)."""
    user_idle_seconds: float | None
    """Seconds since the last keyboard or mouse input; None when the platform cannot tell (headless)."""
    on_battery: bool | None
    """None when there is no battery or its state is unknown (treated as mains power)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.at):
            raise ValueError(f"sample time must be finite, got {self.at}")
        if not (math.isfinite(self.other_cpu_percent) and self.other_cpu_percent >= 0):
            raise ValueError(f"other_cpu_percent must be a finite percentage, got {self.other_cpu_percent}")
        if self.user_idle_seconds is not None and not (
            math.isfinite(self.user_idle_seconds) and self.user_idle_seconds >= 0
        ):
            raise ValueError(f"user_idle_seconds must be finite and >= 0 or None, got {self.user_idle_seconds}")


@dataclass(frozen=True, kw_only=True, slots=True)
class IdlePolicy:
    """When the machine counts as spare. The defaults are BOINC's, which volunteers already accept."""

    max_other_cpu_percent: float = 25.0
    """Suspend when other processes use more than this share of the whole machine (BOINC's default
    "suspend when non-BOINC CPU usage is above 25 %"): an idle desktop's background daemons stay well
    below it, while one busy core of a 4-core machine already reaches it."""
    min_user_idle_seconds: float | None = 180.0
    """Suspend while someone used keyboard or mouse within this many seconds (BOINC's "in use" means
    input in the last 3 minutes): long enough that reading a page does not count as idle. None turns
    the rule off; it is also skipped whenever a sample cannot tell (a headless server)."""
    allow_on_battery: bool = False
    """Computing on battery drains it in a fraction of its normal life and heats a laptop on a lap."""
    resume_after_seconds: float = 30.0
    """Resume only after every condition has held this long without a break: longer than the gaps
    inside bursty work (builds, page loads), short enough to lose little time once the owner leaves.
    Resuming is cheap (stopped workers continue), so a short wait costs nothing when it is right."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_other_cpu_percent) and 0 < self.max_other_cpu_percent <= 100):
            raise ValueError(f"max_other_cpu_percent must be in (0, 100], got {self.max_other_cpu_percent}")
        if self.min_user_idle_seconds is not None and not (
            math.isfinite(self.min_user_idle_seconds) and self.min_user_idle_seconds >= 0
        ):
            raise ValueError(f"min_user_idle_seconds must be >= 0 or None, got {self.min_user_idle_seconds}")
        if not (math.isfinite(self.resume_after_seconds) and self.resume_after_seconds >= 0):
            raise ValueError(f"resume_after_seconds must be >= 0, got {self.resume_after_seconds}")


def blockers(sample: LoadSample, policy: IdlePolicy) -> tuple[str, ...]:
    """Why `sample` says the machine is not spare, one phrase per failed condition; empty when spare."""
    why: list[str] = []
    if sample.other_cpu_percent > policy.max_other_cpu_percent:
        why.append(f"other processes use {sample.other_cpu_percent:.0f} % CPU")
    if (
        policy.min_user_idle_seconds is not None
        and sample.user_idle_seconds is not None
        and sample.user_idle_seconds < policy.min_user_idle_seconds
    ):
        why.append(f"user active {math.floor(sample.user_idle_seconds)} s ago")
    if sample.on_battery and not policy.allow_on_battery:
        why.append("on battery")
    return tuple(why)


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer after a sample; `reason` is the line `sparecycles node status` shows."""

    state: State
    reason: str
    since: float
    """When `state` last changed (monotonic seconds)."""
    resume_at: float | None = None
    """While suspended and every condition holds: when the node resumes if they keep holding."""
    changed: bool = False
    """True on the one decision where `state` flipped (the adapter acts and logs only then)."""

    @property
    def running(self) -> bool:
        return self.state == "running"


class IdleGate:
    """Feed it samples in time order; it answers running or suspended, and why.

    Before the first sample it is suspended. The first sample that finds the machine spare starts
    it at once: hysteresis guards against bouncing back on an owner, and at start-up there has been
    no owner activity to bounce back on (a busy start-up sample suspends as usual)."""

    def __init__(self, policy: IdlePolicy | None = None, *, now: float) -> None:
        self.policy = policy or IdlePolicy()
        self._decision = Decision("suspended", NO_SAMPLE_REASON, since=now)
        self._last_at = now
        self._seen_sample = False
        self._spare_since: float | None = None

    @property
    def decision(self) -> Decision:
        return self._decision

    def observe(self, sample: LoadSample) -> Decision:
        # a sample stamped earlier than the last one (clock trouble, reordering) counts as "now"
        # rather than rewinding the hysteresis timer
        now = max(sample.at, self._last_at)
        self._last_at = now
        first = not self._seen_sample
        self._seen_sample = True
        self._decision = self._decide(now, blockers(sample, self.policy), first=first)
        return self._decision

    def _decide(self, now: float, why: tuple[str, ...], *, first: bool) -> Decision:
        previous = self._decision
        if why:
            self._spare_since = None
            return self._become("suspended", "suspended: " + "; ".join(why), now)
        if previous.running:
            return self._become("running", RUNNING_REASON, now)
        if self._spare_since is None:
            self._spare_since = now
        resume_at = self._spare_since + self.policy.resume_after_seconds
        if first or now >= resume_at:
            self._spare_since = None
            return self._become("running", RUNNING_REASON, now)
        wait = math.ceil(resume_at - now)
        return self._become("suspended", f"suspended: idle again, resuming in {wait} s", now, resume_at=resume_at)

    def _become(self, state: State, reason: str, now: float, *, resume_at: float | None = None) -> Decision:
        changed = state != self._decision.state
        since = now if changed else self._decision.since
        return Decision(state, reason, since, resume_at=resume_at, changed=changed)
