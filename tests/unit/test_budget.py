"""Reservations of credit for running jobs (`coordinator.budget`), with plain values."""

from __future__ import annotations

import pytest

from coordinator.budget import Budget, InsufficientCredit, estimate
from coordinator.quorum import Tolerance
from coordinator.records import JobSpec
from ledger.credit import ModelCost, credit_amount


def spec(job: str, *, submitter: str = "alice", flops_per_row: int = 2_000, replicas: int = 2) -> JobSpec:
    return JobSpec(id=job, model="m" * 64, rows=100, replicas=replicas, task_size=10, max_results=4,
                   tolerance=Tolerance(), opt_level=99, output_names=("y",), flops_per_row=flops_per_row,
                   created_at=1.0, submitter=submitter)


def test_estimate_is_every_tasks_price_times_replicas() -> None:
    # 2,000 FLOPs a row: 10 rows are 20 kFLOP = 20 credits, 3 rows 6 credits; two replicas each.
    assert estimate(2_000, [10, 10, 3], 2) == (20 + 20 + 6) * 2


def test_estimate_matches_what_the_engine_credits_per_task() -> None:
    # The engine pays `replicas` credits of credit_amount per verified task: the estimate is exact,
    # minimum-of-one rounding included.
    rows = [1, 7, 64]
    per_task = [credit_amount(ModelCost(333), r) for r in rows]

    assert Budget.estimate(333, rows, 3) == sum(per_task) * 3
    assert per_task[0] == 1


def test_a_job_within_the_balance_is_reserved() -> None:
    budget = Budget()

    budget.reserve("alice", "j1", 600, balance=1_000)

    assert budget.reserved("alice") == 600
    assert budget.available("alice", 1_000) == 400


def test_a_job_beyond_the_balance_is_refused_with_what_is_missing() -> None:
    # Attack: submitting work one cannot pay for, hoping the charges run the balance below zero.
    budget = Budget()
    budget.reserve("alice", "j1", 200, balance=1_200)

    with pytest.raises(InsufficientCredit) as refused:
        budget.reserve("alice", "j2", 1_234, balance=1_200)

    assert str(refused.value) == ("job needs 1,234 credits; alice has 1,000 available (200 reserved by running "
                                  "jobs): 234 missing")
    assert (refused.value.account, refused.value.needed, refused.value.available) == ("alice", 1_234, 1_000)
    assert refused.value.missing == 234
    assert budget.reserved("alice") == 200  # the refused job reserved nothing


def test_the_message_leaves_out_reservations_when_there_are_none() -> None:
    with pytest.raises(InsufficientCredit, match=r"^job needs 10 credits; bob has 3 available: 7 missing$"):
        Budget().reserve("bob", "j1", 10, balance=3)


def test_concurrent_jobs_of_one_account_cannot_both_spend_the_same_credit() -> None:
    # Attack: two jobs submitted at once, each affordable alone, together beyond the balance.
    budget = Budget()
    budget.reserve("alice", "j1", 700, balance=1_000)

    with pytest.raises(InsufficientCredit):
        budget.reserve("alice", "j2", 700, balance=1_000)


def test_accounts_reserve_independently() -> None:
    budget = Budget()
    budget.reserve("alice", "j1", 1_000, balance=1_000)

    budget.reserve("bob", "j2", 50, balance=50)

    assert (budget.reserved("alice"), budget.reserved("bob")) == (1_000, 50)


def test_settling_a_charge_shrinks_the_reservation_by_as_much() -> None:
    # Prepare: a committed charge has taken 300 from the balance, 1,000 -> 700
    budget = Budget()
    budget.reserve("alice", "j1", 800, balance=1_000)

    # Execute
    budget.settle("j1", 300)

    # Assert: what is available did not change; the charge was already reserved
    assert budget.reserved("alice") == 500
    assert budget.available("alice", 700) == 200


def test_settling_never_takes_a_reservation_below_zero() -> None:
    budget = Budget()
    budget.reserve("alice", "j1", 100, balance=1_000)
    budget.reserve("alice", "j2", 400, balance=1_000)

    budget.settle("j1", 150)

    assert budget.reserved("alice") == 400  # j2's reservation is untouched


def test_releasing_a_finished_job_frees_what_it_did_not_spend() -> None:
    # A task that failed is never charged: its share comes back when the job ends.
    budget = Budget()
    budget.reserve("alice", "j1", 800, balance=1_000)
    budget.settle("j1", 300)

    budget.release("j1")

    assert budget.reserved("alice") == 0
    assert budget.available("alice", 700) == 700


def test_settling_or_releasing_an_unknown_job_changes_nothing() -> None:
    budget = Budget()
    budget.reserve("alice", "j1", 100, balance=100)

    budget.settle("internal", 50)
    budget.release("internal")

    assert budget.reserved("alice") == 100


def test_a_job_cannot_be_reserved_twice() -> None:
    budget = Budget()
    budget.reserve("alice", "j1", 100, balance=1_000)

    with pytest.raises(ValueError, match="already holds"):
        budget.reserve("alice", "j1", 100, balance=1_000)


def test_rebuild_reserves_the_open_tasks_of_running_jobs_and_skips_internal_ones() -> None:
    # Prepare: stale reservations from before, to be replaced
    budget = Budget()
    budget.reserve("carol", "old", 5, balance=5)

    # Execute: j1 has two open tasks of 10 rows; j2 one of 3 rows; j3 has no submitter
    budget.rebuild([(spec("j1"), [10, 10]), (spec("j2", submitter="bob", replicas=3), [3]),
                    (spec("j3", submitter=""), [10])])

    # Assert
    assert budget.reserved("alice") == (20 + 20) * 2
    assert budget.reserved("bob") == 6 * 3
    assert budget.reserved("carol") == 0
    budget.settle("j1", 40)
    budget.release("j2")
    assert (budget.reserved("alice"), budget.reserved("bob")) == (40, 0)


def test_rebuild_does_not_refuse_jobs_the_balance_no_longer_covers() -> None:
    # Jobs accepted before a restart must be able to finish; only new jobs are checked.
    budget = Budget()

    budget.rebuild([(spec("j1"), [10] * 100)])

    assert budget.available("alice", 0) == -4_000
    with pytest.raises(InsufficientCredit):
        budget.reserve("alice", "j2", 1, balance=0)
