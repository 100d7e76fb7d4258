"""Structure-aware fuzzing of what a peer sends over MQTT: validly signed envelopes of every
message kind whose bodies are mutated (a field of the wrong type, a key removed or added, a huge
list, deep nesting, in the message, its items and their tensors), and tensor maps likewise.

Attack (every test here): a peer with a valid key - any node may have one - publishes hostile but
correctly signed messages. Every one must be refused with a `PeerError` subclass (which the
coordinator and nodes count and drop) or decode to a valid message; anything else escaping
(TypeError, AttributeError, RecursionError, MemoryError...) would crash or wedge the receiver.
The raw-bytes fuzz of `open_envelope` is in test_protocol.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION, codec
from protocol.errors import PeerError
from protocol.messages import (
    MAX_BATCH_ITEMS,
    MESSAGE_TYPES,
    Assignment,
    Assignments,
    Message,
    Release,
    Result,
    Results,
    Status,
    WorkRequest,
)
from protocol.signing import Identity
from protocol.tensors import (
    Tensor,
    decode_tensor_map,
    digest_tensors,
    encode_tensor_map,
    tensors_from_arrays,
    tensors_from_wire,
)

NS = "sc/v1/fuzz"
PEER = Identity.generate()
D = "d" * 64
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TENSORS = tensors_from_arrays({"x": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "ids": np.array([1, 2], dtype=np.int64)})
VALID: dict[str, Message] = {
    "work": WorkRequest(node="n1", owner="alice", slots=2, models=(D,), runtime="ort=1", seq=3, held=("l1",)),
    "assign": Assignments(node="n1", items=(
        Assignment(task="t", job="j", lease="l", model=D, input_digest=D, expires_at=1e9, inputs=_TENSORS),
        Assignment(task="t2", job="j", lease="l2", model=D, input_digest=D, expires_at=1e9))),
    "result": Results(node="n1", runtime="ort=1", items=(
        Result(task="t", job="j", lease="l", input_digest=D, output_digest=digest_tensors(_TENSORS),
               outputs=_TENSORS, elapsed=0.5),
        Result(task="t2", job="j", lease="l2", input_digest=D, output_digest="", error="model failed"))),
    "release": Release(node="n1", leases=("l1", "l2"), reason="shutting down"),
    "status": Status(node="n1", state="online", since=1_700_000_000_000),
}
assert {m.KIND for m in VALID.values()} == set(MESSAGE_TYPES)  # every kind is fuzzed

# msgpack carries integers in [-2**63, 2**64): the edges are where a careless cast overflows.
_INTS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]))
_LEAVES = st.one_of(st.none(), st.booleans(), _INTS, st.floats(), st.text(max_size=40), st.binary(max_size=64),
                    st.sampled_from(["", "x" * 10_000, D, "float32", "bool", "object", "<U8", "online"]))
_VALUES = st.recursive(_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
        ["node", "items", "dtype", "shape", "data", "inputs", "outputs", "task", "error"])), inner, max_size=6)),
    max_leaves=20)
# a list far longer than any limit, of one repeated leaf (cheap to build, costly to check naively)
_HUGE = st.builds(lambda n, leaf: [leaf] * n, st.sampled_from([MAX_BATCH_ITEMS + 1, 100_000]),
                  st.one_of(st.none(), st.integers(0, 9), st.just("l"), st.just(D), st.just({})))
_HOSTILE = st.one_of(_VALUES, _HUGE)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded wire structure a mutation can land (maps' keys, lists' indices)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _mutate(wire: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    """`wire` with the thing at `path` replaced by `value`, deleted, or given an extra key."""
    if not path:
        return value if how == "replace" else wire
    *parent_path, last = path
    parent = wire
    for step in parent_path:
        parent = parent[step]
    if how == "delete" and isinstance(parent, dict):
        del parent[last]
    elif how == "extra" and isinstance(parent[last], dict):
        parent[last]["unexpected"] = value
    else:
        parent[last] = value
    return wire


def _sealed_body(kind: str, body: bytes) -> bytes:
    """An envelope around `body`, correctly signed by PEER: it gets past the signature check, so
    the body's decoding is what is tested."""
    return bytes(msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, "body": body,
                                "sig": PEER.sign(codec.scoped_kind(NS, kind), body), "pk": PEER.public_key},
                               use_bin_type=True))


def _open(data: bytes) -> Message | None:
    """The decoded message, or None if it was refused with a PeerError. Anything else propagates."""
    try:
        return codec.open_envelope(data, namespace=NS).message
    except PeerError:
        return None


def _wire(kind: str) -> Any:
    return msgpack.unpackb(msgpack.packb(VALID[kind].to_wire(), use_bin_type=True), raw=False)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_an_unmutated_envelope_opens_to_the_same_message(kind: str) -> None:
    """The baseline the mutations start from is valid: a refusal below is the mutation's doing."""
    body = msgpack.packb(VALID[kind].to_wire(), use_bin_type=True)
    assert _open(_sealed_body(kind, body)) == VALID[kind]


@pytest.mark.parametrize("kind", sorted(VALID))
@FUZZ
@given(data=st.data(), how=st.sampled_from(["replace", "delete", "extra"]), value=_HOSTILE)
def test_a_signed_envelope_with_a_mutated_body_is_refused_as_a_peer_error_or_decodes(
        kind: str, data: st.DataObject, how: str, value: Any) -> None:
    wire = _wire(kind)
    path = data.draw(st.sampled_from(_paths(wire)), label="path")
    mutated = _mutate(wire, path, how, value)
    body = msgpack.packb(mutated, use_bin_type=True)
    message = _open(_sealed_body(kind, body))
    if message is not None:  # whatever got through is a message of the kind the envelope named
        assert message.KIND == kind
        assert message == type(message).from_wire(message.to_wire())


@pytest.mark.parametrize("kind", sorted(VALID))
@FUZZ
@given(data=st.data(), depth=st.sampled_from([64, 511, 1_000, 5_000, 100_000]),
       container=st.sampled_from([b"\x91", b"\x81\xa1k"]))  # a 1-element array, a 1-entry map {"k": ...}
def test_a_field_nested_thousands_deep_is_refused_as_a_peer_error(
        kind: str, data: st.DataObject, depth: int, container: bytes) -> None:
    """Built as raw msgpack: msgpack.packb itself refuses to encode this deep."""
    wire = _wire(kind)
    key = data.draw(st.sampled_from(sorted(wire)), label="field")
    deep = container * depth + b"\xc0"
    entries = [msgpack.packb(k) + (deep if k == key else msgpack.packb(v, use_bin_type=True))
               for k, v in wire.items()]
    body = b"\xde" + len(entries).to_bytes(2, "big") + b"".join(entries)  # map16 header
    assert _open(_sealed_body(kind, body)) is None


@pytest.mark.parametrize("kind", sorted(VALID))
@FUZZ
@given(body=st.one_of(_VALUES.map(lambda v: msgpack.packb(v, use_bin_type=True)), st.binary(max_size=256)))
def test_a_signed_body_that_is_any_value_or_any_bytes_is_refused_as_a_peer_error_or_decodes(
        kind: str, body: bytes) -> None:
    message = _open(_sealed_body(kind, body))
    assert message is None or message.KIND == kind


def _tensor_wire() -> Any:
    return msgpack.unpackb(encode_tensor_map(_TENSORS), raw=False)


@FUZZ
@given(data=st.data(), how=st.sampled_from(["replace", "delete", "extra"]), value=_HOSTILE)
def test_a_mutated_tensor_map_is_refused_as_a_peer_error_or_is_a_valid_tensor_map(
        data: st.DataObject, how: str, value: Any) -> None:
    wire = _tensor_wire()
    mutated = _mutate(wire, data.draw(st.sampled_from(_paths(wire)), label="path"), how, value)
    blob = msgpack.packb(mutated, use_bin_type=True)
    decoders: tuple[Callable[[], dict[str, Tensor]], ...] = (lambda: decode_tensor_map(blob),
                                                             lambda: tensors_from_wire(mutated))
    for decode in decoders:
        try:
            tensors = decode()
        except PeerError:
            continue
        for tensor in tensors.values():  # what decoded is usable: its bytes match its shape and dtype
            assert isinstance(tensor, Tensor)
            assert tensor.to_array().shape == tensor.shape
        digest_tensors(tensors)


@FUZZ
@given(shape=st.lists(_INTS, max_size=10), dtype=st.one_of(st.text(max_size=10), st.sampled_from(
    ["float32", "int64", "bool", "object", "<f4", "V8", "S3", "U1", "float128", "complex64"])),
       data=st.binary(max_size=64))
def test_a_tensor_with_any_shape_and_dtype_is_refused_as_a_peer_error_or_is_consistent(
        shape: list[int], dtype: str, data: bytes) -> None:
    """Huge or negative dimensions, and dtypes numpy knows but the protocol does not allow."""
    try:
        tensor = Tensor.from_wire({"dtype": dtype, "shape": shape, "data": data})
    except PeerError:
        return
    assert tensor.to_array().nbytes == len(data)


def test_an_empty_tensor_with_dimensions_numpy_cannot_hold_is_refused_as_a_peer_error() -> None:
    """Attack: a node returns outputs of shape (0, huge, huge) with no data; whoever turns them
    into an array (the coordinator's quorum and audits) must meet a PeerError, not a ValueError.
    (Found by the fuzz above.)"""
    with pytest.raises(PeerError):
        Tensor.from_wire({"dtype": "int64", "shape": [0, 17795, 64789070222358], "data": b""})


@pytest.mark.parametrize("depth", [511, 10_000])
def test_a_tensor_map_nested_deep_is_refused_as_a_peer_error(depth: int) -> None:
    with pytest.raises(PeerError):
        decode_tensor_map(b"\x81\xa1x" + b"\x91" * depth + b"\xc0")
