"""docker-compose.yml stays true to the CLI, and its layout runs for real as processes: our own
Mosquitto started from deploy/mosquitto.conf, a coordinator and the two nodes, with the compose
commands (host names mapped to 127.0.0.1, ports to free ones)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from sparecycles.cli.processes import ProcessGroup, free_port
from tests import models

from .dynsec import running_dynsec_broker
from .network import submitter
from .test_end_to_end import assert_outputs_match, local_run

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NODES = [name for name in SERVICES if name.startswith("node")]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_sparecycles_command_in_compose_parses_with_the_real_cli() -> None:
    from coordinator.__main__ import build_parser as coordinator_parser
    from node.__main__ import build_parser as node_parser
    from sparecycles.cli.main import build_parser

    for name in ("coordinator", *NODES):
        command = SERVICES[name]["command"]
        assert command[0] == "sparecycles"
        build_parser().parse_args(command[1:])  # argparse exits (SystemExit) on anything unknown
        sub = {"coordinator": coordinator_parser, "node": node_parser}[command[1]]
        sub().parse_args(command[2:])


def test_compose_ports_and_addresses_line_up() -> None:
    coordinator = SERVICES["coordinator"]["command"]
    http_port = flag(coordinator, "--http").rsplit(":", 1)[1]
    assert f"{http_port}:{http_port}" in SERVICES["coordinator"]["ports"]
    broker = urlsplit(flag(coordinator, "--broker"))
    assert broker.hostname in SERVICES and f"{broker.port}:{broker.port}" in SERVICES["mosquitto"]["ports"]
    owners, keys = set(), set()
    for name in NODES:
        command = SERVICES[name]["command"]
        target = urlsplit(flag(command, "--coordinator"))
        assert (target.hostname, str(target.port)) == ("coordinator", http_port)
        assert flag(command, "--broker") == flag(coordinator, "--broker")
        owners.add(flag(command, "--owner"))
        keys.add(tuple(SERVICES[name]["volumes"]))
    assert len(owners) == len(NODES) >= 2, "k=2 needs nodes of at least two distinct owners"
    assert len(keys) == len(NODES), "each node needs its own key volume"


def test_compose_broker_is_access_controlled_and_initialised_first() -> None:
    """The compose broker runs deploy/mosquitto-dynsec.conf (no anonymous clients, the plugin),
    after mosquitto-init wrote the plugin's file into the volume the broker reads it from.
    tests/integration/test_broker_acl.py runs the same two deploy files for real."""
    broker, init = SERVICES["mosquitto"], SERVICES["mosquitto-init"]
    mounts = {target.removesuffix(":ro"): source for source, target in
              (v.split(":", 1) for v in broker["volumes"])}
    conf = (ROOT / mounts["/mosquitto/config/mosquitto.conf"]).read_text()
    settings = dict(line.split(None, 1) for line in conf.splitlines() if line and not line.startswith("#"))
    assert settings["allow_anonymous"] == "false" and settings["plugin"].endswith("mosquitto_dynamic_security.so")
    plugin_file = Path(settings["plugin_opt_config_file"])
    assert init["command"][-1] == str(plugin_file)
    # init writes the file into the same volume the broker reads it from
    assert f"{mounts[str(plugin_file.parent)]}:{plugin_file.parent}" in init["volumes"]
    script = next(v for v in init["volumes"] if v.endswith(f":{init['command'][1]}:ro"))
    assert (ROOT / script.split(":")[0]).is_file()
    assert broker["depends_on"]["mosquitto-init"]["condition"] == "service_completed_successfully"
    assert "SPARECYCLES_BROKER_ADMIN" in init["environment"]
    assert "SPARECYCLES_BROKER_ADMIN" in SERVICES["coordinator"]["environment"]


@pytest.mark.integration
def test_the_compose_layout_runs_as_real_processes(tmp_path: Path, mosquitto_binary: str) -> None:
    """The compose file's services as processes: the access-controlled broker from
    deploy/mosquitto-dynsec.conf (initialised by deploy/broker-init.sh), the coordinator with the
    broker admin from the environment as compose passes it, and the two nodes, which get their
    broker logins from the coordinator."""
    http_port = free_port()
    with running_dynsec_broker(tmp_path, mosquitto=mosquitto_binary) as broker, \
            ProcessGroup(tmp_path / "logs") as group:

        def local(command: list[str]) -> list[str]:
            args = command[2:]
            mapping = {"mqtt://mosquitto:1883": f"mqtt://127.0.0.1:{broker.port}",
                       "http://coordinator:8080": f"http://127.0.0.1:{http_port}",
                       "0.0.0.0:8080": f"127.0.0.1:{http_port}",
                       "sqlite:////data/coordinator.db": f"sqlite:///{tmp_path}/coordinator.db",
                       "/keys/node.key": str(tmp_path / f"{command[command.index('--owner') + 1]}.key")
                       if "--owner" in command else "/keys/node.key"}
            return [mapping.get(a, a) for a in args]

        admin = {"SPARECYCLES_BROKER_ADMIN": f"{broker.admin_user}:{broker.admin_password}"}
        assert set(admin) <= set(SERVICES["coordinator"]["environment"])
        group.start("coordinator", local(SERVICES["coordinator"]["command"]), ready=r"coordinator ready",
                    name="coordinator", env=admin)
        for name in NODES:
            group.start("node", [*local(SERVICES[name]["command"]), "--cache-dir", str(tmp_path / name)],
                        ready=r"node ready", name=name)
        model, x = models.classifier(), np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)

        async def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            async with submitter(f"http://127.0.0.1:{http_port}") as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=16)
                return await c.wait(job["job"], timeout=60), await c.outputs(job["job"])

        status, outputs = asyncio.run(run())
        assert all("broker_login=per-node" in p.log_text() for p in group.processes if p.name in NODES)
    assert status["state"] == "done"
    assert_outputs_match(outputs, local_run(model, {"x": x}))
