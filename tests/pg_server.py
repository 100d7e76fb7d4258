"""A PostgreSQL server of a test's own, in a temporary directory on a free port, from the installed
binaries (initdb, pg_ctl): for tests that stop, freeze or restart the database. The shared server
on 5432 is never touched. Everything runs as the `postgres` user when the tests run as root
(PostgreSQL refuses to run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from sparecycles.cli.processes import free_port

CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def bindir() -> Path | None:
    """Where initdb and pg_ctl are, if anywhere."""
    on_path = shutil.which("pg_ctl")
    dirs = [Path(d) for d in CANDIDATES] + ([Path(on_path).resolve().parent] if on_path else [])
    return next((d for d in dirs if (d / "initdb").exists() and (d / "pg_ctl").exists()), None)


@dataclass
class OwnPostgres:
    bin: Path
    data: Path
    port: int
    user: str | None  # run the binaries as this user (None: as ourselves)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.data / "log"), "-w", "start")

    def stop(self) -> None:
        """As a crash would: no checkpoint, connections dropped."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def processes(self) -> list[psutil.Process]:
        """This server's postmaster (by its pid file) and its children."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        postmaster = psutil.Process(pid)
        return [postmaster, *postmaster.children(recursive=True)]


@contextmanager
def own_postgres() -> Iterator[OwnPostgres]:
    """A fresh cluster, started; stopped and removed afterwards."""
    found = bindir()
    if found is None:
        raise FileNotFoundError("PostgreSQL's initdb and pg_ctl are not installed")
    user = "postgres" if os.geteuid() == 0 else None
    data = Path(tempfile.mkdtemp(prefix="sc-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    server = OwnPostgres(bin=found, data=data, port=free_port(), user=user)
    try:
        server._run("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        server.start()
        yield server
    finally:
        try:
            if (data / "postmaster.pid").exists():
                for p in server.processes():
                    p.resume()  # a frozen server cannot stop
                server.stop()
        finally:
            shutil.rmtree(data, ignore_errors=True)
