"""The ledger's HTTP reads and `sparecycles ledger balances`, against the coordinator's real handlers
and a real coordinator on the in-memory store (no broker: the engine is fed directly)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from coordinator.http_api import COORDINATOR, add_routes
from coordinator.jobs import JobOptions
from coordinator.service import Coordinator
from coordinator.settings import CoordinatorSettings
from ledger.verify import find_discrepancies
from sparecycles.cli.main import main
from tests.unit.test_service_budget import META, MODEL, run_tasks

INPUTS = {"x": np.arange(8, dtype=np.float32).reshape(4, 2)}  # two tasks of 2 rows: 8 credits each


@contextmanager
def serving(tmp_path: Path) -> Iterator[tuple[str, Coordinator]]:
    """dave is granted 100 and pays for a two-task job run by alice's and bob's nodes; an internal
    job (no submitter) is run too. Then the real handlers serve it from a thread."""
    loop = asyncio.new_event_loop()
    # Classic quorum, no audits: the engine is fed directly, no service loop runs audits.
    c = Coordinator(CoordinatorSettings(db_url="memory", key_path=str(tmp_path / "coord.key"),
                                        untrusted_audit_rate=0.0, adaptive=False))

    async def prepare() -> None:
        await c.store.put_model(META["model"], MODEL, META)
        await c.store.grant("dave", 100, key="start:dave", memo="starting grant", created_at=1.0)
        await c.create_job(META, INPUTS, JobOptions(replicas=2, task_size=2, max_results=None, final="argmax",
                                                    submitter="dave"))
        await c.create_job(META, INPUTS, JobOptions(replicas=2, task_size=2, max_results=None, final="argmax"))
        await run_tasks(c, ("alice", "bob"), limit=4)

    loop.run_until_complete(prepare())
    app = web.Application()
    app[COORDINATOR] = c
    add_routes(app)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", c
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.run_until_complete(c.stop())
        loop.close()


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_an_accounts_entries_and_balance_are_public(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, _):
        dave = get(f"{url}/v1/ledger/accounts/dave")
        alice = get(f"{url}/v1/ledger/accounts/alice")
        nobody = get(f"{url}/v1/ledger/accounts/nobody")

    assert {k: dave[k] for k in ("account", "granted", "earned", "spent", "balance")} == {
        "account": "dave", "granted": 100, "earned": 0, "spent": 32, "balance": 68}
    assert [e["kind"] for e in dave["entries"]] == ["grant", "charge", "charge"]
    assert dave["entries"][0]["memo"] == "starting grant"
    assert (alice["earned"], alice["balance"], len(alice["entries"])) == (32, 32, 4)  # both jobs' tasks
    assert {k: v for k, v in nobody.items() if k != "unit"} == {
        "account": "nobody", "granted": 0, "earned": 0, "spent": 0, "balance": 0, "entries": []}
    assert nobody["unit"]["name"] == "credit"


def test_balances_keep_the_contributors_view_and_add_accounts(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, _):
        balances = get(f"{url}/v1/ledger/balances")
        node = get(f"{url}/v1/ledger/nodes/n0")

    assert balances["entries"] == 8 and balances["total_credits"] == 64  # 4 tasks x 2 credits of 8
    assert {o["owner"]: o["credits"] for o in balances["owners"]} == {"alice": 32, "bob": 32}
    assert {a["account"]: a["balance"] for a in balances["accounts"]} == {"dave": 68, "alice": 32, "bob": 32}
    assert balances["total_granted"] == 100
    assert node["owner"] == "alice" and node["credits"] == 32 and len(node["entries"]) == 4


def test_the_served_documents_verify(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, _):
        entries = get(f"{url}/v1/ledger/entries")["entries"]
        accepted = get(f"{url}/v1/ledger/accepted")["accepted"]
        balances = get(f"{url}/v1/ledger/balances")

    assert find_discrepancies(entries, accepted, balances) == []
    assert sum(a["balance"] for a in balances["accounts"]) == balances["total_granted"] + 32  # 32: internal job


def test_cli_balances_prints_an_accounts_table_after_nodes_and_owners(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with serving(tmp_path) as (url, _):
        code = main(["ledger", "balances", "--coordinator", url])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    heads = [i for i, line in enumerate(lines) if line.split()[:1] in (["node"], ["owner"], ["account"])]
    assert [lines[i].split() for i in heads] == [["node", "owner", "credits", "entries"],
                                                 ["owner", "credits", "entries"],
                                                 ["account", "granted", "earned", "spent", "balance"]]
    rows = [line.split() for line in lines[heads[2] + 1:] if line.strip()]
    assert ["dave", "100", "0", "32", "68"] in rows
    assert lines[-2:] == ["granted: 100 credits in all, 3 accounts", "total: 64 credits in 8 entries"]
