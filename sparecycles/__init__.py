"""sparecycles: verified ONNX inference on volunteer CPUs.

The one package users import. The SDK is at the top:

    from sparecycles import Client

    async with Client("http://127.0.0.1:8080") as c:
        model = await c.ensure_model(onnx_bytes)
        job = await c.submit(model, {"x": rows})
        await c.follow(job["job"], on_progress=print)  # the job's event stream
        outputs = await c.outputs(job["job"])

or, in one synchronous call, `sparecycles.run("model.onnx", {"x": rows})` (and `SyncClient` for
the step-by-step calls without asyncio).

The command line lives in `sparecycles.cli` (the `sparecycles` console script). The network's
core packages (`protocol`, `ledger`, `coordinator`, `node`) import nothing from here.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    AuthenticationFailed,
    BadNpz,
    CoordinatorUnavailable,
    InsufficientCredit,
    JobFailed,
    RateLimited,
    RequestRejected,
    SparecyclesError,
    WaitTimeout,
)
from .identity import config_dir, load_or_create_key
from .npz import from_npz, to_npz
from .progress import ProgressReporter
from .sdk import Client
from .sync_client import SyncClient, run

try:
    __version__ = version("sparecycles")
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AuthenticationFailed",
    "BadNpz",
    "Client",
    "CoordinatorUnavailable",
    "InsufficientCredit",
    "JobFailed",
    "ProgressReporter",
    "RateLimited",
    "RequestRejected",
    "SparecyclesError",
    "SyncClient",
    "WaitTimeout",
    "__version__",
    "config_dir",
    "from_npz",
    "load_or_create_key",
    "run",
    "to_npz",
]
