"""NPZ bytes <-> named arrays: how inputs and outputs travel over HTTP. Never pickled.

Written with `zipfile` and `numpy.lib.format` rather than `np.savez(file, **arrays)`: savez takes
names as keyword arguments, so a tensor called "file" or "allow_pickle" would collide with its own
parameters. The result is the standard NPZ that `np.load` reads. Names survive exactly, dots
included ("sum.out" is the member "sum.out.npy"). Members' declared sizes are checked before
anything is read, so a zip bomb is an error rather than an allocation.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import BadTensor, MalformedMessage, OversizedMessage

_SUFFIX = ".npy"


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise MalformedMessage(f"array names must be non-empty strings, got {name!r}")
    if "\x00" in name:
        # zipfile cuts member names at the first NUL, so the name would not survive
        raise MalformedMessage(f"array name {name!r} contains a NUL character")
    return name


def to_npz(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    """NPZ bytes of `arrays`. Raises `BadTensor` for object arrays (they would need pickle)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for raw_name, value in arrays.items():
            name = _check_name(raw_name)
            arr = np.asarray(value)
            if arr.dtype.hasobject:
                raise BadTensor(f"array {name!r} has dtype object; only numeric and bool arrays can be sent")
            with zf.open(name + _SUFFIX, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
    return buf.getvalue()


def from_npz(data: bytes, *, max_bytes: int = 1 << 31) -> dict[str, npt.NDArray[Any]]:
    """{name: array} from NPZ bytes; `MalformedMessage` for anything else (pickles included),
    `OversizedMessage` if the members would expand past `max_bytes`."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise MalformedMessage(f"not a .npz file ({exc})") from exc
    out: dict[str, npt.NDArray[Any]] = {}
    with zf:
        total = sum(info.file_size for info in zf.infolist())
        if total > max_bytes:
            raise OversizedMessage(f"npz expands to {total} bytes, limit {max_bytes}", size=total)
        for info in zf.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(_SUFFIX):
                raise MalformedMessage(f"not a .npz file: member {info.filename!r} is not a .npy array")
            name = _check_name(info.filename[: -len(_SUFFIX)])
            if name in out:
                raise MalformedMessage(f"array {name!r} appears twice")
            try:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise MalformedMessage(f"array {name!r} cannot be read without pickle or is damaged ({exc})") from exc
    return out
