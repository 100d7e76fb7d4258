"""`sparecycles node status` against real daemons: a coordinator and nodes on the real Mosquitto,
status asked through the real console entry point (`python -m sparecycles node status`), daemons
stopped by PID."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sparecycles.cli.processes import ManagedProcess, child_env, free_port
from tests import models

from .network import READY_TIMEOUT, Network, submitter

pytestmark = pytest.mark.integration

# INFO lines a quiet node may write: its state changes, joins, refusals and errors. No line per
# task or per message (those are DEBUG).
QUIET_EVENTS = {"node_starting", "owner_registered", "registered", "connected", "node_state", "disconnected",
                "model_cached", "model_evicted", "signal", "drain_start", "node_stopped"}


def status(key: Path, *extra: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "sparecycles", "node", "status", "--key", str(key), *extra],
                          capture_output=True, text=True, timeout=60, env=child_env())
    assert done.stderr == ""
    return done.returncode, done.stdout


def status_json(key: Path) -> tuple[int, dict[str, Any]]:
    code, out = status(key, "--json")
    document: dict[str, Any] = json.loads(out)
    return code, document


def wait_status(key: Path, until: Callable[[dict[str, Any]], bool],
                timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        code, document = status_json(key)
        if until(document):
            return code, document
        assert time.monotonic() < deadline, f"status never matched; last: {document}"
        time.sleep(0.5)


def start_node(network: Network, owner: str, key: Path, *extra: str, name: str,
               ready: str | None = r"node ready") -> ManagedProcess:
    return network.group.start(
        "node", ["--broker", network.broker_url, "--coordinator", network.url, "--key", str(key), "--owner", owner,
                 "--slots", "1", "--cache-dir", str(key.parent / f"{name}-cache"), *extra],
        ready=ready, timeout=READY_TIMEOUT, name=name)


def info_events(log: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^\S+ \S+ INFO \S+ (\S+)", log, re.MULTILINE)}


def test_status_reports_a_working_node_then_its_credit_then_that_it_stopped(network: Network) -> None:
    alice_key = network.tmp / "alice" / "node.key"
    alice = start_node(network, "alice", alice_key, name="alice")
    start_node(network, "bob", network.tmp / "bob" / "node.key", name="bob")
    node_id = alice.wait_for_line(r"node ready id=(\S+)").group(1)

    code, document = status_json(alice_key)
    assert code == 0, document
    assert document["running"] and document["healthy"] and document["state"] in ("waiting", "working")
    assert (document["node"], document["owner"], document["pid"]) == (node_id, "alice", alice.pid)

    model, x = models.classifier(), np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)

    async def run_job() -> str:
        async with submitter(network.url) as client:
            job = await client.submit(await client.ensure_model(model), {"x": x}, task_size=16)
            done = await client.wait(job["job"], timeout=60)
            return str(done["state"])

    assert asyncio.run(run_job()) == "done"
    # the node counts what it did; the coordinator's ledger says what was accepted and earned
    code, document = wait_status(alice_key, lambda d: d["tasks"]["done"] == 4 and d["tasks"]["accepted"] == 4)
    assert code == 0 and document["healthy"]
    assert document["tasks"]["done"] == 4 and document["tasks"]["rejected"] == 0 and document["credit"] > 0
    assert document["models"]["count"] == 1 and document["models"]["bytes"] == len(model)

    code, text = status(alice_key)
    assert code == 0
    assert re.match(rf"node {node_id[:12]}… \(owner alice\) — (working: \d of 1 slots busy|waiting: no work for "
                    r"this node)\n", text), text
    assert f"4 accepted, 0 rejected, credit earned {document['credit']}" in text

    assert alice.terminate(timeout=30) == 0
    code, document = status_json(alice_key)
    assert code == 3 and not document["running"] and not document["healthy"]
    assert document["state"] == "stopped" and document["summary"].startswith("not running (stopped")
    # quiet at INFO: no line per task or message
    assert info_events(alice.log_text()) <= QUIET_EVENTS, alice.log_text()


def test_status_says_a_node_cannot_reach_its_broker(network: Network) -> None:
    key = network.tmp / "lost" / "node.key"
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nobody listens there
    node = start_node(network, "carol", key, "--broker", dead, name="lost", ready=None)

    code, document = wait_status(key, lambda d: d.get("state") == "unreachable")

    assert code == 1 and document["running"] and not document["healthy"]
    assert document["summary"].startswith(f"cannot reach broker at {dead}: ")
    code, text = status(key, "--offline")
    assert code == 1 and f"— cannot reach broker at {dead}" in text.splitlines()[0]
    assert node.running()
    # one warning for the change of state, not one per retry
    assert node.log_text().count("state=unreachable") == 1


def test_a_second_node_with_the_same_key_refuses_to_start(network: Network) -> None:
    # Two daemons with one key would share a node id and kick each other off the broker: the
    # second must refuse, naming the first, and the first must keep working.
    key = network.tmp / "dup" / "node.key"
    first = start_node(network, "dave", key, name="first")

    second = start_node(network, "dave", key, name="second", ready=None)
    assert second.wait(timeout=30) == 2
    assert (f"another sparecycles node (pid {first.pid}) is already running with key {key}; stop it first or use "
            "another --key") in second.log_text()
    assert first.running()
    code, document = status_json(key)
    assert code == 0 and document["pid"] == first.pid and document["healthy"]


def test_status_says_why_the_coordinator_refused_a_node(network: Network) -> None:
    key = network.tmp / "refused" / "node.key"
    cert = network.tmp / "refused" / "node.cert"
    cert.parent.mkdir(parents=True)
    cert.write_text("not a certificate\n")
    node = start_node(network, "erin", key, "--cert", str(cert), name="refused", ready=None)

    assert node.wait(timeout=60) == 1
    code, document = status_json(key)
    assert code == 3 and not document["running"] and document["state"] == "refused"
    assert document["summary"].startswith("not running: refused ")
    assert f"{cert} is not a node certificate" in document["reason"]
    assert "node_refused" in node.log_text()
