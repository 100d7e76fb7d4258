"""A JSON job body -> its options and named input arrays, trusting nothing the body claims.

Pure: bytes in, a dict and arrays out, or `BadJob` / `OversizedMessage` with a one-line reason.
The HTTP layer runs it off the event loop for large bodies (json.loads stalls the loop about
70 ms per MiB) and maps `BadJob` to 400 and `OversizedMessage` to 413.

Everything that could make a small body cost a lot is checked before the thing it guards:
- nesting depth, on the raw bytes, before `json.loads` (whose C scanner recurses: 100,000 `[`
  would be a RecursionError, a 500);
- the dtype against the tensor allowlist before numpy sees it (`"U10000000"` with a few values
  is gigabytes once numpy builds it);
- the shape (a short list of non-negative integers) and the bytes it implies against the limit
  before any array exists;
- the body's size: JSON costs several times its size in Python objects, so large inputs go as npz.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.errors import OversizedMessage
from protocol.tensors import ALLOWED_DTYPES, MAX_RANK

from .jobs import BadJob

MAX_JSON_DEPTH = 64
# json.loads turns 1 MiB of numbers into ~5 MiB of Python objects, and numpy then copies them:
# past this, the npz route (`application/x-npz`) is the one to use.
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
MAX_INPUTS = 256
MAX_NAME_CHARS = 256

# A complete JSON string: brackets inside strings are text, not nesting. Written "unrolled"
# (no alternation per character) so it scans at memchr-like speed.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_CHUNK = 1 << 20
_ALLOWED = ", ".join(sorted(ALLOWED_DTYPES))


def json_depth(data: bytes) -> int:
    """The deepest bracket nesting in JSON text, strings ignored; linear time, no recursion.
    Unbalanced text gives some number: json.loads refuses it afterwards anyway."""
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    deepest = depth = 0
    # numpy in chunks: a Python loop over millions of brackets would be the stall we are avoiding
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        chunk = np.frombuffer(brackets, dtype=np.uint8, count=min(_DEPTH_CHUNK, len(brackets) - start),
                              offset=start)
        steps = np.where((chunk == ord("[")) | (chunk == ord("{")), np.int8(1), np.int8(-1))
        running = np.cumsum(steps, dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest


def parse_json_body(data: bytes, *, max_depth: int = MAX_JSON_DEPTH,
                    max_bytes: int = MAX_JSON_BODY_BYTES) -> dict[str, Any]:
    """A JSON object from a request body; `BadJob` if it is not one, nests deeper than
    `max_depth`, and `OversizedMessage` if it is longer than `max_bytes`."""
    if len(data) > max_bytes:
        raise OversizedMessage(f"JSON body of {len(data)} bytes, limit {max_bytes}: send large inputs as "
                               "application/x-npz", size=len(data))
    if json_depth(data) > max_depth:
        raise BadJob(f"JSON nested too deep (more than {max_depth} levels)")
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # ValueError: also ints past 4300 digits
        raise BadJob("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadJob("body must be a JSON object")
    return body


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if (not isinstance(raw, list) or len(raw) > MAX_RANK
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in raw)):
        raise BadJob(f"input {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers, "
                     f"got {json.dumps(raw)[:80]}")
    return tuple(raw)


def json_inputs(raw: Any, *, max_bytes: int) -> dict[str, npt.NDArray[Any]]:
    """{name: array} from a job's `"inputs"`: `{name: {"dtype", "shape", "data"}}`, `data` nested
    lists of numbers. The arrays together may hold at most `max_bytes`."""
    if not isinstance(raw, dict) or not raw:
        raise BadJob('"inputs" must map each input name to {"dtype", "shape", "data"}')
    if len(raw) > MAX_INPUTS:
        raise BadJob(f'"inputs" has {len(raw)} entries, at most {MAX_INPUTS}')
    out: dict[str, npt.NDArray[Any]] = {}
    total = 0
    for name, spec in raw.items():
        if not name or len(name) > MAX_NAME_CHARS or "\x00" in name:
            raise BadJob(f"input names must be 1..{MAX_NAME_CHARS} characters without NUL, got {name[:40]!r}")
        if not isinstance(spec, dict) or not {"dtype", "shape", "data"} <= spec.keys():
            raise BadJob(f'input {name!r} needs "dtype", "shape" and "data"')
        dtype_name = spec["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in ALLOWED_DTYPES:
            raise BadJob(f"input {name!r}: dtype {json.dumps(dtype_name)[:40]} is not allowed, allowed: {_ALLOWED}")
        dtype = np.dtype(dtype_name)
        shape = _shape(name, spec["shape"])
        count = math.prod(shape)
        total += count * dtype.itemsize
        if total > max_bytes:
            raise OversizedMessage(f"input {name!r}: shape {list(shape)} of {dtype_name} brings the inputs to "
                                   f"{total} bytes, limit {max_bytes}", size=total)
        data = spec["data"]
        if not isinstance(data, list | int | float):  # a str would be parsed as a number, a dict refused late
            raise BadJob(f"input {name!r}: data must be a (nested) list of numbers")
        try:
            arr = np.asarray(data, dtype=dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise BadJob(f"input {name!r} is not a {dtype_name} array: {str(exc)[:120]}") from None
        if arr.size != count or arr.ndim > MAX_RANK:
            raise BadJob(f"input {name!r}: data has {arr.size} values in shape {list(arr.shape)}, "
                         f"shape {list(shape)} needs {count}")
        out[name] = arr.reshape(shape)
    return out


def parse_json_job(data: bytes, *, max_bytes: int) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """(body, inputs) from a JSON job body: everything `post_job` needs to do off the event loop."""
    body = parse_json_body(data, max_bytes=min(max_bytes, MAX_JSON_BODY_BYTES))
    return body, json_inputs(body.get("inputs"), max_bytes=max_bytes)
