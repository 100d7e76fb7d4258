"""node/receipts.py: a node keeps, in its state directory, a verified receipt for each of its ledger
entries and the newest checkpoint, against a real HTTP peer serving a real signed Merkle log.

The attacker is the coordinator (or someone between it and the node): it signs with another key,
rewrites its log after the node saw a checkpoint, or hands out another node's receipts as this
node's. Each is refused, logged, and nothing is written."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from ledger.checkpoint import Checkpoint
from node.receipts import ReceiptBook, read_receipts
from tests.unit.ledger_peer import LedgerPeer, credits_of
from tests.unit.test_ledger_outside import COORDINATOR, OTHER, Ledger, records


async def refresh(peer: LedgerPeer, book: ReceiptBook) -> int:
    async with TestServer(peer.app(), host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        return await book.refresh(session, str(server.make_url("/")))


def files(state: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(state.iterdir())} if state.exists() else {}


async def test_a_node_keeps_each_of_its_credits_with_a_receipt_and_the_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger(records(10))
    peer = LedgerPeer(ledger, signed=16)  # the peer pages by 7: three pages
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)

    assert await refresh(peer, book) == 5

    kept = read_receipts(tmp_path / "receipts.jsonl")
    assert [seq for seq, _ in kept] == [s for s in credits_of(ledger, "n1") if s <= 16]
    for _, receipt in kept:
        receipt.verify(COORDINATOR.public_key)
    checkpoint = Checkpoint.from_json(json.loads((tmp_path / "checkpoint.json").read_text()))
    assert checkpoint.size == 16


async def test_a_later_refresh_adds_only_new_receipts_after_checking_consistency(tmp_path: Path) -> None:
    ledger = Ledger(records(10))
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)
    await refresh(LedgerPeer(ledger, signed=10), book)
    peer = LedgerPeer(ledger, signed=31)

    assert await refresh(peer, book) == 7

    assert [s for s, _ in read_receipts(tmp_path / "receipts.jsonl")] == credits_of(ledger, "n1")
    assert any(r.startswith("/v1/ledger/proof/consistency?old=10&new=31") for r in peer.requests)
    assert ReceiptBook(tmp_path, "n1", COORDINATOR.public_key).last_seq == credits_of(ledger, "n1")[-1]


async def test_a_checkpoint_signed_by_another_key_is_refused_and_nothing_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Attack: a man in the middle (or a coordinator with a new key) signs the checkpoint."""
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)

    assert await refresh(LedgerPeer(Ledger(records(3)), signer=OTHER), book) == 0

    assert files(tmp_path) == {}
    assert f"checkpoint is from coordinator {OTHER.id}, expected {COORDINATOR.id}" in caplog.text
    assert book.last_problem is not None


async def test_a_log_rewritten_after_the_node_saw_it_is_refused(tmp_path: Path) -> None:
    """Attack: the operator rewrites history (a credit of this node lowered) and re-signs."""
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)
    await refresh(LedgerPeer(Ledger(records(3)), signed=7), book)
    before = files(tmp_path)
    recs = records(5)
    recs[1] = replace(recs[1], amount=1)

    assert await refresh(LedgerPeer(Ledger(recs)), book) == 0

    assert files(tmp_path) == before
    assert book.last_problem is not None and "is not a prefix of the newest" in book.last_problem


async def test_a_shrunken_log_is_refused(tmp_path: Path) -> None:
    """Attack: the operator truncates the log and re-signs it smaller."""
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)
    await refresh(LedgerPeer(Ledger(records(4))), book)

    assert await refresh(LedgerPeer(Ledger(records(2))), book) == 0

    assert book.last_problem is not None and "the log shrank" in book.last_problem


async def test_another_nodes_receipts_are_refused(tmp_path: Path) -> None:
    """Attack: the coordinator shows node n1 the receipts of node n2 as if they were n1's."""
    book = ReceiptBook(tmp_path, "n1", COORDINATOR.public_key)

    assert await refresh(LedgerPeer(Ledger(records(3)), receipts_of="n2"), book) == 0

    assert files(tmp_path) == {}
    assert book.last_problem is not None and "is for node 'n2', not n1" in book.last_problem


def test_an_incomplete_last_line_from_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "receipts.jsonl"
    path.write_text('{"seq": 3, "entr')

    assert read_receipts(path) == []

