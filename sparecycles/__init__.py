"""sparecycles: verified ONNX inference on volunteer CPUs.

The one package users import. The SDK is at the top:

    from sparecycles import Client

    async with Client("http://127.0.0.1:8080") as c:
        model = await c.ensure_model(onnx_bytes)
        job = await c.submit(model, {"x": rows})
        await c.wait(job["job"])
        outputs = await c.outputs(job["job"])

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
    "WaitTimeout",
    "__version__",
    "config_dir",
    "from_npz",
    "load_or_create_key",
    "to_npz",
]
