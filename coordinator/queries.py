"""The coordinator's read side, as its adapters see it: small immutable views and one protocol.

The HTTP API (and the dashboard and CLI behind it) ask these questions and never touch the
engine's or the store's internals, so those can change, or be sharded over several
coordinators, without touching an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class JobView:
    id: str
    state: str  # running | done | failed
    error: str | None
    status: Mapping[str, Any]  # the JSON document `GET /v1/jobs/{id}` answers
    submitter: str = ""  # the account that may read it (besides operators and read-token holders)
    read_token_sha256: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A live lease: what its holder may read (the task's inputs) and until when."""

    id: str
    task: str
    job: str
    node: str
    input_digest: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node the coordinator is serving now: asking for work, or holding leases."""

    node: str
    owner: str
    capacity: int  # leases it asked to hold at once (0: holds leases but has no open request)
    leases: int


class CoordinatorQueries(Protocol):
    def job(self, job_id: str) -> JobView | None:
        """The job's current state, or None for an unknown id."""

    async def wait_finished(self, job_id: str, seconds: float) -> None:
        """Return once the job's final state is committed, or after `seconds`."""

    async def job_outputs(self, job_id: str) -> dict[str, npt.NDArray[Any]]:
        """A finished job's accepted outputs, rows in input order."""

    def live_lease(self, lease_id: str) -> LeaseView | None:
        """The lease if it is live now, else None (unknown, expired, answered, given back)."""

    def nodes(self) -> list[NodeView]:
        """Nodes being served now, sorted by node id."""
