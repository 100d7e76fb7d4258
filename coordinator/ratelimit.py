"""Token buckets with an injected clock, one per key (an account, a source address).

Pure: `now` is passed in (monotonic seconds), nothing sleeps. `take` answers 0.0 when allowed,
else the seconds until it would be: the value of a 429's Retry-After.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections import OrderedDict

# Account registration per source address: someone starting a small cluster registers a dozen
# accounts from one address at once, which is normal; after that, one a minute.
REGISTRATION_RATE = 1 / 60
REGISTRATION_BURST = 16.0
# Signed requests per account: a busy SDK client polls and uploads well below this.
ACCOUNT_REQUEST_RATE = 50.0
ACCOUNT_REQUEST_BURST = 200.0
DEFAULT_MAX_KEYS = 100_000
EVICTION_SCAN = 16


class TokenBucket:
    """`burst` tokens, refilled at `rate` per second; starts full."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst >= 1):
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None

    def tokens(self, now: float) -> float:
        """Tokens available at `now` (without taking any)."""
        if self._last is None:
            return self._tokens
        # a clock that steps back refills nothing rather than draining the bucket
        return min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)

    def is_full(self, now: float) -> bool:
        return self.tokens(now) >= self.burst

    def take(self, now: float, cost: float = 1) -> float:
        """Take `cost` tokens: 0.0 if they were there, else the seconds until they will be
        (nothing is taken then, so a refused caller does not push its own wait further out)."""
        if not 0 <= cost <= self.burst:
            raise ValueError(f"cost {cost} can never be taken from a bucket of burst {self.burst}")
        tokens = self.tokens(now)
        self._last = now if self._last is None else max(self._last, now)
        if tokens >= cost:
            self._tokens = tokens - cost
            return 0.0
        self._tokens = tokens
        return (cost - tokens) / self.rate


class KeyedLimiter:
    """One `TokenBucket` per key, at most `max_keys` of them.

    To make room it drops a full bucket first (a new bucket is full too, so dropping one changes
    nothing), looking among the `EVICTION_SCAN` least recently used; if none of them is full the
    least recently used is dropped anyway, which hands that key a fresh burst. So memory stays
    bounded when someone cycles through many keys, at the price of the stalest key's partial
    limit; keep `max_keys` well above the number of keys in use."""

    def __init__(self, rate: float, burst: float, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        TokenBucket(rate, burst)  # validates rate and burst once, here, not on the first take
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def take(self, key: str, now: float, cost: float = 1) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, cost)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        # Look at a few of the least recently used only: they had the longest to refill, and a
        # bounded scan keeps one insert O(1) however many keys are held.
        oldest = itertools.islice(self._buckets.items(), EVICTION_SCAN)
        victim = next((key for key, bucket in oldest if bucket.is_full(now)), None)
        del self._buckets[next(iter(self._buckets)) if victim is None else victim]


def registration_limiter(max_keys: int = DEFAULT_MAX_KEYS) -> KeyedLimiter:
    """Account registrations per source address (key it by `address_key`)."""
    return KeyedLimiter(REGISTRATION_RATE, REGISTRATION_BURST, max_keys)


def request_limiter(max_keys: int = DEFAULT_MAX_KEYS) -> KeyedLimiter:
    """Signed requests per account (key it by the account id)."""
    return KeyedLimiter(ACCOUNT_REQUEST_RATE, ACCOUNT_REQUEST_BURST, max_keys)


def address_key(address: str) -> str:
    """The key to limit a source address by. One IPv6 host is routinely given a whole /64, so
    per-address limits on IPv6 apply to the /64 (otherwise one host has 2^64 fresh buckets);
    IPv4 (and IPv4-mapped IPv6) addresses count alone. Anything unparsable is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def retry_after_header(seconds: float) -> str:
    """`take`'s answer as a Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
