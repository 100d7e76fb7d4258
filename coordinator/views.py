"""Pure: the JSON views the listing endpoints, the event streams and the dashboard show, built
from plain values (a job's status document, counts, node facts, `now`). No sockets, no clock:
coordinator/events_http.py gathers the values and calls these on request only, never on the
hot path.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ledger.entries import iso_time as ledger_iso_time

JOB_STATES: Final = ("running", "done", "failed", "all")
DEFAULT_LIST_LIMIT: Final = 50
MAX_LIST_LIMIT: Final = 500
# A node heard from within this long, but neither asking for work nor holding a lease, is listed
# as "away" (recently seen) rather than dropped: a laptop between two requests is not gone.
RECENT_SECONDS: Final = 300.0
# Fields of a job that only its submitter (or an operator, or a read-token holder) sees: the model
# digest lets any member download the model (GET /v1/models/{sha256}), the failures name outputs.
PRIVATE_JOB_FIELDS: Final = ("model", "failures", "waiting", "error", "read_token")

_TASK_INDEX = re.compile(r"-(\d+)$")


class BadQuery(ValueError):
    """A listing's query string cannot be served; the message says what to send."""


def iso_time(seconds: float | None) -> str | None:
    """Wall-clock seconds as ISO 8601 UTC to the millisecond (None stays None)."""
    return None if seconds is None else ledger_iso_time(seconds)


def parse_listing(state: str | None, limit: str | None) -> tuple[str, int]:
    """`?state=` and `?limit=` of GET /v1/jobs: the state (default all) and a limit in 1..MAX."""
    chosen = state or "all"
    if chosen not in JOB_STATES:
        raise BadQuery(f"state must be one of {'|'.join(JOB_STATES)}, got {chosen[:40]!r}")
    if limit is None or limit == "":
        return chosen, DEFAULT_LIST_LIMIT
    if not limit.isdecimal() or len(limit) > 6 or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise BadQuery(f"limit must be a whole number in 1..{MAX_LIST_LIMIT}, got {limit[:40]!r}")
    return chosen, int(limit)


def task_label(task_id: str) -> str:
    """`"<job>-00007"` -> `"7"`: the task's index, as people count tasks of one job."""
    m = _TASK_INDEX.search(task_id)
    return str(int(m.group(1))) if m else task_id


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def job_why(status: Mapping[str, Any], *, leases_out: int) -> str | None:
    """One sentence on why a job is where it is, or None when a done job has nothing to say.

    Failed tasks come first (they are what a submitter must act on), then leases out (the job is
    moving), then the commonest reason its open tasks wait (coordinator/engine.py stall_reason)."""
    failures: Sequence[Mapping[str, Any]] = status.get("failures") or []
    state = status.get("state")
    if failures:
        first = failures[0]
        sentence = f"task {task_label(str(first.get('task', '?')))} failed: {first.get('reason')}"
        more = int((status.get("tasks") or {}).get("failed") or len(failures)) - 1
        return sentence + (f" (and {_plural(more, 'more task')})" if more > 0 else "")
    if state == "failed":
        return str(status.get("error") or "failed")
    if state != "running":
        return None
    waiting: Sequence[Mapping[str, Any]] = status.get("waiting") or []
    stalled = Counter(str(w.get("waiting")) for w in waiting if not str(w.get("waiting", "")).startswith("running"))
    if leases_out > 0:
        sentence = f"running: {_plural(leases_out, 'lease')} out"
        if stalled:
            reason, count = stalled.most_common(1)[0]
            sentence += f"; {_plural(count, 'task')} {reason}"
        return sentence
    if stalled:
        return stalled.most_common(1)[0][0]
    if waiting:
        return str(waiting[0].get("waiting"))
    return "running: deciding its last results"


def job_eta(status: Mapping[str, Any], *, now: float, node_rates: Sequence[float | None], online_nodes: int,
            leases_out: int) -> float | None:
    """Seconds until the job is likely done, or None when unknown (nothing online and nothing out).

    The job's own pace since it started is the best guess once some tasks are verified; before
    that, the measured results per second of the nodes online, divided by the replicas each task
    needs. A done or failed job: 0."""
    state = status.get("state")
    if state in ("done", "failed"):
        return 0.0
    tasks = status.get("tasks") or {}
    total = int(tasks.get("total") or 0)
    verified = int(tasks.get("verified") or 0)
    failed = int(tasks.get("failed") or 0)
    left = max(0, total - verified - failed)
    if left == 0:
        return 0.0
    if online_nodes == 0 and leases_out == 0:
        return None  # nothing can move it: no estimate is honest
    created = status.get("created_at")
    elapsed = now - float(created) if isinstance(created, int | float) else 0.0
    if verified + failed > 0 and elapsed > 0:
        pace = (verified + failed) / elapsed
        return round(left / pace, 1)
    replicas = max(1, int(status.get("replicas") or 1))
    measured = [r for r in node_rates if r is not None and r > 0]
    if not measured:
        return None
    return round(left * replicas / sum(measured), 1)


def job_row(status: Mapping[str, Any], *, why: str | None, eta: float | None, public: bool,
            submitter: str) -> dict[str, Any]:
    """A job as GET /v1/jobs lists it. `public`: the summary anyone may see (id, state, progress,
    submitter, times, why, eta), without the model, errors in detail or read token."""
    row = {k: v for k, v in status.items() if not (public and k in PRIVATE_JOB_FIELDS)}
    row.pop("waiting", None)  # per-task detail: GET /v1/jobs/{job} has it
    row.update({"submitter": submitter, "created_at_iso": iso_time(status.get("created_at")),
                "finished_at_iso": iso_time(status.get("finished_at")), "why": why, "eta_seconds": eta})
    if public:
        row["model"] = None
    return row


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the coordinator knows of one node, gathered by the adapter."""

    node: str
    owner: str
    slots: int  # leases it asked to hold at once (0: none asked now)
    leases: int  # leases it holds now
    asking: bool  # it has an open work request
    rate: float | None  # results per second, measured (coordinator/capacity.py), None before any
    trusted: bool
    blocked: bool
    streak: int
    trusted_after: int
    audit_rate: float
    last_seen: float | None  # wall-clock seconds


def node_state(f: NodeFacts) -> str:
    if f.blocked:
        return "blocked"
    if f.leases > 0:
        return "working"
    if f.asking:
        return "idle"
    return "away"


def node_row(f: NodeFacts) -> dict[str, Any]:
    level = "blocked" if f.blocked else "trusted" if f.trusted else "untrusted"
    score = 1.0 if f.trusted and not f.blocked else min(1.0, f.streak / max(1, f.trusted_after))
    return {
        "node": f.node, "owner": f.owner, "slots": f.slots, "leases": f.leases, "state": node_state(f),
        "online": f.asking or f.leases > 0,
        "speed": None if f.rate is None else round(f.rate, 3), "speed_unit": "tasks/s",
        "trust": {"level": level, "score": round(0.0 if f.blocked else score, 3), "streak": f.streak,
                  "audit_rate": round(f.audit_rate, 4)},
        "last_seen": f.last_seen, "last_seen_iso": iso_time(f.last_seen),
    }


def node_rows(facts: Sequence[NodeFacts], *, now: float) -> list[dict[str, Any]]:
    """Online nodes first (working, then idle), then those seen within RECENT_SECONDS, flagged
    `"online": false`; older ones are left out."""
    rank = {"working": 0, "idle": 1, "blocked": 2, "away": 3}
    kept = [f for f in facts if f.asking or f.leases > 0
            or (f.last_seen is not None and now - f.last_seen <= RECENT_SECONDS)]
    kept.sort(key=lambda f: (rank[node_state(f)], f.owner, f.node))
    return [node_row(f) for f in kept]


class Throughput:
    """Verified tasks per second between two samples of a monotonically growing counter."""

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None
        self.rate = 0.0

    def sample(self, *, now: float, verified_total: int) -> float:
        if self._last is not None:
            then, count = self._last
            if now - then >= 0.5:
                self.rate = max(0, verified_total - count) / (now - then)
                self._last = (now, verified_total)
        else:
            self._last = (now, verified_total)
        return self.rate
