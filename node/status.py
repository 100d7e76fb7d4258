"""What the daemon is doing, told through a small JSON document beside its key.

The daemon keeps one `StatusBoard`. Whatever holds the node back raises a condition on it
(`set_state(UNREACHABLE, "cannot reach broker at ...")`, `set_state(SUSPENDED, why)`) and lowers it
when it passes (`clear(...)`); with no condition up, the node is `working` or `waiting`, read from
the work it holds. The board logs each change of state (the daemon's INFO log is mostly these),
and writes `<key>.status.json` atomically at each change and every WRITE_EVERY seconds, which
`sparecycles node status` (node/status_report.py) reads: a document older than FRESH_SECONDS
means a daemon that has stopped answering.

Nothing secret goes in the document (it is world-readable, mode 0644, so any local user can ask):
URLs lose their user:password part, and the broker login the coordinator provisioned is never in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Set
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from .logs import kv

if TYPE_CHECKING:
    from .settings import NodeSettings

log = logging.getLogger(__name__)

SCHEMA = 1
WRITE_EVERY = 5.0
FRESH_SECONDS = 15.0
"""A running daemon rewrites its document every WRITE_EVERY seconds; three missed writes mean it hangs."""
WAITING_AFTER = 10.0
"""Seconds without held work before `working` turns `waiting`: the gap between one batch of
assignments and the next is not a state change worth a log line."""
WAITING_REASON = "no work for this node"
BUSY_WRITE_EVERY = 1.0
"""While tasks come and go, counters are rewritten at most this often (not per task)."""


class NodeState(StrEnum):
    STARTING = "starting"
    WORKING = "working"
    WAITING = "waiting"
    SUSPENDED = "suspended"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    DRAINING = "draining"
    STOPPED = "stopped"


HEALTHY = frozenset({NodeState.WORKING, NodeState.WAITING, NodeState.SUSPENDED})
"""A running daemon in these states is doing what it should: `node status` exits 0."""
CONDITIONS = (NodeState.STOPPED, NodeState.REFUSED, NodeState.DRAINING, NodeState.UNREACHABLE,
              NodeState.SUSPENDED, NodeState.STARTING)
"""States raised by `set_state`, strongest first: the strongest one up is the node's state. A node
suspended and cut off from its broker shows the broker, the one its owner can do something about."""
DERIVED = frozenset({NodeState.WORKING, NodeState.WAITING})


class _Pipeline(Protocol):
    @property
    def started(self) -> Set[str]: ...


class _Cache(Protocol):
    @property
    def total_bytes(self) -> int: ...

    def digests(self, limit: int = ...) -> tuple[str, ...]: ...


class Watched(Protocol):
    """What the board reads of the node (node.worker.Node), named here so that status does not
    import the worker that imports it."""

    @property
    def id(self) -> str: ...

    @property
    def held(self) -> Mapping[str, object]: ...

    @property
    def counters(self) -> Mapping[str, int]: ...

    @property
    def pipeline(self) -> _Pipeline: ...

    @property
    def cache(self) -> _Cache: ...


def status_path(key: Path) -> Path:
    return key.with_name(key.name + ".status.json")


def public_url(url: str) -> str:
    """`url` without a user:password part (a broker URL may carry a login)."""
    parts = urlsplit(url)
    if parts.hostname is None or "@" not in parts.netloc:
        return url
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def derive(*, busy: bool, now: float, last_busy: float, current: NodeState) -> NodeState:
    """Working or waiting: working at once when work is held, waiting only after WAITING_AFTER
    seconds without any (`now` and `last_busy` monotonic)."""
    if busy or (current is NodeState.WORKING and now - last_busy < WAITING_AFTER):
        return NodeState.WORKING
    return NodeState.WAITING


class StatusBoard:
    """The daemon's state, its log lines and its status file. `path=None` keeps no file (a node run
    in-process by tests); the board still logs."""

    def __init__(self, path: Path | None = None, *, settings: NodeSettings | None = None,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.settings = settings
        self.node_id = ""
        self._wall = wall
        self._monotonic = monotonic
        coordinator = "" if settings is None else f" at {public_url(settings.coordinator_url)}"
        self._conditions: dict[NodeState, str] = {NodeState.STARTING: f"contacting the coordinator{coordinator}"}
        self._node: Watched | None = None
        self._derived = NodeState.WAITING
        self._last_busy = -math.inf
        self.state, self.reason = NodeState.STARTING, self._conditions[NodeState.STARTING]
        self.started_at = self.since = wall()
        self._write_failed = False
        self._written_at = -math.inf

    # ---- what the daemon calls -------------------------------------------------------------

    def set_state(self, state: NodeState, reason: str = "") -> None:
        """Raise a condition (any state but working and waiting, which the board reads from the
        node's work): it holds until `clear(state)`. Raising it again only updates its reason."""
        if state in DERIVED:
            raise ValueError(f"{state} is read from the node's work; clear the condition that held it instead")
        self._conditions[state] = reason
        self.refresh()

    def clear(self, *states: NodeState) -> None:
        for state in states:
            self._conditions.pop(state, None)
        self.refresh()

    def connected(self) -> None:
        """The broker connection is up: the node is no longer starting or cut off."""
        self.clear(NodeState.STARTING, NodeState.UNREACHABLE)

    def attach(self, node: Watched) -> StatusBoard:
        """Read working or waiting, slots, counters and the cache from `node` from now on."""
        self._node = node
        self.node_id = node.id
        return self

    def refresh(self) -> None:
        """Re-read the node's work: called when it takes or finishes a task, and every WRITE_EVERY."""
        node = self._node
        if node is not None:
            now = self._monotonic()
            busy = bool(node.held)
            if busy:
                self._last_busy = now
            self._derived = derive(busy=busy, now=now, last_busy=self._last_busy, current=self._derived)
        self._update()
        if self._monotonic() - self._written_at >= BUSY_WRITE_EVERY:
            self.write()

    async def run(self) -> None:
        """Rewrite the document every WRITE_EVERY seconds until cancelled."""
        while True:
            self._written_at = -math.inf  # so that this refresh writes, once
            self.refresh()
            await asyncio.sleep(WRITE_EVERY)

    def close(self, reason: str) -> None:
        """The daemon is exiting: record STOPPED (unless refused, which says more) and write."""
        if NodeState.REFUSED not in self._conditions:
            self._conditions[NodeState.STOPPED] = reason
        self._update()
        self.write()

    # ---- state ------------------------------------------------------------------------------

    def _current(self) -> tuple[NodeState, str]:
        for state in CONDITIONS:
            if state in self._conditions:
                return state, self._conditions[state]
        return self._derived, "running tasks" if self._derived is NodeState.WORKING else WAITING_REASON

    def _update(self) -> None:
        state, reason = self._current()
        if state is self.state:
            if reason != self.reason:  # e.g. the broker's error changed between retries: no log line
                self.reason = reason
                self.write()
            return
        was, self.state, self.reason, self.since = self.state, state, reason, self._wall()
        self._log(was)
        self.write()

    def _log(self, was: NodeState) -> None:
        state = self.state
        event = "disconnected" if state is NodeState.UNREACHABLE and was in (*DERIVED, NodeState.SUSPENDED) \
            else "node_state"
        level = logging.WARNING if state in (NodeState.UNREACHABLE, NodeState.REFUSED) else logging.INFO
        log.log(level, kv(event, state=state.value, was=was.value, reason=self.reason, id=self.node_id or "-"))

    # ---- the document -----------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        s = self.settings
        node = self._node
        counters = node.counters if node is not None else {}
        slots = s.slots if s is not None else 0
        doc: dict[str, Any] = {
            "schema": SCHEMA, "pid": os.getpid(), "node": self.node_id,
            "owner": s.owner if s is not None else "",
            "coordinator": public_url(s.coordinator_url) if s is not None else "",
            "broker": public_url(s.broker_url) if s is not None else "",
            "key": str(s.key_path) if s is not None else "",
            "state": self.state.value, "reason": self.reason, "since": iso(self.since),
            "healthy": self.state in HEALTHY,
            "slots": slots,
            "slots_busy": min(slots, len(node.pipeline.started & node.held.keys())) if node is not None else 0,
            "held": len(node.held) if node is not None else 0,
            "tasks": {name: counters.get(name, 0) for name in ("assigned", "done", "failed", "released")},
            "models": {"count": len(node.cache.digests(limit=1 << 30)) if node is not None else 0,
                       "bytes": node.cache.total_bytes if node is not None else 0},
            "started_at": iso(self.started_at), "updated_at": iso(self._wall()),
        }
        return doc

    def write(self) -> None:
        """Replace the document atomically (a reader sees the old one or the new one, whole). No
        fsync: a status lost to a power cut is rewritten within seconds of the next start."""
        if self.path is None:
            return
        self._written_at = self._monotonic()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.fchmod(fd, 0o644)  # whatever the umask: any local user may ask `node status`
            with os.fdopen(fd, "w") as f:
                json.dump(self.document(), f, indent=1)
                f.write("\n")
            os.replace(tmp, self.path)
            self._write_failed = False
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._write_failed:  # once per run of failures: a full disk must not flood the log
                log.warning(kv("status_not_written", path=str(self.path), error=exc.strerror or str(exc)))
            self._write_failed = True
