"""Signed HTTP requests (protocol/httpauth.py) and the nonce cache that stops their replay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.digests import sha256_hex
from protocol.errors import AuthError, LocalError, PeerError
from protocol.httpauth import (
    KIND,
    SCHEME,
    NonceCache,
    SignedRequest,
    parse_authorization,
    request_bytes,
    sign_request,
    verify_request,
)
from protocol.signing import Identity

ALICE = Identity.generate()
MALLORY = Identity.generate()
COORD = "coordinatoraaaaaaaaaaaaaaa"
OTHER_COORD = "coordinatorbbbbbbbbbbbbbbb"
NOW = 1_767_225_600.0
BODY = b'{"name": "alice"}'
NONCE = "0123456789abcdef0123456789abcdef"


def header(*, identity: Identity = ALICE, method: str = "POST", path_qs: str = "/v1/accounts?x=1",
           body: bytes = BODY, audience: str = COORD, now: float = NOW, nonce: str | None = NONCE) -> str:
    return sign_request(identity, method=method, path_qs=path_qs, body=body, audience=audience, now=now,
                        nonce=nonce)


def check(value: str | None, *, method: str = "POST", path_qs: str = "/v1/accounts?x=1", body: bytes = BODY,
          audience: str = COORD, now: float = NOW, max_skew: float = 300.0) -> SignedRequest:
    return verify_request(value, method=method, path_qs=path_qs, body_sha256=sha256_hex(body),
                          audience=audience, now=now, max_skew=max_skew)


def with_field(value: str, name: str, new: str) -> str:
    scheme, params = value.split(" ", 1)
    parts = [f"{name}={new}" if p.startswith(name + "=") else p for p in params.split(",")]
    return f"{scheme} {','.join(parts)}"


def test_a_signed_request_verifies_and_names_its_signer() -> None:
    value = header()
    assert value.startswith(f"{SCHEME} key={ALICE.public_key.hex()},ts=1767225600000,nonce={NONCE},sig=")
    signed = check(value, now=NOW + 2)
    assert signed == SignedRequest(public_key=ALICE.public_key, key_id=ALICE.id, ts=NOW, nonce=NONCE)


def test_each_request_gets_a_fresh_random_nonce() -> None:
    nonces = {parse_authorization(header(nonce=None))[2] for _ in range(50)}
    assert len(nonces) == 50


def test_a_forged_signature_does_not_verify() -> None:
    """Attack: a client without Alice's key sends her public key and a made-up signature."""
    sig = parse_authorization(header())[3].hex()
    forged = with_field(header(), "sig", ("1" if sig[0] == "0" else "0") + sig[1:])
    with pytest.raises(AuthError, match=r"^signature does not verify$"):
        check(forged)


def test_a_signature_made_by_another_key_does_not_pass_as_alices() -> None:
    """Attack: Mallory signs with her own key and writes Alice's public key in the header."""
    with pytest.raises(AuthError, match="signature does not verify"):
        check(with_field(header(identity=MALLORY), "key", ALICE.public_key.hex()))


def test_a_request_signed_for_another_coordinator_does_not_verify_here() -> None:
    """Attack: a malicious coordinator replays a request Alice signed for it at another deployment."""
    with pytest.raises(AuthError, match="signature does not verify"):
        check(header(audience=OTHER_COORD), audience=COORD)


@pytest.mark.parametrize(("what", "changes"), [
    ("body", {"body": b'{"name": "mallory"}'}),
    ("empty body", {"body": b""}),
    ("path", {"path_qs": "/v1/accounts/me?x=1"}),
    ("query", {"path_qs": "/v1/accounts?x=2"}),
    ("dropped query", {"path_qs": "/v1/accounts"}),
    ("method", {"method": "PUT"}),
    ("percent-decoded path", {"path_qs": "/v1/accounts?x=%31"}),
])
def test_a_signature_does_not_carry_over_to_a_changed_request(what: str, changes: dict[str, object]) -> None:
    """Attack: someone on the path keeps Alice's valid header but changes what it asks for."""
    with pytest.raises(AuthError, match="signature does not verify"):
        check(header(), **changes)  # type: ignore[arg-type]


def test_a_signature_over_the_same_bytes_under_another_kind_does_not_verify() -> None:
    """Attack: reuse Alice's signature of another kind of message whose bytes happen to match."""
    signed = request_bytes(audience=COORD, method="POST", path_qs="/v1/accounts?x=1", ts_ms=int(NOW * 1000),
                           nonce=NONCE, body_sha256=sha256_hex(BODY))
    assert KIND == "http"
    value = with_field(header(), "sig", ALICE.sign("cert", signed).hex())
    with pytest.raises(AuthError, match="signature does not verify"):
        check(value)


@pytest.mark.parametrize("offset", [-412.0, 412.0])
def test_a_request_far_from_the_coordinators_clock_is_refused_with_the_gap(offset: float) -> None:
    """Attack: replay a request captured long ago (or pre-signed for later) after its nonce was forgotten."""
    with pytest.raises(AuthError, match=r"^request time is 412 s away from the coordinator's clock"):
        check(header(now=NOW + offset), now=NOW)


def test_a_request_within_the_skew_is_accepted_either_way() -> None:
    check(header(now=NOW - 299), now=NOW)
    check(header(now=NOW + 299), now=NOW)
    with pytest.raises(AuthError, match="away from"):
        check(header(now=NOW + 299), now=NOW, max_skew=60)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_missing_header_is_named(value: str | None) -> None:
    with pytest.raises(AuthError, match=r"^missing Authorization header$"):
        check(value)


def test_malformed_headers_are_refused_before_any_crypto() -> None:
    good = header()
    key, rest = good.split(",", 1)
    bad = [
        "Bearer abc",
        SCHEME,
        good.replace(SCHEME, "Sparecycles-RSA"),
        good + ",ts=1",                                    # a repeated parameter
        good + ",extra=1",                                 # an unknown parameter
        f"{key},{rest.split(',', 1)[1]}",                  # ts missing
        with_field(good, "key", ALICE.public_key.hex().upper()),
        with_field(good, "key", ALICE.public_key.hex()[:-2]),
        with_field(good, "ts", "-5"),
        with_field(good, "ts", "1e12"),
        with_field(good, "nonce", "xyz"),
        with_field(good, "sig", "00"),
        good + " " * 600,
    ]
    for value in bad:
        with pytest.raises(AuthError, match=r"^malformed Authorization header"):
            check(value)


def test_the_scheme_name_is_case_insensitive_and_spaces_after_commas_are_allowed() -> None:
    value = header().replace(SCHEME, SCHEME.lower()).replace(",", ", ")
    assert check(value).key_id == ALICE.id


def test_signing_refuses_what_it_cannot_sign_unambiguously() -> None:
    with pytest.raises(LocalError):
        header(path_qs="/v1/a\x00b")
    with pytest.raises(LocalError):
        header(path_qs="v1/no-leading-slash")
    with pytest.raises(LocalError):
        header(audience="")
    with pytest.raises(LocalError):
        header(nonce="short")
    with pytest.raises(LocalError):
        verify_request(header(), method="POST", path_qs="/v1/accounts?x=1", body_sha256="nope",
                       audience=COORD, now=NOW)


def test_a_target_with_a_nul_is_refused_not_crashed_on() -> None:
    with pytest.raises(AuthError, match="cannot authenticate"):
        check(header(), path_qs="/v1/accounts\x00?x=1")


def test_auth_error_is_a_peer_error_with_its_reason() -> None:
    with pytest.raises(PeerError) as caught:
        check(None)
    assert caught.value.reason == "auth_failed"


# -- fuzz: hostile input is an AuthError, never anything else ---------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=700))
def test_any_header_text_is_accepted_or_an_auth_error(value: str) -> None:
    try:
        check(value)
    except AuthError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_mutated_valid_header_is_refused_with_an_auth_error(data: st.DataObject) -> None:
    value = header()
    i = data.draw(st.integers(0, len(value) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != value[i]))
    mutated = value[:i] + replacement + value[i + 1:]
    if i < len(SCHEME) and mutated.lower() == value.lower():
        check(mutated)  # the one harmless change: the scheme's case
    else:
        with pytest.raises(AuthError):
            check(mutated)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=20))
def test_any_request_target_or_method_is_accepted_or_an_auth_error(path_qs: str, method: str) -> None:
    try:
        check(header(), path_qs=path_qs, method=method)
    except AuthError:
        pass


# -- the nonce cache --------------------------------------------------------------------------------


def test_a_replayed_request_is_caught_by_the_nonce_cache() -> None:
    """Attack: someone who saw Alice's request sends it again, byte for byte, within the window."""
    cache = NonceCache()
    value = header()
    first = check(value, now=NOW)
    again = check(value, now=NOW + 5)  # the signature alone cannot tell: it still verifies
    assert cache.check_and_remember(first.key_id, first.nonce, first.ts, NOW) is True
    assert cache.check_and_remember(again.key_id, again.nonce, again.ts, NOW + 5) is False


def test_one_nonce_under_two_keys_is_two_requests() -> None:
    cache = NonceCache()
    assert cache.check_and_remember("alice", NONCE, NOW, NOW)
    assert cache.check_and_remember("bob", NONCE, NOW, NOW)


def test_entries_are_forgotten_once_their_time_is_outside_the_window() -> None:
    cache = NonceCache(max_skew=300)
    assert cache.check_and_remember("alice", "n1", NOW, NOW)
    assert cache.check_and_remember("alice", "n2", NOW + 10, NOW + 10)
    assert len(cache) == 2
    assert cache.check_and_remember("alice", "n3", NOW + 305, NOW + 305)
    assert len(cache) == 2  # n1 (ts NOW) fell out of the window at NOW + 300
    assert not cache.check_and_remember("alice", "n1", NOW, NOW + 305)  # and cannot come back
    assert cache.check_and_remember("bob", "x", NOW + 1000, NOW + 1000)
    assert cache.key_count == 1 and len(cache) == 1  # alice went quiet for over 2 * max_skew


def test_a_time_outside_the_window_is_refused_by_the_cache_too() -> None:
    cache = NonceCache(max_skew=300)
    assert not cache.check_and_remember("alice", "n1", NOW - 301, NOW)
    assert not cache.check_and_remember("alice", "n2", NOW + 301, NOW)
    assert len(cache) == 0


def test_a_key_over_its_cap_raises_its_floor_so_forgotten_nonces_stay_refused() -> None:
    """Attack: flood one's own key with nonces to push a captured request's nonce out, then replay it."""
    cache = NonceCache(max_per_key=4, max_entries=100)
    assert cache.check_and_remember("alice", "victim", NOW, NOW)
    for i in range(4):
        assert cache.check_and_remember("alice", f"n{i}", NOW + 1 + i, NOW + 1 + i)
    assert len(cache) == 4  # "victim" was forgotten...
    assert not cache.check_and_remember("alice", "victim", NOW, NOW + 6)  # ...but cannot be replayed
    assert cache.check_and_remember("alice", "late-but-new", NOW + 0.5, NOW + 6)  # above the floor
    assert cache.check_and_remember("bob", "victim", NOW, NOW + 6)  # other keys are unaffected


def test_many_keys_stay_within_max_entries_and_dropped_keys_cannot_replay() -> None:
    """Attack: flood the cache with fresh keys until a victim's nonces are evicted, then replay."""
    cache = NonceCache(max_per_key=2, max_entries=10)
    assert cache.check_and_remember("victim", "n", NOW, NOW)
    for i in range(50):
        assert cache.check_and_remember(f"sybil{i}", "x", NOW + 1 + i / 100, NOW + 1)
        assert len(cache) <= 10
    assert not cache.check_and_remember("victim", "n", NOW, NOW + 2)
    assert cache.key_count <= 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 9),
                          st.floats(-400, 400), st.floats(0, 50)), max_size=120))
def test_no_accepted_request_is_ever_accepted_twice(
        events: list[tuple[str, int, float, float]]) -> None:
    """Whatever the order, clock and caps, a (key, nonce) the cache accepted once it never accepts
    again while verify_request would still let its timestamp through."""
    cache = NonceCache(max_skew=100, max_per_key=3, max_entries=6)
    accepted: set[tuple[str, str]] = set()
    now = NOW
    for key, n, ts_offset, step in events:
        now += step
        ts = now + ts_offset
        nonce = f"{n}@{ts}"  # a nonce is signed together with its ts: a replay repeats both
        fresh = cache.check_and_remember(key, nonce, ts, now)
        if fresh:
            assert (key, nonce) not in accepted
            accepted.add((key, nonce))
            assert abs(ts - now) <= 100
        assert len(cache) <= 6
    for key, nonce in accepted:
        ts = float(nonce.split("@")[1])
        assert not cache.check_and_remember(key, nonce, ts, now)


def test_cache_parameters_are_checked() -> None:
    with pytest.raises(LocalError):
        NonceCache(max_per_key=10, max_entries=5)
    with pytest.raises(LocalError):
        NonceCache(max_skew=0)
