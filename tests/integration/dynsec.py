"""A real Mosquitto with the dynamic-security plugin, for tests: started on a free port in a tmp
dir from deploy/mosquitto-dynsec.conf, its plugin file written by deploy/broker-init.sh (so both
deploy files are exercised), stopped by its PID.

Use the fixture by importing it into a test module (`from .dynsec import dynsec_broker`), or the
context manager `running_dynsec_broker` where a test needs to control the start itself.
"""

from __future__ import annotations

import getpass
import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

from sparecycles.cli.processes import ManagedProcess, ProcessGroup, free_port
from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "deploy" / "mosquitto-dynsec.conf"
INIT = ROOT / "deploy" / "broker-init.sh"
# Where the container image keeps the plugin and its file (deploy/mosquitto-dynsec.conf).
IMAGE_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"
IMAGE_DATA = "/mosquitto/data/"
ADMIN_USER = "sc-admin"


class DynsecBroker(NamedTuple):
    host: str
    port: int
    admin_user: str
    admin_password: str
    process: ManagedProcess
    plugin_file: Path


def find_plugin() -> str | None:
    """Debian puts the plugin under its multiarch directory, the container image under /usr/lib."""
    candidates = [*sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")), IMAGE_PLUGIN,
                  "/usr/local/lib/mosquitto_dynamic_security.so"]
    return next((p for p in candidates if Path(p).exists()), None)


def local_config(template: str, *, port: int, plugin: str, state_dir: Path) -> str:
    """The deploy config, moved onto this machine: loopback and a free port, the local plugin,
    state in `state_dir`. `user` keeps the broker as the user running the tests: started as root,
    Mosquitto would otherwise switch to user `mosquitto`, who cannot enter pytest's tmp dirs."""
    replacements = {"listener 1883": f"listener {port} 127.0.0.1", IMAGE_PLUGIN: plugin,
                    IMAGE_DATA: f"{state_dir}/"}
    for old, new in replacements.items():
        if old not in template:
            raise AssertionError(f"{CONF} no longer contains {old!r}; update tests/integration/dynsec.py")
        template = template.replace(old, new)
    return template + f"\nuser {getpass.getuser()}\n"


def _require(thing: str | None, what: str) -> str:
    if thing:
        return thing
    if IN_CI:
        pytest.fail(f"{what} is missing: .ci/run installs it (apt-get install mosquitto mosquitto-clients)")
    pytest.skip(f"{what} is missing (apt-get install mosquitto mosquitto-clients); CI fails instead of skipping")


@contextmanager
def running_dynsec_broker(tmp: Path, *, mosquitto: str, admin_password: str = "admin-secret-for-tests"
                          ) -> Iterator[DynsecBroker]:
    plugin = _require(find_plugin(), "the Mosquitto dynamic-security plugin")
    _require(shutil.which("mosquitto_ctrl"), "mosquitto_ctrl")
    state = tmp / "dynsec-broker"
    state.mkdir(parents=True, exist_ok=True)
    plugin_file = state / "dynamic-security.json"
    subprocess.run(["sh", str(INIT), str(plugin_file)], check=True, capture_output=True, timeout=30,
                   env={**os.environ, "SPARECYCLES_BROKER_ADMIN": f"{ADMIN_USER}:{admin_password}"})
    port = free_port()
    conf = state / "mosquitto.conf"
    conf.write_text(local_config(CONF.read_text(), port=port, plugin=plugin, state_dir=state))
    # The group stops exactly the process it started (by PID), whatever the test did.
    with ProcessGroup(state / "logs") as group:
        proc = group.start_command([mosquitto, "-c", str(conf)], name="mosquitto-dynsec", port=port)
        yield DynsecBroker("127.0.0.1", port, ADMIN_USER, admin_password, proc, plugin_file)


@pytest.fixture
def dynsec_broker(tmp_path: Path, mosquitto_binary: str) -> Iterator[DynsecBroker]:
    """(host, port, admin user, admin password, process, plugin file) of a fresh broker."""
    with running_dynsec_broker(tmp_path, mosquitto=mosquitto_binary) as broker:
        yield broker
