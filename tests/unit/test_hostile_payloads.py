"""Hostile job payloads (issue 9): npz files and JSON bodies whose sizes, dtypes, shapes or nesting
lie. Each is refused by the pure decoder with a `PeerError`/`BadJob` and a one-line reason, before
anything large is allocated (tracemalloc sees numpy's allocations).

Attack (every case here): a registered account - anyone, on an open coordinator - posts a small
job body built to make the coordinator allocate gigabytes, recurse until it crashes, store a
decompressed bomb, or answer 500. The corpus is shared with
tests/integration/test_hostile_payloads_http.py, which posts it to a real coordinator.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from coordinator.jobs import BadJob
from coordinator.json_inputs import MAX_JSON_BODY_BYTES, json_depth, parse_json_job
from protocol.errors import BadTensor, MalformedMessage, OversizedMessage, PeerError
from protocol.npz import from_npz, to_npz

LIMIT = 64 * 1024 * 1024  # the byte limit the cases are checked against (a coordinator's max body)
PEAK = 2 * 1024 * 1024  # what refusing one case may allocate at most


def npy(descr: Any, shape: tuple[int, ...], body: bytes = b"", *, version: tuple[int, int] = (1, 0)) -> bytes:
    """A raw .npy file whose header says whatever we like, followed by `body`."""
    header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}".encode("latin1")
    length_bytes = 2 if version == (1, 0) else 4
    pad = -(6 + 2 + length_bytes + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    length = struct.pack("<H" if length_bytes == 2 else "<I", len(header))
    return b"\x93NUMPY" + bytes(version) + length + header + body


def npz(members: dict[str, bytes], *, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def declare_size(data: bytes, size: int) -> bytes:
    """The npz with its (only) member's uncompressed size in the central directory replaced."""
    at = data.index(b"PK\x01\x02") + 24
    return data[:at] + struct.pack("<I", size) + data[at + 4:]


def patch_member(data: bytes, *, flags: int | None = None, method: int | None = None) -> bytes:
    """The npz with its (only) member's flag bits or compression method replaced, in both the
    local header and the central directory."""
    out = bytearray(data)
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = data.index(signature) + at
        if flags is not None:
            out[start:start + 2] = struct.pack("<H", flags)
        if method is not None:
            out[start + 2:start + 4] = struct.pack("<H", method)
    return bytes(out)


def bomb() -> bytes:
    """32 MiB of zeros in an npz of ~32 KiB (1000x)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(8 * 1024 * 1024, dtype=np.float32))
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    refusal: type[Exception]
    reason: str  # a substring of the one-line reason
    status: int  # what the HTTP API answers


VALID_NPY = np.zeros((2, 8), dtype=np.float32)


def npz_cases() -> list[Case]:
    def one(header: bytes) -> bytes:
        return npz({"x.npy": header})
    too_many = npz({f"x{i}.npy": npy("<f4", (0,)) for i in range(1025)})
    return [
        Case("shape (1e10, 4) in a 128-byte member", one(npy("<f4", (10**10, 4))), MalformedMessage,
             "claims shape (10000000000, 4)", 400),
        Case("a tiny file asking for 8 TiB", one(npy("<f8", (2**40,))), MalformedMessage, "claims shape", 400),
        Case("dtype U10000000", one(npy("<U10000000", (4,))), BadTensor, "is not allowed", 400),
        Case("dtype V1000000000", one(npy("|V1000000000", (4,))), BadTensor, "is not allowed", 400),
        Case("object dtype", one(npy("|O", (4,), b"\x80\x04N.")), BadTensor, "pickle", 400),
        Case("structured dtype", one(npy([("a", "<f4")], (2,), b"\0" * 8)), BadTensor, "is not allowed", 400),
        Case("subarray dtype", one(npy(("<f4", (10**6,)), (1,))), BadTensor, "", 400),
        Case("complex dtype", one(npy("<c16", (1,), b"\0" * 16)), BadTensor, "is not allowed", 400),
        Case("negative dimensions", one(npy("<f4", (-2, -3), b"\0" * 24)), BadTensor, "non-negative", 400),
        Case("rank 9", one(npy("<f4", (1,) * 9, b"\0" * 4)), BadTensor, "at most 8", 400),
        Case("npy version 3.0", one(npy("<f4", (1,), b"\0" * 4, version=(3, 0))), MalformedMessage,
             "version", 400),
        Case("not an npy header", one(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4}  \n"), MalformedMessage,
             "npy header", 400),
        Case("npy data shorter than its shape", one(npy("<f4", (4,), b"\0" * 8)), MalformedMessage,
             "claims shape", 400),
        Case("zip member declared 4 GiB", declare_size(one(npy("<f4", (1,), b"\0" * 4)), 0xFFFF_FFF0),
             OversizedMessage, "expands to", 413),
        Case("zip member declared smaller than it is", declare_size(one(npy("<f4", (64,), b"\0" * 256)), 200),
             MalformedMessage, "Bad CRC-32", 400),  # zipfile holds the member to its declared size
        Case("an encrypted member", patch_member(one(npy("<f4", (1,), b"\0" * 4)), flags=1), MalformedMessage,
             "encrypted", 400),
        Case("an unknown compression method", patch_member(one(npy("<f4", (1,), b"\0" * 4)), method=77),
             MalformedMessage, "compression", 400),
        Case("zip bomb: 32 MiB of zeros", bomb(), OversizedMessage, "decompression bomb", 413),
        Case("1025 members", too_many, MalformedMessage, "at most 1024", 400),
        Case("a pickle, not a zip", b"\x80\x04\x95", MalformedMessage, "not a .npz", 400),
        Case("a member that is not .npy", npz({"x.txt": b"hi"}), MalformedMessage, "not a .npy", 400),
    ]


def jbody(inputs: Any, **extra: Any) -> bytes:
    return json.dumps({"model": "0" * 64, "inputs": inputs, **extra}).encode()


def x(dtype: Any = "float32", shape: Any = (2, 8), data: Any = None) -> dict[str, Any]:
    return {"x": {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                  "data": VALID_NPY.tolist() if data is None else data}}


def json_cases() -> list[Case]:
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        Case("nested 100,000 deep", deep, BadJob, "JSON nested too deep", 400),
        Case("nested 65 deep", jbody(json.loads("[" * 64 + "]" * 64)), BadJob, "JSON nested too deep", 400),
        Case("dtype U10000000", jbody(x("U10000000", (2,), ["a", "b"])), BadJob, "is not allowed", 400),
        Case("dtype object", jbody(x("object")), BadJob, "is not allowed", 400),
        Case("dtype as a list", jbody(x([["a", "<f4"]])), BadJob, "is not allowed", 400),
        Case("dtype complex128", jbody(x("complex128")), BadJob, "is not allowed", 400),
        Case("shape (1e10, 4)", jbody(x(shape=(10**10, 4))), OversizedMessage, "limit", 413),
        Case("shape with a float", jbody(x(shape=[2.0, 8])), BadJob, "non-negative integers", 400),
        Case("shape with a string", jbody(x(shape=["2", 8])), BadJob, "non-negative integers", 400),
        Case("shape with a bool", jbody(x(shape=[True, 16])), BadJob, "non-negative integers", 400),
        Case("negative shape", jbody(x(shape=[-2, -8])), BadJob, "non-negative integers", 400),
        Case("shape not a list", jbody(x(shape=16)), BadJob, "non-negative integers", 400),
        Case("rank 9", jbody(x(shape=[1] * 9, data=[[[[[[[[[0]]]]]]]]])), BadJob, "at most 8", 400),
        Case("shape/data mismatch", jbody(x(shape=(3, 8))), BadJob, "shape [3, 8] needs 24", 400),
        Case("ragged data", jbody(x(shape=(2, 2), data=[[1, 2], [3]])), BadJob, "not a float32 array", 400),
        Case("data not numbers", jbody(x(shape=(1,), data=[{"a": 1}])), BadJob, "not a float32 array", 400),
        Case("data a string", jbody(x(shape=(), data="1e10")), BadJob, "list of numbers", 400),
        Case("int64 overflow", jbody(x("int64", (1,), [10**30])), BadJob, "not a int64 array", 400),
        Case("negative uint8", jbody(x("uint8", (1,), [-1])), BadJob, "not a uint8 array", 400),
        Case("a 5000-digit integer", b'{"inputs": {"x": {"dtype": "int64", "shape": [1], "data": [' + b"9" * 5000
             + b"]}}}", BadJob, "not valid JSON", 400),
        Case("inputs empty", jbody({}), BadJob, '"inputs" must map', 400),
        Case("input without data", jbody({"x": {"dtype": "float32", "shape": [1]}}), BadJob, "needs", 400),
        Case("not JSON", b"{'inputs': 1}", BadJob, "not valid JSON", 400),
        Case("not UTF-8", b'{"inputs": "\xff"}', BadJob, "not valid JSON", 400),
        Case("a JSON list", b"[1, 2]", BadJob, "must be a JSON object", 400),
    ]


def refuse(decode: Any, case: Case) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(case.refusal) as caught:
            decode(case.body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reason = str(caught.value)
    assert case.reason in reason and "\n" not in reason, reason
    # linear in the body is fine (the depth scan copies it); amplification is not
    assert peak < PEAK + 16 * len(case.body), f"{case.name}: refusing it allocated {peak} bytes"


@pytest.mark.parametrize("case", npz_cases(), ids=lambda c: c.name)
def test_a_hostile_npz_is_refused_before_anything_is_allocated(case: Case) -> None:
    """Attack: an npz whose npy headers, zip directory or compression lie about its size or dtype."""
    assert issubclass(case.refusal, PeerError)
    refuse(lambda body: from_npz(body, max_bytes=LIMIT), case)


@pytest.mark.parametrize("case", json_cases(), ids=lambda c: c.name)
def test_a_hostile_json_job_is_refused_before_anything_is_allocated(case: Case) -> None:
    """Attack: a JSON job whose dtypes, shapes, data or nesting are built to blow up its decoding."""
    refuse(lambda body: parse_json_job(body, max_bytes=LIMIT), case)


def test_an_npz_over_the_byte_limit_is_oversized_even_when_honest() -> None:
    data = to_npz({"x": np.zeros(1024, dtype=np.float64)})
    with pytest.raises(OversizedMessage, match="limit 4096"):
        from_npz(data, max_bytes=4096)
    assert from_npz(data, max_bytes=8192 + 1024)["x"].shape == (1024,)


def test_honest_npz_files_still_decode_compressed_big_endian_and_empty() -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    values = rng.standard_normal((64, 8)).astype(np.float32)
    np.savez_compressed(buf, x=values, big=values.astype(">f8"), empty=np.zeros((0, 8), np.int64),
                        flag=np.array(True))
    out = from_npz(buf.getvalue(), max_bytes=LIMIT)
    np.testing.assert_array_equal(out["x"], values)
    np.testing.assert_array_equal(out["big"], values.astype(np.float64))
    assert out["empty"].shape == (0, 8) and out["flag"].shape == ()
    # 3 MiB of zeros compresses ~1000x but is below the bomb floor (4 MiB): a small honest input
    small = io.BytesIO()
    np.savez_compressed(small, z=np.zeros(768 * 1024, np.float32))
    assert from_npz(small.getvalue(), max_bytes=LIMIT)["z"].shape == (768 * 1024,)


def test_an_honest_json_job_decodes_to_its_arrays_and_options() -> None:
    body, inputs = parse_json_job(jbody(x(), replicas=2, final="probs"), max_bytes=LIMIT)
    assert body["replicas"] == 2 and body["final"] == "probs"
    assert inputs["x"].dtype == np.float32 and inputs["x"].shape == (2, 8)
    _, flat = parse_json_job(jbody(x(shape=(2, 8), data=list(range(16)))), max_bytes=LIMIT)
    assert flat["x"].tolist() == np.arange(16, dtype=np.float32).reshape(2, 8).tolist()
    _, scalar = parse_json_job(jbody(x("bool", (), True)), max_bytes=LIMIT)
    assert scalar["x"].shape == () and bool(scalar["x"])


def test_json_depth_counts_brackets_outside_strings_only_and_in_linear_time() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}], "c": "\\"[["}') == 3
    assert json_depth(b"[]" * 1000) == 1
    assert json_depth(b"") == 0
    assert json_depth(b"[" * 64 + b"]" * 64) == 64
    # Attack: 16 MiB of "[": counted without recursion, in well under a second
    start = time.perf_counter()
    assert json_depth(b"[" * MAX_JSON_BODY_BYTES) == MAX_JSON_BODY_BYTES
    assert time.perf_counter() - start < 2.0


def test_a_json_body_over_the_json_limit_is_oversized_before_it_is_parsed() -> None:
    """Attack: a JSON job of many MiB, each costing ~5x in Python objects and 70 ms of parsing."""
    with pytest.raises(OversizedMessage, match="application/x-npz"):
        parse_json_job(b" " * (MAX_JSON_BODY_BYTES + 1), max_bytes=LIMIT * 4)
    with pytest.raises(OversizedMessage):  # a coordinator with a smaller body limit keeps it
        parse_json_job(b" " * 2048, max_bytes=1024)
