"""Tensors on the wire: `{"dtype", "shape", "data"}`, little-endian C-order bytes. Never pickle.

Everything is checked before use: the dtype against an allowlist, and
`len(data) == prod(shape) * itemsize`, so a hostile peer cannot make us misread memory.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from .errors import BadTensor

# ONNX Runtime's common tensor element types; strings and objects are deliberately absent.
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool"}
)
MAX_ELEMENTS = 2**40  # no tensor is larger: far beyond any body or message limit
MAX_RANK = 8


@dataclass(frozen=True, slots=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise BadTensor(f"dtype {self.dtype!r} is not allowed")
        if len(self.shape) > MAX_RANK or any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise BadTensor(f"shape {self.shape!r} is invalid")
        # An empty tensor (a zero dimension) holds no bytes whatever its other dimensions claim, but
        # numpy refuses a shape whose product of non-zero dimensions overflows its index type.
        if math.prod(d for d in self.shape if d) > MAX_ELEMENTS:
            raise BadTensor(f"shape {self.shape!r} has more elements than any tensor may")
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if len(self.data) != expected:
            raise BadTensor(f"data has {len(self.data)} bytes, shape {self.shape} of {self.dtype} needs {expected}")

    @classmethod
    def from_array(cls, array: npt.ArrayLike) -> Tensor:
        arr = np.asarray(array)
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise BadTensor(f"dtype {arr.dtype.name!r} is not allowed")
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return cls(arr.dtype.name, tuple(int(d) for d in arr.shape), arr.tobytes())

    def to_array(self) -> npt.NDArray[Any]:
        """A read-only view of `data`: no copy, and no way to mutate what was received."""
        dt = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_wire(cls, raw: Any) -> Tensor:
        if not isinstance(raw, dict):
            raise BadTensor("tensor is not a map")
        dtype, shape, data = raw.get("dtype"), raw.get("shape"), raw.get("data")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(data, bytes):
            raise BadTensor("tensor needs dtype (str), shape (list) and data (bytes)")
        return cls(dtype, tuple(shape), data)


TensorMap = Mapping[str, Tensor]


def tensors_to_wire(tensors: TensorMap) -> dict[str, Any]:
    return {name: t.to_wire() for name, t in tensors.items()}


def tensors_from_wire(raw: Any) -> dict[str, Tensor]:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise BadTensor("tensor map is not a map of names to tensors")
    return {name: Tensor.from_wire(value) for name, value in raw.items()}


def encode_tensor_map(tensors: TensorMap) -> bytes:
    """The blob form of a tensor map (task inputs, large outputs): msgpack of `tensors_to_wire`."""
    return bytes(msgpack.packb(tensors_to_wire(tensors), use_bin_type=True))


def encoded_size_bound(tensors: TensorMap) -> int:
    """An upper bound of `len(encode_tensor_map(tensors))` from lengths alone, every msgpack
    header at its largest (5 bytes): a sender decides "inline or upload?" without encoding twice."""
    total = 5
    for name, t in tensors.items():
        # name; {"dtype", "shape", "data"} as a map header and three short keys (17 bytes);
        # the dtype string; the shape list (9 bytes an int at most); the data bytes
        total += 5 + len(name.encode()) + 5 + 17 + 5 + len(t.dtype) + 5 + 9 * len(t.shape) + 5 + len(t.data)
    return total


def decode_tensor_map(data: bytes) -> dict[str, Tensor]:
    """Inverse of `encode_tensor_map`; anything malformed is a `BadTensor` (a peer error)."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadTensor(f"not a msgpack tensor map: {exc}") from exc
    return tensors_from_wire(raw)


def digest_tensors(tensors: TensorMap) -> str:
    """A canonical sha256 over names, dtypes, shapes and bytes, in name order.

    Two nodes that computed bitwise-equal outputs get equal digests: the quorum's fast path.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        header = f"{name}\x00{t.dtype}\x00{','.join(map(str, t.shape))}\x00{len(t.data)}\x00"
        h.update(header.encode("utf-8"))
        h.update(t.data)
    return h.hexdigest()


def tensors_from_arrays(arrays: Mapping[str, npt.ArrayLike]) -> dict[str, Tensor]:
    return {name: Tensor.from_array(a) for name, a in arrays.items()}


def concat_rows(parts: Sequence[TensorMap]) -> dict[str, Tensor]:
    if not parts:
        return {}
    names = list(parts[0])
    return {n: Tensor.from_array(np.concatenate([p[n].to_array() for p in parts], axis=0)) for n in names}
