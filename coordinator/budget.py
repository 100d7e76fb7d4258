"""Pure: credit reserved per account for its running jobs. No I/O, no clock.

A job is accepted only if its submitter can pay for all of it: the ledger balance minus what the
account's other running jobs may still be charged. The estimate is exact, not a guess: a verified
task pays exactly `replicas` credits of `credit_amount(cost, rows)` each (the engine credits the
first k agreeing owners, never more), so a job can never be charged more than it reserved.

The reservation shrinks as the job's tasks are charged (`settle`, once the charge is committed)
and goes when the job ends (`release`): tasks that failed are never charged. After a restart,
`rebuild` recomputes it from the open tasks of running jobs, which is what they can still cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ledger.credit import ModelCost, credit_amount

from .records import JobSpec


class InsufficientCredit(Exception):
    """The submitter cannot pay for the job: its balance, less what its running jobs have
    reserved, is below the job's cost. The HTTP layer answers 402 with the message."""

    def __init__(self, account: str, needed: int, available: int, *, reserved: int = 0) -> None:
        self.account = account
        self.needed = needed
        self.available = available
        self.reserved = reserved
        held = f" ({reserved:,} reserved by running jobs)" if reserved else ""
        super().__init__(f"job needs {needed:,} credits; {account} has {available:,} available{held}: "
                         f"{needed - available:,} missing")

    @property
    def missing(self) -> int:
        return self.needed - self.available


def estimate(flops_per_row: int, task_rows: Sequence[int], replicas: int) -> int:
    """What a job costs if every task verifies: per task, `replicas` credits of the task's price."""
    cost = ModelCost(flops_per_row)
    return sum(credit_amount(cost, rows) for rows in task_rows) * replicas


@dataclass(slots=True)
class _Reservation:
    account: str
    remaining: int


class Budget:
    """Credit reserved per account by its running jobs. The caller reads balances from the ledger
    and passes them in; this class holds only the reservations."""

    def __init__(self) -> None:
        self._jobs: dict[str, _Reservation] = {}
        self._reserved: dict[str, int] = {}

    estimate = staticmethod(estimate)

    def reserved(self, account: str) -> int:
        return self._reserved.get(account, 0)

    def available(self, account: str, balance: int) -> int:
        """What `account` may still commit to new jobs: its balance less its reservations."""
        return balance - self.reserved(account)

    def reserve(self, account: str, job: str, amount: int, balance: int) -> None:
        """Reserve `amount` for `job`, or raise `InsufficientCredit` and reserve nothing.
        `balance` is the account's committed ledger balance, read just before."""
        if amount < 0:
            raise ValueError(f"a reservation cannot be negative, got {amount}")
        if job in self._jobs:
            raise ValueError(f"job {job} already holds a reservation")
        available = self.available(account, balance)
        if amount > available:
            raise InsufficientCredit(account, amount, available, reserved=self.reserved(account))
        self._hold(account, job, amount)

    def settle(self, job: str, charged: int) -> None:
        """A charge of `charged` for one of `job`'s tasks is committed: the balance has dropped by
        that much, so the reservation drops by as much. Unknown jobs (no submitter) are ignored."""
        held = self._jobs.get(job)
        if held is None:
            return
        # Never below zero. Each task is charged once and its price is in the estimate, so this
        # only keeps a caller's mistake from lending an account credit it does not have.
        taken = min(charged, held.remaining)
        held.remaining -= taken
        self._reserved[held.account] -= taken

    def release(self, job: str) -> None:
        """The job ended (done or failed): what it did not spend is free again."""
        held = self._jobs.pop(job, None)
        if held is None:
            return
        left = self._reserved[held.account] - held.remaining
        if left:
            self._reserved[held.account] = left
        else:
            del self._reserved[held.account]

    def reopen(self, account: str, job: str, amount: int) -> None:
        """A verified task of `job` reopened: its charge was refunded, and the same amount is held
        again for its re-run (no balance check: the refund just returned it)."""
        held = self._jobs.get(job)
        if held is None:
            self._hold(account, job, amount)
        else:
            held.remaining += amount
            self._reserved[account] = self._reserved.get(account, 0) + amount

    def rebuild(self, jobs: Iterable[tuple[JobSpec, Sequence[int]]]) -> None:
        """Replace every reservation with those of running jobs after a restart: each pair is a
        running job's spec and the rows of its still-open tasks. Balances are not checked: these
        jobs were accepted before, and must be able to finish."""
        self._jobs.clear()
        self._reserved.clear()
        for spec, open_rows in jobs:
            if spec.submitter:
                self._hold(spec.submitter, spec.id, estimate(spec.flops_per_row, open_rows, spec.replicas))

    def _hold(self, account: str, job: str, amount: int) -> None:
        self._jobs[job] = _Reservation(account, amount)
        self._reserved[account] = self._reserved.get(account, 0) + amount
