"""The messages that travel over MQTT. Frozen, slotted, validated when built.

Assignments and results travel in batches (`Assignments`, `Results`): one envelope and one
signature per batch, because a signature check costs ~0.1 ms and the coordinator's inner loop
would otherwise spend most of its time verifying (DESIGN.md §11).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .digests import is_sha256_hex
from .errors import MalformedMessage
from .tensors import Tensor, tensors_from_wire, tensors_to_wire

MAX_BATCH_ITEMS = 4096
MAX_NAME = 128

T = TypeVar("T")


def _get(raw: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    value = raw.get(key)
    # bool is an int in Python; a peer must not sneak True in where a count belongs.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise MalformedMessage(f"field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value  # type: ignore[return-value]


def _opt(raw: Mapping[str, Any], key: str, kind: type[T]) -> T | None:
    return None if raw.get(key) is None else _get(raw, key, kind)


def _name(raw: Mapping[str, Any], key: str) -> str:
    value = _get(raw, key, str)
    if not value or len(value) > MAX_NAME:
        raise MalformedMessage(f"field {key!r} must be 1..{MAX_NAME} characters")
    return value


def _digest(raw: Mapping[str, Any], key: str) -> str:
    value = _get(raw, key, str)
    if not is_sha256_hex(value):
        raise MalformedMessage(f"field {key!r} is not a sha256 hex digest")
    return value


def _float(raw: Mapping[str, Any], key: str) -> float:
    return float(_get(raw, key, (int, float)))


def _items(raw: Mapping[str, Any]) -> list[Any]:
    items = _get(raw, "items", list)
    if len(items) > MAX_BATCH_ITEMS:
        raise MalformedMessage(f"batch of {len(items)} items exceeds {MAX_BATCH_ITEMS}")
    return items


@dataclass(frozen=True, slots=True)
class WorkRequest:
    """A node's standing request for work. `slots` is its capacity: how many leases it can hold at
    once (running + queued). The coordinator knows which leases the node holds and grants the
    difference, so a request never races with assignments in flight. `slots=0` asks for nothing
    (draining). `models` are digests it has cached (a scheduling hint)."""

    KIND: ClassVar[str] = "work"
    node: str
    owner: str
    slots: int
    models: tuple[str, ...] = ()
    runtime: str = ""
    seq: int = 0  # strictly increasing per node process; stale requests are ignored
    held: tuple[str, ...] = ()  # leases the node holds now: a restarted coordinator reconciles with it

    def __post_init__(self) -> None:
        if not 0 <= self.slots <= MAX_BATCH_ITEMS:
            raise MalformedMessage(f"slots {self.slots} out of range")

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "owner": self.owner, "slots": self.slots,
                "models": list(self.models), "runtime": self.runtime, "seq": self.seq, "held": list(self.held)}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> WorkRequest:
        models = _get(raw, "models", list)
        if len(models) > 1024 or not all(isinstance(m, str) and is_sha256_hex(m) for m in models):
            raise MalformedMessage("models must be a list of sha256 digests")
        held = raw.get("held", [])
        if not isinstance(held, list) or len(held) > MAX_BATCH_ITEMS \
                or not all(isinstance(x, str) and len(x) <= MAX_NAME for x in held):
            raise MalformedMessage("held must be a list of lease ids")
        return cls(node=_name(raw, "node"), owner=_name(raw, "owner"), slots=_get(raw, "slots", int),
                   models=tuple(models), runtime=_get(raw, "runtime", str)[:256], seq=_get(raw, "seq", int),
                   held=tuple(held))


@dataclass(frozen=True, slots=True)
class Assignment:
    """One replica of one task, leased to one node until `expires_at` (wall-clock seconds:
    it crosses a process boundary). Inputs travel inline, or by digest over HTTP when large."""

    task: str
    job: str
    lease: str
    model: str
    input_digest: str
    expires_at: float
    inputs: Mapping[str, Tensor] | None = None
    opt_level: int = 99  # ORT graph optimisation level, pinned per job so replicas agree

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task, "job": self.job, "lease": self.lease, "model": self.model,
                "input_digest": self.input_digest, "expires_at": self.expires_at,
                "inputs": None if self.inputs is None else tensors_to_wire(self.inputs),
                "opt_level": self.opt_level}

    @classmethod
    def from_wire(cls, raw: Any) -> Assignment:
        if not isinstance(raw, dict):
            raise MalformedMessage("assignment is not a map")
        inputs = raw.get("inputs")
        return cls(task=_name(raw, "task"), job=_name(raw, "job"), lease=_name(raw, "lease"),
                   model=_digest(raw, "model"), input_digest=_digest(raw, "input_digest"),
                   expires_at=_float(raw, "expires_at"),
                   inputs=None if inputs is None else tensors_from_wire(inputs),
                   opt_level=_get(raw, "opt_level", int))


@dataclass(frozen=True, slots=True)
class Assignments:
    KIND: ClassVar[str] = "assign"
    node: str
    items: tuple[Assignment, ...] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "items": [a.to_wire() for a in self.items]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Assignments:
        return cls(node=_name(raw, "node"), items=tuple(Assignment.from_wire(a) for a in _items(raw)))


@dataclass(frozen=True, slots=True)
class Result:
    """One node's answer for one lease. Binds job, task, lease, node, input and output digests.

    `outputs` is inline when small; otherwise None and the node has uploaded the bytes by
    `output_digest` over HTTP. `error` set means the node could not run the task (not a vote).
    """

    task: str
    job: str
    lease: str
    input_digest: str
    output_digest: str
    outputs: Mapping[str, Tensor] | None = None
    elapsed: float = 0.0
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"task": self.task, "job": self.job, "lease": self.lease,
                "input_digest": self.input_digest, "output_digest": self.output_digest,
                "outputs": None if self.outputs is None else tensors_to_wire(self.outputs),
                "elapsed": self.elapsed, "error": self.error}

    @classmethod
    def from_wire(cls, raw: Any) -> Result:
        if not isinstance(raw, dict):
            raise MalformedMessage("result is not a map")
        outputs = raw.get("outputs")
        error = _opt(raw, "error", str)
        return cls(task=_name(raw, "task"), job=_name(raw, "job"), lease=_name(raw, "lease"),
                   input_digest=_digest(raw, "input_digest"),
                   output_digest=raw.get("output_digest", "") if error else _digest(raw, "output_digest"),
                   outputs=None if outputs is None else tensors_from_wire(outputs),
                   elapsed=_float(raw, "elapsed"), error=None if error is None else error[:500])


@dataclass(frozen=True, slots=True)
class Results:
    KIND: ClassVar[str] = "result"
    node: str
    runtime: str
    items: tuple[Result, ...] = field(default_factory=tuple)

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "runtime": self.runtime, "items": [r.to_wire() for r in self.items]}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Results:
        return cls(node=_name(raw, "node"), runtime=_get(raw, "runtime", str)[:256],
                   items=tuple(Result.from_wire(r) for r in _items(raw)))


@dataclass(frozen=True, slots=True)
class Release:
    """A node gives leases back unrun (shutting down, model failed to load): reissue at once."""

    KIND: ClassVar[str] = "release"
    node: str
    leases: tuple[str, ...]
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "leases": list(self.leases), "reason": self.reason}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Release:
        leases = _get(raw, "leases", list)
        if len(leases) > MAX_BATCH_ITEMS or not all(isinstance(x, str) and len(x) <= MAX_NAME for x in leases):
            raise MalformedMessage("leases must be a list of lease ids")
        return cls(node=_name(raw, "node"), leases=tuple(leases), reason=_get(raw, "reason", str)[:500])


NODE_STATES = ("online", "offline")


@dataclass(frozen=True, slots=True)
class Status:
    """A node's presence on `status/{node}` (retained). `since` (wall ms) names the connection it
    belongs to: the node signs its "offline" Will for that connection when it connects, so the
    broker can publish it when the node dies, and the coordinator acts on an "offline" only for
    the connection it last saw come online - a replayed old Will, or a forged one, changes nothing."""

    KIND: ClassVar[str] = "status"
    node: str
    state: str
    since: int

    def __post_init__(self) -> None:
        if self.state not in NODE_STATES:
            raise MalformedMessage(f"status state {self.state!r} is not one of {NODE_STATES}")
        if self.since < 0:
            raise MalformedMessage("status since must not be negative")

    def to_wire(self) -> dict[str, Any]:
        return {"node": self.node, "state": self.state, "since": self.since}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> Status:
        return cls(node=_name(raw, "node"), state=_get(raw, "state", str), since=_get(raw, "since", int))


Message = WorkRequest | Assignments | Results | Release | Status
MESSAGE_TYPES: dict[str, type[WorkRequest] | type[Assignments] | type[Results] | type[Release] | type[Status]] = {
    cls.KIND: cls for cls in (WorkRequest, Assignments, Results, Release, Status)
}
