"""Node certificates (protocol/certs.py): an owner's key vouching for a node key, nothing else."""

from __future__ import annotations

import base64
import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.certs import (
    DEFAULT_VALID_SECONDS,
    MAX_CERT_BYTES,
    TAG,
    NodeCertificate,
    issue_certificate,
)
from protocol.digests import node_id_from_public_key
from protocol.errors import BadCertificate, LocalError, PeerError
from protocol.signing import Identity

OWNER = Identity.generate()
OTHER_OWNER = Identity.generate()
NODE = Identity.generate()
OTHER_NODE = Identity.generate()
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def cert(**changes: object) -> NodeCertificate:
    issued = issue_certificate(OWNER, NODE.public_key, now=NOW, valid_seconds=86400)
    return dataclasses.replace(issued, **changes) if changes else issued  # type: ignore[arg-type]


def test_an_issued_certificate_verifies_for_its_node_and_names_both_ids() -> None:
    c = cert()
    c.verify(now=NOW + 10, node_public_key=NODE.public_key)
    assert c.owner_id == OWNER.id == node_id_from_public_key(OWNER.public_key)
    assert c.node_id == NODE.id
    assert c.expires_at - c.issued_at == 86400


def test_the_default_validity_is_a_year() -> None:
    c = issue_certificate(OWNER, NODE.public_key, now=NOW)
    assert c.expires_at == NOW + DEFAULT_VALID_SECONDS == NOW + 365 * 86400


def test_bytes_and_text_round_trip_to_an_equal_certificate() -> None:
    c = cert()
    assert NodeCertificate.from_bytes(c.to_bytes()) == c
    text = c.to_text()
    assert "=" not in text and "\n" not in text and "+" not in text and "/" not in text
    assert NodeCertificate.from_text(text) == c
    assert NodeCertificate.from_text(f"  {text}\n") == c  # as read from a file
    assert NodeCertificate.from_text(text + "=" * (-len(text) % 4)) == c  # padded by some other tool
    assert len(c.to_bytes()) < MAX_CERT_BYTES


def test_a_forged_signature_does_not_verify() -> None:
    """Attack: a node claims an owner by attaching random bytes as the owner's signature."""
    sig = bytearray(cert().signature)
    sig[0] ^= 1
    with pytest.raises(BadCertificate, match="signature does not verify"):
        cert(signature=bytes(sig)).verify(now=NOW)


def test_a_certificate_signed_by_another_owner_does_not_verify() -> None:
    """Attack: Mallory signs a certificate for her node and writes Alice's key in as the owner,
    so her node's results count as Alice's."""
    mallorys = issue_certificate(OTHER_OWNER, NODE.public_key, now=NOW)
    forged = dataclasses.replace(mallorys, owner_public_key=OWNER.public_key)
    with pytest.raises(BadCertificate, match="signature does not verify"):
        forged.verify(now=NOW)


@pytest.mark.parametrize("field", ["node_public_key", "issued_at", "expires_at"])
def test_changing_any_signed_field_breaks_the_signature(field: str) -> None:
    """Attack: a node stretches its certificate's lifetime or moves it to another node key."""
    changed = {"node_public_key": OTHER_NODE.public_key, "issued_at": NOW - 1.0,
               "expires_at": NOW + 10 * DEFAULT_VALID_SECONDS}[field]
    with pytest.raises(BadCertificate, match="signature does not verify"):
        cert(**{field: changed}).verify(now=NOW)


def test_an_expired_certificate_is_refused_with_the_date() -> None:
    """Attack: a node keeps acting for an owner after the certificate the owner gave it lapsed."""
    c = cert()
    with pytest.raises(BadCertificate, match=r"^certificate expired at 2026-01-02T00:00:00Z$"):
        c.verify(now=NOW + 86400)
    c.verify(now=NOW + 86399)


def test_a_certificate_from_the_future_is_not_yet_valid_beyond_the_skew() -> None:
    """Attack: a certificate issued far ahead (say by a briefly stolen key, dated after the
    revocation) must not work before its time."""
    c = issue_certificate(OWNER, NODE.public_key, now=NOW + 3600)
    with pytest.raises(BadCertificate, match="not yet valid"):
        c.verify(now=NOW)
    c.verify(now=NOW + 3600 - 60)  # a laptop clock a minute ahead of the coordinator's is fine
    with pytest.raises(BadCertificate, match="not yet valid"):
        c.verify(now=NOW + 3600 - 60, max_skew=30)


def test_a_certificate_for_another_node_key_is_refused() -> None:
    """Attack: node B presents the valid certificate node A was given, to act for A's owner."""
    with pytest.raises(BadCertificate, match="certificate is for another node key"):
        cert().verify(now=NOW, node_public_key=OTHER_NODE.public_key)


def test_a_certificate_signed_under_another_kind_does_not_verify() -> None:
    """Attack: reuse an owner's signature over some other message (same bytes, other kind)."""
    c = cert()
    other_kind = OWNER.sign("work", c.signed_part())
    with pytest.raises(BadCertificate, match="signature does not verify"):
        cert(signature=other_kind).verify(now=NOW)


def test_building_a_certificate_with_bad_fields_fails_at_once() -> None:
    with pytest.raises(BadCertificate):
        cert(node_public_key=b"\x00" * 31)
    with pytest.raises(BadCertificate):
        cert(signature=b"\x00" * 63)
    with pytest.raises(BadCertificate):
        cert(expires_at=float("nan"))
    with pytest.raises(BadCertificate):
        cert(expires_at=NOW - 1)
    with pytest.raises(BadCertificate):
        cert(issued_at=True)


def test_issuing_with_a_bad_key_or_lifetime_is_a_local_error() -> None:
    with pytest.raises(LocalError):
        issue_certificate(OWNER, NODE.public_key.hex().encode(), now=NOW)
    with pytest.raises(LocalError):
        issue_certificate(OWNER, NODE.public_key, now=NOW, valid_seconds=0)
    with pytest.raises(LocalError):
        issue_certificate(OWNER, NODE.public_key, now=float("inf"))


def wire(c: NodeCertificate) -> list[object]:
    items: list[object] = msgpack.unpackb(c.to_bytes(), raw=False)
    return items


@pytest.mark.parametrize("mutate", [
    lambda w: w[:-1],                                  # no signature
    lambda w: [*w, b"extra"],                          # trailing field
    lambda w: ["sparecycles/other", *w[1:]],           # another tag
    lambda w: [w[0], 2, *w[2:]],                       # a future version
    lambda w: [w[0], True, *w[2:]],                    # bool sneaking in as 1
    lambda w: [*w[:4], int(w[4]), *w[5:]],             # int instead of float64 time
    lambda w: [*w[:2], w[2].hex(), *w[3:]],            # key as hex text
    lambda w: dict(enumerate(w)),                      # a map
])
def test_structurally_wrong_certificates_are_refused(mutate: object) -> None:
    data = msgpack.packb(mutate(wire(cert())), use_bin_type=True)  # type: ignore[operator]
    with pytest.raises(BadCertificate):
        NodeCertificate.from_bytes(data)


def test_a_non_canonical_encoding_is_refused() -> None:
    """Two byte forms of one certificate would give it two identities in a store or a cache."""
    single_float = msgpack.packb(wire(cert()), use_bin_type=True, use_single_float=True)
    with pytest.raises(BadCertificate):
        NodeCertificate.from_bytes(single_float)
    # str8 header for a tag that fits a fixstr: same values, longer encoding
    canonical = cert().to_bytes()
    fixstr = bytes([0xA0 | len(TAG)]) + TAG.encode()
    assert fixstr in canonical
    longer = canonical.replace(fixstr, bytes([0xD9, len(TAG)]) + TAG.encode())
    with pytest.raises(BadCertificate, match="canonically"):
        NodeCertificate.from_bytes(longer)


def test_a_non_canonical_text_form_is_refused() -> None:
    text = cert().to_text()
    assert len(text) % 4 in (2, 3)  # so the last character carries unused low bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sloppy = text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]  # same bytes, other text
    assert base64.urlsafe_b64decode(sloppy + "=" * (-len(sloppy) % 4)) == cert().to_bytes()
    with pytest.raises(BadCertificate, match="canonically"):
        NodeCertificate.from_text(sloppy)


def test_truncated_and_oversized_certificates_are_refused() -> None:
    data = cert().to_bytes()
    for cut in range(len(data)):
        with pytest.raises(BadCertificate):
            NodeCertificate.from_bytes(data[:cut])
    with pytest.raises(BadCertificate, match="exceeds"):
        NodeCertificate.from_bytes(data + b"\x00" * MAX_CERT_BYTES)
    with pytest.raises(BadCertificate, match="exceeds"):
        NodeCertificate.from_text("A" * 10_000)


@pytest.mark.parametrize("text", ["", "not base64!", "a+b/c", "A", "AAAA" * 3, "\u00e9" * 8])
def test_text_that_is_not_a_certificate_is_refused(text: str) -> None:
    with pytest.raises(BadCertificate):
        NodeCertificate.from_text(text)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_bytes_raise_bad_certificate_and_nothing_else(data: bytes) -> None:
    try:
        NodeCertificate.from_bytes(data).verify(now=NOW)
    except BadCertificate:
        pass


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_a_flipped_or_cut_valid_certificate_raises_only_bad_certificate(data: st.DataObject) -> None:
    raw = bytearray(cert().to_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    with pytest.raises(BadCertificate):
        NodeCertificate.from_bytes(bytes(raw)).verify(now=NOW, node_public_key=NODE.public_key)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_garbage_text_raises_bad_certificate_and_nothing_else(text: str) -> None:
    try:
        NodeCertificate.from_text(text)
    except BadCertificate:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                    | st.binary(max_size=70) | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=8), max_leaves=20))
def test_well_formed_msgpack_of_the_wrong_shape_raises_bad_certificate(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    with pytest.raises(BadCertificate):
        NodeCertificate.from_bytes(data).verify(now=NOW)


def test_bad_certificate_is_a_peer_error_with_its_reason() -> None:
    with pytest.raises(PeerError) as caught:
        NodeCertificate.from_bytes(b"\xc1")
    assert caught.value.reason == "bad_certificate"
