"""The coordinator's knobs: one frozen dataclass, defaults that work on one machine."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse


@dataclass(frozen=True, kw_only=True, slots=True)
class CoordinatorSettings:
    broker_url: str = "mqtt://127.0.0.1:1883"
    db_url: str = "sqlite:///sparecycles.db"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    key_path: str | None = None  # default: beside the database, so a restart keeps its identity
    topic_prefix: str | None = None  # default: sc/v1/<first 12 chars of the coordinator id>
    replicas: int = 2
    lease_seconds: float = 60.0
    max_inline_bytes: int = 256 * 1024
    max_message_bytes: int = 8 * 1024 * 1024
    max_body_bytes: int = 512 * 1024 * 1024
    max_model_bytes: int = 256 * 1024 * 1024
    # A new model must load in onnxruntime within this address space (plus 4x its size) and time,
    # in a child process, before volunteers are asked to load it (coordinator/model_probe.py).
    model_probe_bytes: int = 1024 * 1024 * 1024
    model_probe_seconds: float = 60.0
    model_probes: int = 2  # probes at once; beyond it an upload gets 429 (no queue that grows)
    sweep_seconds: float = 0.25
    # Storage (coordinator/retention.py): a finished job's inputs, outputs and leases are deleted
    # this long after it finished (0: kept forever); its job, task, result and ledger rows stay.
    retention_seconds: float = 7 * 86400.0
    retention_sweep_seconds: float = 60.0  # how often expired jobs are looked for
    # An upload's limit when the model's output shapes do not give one (a symbolic non-batch axis).
    max_output_bytes: int = 64 * 1024 * 1024
    # Accounts and access (coordinator/accounts.py, membership.py).
    registration: str = "open"  # open | invite | closed
    starting_grant: int | None = None  # credit for each new account; default: 10**12 if open, else 0
    operator_keys: tuple[str, ...] = ()  # hex public keys allowed to manage accounts (besides ours)
    min_replicas: int | None = None  # lowest replicas a submitter may ask for; default min(2, replicas)
    request_rate: float = 200.0  # signed requests per second per account...
    request_burst: float = 800.0  # ...after a burst of this many
    max_open_jobs: int = 100  # running jobs per account
    max_stored_bytes: int = 10 * 1024**3  # job inputs and models per account
    broker_admin: str | None = None  # USER:PASSWORD of the broker's dynamic-security admin
    # Verification (coordinator/trust.py, capacity.py, audit.py).
    trusted_owners: tuple[str, ...] = ()  # accounts whose results the operator takes as ground truth
    trusted_after: int = 10  # consecutive audited-valid results before a node's results may stand alone
    min_audit_rate: float = 0.05  # a trusted node's results are audited at max(this, 1/streak)
    untrusted_audit_rate: float = 1.0  # agreement among untrusted owners is audited at this rate
    adaptive: bool = True  # trusted nodes run fresh tasks alone (one replica)
    block_after: int = 3  # results shown wrong before an owner is blocked
    silence_seconds: float = 10.0  # a node silent this long (it heartbeats every 2 s) loses its leases
    job_deadline: float = 3600.0  # default seconds for a job's tasks to be decided, or fail with a reason
    audit_workers: int = 1  # sandboxed processes running audits at once
    # Ledger (coordinator/ledger_notary.py): a new entry is under a signed checkpoint about this long
    # after its commit; an idle ledger signs nothing.
    checkpoint_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.registration not in ("open", "invite", "closed"):
            raise ValueError(f"--registration must be open, invite or closed, not {self.registration!r}")
        if self.replicas < 1 or (self.min_replicas is not None and self.min_replicas < 1):
            raise ValueError("replicas must be at least 1")
        if self.retention_seconds < 0:
            raise ValueError("--retention must be 0 (keep forever) or a positive duration")
        if self.retention_sweep_seconds <= 0 or self.max_output_bytes <= 0:
            raise ValueError("--retention-sweep-seconds and --max-output-mb must be positive")
        if not 0 < self.checkpoint_seconds <= 3600:
            raise ValueError(f"--checkpoint-seconds must be in (0, 3600], got {self.checkpoint_seconds}")

    @property
    def lowest_replicas(self) -> int:
        return self.min_replicas if self.min_replicas is not None else min(2, self.replicas)

    @property
    def broker_login(self) -> tuple[str | None, str | None]:
        """Username and password given in the broker URL (mqtt://USER:PASSWORD@HOST:PORT), if any."""
        u = urlparse(self.broker_url)
        return u.username, u.password

    @property
    def broker(self) -> tuple[str, int]:
        u = urlparse(self.broker_url)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise ValueError(f"--broker must look like mqtt://HOST:PORT, got {self.broker_url!r}")
        return u.hostname, u.port or 1883


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host:
        return value, default_port
    return host, int(port)
