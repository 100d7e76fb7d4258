"""Shared fixtures: real services, checked. A missing Mosquitto or PostgreSQL skips a test on a
laptop but fails the run when CI=true (after dramatiq's check_redis)."""

from __future__ import annotations

import os
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
