"""The account and node-certificate rules, pure: keys, names, policies, blocking, time passed in."""

from __future__ import annotations

import pytest

from coordinator.accounts import Accounts, Invite, Policy, Refused, invite_hash
from coordinator.ratelimit import KeyedLimiter
from protocol.certs import issue_certificate
from protocol.signing import Identity

NOW = 1_800_000_000.0


def open_registry(burst: float = 16) -> Accounts:
    limiter = KeyedLimiter(1 / 60, burst)
    return Accounts(policy=Policy.OPEN, source_limit=lambda source, now: limiter.take(source, now))


def test_a_name_is_bound_to_the_first_key_and_re_registering_is_idempotent() -> None:
    # Attack: a second key registers as `alice` to be credited for alice's work or to smear her.
    accounts = open_registry()
    alice, mallory = Identity.generate(), Identity.generate()
    first, _, created = accounts.register(alice.public_key, "alice", now=NOW, source="1.2.3.4")
    assert created and first.id == alice.id
    again, _, created_again = accounts.register(alice.public_key, "alice", now=NOW + 1, source="1.2.3.4")
    assert again == first and not created_again
    with pytest.raises(Refused) as refused:
        accounts.register(mallory.public_key, "alice", now=NOW, source="5.6.7.8")
    assert refused.value.status == 409 and "another key" in str(refused.value)
    with pytest.raises(Refused) as renamed:
        accounts.register(alice.public_key, "alice2", now=NOW, source="1.2.3.4")
    assert renamed.value.status == 409
    assert accounts.by_name("alice") == first and accounts.by_name("alice2") is None


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_names_are_plain_labels(name: str) -> None:
    with pytest.raises(Refused) as refused:
        open_registry().register(Identity.generate().public_key, name, now=NOW, source="s")
    assert refused.value.status == 400


def test_open_registration_allows_a_small_cluster_and_rate_limits_a_sybil_burst() -> None:
    # Attack: one address registers thousands of identities to collude with itself.
    accounts = open_registry(burst=16)
    for i in range(12):  # one person starting a small cluster: normal
        accounts.register(Identity.generate().public_key, f"n{i}", now=NOW, source="10.0.0.1")
    for i in range(12, 16):
        accounts.register(Identity.generate().public_key, f"n{i}", now=NOW, source="10.0.0.1")
    with pytest.raises(Refused) as limited:
        accounts.register(Identity.generate().public_key, "n16", now=NOW, source="10.0.0.1")
    assert limited.value.status == 429 and limited.value.retry_after is not None and limited.value.retry_after > 0
    assert accounts.by_name("n16") is None
    accounts.register(Identity.generate().public_key, "elsewhere", now=NOW, source="10.0.0.2")  # others unaffected
    accounts.register(Identity.generate().public_key, "later", now=NOW + 61, source="10.0.0.1")  # refilled


def test_invite_policy_needs_an_unused_token_and_closed_refuses_everyone() -> None:
    invited = Accounts(policy=Policy.INVITE)
    with pytest.raises(Refused) as none:
        invited.register(Identity.generate().public_key, "a", now=NOW, source="s")
    assert none.value.status == 403
    invited.issue_invite("tok", now=NOW)
    account, used, created = invited.register(Identity.generate().public_key, "a", now=NOW, source="s", invite="tok")
    assert created and used == Invite(token_sha256=invite_hash("tok"), created_at=NOW, used_by=account.id)
    with pytest.raises(Refused):  # a token works once
        invited.register(Identity.generate().public_key, "b", now=NOW, source="s", invite="tok")
    closed = Accounts(policy=Policy.CLOSED)
    with pytest.raises(Refused) as shut:
        closed.register(Identity.generate().public_key, "c", now=NOW, source="s")
    assert shut.value.status == 403 and "operator" in str(shut.value)
    added = closed.add(Identity.generate().public_key, "c", now=NOW)
    assert closed.by_name("c") == added


def test_the_owner_of_a_node_is_the_one_its_certificate_names() -> None:
    # Attack: a node claims to be alice's (to keep her real nodes off tasks, or to earn for her).
    accounts = open_registry()
    alice, mallory, node = Identity.generate(), Identity.generate(), Identity.generate()
    accounts.register(alice.public_key, "alice", now=NOW, source="s")
    accounts.register(mallory.public_key, "mallory", now=NOW, source="s")
    cert = issue_certificate(mallory, node.public_key, now=NOW, valid_seconds=3600)
    record = accounts.certify(node.public_key, cert, now=NOW)
    assert record.owner == "mallory" and accounts.owner_of(node.id, NOW) == "mallory"
    # a certificate alice signed for another node key does not register this node
    other = issue_certificate(alice, Identity.generate().public_key, now=NOW)
    with pytest.raises(Refused) as wrong_key:
        accounts.certify(node.public_key, other, now=NOW)
    assert wrong_key.value.status == 403
    assert accounts.owner_of(node.id, NOW) == "mallory"


def test_expired_certificates_unknown_owners_and_blocked_owners_are_refused() -> None:
    accounts = open_registry()
    alice, stranger, node = Identity.generate(), Identity.generate(), Identity.generate()
    accounts.register(alice.public_key, "alice", now=NOW, source="s")
    expired = issue_certificate(alice, node.public_key, now=NOW - 7200, valid_seconds=3600)
    with pytest.raises(Refused, match="expired"):
        accounts.certify(node.public_key, expired, now=NOW)
    with pytest.raises(Refused, match="not a registered account"):
        accounts.certify(node.public_key, issue_certificate(stranger, node.public_key, now=NOW), now=NOW)
    record = accounts.certify(node.public_key, issue_certificate(alice, node.public_key, now=NOW, valid_seconds=60),
                              now=NOW)
    assert accounts.owner_of(node.id, NOW + 59) == "alice"
    assert accounts.owner_of(node.id, NOW + 61) is None  # the certificate ran out: the node no longer acts
    assert "expired" in accounts.why_refused(node.id, NOW + 61)
    accounts.certify(node.public_key, issue_certificate(alice, node.public_key, now=NOW), now=NOW)
    accounts.set_blocked("alice", True)
    assert accounts.owner_of(record.node, NOW) is None and "blocked" in accounts.why_refused(record.node, NOW)
    with pytest.raises(Refused, match="blocked"):
        accounts.certify(node.public_key, issue_certificate(alice, node.public_key, now=NOW), now=NOW)
    accounts.set_blocked("alice", False)
    assert accounts.owner_of(record.node, NOW) == "alice"


def test_a_registry_rebuilt_from_its_records_answers_the_same() -> None:
    accounts = open_registry()
    alice, node = Identity.generate(), Identity.generate()
    account, _, _ = accounts.register(alice.public_key, "alice", now=NOW, source="s")
    record = accounts.certify(node.public_key, issue_certificate(alice, node.public_key, now=NOW), now=NOW)
    invite = accounts.issue_invite("t", now=NOW)
    rebuilt = Accounts(policy=Policy.OPEN)
    rebuilt.load([account], [record], [invite])
    assert rebuilt.by_key(alice.public_key) == account and rebuilt.owner_of(node.id, NOW) == "alice"
