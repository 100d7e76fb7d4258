"""Start, watch and stop the project's own processes (broker, coordinator, nodes) by PID.

Shared by `sparecycles demo` and the integration tests: each process runs as
`python -m <module> ...` with stdout and stderr in one log file, announces itself with a ready
line, and is stopped by its PID (SIGTERM, then SIGKILL), never by name.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

# The repository root, so `python -m coordinator` imports this checkout whatever the cwd is.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
POLL_SECONDS = 0.05


class ProcessError(RuntimeError):
    """A managed process exited early or never printed its ready line; carries its log tail."""

    def __init__(self, name: str, problem: str, *, returncode: int | None, log_tail: str) -> None:
        self.name = name
        self.problem = problem
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(f"{name}: {problem}\n--- last lines of {name}'s log ---\n{log_tail}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the kernel's pick; racy only against other programs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The parent's environment plus `extra`, with this checkout first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{PROJECT_ROOT}{os.pathsep}{path}" if path else str(PROJECT_ROOT)
    # Ready lines must reach the log as soon as they are printed, not when a buffer fills.
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ManagedProcess:
    """One `python -m module args...` child whose output goes to `log_path`."""

    def __init__(
        self,
        name: str,
        module: str,
        args: Sequence[str],
        *,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """Runs `python -m module args`, or `command` as given (e.g. a real Mosquitto)."""
        self.name = name
        self.module = module
        self.args = list(args)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # A restarted process (same name) appends to its old log; ready lines are looked for
            # only after this offset, so a stale "ready" from the previous run never matches.
            self.log_offset = log.seek(0, os.SEEK_END)
            # The child holds its own copy of the descriptor; ours closes at once, so nothing leaks.
            # A new session keeps a terminal's Ctrl-C away from children: the group stops them in
            # order (nodes, then coordinator, then broker) instead of all at once.
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                list(command) if command is not None else [sys.executable, "-m", module, *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(env),
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self.popen.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """What this run wrote (not earlier runs under the same name)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _scan(self, regex: re.Pattern[str]) -> re.Match[str] | None:
        text = self.log_text()
        # Only whole lines: a half-written "ready mqtt://127.0.0.1:18" must not match early.
        return regex.search(text[: text.rfind("\n") + 1])

    def _failure(self, problem: str) -> ProcessError:
        return ProcessError(self.name, problem, returncode=self.popen.poll(), log_tail=self.log_tail())

    def _check(self, regex: re.Pattern[str], deadline: float, timeout: float) -> re.Match[str] | None:
        if match := self._scan(regex):
            return match
        if (code := self.popen.poll()) is not None:
            if match := self._scan(regex):  # it may have printed the line and then exited
                return match
            raise self._failure(f"exited with code {code} before printing /{regex.pattern}/")
        if time.monotonic() >= deadline:
            raise self._failure(f"no line matching /{regex.pattern}/ within {timeout:g} s")
        return None

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Block until the log has a line matching `pattern`; raise ProcessError on exit or timeout."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while (match := self._check(regex, deadline, timeout)) is None:
            time.sleep(POLL_SECONDS)
        return match

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        """Block until `host:port` accepts a TCP connection; ProcessError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=POLL_SECONDS):
                    return
            except OSError:
                pass
            if (code := self.popen.poll()) is not None:
                raise self._failure(f"exited with code {code} before listening on {host}:{port}")
            if time.monotonic() >= deadline:
                raise self._failure(f"not listening on {host}:{port} within {timeout:g} s")
            time.sleep(POLL_SECONDS)

    def send_term(self) -> None:
        # Popen.send_signal polls first, so a PID already reaped (and maybe reused) is never signalled.
        self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after `timeout` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        """SIGKILL by PID and reap."""
        self.popen.kill()
        return self.popen.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout` seconds for a clean exit, then SIGKILL. Returns the exit code."""
        self.send_term()
        code = self.wait(timeout)
        return self.kill() if code is None else code


class ProcessGroup:
    """Starts processes and, on exit, stops exactly those it started, newest first.

    ```
    with ProcessGroup(tmp / "logs") as group:
        broker = group.start("sparecycles.cli.broker", ["--listen", "127.0.0.1:0"], ready=r"broker ready (\\S+)")
    ```
    """

    def __init__(self, log_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.env = dict(env or {})
        self.processes: list[ManagedProcess] = []
        self._counts: dict[str, int] = {}

    def _name_for(self, module: str) -> str:
        base = module.rsplit(".", 1)[-1]
        self._counts[base] = self._counts.get(base, 0) + 1
        count = self._counts[base]
        return base if count == 1 else f"{base}-{count}"

    def start(
        self,
        module: str,
        args: Sequence[str],
        *,
        name: str | None = None,
        ready: str | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start `python -m module args`; with `ready`, wait for that line (ProcessError if not)."""
        name = name or self._name_for(module)
        proc = ManagedProcess(name, module, args, log_dir=self.log_dir, env={**self.env, **(env or {})})
        self.processes.append(proc)
        if ready is not None:
            proc.wait_for_line(ready, timeout)
        return proc

    def start_command(
        self,
        command: Sequence[str],
        *,
        name: str,
        ready: str | None = None,
        port: int | None = None,
        timeout: float = 60.0,
    ) -> ManagedProcess:
        """Start any program (not a Python module); ready when `ready` is logged and/or `port` listens."""
        proc = ManagedProcess(name, Path(command[0]).name, command[1:], log_dir=self.log_dir, env=self.env,
                              command=command)
        self.processes.append(proc)
        if ready is not None:
            proc.wait_for_line(ready, timeout)
        if port is not None:
            proc.wait_for_port(port, timeout=timeout)
        return proc

    def stop_all(self, timeout: float = 10.0) -> dict[str, int]:
        """Stop every process still running, newest first; returns exit codes by name.

        Consecutive processes of one module (the nodes) get SIGTERM together and are then waited
        for together, so N nodes draining take one timeout, not N.
        """
        codes: dict[str, int] = {}
        for _, batch in itertools.groupby(reversed(self.processes), key=lambda p: p.module):
            procs = list(batch)
            for proc in procs:
                if proc.running():
                    proc.send_term()
            deadline = time.monotonic() + timeout
            for proc in procs:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
                codes[proc.name] = proc.kill() if code is None else code
        return codes

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
