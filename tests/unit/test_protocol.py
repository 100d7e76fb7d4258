"""The wire protocol, without sockets: envelopes, signatures, tensors, topics."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.digests import node_id_from_public_key
from protocol.errors import (
    BadSignature,
    BadTensor,
    MalformedMessage,
    OversizedMessage,
    PeerError,
    UnsupportedVersion,
)
from protocol.messages import Assignment, Assignments, Release, Result, Results, Status, WorkRequest
from protocol.npz import from_npz, to_npz
from protocol.signing import Identity
from protocol.tensors import Tensor, concat_rows, digest_tensors, tensors_from_arrays
from protocol.topics import Topics

NODE = Identity.generate()
OTHER = Identity.generate()
NS = "sc/v1/test"


def seal(message: codec.Message, identity: Identity) -> bytes:
    return codec.seal(message, identity, namespace=NS)


def open_envelope(data: bytes, **kwargs: object) -> codec.Opened:
    return codec.open_envelope(data, namespace=NS, **kwargs)  # type: ignore[arg-type]


def work(seq: int = 1) -> WorkRequest:
    return WorkRequest(node=NODE.id, owner="alice", slots=2, models=("a" * 64,), runtime="ort=1", seq=seq)


def results() -> Results:
    out = tensors_from_arrays({"y": np.ones((2, 3), dtype=np.float32)})
    item = Result(task="t", job="j", lease="l", input_digest="b" * 64, output_digest=digest_tensors(out),
                  outputs=out, elapsed=0.01)
    return Results(node=NODE.id, runtime="ort=1", items=(item,))


def test_a_sealed_message_opens_to_an_equal_message_and_names_its_signer() -> None:
    opened = open_envelope(seal(results(), NODE))
    assert opened.message == results()
    assert node_id_from_public_key(opened.public_key) == NODE.id


def test_a_flipped_bit_in_the_body_is_a_bad_signature() -> None:
    env = msgpack.unpackb(seal(work(), NODE))
    body = bytearray(env["body"])
    body[-1] ^= 1
    env["body"] = bytes(body)
    with pytest.raises(BadSignature):
        open_envelope(msgpack.packb(env))


def test_a_signature_by_another_key_with_the_victims_key_attached_is_rejected() -> None:
    env = msgpack.unpackb(seal(work(), OTHER))
    env["pk"] = NODE.public_key
    with pytest.raises(BadSignature):
        open_envelope(msgpack.packb(env))


def test_a_signature_for_one_kind_cannot_be_replayed_as_another_kind() -> None:
    env = msgpack.unpackb(seal(Release(node=NODE.id, leases=("l",), reason="x"), NODE))
    env["kind"] = "work"
    with pytest.raises((BadSignature, MalformedMessage)):
        open_envelope(msgpack.packb(env))


def test_truncated_envelopes_are_malformed_never_a_crash() -> None:
    data = seal(results(), NODE)
    for cut in (0, 1, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(PeerError):
            open_envelope(data[:cut])


def test_oversized_messages_are_rejected_before_decoding() -> None:
    with pytest.raises(OversizedMessage):
        open_envelope(seal(results(), NODE), max_size=100)


def test_an_unknown_version_is_rejected() -> None:
    env = msgpack.unpackb(seal(work(), NODE))
    env["v"] = 2
    with pytest.raises(UnsupportedVersion):
        open_envelope(msgpack.packb(env))


def test_a_message_of_an_unexpected_kind_is_rejected() -> None:
    with pytest.raises(MalformedMessage):
        open_envelope(seal(work(), NODE), expect_kind="assign")


def test_fields_of_the_wrong_type_are_malformed() -> None:
    raw = work().to_wire()
    raw["slots"] = True  # a bool is not a count
    body = msgpack.packb(raw)
    env = {"v": 1, "kind": "work", "body": body, "sig": NODE.sign(codec.scoped_kind(NS, "work"), body),
           "pk": NODE.public_key}
    with pytest.raises(MalformedMessage):
        open_envelope(msgpack.packb(env))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise_anything_but_a_peer_error(data: bytes) -> None:
    with pytest.raises(PeerError):
        open_envelope(data)


def test_tensors_check_dtype_and_length() -> None:
    with pytest.raises(BadTensor):
        Tensor("object", (1,), b"x")
    with pytest.raises(BadTensor):
        Tensor("float32", (2, 2), b"\x00" * 15)
    with pytest.raises(BadTensor):
        Tensor("float32", (-1,), b"")
    t = Tensor.from_array(np.arange(6, dtype=np.int64).reshape(2, 3))
    np.testing.assert_array_equal(t.to_array(), np.arange(6).reshape(2, 3))


def test_tensor_digests_differ_by_name_shape_and_dtype() -> None:
    a = np.zeros((2, 2), dtype=np.float32)
    digests = {
        digest_tensors(tensors_from_arrays({"x": a})),
        digest_tensors(tensors_from_arrays({"y": a})),
        digest_tensors(tensors_from_arrays({"x": a.reshape(4, 1)})),
        digest_tensors(tensors_from_arrays({"x": a.view(np.int32)})),
    }
    assert len(digests) == 4


def test_concatenating_task_outputs_in_order_rebuilds_the_whole() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    parts = [tensors_from_arrays({"x": x[:3]}), tensors_from_arrays({"x": x[3:]})]
    assert digest_tensors(concat_rows(parts)) == digest_tensors(tensors_from_arrays({"x": x}))


def test_assignment_round_trips_with_inline_inputs() -> None:
    inputs = tensors_from_arrays({"ids": np.array([[1, 2]], dtype=np.int64)})
    msg = Assignments(node=NODE.id, items=(Assignment(task="t", job="j", lease="l", model="a" * 64,
                                                      input_digest=digest_tensors(inputs), expires_at=1.5,
                                                      inputs=inputs, opt_level=1),))
    assert open_envelope(seal(msg, OTHER)).message == msg


def test_topics_build_and_parse_under_a_prefix() -> None:
    topics = Topics("sc/v1/ns1")
    assert topics.parse(topics.result("abc")) == ("result", "abc")
    with pytest.raises(MalformedMessage):
        topics.parse("sc/v1/ns2/result/abc")
    with pytest.raises(MalformedMessage):
        topics.parse("sc/v1/ns1/result/abc/extra")
    with pytest.raises(ValueError):
        Topics("sc/+/x")


def test_a_new_key_file_has_mode_0600_and_loads_back_the_same_identity(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).id == first.id


def test_npz_keeps_names_with_dots_and_refuses_garbage() -> None:
    arrays = {"sum.out": np.ones((2, 2), dtype=np.float32), "ids": np.array([1, 2], dtype=np.int64)}
    back = from_npz(to_npz(arrays))
    assert set(back) == {"sum.out", "ids"}
    with pytest.raises(MalformedMessage):
        from_npz(b"not a zip")
    with pytest.raises(OversizedMessage):
        from_npz(to_npz(arrays), max_bytes=10)


def test_a_message_replayed_into_another_namespace_does_not_verify() -> None:
    # Attack: capture a node's signed result (or a coordinator's assignment) on one deployment's
    # topics and publish it on another deployment sharing the broker.
    data = codec.seal(results(), NODE, namespace="sc/v1/deployment-a")
    assert codec.open_envelope(data, namespace="sc/v1/deployment-a").message == results()
    with pytest.raises(BadSignature):
        codec.open_envelope(data, namespace="sc/v1/deployment-b")


def test_a_status_round_trips_and_rejects_unknown_states() -> None:
    status = Status(node=NODE.id, state="offline", since=1_700_000_000_000)
    assert open_envelope(seal(status, NODE)).message == status
    with pytest.raises(MalformedMessage):
        Status(node=NODE.id, state="gone", since=1)
    env = msgpack.unpackb(seal(status, NODE))
    env["body"] = msgpack.packb({"node": NODE.id, "state": "offline", "since": True})
    with pytest.raises(PeerError):  # a bool is no timestamp; and the body no longer matches its signature
        open_envelope(msgpack.packb(env))


def test_topic_prefixes_must_be_ascii_without_nul() -> None:
    for bad in ("sc/v1/\x00x", "sc/v1/é", "sc/#", "sc/"):
        with pytest.raises(ValueError):
            Topics(bad)
