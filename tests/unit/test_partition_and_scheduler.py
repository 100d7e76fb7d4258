from __future__ import annotations

import itertools

import pytest

from coordinator.partition import auto_task_size, partition_rows
from coordinator.scheduler import InvalidTransition, TaskState, check_transition, may_take, plan_replicas


def test_partition_covers_every_row_once_in_order() -> None:
    ranges = partition_rows(1797, 64)
    assert ranges[0].start == 0 and ranges[-1].stop == 1797
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
    assert max(r.rows for r in ranges) <= 64
    assert max(r.rows for r in ranges) - min(r.rows for r in ranges) <= 1  # even split


def test_partition_rejects_empty_jobs_and_bad_sizes() -> None:
    with pytest.raises(ValueError):
        partition_rows(0, 10)
    with pytest.raises(ValueError):
        partition_rows(10, 0)


def test_auto_task_size_is_bounded() -> None:
    assert auto_task_size(10) == 4096
    assert auto_task_size(10**12) == 1
    assert auto_task_size(2_000_000) == 1000


def test_a_fresh_task_issues_k_replicas() -> None:
    assert plan_replicas(k=2, max_results=6, live=0, attempts=0, best_group=0).issue == 2


def test_a_disagreement_issues_one_more_replica() -> None:
    assert plan_replicas(k=2, max_results=6, live=0, attempts=2, best_group=1).issue == 1


def test_running_out_of_tries_fails_the_task_with_a_reason() -> None:
    plan = plan_replicas(k=2, max_results=3, live=0, attempts=3, best_group=1, last_problem="results disagree")
    assert plan.issue == 0
    assert plan.fail_reason is not None and "results disagree" in plan.fail_reason


def test_a_task_waits_while_replicas_are_live() -> None:
    plan = plan_replicas(k=2, max_results=2, live=1, attempts=2, best_group=1)
    assert plan.issue == 0 and plan.fail_reason is None


def test_only_listed_transitions_are_allowed() -> None:
    assert check_transition(TaskState.OPEN, TaskState.VERIFIED) is TaskState.VERIFIED
    # reopened: a result it stood on came from a node later caught cheating
    assert check_transition(TaskState.VERIFIED, TaskState.OPEN) is TaskState.OPEN
    with pytest.raises(InvalidTransition):
        check_transition(TaskState.VERIFIED, TaskState.FAILED)
    with pytest.raises(InvalidTransition):
        check_transition(TaskState.FAILED, TaskState.VERIFIED)
    with pytest.raises(InvalidTransition):
        check_transition(TaskState.FAILED, TaskState.OPEN)


def test_no_two_replicas_on_one_node_or_one_owner() -> None:
    assert not may_take(node="n1", owner="o2", task_nodes={"n1"}, task_owners={"o1"})
    assert not may_take(node="n2", owner="o1", task_nodes={"n1"}, task_owners={"o1"})
    assert may_take(node="n2", owner="o2", task_nodes={"n1"}, task_owners={"o1"})


def test_a_task_fails_after_max_errors_invalid_results_even_with_tries_left() -> None:
    plan = plan_replicas(k=2, max_results=6, live=0, attempts=3, best_group=0, errors=3, max_errors=3,
                         last_problem="output 'y' contains NaN or Inf")
    assert plan.issue == 0
    assert plan.fail_reason is not None and "NaN" in plan.fail_reason
