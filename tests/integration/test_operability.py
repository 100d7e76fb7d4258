"""What an operator meets first, with real processes: versions, `--db PATH`, a port already taken, a
broker that is missing at start, then killed under a running coordinator and started again, JSON
logs, and an install without the demo extra."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from coordinator.__main__ import build_parser, settings_from_args
from coordinator.sqlite_store import SQLiteStore
from coordinator.store_factory import open_store
from sparecycles import RequestRejected
from sparecycles.cli.processes import ProcessGroup, free_port
from tests import models

from .network import Network, submitter
from .test_large_and_broker import own_mosquitto

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def python(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=cwd or ROOT)


def test_coordinator_and_node_print_their_version() -> None:
    from sparecycles import __version__

    for module in ("coordinator", "node"):
        done = python("-m", module, "--version")
        assert done.returncode == 0, done.stderr
        assert __version__ in done.stdout and module in done.stdout


def test_db_takes_a_plain_file_path_as_well_as_a_url(tmp_path: Path) -> None:
    settings = settings_from_args(build_parser().parse_args(["--db", "state.db"]))
    assert settings.db_url == "sqlite:///state.db"
    assert settings_from_args(build_parser().parse_args(["--db", "memory"])).db_url == "memory"
    store = open_store(str(tmp_path / "plain.db"))
    assert isinstance(store, SQLiteStore)
    asyncio.run(store.close())


def test_a_port_already_in_use_is_one_line_and_exit_1(tmp_path: Path, mosquitto_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = python("-m", "coordinator", "--broker", mosquitto_url, "--db", str(tmp_path / "c.db"),
                      "--http", f"127.0.0.1:{port}", timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "--http" in errors[0], done.stderr


async def health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/health") as r:
        assert r.status == 200
        doc: dict[str, Any] = await r.json()
        return doc


async def until_health(url: str, status: str, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        doc = await health(url)
        if doc["status"] == status or time.monotonic() > deadline:
            return doc
        await asyncio.sleep(0.1)


def test_a_coordinator_without_its_broker_says_so_reports_degraded_and_refuses_jobs_until_it_is_back(
        tmp_path: Path, mosquitto_binary: str) -> None:
    """Attack/failure: jobs accepted while no node can be reached would wait unseen; the submitter is
    told (503) instead, and the operator sees it in one line, in /v1/health and in the JSON log."""
    port = free_port()
    with ProcessGroup(tmp_path / "logs", env={"SPARECYCLES_LOG_FORMAT": "json"}) as group:
        net = Network(group=group, tmp=tmp_path, broker_url=f"mqtt://127.0.0.1:{port}")
        t0 = time.monotonic()
        coordinator = net.start_coordinator()
        assert time.monotonic() - t0 < 20  # a refused connection is told at once, not after a long wait
        line = next(json.loads(text) for text in coordinator.log_text().splitlines()
                    if text.startswith("{") and "cannot reach the MQTT broker" in text)
        assert line["level"] == "WARNING" and f"127.0.0.1:{port}" in line["msg"] and "--broker" in line["msg"]
        model = models.classifier(features=4, classes=3)
        x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)

        async def scenario() -> None:
            down = await health(net.url)
            assert down["status"] == "degraded" and down["broker_connected"] is False
            async with submitter(net.url) as c:
                digest = await c.ensure_model(model)
                with pytest.raises(RequestRejected) as refused:
                    await c.submit(digest, {"x": x}, task_size=10)
                assert refused.value.status == 503 and "broker" in refused.value.message

                await asyncio.to_thread(own_mosquitto, group, tmp_path, port, "mosquitto", mosquitto_binary)
                up = await until_health(net.url, "ok")
                assert up["broker_connected"] is True, up
                assert (await c.submit(digest, {"x": x}, task_size=10))["tasks"] == 2

                next(p for p in group.processes if p.name == "mosquitto").kill()
                again = await until_health(net.url, "degraded")
                assert again["broker_connected"] is False, again
                with pytest.raises(RequestRejected) as refused_again:
                    await c.submit(digest, {"x": x}, task_size=10)
                assert refused_again.value.status == 503

                await asyncio.to_thread(own_mosquitto, group, tmp_path, port, "mosquitto-restarted", mosquitto_binary)
                assert (await until_health(net.url, "ok"))["broker_connected"] is True
                assert (await c.submit(digest, {"x": x}, task_size=10))["tasks"] == 2

        asyncio.run(scenario())
        lines = [t for t in coordinator.log_text().splitlines() if t.strip()]
        logged = [json.loads(t) for t in lines]  # every line, the ready line too: a collector parses them all
        ready = next(d for d in logged if d["msg"].startswith("coordinator ready"))
        assert ready["level"] == "INFO" and ready["id"] and ready["prefix"], ready
        created = [d for d in logged if d["msg"].startswith("job created")]
        assert len(created) == 2 and all(d["level"] == "INFO" and d["job"] and d["tasks"] == "2" for d in created)


BLOCK_DEMO_EXTRA = "import sys; sys.modules['sklearn'] = None; sys.modules['skl2onnx'] = None; "


def test_the_node_coordinator_and_sdk_import_without_the_demo_extra() -> None:
    """`pip install sparecycles` has no scikit-learn or skl2onnx: every installed module must import
    without them (the demo's workloads import them inside functions)."""
    code = BLOCK_DEMO_EXTRA + """
import importlib, pkgutil
for pkg in ("protocol", "ledger", "coordinator", "node", "sparecycles"):
    module = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(module.__path__, pkg + "."):
        if not info.name.endswith("__main__"):  # `python -m` entry points run when imported
            importlib.import_module(info.name)
assert "sklearn" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    done = python("-c", code, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_demo_without_its_extra_says_how_to_install_it_in_one_line() -> None:
    done = python("-c", BLOCK_DEMO_EXTRA + "from sparecycles.cli.main import main; sys.exit(main(['demo']))")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'sparecycles[demo]'" in lines[0], done.stderr
