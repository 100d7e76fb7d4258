"""Pure: who may act. Accounts (an Ed25519 key with a name bound to it), the nodes they certified,
invites and the registration policy. No I/O and no clock of its own: `now` is passed in, and every
change comes back as a record the caller persists (`AccountSaved`, `NodeSaved`, `InviteSaved`).

Attacks this answers (DESIGN.md §12): a node claiming any owner (the owner is the certified one,
never a name from a message), a second key taking `alice` (names are bound to the first key), a
blocked owner's nodes still earning (a blocked owner's nodes are refused), a burst of Sybil
registrations from one address on an open coordinator (rate-limited per source).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from protocol.certs import NodeCertificate
from protocol.digests import node_id_from_public_key
from protocol.errors import BadCertificate

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Policy(StrEnum):
    OPEN = "open"  # anyone may register (rate-limited per source address)
    INVITE = "invite"  # registration needs a one-time token the operator issued
    CLOSED = "closed"  # only the operator adds accounts


@dataclass(frozen=True, slots=True)
class Account:
    id: str  # derived from the key: base32(sha256(pk)[:16])
    name: str
    public_key: bytes
    created_at: float
    blocked: bool = False
    operator: bool = False

    def to_json(self) -> dict[str, object]:
        return {"account": self.id, "name": self.name, "public_key": self.public_key.hex(),
                "created_at": self.created_at, "blocked": self.blocked, "operator": self.operator}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node key and the account its certificate binds it to, until the certificate expires."""

    node: str
    public_key: bytes
    owner: str  # account name
    owner_id: str
    expires_at: float
    registered_at: float

    def to_json(self) -> dict[str, object]:
        return {"node": self.node, "owner": self.owner, "account": self.owner_id, "expires_at": self.expires_at,
                "registered_at": self.registered_at}


@dataclass(frozen=True, slots=True)
class Invite:
    token_sha256: str
    created_at: float
    used_by: str | None = None  # account id


class Refused(Exception):
    """A request the rules refuse: `status` is the HTTP status that says so, the message one line
    that says what to do, `retry_after` seconds for a rate limit."""

    def __init__(self, status: int, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # a counter name
        self.retry_after = retry_after


def invite_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# (source, now) -> seconds to wait (0.0: allowed). coordinator.ratelimit.KeyedLimiter fits.
SourceLimit = Callable[[str, float], float]


class Accounts:
    """The registry the coordinator consults on every request and work request; the store holds
    its records (rebuilt with `load`)."""

    def __init__(self, *, policy: Policy, source_limit: SourceLimit | None = None) -> None:
        self.policy = policy
        self._source_limit = source_limit
        self._by_id: dict[str, Account] = {}
        self._by_name: dict[str, Account] = {}
        self._nodes: dict[str, NodeRecord] = {}
        self._invites: dict[str, Invite] = {}

    def load(self, accounts: Iterable[Account], nodes: Iterable[NodeRecord], invites: Iterable[Invite]) -> None:
        for a in accounts:
            self._put(a)
        for n in nodes:
            self._nodes[n.node] = n
        for i in invites:
            self._invites[i.token_sha256] = i

    # ---- reads -------------------------------------------------------------------------------
    def by_key(self, public_key: bytes) -> Account | None:
        return self._by_id.get(node_id_from_public_key(public_key))

    def by_id(self, account_id: str) -> Account | None:
        return self._by_id.get(account_id)

    def by_name(self, name: str) -> Account | None:
        return self._by_name.get(name)

    def all(self) -> list[Account]:
        return sorted(self._by_id.values(), key=lambda a: a.name)

    def node(self, node: str) -> NodeRecord | None:
        return self._nodes.get(node)

    def nodes_of(self, name: str) -> list[NodeRecord]:
        return sorted((n for n in self._nodes.values() if n.owner == name), key=lambda n: n.node)

    def owner_of(self, node: str, now: float) -> str | None:
        """The certified owner a node acts for now; None if it has no valid certificate or its
        owner is blocked. Called for every work request: two dict lookups."""
        rec = self._nodes.get(node)
        if rec is None or rec.expires_at <= now:
            return None
        owner = self._by_id.get(rec.owner_id)
        return None if owner is None or owner.blocked else owner.name

    def why_refused(self, node: str, now: float) -> str:
        rec = self._nodes.get(node)
        if rec is None:
            return "node is not registered: it must present an owner's certificate (POST /v1/nodes)"
        if rec.expires_at <= now:
            return "the node's certificate has expired: the owner must certify it again"
        return f"owner {rec.owner!r} is blocked"

    # ---- changes -----------------------------------------------------------------------------
    def register(self, public_key: bytes, name: str, *, now: float, source: str,
                 invite: str | None = None) -> tuple[Account, Invite | None, bool]:
        """Self-registration under the policy. Returns the account, the invite it used (to persist)
        and whether it is new. The same key registering the same name again is a no-op."""
        existing = self.by_key(public_key)
        if existing is not None:
            if existing.name != name:
                raise Refused(409, f"this key is already the account {existing.name!r}", reason="key_taken")
            return existing, None, False
        self._check_name(name)
        used: Invite | None = None
        if self.policy is Policy.CLOSED:
            raise Refused(403, "registration is closed: ask the operator to add your key "
                               "(sparecycles admin add NAME PUBKEY)", reason="registration_closed")
        if self.policy is Policy.INVITE:
            found = self._invites.get(invite_hash(invite)) if invite else None
            if found is None or found.used_by is not None:
                raise Refused(403, "registration needs an unused invite token from the operator (--invite TOKEN)",
                              reason="bad_invite")
        if self.policy is Policy.OPEN and self._source_limit is not None:
            wait = self._source_limit(source, now)
            if wait > 0:
                raise Refused(429, f"too many registrations from {source}: retry in {wait:.0f} s",
                              reason="registration_rate", retry_after=wait)
        account = Account(id=node_id_from_public_key(public_key), name=name, public_key=public_key, created_at=now)
        if self.policy is Policy.INVITE:
            assert invite is not None
            used = replace(self._invites[invite_hash(invite)], used_by=account.id)
            self._invites[used.token_sha256] = used
        self._put(account)
        return account, used, True

    def add(self, public_key: bytes, name: str, *, now: float, operator: bool = False) -> Account:
        """The operator adds an account, whatever the policy."""
        existing = self.by_key(public_key)
        if existing is not None:
            raise Refused(409, f"this key is already the account {existing.name!r}", reason="key_taken")
        self._check_name(name)
        account = Account(id=node_id_from_public_key(public_key), name=name, public_key=public_key, created_at=now,
                          operator=operator)
        self._put(account)
        return account

    def set_blocked(self, name: str, blocked: bool) -> Account:
        account = self._by_name.get(name)
        if account is None:
            raise Refused(404, f"no account named {name!r}", reason="unknown_account")
        account = replace(account, blocked=blocked)
        self._put(account)
        return account

    def issue_invite(self, token: str, *, now: float) -> Invite:
        invite = Invite(token_sha256=invite_hash(token), created_at=now)
        self._invites[invite.token_sha256] = invite
        return invite

    def certify(self, node_public_key: bytes, certificate: NodeCertificate, *, now: float) -> NodeRecord:
        """Register a node under the account whose key signed its certificate. The caller has checked
        that the request itself is signed by `node_public_key` (possession of the node key)."""
        try:
            certificate.verify(now=now, node_public_key=node_public_key)
        except BadCertificate as exc:
            raise Refused(403, f"certificate refused: {exc}", reason="bad_certificate") from None
        owner = self._by_id.get(node_id_from_public_key(certificate.owner_public_key))
        if owner is None:
            raise Refused(403, "the certificate's owner key is not a registered account: register it first "
                               "(sparecycles node --owner NAME does so on an open coordinator)",
                          reason="unknown_owner")
        if owner.blocked:
            raise Refused(403, f"owner {owner.name!r} is blocked", reason="owner_blocked")
        node = node_id_from_public_key(node_public_key)
        if node in self._by_id:
            raise Refused(409, "a node key must not also be an account key", reason="key_reuse")
        rec = NodeRecord(node=node, public_key=node_public_key, owner=owner.name, owner_id=owner.id,
                         expires_at=certificate.expires_at, registered_at=now)
        self._nodes[node] = rec
        return rec

    def _check_name(self, name: str) -> None:
        if not NAME.match(name):
            raise Refused(400, "an account name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                               "or digit", reason="bad_name")
        if name in self._by_name:
            raise Refused(409, f"the name {name!r} belongs to another key", reason="name_taken")

    def _put(self, account: Account) -> None:
        self._by_id[account.id] = account
        self._by_name[account.name] = account
