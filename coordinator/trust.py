"""Pure: how much the coordinator believes each node and owner, earned only against ground truth.

Ground truth is what the coordinator controls: its own re-run of a task (an audit), and agreement
with an account the operator marked trusted. Agreement among strangers is never ground truth: two
Sybils of one person agree with each other for free. A node's `streak` counts its consecutive
results confirmed by ground truth; at `trusted_after` it is trusted, and its tasks may run with one
replica, each audited with a probability that falls with the streak but never reaches zero. Any
result shown wrong resets the node's and its owner's streak, hands back the tasks it had accepted
on trust alone since its last check (to re-run, and to claw their credit back), and an owner whose
results are shown wrong `block_after` times is blocked.

No clock or randomness of its own: `now` and a `random.Random` come in (after arq's `next_cron`).
Attacks it answers (DESIGN.md §12): colluding Sybils (untrusted agreement is audited), honest
until trusted then cheating (audits never stop; a failure reissues and claws back), an owner with
many failing nodes (blocked).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Final

UNCHECKED_KEPT: Final = 4096  # tasks accepted on trust alone remembered per node, for reissue


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustPolicy:
    trusted_after: int = 10
    """Consecutive results confirmed by ground truth before a node's tasks may run with one replica
    (BOINC trusts after about 10)."""
    min_audit_rate: float = 0.05
    """A trusted node's results are audited at max(this, 1/streak): falls with the streak, never zero."""
    untrusted_audit_rate: float = 1.0
    """Agreement among untrusted owners is checked against the coordinator's own run at this rate.
    Below 1.0 saves audits and lets colluding strangers through in proportion: keep 1.0 on an
    open network."""
    block_after: int = 3
    """An owner whose results are shown wrong this many times is blocked."""
    adaptive: bool = True
    """Trusted nodes get tasks with one replica. Off: every task runs on k owners, audits as above."""

    def __post_init__(self) -> None:
        if self.trusted_after < 1 or not 0 < self.min_audit_rate <= 1 or not 0 <= self.untrusted_audit_rate <= 1:
            raise ValueError("trusted_after >= 1, 0 < min_audit_rate <= 1, 0 <= untrusted_audit_rate <= 1")
        if self.block_after < 1:
            raise ValueError("block_after must be at least 1")


@dataclass(slots=True)
class TrustRecord:
    streak: int = 0
    valid: int = 0  # results accepted (checked or not)
    invalid: int = 0  # results shown wrong: a failed audit, or outvoted by an accepted result
    errors: int = 0  # the node said it could not run the task
    audits_passed: int = 0
    audits_failed: int = 0
    last_seen: float = 0.0
    last_problem: str | None = None
    unchecked: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=UNCHECKED_KEPT))

    def to_json(self) -> dict[str, object]:
        return {"streak": self.streak, "valid": self.valid, "invalid": self.invalid, "errors": self.errors,
                "audits_passed": self.audits_passed, "audits_failed": self.audits_failed,
                "last_seen": self.last_seen, "last_problem": self.last_problem, "unchecked": len(self.unchecked)}


@dataclass(frozen=True, slots=True)
class Penalty:
    """What a result shown wrong costs: the tasks the node had accepted on trust alone (to reopen,
    re-run and claw back), and whether its owner is now blocked."""

    node: str
    owner: str
    reissue: tuple[tuple[str, str], ...]  # (task, lease)
    block_owner: bool
    reason: str


class TrustBook:
    def __init__(self, policy: TrustPolicy | None = None, *, trusted_owners: frozenset[str] = frozenset()) -> None:
        self.policy = policy or TrustPolicy()
        self.trusted_owners = trusted_owners  # operator-marked: their results are ground truth
        self.nodes: dict[str, TrustRecord] = {}
        self.owners: dict[str, TrustRecord] = {}
        self.blocked: set[str] = set()
        self._dirty: set[tuple[str, str]] = set()  # ("node" | "owner", name) changed since `take_changed`
        self.penalised = False  # a penalty since `take_changed`: worth saving at once

    def node(self, node: str) -> TrustRecord:
        rec = self.nodes.get(node)
        if rec is None:
            rec = self.nodes[node] = TrustRecord()
        self._dirty.add(("node", node))  # callers fetch a record to change it
        return rec

    def owner(self, owner: str) -> TrustRecord:
        rec = self.owners.get(owner)
        if rec is None:
            rec = self.owners[owner] = TrustRecord()
        self._dirty.add(("owner", owner))
        return rec

    # ---- persistence: the records survive a restart, the unchecked lists do not (the tasks they
    # name are no longer in memory after one: nothing could be reopened from them) --------------
    def take_changed(self) -> list[tuple[str, str, dict[str, object]]]:
        """(kind, name, record) of every record changed since the last call."""
        changed, self._dirty = self._dirty, set()
        self.penalised = False
        out = []
        for kind, name in sorted(changed):
            rec = (self.nodes if kind == "node" else self.owners).get(name)
            if rec is not None:
                out.append((kind, name, _saved(rec)))
        return out

    def restore(self, rows: list[tuple[str, str, dict[str, object]]]) -> None:
        for kind, name, saved in rows:
            (self.nodes if kind == "node" else self.owners)[name] = _loaded(saved)

    # ---- questions -----------------------------------------------------------------------------
    def is_ground_truth(self, owner: str) -> bool:
        return owner in self.trusted_owners

    def trusted(self, node: str, owner: str) -> bool:
        """May this node's result stand alone (one replica, audited now and then)?"""
        if owner in self.trusted_owners:
            return True
        rec = self.nodes.get(node)
        return rec is not None and rec.streak >= self.policy.trusted_after and owner not in self.blocked

    def solo(self, node: str, owner: str) -> bool:
        """Should a fresh task go to this node alone (adaptive replication)?"""
        return self.policy.adaptive and self.trusted(node, owner)

    def audit_rate(self, node: str, owner: str) -> float:
        """The chance that a result of `node` standing alone, or agreed by untrusted owners, is audited."""
        if owner in self.trusted_owners:
            return 0.0
        rec = self.nodes.get(node)
        streak = 0 if rec is None else rec.streak
        if streak < self.policy.trusted_after:
            return self.policy.untrusted_audit_rate
        return max(self.policy.min_audit_rate, 1.0 / streak)

    def why(self, node: str, owner: str) -> str:
        """One line: why this node is or is not trusted (the HTTP API and the CLI show it)."""
        if owner in self.blocked:
            return f"owner {owner!r} is blocked after {self.owner(owner).invalid} results shown wrong"
        if owner in self.trusted_owners:
            return f"owner {owner!r} is marked trusted by the operator: its results are ground truth"
        rec = self.nodes.get(node) or TrustRecord()
        need = self.policy.trusted_after
        if rec.streak >= need:
            return (f"trusted: {rec.streak} consecutive results confirmed by audits; its results stand alone and "
                    f"are audited with probability {self.audit_rate(node, owner):.3f}")
        why = f"not trusted yet: {rec.streak} of {need} consecutive results confirmed by audits"
        if rec.last_problem:
            why += f"; last problem: {rec.last_problem}"
        return why

    # ---- outcomes ------------------------------------------------------------------------------
    def confirmed(self, node: str, owner: str, *, audited: bool, now: float) -> None:
        """The result agreed with ground truth (an audit, or a trusted owner)."""
        for rec in (self.node(node), self.owner(owner)):
            rec.streak += 1
            rec.valid += 1
            rec.last_seen = now
            if audited:
                rec.audits_passed += 1
        # A passed check vouches for this result only: results accepted on trust before it stay
        # unchecked, and are reopened if the node is caught later.

    def accepted_unchecked(self, node: str, owner: str, task: str, lease: str, *, now: float) -> None:
        """The result stands on trust alone (a trusted node's solo result, not drawn for an audit),
        or on agreement of strangers where audits are off: remembered, in case the node is caught."""
        for rec in (self.node(node), self.owner(owner)):
            rec.valid += 1
            rec.last_seen = now
        self.node(node).unchecked.append((task, lease))

    def errored(self, node: str, owner: str, problem: str, *, now: float) -> None:
        for rec in (self.node(node), self.owner(owner)):
            rec.errors += 1
            rec.last_seen = now
            rec.last_problem = problem

    def failed(self, node: str, owner: str, problem: str, *, audited: bool, now: float) -> Penalty:
        """The result was shown wrong: trust is reset for the node and its owner, the node's unchecked
        results are handed back, and a repeat offender's owner is blocked."""
        n, o = self.node(node), self.owner(owner)
        self.penalised = True
        for rec in (n, o):
            rec.streak = 0
            rec.invalid += 1
            rec.last_seen = now
            rec.last_problem = problem
            if audited:
                rec.audits_failed += 1
        reissue = tuple(n.unchecked)
        n.unchecked.clear()
        block = owner not in self.trusted_owners and owner not in self.blocked and o.invalid >= self.policy.block_after
        if block:
            self.blocked.add(owner)
        return Penalty(node=node, owner=owner, reissue=reissue, block_owner=block, reason=problem)

    def draw_audit(self, rate: float, rng: random.Random) -> bool:
        return rate >= 1.0 or (rate > 0.0 and rng.random() < rate)


_SAVED = ("streak", "valid", "invalid", "errors", "audits_passed", "audits_failed", "last_seen", "last_problem")


def _saved(rec: TrustRecord) -> dict[str, object]:
    return {name: getattr(rec, name) for name in _SAVED}


def _loaded(saved: dict[str, object]) -> TrustRecord:
    rec = TrustRecord()
    for name in _SAVED:
        if name in saved:
            setattr(rec, name, saved[name])
    return rec
