"""One daemon per node key: an exclusive `flock` on `<key>.lock`, held for the daemon's life.

Two daemons with one key share one node id, so the broker, which allows one connection per client
id, kicks each off in turn (every ~100 ms, logged as "broker unreachable"), and the coordinator
sees one node holding twice the leases it asked for. The second daemon must refuse to start.

`flock` rather than a PID file: the kernel drops the lock when its holder dies however it dies
(SIGKILL, power loss), so a lock file left behind never blocks the next start, and no PID can be
mistaken for ours after reuse. The holder's PID is written into the file only to say who holds it.
The descriptor is not inherited by the run workers (Python opens files close-on-exec), so a
worker outliving the daemon cannot keep the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from .errors import NodeError

# `node status` probes the lock with a shared lock for a moment; a daemon starting at that instant
# must not take the probe for another daemon.
ACQUIRE_PATIENCE_SECONDS = 1.0


class AlreadyRunning(NodeError):
    """Another live process holds the lock of this key."""

    def __init__(self, key: Path, pid: int | None) -> None:
        self.key = key
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another sparecycles node ({who}) is already running with key {key}; "
                         "stop it first or use another --key")


def lock_path(key: Path) -> Path:
    return key.with_name(key.name + ".lock")


def read_pid(path: Path) -> int | None:
    """The PID a lock file names, or None if it names none (empty, unreadable, garbage)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class InstanceLock:
    """Held from `acquire()` until `release()` (or the process's death)."""

    def __init__(self, key: Path, fd: int) -> None:
        self.key = key
        self.path = lock_path(key)
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, key: Path, *, patience: float = ACQUIRE_PATIENCE_SECONDS) -> InstanceLock:
        """Take the lock of `key` (creating its directory, mode 0700, and the lock file), or raise
        `AlreadyRunning` naming the holder's PID."""
        key = key.expanduser()
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = lock_path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + patience
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if time.monotonic() >= deadline:
                        raise AlreadyRunning(key, read_pid(path)) from None
                    time.sleep(0.05)  # maybe a `node status` probe, gone in a moment
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(key, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no PID left behind to be mistaken for a holder
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def holder(key: Path) -> tuple[bool, int | None] | None:
    """Whether a daemon holds `key`'s lock right now, and the PID the file names: (held, pid).
    None when the lock file cannot be opened (absent: nobody ever ran with this key here; or
    unreadable: another user's daemon), and the caller must judge by PID alone.

    A shared lock taken and dropped at once: it cannot succeed while a daemon holds the exclusive
    one, and a daemon starting meanwhile waits it out (ACQUIRE_PATIENCE_SECONDS)."""
    path = lock_path(key.expanduser())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            return True, read_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, read_pid(path)
    finally:
        os.close(fd)
