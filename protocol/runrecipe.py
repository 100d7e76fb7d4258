"""How every run of a submitted model is set up: on nodes, in audits and in the upload probe.

Part of the protocol because verification depends on it: two honest runs compare bit for bit only
when their sessions are built alike (single-threaded, sequential, the job's pinned graph
optimisation level). onnxruntime is imported lazily, inside the sandboxed children that run models
(protocol/sandbox.py): the coordinator and the node daemon themselves never load it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

# The job's `opt_level` -> onnxruntime.GraphOptimizationLevel member name.
OPT_LEVEL_NAMES: Mapping[int, str] = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED",
                                      99: "ORT_ENABLE_ALL"}
PROVIDERS = ["CPUExecutionProvider"]


class UnknownOptLevel(ValueError):
    pass


def session_options(ort: Any, opt_level: int) -> Any:
    """Single-threaded, sequential, with the job's pinned graph optimisation level. `ort` is the
    onnxruntime module, passed in so that importing this module never loads the runtime."""
    name = OPT_LEVEL_NAMES.get(opt_level)
    if name is None:
        raise UnknownOptLevel(f"unknown graph optimisation level {opt_level} (known: {sorted(OPT_LEVEL_NAMES)})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, name)
    opts.log_severity_level = 3  # errors only: a warning per session would flood the log
    return opts


def sendable_output_names(session: Any) -> list[str]:
    """Names of the outputs that are numeric tensors, the only kind the protocol carries.

    Sequences, maps (e.g. skl2onnx's ZipMap probabilities) and string tensors are not requested,
    so ORT does not compute them; an empty list means the model cannot be served."""
    return [o.name for o in session.get_outputs() if o.type.startswith("tensor(") and o.type != "tensor(string)"]


def runtime_fingerprint() -> str:
    """What makes two nodes' outputs bitwise comparable: ORT version, ISA, Python. Read from the
    installed distribution, which is what the sandboxed children import."""
    return f"ort={metadata.version('onnxruntime')};isa={platform.machine()};py={platform.python_version()}"
