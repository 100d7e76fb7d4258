"""A coordinator whose disk fills up mid-run (its SQLite database on a small tmpfs of the test's
own): requests get a 507 that says the storage is full and what to do, commits are retried, and
once space is freed every job completes, each result credited once, and the ledger verifies."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sparecycles.cli.processes import ProcessGroup
from sparecycles.errors import RequestRejected
from tests import models
from tests.conftest import IN_CI

from .network import Network, submitter
from .test_faults import assert_credited_once_per_result, ledger_consistent

pytestmark = pytest.mark.integration


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MB tmpfs: room for the schema, a model and a few jobs' inputs, not for their results."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if made.returncode != 0:
        if IN_CI:
            pytest.fail(f"CI runs as root and must be able to mount a tmpfs: {made.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_says_so_loses_nothing_and_the_network_carries_on_once_space_is_freed(
        small_disk: Path, mosquitto_url: str, tmp_path: Path) -> None:
    """Attack: a submitter fills the coordinator's disk (or it just fills). Nothing half-written:
    a failed commit is rolled back and kept for the next try, and credits come out exactly once."""
    with ProcessGroup(tmp_path / "logs") as group:
        net = Network(group=group, tmp=small_disk, broker_url=mosquitto_url)
        net.start_coordinator("--key", str(tmp_path / "coordinator.key"))
        for i, owner in enumerate(("alice", "bob")):
            net.start_node(owner, "--cache-dir", str(tmp_path / f"cache{i}"), "--key", str(tmp_path / f"node{i}.key"))
        model = models.classifier(features=8, classes=4)

        async def fill_then_free() -> tuple[list[str], list[RequestRejected]]:
            refused: list[RequestRejected] = []
            jobs: list[str] = []
            async with submitter(net.url) as c:
                digest = await c.ensure_model(model)
                for i in range(40):
                    x = np.random.default_rng(i).standard_normal((2000, 8)).astype(np.float32)
                    try:
                        jobs.append(str((await c.submit(digest, {"x": x}, task_size=50))["job"]))
                    except RequestRejected as exc:
                        refused.append(exc)
                        break
                assert refused, "the disk never filled: make it smaller"
                await asyncio.sleep(2.0)  # results keep arriving; every commit fails and is retried
                await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=64m", str(small_disk)],
                                        check=True)
                for job in jobs:
                    assert (await c.wait(job, timeout=180))["state"] == "done"
            return jobs, refused

        jobs, refused = asyncio.run(fill_then_free())
        assert jobs, "no job fitted on the disk at all"
        assert "507" in str(refused[0]) and "storage full" in str(refused[0]), refused[0]
        problems, _, credits = asyncio.run(ledger_consistent(net))
        assert problems == []
        assert_credited_once_per_result(credits, tasks=40 * len(jobs))
        log = (tmp_path / "logs" / "coordinator.log").read_text()
        assert "persisting a batch failed: storage full" in log and "Traceback" not in log
        verified = subprocess.run([sys.executable, "-m", "sparecycles", "ledger", "verify", "--coordinator", net.url,
                                   "--state-dir", str(tmp_path / "verifier")],
                                  capture_output=True, text=True, timeout=120, check=False, env=os.environ)
        assert verified.returncode == 0, verified.stdout + verified.stderr
