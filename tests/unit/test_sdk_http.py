"""client.sdk (and the `sparecycles` client commands) against a small real HTTP peer.

`FakeCoordinator` implements just enough of docs/http-api.md, on a real aiohttp server on
127.0.0.1, to see what the SDK sends: it parses NPZ with numpy's own `np.load`, pages with a small
page size of its own, and records every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import socket
import subprocess
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from node.receipts import ReceiptBook
from sparecycles.cli.main import main
from sparecycles.errors import CoordinatorUnavailable, JobFailed, RequestRejected, WaitTimeout
from sparecycles.npz import from_npz
from sparecycles.progress import ProgressReporter
from sparecycles.sdk import Client
from tests.unit.ledger_peer import LedgerPeer
from tests.unit.ledger_peer import serving as serving_app
from tests.unit.test_ledger_outside import AMOUNT, COORDINATOR, OTHER, Ledger, records

MODEL = b"\x08\x07fake onnx bytes"
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
PAGE = 2  # the peer's own page cap, smaller than any limit the SDK asks for

ENTRIES = [{"seq": s, "node": f"n{s % 2}", "owner": "alice", "job": "j1", "task": f"t{s}", "amount": 10,
            "result_digest": "ab" * 32, "created_at": 1_700_000_000 + s} for s in range(1, 6)]
ACCEPTED = [{"seq": s, "task": f"t{s}", "job": "j1", "node": f"n{s % 2}", "owner": "alice",
             "output_digest": "cd" * 32, "task_state": "verified"} for s in range(1, 4)]
BALANCES = {"nodes": [{"node": "n0", "owner": "alice", "credits": 20, "entries": 2},
                      {"node": "n1", "owner": "bob", "credits": 30.5, "entries": 3}],
            "owners": [{"owner": "alice", "credits": 20, "entries": 2},
                       {"owner": "bob", "credits": 30.5, "entries": 3}],
            "total_credits": 50.5, "entries": 5}


@dataclass
class FakeJob:
    rows: int
    tasks: int
    outcome: str = "done"  # "done", "failed" or "stuck"
    polls: int = 0
    inputs: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)


@dataclass
class FakeCoordinator:
    models: set[str] = field(default_factory=set)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    job_queries: list[dict[str, str]] = field(default_factory=list)
    job_content_types: list[str] = field(default_factory=list)
    afters: dict[str, list[str | None]] = field(default_factory=dict)
    outcome: str = "done"

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.log.append((request.method, request.path))
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        # A client with a key reads the coordinator's id (what it signs for) and its own account.
        app.router.add_get("/v1/info", lambda _: web.json_response({"coordinator": "fake-coordinator"}))
        app.router.add_get("/v1/accounts/me", lambda _: web.json_response({"name": "tester", "balance": 10**9}))
        app.router.add_head("/v1/models/{digest}", self.head_model)
        app.router.add_put("/v1/models", self.put_model)
        app.router.add_post("/v1/jobs", self.post_job)
        app.router.add_get("/v1/jobs/{job}", self.get_job)
        app.router.add_get("/v1/jobs/{job}/outputs", self.get_outputs)
        app.router.add_get("/v1/ledger/balances", self.balances)
        app.router.add_get("/v1/ledger/nodes/{node}", self.node)
        app.router.add_get("/v1/ledger/entries", self.paged("entries", ENTRIES))
        app.router.add_get("/v1/ledger/accepted", self.paged("accepted", ACCEPTED))
        return app

    @staticmethod
    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def head_model(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if request.match_info["digest"] in self.models else 404)

    async def put_model(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256(await request.read()).hexdigest()
        known = digest in self.models
        self.models.add(digest)
        return web.json_response({"model": digest, "size": len(MODEL)}, status=200 if known else 201)

    async def post_job(self, request: web.Request) -> web.Response:
        self.job_content_types.append(request.content_type)
        self.job_queries.append(dict(request.query))
        if request.query.get("model") not in self.models:
            return self.error(404, "unknown model: upload it first with PUT /v1/models")
        with np.load(io.BytesIO(await request.read()), allow_pickle=False) as npz:
            inputs = {name: npz[name] for name in npz.files}
        rows = len(next(iter(inputs.values())))
        size = int(request.query.get("task_size", "2"))
        job_id = f"j{len(self.jobs) + 1}"
        self.jobs[job_id] = FakeJob(rows=rows, tasks=-(-rows // size), outcome=self.outcome, inputs=inputs)
        return web.json_response({"job": job_id, "rows": rows, "tasks": self.jobs[job_id].tasks}, status=202)

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job"]
        job = self.jobs.get(job_id)
        if job is None:
            return self.error(404, "unknown job")
        verified = min(job.polls, job.tasks)
        job.polls += 1
        state = "running"
        failures: list[dict[str, str]] = []
        if job.outcome == "failed" and job.polls > 1:
            state, failures = "failed", [{"task": f"{job_id}.0", "reason": "no quorum after 6 results"}]
        elif job.outcome == "done" and verified == job.tasks:
            state = "done"
        failed = len(failures)
        return web.json_response({
            "job": job_id, "model": MODEL_SHA, "state": state, "rows": job.rows,
            "replicas": 2, "task_size": 2,
            "tasks": {"total": job.tasks, "verified": verified, "failed": failed,
                      "open": job.tasks - verified - failed},
            "error": "1 task failed" if failures else None, "failures": failures,
            "created_at": 1.0, "finished_at": None})

    async def get_outputs(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["job"])
        if job is None:
            return self.error(404, "unknown job")
        buf = io.BytesIO()
        x = job.inputs["x.in"]
        outputs: dict[str, Any] = {"sum.out": x.sum(axis=1), "argmax": x.argmax(axis=1)}
        np.savez(buf, **outputs)
        return web.Response(body=buf.getvalue(), content_type="application/x-npz")

    async def balances(self, request: web.Request) -> web.Response:
        return web.json_response(BALANCES)

    async def node(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        mine = [e for e in ENTRIES if e["node"] == node]
        return web.json_response({"node": node, "owner": "alice", "credits": 10 * len(mine), "entries": mine})

    def paged(self, key: str, items: list[dict[str, Any]]) -> Any:
        async def handler(request: web.Request) -> web.Response:
            self.afters.setdefault(key, []).append(request.query.get("after"))
            after = int(request.query.get("after", "0"))
            limit = min(int(request.query.get("limit", "1000")), PAGE)
            page = [i for i in items if i["seq"] > after][:limit]
            return web.json_response({key: page, "next": page[-1]["seq"] if len(page) == limit else None})
        return handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inputs() -> dict[str, Any]:
    return {"x.in": np.arange(10, dtype=np.float32).reshape(5, 2)}


# -- the SDK ---------------------------------------------------------------------------------------


async def test_ensure_model_uploads_only_when_head_says_404() -> None:
    fake = FakeCoordinator()
    async with TestServer(fake.app()) as server, Client(str(server.make_url("/"))) as client:
        first = await client.ensure_model(MODEL)
        second = await client.ensure_model(MODEL)

    assert first == second == MODEL_SHA
    assert fake.log == [("HEAD", f"/v1/models/{MODEL_SHA}"), ("PUT", "/v1/models"),
                        ("HEAD", f"/v1/models/{MODEL_SHA}")]


async def test_submit_sends_an_npz_body_with_options_as_query_parameters() -> None:
    fake = FakeCoordinator(models={MODEL_SHA})
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        job = await client.submit(MODEL_SHA, inputs(), replicas=3, task_size=2, final="exact")
        await client.submit(MODEL_SHA, inputs())

    assert job == {"job": "j1", "rows": 5, "tasks": 3}
    assert fake.job_content_types == ["application/x-npz", "application/x-npz"]
    assert fake.job_queries == [{"model": MODEL_SHA, "replicas": "3", "task_size": "2", "final": "exact"},
                                {"model": MODEL_SHA}]
    np.testing.assert_array_equal(fake.jobs["j1"].inputs["x.in"], inputs()["x.in"])


async def test_a_rejected_request_carries_the_servers_error_message() -> None:
    fake = FakeCoordinator()
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        with pytest.raises(RequestRejected) as caught:
            await client.submit(MODEL_SHA, inputs())

    assert caught.value.status == 404
    assert caught.value.message == "unknown model: upload it first with PUT /v1/models"


async def test_entries_and_accepted_follow_next_until_it_is_null() -> None:
    fake = FakeCoordinator()
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        entries = await client.entries()
        accepted = await client.accepted()

    assert entries == ENTRIES
    assert accepted == ACCEPTED
    assert fake.afters == {"entries": [None, "2", "4"], "accepted": [None, "2"]}


async def test_balances_and_history_return_the_servers_json() -> None:
    fake = FakeCoordinator()
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        balances = await client.balances()
        history = await client.history("n1")

    assert balances == BALANCES
    assert [e["seq"] for e in history["entries"]] == [1, 3, 5]


async def test_wait_reports_each_change_and_returns_the_done_status_then_outputs_arrive() -> None:
    fake = FakeCoordinator(models={MODEL_SHA})
    seen: list[dict[str, Any]] = []
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        job = await client.submit(MODEL_SHA, inputs(), task_size=2)
        final = await client.wait(job["job"], on_progress=seen.append, poll=0.01)
        outputs = await client.outputs(job["job"])

    assert final["state"] == "done"
    assert [s["tasks"]["verified"] for s in seen] == [0, 1, 2, 3]
    assert set(outputs) == {"sum.out", "argmax"}
    np.testing.assert_array_equal(outputs["sum.out"], inputs()["x.in"].sum(axis=1))


async def test_wait_raises_job_failed_with_the_failure_reasons() -> None:
    fake = FakeCoordinator(models={MODEL_SHA}, outcome="failed")
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        job = await client.submit(MODEL_SHA, inputs())
        with pytest.raises(JobFailed) as caught:
            await client.wait(job["job"], poll=0.01)

    assert caught.value.status["state"] == "failed"
    assert caught.value.failures == [{"task": "j1.0", "reason": "no quorum after 6 results"}]
    assert "no quorum after 6 results" in str(caught.value)


async def test_wait_gives_up_with_wait_timeout_while_the_job_keeps_running() -> None:
    fake = FakeCoordinator(models={MODEL_SHA}, outcome="stuck")
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        job = await client.submit(MODEL_SHA, inputs())
        with pytest.raises(WaitTimeout) as caught:
            await client.wait(job["job"], poll=0.02, timeout=0.2)

    assert caught.value.last_status is not None
    assert caught.value.last_status["state"] == "running"
    assert f"sparecycles status {job['job']}" in str(caught.value)


async def test_wait_rides_out_a_coordinator_that_comes_back() -> None:
    fake = FakeCoordinator(jobs={"j1": FakeJob(rows=4, tasks=2)})  # the job survives in its store
    port = free_port()
    seen: list[dict[str, Any]] = []

    async with Client(f"http://127.0.0.1:{port}") as client:
        waiting = asyncio.create_task(client.wait("j1", on_progress=seen.append, poll=0.01))
        await asyncio.sleep(0.4)  # nothing listens yet: wait() must keep retrying, not fail
        assert not waiting.done()
        async with TestServer(fake.app(), port=port):
            final = await asyncio.wait_for(waiting, timeout=10)

    assert final["state"] == "done"
    assert seen[-1]["tasks"]["verified"] == 2


async def test_wait_raises_coordinator_unavailable_after_the_grace_period() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with Client(url) as client:
        client.unavailable_grace = 0.3
        with pytest.raises(CoordinatorUnavailable) as caught:
            await client.wait("j1", poll=0.01)

    assert url in str(caught.value)
    assert "sparecycles coordinator" in str(caught.value)


async def test_progress_lines_report_verified_tasks_and_the_end() -> None:
    fake = FakeCoordinator(models={MODEL_SHA})
    out = io.StringIO()
    async with TestServer(fake.app()) as server, Client(str(server.make_url(""))) as client:
        job = await client.submit(MODEL_SHA, inputs(), task_size=2)
        with ProgressReporter(job["job"], stream=out, interval=0.0) as report:
            await client.wait(job["job"], on_progress=report, poll=0.01)

    assert out.getvalue().splitlines() == [
        "job j1: 0/3 tasks verified, 0 failed (0%)",
        "job j1: 1/3 tasks verified, 0 failed (33%)",
        "job j1: 2/3 tasks verified, 0 failed (66%)",
        "job j1: 3/3 tasks verified, 0 failed (100%) done",
    ]


def test_progress_lines_are_throttled_but_the_final_one_always_shows() -> None:
    now = [0.0]
    out = io.StringIO()
    report = ProgressReporter("j9", stream=out, interval=1.0, clock=lambda: now[0])

    def status(verified: int, state: str = "running") -> dict[str, Any]:
        return {"state": state, "tasks": {"total": 29, "verified": verified, "failed": 0}}

    report(status(0))
    now[0] = 0.5
    report(status(5))  # too soon
    now[0] = 1.2
    report(status(12))
    now[0] = 1.3
    report(status(29, "done"))  # final: shown at once

    assert out.getvalue().splitlines() == [
        "job j9: 0/29 tasks verified, 0 failed (0%)",
        "job j9: 12/29 tasks verified, 0 failed (41%)",
        "job j9: 29/29 tasks verified, 0 failed (100%) done",
    ]


# -- the CLI over HTTP -----------------------------------------------------------------------------


def serving(fake: FakeCoordinator) -> AbstractContextManager[str]:
    """The fake on a real socket in a thread, for `main()`, which runs its own event loop."""
    return serving_app(fake.app())


def write_submission(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "model.onnx", tmp_path / "inputs.npz"
    model.write_bytes(MODEL)
    np.savez(data, **inputs())
    return model, data


def test_cli_submit_writes_the_outputs_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeCoordinator()
    model, data = write_submission(tmp_path)
    out = tmp_path / "out.npz"

    with serving(fake) as url:
        code = main(["submit", str(model), str(data), "--coordinator", url, "--task-size", "2",
                     "--replicas", "2", "--final", "exact", "-o", str(out)])

    err = capsys.readouterr().err
    assert code == 0, err
    outputs = from_npz(out.read_bytes())
    assert set(outputs) == {"sum.out", "argmax"}
    np.testing.assert_array_equal(outputs["sum.out"], inputs()["x.in"].sum(axis=1))
    assert fake.job_queries == [{"model": MODEL_SHA, "replicas": "2", "task_size": "2", "final": "exact"}]
    assert "job j1: 3/3 tasks verified, 0 failed (100%) done" in err
    assert "job j1: 5 rows in 3 tasks" in err and str(out) in err


def test_cli_submit_of_a_failing_job_exits_1_with_the_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = write_submission(tmp_path)
    out = tmp_path / "out.npz"

    with serving(FakeCoordinator(outcome="failed")) as url:
        code = main(["submit", str(model), str(data), "--coordinator", url, "-o", str(out)])

    err = capsys.readouterr().err
    assert code == 1
    assert "job j1 failed: 1 task failed" in err
    assert "task j1.0: no quorum after 6 results" in err
    assert not out.exists()


def test_cli_balances_json_prints_exactly_the_servers_json(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeCoordinator()) as url:
        code = main(["ledger", "balances", "--coordinator", url, "--json"])

    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out) == BALANCES
    assert captured.out.count("\n") == 1


def test_cli_balances_table_lists_nodes_and_owners(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeCoordinator()) as url:
        code = main(["ledger", "balances", "--coordinator", url])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].split() == ["node", "owner", "credits", "entries"]
    assert lines[1].split() == ["n0", "alice", "20", "2"]
    assert lines[2].split() == ["n1", "bob", "30.5", "3"]
    assert ["bob", "30.5", "3"] in [line.split() for line in lines]
    assert lines[-1] == "total: 50.5 credits in 5 entries"
    assert lines[-2].startswith("unit: credit: 1 credit = 1,000 floating-point operations")


def test_cli_history_and_status_json(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeCoordinator(jobs={"j7": FakeJob(rows=4, tasks=2)})
    with serving(fake) as url:
        history_code = main(["ledger", "history", "n1", "--coordinator", url, "--json"])
        history = json.loads(capsys.readouterr().out)
        status_code = main(["status", "j7", "--coordinator", url, "--json"])
        status = json.loads(capsys.readouterr().out)

    assert (history_code, status_code) == (0, 0)
    assert history["node"] == "n1" and len(history["entries"]) == 3
    assert status["job"] == "j7" and status["state"] == "running"


def test_cli_status_of_an_unknown_job_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(FakeCoordinator()) as url:
        code = main(["status", "nope", "--coordinator", url])

    assert code == 2
    assert "unknown job" in capsys.readouterr().err


# -- the ledger from outside (issue 11), against a peer serving a real signed Merkle log -----------------


def ledger_main(*argv: str) -> int:
    return main(["ledger", *argv])


def test_verify_checks_one_snapshot_at_the_checkpoint_while_credits_keep_arriving(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack-free, but the old false alarm: credits recorded after the checkpoint (19 entries signed,
    31 written) must not show up as missing or as wrong balances."""
    peer = LedgerPeer(Ledger(records(10)), signed=19)
    with serving_app(peer.app()) as url:
        code = ledger_main("verify", "--coordinator", url, "--state-dir", str(tmp_path / "state"))

    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("ledger OK: 19 entries up to the checkpoint of ")
    assert all("upto=19" in r for r in peer.requests if r.startswith(("/v1/ledger/entries", "/v1/ledger/bal",
                                                                      "/v1/ledger/accepted")))
    assert json.loads((tmp_path / "state" / "coordinator.json").read_text())["public_key"] == \
        COORDINATOR.public_key.hex()


def test_verify_remembers_checkpoints_and_catches_a_log_rewritten_and_signed_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: after a contributor verified, the operator rewrites an early credit in the database and
    has the coordinator sign the rewritten log afresh."""
    state = str(tmp_path / "state")
    with serving_app(LedgerPeer(Ledger(records(4)), signed=10).app()) as url:
        assert ledger_main("verify", "--coordinator", url, "--state-dir", state) == 0
    recs = records(6)
    recs[2] = dataclasses.replace(recs[2], amount=AMOUNT + 1)
    capsys.readouterr()

    with serving_app(LedgerPeer(Ledger(recs)).app()) as url:
        code = ledger_main("verify", "--coordinator", url, "--state-dir", state)

    out = capsys.readouterr().out
    assert code == 1
    assert "a checkpoint seen before does not agree with the newest: checkpoint of size 10" in out
    assert "the first change is in seq 1..10" in out


def test_verify_refuses_a_key_other_than_the_one_pinned_on_first_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: a man in the middle, or a coordinator replaced, answers with its own key."""
    state = str(tmp_path / "state")
    with serving_app(LedgerPeer(Ledger(records(2))).app()) as url:
        assert ledger_main("verify", "--coordinator", url, "--state-dir", state) == 0
    with serving_app(LedgerPeer(Ledger(records(2), identity=OTHER), signer=OTHER).app()) as url:
        code = ledger_main("verify", "--coordinator", url, "--state-dir", state)

    err = capsys.readouterr().err
    assert code == 1
    assert f"now signs with key {OTHER.public_key.hex()}, but key {COORDINATOR.public_key.hex()} was pinned" in err


def test_verify_by_default_pins_per_url_so_a_new_key_cannot_hide_in_a_new_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: the key changes, so the default state directory (named after the coordinator id,
    which derives from the key) would be a fresh one."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    honest = LedgerPeer(Ledger(records(2)))
    with serving_app(honest.app()) as url:
        assert ledger_main("verify", "--coordinator", url) == 0
        assert (tmp_path / "sparecycles" / "ledger" / COORDINATOR.id / "checkpoints.json").exists()
        honest.signer, honest.ledger = OTHER, Ledger(records(2), identity=OTHER)
        code = ledger_main("verify", "--coordinator", url)

    assert code == 1
    assert "was pinned in" in capsys.readouterr().err


def test_verify_with_a_given_key_refuses_a_coordinator_serving_another(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving_app(LedgerPeer(Ledger(records(2))).app()) as url:
        wrong = ledger_main("verify", "--coordinator", url, "--state-dir", str(tmp_path), "--coordinator-key",
                            OTHER.public_key.hex())
        bad = ledger_main("verify", "--coordinator", url, "--state-dir", str(tmp_path), "--coordinator-key", "xyz")

    err = capsys.readouterr().err
    assert (wrong, bad) == (1, 2)
    assert f"serves public key {COORDINATOR.public_key.hex()}, not the {OTHER.public_key.hex()} you gave" in err
    assert "a coordinator key is 64 hex characters" in err


def test_verify_with_a_nodes_receipts_names_the_credit_edited_in_the_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack: the operator lowers one of node n1's credits in the database, and fixes the balances
    and the checkpoint's signature can no longer match; n1's receipt says which credit."""
    peer = LedgerPeer(Ledger(records(5)))
    book = ReceiptBook(tmp_path / "node", "n1", COORDINATOR.public_key)

    async def keep_receipts(url: str) -> int:
        async with aiohttp.ClientSession() as session:
            return await book.refresh(session, url)

    with serving_app(peer.app()) as url:
        assert asyncio.run(keep_receipts(url)) == 5
        assert ledger_main("verify", "--coordinator", url, "--state-dir", str(tmp_path / "s"),
                           "--receipts", str(tmp_path / "node")) == 0
        assert "5 receipts included" in capsys.readouterr().out
        peer.tamper[5] = {**peer.docs()[4], "amount": 1}
        code = ledger_main("verify", "--coordinator", url, "--state-dir", str(tmp_path / "s2"),
                           "--receipts", str(tmp_path / "node"))

    out = capsys.readouterr().out
    assert code == 1
    assert "seq 5: the entry your receipt holds is no longer served: it was edited or removed" in out


def test_history_of_an_owner_name_shows_the_accounts_entries(capsys: pytest.CaptureFixture[str]) -> None:
    with serving_app(LedgerPeer(Ledger(records(2))).app()) as url:
        code = ledger_main("history", "alice", "--coordinator", url)
        out = capsys.readouterr().out
        missing = ledger_main("history", "nobody", "--coordinator", url)

    assert code == 0
    assert out.startswith("account alice: balance 1664 credits")
    assert "2023-11-14T22:13:20.250Z" in out  # ISO 8601, not a raw epoch float
    assert "unit: credit: one credit is 1,000 floating-point operations" in out
    assert missing == 2
    assert "no node or account named nobody has ledger entries" in capsys.readouterr().err


def test_job_checkpoint_and_proof_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with serving_app(LedgerPeer(Ledger(records(3))).app()) as url:
        job = ledger_main("job", "j1", "--coordinator", url)
        job_out = capsys.readouterr().out
        checkpoint = ledger_main("checkpoint", "--coordinator", url)
        checkpoint_out = capsys.readouterr().out
        proof = ledger_main("proof", "4", "--coordinator", url)
        proof_out = capsys.readouterr().out

    assert (job, checkpoint, proof) == (0, 0, 0)
    assert job_out.startswith(f"job j1: cost {6 * AMOUNT} credits, 9 entries")
    assert checkpoint_out.startswith("checkpoint of 10 entries, signed 2026-01-01T00:00:00.010Z")
    assert proof_out.startswith("seq 4 is in the checkpoint of 10 entries signed")
    assert "(4 hashes, verified)" in proof_out


def test_export_writes_the_whole_ledger_as_jsonl_and_csv(tmp_path: Path) -> None:
    ledger = Ledger(records(5))  # 16 entries: three of the peer's pages
    with serving_app(LedgerPeer(ledger).app()) as url:
        assert ledger_main("export", "--coordinator", url, "-o", str(tmp_path / "l.jsonl")) == 0
        assert ledger_main("export", "--coordinator", url, "--format", "csv", "-o", str(tmp_path / "l.csv")) == 0

    lines = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in lines] == list(range(1, 17))
    assert lines[1]["created_at_iso"] == "2023-11-14T22:13:20.250Z"
    rows = (tmp_path / "l.csv").read_text().splitlines()
    assert rows[0].startswith("seq,kind,created_at_iso,created_at,account")
    assert len(rows) == 17 and rows[2].startswith("2,credit,2023-11-14T22:13:20.250Z,")


@pytest.mark.parametrize("command", [["export"], ["history", "n1"], ["balances"]])
def test_output_piped_into_head_ends_quietly(command: list[str]) -> None:
    """`sparecycles ledger ... | head -1` in a real pipe: no BrokenPipeError traceback."""
    with serving_app(LedgerPeer(Ledger(records(400))).app()) as url:
        producer = subprocess.Popen([sys.executable, "-m", "sparecycles", "ledger", *command, "--coordinator", url],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert producer.stdout is not None
        head = subprocess.run(["head", "-1"], stdin=producer.stdout, capture_output=True, timeout=60)
        producer.stdout.close()
        _, err = producer.communicate(timeout=60)

    assert head.stdout.count(b"\n") == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert producer.returncode == 0
