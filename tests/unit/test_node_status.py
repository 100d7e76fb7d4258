"""The daemon's status board (node/status.py), the judge behind `sparecycles node status`
(node/status_report.py) and the one-daemon-per-key lock (node/instance.py), with a controllable
clock and real files, locks and processes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from node import status_report
from node.instance import AlreadyRunning, InstanceLock, holder, lock_path
from node.settings import NodeSettings
from node.status import WAITING_AFTER, NodeState, StatusBoard, Watched, derive, status_path
from sparecycles.cli.processes import child_env

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def wall(self) -> float:
        return T0 + self.t

    def monotonic(self) -> float:
        return self.t


def fake_node(held: int = 0, started: int = 0) -> Any:
    """What the board reads of a Node: its id, held leases, started runs, counters, cache."""
    leases = {f"L{i}": None for i in range(held)}
    cache = SimpleNamespace(digests=lambda limit=1024: ("a" * 64, "b" * 64), total_bytes=2048)
    return SimpleNamespace(id="nodeid" * 4, held=leases, pipeline=SimpleNamespace(started=set(list(leases)[:started])),
                           counters=Counter(done=5, failed=1, assigned=7), cache=cache)


def board_for(tmp_path: Path, clock: Clock, **settings: Any) -> StatusBoard:
    s = NodeSettings(key_path=tmp_path / "node.key", owner="alice", slots=2, **settings)
    return StatusBoard(status_path(s.key_path), settings=s, wall=clock.wall, monotonic=clock.monotonic)


def state_of(board: StatusBoard) -> NodeState:
    return board.state  # a call, so that mypy does not pin the state an earlier assert saw


def read(board: StatusBoard) -> dict[str, Any]:
    assert board.path is not None
    doc: dict[str, Any] = json.loads(board.path.read_text())
    return doc


# ---- working or waiting ------------------------------------------------------------------------


def test_work_makes_a_node_working_at_once_and_waiting_only_after_a_spell_without_any() -> None:
    assert derive(busy=True, now=0.0, last_busy=-1e9, current=NodeState.WAITING) is NodeState.WORKING
    assert derive(busy=False, now=5.0, last_busy=0.0, current=NodeState.WORKING) is NodeState.WORKING
    assert derive(busy=False, now=WAITING_AFTER, last_busy=0.0, current=NodeState.WORKING) is NodeState.WAITING
    assert derive(busy=False, now=1.0, last_busy=0.0, current=NodeState.WAITING) is NodeState.WAITING


def test_the_board_follows_the_node_from_starting_to_working_to_waiting(tmp_path: Path) -> None:
    clock = Clock()
    board = board_for(tmp_path, clock)
    node = fake_node()
    board.attach(cast(Watched, node))
    assert state_of(board) is NodeState.STARTING

    board.connected()
    assert state_of(board) is NodeState.WAITING and read(board)["reason"] == "no work for this node"

    node.held.update({"L1": None, "L2": None})
    node.pipeline.started.update({"L1", "L2"})
    clock.t = 3.0
    board.refresh()
    doc = read(board)
    assert (doc["state"], doc["slots_busy"], doc["held"]) == ("working", 2, 2)
    assert doc["since"] == "2023-11-14T22:13:23+00:00"

    node.held.clear()
    clock.t = 4.0
    board.refresh()
    assert state_of(board) is NodeState.WORKING  # between two batches: no change
    clock.t = 4.0 + WAITING_AFTER
    board.refresh()
    assert state_of(board) is NodeState.WAITING


def test_conditions_hold_until_cleared_and_the_strongest_shows(tmp_path: Path) -> None:
    board = board_for(tmp_path, Clock())
    board.attach(cast(Watched, fake_node()))
    board.connected()

    board.set_state(NodeState.SUSPENDED, "other processes use 85 % CPU")
    board.set_state(NodeState.UNREACHABLE, "cannot reach broker at mqtt://h:1883: refused")
    assert (board.state, board.reason) == (NodeState.UNREACHABLE, "cannot reach broker at mqtt://h:1883: refused")

    board.connected()  # the broker is back; the machine is still busy
    assert (board.state, board.reason) == (NodeState.SUSPENDED, "other processes use 85 % CPU")

    board.clear(NodeState.SUSPENDED)
    assert state_of(board) is NodeState.WAITING
    with pytest.raises(ValueError, match="read from the node's work"):
        board.set_state(NodeState.WORKING)


def test_each_change_is_logged_once_and_a_lost_connection_is_disconnected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    board = board_for(tmp_path, Clock())
    board.attach(cast(Watched, fake_node()))
    caplog.set_level(logging.INFO, logger="node.status")
    board.connected()
    for errno in range(5):  # a broker retried every few seconds: one line, not one per retry
        board.set_state(NodeState.UNREACHABLE, f"cannot reach broker at mqtt://h:1883: [Errno {errno}]")

    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("node_state state=waiting was=starting")
    assert lines[1].startswith("disconnected state=unreachable was=waiting")
    assert caplog.records[1].levelno == logging.WARNING
    assert read(board)["reason"].endswith("[Errno 4]")  # the file has the latest reason


def test_the_document_is_world_readable_and_carries_no_broker_password(tmp_path: Path) -> None:
    # Attack: a local user reads the status file (mode 0644, so that anyone may run `node status`)
    # to learn the broker login in --broker mqtt://user:password@host. The document shows the
    # broker and coordinator without their user:password part.
    board = board_for(tmp_path, Clock(), broker_url="mqtt://nodeuser:s3cret@broker.example:1884",
                      coordinator_url="https://op:pw@coord.example/")
    board.attach(cast(Watched, fake_node(held=1, started=1)))
    board.close("stopped")

    assert board.path is not None
    text = board.path.read_text()
    assert "s3cret" not in text and "nodeuser" not in text and "pw@" not in text
    doc = json.loads(text)
    assert (doc["broker"], doc["coordinator"]) == ("mqtt://broker.example:1884", "https://coord.example/")
    assert board.path.stat().st_mode & 0o777 == 0o644
    assert doc["tasks"] == {"assigned": 7, "done": 5, "failed": 1, "released": 0}
    assert doc["models"] == {"count": 2, "bytes": 2048}
    assert (doc["state"], doc["pid"], doc["owner"]) == ("stopped", os.getpid(), "alice")
    assert [p.name for p in tmp_path.iterdir()] == ["node.key.status.json"]  # no temp file left


# ---- what `node status` says ----------------------------------------------------------------


def doc(state: str, reason: str = "", age: float = 1.0, since: float = 1.0) -> dict[str, Any]:
    def at(seconds_ago: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(T0 - seconds_ago))

    return {"state": state, "reason": reason, "since": at(max(age, since)), "updated_at": at(age), "pid": 4242,
            "slots": 2, "slots_busy": 2}


@pytest.mark.parametrize(
    ("document", "held", "running", "healthy", "code", "headline"),
    [
        (doc("working"), True, True, True, 0, "working: 2 of 2 slots busy"),
        (doc("waiting", "no work for this node"), True, True, True, 0, "waiting: no work for this node"),
        (doc("suspended", "other processes use 85 % CPU"), True, True, True, 0,
         "suspended: other processes use 85 % CPU"),
        (doc("unreachable", "cannot reach broker at mqtt://h:1883: refused"), True, True, False, 1,
         "cannot reach broker at mqtt://h:1883: refused"),
        (doc("starting", "contacting the coordinator at http://c", since=45), True, True, False, 1,
         "starting: contacting the coordinator at http://c for 45 s; is it running and reachable?"),
        (doc("working", age=60), True, True, False, 1, "not responding: pid 4242 runs but last updated its "
                                                        "status 60 s ago"),
        (doc("stopped", "stopped", age=120), False, False, False, 3, "not running (stopped 2 min ago)"),
        (doc("refused", "certificate expired"), False, False, False, 3, "not running: refused 1 s ago: "
                                                                        "certificate expired"),
        (doc("working"), False, False, False, 3, "not running (the daemon died 1 s ago, last working: 2 of 2 "
                                                 "slots busy)"),
        (None, False, False, False, 3, "not running (no daemon for key /k/node.key)"),
        (None, True, True, False, 1, "running, but it has written no status yet"),
    ],
)
def test_status_judges_running_health_and_exit_code(document: dict[str, Any] | None, held: bool, running: bool,
                                                    healthy: bool, code: int, headline: str) -> None:
    verdict = status_report.judge(document, held=held, pid_alive=None, key=Path("/k/node.key"), now=T0)

    assert (verdict.running, verdict.healthy, verdict.code, verdict.headline) == (running, healthy, code, headline)


def test_without_the_lock_file_the_pid_decides() -> None:
    alive = status_report.judge(doc("waiting"), held=None, pid_alive=True, key=Path("k"), now=T0)
    dead = status_report.judge(doc("waiting"), held=None, pid_alive=False, key=Path("k"), now=T0)

    assert (alive.running, alive.code, dead.running, dead.code) == (True, 0, False, 3)


def test_status_command_reads_a_live_board_through_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "node.key"
    board = StatusBoard(status_path(key), settings=NodeSettings(key_path=key, owner="alice", slots=2,
                                                                coordinator_url="http://127.0.0.1:9"))
    board.attach(cast(Watched, fake_node(held=1, started=1)))
    board.connected()
    with InstanceLock.acquire(key):
        code = status_report.main(["--key", str(key), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["running"] and out["healthy"] and out["state"] == "working"
        assert out["tasks"]["accepted"] is None and out["credit"] is None  # the coordinator is not there
        assert out["coordinator_error"].startswith("cannot reach the coordinator at http://127.0.0.1:9")

        assert status_report.main(["--key", str(key), "--offline"]) == 0
        text = capsys.readouterr().out
        assert text.startswith("node nodeidnodeid… (owner alice) — working: 1 of 2 slots busy\n")
        assert "models       2 cached, 2.0 kB" in text

    assert status_report.main(["--key", str(key), "--offline"]) == 3
    assert capsys.readouterr().out.startswith("node nodeidnodeid… (owner alice) — not running (the daemon died")


# ---- one daemon per key ----------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from node.instance import InstanceLock
lock = InstanceLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_daemon_with_the_same_key_refuses_and_the_first_keeps_running(tmp_path: Path) -> None:
    # Attack (or accident): start a second daemon with a key already in use. Two daemons with one
    # key share a node id, and the broker would kick each off in turn. The second must refuse
    # before it connects to anything, naming the first; the first keeps its lock.
    key = tmp_path / "node.key"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(key)], stdout=subprocess.PIPE, text=True,
                             env=child_env())
    try:
        assert first.stdout is not None and first.stdout.readline() == "locked\n"
        second = subprocess.run([sys.executable, "-m", "node", "--key", str(key), "--coordinator",
                                 "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60, env=child_env())

        assert second.returncode == 2
        assert second.stderr.strip() == (f"sparecycles node: another sparecycles node (pid {first.pid}) is already "
                                         f"running with key {key}; stop it first or use another --key")
        assert first.poll() is None
        assert holder(key) == (True, first.pid)
        with pytest.raises(AlreadyRunning) as caught:
            InstanceLock.acquire(key, patience=0.1)
        assert caught.value.pid == first.pid
    finally:
        first.kill()
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
    assert holder(key) == (False, first.pid)  # the kernel dropped the lock; the file still names it


def test_a_lock_file_left_by_a_dead_daemon_is_taken_over(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    lock_path(key).write_text("999999\n")  # a daemon killed with SIGKILL leaves its PID behind

    with InstanceLock.acquire(key):
        assert lock_path(key).read_text() == f"{os.getpid()}\n"
        assert holder(key) == (True, os.getpid())
    assert lock_path(key).read_text() == ""  # released: no PID left to mislead
    assert holder(key) == (False, None)


def test_a_status_probe_does_not_make_a_starting_daemon_refuse(tmp_path: Path) -> None:
    key = tmp_path / "node.key"
    import fcntl
    import threading

    lock_path(key).touch()
    fd = os.open(lock_path(key), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # `node status` probing at this very moment
    threading.Timer(0.2, lambda: os.close(fd)).start()

    with InstanceLock.acquire(key, patience=2.0):
        assert holder(key) == (True, os.getpid())
