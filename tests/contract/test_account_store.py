"""Accounts, nodes and invites survive in every CoordinatorStore backend (the contract of
`save_accounts`/`load_accounts`), so a restarted coordinator knows who may act."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from coordinator.accounts import Account, Invite, NodeRecord
from coordinator.store import CoordinatorStore
from coordinator.store_factory import open_store


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[CoordinatorStore]:
    s = open_store(store_url)
    yield s
    await s.close()


ALICE = Account(id="a" * 26, name="alice", public_key=b"\x01" * 32, created_at=1.0)
NODE = NodeRecord(node="n" * 26, public_key=b"\x02" * 32, owner="alice", owner_id="a" * 26, expires_at=99.0,
                  registered_at=2.0)
INVITE = Invite(token_sha256="f" * 64, created_at=3.0)


async def test_saved_records_load_back_equal(store: CoordinatorStore) -> None:
    await store.save_accounts(accounts=[ALICE], nodes=[NODE], invites=[INVITE])
    assert await store.load_accounts() == ([ALICE], [NODE], [INVITE])


async def test_saving_again_replaces_by_key(store: CoordinatorStore) -> None:
    # blocking, a re-certified node and a used invite are updates of the same records, never copies
    await store.save_accounts(accounts=[ALICE], nodes=[NODE], invites=[INVITE])
    blocked = replace(ALICE, blocked=True)
    renewed = replace(NODE, expires_at=199.0)
    used = replace(INVITE, used_by=ALICE.id)
    await store.save_accounts(accounts=[blocked], nodes=[renewed], invites=[used])
    assert await store.load_accounts() == ([blocked], [renewed], [used])


async def test_accounts_survive_reopening(durable_url: str) -> None:
    url = durable_url
    s = open_store(url)
    await s.save_accounts(accounts=[ALICE], nodes=[NODE])
    await s.close()
    s2 = open_store(url)
    try:
        assert await s2.load_accounts() == ([ALICE], [NODE], [])
    finally:
        await s2.close()


async def test_trust_records_survive_in_every_store(store: CoordinatorStore) -> None:
    # A node's earned trust (and a penalty's reset) outlives a restart: the records load back equal.
    rows = [("node", "n1", {"streak": 12, "valid": 40, "invalid": 0, "errors": 1, "audits_passed": 12,
                            "audits_failed": 0, "last_seen": 5.0, "last_problem": None}),
            ("owner", "alice", {"streak": 0, "valid": 3, "invalid": 2, "errors": 0, "audits_passed": 1,
                                "audits_failed": 2, "last_seen": 6.0, "last_problem": "failed an audit"})]
    await store.save_trust(rows)
    await store.save_trust([("node", "n1", {**rows[0][2], "streak": 0, "invalid": 1})])
    loaded = sorted(await store.load_trust())
    assert loaded == sorted([("node", "n1", {**rows[0][2], "streak": 0, "invalid": 1}), rows[1]])
