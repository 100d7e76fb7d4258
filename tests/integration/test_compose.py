"""docker-compose.yml stays true to the CLI, and its layout runs for real as processes: our own
Mosquitto started from deploy/mosquitto.conf, a coordinator and the two nodes, with the compose
commands (host names mapped to 127.0.0.1, ports to free ones). The nodes run with the service's
config file (deploy/node.toml, mounted) and SPARECYCLES_NODE_* variables, read by node/config.py."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import yaml

from node.config import NodeConfig, load
from sparecycles.cli.processes import ProcessGroup, free_port
from tests import models
from tests.conftest import require_service
from tests.postgres import HOST, PORT, fresh_schema_sync

from .dynsec import running_dynsec_broker
from .network import submitter
from .test_end_to_end import assert_outputs_match, local_run

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NODES = [name for name in SERVICES if name.startswith("node")]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    pairs = (v.removesuffix(":ro").split(":", 1) for v in service["volumes"])
    return {target: source for source, target in pairs if source.startswith("./")}


def node_config(name: str) -> NodeConfig:
    """The settings a compose node runs with: its --config file as mounted, its environment."""
    service = SERVICES[name]
    config_file = ROOT / mounts(service)[flag(service["command"], "--config")]
    return load({"config": config_file}, {k: str(v) for k, v in service["environment"].items()})


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
        settings = node_config(name).settings
        target = urlsplit(settings.coordinator_url)
        assert (target.hostname, str(target.port)) == ("coordinator", http_port)
        assert settings.broker_url == flag(coordinator, "--broker")
        owners.add(settings.owner)
        # the key lives in the node's own named volume
        volume = next(v.split(":")[0] for v in SERVICES[name]["volumes"] if v.endswith(f":{settings.key_path.parent}"))
        keys.add(volume)
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


def test_compose_database_is_private_and_needs_a_password() -> None:
    # Attack: anyone who reaches the database edits the ledger in place. It publishes no port, its
    # password is required (no trust auth), and the coordinator takes it from the environment, so
    # it is neither in the file nor in the coordinator's command line (visible to every user in `ps`).
    postgres, coordinator = SERVICES["postgres"], SERVICES["coordinator"]
    db = urlsplit(flag(coordinator["command"], "--db"))
    assert db.scheme == "postgresql" and db.hostname == "postgres" and db.password is None
    assert "ports" not in postgres and "POSTGRES_HOST_AUTH_METHOD" not in postgres["environment"]
    assert postgres["environment"]["POSTGRES_PASSWORD"].startswith("${SPARECYCLES_DB_PASSWORD:?")
    assert coordinator["environment"]["PGPASSWORD"] == postgres["environment"]["POSTGRES_PASSWORD"]
    assert postgres["environment"]["POSTGRES_USER"] == db.username
    assert postgres["environment"]["POSTGRES_DB"] == db.path.lstrip("/")
    assert coordinator["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.integration
def test_the_compose_layout_runs_as_real_processes(tmp_path: Path, mosquitto_binary: str) -> None:
    """The compose file's services as processes: the access-controlled broker from
    deploy/mosquitto-dynsec.conf (initialised by deploy/broker-init.sh), the coordinator with the
    broker admin from the environment as compose passes it, and the two nodes, which get their
    broker logins from the coordinator."""
    http_port = free_port()
    require_service("PostgreSQL", HOST, PORT)
    with ExitStack() as stack, running_dynsec_broker(tmp_path, mosquitto=mosquitto_binary) as broker, \
            ProcessGroup(tmp_path / "logs") as group:

        mapping = {"mqtt://mosquitto:1883": f"mqtt://127.0.0.1:{broker.port}",
                   "http://coordinator:8080": f"http://127.0.0.1:{http_port}",
                   "0.0.0.0:8080": f"127.0.0.1:{http_port}",
                   # the compose database, as a schema of its own on the shared test server
                   flag(SERVICES["coordinator"]["command"], "--db"): stack.enter_context(fresh_schema_sync()),
                   "/data/coordinator.key": str(tmp_path / "coordinator.key")}

        def local(command: list[str]) -> list[str]:
            return [mapping.get(a, a) for a in command[2:]]

        admin = {"SPARECYCLES_BROKER_ADMIN": f"{broker.admin_user}:{broker.admin_password}"}
        assert set(admin) <= set(SERVICES["coordinator"]["environment"])
        group.start("coordinator", local(SERVICES["coordinator"]["command"]), ready=r"coordinator ready",
                    name="coordinator", env=admin)
        for name in NODES:
            service = SERVICES[name]
            files = {target: str(ROOT / source) for target, source in mounts(service).items()}
            env = {k: mapping.get(str(v), str(v)) for k, v in service["environment"].items()}
            # the key and cache paths of the file are the container's: here flags override them
            group.start("node", [files.get(a, a) for a in local(service["command"])]
                        + ["--key", str(tmp_path / name / "node.key"), "--cache-dir", str(tmp_path / name / "models")],
                        ready=r"node ready", name=name, env=env)
        model, x = models.classifier(), np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)

        async def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
            async with submitter(f"http://127.0.0.1:{http_port}") as c:
                job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=16)
                return await c.wait(job["job"], timeout=60), await c.outputs(job["job"])

        status, outputs = asyncio.run(run())
        assert all("broker_login=per-node" in p.log_text() for p in group.processes if p.name in NODES)
    assert status["state"] == "done"
    assert_outputs_match(outputs, local_run(model, {"x": x}))
