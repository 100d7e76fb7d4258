"""The idleness gate driven by a fake clock: suspends on the first bad sample, resumes only after the
conditions held for `resume_after_seconds` without a break, and says why in the status line."""

from __future__ import annotations

import pytest

from node.idleness import (
    NO_SAMPLE_REASON,
    RUNNING_REASON,
    Decision,
    IdleGate,
    IdlePolicy,
    LoadSample,
    blockers,
)

POLICY = IdlePolicy(max_other_cpu_percent=25, min_user_idle_seconds=180, allow_on_battery=False,
                    resume_after_seconds=30)


def spare(at: float, *, cpu: float = 5.0, user_idle: float | None = 600.0, battery: bool | None = False) -> LoadSample:
    return LoadSample(at=at, other_cpu_percent=cpu, user_idle_seconds=user_idle, on_battery=battery)


def busy(at: float, cpu: float = 85.0) -> LoadSample:
    return spare(at, cpu=cpu)


def running_gate(at: float = 0.0, policy: IdlePolicy = POLICY) -> IdleGate:
    gate = IdleGate(policy, now=at)
    assert gate.observe(spare(at)).running
    return gate


def feed(gate: IdleGate, samples: list[LoadSample]) -> list[Decision]:
    return [gate.observe(s) for s in samples]


def test_before_any_sample_the_gate_is_suspended_and_says_so() -> None:
    gate = IdleGate(POLICY, now=5.0)
    assert gate.decision == Decision("suspended", NO_SAMPLE_REASON, since=5.0)


def test_a_spare_machine_at_start_up_runs_at_once() -> None:
    gate = IdleGate(POLICY, now=0.0)
    decision = gate.observe(spare(0.25))
    assert decision == Decision("running", RUNNING_REASON, since=0.25, changed=True)


def test_a_busy_start_up_waits_out_the_full_hysteresis() -> None:
    gate = IdleGate(POLICY, now=0.0)
    assert gate.observe(busy(0.25)).reason == "suspended: other processes use 85 % CPU"
    assert not gate.observe(spare(0.5)).running
    assert not gate.observe(spare(30.25)).running
    assert gate.observe(spare(30.5)).running


def test_one_bad_sample_suspends_at_once_with_no_smoothing() -> None:
    gate = running_gate()
    decisions = feed(gate, [spare(t / 4) for t in range(1, 40)])
    assert all(d.running and not d.changed for d in decisions)
    spike = gate.observe(busy(10.0))
    assert spike == Decision("suspended", "suspended: other processes use 85 % CPU", since=10.0, changed=True)


def test_no_resume_until_the_machine_was_spare_for_resume_after_seconds() -> None:
    gate = running_gate()
    gate.observe(busy(1.0))
    first_good = gate.observe(spare(1.25))
    assert first_good.state == "suspended" and first_good.resume_at == 31.25
    assert first_good.since == 1.0 and not first_good.changed
    for t in [2.0, 10.0, 20.0, 31.0, 31.24]:
        assert gate.observe(spare(t)).state == "suspended", t
    resumed = gate.observe(spare(31.25))
    assert resumed == Decision("running", RUNNING_REASON, since=31.25, changed=True)


def test_a_bounce_while_waiting_restarts_the_wait() -> None:
    gate = running_gate()
    gate.observe(busy(1.0))
    gate.observe(spare(2.0))
    gate.observe(spare(25.0))  # 23 s into the 30 s wait
    bounce = gate.observe(busy(26.0, cpu=40))
    assert bounce.reason == "suspended: other processes use 40 % CPU" and bounce.resume_at is None
    assert gate.observe(spare(27.0)).resume_at == 57.0
    assert not gate.observe(spare(56.9)).running  # the old timer (from 2.0) would have resumed at 32.0
    assert gate.observe(spare(57.0)).running


def test_the_waiting_reason_counts_down_in_whole_seconds() -> None:
    gate = running_gate()
    gate.observe(busy(0.5))
    reasons = [gate.observe(spare(t)).reason for t in (1.0, 13.0, 30.5)]
    assert reasons == [
        "suspended: idle again, resuming in 30 s",
        "suspended: idle again, resuming in 18 s",
        "suspended: idle again, resuming in 1 s",
    ]


def test_recent_user_input_suspends_and_says_how_long_ago() -> None:
    gate = running_gate()
    decision = gate.observe(spare(5.0, user_idle=12.7))
    assert decision.reason == "suspended: user active 12 s ago"
    # the user walks away: the 180 s of input idleness, then the hysteresis on top
    assert not gate.observe(spare(172.0, user_idle=179.9)).running
    assert gate.observe(spare(173.0, user_idle=181.0)).resume_at == 203.0
    assert gate.observe(spare(203.0, user_idle=211.0)).running


def test_headless_machines_ignore_the_user_input_rule() -> None:
    gate = running_gate()
    decisions = feed(gate, [spare(t, user_idle=None) for t in (1.0, 2.0, 3.0)])
    assert all(d.running for d in decisions)


def test_the_user_input_rule_can_be_turned_off() -> None:
    gate = running_gate(policy=IdlePolicy(min_user_idle_seconds=None))
    assert gate.observe(spare(1.0, user_idle=0.0)).running


def test_battery_suspends_by_default_and_unknown_power_counts_as_mains() -> None:
    gate = running_gate()
    assert gate.observe(spare(1.0, battery=None)).running
    assert gate.observe(spare(2.0, battery=True)).reason == "suspended: on battery"
    allowed = running_gate(policy=IdlePolicy(allow_on_battery=True))
    assert allowed.observe(spare(1.0, battery=True)).running


def test_every_failing_condition_is_named_in_order() -> None:
    sample = LoadSample(at=0.0, other_cpu_percent=85.4, user_idle_seconds=3.2, on_battery=True)
    assert blockers(sample, POLICY) == ("other processes use 85 % CPU", "user active 3 s ago", "on battery")
    gate = running_gate()
    assert gate.observe(sample).reason == "suspended: other processes use 85 % CPU; user active 3 s ago; on battery"


def test_the_cpu_threshold_itself_is_still_spare() -> None:
    assert blockers(spare(0.0, cpu=25.0), POLICY) == ()
    assert blockers(spare(0.0, cpu=25.1), POLICY) == ("other processes use 25 % CPU",)


def test_since_holds_across_decisions_that_keep_the_state() -> None:
    gate = running_gate(at=3.0)
    assert gate.observe(spare(50.0)).since == 3.0
    gate.observe(busy(60.0))
    assert gate.observe(busy(61.0, cpu=90)).since == 60.0


def test_a_sample_from_the_past_does_not_rewind_the_wait() -> None:
    gate = running_gate()
    gate.observe(busy(10.0))
    gate.observe(spare(11.0))
    late = gate.observe(spare(5.0))  # clock trouble: counted as 11.0, not as 6 s before the wait began
    assert late.resume_at == 41.0
    assert gate.observe(spare(41.0)).running


def test_zero_hysteresis_resumes_on_the_first_spare_sample() -> None:
    gate = running_gate(policy=IdlePolicy(resume_after_seconds=0))
    gate.observe(busy(1.0))
    assert gate.observe(spare(1.25)).changed


@pytest.mark.parametrize("kwargs", [
    {"max_other_cpu_percent": 0}, {"max_other_cpu_percent": 101}, {"max_other_cpu_percent": float("nan")},
    {"min_user_idle_seconds": -1}, {"resume_after_seconds": -0.5}, {"resume_after_seconds": float("inf")},
])
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        IdlePolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cpu, user_idle", [(float("nan"), None), (-1.0, None), (5.0, float("nan")), (5.0, -2.0)])
def test_nonsense_samples_are_refused(cpu: float, user_idle: float | None) -> None:
    # a NaN compares False against every threshold and would read as "spare"
    with pytest.raises(ValueError):
        LoadSample(at=0.0, other_cpu_percent=cpu, user_idle_seconds=user_idle, on_battery=None)
