"""sparecycles client: an async SDK over the coordinator's HTTP API, NPZ helpers, progress display.

Imports only `protocol` and third-party packages, never `coordinator`, `node` or `ledger`.
"""

from .errors import (
    BadNpz,
    CoordinatorUnavailable,
    JobFailed,
    RequestRejected,
    SparecyclesError,
    WaitTimeout,
)
from .npz import from_npz, to_npz
from .progress import ProgressReporter
from .sdk import CoordinatorClient

__all__ = [
    "BadNpz",
    "CoordinatorClient",
    "CoordinatorUnavailable",
    "JobFailed",
    "ProgressReporter",
    "RequestRejected",
    "SparecyclesError",
    "WaitTimeout",
    "from_npz",
    "to_npz",
]
