"""The coordinator's membership service: accounts, node registration, request authentication,
rate limits and quotas. The rules live in the pure `accounts.py` and `ratelimit.py`; this adapter
persists their records through the store, asks the broker for per-node credentials, and answers the
HTTP middleware's questions (it is the middleware's `Gate`).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from protocol.certs import NodeCertificate
from protocol.httpauth import NonceCache

from .accounts import Account, Accounts, NodeRecord, Policy, Refused
from .http_auth import Gate, Principal
from .ratelimit import KeyedLimiter, address_key, registration_limiter
from .settings import CoordinatorSettings
from .store import CoordinatorStore

log = logging.getLogger("sparecycles.coordinator.membership")

# (node id) -> the node's broker password; None when the broker is not access-controlled.
Provision = Callable[[str], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class MqttCredentials:
    username: str
    password: str


@dataclass(slots=True)
class Usage:
    open_jobs: int = 0
    stored_bytes: int = 0


class QuotaExceeded(Refused):
    pass


class Membership:
    def __init__(self, *, settings: CoordinatorSettings, store: CoordinatorStore, audience: str,
                 coordinator_key: bytes, counters: Counter[str]) -> None:
        self.settings = settings
        self.store = store
        self.audience = audience
        self.counters = counters
        self.policy = Policy(settings.registration)
        registrations = registration_limiter()
        self.accounts = Accounts(policy=self.policy,
                                 source_limit=lambda source, now: registrations.take(address_key(source), now))
        self._operator_keys = {coordinator_key, *(bytes.fromhex(k) for k in settings.operator_keys)}
        self._nonces = NonceCache()
        self._requests = KeyedLimiter(settings.request_rate, settings.request_burst)
        self.usage: dict[str, Usage] = {}
        self.provision: Provision | None = None
        self._refusal_logged: dict[str, float] = {}

    async def load(self) -> None:
        self.accounts.load(*await self.store.load_accounts())

    # ---- the HTTP middleware's questions (http_auth.Gate) -----------------------------------
    def resolve(self, public_key: bytes, key_id: str, now: float) -> Principal:
        account = self.accounts.by_id(key_id)
        node = self.accounts.node(key_id)
        if node is not None and self.accounts.owner_of(key_id, now) is None:
            node = None  # expired certificate or blocked owner: not a node in good standing
        operator = public_key in self._operator_keys or (account is not None and account.operator)
        return Principal(key_id=key_id, public_key=public_key, account=account, node=node, operator=operator)

    def fresh_nonce(self, key_id: str, nonce: str, ts: float, now: float) -> bool:
        return self._nonces.check_and_remember(key_id, nonce, ts, now)

    def request_wait(self, principal: Principal, now: float) -> float:
        if principal.operator or principal.node is not None:
            return 0.0  # nodes fetch inputs as fast as they run; their rate is bounded by their leases
        return self._requests.take(principal.key_id, now)

    def count(self, reason: str) -> None:
        self.counters[f"http_{reason}"] += 1

    # ---- nodes on the broker -----------------------------------------------------------------
    def owner_of(self, node: str, now: float) -> str | None:
        return self.accounts.owner_of(node, now)

    def log_refused_node(self, node: str, now: float) -> None:
        """Once a minute per node: a refused node retries every heartbeat."""
        if now - self._refusal_logged.get(node, -1e9) >= 60.0:
            self._refusal_logged[node] = now
            log.warning("node refused node=%s reason=%r", node, self.accounts.why_refused(node, now))

    # ---- accounts ----------------------------------------------------------------------------
    async def register(self, public_key: bytes, name: str, *, source: str, invite: str | None,
                       now: float) -> tuple[Account, bool]:
        account, used, created = self.accounts.register(public_key, name, now=now, source=source, invite=invite)
        if created:
            await self.store.save_accounts(accounts=[account], invites=[used] if used is not None else [])
            log.info("account registered name=%s account=%s source=%s", account.name, account.id, source)
            grant = self.starting_grant
            if grant > 0:
                await self.store.grant(account.name, grant, key=f"start:{account.id}", memo="starting grant",
                                       created_at=now)
        return account, created

    @property
    def starting_grant(self) -> int:
        if self.settings.starting_grant is not None:
            return self.settings.starting_grant
        return DEFAULT_OPEN_GRANT if self.policy is Policy.OPEN else 0

    async def add(self, public_key: bytes, name: str, *, operator: bool, now: float) -> Account:
        account = self.accounts.add(public_key, name, now=now, operator=operator)
        await self.store.save_accounts(accounts=[account])
        log.info("account added by operator name=%s account=%s", account.name, account.id)
        return account

    async def set_blocked(self, name: str, blocked: bool) -> Account:
        account = self.accounts.set_blocked(name, blocked)
        await self.store.save_accounts(accounts=[account])
        log.warning("account %s name=%s", "blocked" if blocked else "unblocked", name)
        return account

    async def grant(self, name: str, amount: int, *, memo: str, now: float) -> None:
        if self.accounts.by_name(name) is None:
            raise Refused(404, f"no account named {name!r}", reason="unknown_account")
        if amount <= 0:
            raise Refused(400, "a grant is a positive whole number of credits", reason="bad_grant")
        await self.store.grant(name, amount, key=f"grant:{secrets.token_hex(16)}", memo=memo, created_at=now)
        log.info("credit granted account=%s amount=%d memo=%r", name, amount, memo)

    async def issue_invite(self, now: float) -> str:
        token = secrets.token_urlsafe(24)
        await self.store.save_accounts(invites=[self.accounts.issue_invite(token, now=now)])
        return token

    async def certify_node(self, public_key: bytes, certificate: NodeCertificate,
                           now: float) -> tuple[NodeRecord, MqttCredentials | None]:
        record = self.accounts.certify(public_key, certificate, now=now)
        await self.store.save_accounts(nodes=[record])
        credentials = None
        if self.provision is not None:
            credentials = MqttCredentials(username=record.node, password=await self.provision(record.node))
        log.info("node registered node=%s owner=%s expires_at=%.0f", record.node, record.owner, record.expires_at)
        return record, credentials

    # ---- quotas ------------------------------------------------------------------------------
    def check_job_quota(self, account: str, input_bytes: int) -> None:
        """Before anything of a new job is stored: refuse past the account's open jobs or bytes."""
        usage = self.usage.get(account, Usage())
        s = self.settings
        if usage.open_jobs + 1 > s.max_open_jobs:
            raise QuotaExceeded(429, f"{account} has {usage.open_jobs} open jobs, the limit is {s.max_open_jobs}: "
                                     "wait for one to finish", reason="quota_open_jobs", retry_after=5.0)
        if usage.stored_bytes + input_bytes > s.max_stored_bytes:
            raise QuotaExceeded(429, f"{account} stores {usage.stored_bytes} bytes; this job's {input_bytes} more "
                                     f"would pass the limit of {s.max_stored_bytes}", reason="quota_bytes",
                                retry_after=60.0)

    def check_model_quota(self, account: str, size: int) -> None:
        usage = self.usage.get(account, Usage())
        if usage.stored_bytes + size > self.settings.max_stored_bytes:
            raise QuotaExceeded(429, f"{account} stores {usage.stored_bytes} bytes; this model's {size} more would "
                                     f"pass the limit of {self.settings.max_stored_bytes}", reason="quota_bytes",
                                retry_after=60.0)

    def job_opened(self, account: str, input_bytes: int) -> None:
        usage = self.usage.setdefault(account, Usage())
        usage.open_jobs += 1
        usage.stored_bytes += input_bytes

    def job_closed(self, account: str) -> None:
        usage = self.usage.get(account)
        if usage is not None and usage.open_jobs > 0:
            usage.open_jobs -= 1

    def job_expired(self, account: str, input_bytes: int) -> None:
        """A finished job's inputs were deleted (retention or its submitter): they count no more."""
        usage = self.usage.get(account)
        if usage is not None:
            usage.stored_bytes = max(0, usage.stored_bytes - input_bytes)

    def model_stored(self, account: str, size: int) -> None:
        self.usage.setdefault(account, Usage()).stored_bytes += size


# An open local coordinator gives each new account enough credit for every command of today
# (a few GFLOP per job); a closed or invite-only one gives nothing unless --starting-grant says so.
DEFAULT_OPEN_GRANT = 10**12


def _is_a_gate(m: Membership) -> Gate:
    return m  # mypy checks that Membership answers everything the HTTP middleware asks
