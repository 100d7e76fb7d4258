"""Shared fixtures: real services, checked. A missing Mosquitto or PostgreSQL skips a test on a
laptop but fails the run when CI=true (after dramatiq's check_redis)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every node the tests start shares 2 cores with a coordinator, a broker and other nodes: to a node
# that computes only while the machine is spare (its default) they are "other processes" and would
# keep it suspended. The tests of that behaviour turn it back on with --idle-only true.
os.environ.setdefault("SPARECYCLES_NODE_IDLE_ONLY", "false")


def service_reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if service_reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}: CI must run against the real service")
    pytest.skip(f"{message}; start it to run this test (CI fails instead of skipping)")


@pytest.fixture
def mosquitto_url() -> str:
    require_service("Mosquitto", "127.0.0.1", 1883)
    return "mqtt://127.0.0.1:1883"


@pytest.fixture
def mosquitto_binary() -> str:
    """The mosquitto executable, for tests that run a broker of their own (to kill or reconfigure
    it: the shared one is never touched)."""
    import shutil
    from pathlib import Path

    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found:
        return found
    if IN_CI:
        pytest.fail("mosquitto is not installed: .ci/run installs it with apt-get install mosquitto")
    pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI fails instead of skipping")


@pytest.fixture(autouse=True, scope="session")
def private_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The CLI keeps the user's account key in a config directory; tests (and the CLI processes
    they start, which inherit the environment) use a private one, never the real home's."""
    path = tmp_path_factory.mktemp("sparecycles-config")
    before = os.environ.get("SPARECYCLES_CONFIG_DIR")
    os.environ["SPARECYCLES_CONFIG_DIR"] = str(path)
    yield path
    if before is None:
        os.environ.pop("SPARECYCLES_CONFIG_DIR", None)
    else:
        os.environ["SPARECYCLES_CONFIG_DIR"] = before
