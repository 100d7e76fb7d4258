"""`sparecycles jobs`, `status` (why and ETA), `cancel`, `outputs` and `nodes` against a real
coordinator and real nodes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol.npz import from_npz, to_npz
from tests import models

from .network import Network, submitter
from .test_end_to_end import cli

pytestmark = pytest.mark.integration


def _submit(network: Network, rows: int) -> dict[str, object]:
    x = np.random.default_rng(2).standard_normal((rows, 8)).astype(np.float32)

    async def go() -> dict[str, object]:
        # the CLI's own key: the processes below sign with it (tests/conftest.py's private config dir)
        from sparecycles.identity import load_or_create_key

        async with submitter(network.url, identity=load_or_create_key(), name="cliuser") as c:
            return await c.submit(await c.ensure_model(models.classifier()), {"x": x}, task_size=8)

    return asyncio.run(go())


def test_status_says_why_a_job_waits_and_cancel_ends_it(network: Network) -> None:
    job = str(_submit(network, 32)["job"])
    url = ("--coordinator", network.url)

    status = cli("status", job, *url)
    assert status.returncode == 0, status.stderr
    assert "why       waiting: 0 of 2 required owners online" in status.stdout
    assert "eta       unknown" in status.stdout

    listed = cli("jobs", "--state", "running", "--json", *url)
    assert [j["job"] for j in json.loads(listed.stdout)["jobs"]] == [job]

    cancelled = cli("cancel", job, *url)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled 4 open tasks" in cancelled.stdout
    after = json.loads(cli("status", job, "--json", *url).stdout)
    assert after["state"] == "failed" and "cancelled by its submitter" in after["error"]
    again = cli("cancel", job, *url)  # nothing accepted twice
    assert again.returncode == 2 and "already failed" in again.stderr


def test_jobs_outputs_and_nodes_after_a_job_is_done(network: Network, tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    job = str(_submit(network, 24)["job"])
    url = ("--coordinator", network.url)
    followed = cli("status", job, "--follow", *url)
    assert followed.returncode == 0, followed.stderr
    assert "job " + job + ": done" in followed.stdout

    table = cli("jobs", *url)
    assert job in table.stdout and "done" in table.stdout and "3/3" in table.stdout

    out = tmp_path / "out.npz"
    got = cli("outputs", job, "-o", str(out), *url)
    assert got.returncode == 0, got.stderr
    assert from_npz(out.read_bytes())["probs"].shape == (24, 4)

    nodes = json.loads(cli("nodes", "--json", *url).stdout)["nodes"]
    assert {n["owner"] for n in nodes} == {"alice", "bob"}
    plain = cli("nodes", *url)
    assert "alice" in plain.stdout and "bob" in plain.stdout


def test_usage_errors_exit_2_with_one_line(network: Network, tmp_path: Path) -> None:
    bad = cli("jobs", "--limit", "0", "--coordinator", network.url)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--limit" in bad.stderr
    missing_dir = cli("outputs", "abc", "-o", str(tmp_path / "nope" / "o.npz"), "--coordinator", network.url)
    assert missing_dir.returncode == 2 and "does not exist" in missing_dir.stderr
    unknown = cli("outputs", "0123456789abcdef", "-o", str(tmp_path / "o.npz"), "--coordinator", network.url)
    assert unknown.returncode == 2 and unknown.stderr.startswith("sparecycles: the coordinator refused")


def test_ctrl_c_on_submit_asks_nothing_leaves_the_job_running_and_says_how_to_get_back_to_it(
        network: Network, tmp_path: Path) -> None:
    """No nodes, so the job waits; Ctrl-C (SIGINT) must neither hang on a question nor cancel the job
    (the submitter may only want their terminal back), and must say how to follow or cancel it."""
    x = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    (tmp_path / "m.onnx").write_bytes(models.classifier())
    (tmp_path / "in.npz").write_bytes(to_npz({"x": x}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparecycles", "submit", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"),
         "--task-size", "8", "-o", str(tmp_path / "out.npz"), "--coordinator", network.url],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        while not (first := proc.stderr.readline()).startswith("job "):  # the first progress line:
            assert first and len(seen) < 20, seen  # the job is on the coordinator
            seen.append(first)
        assert "0/2 tasks verified" in first, first
        job = first.split()[1].rstrip(":")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err, err
    assert f"job {job} keeps running" in err and f"sparecycles cancel {job}" in err \
        and f"sparecycles status {job} --follow" in err, err
    status = json.loads(cli("status", job, "--json", "--coordinator", network.url).stdout)
    assert status["state"] == "running", status  # interrupting the client did not cancel the job
    assert not (tmp_path / "out.npz").exists()
