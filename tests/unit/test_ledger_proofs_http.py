"""The ledger's signed checkpoints, proofs, receipts and snapshots over HTTP (coordinator/ledger_http.py)
against a coordinator on the in-memory store, its notary ticked by hand (no broker: the engine is
fed directly). The real processes, the real broker and a hand-edited SQLite file:
tests/integration/test_ledger_log.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from coordinator.__main__ import build_parser, settings_from_args
from coordinator.http_api import COORDINATOR, add_routes
from coordinator.jobs import JobOptions
from coordinator.ledger_notary import LedgerNotary
from coordinator.memory_store import MemoryStore
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from ledger.checkpoint import Checkpoint, Receipt, decode_proof
from ledger.entries import Credit
from ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from protocol.signing import Identity
from tests.unit.test_service_budget import META, MODEL, run_tasks

INPUTS = {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}  # two tasks of 2 rows: 8 credits each
T0 = 1_767_225_600_000


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Coordinator, str]]:
    """dave is granted 100 and pays for a two-task job run by alice's and bob's nodes (7 entries:
    the grant, then per task two credits and a charge), checkpointed at size 1 and 7."""
    c = Coordinator(CoordinatorSettings(db_url="memory", key_path=str(tmp_path / "coord.key"),
                                        untrusted_audit_rate=0.0, adaptive=False))
    await c.ledger_notary.open()
    await c.store.put_model(META["model"], MODEL, META)
    await c.store.grant("dave", 100, key="start:dave", memo="starting grant", created_at=1.0)
    await c.ledger_notary.tick(T0)
    job = await c.create_job(META, INPUTS, JobOptions(replicas=2, task_size=2, max_results=None, final="argmax",
                                                      submitter="dave"))
    await run_tasks(c, ("alice", "bob"), limit=2)
    await c.ledger_notary.tick(T0 + 1000)
    app = web.Application()
    app[COORDINATOR] = c
    add_routes(app)
    async with TestClient(TestServer(app)) as client:
        yield client, c, job.spec.id
    await c.stop()


async def get(client: TestClient[Any, Any], path: str, status: int = 200) -> Any:
    response = await client.get(path)
    body = await response.json()
    assert response.status == status, body
    return body


async def test_the_newest_checkpoint_is_signed_by_the_key_the_coordinator_publishes(served: Any) -> None:
    client, c, _ = served
    body = await get(client, "/v1/ledger/checkpoint")
    cp = Checkpoint.from_json(body["checkpoint"])
    cp.verify(bytes.fromhex(body["public_key"]))
    assert body["public_key"] == (await get(client, "/v1/info"))["public_key"]
    assert cp.size == 7 == c.ledger_notary.notary.size
    sizes = [x["size"] for x in (await get(client, "/v1/ledger/checkpoints"))["checkpoints"]]
    assert sizes == [1, 7]
    assert [x["size"] for x in (await get(client, "/v1/ledger/checkpoints?after=1"))["checkpoints"]] == [7]


async def test_an_inclusion_proof_from_http_verifies_against_the_signed_checkpoint(served: Any) -> None:
    """Attack: a coordinator that shows an entry it never signed. The proof binds the entry's
    bytes to the signed root; other bytes do not verify."""
    client, _, _ = served
    cp = Checkpoint.from_json((await get(client, "/v1/ledger/checkpoint"))["checkpoint"])
    entries = (await get(client, "/v1/ledger/entries"))["entries"]
    for seq in range(1, 8):
        body = await get(client, f"/v1/ledger/proof/inclusion?seq={seq}&size=7")
        assert (body["seq"], body["index"], body["size"]) == (seq, seq - 1, 7)
        verify_inclusion(leaf_hash(bytes.fromhex(body["entry"])), seq - 1, 7, decode_proof(body["proof"]), cp.root)
    default = await get(client, "/v1/ledger/proof/inclusion?seq=2")  # against the newest checkpoint
    assert default["size"] == 7
    assert entries[1]["seq"] == 2 and entries[1]["created_at_iso"].endswith("Z")


async def test_a_consistency_proof_joins_the_two_checkpoints(served: Any) -> None:
    client, _, _ = served
    first, newest = [Checkpoint.from_json(x) for x in (await get(client, "/v1/ledger/checkpoints"))["checkpoints"]]
    body = await get(client, f"/v1/ledger/proof/consistency?old={first.size}&new={newest.size}")
    verify_consistency(first.size, newest.size, first.root, newest.root, decode_proof(body["proof"]))


async def test_receipts_of_a_node_verify_with_the_coordinators_key(served: Any) -> None:
    client, c, _ = served
    node = (await get(client, "/v1/ledger/balances"))["nodes"][0]["node"]
    body = await get(client, f"/v1/ledger/receipts/{node}")
    assert len(body["receipts"]) == 2
    for r in body["receipts"]:
        seq = r.pop("seq")
        receipt = Receipt.from_json(r)
        receipt.verify(c.identity.public_key)
        assert receipt.index == seq - 1
    later = await get(client, f"/v1/ledger/receipts/{node}?after={body['receipts'][0]['index'] + 1}")
    assert len(later["receipts"]) == 1


async def test_balances_and_histories_spell_out_the_unit_and_take_a_snapshot(served: Any) -> None:
    client, _, _ = served
    now = await get(client, "/v1/ledger/balances")
    at_grant = await get(client, "/v1/ledger/balances?upto=1")
    assert now["unit"]["name"] == "credit" and "1,000 floating-point operations" in now["unit"]["means"]
    assert now["total_credits"] == 32 and at_grant["total_credits"] == 0
    assert [a["balance"] for a in at_grant["accounts"]] == [100]
    assert (await get(client, "/v1/ledger/accounts/dave"))["unit"] == now["unit"]
    assert [e["seq"] for e in (await get(client, "/v1/ledger/entries?upto=3"))["entries"]] == [1, 2, 3]


async def test_what_a_job_cost_and_who_computed_it(served: Any) -> None:
    client, _, job = served
    body = await get(client, f"/v1/ledger/jobs/{job}")
    assert body["cost"] == 32
    assert sorted(x["owner"] for x in body["computed_by"]) == ["alice", "bob"]
    assert sum(x["credits"] for x in body["computed_by"]) == 32
    assert body["unit"]["name"] == "credit"
    await get(client, "/v1/ledger/jobs/nosuchjob", status=404)


@pytest.mark.parametrize(("path", "message"), [
    ("/v1/ledger/proof/inclusion?seq=8&size=7", "seq 8 is past size 7"),
    ("/v1/ledger/proof/inclusion?seq=1&size=8", "size=8 is past the ledger's tree of 7 entries"),
    ("/v1/ledger/proof/inclusion?seq=0", "seq must be a whole number in 1.."),
    ("/v1/ledger/proof/inclusion?size=3", "seq is required"),
    ("/v1/ledger/proof/inclusion?seq=-1", "seq must be a whole number"),
    ("/v1/ledger/proof/inclusion?seq=1e3", "seq must be a whole number"),
    ("/v1/ledger/proof/consistency?old=5&new=2", "old=5 exceeds new=2"),
    ("/v1/ledger/proof/consistency?new=2", "old is required"),
    ("/v1/ledger/proof/consistency?old=1&new=99", "new=99 is past the ledger's tree"),
    ("/v1/ledger/balances?upto=x", "upto must be a whole number"),
    ("/v1/ledger/entries?upto=-2", "upto must be a whole number"),
    ("/v1/ledger/accepted?upto=%201", "upto must be a whole number"),
    ("/v1/ledger/checkpoints?limit=0", "limit must be a whole number in 1..10000"),
    ("/v1/ledger/receipts/n0?after=abc", "after must be a whole number"),
])
async def test_malformed_or_out_of_range_parameters_get_a_400_with_a_sentence(served: Any, path: str,
                                                                             message: str) -> None:
    client, _, _ = served
    assert message in (await get(client, path, status=400))["error"]


async def test_an_entry_changed_under_a_running_coordinator_gets_no_proof_or_receipt(served: Any) -> None:
    """Attack: the database edited while the coordinator runs: the tree it signed still holds the
    old entry, so the coordinator refuses to hand out a proof of the new bytes (409)."""
    client, c, _ = served
    assert isinstance(c.store, MemoryStore)
    log = c.store.ledger._log  # the in-memory twin's list: what an UPDATE on the SQL file would do
    i, entry = next((i, e) for i, e in enumerate(log) if isinstance(e.record, Credit))
    assert isinstance(entry.record, Credit)
    node = entry.record.node
    edited = replace(entry, record=replace(entry.record, amount=999_999_999))
    log[i] = edited
    by_node = c.store.ledger._by_node[node]
    by_node[by_node.index(entry)] = edited
    body = await get(client, f"/v1/ledger/proof/inclusion?seq={entry.seq}", status=409)
    assert "changed outside the coordinator" in body["error"]
    assert "changed outside the coordinator" in (await get(client, f"/v1/ledger/receipts/{node}", status=409))["error"]


async def test_no_checkpoint_yet_is_a_404_that_says_when(tmp_path: Path) -> None:
    c = Coordinator(CoordinatorSettings(db_url="memory", key_path=str(tmp_path / "coord.key")))
    await c.ledger_notary.open()
    app = web.Application()
    app[COORDINATOR] = c
    add_routes(app)
    async with TestClient(TestServer(app)) as client:
        assert "no checkpoint yet" in (await get(client, "/v1/ledger/checkpoint", status=404))["error"]
        assert "no checkpoint yet" in (await get(client, "/v1/ledger/proof/inclusion?seq=1", status=404))["error"]
    await c.stop()


class FlakyStore(MemoryStore):
    """The in-memory store whose first `fails` checkpoint writes fail, as a full disk would."""

    def __init__(self, fails: int) -> None:
        super().__init__()
        self.fails = fails

    async def save_checkpoint(self, cp: Checkpoint) -> None:
        if self.fails:
            self.fails -= 1
            raise OSError("database or disk is full")
        await super().save_checkpoint(cp)


async def test_a_store_error_while_checkpointing_is_logged_and_retried_at_the_next_tick(
        caplog: pytest.LogCaptureFixture) -> None:
    """Attack (or accident): a full disk while signing. The notary's loop must not die with it,
    or no entry would ever be signed again while the coordinator keeps crediting."""
    store = FlakyStore(fails=2)
    notary = LedgerNotary(store, Identity.generate())
    await notary.open()
    await store.grant("dave", 100, key="start:dave", memo="", created_at=1.0)
    loop = asyncio.create_task(notary.run(0.01))
    try:
        for _ in range(500):
            if notary.latest is not None:
                break
            await asyncio.sleep(0.01)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert notary.latest is not None and notary.latest.size == 1
    assert await store.latest_checkpoint() == notary.latest
    assert sum("checkpointing the ledger failed" in r.message for r in caplog.records) == 2
    assert loop.cancelled()  # it stopped when told, not on an error


def test_checkpoint_seconds_is_a_flag_and_must_be_positive() -> None:
    args = build_parser().parse_args(["--checkpoint-seconds", "0.25"])
    assert settings_from_args(args).checkpoint_seconds == 0.25
    assert CoordinatorSettings().checkpoint_seconds == 1.0
    with pytest.raises(ValueError, match="--checkpoint-seconds must be in"):
        CoordinatorSettings(checkpoint_seconds=0)
