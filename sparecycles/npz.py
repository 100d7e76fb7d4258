"""NPZ for the SDK: the protocol's codec (protocol.npz), its errors raised as `BadNpz`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from protocol import npz
from protocol.errors import ProtocolError

from .errors import BadNpz


def to_npz(arrays: Mapping[str, npt.ArrayLike]) -> bytes:
    """NPZ bytes of `arrays`; `BadNpz` for object arrays or names that cannot survive."""
    try:
        return npz.to_npz(arrays)
    except ProtocolError as exc:
        raise BadNpz(str(exc)) from exc


def from_npz(data: bytes) -> dict[str, npt.NDArray[Any]]:
    """{name: array} from NPZ bytes; `BadNpz` for anything else, pickled arrays included."""
    try:
        return npz.from_npz(data)
    except ProtocolError as exc:
        raise BadNpz(str(exc)) from exc
