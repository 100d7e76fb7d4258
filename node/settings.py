"""NodeSettings: every knob of the node daemon, with defaults that work on one machine."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MAX_OWNER = 128  # protocol.messages.MAX_NAME: the coordinator rejects longer owner names


def default_owner() -> str:
    """$USER, else the login name, else "anonymous" (a daemon may run without a login)."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "anonymous"


def default_slots() -> int:
    return os.cpu_count() or 1


def default_key_path() -> Path:
    return Path.home() / ".config" / "sparecycles" / "node.key"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sparecycles" / "models"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """`mqtt://HOST:PORT`, without the login: safe to log and to show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://[user[:password]@]HOST[:PORT]` → BrokerAddress (port 1883 by default)."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ValueError(f"broker URL {url!r} is not mqtt://HOST:PORT")
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise ValueError(f"broker URL {url!r} has an invalid port") from exc
    return BrokerAddress(parts.hostname, port, parts.username, parts.password)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeSettings:
    broker_url: str = "mqtt://127.0.0.1:1883"
    coordinator_url: str = "http://127.0.0.1:8080"
    key_path: Path = field(default_factory=default_key_path)
    owner: str = field(default_factory=default_owner)
    slots: int = field(default_factory=default_slots)
    cache_dir: Path = field(default_factory=default_cache_dir)
    cache_quota_bytes: int = 2048 * 1024 * 1024
    prefetch: int | None = None
    """Assignments held beyond `slots` (their model and inputs are fetched while others run).
    None means as many as `slots`."""
    heartbeat_seconds: float = 2.0
    receipts_seconds: float = 30.0
    """How often the node fetches and checks the receipts for its new credit (node/receipts.py)."""
    """A WorkRequest goes out at least this often, even when nothing changed."""
    drain_seconds: float = 30.0
    """On SIGTERM: how long running tasks may take to finish and their results to be sent."""
    max_inline_bytes: int = 256 * 1024
    """Used when /v1/info does not say; outputs larger than this go by HTTP."""
    max_message_bytes: int = 8 * 1024 * 1024
    """Used when /v1/info does not say; no MQTT envelope is sent or accepted above this."""
    max_blob_bytes: int = 1024 * 1024 * 1024
    """Largest input blob accepted over HTTP."""
    reconnect_min_seconds: float = 0.2
    reconnect_max_seconds: float = 10.0
    http_timeout_seconds: float = 60.0
    fetch_attempts: int = 3
    """Tries for a model or input download before the task is reported as failed."""
    sessions_per_slot: int = 4
    """ONNX Runtime sessions each slot's worker keeps warm (least recently used dropped first)."""
    run_memory_bytes: int = 1024 * 1024 * 1024
    """Memory one run may take in its worker (beyond the runtime's own and 4x the model): a model
    that asks for more is stopped and its task reported as failed."""
    max_run_seconds: float = 600.0
    """No run takes longer; within it, a model's limit follows its measured speed here."""
    worker_idle_seconds: float = 60.0
    """A slot's worker process stops after this long without work, giving its memory back."""
    idle_only: bool = True
    """Compute only while the machine is spare (the conditions below); false on a dedicated server."""
    max_other_cpu_percent: float = 25.0
    """Suspend when other processes use more than this share of the whole machine."""
    user_idle_minutes: float = 3.0
    """Suspend while the user typed or moved the mouse this recently (where the platform can tell:
    an X display with xprintidle; a headless server has no such condition). 0 turns it off."""
    run_on_battery: bool = False
    resume_after_seconds: float = 30.0
    """How long the machine must stay spare before the node resumes (hysteresis)."""
    cpu_cap_percent: float = 100.0
    """Share of each slot's core the runs may use, by pausing and continuing them (100: no cap)."""
    nice: int = 19
    """Scheduling niceness of the run workers: the machine's owner comes first."""
    owner_key_path: Path | None = None
    """The owner account's key, used to certify this node. None: `owner-<owner>.key` beside the node
    key, created (and registered as the account `owner`) if absent."""
    cert_path: Path | None = None
    """A certificate the owner made elsewhere (`sparecycles owner certify`): no owner key needed."""

    def __post_init__(self) -> None:
        parse_broker_url(self.broker_url)
        coord = urlsplit(self.coordinator_url)
        if coord.scheme not in ("http", "https") or not coord.hostname:
            raise ValueError(f"coordinator URL {self.coordinator_url!r} is not http://HOST:PORT")
        if not 1 <= len(self.owner) <= MAX_OWNER:
            raise ValueError(f"owner must be 1..{MAX_OWNER} characters")
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError("prefetch must not be negative")
        if self.cache_quota_bytes < 1:
            raise ValueError("cache quota must be positive")
        if self.heartbeat_seconds <= 0 or self.drain_seconds < 0:
            raise ValueError("heartbeat must be positive and drain not negative")
        if not 0 < self.reconnect_min_seconds <= self.reconnect_max_seconds:
            raise ValueError("reconnect backoff needs 0 < min <= max")
        if self.fetch_attempts < 1 or self.sessions_per_slot < 1:
            raise ValueError("fetch_attempts and sessions_per_slot must be at least 1")
        if self.run_memory_bytes < 1 << 20 or self.max_run_seconds <= 0 or self.worker_idle_seconds <= 0:
            raise ValueError("run memory must be at least 1 MiB, run and idle times positive")
        if not 0 < self.cpu_cap_percent <= 100 or not 0 < self.max_other_cpu_percent <= 100:
            raise ValueError("cpu_cap_percent and max_other_cpu_percent must be in (0, 100]")
        if self.user_idle_minutes < 0 or self.resume_after_seconds < 0:
            raise ValueError("user_idle_minutes and resume_after_seconds must not be negative")
        if not 0 <= self.nice <= 19:
            raise ValueError("nice must be 0..19")

    @property
    def owner_key(self) -> Path:
        return self.owner_key_path or self.key_path.parent / f"owner-{self.owner}.key"

    @property
    def receipts_dir(self) -> Path:
        """`<key>.receipts/`: the receipts for this key's credit, beside its status file."""
        return self.key_path.with_name(self.key_path.name + ".receipts")

    @property
    def capacity(self) -> int:
        """How many assignments the node holds at most: running plus queued."""
        return self.slots + (self.slots if self.prefetch is None else self.prefetch)

    @property
    def broker(self) -> BrokerAddress:
        return parse_broker_url(self.broker_url)

    @property
    def coordinator_base(self) -> str:
        return self.coordinator_url.rstrip("/")
