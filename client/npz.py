"""NPZ (a zip of `.npy` files, numpy's own format) to and from a dict of named arrays, never pickled.

Written with `zipfile` and `numpy.lib.format` rather than `np.savez(file, **arrays)`: savez takes
names as keyword arguments, so a tensor called "file" or "allow_pickle" would collide with its own
parameters. The result is the same standard NPZ that `np.load` reads. Names survive exactly,
dots included ("sum.out" is stored as the member "sum.out.npy").
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import BadNpz

_SUFFIX = ".npy"


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise BadNpz(f"array names must be non-empty strings, got {name!r}")
    if "\x00" in name:
        # zipfile cuts member names at the first NUL, so the name would not survive
        raise BadNpz(f"array name {name!r} contains a NUL character")
    return name


def to_npz(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    """Serialise `arrays` as NPZ bytes. Raises `BadNpz` for object arrays (they would need pickle)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for raw_name, value in arrays.items():
            name = _check_name(raw_name)
            arr = np.asarray(value)
            if arr.dtype.hasobject:
                raise BadNpz(f"array {name!r} has dtype object; only numeric and bool arrays can be sent")
            with zf.open(name + _SUFFIX, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)
    return buf.getvalue()


def from_npz(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """Parse NPZ bytes into {name: array}. Raises `BadNpz` for anything else, pickled arrays included."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadNpz(f"not a .npz file ({exc})") from exc
    out: dict[str, npt.NDArray[Any]] = {}
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(_SUFFIX):
                raise BadNpz(f"not a .npz file: member {info.filename!r} is not a .npy array")
            name = info.filename[: -len(_SUFFIX)]
            if name in out:
                raise BadNpz(f"array {name!r} appears twice")
            try:
                with zf.open(info) as member:
                    out[_check_name(name)] = np.lib.format.read_array(member, allow_pickle=False)
            except BadNpz:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise BadNpz(f"array {name!r} cannot be read without pickle or is damaged ({exc})") from exc
    return out
