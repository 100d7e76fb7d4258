"""Signed HTTP requests: who sent this request, for which coordinator, and is it fresh.

    Authorization: Sparecycles-Ed25519 key=<64 hex>,ts=<unix ms>,nonce=<32 hex>,sig=<128 hex>

The signature is protocol.signing's, kind "http", over the NUL-separated
`audience, METHOD, path?query, ts, nonce, sha256hex(body)`:
- the audience (the coordinator's id) stops a request signed for one deployment being replayed
  at another;
- method, path and query exactly as sent, and the body's digest, stop a signature being moved to
  another request;
- the timestamp bounds how long a captured request is worth anything, and the nonce (remembered
  by `NonceCache` for exactly that long) stops it being replayed within that window.
Only the path may contain arbitrary characters and it is forbidden NULs; every other field has a
fixed alphabet, so the signed bytes parse one way only.
"""

from __future__ import annotations

import heapq
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from .digests import is_sha256_hex, node_id_from_public_key, sha256_hex
from .errors import AuthError, BadSignature, LocalError
from .signing import Identity, verify

SCHEME = "Sparecycles-Ed25519"
KIND = "http"
DEFAULT_MAX_SKEW = 300.0
# A well-formed header is ~290 characters; a longer one is refused before any parsing.
MAX_HEADER = 512
MAX_PATH = 8192

_FIELDS = {
    "key": re.compile(r"[0-9a-f]{64}"),
    "ts": re.compile(r"[0-9]{1,15}"),  # unix ms; 15 digits reach the year 33658
    "nonce": re.compile(r"[0-9a-f]{32}"),
    "sig": re.compile(r"[0-9a-f]{128}"),
}
_METHOD = re.compile(r"[A-Z]{1,16}")
# origin-form request target: printable ASCII and non-ASCII text, no spaces or control characters
_PATH = re.compile(r"/[^\x00-\x20\x7f]*")


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """Who signed a request that verified. `ts` is the signer's clock in unix seconds."""

    public_key: bytes
    key_id: str
    ts: float
    nonce: str


def request_bytes(*, audience: str, method: str, path_qs: str, ts_ms: int, nonce: str, body_sha256: str) -> bytes:
    """What the signature covers (before protocol.signing's domain tag and kind)."""
    return "\x00".join((audience, method, path_qs, str(ts_ms), nonce, body_sha256)).encode("utf-8")


def _target_problem(*, audience: str, method: str, path_qs: str) -> str | None:
    if not audience or "\x00" in audience:
        return "audience must be a non-empty string without NUL"
    if not _METHOD.fullmatch(method):
        return f"method {method[:20]!r} is not an HTTP method"
    if len(path_qs) > MAX_PATH or not _PATH.fullmatch(path_qs):
        return "request target must be a path starting with / without spaces or control characters"
    try:
        path_qs.encode("utf-8")
    except UnicodeEncodeError:
        return "request target is not valid text"
    return None


def sign_request(identity: Identity, *, method: str, path_qs: str, body: bytes, audience: str, now: float,
                 nonce: str | None = None) -> str:
    """The `Authorization` header value for one request. `path_qs` is the path and query exactly
    as they go on the wire (percent-encoding included); `now` is wall-clock unix seconds."""
    method = method.upper()
    problem = _target_problem(audience=audience, method=method, path_qs=path_qs)
    if problem is not None:
        raise LocalError(problem)
    if not math.isfinite(now) or now < 0:
        raise LocalError(f"now must be a unix time, not {now}")
    nonce = os.urandom(16).hex() if nonce is None else nonce
    if not _FIELDS["nonce"].fullmatch(nonce):
        raise LocalError("nonce must be 32 lowercase hex characters")
    ts_ms = round(now * 1000)
    signature = identity.sign(KIND, request_bytes(audience=audience, method=method, path_qs=path_qs,
                                                  ts_ms=ts_ms, nonce=nonce, body_sha256=sha256_hex(body)))
    return f"{SCHEME} key={identity.public_key.hex()},ts={ts_ms},nonce={nonce},sig={signature.hex()}"


def parse_authorization(header: str | None) -> tuple[bytes, int, str, bytes]:
    """(public key, ts in ms, nonce, signature) from the header value; `AuthError` if it is not
    exactly the four parameters this scheme defines."""
    if header is None or not header.strip():
        raise AuthError("missing Authorization header")
    if len(header) > MAX_HEADER:
        raise AuthError("malformed Authorization header: too long", size=len(header))
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != SCHEME.lower():  # auth schemes are case-insensitive (RFC 9110 §11.1)
        raise AuthError(f"malformed Authorization header: the scheme must be {SCHEME}")
    values: dict[str, str] = {}
    for part in params.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in _FIELDS or name in values or not _FIELDS[name].fullmatch(value):
            raise AuthError(f"malformed Authorization header: expected {SCHEME} "
                            "key=<64 hex>,ts=<unix ms>,nonce=<32 hex>,sig=<128 hex>")
        values[name] = value
    if len(values) != len(_FIELDS):
        missing = ", ".join(sorted(set(_FIELDS) - set(values)))
        raise AuthError(f"malformed Authorization header: missing {missing}")
    return bytes.fromhex(values["key"]), int(values["ts"]), values["nonce"], bytes.fromhex(values["sig"])


def verify_request(header: str | None, *, method: str, path_qs: str, body_sha256: str, audience: str,
                   now: float, max_skew: float = DEFAULT_MAX_SKEW) -> SignedRequest:
    """Check a request's `Authorization` header against what this server received.

    `path_qs` must be the raw request target as received (aiohttp: `request.raw_path`), `now` the
    time the request arrived (before a long body upload). Does not check replays: pass the result
    to `NonceCache.check_and_remember` once the key is known to be an account or a node."""
    if not is_sha256_hex(body_sha256):
        raise LocalError("body_sha256 must be a sha256 hex digest")
    public_key, ts_ms, nonce, signature = parse_authorization(header)
    problem = _target_problem(audience=audience, method=method, path_qs=path_qs)
    if problem is not None:
        raise AuthError(f"cannot authenticate this request: {problem}")
    ts = ts_ms / 1000
    # cheap before the signature: a stale request costs no Ed25519 verification
    if abs(ts - now) > max_skew:
        raise AuthError(f"request time is {abs(ts - now):.0f} s away from the coordinator's clock "
                        f"(limit {max_skew:g} s)")
    signed = request_bytes(audience=audience, method=method, path_qs=path_qs, ts_ms=ts_ms, nonce=nonce,
                           body_sha256=body_sha256)
    try:
        verify(public_key, KIND, signed, signature)
    except BadSignature as exc:
        raise AuthError("signature does not verify") from exc
    return SignedRequest(public_key=public_key, key_id=node_id_from_public_key(public_key), ts=ts, nonce=nonce)


@dataclass(slots=True)
class _KeyNonces:
    floor: float = -math.inf  # nothing at or below this ts is accepted: its nonces were forgotten
    last_used: float = -math.inf
    heap: list[tuple[float, str]] = field(default_factory=list)  # (ts, nonce), oldest first
    seen: set[str] = field(default_factory=set)


class NonceCache:
    """Remembers (key, nonce) pairs for as long as `verify_request` would accept their timestamp.

    Pure: time is passed in. Memory is bounded: entries whose ts is more than `max_skew` in the
    past are dropped (verify_request refuses them anyway), a key keeps at most `max_per_key`
    nonces and the cache at most about `max_entries`. Forgetting a nonce early must not open a
    replay, so each early eviction raises a floor instead: a per-key floor when a key exceeds its
    cap, a global one when the least recently used key is dropped to fit `max_entries`, and any
    request with ts at or below a floor is refused. An honest client only meets a floor when its
    requests arrive more than `max_per_key` requests out of order, or while someone floods the
    cache with many keys; either way a retry with a fresh timestamp passes.
    """

    def __init__(self, *, max_skew: float = DEFAULT_MAX_SKEW, max_per_key: int = 1024,
                 max_entries: int = 200_000) -> None:
        if max_skew <= 0 or max_per_key < 1 or max_entries < max_per_key:
            raise LocalError("need max_skew > 0 and 1 <= max_per_key <= max_entries")
        self.max_skew = max_skew
        self.max_per_key = max_per_key
        self.max_entries = max_entries
        self._keys: OrderedDict[str, _KeyNonces] = OrderedDict()  # least recently used first
        self._floor = -math.inf
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def check_and_remember(self, key_id: str, nonce: str, ts: float, now: float) -> bool:
        """True the first time (key_id, nonce) is seen; False for a replay, or for a ts outside
        the window of ±max_skew around `now` or at or below a floor (it cannot be told apart
        from a replay)."""
        self._expire(now)
        if abs(ts - now) > self.max_skew or ts <= self._floor:
            return False
        entry = self._keys.get(key_id)
        if entry is None:
            entry = self._keys[key_id] = _KeyNonces()
        else:
            self._purge(entry, now)
            if ts <= entry.floor or nonce in entry.seen:
                return False
        heapq.heappush(entry.heap, (ts, nonce))
        entry.seen.add(nonce)
        entry.last_used = max(entry.last_used, now)
        self._keys.move_to_end(key_id)
        self._size += 1
        if len(entry.seen) > self.max_per_key:
            old_ts, old_nonce = heapq.heappop(entry.heap)
            entry.seen.discard(old_nonce)
            entry.floor = max(entry.floor, old_ts)
            self._size -= 1
        while self._size > self.max_entries:
            _, dropped = self._keys.popitem(last=False)
            self._size -= len(dropped.seen)
            self._floor = max(self._floor, dropped.floor, *(t for t, _ in dropped.heap))
        return True

    def _purge(self, entry: _KeyNonces, now: float) -> None:
        while entry.heap and entry.heap[0][0] < now - self.max_skew:
            _, old = heapq.heappop(entry.heap)
            entry.seen.discard(old)
            self._size -= 1

    def _expire(self, now: float) -> None:
        # A key last written at t holds only ts <= t + max_skew, all expired once
        # now > t + 2 * max_skew; keys are kept in order of last write, so this is amortised O(1).
        while self._keys:
            key, entry = next(iter(self._keys.items()))
            if entry.last_used >= now - 2 * self.max_skew:
                return
            del self._keys[key]
            self._size -= len(entry.seen)
