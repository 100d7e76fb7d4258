"""Token buckets with a controllable clock (coordinator/ratelimit.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.ratelimit import (
    ACCOUNT_REQUEST_BURST,
    ACCOUNT_REQUEST_RATE,
    EVICTION_SCAN,
    REGISTRATION_BURST,
    REGISTRATION_RATE,
    KeyedLimiter,
    TokenBucket,
    address_key,
    registration_limiter,
    request_limiter,
    retry_after_header,
)


def test_a_new_bucket_allows_its_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)  # one token at 2 per second


def test_a_bucket_refills_at_its_rate_and_never_above_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.tokens(0.25) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0
    assert bucket.tokens(1000.0) == 3  # an idle hour does not bank more than the burst
    assert [bucket.take(1000.0) for _ in range(4)][-1] == pytest.approx(0.5)


def test_a_refused_take_does_not_push_the_wait_further_out() -> None:
    """A client hammering at a full limiter must not be able to starve itself (or others) longer."""
    bucket = TokenBucket(rate=1.0, burst=1)
    bucket.take(0.0)
    assert [bucket.take(0.5) for _ in range(10)] == [pytest.approx(0.5)] * 10
    assert bucket.take(1.0) == 0.0


def test_retry_after_is_exactly_when_the_take_would_succeed() -> None:
    bucket = TokenBucket(rate=0.5, burst=2)
    bucket.take(10.0)
    bucket.take(10.0)
    wait = bucket.take(10.0, cost=2)
    assert wait == pytest.approx(4.0)
    assert bucket.take(10.0 + wait - 0.01, cost=2) > 0
    assert bucket.take(10.0 + wait, cost=2) == 0.0


def test_a_clock_that_steps_back_neither_refills_nor_drains() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    bucket.take(50.0)
    bucket.take(50.0)
    assert bucket.take(40.0) == pytest.approx(1.0)
    assert bucket.take(51.0) == 0.0


def test_bucket_parameters_and_costs_are_checked() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1, burst=0.5)
    with pytest.raises(ValueError, match="never be taken"):
        TokenBucket(rate=1, burst=2).take(0.0, cost=3)
    with pytest.raises(ValueError):
        KeyedLimiter(1, 1, max_keys=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 4)), max_size=80))
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_elapsed(steps: list[tuple[float, int]]) -> None:
    bucket = TokenBucket(rate=3.0, burst=5)
    now = granted = 0.0
    for step, cost in steps:
        now += step
        wait = bucket.take(now, cost)
        assert wait >= 0
        if wait == 0.0:
            granted += cost
        assert granted <= 5 + 3.0 * now + 1e-9


def test_keys_have_separate_buckets() -> None:
    limiter = KeyedLimiter(rate=1.0, burst=2)
    assert limiter.take("a", 0.0) == limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) == pytest.approx(1.0)
    assert limiter.take("b", 0.0) == 0.0


def test_the_limiter_holds_at_most_max_keys_and_drops_full_buckets_first() -> None:
    """Attack: cycle through many keys so the limiter either grows without bound or forgets the
    one key that is being limited."""
    limiter = KeyedLimiter(rate=1.0, burst=2, max_keys=3)
    limiter.take("drained", 0.0)
    limiter.take("drained", 0.0)  # empty: must survive
    limiter.take("idle", 0.0)     # one token used, full again a second later
    limiter.take("busy", 0.0)
    limiter.take("busy", 0.0)
    limiter.take("new", 1.0)      # "idle" is full at t=1: it goes, not "drained"
    assert "idle" not in limiter and "drained" in limiter and len(limiter) == 3
    assert limiter.take("drained", 1.0) == 0.0  # one token back after a second...
    assert limiter.take("drained", 1.0) == pytest.approx(1.0)  # ...and no fresh burst


def test_when_no_old_bucket_is_full_the_least_recently_used_goes() -> None:
    limiter = KeyedLimiter(rate=1.0, burst=5, max_keys=EVICTION_SCAN + 2)
    for i in range(EVICTION_SCAN + 2):
        for _ in range(5):
            limiter.take(f"k{i}", 0.0)
    limiter.take("k0", 0.0)  # k0 becomes the most recently used: k1 is now the oldest
    limiter.take("new", 0.1)
    assert "k1" not in limiter and "k0" in limiter and len(limiter) == EVICTION_SCAN + 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=400))
def test_the_limiter_never_holds_more_than_max_keys(keys: list[int]) -> None:
    limiter = KeyedLimiter(rate=1.0, burst=3, max_keys=20)
    for t, k in enumerate(keys):
        limiter.take(str(k), t * 0.01)
        assert len(limiter) <= 20


def test_registration_defaults_allow_a_small_cluster_then_one_a_minute() -> None:
    limiter = registration_limiter()
    assert (limiter.rate, limiter.burst) == (REGISTRATION_RATE, REGISTRATION_BURST) == (1 / 60, 16)
    assert all(limiter.take("203.0.113.9", 0.0) == 0.0 for _ in range(16))
    assert limiter.take("203.0.113.9", 0.0) == pytest.approx(60.0)
    assert limiter.take("203.0.113.9", 60.0) == 0.0
    assert limiter.take("198.51.100.1", 0.0) == 0.0  # another address is unaffected


def test_account_request_defaults_are_fifty_a_second_with_a_burst_of_two_hundred() -> None:
    limiter = request_limiter()
    assert (limiter.rate, limiter.burst) == (ACCOUNT_REQUEST_RATE, ACCOUNT_REQUEST_BURST) == (50, 200)
    assert all(limiter.take("alice", 0.0) == 0.0 for _ in range(200))
    assert limiter.take("alice", 0.0) == pytest.approx(0.02)


@pytest.mark.parametrize(("address", "key"), [
    ("203.0.113.9", "203.0.113.9"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.9", "203.0.113.9"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not-an-address", "not-an-address"),
])
def test_ipv6_addresses_are_limited_per_64(address: str, key: str) -> None:
    """Attack: one IPv6 host registering from each of the 2^64 addresses its /64 gives it."""
    assert address_key(address) == key


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert [retry_after_header(s) for s in (0.0, 0.02, 1.0, 59.5)] == ["1", "1", "1", "60"]
