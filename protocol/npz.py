"""NPZ bytes <-> named arrays: how inputs and outputs travel over HTTP.

Names survive exactly (dots included). Loading never unpickles, and the members' declared sizes
are checked before anything is decompressed, so a zip bomb is an error rather than an allocation.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import MalformedMessage, OversizedMessage


def to_npz(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **{name: np.asarray(a) for name, a in arrays.items()})
    return buf.getvalue()


def from_npz(data: bytes, *, max_bytes: int = 1 << 31) -> dict[str, npt.NDArray[Any]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            total = sum(info.file_size for info in zf.infolist())
            if total > max_bytes:
                raise OversizedMessage(f"npz expands to {total} bytes, limit {max_bytes}", size=total)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise MalformedMessage(f"not a valid .npz file: {exc}") from exc
