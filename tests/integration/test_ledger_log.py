"""The ledger as a signed, tamper-evident log, with real processes: a coordinator on SQLite, two
nodes, the real Mosquitto and ONNX Runtime. After a job, a signed checkpoint covers every entry
within seconds; proofs served over HTTP verify against it with the coordinator's public key; and a
database edited by hand while the coordinator was down makes it refuse to start."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ledger.checkpoint import Checkpoint, decode_proof
from ledger.merkle import leaf_hash, verify_consistency, verify_inclusion
from sparecycles.cli.processes import ManagedProcess, free_port
from tests import models

from .network import Network, submitter

pytestmark = pytest.mark.integration

REFUSAL = "ledger does not match its checkpoint of size"


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, **json.loads(exc.read())}


def wait_for_checkpoint(url: str, size: int, timeout: float) -> tuple[Checkpoint, float]:
    """The newest checkpoint once it covers `size` entries, and how long that took."""
    t0 = time.monotonic()
    while True:
        body = get(f"{url}/v1/ledger/checkpoint")
        if "checkpoint" in body and body["checkpoint"]["size"] >= size:
            return Checkpoint.from_json(body["checkpoint"]), time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"no checkpoint of size {size} within {timeout} s: {body}"
        time.sleep(0.05)


def tampered_copy(db: Path, dest: Path, sql: str) -> Path:
    """A consistent copy of the coordinator's database with `sql` run on it, as an operator with
    the sqlite3 shell would."""
    with sqlite3.connect(db) as src, sqlite3.connect(dest) as out:
        src.backup(out)
    with sqlite3.connect(dest) as conn:
        assert conn.execute(sql).rowcount == 1
    return dest


def start_on(net: Network, db: Path, key: Path, name: str) -> ManagedProcess:
    return net.group.start("coordinator", ["--broker", net.broker_url, "--db", f"sqlite:///{db}", "--key", str(key),
                                           "--http", f"127.0.0.1:{free_port()}"], name=name)


def test_checkpoints_cover_the_log_its_proofs_verify_and_a_hand_edited_database_is_refused(
        network: Network, tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    url = network.url
    info = get(f"{url}/v1/info")
    public_key = bytes.fromhex(info["public_key"])  # from /v1/info, not from the checkpoint answer
    model = models.classifier(features=8, classes=4)
    x = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)

    async def register_then_run() -> tuple[Checkpoint, float]:
        async with submitter(url) as c:  # registering grants the starting credit: the first entry
            first, _ = await asyncio.to_thread(wait_for_checkpoint, url, 1, 10.0)
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=10)
            status = await c.wait(job["job"], timeout=120)
            assert status["state"] == "done", status
            done = time.monotonic()
            return first, done

    first, done = asyncio.run(register_then_run())
    entries = get(f"{url}/v1/ledger/entries?limit=10000")["entries"]
    n = len(entries)
    kinds = [e["kind"] for e in entries]
    # each account's starting grant (the submitter's, and alice's and bob's, who registered their
    # nodes), then per task two credits and a charge
    assert (kinds.count("grant"), kinds.count("credit"), kinds.count("charge"), n) == (3, 12, 6, 21)
    newest, _ = wait_for_checkpoint(url, n, 10.0)
    # default --checkpoint-seconds is 1: a fresh entry is signed within about a second (3 s of slack
    # for a loaded 2-core machine)
    assert time.monotonic() - done < 3.0
    newest.verify(public_key)
    first.verify(public_key)
    assert newest.size == n and first.size < n

    # inclusion: every entry, against the signed root, hashing the bytes the coordinator serves
    for e in entries:
        body = get(f"{url}/v1/ledger/proof/inclusion?seq={e['seq']}&size={newest.size}")
        verify_inclusion(leaf_hash(bytes.fromhex(body["entry"])), e["seq"] - 1, newest.size,
                         decode_proof(body["proof"]), newest.root)
    # consistency: the checkpoint seen before the job is a prefix of the newest
    body = get(f"{url}/v1/ledger/proof/consistency?old={first.size}&new={newest.size}")
    verify_consistency(first.size, newest.size, first.root, newest.root, decode_proof(body["proof"]))

    assert network.coordinator is not None
    assert network.coordinator.terminate() == 0
    key = Path(f"{network.db}.key")
    credit_seq = next(e["seq"] for e in entries if e["kind"] == "credit")
    cases = {
        # Attack: an operator raises one credit (the 999,999,999) in the SQLite file.
        "edited": (f"UPDATE ledger_entries SET amount = 999999999 WHERE seq = {credit_seq}", "changed outside"),
        # Attack: an entry removed from the middle of the log (a clawback hidden, say).
        "deleted": (f"DELETE FROM ledger_entries WHERE seq = {credit_seq}", f"seq {credit_seq} is missing"),
        # Attack: the newest entries removed, so what is left is a prefix of the signed tree.
        "truncated": ("DELETE FROM ledger_entries WHERE seq = (SELECT MAX(seq) FROM ledger_entries)",
                      f"holds only {n - 1} entries"),
    }
    for name, (sql, detail) in cases.items():
        db = tampered_copy(network.db, tmp_path / f"{name}.db", sql)
        proc = start_on(network, db, key, f"coordinator-{name}")
        code = proc.wait(60)
        lines = proc.log_text().strip().splitlines()
        assert code == 1, (name, code, proc.log_tail())
        last = lines[-1]
        assert last.startswith(f"error: {REFUSAL} {newest.size} signed at {newest.time_iso()}: "), (name, last)
        assert detail in last and last.endswith("restore the database from a backup"), (name, last)

    # The untouched database starts again and still serves the same signed checkpoint.
    network.start_coordinator()
    again = get(f"{url}/v1/ledger/checkpoint")
    assert Checkpoint.from_json(again["checkpoint"]) == newest
