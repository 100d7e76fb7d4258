"""NPZ bytes <-> named arrays: how inputs and outputs travel over HTTP. Never pickled.

Written with `zipfile` and `numpy.lib.format` rather than `np.savez(file, **arrays)`: savez takes
names as keyword arguments, so a tensor called "file" or "allow_pickle" would collide with its own
parameters. The result is the standard NPZ that `np.load` reads. Names survive exactly, dots
included ("sum.out" is the member "sum.out.npy").

Reading trusts no size a sender wrote. Before one array byte is allocated, every member's npy
header is read and checked: the dtype against the tensor allowlist (objects would need pickle),
the shape's rank and element count, the size the header implies against the zip's declared size
and against `max_bytes` summed over members, and the expansion over the compressed bytes (a
63 KiB npz of zeros may not become 167 MiB in a database). zipfile itself holds each member to
its declared size and CRC while reading, so a member that lies about its size is damaged, not big.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import BadTensor, MalformedMessage, OversizedMessage
from .tensors import ALLOWED_DTYPES, MAX_RANK

_SUFFIX = ".npy"
# An npy header is a short dict literal; numpy's own default is 10,000 characters.
MAX_HEADER_BYTES = 10_000
# More members than any model has inputs or outputs: each costs a header parse.
MAX_MEMBERS = 1024
# Zip bomb bound: an npz may expand at most this many times its own size once it is past
# EXPANSION_FLOOR (small inputs compress well and are harmless).
MAX_EXPANSION = 100
EXPANSION_FLOOR = 4 * 1024 * 1024


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


def _check_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> None:
    """Refuse a member whose npy header names a dtype outside the allowlist, a bad shape, or a
    data size other than what the zip declares for the member; reads the header alone."""
    try:
        with zf.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(member, max_header_size=MAX_HEADER_BYTES)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(member, max_header_size=MAX_HEADER_BYTES)
            else:  # 3.0 exists only for structured dtypes with non-latin-1 field names: never allowed
                raise MalformedMessage(f"array {name!r} has npy format version {version}, only 1.0 and 2.0 are read")
            header_end = member.tell()
    # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as exc:
        raise MalformedMessage(f"array {name!r} has no readable npy header ({exc})") from exc
    if dtype.hasobject:
        raise BadTensor(f"array {name!r} has dtype object; reading it would need pickle, which is never done")
    if dtype.name not in ALLOWED_DTYPES or dtype.shape or dtype.names is not None:
        raise BadTensor(f"array {name!r}: dtype {str(dtype)[:40]!r} is not allowed "
                        f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))})")
    if len(shape) > MAX_RANK or any(d < 0 for d in shape):
        raise BadTensor(f"array {name!r} has shape {shape}: at most {MAX_RANK} non-negative dimensions")
    size = math.prod(shape) * dtype.itemsize
    if header_end + size != info.file_size:
        raise MalformedMessage(f"array {name!r} claims shape {shape} of {dtype.name} ({size} bytes) but its "
                               f"zip member holds {info.file_size - header_end}")


def from_npz(data: bytes, *, max_bytes: int = 1 << 31) -> dict[str, npt.NDArray[Any]]:
    """{name: array} from NPZ bytes; `MalformedMessage` for anything else (pickles included),
    `BadTensor` for a dtype outside the tensor allowlist, `OversizedMessage` if the members would
    expand past `max_bytes` or more than `MAX_EXPANSION` times the npz's own size. Every refusal
    happens before the arrays are allocated."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise MalformedMessage(f"not a .npz file ({exc})") from exc
    out: dict[str, npt.NDArray[Any]] = {}
    with zf:
        infos = [info for info in zf.infolist() if not info.is_dir()]
        if len(infos) > MAX_MEMBERS:
            raise MalformedMessage(f"npz has {len(infos)} arrays, at most {MAX_MEMBERS}")
        # The zip's own claims first: cheap, and they bound what the npy headers may claim.
        declared = sum(info.file_size for info in infos)
        if declared > max_bytes:
            raise OversizedMessage(f"npz expands to {declared} bytes, limit {max_bytes}", size=declared)
        if declared > EXPANSION_FLOOR and declared > MAX_EXPANSION * len(data):
            raise OversizedMessage(f"npz of {len(data)} bytes expands to {declared} bytes, more than "
                                   f"{MAX_EXPANSION}x: refused as a decompression bomb", size=declared)
        if sum(info.compress_size for info in infos) > len(data):
            raise MalformedMessage("not a .npz file: its members claim more compressed bytes than it holds")
        names: list[tuple[str, zipfile.ZipInfo]] = []
        seen: set[str] = set()
        for info in infos:
            if not info.filename.endswith(_SUFFIX):
                raise MalformedMessage(f"not a .npz file: member {info.filename!r} is not a .npy array")
            name = _check_name(info.filename[: -len(_SUFFIX)])
            if name in seen:
                raise MalformedMessage(f"array {name!r} appears twice")
            _check_header(zf, info, name)
            seen.add(name)
            names.append((name, info))
        for name, info in names:
            try:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
            except (ValueError, OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
                raise MalformedMessage(f"array {name!r} cannot be read without pickle or is damaged ({exc})") from exc
    return out
