"""The node's error tree. Everything here is caught at the edge of one task or one message:
a bad model, a bad input or an unreachable coordinator costs that task, never the daemon."""

from __future__ import annotations


class NodeError(Exception):
    """Root of the node's own failures."""


class TaskFailed(NodeError):
    """A task cannot be run; the node reports `Result(error=reason)` so the coordinator reissues it.

    `transient` marks failures worth another try (network, 5xx) before giving up."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason[:500]
        self.transient = transient


class CacheError(TaskFailed):
    """A model could not be fetched, verified or stored."""


class CoordinatorUnavailable(NodeError):
    """/v1/info could not be read (the coordinator is down, or not a sparecycles coordinator)."""
