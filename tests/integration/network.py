"""A whole network of real processes for integration tests: a coordinator on a temporary SQLite
database and node daemons, against a real broker. Every process is stopped by PID afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol.signing import Identity
from sparecycles import Client
from sparecycles.cli.accounts import ensure_account
from sparecycles.cli.processes import ManagedProcess, ProcessGroup, free_port

READY_TIMEOUT = 60.0
# One submitter for the whole run: each coordinator registers it on first use (open registration).
SUBMITTER = Identity.generate()


@contextlib.asynccontextmanager
async def submitter(url: str, identity: Identity = SUBMITTER, name: str = "tester") -> AsyncIterator[Client]:
    """A client signing as a registered account (registered here on first use)."""
    async with Client(url, identity=identity) as client:
        await ensure_account(client, name)
        yield client


@dataclass
class Network:
    group: ProcessGroup
    tmp: Path
    broker_url: str
    http_port: int = field(default_factory=free_port)
    coordinator: ManagedProcess | None = None
    nodes: list[ManagedProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def db(self) -> Path:
        return self.tmp / "coordinator.db"

    def start_coordinator(self, *extra: str, db_url: str | None = None) -> ManagedProcess:
        """On the temporary SQLite database, or on `db_url` (e.g. a PostgreSQL schema of the test's own)."""
        self.coordinator = self.group.start(
            "coordinator",
            ["--broker", self.broker_url, "--db", db_url or f"sqlite:///{self.db}",
             "--http", f"127.0.0.1:{self.http_port}", *extra],
            ready=r"coordinator ready", timeout=READY_TIMEOUT, name="coordinator")
        return self.coordinator

    def start_node(self, owner: str, *extra: str, slots: int = 1, index: int | None = None) -> ManagedProcess:
        i = len(self.nodes) if index is None else index
        proc = self.group.start(
            "node",
            ["--broker", self.broker_url, "--coordinator", self.url, "--key", str(self.tmp / f"node{i}.key"),
             "--owner", owner, "--slots", str(slots), "--cache-dir", str(self.tmp / f"cache{i}"), *extra],
            ready=r"node ready", timeout=READY_TIMEOUT, name=f"node{i}-{owner}")
        self.nodes.append(proc)
        return proc
