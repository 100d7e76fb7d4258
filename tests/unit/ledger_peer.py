"""A small real HTTP peer serving a signed ledger the way docs/http-api.md and the issue 11 interface
describe, for the client side's tests (SDK, `sparecycles ledger ...`, node receipts).

It serves a `tests.unit.test_ledger_outside.Ledger` (real records, a real Merkle tree, real Ed25519
checkpoints) on a real aiohttp server on 127.0.0.1. `signed` is the size of the newest checkpoint:
entries beyond it are credits still arriving. `tamper` replaces served entry documents by seq (an
operator editing the database); `signer` signs checkpoints (another key = a forger).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ledger.checkpoint import Checkpoint, encode_proof, make_receipt, sign_checkpoint
from ledger.entries import Credit, Entry, balances_of
from protocol.signing import Identity
from tests.unit.test_ledger_outside import COORDINATOR, Ledger, accepted_of

PAGE = 7  # the peer's own page cap, smaller than any limit the client asks for


@dataclass
class LedgerPeer:
    ledger: Ledger
    signed: int = 0
    signer: Identity = COORDINATOR
    tamper: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    receipts_of: str | None = None  # serve this node's receipts whatever node is asked for (a liar)
    timestamp_ms: int = 1_767_225_600_000

    def __post_init__(self) -> None:
        self.signed = self.signed or self.ledger.log.size

    def checkpoint(self) -> Checkpoint:
        return sign_checkpoint(self.signer, size=self.signed, root=self.ledger.log.root(self.signed),
                               timestamp_ms=self.timestamp_ms + self.signed)

    def docs(self, upto: int | None = None) -> list[dict[str, Any]]:
        out = [self.tamper.get(seq, Entry(seq, r).to_json()) for seq, r in enumerate(self.ledger.recs, start=1)]
        return out if upto is None else out[:upto]

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.requests.append(request.path_qs)
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[record])
        r = app.router
        r.add_get("/v1/info", self.get_info)
        r.add_get("/v1/ledger/checkpoint", self.get_checkpoint)
        r.add_get("/v1/ledger/checkpoints", self.get_checkpoints)
        r.add_get("/v1/ledger/proof/inclusion", self.get_inclusion)
        r.add_get("/v1/ledger/proof/consistency", self.get_consistency)
        r.add_get("/v1/ledger/receipts/{node}", self.get_receipts)
        r.add_get("/v1/ledger/entries", self.get_entries)
        r.add_get("/v1/ledger/accepted", self.get_accepted)
        r.add_get("/v1/ledger/balances", self.get_balances)
        r.add_get("/v1/ledger/nodes/{node}", self.get_node)
        r.add_get("/v1/ledger/accounts/{name}", self.get_account)
        r.add_get("/v1/ledger/jobs/{job}", self.get_job)
        return app

    @staticmethod
    def _int(request: web.Request, name: str, default: int | None = None) -> int | None:
        value = request.query.get(name)
        return default if value is None else int(value)

    async def get_info(self, request: web.Request) -> web.Response:
        return web.json_response({"coordinator": self.signer.id, "public_key": self.signer.public_key.hex()})

    async def get_checkpoint(self, request: web.Request) -> web.Response:
        return web.json_response({"checkpoint": self.checkpoint().to_json(),
                                  "public_key": self.signer.public_key.hex()})

    async def get_checkpoints(self, request: web.Request) -> web.Response:
        after = self._int(request, "after", 0) or 0
        return web.json_response({"checkpoints": [self.checkpoint().to_json()] if self.signed > after else []})

    async def get_inclusion(self, request: web.Request) -> web.Response:
        seq, size = int(request.query["seq"]), int(request.query["size"])
        if not 1 <= seq <= size <= self.signed:
            return web.json_response({"error": f"seq {seq} is not in a tree of {size}"}, status=400)
        log = self.ledger.log
        return web.json_response({"seq": seq, "index": seq - 1, "size": size,
                                  "entry": self.ledger.recs[seq - 1].leaf_bytes().hex(),
                                  "proof": encode_proof(log.inclusion_proof(seq - 1, size))})

    async def get_consistency(self, request: web.Request) -> web.Response:
        old, new = int(request.query["old"]), int(request.query["new"])
        if not 0 <= old <= new <= self.ledger.log.size:
            return web.json_response({"error": f"no proof from {old} to {new}"}, status=400)
        return web.json_response({"old": old, "new": new,
                                  "proof": encode_proof(self.ledger.log.consistency_proof(old, new))})

    async def get_receipts(self, request: web.Request) -> web.Response:
        node = self.receipts_of or request.match_info["node"]
        after, limit = self._int(request, "after", 0) or 0, min(self._int(request, "limit", 1000) or 1, PAGE)
        cp = self.checkpoint()
        receipts: list[dict[str, object]] = []
        for seq, rec in enumerate(self.ledger.recs[:self.signed], start=1):
            if seq > after and getattr(rec, "node", None) == node and len(receipts) < limit:
                receipt = make_receipt(self.ledger.log, rec.leaf_bytes(), seq - 1, cp)
                receipts.append({"seq": seq, **receipt.to_json()})
        return web.json_response({"checkpoint": cp.to_json(), "receipts": receipts})

    def _page(self, request: web.Request, key: str, rows: list[dict[str, Any]], cursor: str) -> web.Response:
        after = self._int(request, "after", 0) or 0
        limit = min(self._int(request, "limit", 1000) or 1, PAGE)
        page = [row for row in rows if row[cursor] > after][:limit]
        return web.json_response({key: page, "next": page[-1][cursor] if len(page) == limit else None})

    async def get_entries(self, request: web.Request) -> web.Response:
        return self._page(request, "entries", self.docs(self._int(request, "upto")), "seq")

    async def get_accepted(self, request: web.Request) -> web.Response:
        upto = self._int(request, "upto")
        rows = [row for row in accepted_of(self.ledger.recs) if upto is None or row["verdict_seq"] <= upto]
        return self._page(request, "accepted", rows, "seq")

    async def get_balances(self, request: web.Request) -> web.Response:
        upto = self._int(request, "upto")
        entries = [Entry(seq, r) for seq, r in enumerate(self.ledger.recs, start=1)][:upto]
        return web.json_response({**balances_of(entries).to_json(), "unit": UNIT})

    async def get_node(self, request: web.Request) -> web.Response:
        node = request.match_info["node"]
        mine = [d for d in self.docs() if d.get("node") == node]
        if not mine:
            return web.json_response({"error": f"no credits for node {node}"}, status=404)
        return web.json_response({"node": node, "owner": mine[0]["owner"],
                                  "credits": sum(d["amount"] for d in mine), "entries": mine, "unit": UNIT})

    async def get_account(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        mine = [d for d in self.docs() if name in (d.get("owner"), d.get("account"))]
        return web.json_response({"account": name, "granted": 0, "earned": sum(d["amount"] for d in mine),
                                  "spent": 0, "balance": sum(d["amount"] for d in mine), "entries": mine,
                                  "unit": UNIT})

    async def get_job(self, request: web.Request) -> web.Response:
        job = request.match_info["job"]
        mine = [d for d in self.docs() if d.get("job") == job]
        if not mine:
            return web.json_response({"error": f"no entries for job {job}"}, status=404)
        credits = [d for d in mine if d["kind"] == "credit"]
        by_node: dict[tuple[str, str], int] = {}
        for d in credits:
            by_node[(d["node"], d["owner"])] = by_node.get((d["node"], d["owner"]), 0) + d["amount"]
        return web.json_response({"job": job, "entries": mine,
                                  "cost": sum(d["amount"] for d in mine if d["kind"] == "charge"),
                                  "computed_by": [{"node": n, "owner": o, "credits": c}
                                                  for (n, o), c in by_node.items()], "unit": UNIT})


UNIT = {"name": "credit", "means": "one credit is 1,000 floating-point operations (1 kFLOP) of the "
                                   "coordinator's own count of the model's work"}


def credits_of(ledger: Ledger, node: str) -> list[int]:
    return [seq for seq, r in enumerate(ledger.recs, start=1) if isinstance(r, Credit) and r.node == node]


@contextmanager
def serving(app: web.Application) -> Iterator[str]:
    """`app` on a real socket in a thread, for code that runs its own event loop (`main()`)."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.run_until_complete(runner.cleanup())
        loop.close()
