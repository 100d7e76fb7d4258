"""coordinator/views.py: the "why", the ETA and the node rows, from plain values."""

from __future__ import annotations

import pytest

from coordinator.views import BadQuery, NodeFacts, job_eta, job_row, job_why, node_rows, parse_listing, task_label


def status(state: str = "running", *, total: int = 10, verified: int = 0, failed: int = 0,
           waiting: list[dict[str, object]] | None = None, failures: list[dict[str, str]] | None = None,
           created_at: float = 1000.0, replicas: int = 2) -> dict[str, object]:
    return {"job": "j1", "model": "m" * 64, "state": state, "rows": 100, "replicas": replicas,
            "tasks": {"total": total, "verified": verified, "failed": failed, "open": total - verified - failed},
            "error": None, "failures": failures or [], "created_at": created_at, "finished_at": None,
            "waiting": waiting or []}


def facts(node: str, *, leases: int = 0, asking: bool = True, rate: float | None = None,
          last_seen: float | None = 1000.0, blocked: bool = False, streak: int = 0) -> NodeFacts:
    return NodeFacts(node=node, owner=f"owner-{node}", slots=2, leases=leases, asking=asking, rate=rate,
                     trusted=streak >= 10, blocked=blocked, streak=streak, trusted_after=10, audit_rate=1.0,
                     last_seen=last_seen)


def test_a_job_with_no_owner_online_says_so() -> None:
    st = status(waiting=[{"task": "j1-00000", "waiting": "waiting: 0 of 2 required owners online"}] * 3)
    assert job_why(st, leases_out=0) == "waiting: 0 of 2 required owners online"


def test_a_failed_task_is_named_by_its_index_with_its_reason() -> None:
    st = status(failed=3, failures=[{"task": "j1-00007", "reason": "outputs contain NaN on 2 owners"}])
    assert job_why(st, leases_out=4) == "task 7 failed: outputs contain NaN on 2 owners (and 2 more tasks)"


def test_a_moving_job_counts_its_leases_and_names_what_else_waits() -> None:
    st = status(waiting=[{"task": "a", "waiting": "running on node n1"},
                         {"task": "b", "waiting": "waiting: every online owner already ran it"}])
    assert job_why(st, leases_out=12) == "running: 12 leases out; 1 task waiting: every online owner already ran it"
    assert job_why(status(waiting=[{"task": "a", "waiting": "running on node n1"}]), leases_out=1) == \
        "running: 1 lease out"


def test_a_done_job_has_no_why_and_eta_zero() -> None:
    st = status("done", verified=10)
    assert job_why(st, leases_out=0) is None
    assert job_eta(st, now=2000.0, node_rates=[], online_nodes=0, leases_out=0) == 0.0


def test_eta_is_unknown_when_nothing_can_move_the_job() -> None:
    assert job_eta(status(), now=1010.0, node_rates=[], online_nodes=0, leases_out=0) is None
    # nodes online but none measured yet, and no task verified: still unknown, not a guess
    assert job_eta(status(), now=1010.0, node_rates=[None], online_nodes=1, leases_out=1) is None


def test_eta_follows_the_jobs_own_pace_once_tasks_are_verified() -> None:
    # 4 of 10 verified in 20 s: 6 left at 0.2 tasks/s
    st = status(verified=4, created_at=1000.0)
    assert job_eta(st, now=1020.0, node_rates=[5.0], online_nodes=1, leases_out=2) == pytest.approx(30.0)


def test_eta_before_any_result_uses_the_nodes_measured_speed_over_the_replicas() -> None:
    # 10 tasks x 2 replicas over 2 + 3 results/s
    assert job_eta(status(), now=1001.0, node_rates=[2.0, 3.0], online_nodes=2, leases_out=0) == pytest.approx(4.0)


def test_the_public_summary_hides_the_model_and_failure_details() -> None:
    """Attack: a stranger reads the model digest from the public listing, then downloads the
    model (any member may GET /v1/models/{sha256}) or reads output names from failure reasons."""
    st = status(failures=[{"task": "j1-00001", "reason": "output 'secret_head' contains NaN"}], failed=1)
    row = job_row(st, why="x", eta=None, public=True, submitter="alice")
    assert row["model"] is None and "failures" not in row and "waiting" not in row
    assert row["submitter"] == "alice" and row["tasks"]["failed"] == 1
    assert row["created_at_iso"] == "1970-01-01T00:16:40.000Z"
    full = job_row(st, why="x", eta=None, public=False, submitter="alice")
    assert full["model"] == "m" * 64 and full["failures"]


def test_nodes_list_working_then_idle_then_recently_seen_and_drop_old_ones() -> None:
    rows = node_rows([facts("c", asking=False, last_seen=900.0), facts("b"), facts("a", leases=2),
                      facts("old", asking=False, last_seen=100.0)], now=1000.0)
    assert [(r["node"], r["state"], r["online"]) for r in rows] == [
        ("a", "working", True), ("b", "idle", True), ("c", "away", False)]
    assert rows[0]["speed_unit"] == "tasks/s"


def test_trust_reads_as_a_level_and_a_score() -> None:
    rows = {r["node"]: r["trust"] for r in node_rows(
        [facts("t", streak=12), facts("u", streak=5), facts("x", blocked=True, streak=12)], now=1000.0)}
    assert rows["t"]["level"] == "trusted" and rows["t"]["score"] == 1.0
    assert rows["u"] == {"level": "untrusted", "score": 0.5, "streak": 5, "audit_rate": 1.0}
    assert rows["x"]["level"] == "blocked" and rows["x"]["score"] == 0.0


def test_listing_queries_are_checked() -> None:
    assert parse_listing(None, None) == ("all", 50)
    assert parse_listing("done", "7") == ("done", 7)
    for state, limit in (("paused", None), ("all", "0"), ("all", "-1"), ("all", "501"), ("all", "1e3")):
        with pytest.raises(BadQuery):
            parse_listing(state, limit)


def test_task_labels_are_the_index_people_count() -> None:
    assert task_label("abc-00007") == "7"
    assert task_label("odd") == "odd"
