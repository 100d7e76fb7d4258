"""What the coordinator keeps, and for how long. Pure: no I/O, no clock.

- **Uploads.** A node may upload, under a live lease, only the outputs that lease's task can
  produce: the model's numeric outputs (the only ones nodes send), of the model's dtypes, with the
  task's rows first, and no more bytes than those shapes encode to. The byte bound is decided from
  the model's metadata and the task's rows before the body is read.
- **Retention.** A finished job's inputs, outputs and leases go `retention_seconds` after it
  finished (or when its submitter deletes it). Its job, task and result rows stay: the ledger is
  checked against them (`ledger/verify.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from protocol.tensors import ALLOWED_DTYPES, Tensor

# msgpack headers beyond `encoded_size_bound`'s own reckoning (protocol/tensors.py): a margin for
# an encoder that picks wider headers than ours, never room for data.
ENVELOPE_SLACK = 256
DELETED = "deleted by its submitter"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class UploadRefused(ValueError):
    """An upload that is not what its lease expects. `status`: 400 (wrong names, dtypes or
    shapes) or 409 (the lease already has another upload)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OutputsGone(LookupError):
    """A finished job's outputs were deleted (expired, or by its submitter): HTTP 410."""


def expired_after(retention_seconds: float) -> str:
    """The reason recorded for a job that expired (the 410 says it)."""
    return f"expired after the retention of {retention_seconds:g} s"


def gone_message(job: str, reason: str) -> str:
    return f"outputs of job {job} {reason}: its inputs and outputs are deleted"


# ---- uploads ----------------------------------------------------------------------------------
def numeric_outputs(outputs: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """The model's outputs a node sends: numeric tensors (`protocol.runrecipe.sendable_output_names`).
    String tensors are never requested from ONNX Runtime, so never uploaded."""
    return {str(o["name"]): o for o in outputs if o.get("dtype") in ALLOWED_DTYPES}


def _known_rank(shape: Sequence[Any]) -> bool:
    # An output declared without a shape has no dims in the model (models.py gives []): its rank
    # is unknown, not 0.
    return len(shape) > 0


def output_bound(outputs: Sequence[Mapping[str, Any]], rows: int) -> int | None:
    """The most bytes `encode_tensor_map` of a task's outputs can take: the leading axis is the
    task's rows, every other axis the model's fixed size. None when some other axis is symbolic
    (or the rank is unknown): only the caller's global cap can bound it then."""
    total = 5 + ENVELOPE_SLACK
    for name, o in numeric_outputs(outputs).items():
        shape = list(o.get("shape") or [])
        if not _known_rank(shape):
            return None
        rest = shape[1:]
        if any(not isinstance(d, int) or isinstance(d, bool) or d <= 0 for d in rest):
            return None
        data = rows * math.prod(rest) * np.dtype(str(o["dtype"])).itemsize
        # as `protocol.tensors.encoded_size_bound`: name, map header and keys, dtype, shape, data
        total += 5 + len(name.encode()) + 5 + 17 + 5 + len(str(o["dtype"])) + 5 + 9 * len(shape) + 5 + data
    return total


def upload_limit(outputs: Sequence[Mapping[str, Any]], rows: int, *, fallback: int, ceiling: int) -> int:
    """The byte limit of an upload under a lease whose task has `rows` rows: the exact bound when
    the model's shapes give one, else `fallback` (the coordinator's global output cap); never past
    `ceiling` (its body limit)."""
    bound = output_bound(outputs, rows)
    return min(ceiling, fallback if bound is None else bound)


def check_upload(tensors: Mapping[str, Tensor], outputs: Sequence[Mapping[str, Any]], rows: int) -> str | None:
    """Why these decoded outputs are not what the task can produce, or None. One line."""
    expected = numeric_outputs(outputs)
    if set(tensors) != set(expected):
        return f"outputs {sorted(tensors)} are not the model's numeric outputs {sorted(expected)}"
    for name, t in sorted(tensors.items()):
        want = expected[name]
        if t.dtype != want["dtype"]:
            return f"output {name!r} has dtype {t.dtype}; the model's is {want['dtype']}"
        if not t.shape:
            return f"output {name!r} is a scalar; outputs have the task's rows first"
        if t.shape[0] != rows:
            return f"output {name!r} has {t.shape[0]} rows; the lease's task has {rows}"
        shape = list(want.get("shape") or [])
        if not _known_rank(shape):
            continue
        if len(t.shape) != len(shape):
            return f"output {name!r} has shape {list(t.shape)}; the model's is {shape}"
        for axis, (have, dim) in enumerate(zip(t.shape, shape, strict=True)):
            if axis > 0 and isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 and have != dim:
                return f"output {name!r} axis {axis} is {have}; the model's is {dim}"
    return None


# ---- retention --------------------------------------------------------------------------------
def expiry_cutoff(now_wall: float, retention_seconds: float) -> float | None:
    """Jobs finished at or before this wall-clock time have expired; None when retention is off
    (`retention_seconds` 0: keep everything)."""
    if retention_seconds <= 0:
        return None
    return now_wall - retention_seconds


def has_expired(finished_at: float | None, now_wall: float, retention_seconds: float) -> bool:
    """True for a finished job past its retention. A running job (no `finished_at`) never expires."""
    cutoff = expiry_cutoff(now_wall, retention_seconds)
    return cutoff is not None and finished_at is not None and finished_at <= cutoff


def parse_duration(text: str) -> float:
    """Seconds from `3600`, `90s`, `30m`, `12h` or `7d`; raises ValueError with what is accepted."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration: give seconds, or a number with s, m, h or d (e.g. 7d)")
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
