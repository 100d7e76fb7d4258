"""The node's honest-scheduling estimate (node/estimate.py) and its run gate (node/rungate.py)."""

from __future__ import annotations

import asyncio

import pytest

from node.batching import runs_per_slot
from node.estimate import TaskTimes, can_finish
from node.rungate import RunGate

KEY = ("ab" * 32, 99)


def test_a_slower_run_raises_the_estimate_at_once_and_a_faster_one_lowers_it_slowly() -> None:
    times = TaskTimes()
    times.observe(KEY, 1.0)
    times.observe(KEY, 3.0)
    assert times.get(KEY) == 3.0
    times.observe(KEY, 1.0)
    assert times.get(KEY) == pytest.approx(2.6)  # 0.8 * 3 + 0.2 * 1
    assert times.get(("cd" * 32, 99)) is None


def test_an_assignment_behind_too_much_queued_work_cannot_finish_before_its_lease() -> None:
    """Failure defended: a node holding a lease it cannot run in time, so the task waits for the
    lease to expire instead of going to a node that could start it now."""
    # 50 s queued on 2 slots = 25 s ahead, plus a 10 s run: 35 s, inside a 60 s lease but not a 30 s one
    assert can_finish(own_seconds=10.0, ahead_seconds=50.0, slots=2, lease_left=60.0)
    assert not can_finish(own_seconds=10.0, ahead_seconds=50.0, slots=2, lease_left=30.0)
    # the margin for the result's journey counts
    assert not can_finish(own_seconds=10.0, ahead_seconds=50.0, slots=2, lease_left=35.5)


def test_an_unmeasured_model_or_an_empty_queue_is_always_accepted() -> None:
    # unknown: the first run is the measure; empty: else one bad measure would lock the model out
    assert can_finish(own_seconds=None, ahead_seconds=1e6, slots=1, lease_left=1.0)
    assert can_finish(own_seconds=100.0, ahead_seconds=0.0, slots=1, lease_left=1.0)


def test_tiny_tasks_go_to_workers_in_deep_batches_and_long_ones_one_at_a_time() -> None:
    assert runs_per_slot(task_seconds=None) == 1
    assert runs_per_slot(task_seconds=0.001) == 32
    assert runs_per_slot(task_seconds=0.2) == 1
    assert runs_per_slot(task_seconds=0.02) == 3


async def test_the_run_gate_admits_up_to_its_limit_and_a_raised_limit_admits_waiters() -> None:
    gate = RunGate(1)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(i: int) -> None:
        async with gate:
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == [0] and gate.inside == 1
    gate.set_limit(2)
    await asyncio.sleep(0)
    assert order == [0, 1] and gate.inside == 2
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and gate.inside == 0


async def test_a_cancelled_waiter_does_not_keep_a_place_in_the_gate() -> None:
    gate = RunGate(1)
    async with gate:
        waiter = asyncio.create_task(gate.__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
    assert gate.inside == 0
    async with gate:
        assert gate.inside == 1
