"""Adversaries against real processes (issue 8): each one is outvoted or audited, earns nothing,
and the job still completes with the right outputs or fails with a reason its submitter sees.

Every test runs a real coordinator (its own flags), real node processes on the real Mosquitto, and
real ONNX Runtime. Liars are real node daemons whose outputs are rewritten before they are signed
(`tests/integration/liar_node.py`), or, where a node's messages must be chosen one by one, a
`Puppet` (test_access.py: a certified key sealing its own envelopes on the broker). Outputs are
compared with a local ONNX Runtime run; the ledger is checked by `ledger.verify` after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from ledger.verify import find_discrepancies
from protocol.codec import open_envelope
from protocol.errors import PeerError
from protocol.messages import Assignment, Result, Results
from protocol.signing import Identity
from protocol.tensors import digest_tensors, tensors_from_arrays
from sparecycles import Client
from sparecycles.cli.processes import ManagedProcess, ProcessGroup
from tests import models

from .network import READY_TIMEOUT, Network, submitter
from .test_access import BROKER, Api, Puppet, api_for, certificate, run_outputs, until
from .test_end_to_end import assert_outputs_match, cli, local_run

pytestmark = pytest.mark.integration

MODEL = models.classifier(features=8, classes=4)  # tasks take microseconds: the network is what is tested


@pytest.fixture
def net(mosquitto_url: str, tmp_path: Path) -> Iterator[Network]:
    """A network whose coordinator each test starts with the flags its adversary needs."""
    with ProcessGroup(tmp_path / "logs") as group:
        yield Network(group=group, tmp=tmp_path, broker_url=mosquitto_url)


# ---- helpers -------------------------------------------------------------------------------------
@dataclass
class Node:
    proc: ManagedProcess
    id: str
    owner: str


def start_nodes(net: Network, *specs: str) -> list[Node]:
    """Start one single-slot node process per spec, all at once, and wait until each is ready. A
    spec is an owner ("alice"; a node of a fresh account of that name) or "owner:lie" for a node
    that lies (`liar_node.LIES`). Give each owner one spec per call: nodes of one owner share its
    key file, which the first one creates."""
    started = []
    for spec in specs:
        owner, _, lie = spec.partition(":")
        i = len(net.nodes)
        args = ["--broker", net.broker_url, "--coordinator", net.url, "--key", str(net.tmp / f"node{i}.key"),
                "--owner", owner, "--slots", "1", "--cache-dir", str(net.tmp / f"cache{i}")]
        module = "tests.integration.liar_node" if lie else "node"
        proc = net.group.start(module, [*args, "--lie", lie] if lie else args, name=f"node{i}-{owner}")
        net.nodes.append(proc)
        started.append((proc, owner))
    return [Node(proc, proc.wait_for_line(r"node ready id=(\S+)", READY_TIMEOUT).group(1), owner)
            for proc, owner in started]


async def finished(c: Client, job: str, *, within: float) -> dict[str, Any]:
    """The job's status once it is done or failed (either: the caller checks which)."""
    deadline = time.monotonic() + within
    while (status := await c.status(job, wait=1))["state"] == "running":
        assert time.monotonic() < deadline, status
    return status


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


async def counters(url: str) -> dict[str, int]:
    async with api_for(url) as api:
        return await api.counters()


async def trust(url: str, node: str) -> dict[str, Any]:
    async with Client(url) as c:
        return await c.trust(node)


async def ledger(url: str) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(discrepancies found by `ledger verify`, every entry, every accepted result)."""
    async with submitter(url) as c:
        entries, accepted, balances = await c.entries(), await c.accepted(), await c.balances()
    return find_discrepancies(entries, accepted, balances), entries, accepted


def net_credit(entries: list[dict[str, Any]], node: str) -> int:
    """What `node` was paid and kept: its credits less what was clawed back from it."""
    sign = {"credit": 1, "clawback": -1}
    return sum(sign.get(e["kind"], 0) * e["amount"] for e in entries if e.get("node") == node)


def assert_earned_nothing(entries: list[dict[str, Any]], *nodes: Node) -> None:
    for node in nodes:
        assert net_credit(entries, node.id) == 0, f"{node.owner}'s node kept credit"
        assert not [e for e in entries if e["kind"] == "credit" and e.get("owner") == node.owner]


# ---- colluders -----------------------------------------------------------------------------------
def test_two_colluding_owners_agreeing_on_a_wrong_answer_are_audited_paid_nothing_and_blocked(net: Network) -> None:
    """Attack: two fresh accounts (mallory, trudy) run one node each and return the same wrong answer
    for every task, so whenever the scheduler pairs them, two owners agree (accepting the first two
    agreeing answers lets this through for a quarter of the tasks of a 2-in-5 network).
    Refused: agreement among untrusted owners is no ground truth: the coordinator audits it (re-runs
    the task itself), rejects both results, and the honest node's answer is accepted instead; a
    colluder paired with the honest node is caught by the audit that breaks the tie. Neither is paid,
    both owners end blocked (--block-after 3), and the job completes with the right outputs (a task
    left with only alice's answer once both are blocked is decided by the coordinator's own run)."""
    net.start_coordinator()
    # The colluders start first, so that they do get to agree with each other before the honest
    # node is there (whoever answers first decides which path a task takes: with alice first, a
    # colluder only ever disagrees with her, and the agreement this test is about never happens).
    mallory, trudy = start_nodes(net, "mallory:roll", "trudy:roll")
    x = rows(240, seed=21)
    nodes: list[Node] = []

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        async with submitter(net.url) as c:
            job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=8, deadline=30)
            async with api_for(net.url) as api:
                await until(lambda: _counter_at_least(api, "audit_failed", 1), "the colluders' agreement audited", 20)
            nodes.extend(await asyncio.to_thread(start_nodes, net, "alice"))
            status = await finished(c, str(job["job"]), within=60)
            return status, await c.outputs(job["job"]) if status["state"] == "done" else None

    status, outputs = asyncio.run(scenario())
    [alice] = nodes
    assert status["state"] == "done" and status["tasks"]["verified"] == 30 and outputs is not None, status
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    problems, entries, accepted = asyncio.run(ledger(net.url))
    assert problems == []
    assert {a["owner"] for a in accepted} == {"alice"}  # only results the audits confirmed
    assert_earned_nothing(entries, mallory, trudy)
    # Paid nothing in the first place, rather than paid and clawed back: no agreement of theirs
    # was ever accepted unchecked.
    assert not [e for e in entries if e["kind"] in ("clawback", "refund")]
    seen = asyncio.run(counters(net.url))
    assert seen.get("audit_failed", 0) >= 1, seen  # the colluders did agree, and the audit refused it
    assert seen.get("owner_blocked", 0) == 2, seen
    for colluder in (mallory, trudy):
        view = asyncio.run(trust(net.url, colluder.id))
        assert view["blocked"] and not view["trusted"], view
        assert view["record"]["audits_failed"] >= 3 and view["record"]["valid"] == 0, view
        assert "blocked" in view["why"], view
    honest = asyncio.run(trust(net.url, alice.id))
    assert not honest["blocked"] and honest["record"]["invalid"] == 0
    assert honest["record"]["audits_passed"] >= status["tasks"]["verified"]


# ---- a hung node ---------------------------------------------------------------------------------
def test_a_node_that_takes_leases_and_never_answers_delays_a_job_by_its_silence_not_its_lease(
        net: Network) -> None:
    """Attack: a node takes leases and never answers (here: SIGSTOP, so its broker connection stays
    open and nothing tells the coordinator it is gone), holding tasks until their 60 s leases run
    out or the broker's keepalive notices.
    Refused: a node that sends nothing, not even its heartbeat, for --silence-seconds (default 10)
    loses its leases to other owners: the same job takes at most ~15 s longer than without it, and
    no lease had to expire."""
    net.start_coordinator()  # defaults on purpose: 60 s leases, 10 s silence
    _, _, carol = start_nodes(net, "alice", "bob", "carol")
    # 60 tasks: more replicas than alice and bob hold at once (each asks for up to 17 of such tiny
    # tasks), so the hung carol is certain to be handed some of them.
    x = rows(240, seed=22)

    async def timed_job(*, show: bool = False) -> tuple[float, dict[str, Any], dict[str, np.ndarray], str]:
        async with submitter(net.url) as c:
            digest = await c.ensure_model(MODEL)
            started = time.monotonic()
            job = await c.submit(digest, {"x": x}, task_size=4)
            shown = ""
            if show:  # what the submitter sees meanwhile: the tasks it waits for, and why
                await asyncio.sleep(1.0)
                done = await asyncio.to_thread(cli, "status", job["job"], "--coordinator", net.url,
                                               "--token", job["read_token"])
                shown = done.stdout + done.stderr
            status = await c.wait(job["job"], timeout=60)
            return time.monotonic() - started, status, await c.outputs(job["job"]), shown

    baseline, _, _, _ = asyncio.run(timed_job())
    os.kill(carol.proc.pid, signal.SIGSTOP)
    try:
        hung, status, outputs, shown = asyncio.run(timed_job(show=True))
        seen = asyncio.run(counters(net.url))
    finally:
        os.kill(carol.proc.pid, signal.SIGCONT)
    carol.proc.terminate()
    assert ": running" in shown and "waiting   task" in shown and "running on node " in shown, shown

    assert status["state"] == "done" and status["tasks"]["verified"] == 60
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    assert seen.get("node_silent", 0) >= 1, seen  # carol held leases of the job and lost them
    assert seen.get("lease_expired", 0) == 0, seen
    assert hung - baseline < 15.0, (hung, baseline)
    problems, entries, _ = asyncio.run(ledger(net.url))
    assert problems == []
    assert not [e for e in entries if e["kind"] == "credit" and e["node"] == carol.id
                and e["job"] == status["job"]]


# ---- error spam ----------------------------------------------------------------------------------
def test_an_error_spamming_node_fails_no_task_earns_nothing_and_its_errors_count_against_it(net: Network) -> None:
    """Attack: a node reports "cannot run" for every task it takes, fast, to fail tasks (errors used
    to count toward max_errors whoever sent them) and to take work from honest nodes.
    Refused: one owner's errors never fail a task: it goes to other owners, the coordinator's own
    run shows the errors were false, and they count against the spammer. The job completes."""
    net.start_coordinator()
    _, _, spammer = start_nodes(net, "alice", "bob", "mallory:error")
    x = rows(80, seed=23)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(net.url) as c:
            job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=4, deadline=60)
            return await c.wait(job["job"], timeout=90), await c.outputs(job["job"])

    status, outputs = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"] == {"total": 20, "verified": 20, "failed": 0, "open": 0}
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    problems, entries, _ = asyncio.run(ledger(net.url))
    assert problems == []
    assert_earned_nothing(entries, spammer)
    view = asyncio.run(trust(net.url, spammer.id))
    assert view["record"]["errors"] >= 1 and view["record"]["valid"] == 0, view
    assert view["record"]["invalid"] >= 1, view  # the audits showed its errors false
    assert asyncio.run(counters(net.url)).get("invalid_result", 0) == view["record"]["errors"]


# ---- a copier ------------------------------------------------------------------------------------
def test_a_node_naming_another_nodes_uploaded_outputs_without_uploading_counts_nothing(net: Network) -> None:
    """Attack: outputs over the inline limit travel by HTTP and a Result carries only their digest;
    mallory's node reads an honest node's Result off the open broker and reports that digest for its
    own lease of the same task, without computing or uploading anything.
    Refused: a digest counts only for outputs uploaded under the reporting node's own lease, so the
    copy is an invalid result: it earns nothing and the task is decided by honest nodes."""
    net.start_coordinator("--max-inline-kb", "1")  # 100 rows x 4 float32 outputs = 1.6 KB: uploaded
    start_nodes(net, "alice", "bob")
    x = rows(400, seed=24)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray], Puppet, dict[str, str]]:
        async with api_for(net.url) as api, aiomqtt.Client(*BROKER) as conn, aiomqtt.Client(*BROKER) as sniff:
            owner = Identity.generate()
            assert (await api.register(owner, "mallory"))[0] == 201
            copier = Puppet(conn, api)
            assert (await api.certify(copier.identity, certificate(owner, copier.identity)))[0] == 200
            await copier.listen()
            await sniff.subscribe(f"{api.prefix}/result/+", qos=1)  # an open broker: everyone's results
            await copier.ask(2, owner="mallory")
            await until(lambda: _waiting(api, 3), "the copier and both honest nodes to wait for work")
            async with submitter(net.url) as c:
                job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=100, deadline=60)
                held = await copier.receive(2)
                assert all(a.inputs is None for a in held)  # inputs went by HTTP too
                uploaded = await _uploaded_digests(sniff, api.prefix, {a.task for a in held})
                copies = tuple(Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                                      output_digest=uploaded[a.task], outputs=None, elapsed=0.001) for a in held)
                await conn.publish(copier.topics.result(copier.id),
                                   copier.seal(Results(node=copier.id, runtime="puppet", items=copies)), qos=1)
                return await c.wait(job["job"], timeout=60), await c.outputs(job["job"]), copier, uploaded

    status, outputs, copier, uploaded = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"]["verified"] == 4
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    problems, entries, accepted = asyncio.run(ledger(net.url))
    assert problems == []
    # The copied digests were the right answers, accepted from the nodes that computed them...
    accepted_digests = {(a["task"], a["output_digest"]) for a in accepted}
    assert set(uploaded.items()) <= accepted_digests
    # ...and earned the copier nothing: its results were invalid.
    assert copier.id not in {a["node"] for a in accepted}
    assert net_credit(entries, copier.id) == 0
    view = asyncio.run(trust(net.url, copier.id))
    assert view["record"]["errors"] == 2 and view["record"]["valid"] == 0, view
    # Each copy was refused for what it was, and the audit of its task then showed it wrong.
    assert net.coordinator is not None
    refusals = [line for line in net.coordinator.log_text().splitlines()
                if f"node={copier.id}" in line and "neither inline nor uploaded under this node's lease" in line]
    assert len(refusals) == 2, net.coordinator.log_tail()
    assert view["record"]["invalid"] >= 1, view


async def _waiting(api: Api, count: int) -> bool:
    return bool((await api.health())["nodes_waiting"] == count)


async def _uploaded_digests(sniff: aiomqtt.Client, prefix: str, tasks: set[str]) -> dict[str, str]:
    """task -> output digest of the first honest Result seen for it whose outputs were uploaded."""
    found: dict[str, str] = {}
    async with asyncio.timeout(30):
        while not tasks <= found.keys():
            payload = (await anext(sniff.messages)).payload
            assert isinstance(payload, bytes | bytearray)
            try:
                message = open_envelope(bytes(payload), namespace=prefix).message
            except PeerError:
                continue
            if isinstance(message, Results):
                for item in message.items:
                    if item.task in tasks and item.error is None:
                        assert item.outputs is None  # over the inline limit: uploaded, only the digest travels
                        found.setdefault(item.task, item.output_digest)
    return found


# ---- two owners disagree -------------------------------------------------------------------------
def test_two_owners_that_disagree_with_no_third_owner_are_told_apart_by_an_audit(net: Network) -> None:
    """Attack: on a network of two owners, one returns wrong answers, so every task has two results
    that disagree and no third owner exists to outvote either: the task used to stay "running" for
    good (or go to whoever answered next).
    Refused: the coordinator breaks each tie with its own run of the task: the honest result is
    accepted, the liar's rejected and unpaid, and `sparecycles trust` says why. The job completes.
    (The liar is not blocked here, so that every task keeps its two owners: once it is, the network
    has one owner left, the case of the next test.)"""
    net.start_coordinator("--block-after", "1000")
    alice, mallory = start_nodes(net, "alice", "mallory:roll")
    x = rows(40, seed=25)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(net.url) as c:
            job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=8, deadline=60)
            return await c.wait(job["job"], timeout=90), await c.outputs(job["job"])

    status, outputs = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"]["verified"] == 5, status
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    problems, entries, accepted = asyncio.run(ledger(net.url))
    assert problems == []
    assert {a["owner"] for a in accepted} == {"alice"}
    assert_earned_nothing(entries, mallory)
    seen = asyncio.run(counters(net.url))
    assert seen.get("disagreement", 0) >= 1 and seen.get("audits_run", 0) >= 5, seen

    shown = cli("trust", mallory.id, "--coordinator", net.url)
    assert shown.returncode == 0, shown.stderr
    assert f"node {mallory.id} (owner mallory)" in shown.stdout
    assert "differ from the coordinator's own run" in shown.stdout, shown.stdout
    honest = json.loads(cli("trust", alice.id, "--coordinator", net.url, "--json").stdout)
    assert honest["owner"] == "alice" and not honest["blocked"] and honest["record"]["invalid"] == 0


def test_after_the_liar_of_a_two_owner_network_is_blocked_the_tasks_only_the_honest_owner_ran_still_complete(
        net: Network) -> None:
    """Attack: on a network of two owners, mallory's node (a Puppet, so the order is certain) takes
    tasks and holds them until alice has answered every task of the job, then answers its own
    wrongly, three times in all: enough to be blocked (--block-after 3, the default).
    Expected: each tie is broken by an audit and mallory is blocked; the tasks that by then hold
    only alice's result are decided by the coordinator's own run (no other owner is left to ask),
    and the job completes with the right outputs."""
    net.start_coordinator()
    (alice,) = start_nodes(net, "alice")
    x = rows(48, seed=28)

    async def scenario() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with api_for(net.url) as api, aiomqtt.Client(*BROKER) as conn, aiomqtt.Client(*BROKER) as sniff:
            owner = Identity.generate()
            assert (await api.register(owner, "mallory"))[0] == 201
            liar = Puppet(conn, api)
            assert (await api.certify(liar.identity, certificate(owner, liar.identity)))[0] == 200
            await liar.listen()
            await sniff.subscribe(liar.topics.result(alice.id), qos=1)
            await liar.ask(2, owner="mallory")
            await until(lambda: _waiting(api, 2), "alice and mallory to wait for work")
            async with submitter(net.url) as c:
                job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=8, deadline=10)
                first = await liar.receive(2)
                await _answered(sniff, api.prefix, alice.id, count=6)  # alice has answered all six tasks
                await _lie(liar, first)
                await liar.ask(1, owner="mallory")
                await _lie(liar, await liar.receive(1))  # its third wrong result: mallory is blocked
                await until(lambda: _counter_at_least(api, "owner_blocked", 1), "mallory to be blocked")
                status = await c.wait(job["job"], timeout=30)
                return status, await c.outputs(job["job"])

    status, outputs = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"]["verified"] == 6
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))


async def _answered(sniff: aiomqtt.Client, prefix: str, node: str, *, count: int) -> None:
    """Wait until `node` has sent results for `count` distinct tasks (read off the open broker)."""
    tasks: set[str] = set()
    async with asyncio.timeout(30):
        while len(tasks) < count:
            payload = (await anext(sniff.messages)).payload
            assert isinstance(payload, bytes | bytearray)
            message = open_envelope(bytes(payload), namespace=prefix).message
            assert isinstance(message, Results) and message.node == node
            tasks |= {item.task for item in message.items if item.error is None}


async def _lie(puppet: Puppet, held: list[Assignment]) -> None:
    """Report plausible wrong outputs (each row's values shifted by one) for `held`, having first
    asked for no more work: a coordinator refills a standing request as results arrive, and leases
    the puppet never answered would hold their tasks up until the node counts as silent."""
    await puppet.ask(0, owner="mallory")
    items = []
    for a in held:
        honest = run_outputs(a).outputs
        assert honest is not None
        wrong = tensors_from_arrays({n: np.roll(t.to_array(), 1, axis=-1) for n, t in honest.items()})
        items.append(Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                            output_digest=digest_tensors(wrong), outputs=wrong, elapsed=0.001))
    puppet.held = [a for a in puppet.held if a not in held]
    await puppet.client.publish(puppet.topics.result(puppet.id),
                                puppet.seal(Results(node=puppet.id, runtime="puppet", items=tuple(items))), qos=1)


# ---- NaN -----------------------------------------------------------------------------------------
def test_a_model_that_outputs_nan_fails_its_job_with_a_reason_the_submitter_reads_in_status(net: Network) -> None:
    """Attack (by the model, or a mistake): every output is NaN. Two honest owners report the
    result invalid; a job used to show "running, 0 failed" forever, the reason only in the log.
    Refused: once the invalid results of two owners are confirmed by the coordinator's own run, each
    task fails with a reason naming NaN, the job fails, and `sparecycles status` shows why; the
    honest nodes are not held to blame and nobody is paid."""
    net.start_coordinator()
    alice, bob = start_nodes(net, "alice", "bob")
    model, x = models.nan_model(), np.random.default_rng(26).standard_normal((12, 4)).astype(np.float32)

    async def scenario() -> tuple[str, str, dict[str, Any]]:
        async with submitter(net.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=4, deadline=60)
            return str(job["job"]), str(job["read_token"]), await finished(c, str(job["job"]), within=60)

    job, token, status = asyncio.run(scenario())
    assert status["state"] == "failed" and status["tasks"]["failed"] == 3, status
    assert "NaN" in str(status["error"])
    assert len(status["failures"]) == 3 and all("NaN" in f["reason"] and "2 owners" in f["reason"]
                                                for f in status["failures"]), status["failures"]

    shown = cli("status", job, "--coordinator", net.url, "--token", token)
    assert shown.returncode == 0, shown.stderr
    assert f"job {job}: failed" in shown.stdout
    assert shown.stdout.count("NaN") >= 4, shown.stdout  # the job's error and each task's reason
    _, entries, _ = asyncio.run(ledger(net.url))
    assert not [e for e in entries if e["kind"] == "credit"]
    for node in (alice, bob):
        view = asyncio.run(trust(net.url, node.id))
        assert view["record"]["invalid"] == 0 and not view["blocked"], view


# ---- restart -------------------------------------------------------------------------------------
def test_a_coordinator_killed_with_leases_expired_and_a_node_offline_finishes_the_job_on_two_owners(
        net: Network) -> None:
    """Fault: the coordinator is SIGKILLed while bob's leases have expired (bob hung, then was
    killed: offline); both come back. A restart used to exclude every past lease's node and owner
    from its task for good, so on a network of two owners no task could be decided again.
    Expected: after the restart the job completes with the right outputs on alice and bob, every
    task paid once to each."""
    # Leases expire before silence counts; every task needs both owners (no solo runs on trusted
    # nodes, whose trust now survives the restart), which is what the restart must not prevent.
    # Nor may the restarted coordinator take bob for gone before his node is back (alice's node reran
    # every task first) and decide each task on her result and its own run (Engine.resume).
    flags = ("--lease-seconds", "2", "--silence-seconds", "30", "--no-adaptive")
    net.start_coordinator(*flags)
    _, bob = start_nodes(net, "alice", "bob")
    x = rows(48, seed=27)
    assert net.coordinator is not None

    async def submit_and_wait_for_expiry() -> str:
        async with submitter(net.url) as c:
            job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=4)
        async with api_for(net.url) as api:
            await until(lambda: _counter_at_least(api, "lease_expired", 1), "a lease of bob's to expire", 15)
            bob.proc.kill()  # SIGKILL: the broker publishes its Will, the coordinator takes it offline
            await until(lambda: _waiting(api, 1), "bob to be offline", 15)
            assert (await api.health())["jobs"] == {"running": 1}
            await api.balances()  # a ledger read commits every change so far: the kill loses none of them
        return str(job["job"])

    os.kill(bob.proc.pid, signal.SIGSTOP)  # bob takes leases and never answers them
    job = asyncio.run(submit_and_wait_for_expiry())
    net.coordinator.kill()
    with contextlib.closing(sqlite3.connect(f"file:{net.db}?mode=ro", uri=True)) as db:
        ended = dict(db.execute("SELECT state, count(*) FROM leases WHERE node = ? GROUP BY state", (bob.id,)))
        bobs_tasks = {t for (t,) in db.execute("SELECT DISTINCT task FROM leases WHERE node = ?", (bob.id,))}
        assert db.execute("SELECT count(*) FROM tasks WHERE state = 'verified'").fetchone() == (0,)
    assert ended.get("expired", 0) >= 1, ended
    net.start_coordinator(*flags)
    net.start_node("bob", index=1)  # the same key: the same node, whose leases expired

    async def finish() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        async with submitter(net.url) as c:
            return await c.wait(job, timeout=60), await c.outputs(job)

    status, outputs = asyncio.run(finish())
    assert status["state"] == "done" and status["tasks"]["verified"] == 12, status
    assert_outputs_match(outputs, local_run(MODEL, {"x": x}))
    problems, entries, _ = asyncio.run(ledger(net.url))
    assert problems == []
    credits = [e for e in entries if e["kind"] == "credit"]
    assert len(credits) == 24 and len({(e["task"], e["owner"]) for e in credits}) == 24
    # bob's node itself decided the tasks whose leases had expired or gone offline under it
    assert bobs_tasks <= {e["task"] for e in credits if e["node"] == bob.id}


async def _counter_at_least(api: Api, name: str, value: int) -> bool:
    return (await api.counters()).get(name, 0) >= value


# ---- a hoarder that keeps heartbeating -------------------------------------------------------------
def test_a_node_claiming_4096_slots_that_heartbeats_and_never_answers_holds_two_leases_and_delays_little(
        net: Network) -> None:
    """Attack: a node (a Puppet) asks for 4,096 slots, takes what it is given, never answers, and keeps
    sending its heartbeat work request every 2 s, so the silence check never fires: before, it held
    every task it could for a whole lease (60 s) each time, and the job waited.
    Refused: a new node holds at most 2 leases (coordinator/capacity.py); leases last 4x the task
    time measured so far (15 s floor), and a node that lets two lapse in a row gets nothing for a
    lease's time; its lapsed tasks go to the others first. The job completes within ~15 s of what it
    takes without the hoarder, and the hoarder earns nothing."""
    net.start_coordinator()
    start_nodes(net, "alice", "bob")
    x = rows(64, seed=31)

    async def scenario() -> tuple[dict[str, Any], float, int, dict[str, int]]:
        async with api_for(net.url) as api, aiomqtt.Client(*BROKER) as conn:
            owner = Identity.generate()
            assert (await api.register(owner, "harold"))[0] == 201
            hog = Puppet(conn, api)
            assert (await api.certify(hog.identity, certificate(owner, hog.identity)))[0] == 200
            await hog.listen()
            await hog.ask(4096, owner="harold")
            await until(lambda: _waiting(api, 3), "alice, bob and the hoarder to wait for work")

            async def heartbeat() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    await hog.ask(4096, owner="harold")

            beating = asyncio.create_task(heartbeat())
            try:
                async with submitter(net.url) as c:
                    t0 = time.monotonic()
                    job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=4)
                    held = await hog.receive(2, within=10)
                    status = await c.wait(job["job"], timeout=90)
                    seconds = time.monotonic() - t0
            finally:
                beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beating
            return status, seconds, len(held), await api.counters()

    status, seconds, held, seen = asyncio.run(scenario())
    assert status["state"] == "done" and status["tasks"]["verified"] == 16, status
    assert held == 2
    # two lapsed leases of 15 s at most, each retried elsewhere at once; no 60 s lease, no 4,096 tasks held
    assert seconds < 40, seconds
    problems, entries, _ = asyncio.run(ledger(net.url))
    assert problems == []
    assert not [e for e in entries if e["kind"] == "credit" and e.get("owner") == "harold"]
    assert seen.get("lease_expired", 0) >= 1
