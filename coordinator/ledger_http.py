"""The ledger's HTTP reads: balances and histories (in credits, with their unit spelled out),
snapshots at a checkpoint's size (`upto`), signed checkpoints, proofs and receipts. All public: the
ledger is there to be checked by anyone. Thin: parse, ask the coordinator or its notary, answer.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from aiohttp import web

from ledger.checkpoint import encode_proof
from ledger.credit import FLOPS_PER_CREDIT
from ledger.entries import LEAF_TAG_CHARGE, LEAF_TAG_REFUND, Clawback, Credit, Entry, account_of
from ledger.merkle import leaf_hash
from ledger.notary import LedgerMismatch

from .app_keys import COORDINATOR

MAX_SEQ: Final = 2**63 - 1
MAX_PAGE: Final = 10_000
UNIT: Final[dict[str, str]] = {
    "name": "credit",
    "means": f"1 credit is {FLOPS_PER_CREDIT:,} floating-point operations (1 kFLOP) of the coordinator's own "
             "count of the model's graph, times the rows computed, rounded up, at least 1 per accepted "
             "(task, node) result (docs/architecture.md)",
}
"""What every balance and history answer says its numbers are (the cost model of ledger/credit.py)."""

_DIGITS = re.compile(r"[0-9]{1,19}")


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


def query_int(request: web.Request, name: str, *, default: int | None = None, minimum: int = 0,
              maximum: int = MAX_SEQ) -> int | None:
    """`?name=` as a whole number in minimum..maximum (digits only: no sign, space or exponent), or
    `default` when absent. A 400 with a sentence otherwise."""
    text = request.query.get(name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise _bad(f"{name} must be a whole number in {minimum}..{maximum}, got {text[:40]!r}")
    return int(text)


def _paging(request: web.Request) -> tuple[int, int]:
    """`after` and `limit` of the paged reads, as before `upto` came: lenient, clamped to range."""
    try:
        # clamped to what the ledger's 64-bit sequence numbers can be: past the end is simply empty
        after = min(MAX_SEQ, max(0, int(request.query.get("after", 0))))
        limit = min(MAX_PAGE, max(1, int(request.query.get("limit", 1000))))
    except ValueError:
        raise _bad("after and limit must be integers") from None
    return after, limit


def entry_json(entry: Entry) -> dict[str, object]:
    """An entry as every ledger answer shows it (with `created_at_iso`: ledger.entries)."""
    return entry.to_json()


async def ledger_balances(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    upto = query_int(request, "upto")
    return web.json_response({**(await c.ledger_balances(upto)).to_json(), "unit": UNIT})


async def ledger_node(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    node = request.match_info["node"]
    entries = await c.ledger_history(node)
    if not entries:
        return web.json_response({"error": f"no credits for node {node}: a node id is the one `sparecycles node` "
                                           "prints; for an owner's history ask /v1/ledger/accounts/{name}"},
                                 status=404)
    return web.json_response({"node": node, "owner": entries[0].account,
                              "credits": sum(e.delta for e in entries),  # clawbacks count against
                              "entries": [entry_json(e) for e in entries], "unit": UNIT})


async def ledger_account(request: web.Request) -> web.Response:
    """An account's entries (grants, credits earned, charges paid) and its balance. An account
    without entries answers balance 0 rather than 404: the ledger does not know which accounts exist."""
    c = request.app[COORDINATOR]
    name = request.match_info["name"]
    entries = await c.ledger_account(name)
    return web.json_response({**account_of(name, entries).to_json(), "entries": [entry_json(e) for e in entries],
                              "unit": UNIT})


async def ledger_entries(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    after, limit = _paging(request)
    upto = query_int(request, "upto")
    entries = await c.ledger_entries(after, limit, upto)
    return web.json_response({"entries": [entry_json(e) for e in entries],
                              "next": entries[-1].seq if len(entries) == limit else None})


async def ledger_accepted(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    after, limit = _paging(request)
    upto = query_int(request, "upto")
    rows = await c.ledger_accepted(after, limit, upto)
    return web.json_response({"accepted": rows, "next": rows[-1]["seq"] if len(rows) == limit else None})


async def ledger_job(request: web.Request) -> web.Response:
    """What a job cost its submitter (charges less refunds) and who computed it (credits less
    clawbacks, per node)."""
    c = request.app[COORDINATOR]
    job = request.match_info["job"]
    entries = await c.ledger_job(job)
    if not entries:
        raise _not_found(f"no ledger entries for job {job}: unknown, or none of its tasks is verified yet")
    cost = sum(e.amount if e.kind == LEAF_TAG_CHARGE else -e.amount for e in entries
               if e.kind in (LEAF_TAG_CHARGE, LEAF_TAG_REFUND))
    computed: dict[tuple[str, str], int] = {}
    for e in entries:
        if isinstance(e.record, Credit | Clawback):
            key = (e.record.node, e.record.account)
            computed[key] = computed.get(key, 0) + e.delta
    by = [{"node": node, "owner": owner, "credits": credits}
          for (node, owner), credits in sorted(computed.items(), key=lambda kv: (-kv[1], kv[0]))]
    return web.json_response({"job": job, "entries": [entry_json(e) for e in entries], "cost": cost,
                              "computed_by": by, "unit": UNIT})


# ---- signed checkpoints and proofs ------------------------------------------------------------
async def ledger_checkpoint(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    latest = c.ledger_notary.latest
    if latest is None:
        raise _not_found("no checkpoint yet: the ledger is empty, or its first entries are signed within "
                         f"{c.settings.checkpoint_seconds:g} s; retry")
    return web.json_response({"checkpoint": latest.to_json(), "public_key": c.identity.public_key.hex()})


async def ledger_checkpoints(request: web.Request) -> web.Response:
    c = request.app[COORDINATOR]
    after = query_int(request, "after", default=0)
    limit = query_int(request, "limit", default=1000, minimum=1, maximum=MAX_PAGE)
    assert after is not None and limit is not None
    checkpoints = await c.ledger_checkpoints(after, limit)
    return web.json_response({"checkpoints": [cp.to_json() for cp in checkpoints]})


def _size(request: web.Request, name: str) -> int:
    """`?name=` as a tree size: by default the latest checkpoint's; past the tree, a 400."""
    c = request.app[COORDINATOR]
    size = query_int(request, name)
    tree = c.ledger_notary.notary.size
    if size is None:
        latest = c.ledger_notary.latest
        if latest is None:
            raise _not_found(f"no checkpoint yet, so {name} has no default: give it, or retry in a second")
        return latest.size
    if size > tree:
        raise _bad(f"{name}={size} is past the ledger's tree of {tree} entries: ask GET /v1/ledger/checkpoint "
                   "for the newest signed size")
    return size


async def ledger_inclusion(request: web.Request) -> web.Response:
    """Proof that entry `seq` is leaf seq - 1 of the tree of `size` entries; with the entry's leaf
    bytes, so the client hashes what it checks rather than trust a hash."""
    c = request.app[COORDINATOR]
    seq = query_int(request, "seq", minimum=1)
    if seq is None:
        raise _bad("seq is required: the ledger entry (1-based) to prove")
    size = _size(request, "size")
    if seq > size:
        raise _bad(f"seq {seq} is past size {size}: an entry is in a tree only if seq <= size")
    found = await c.ledger_entries(seq - 1, 1)
    if not found or found[0].seq != seq:
        raise _not_found(f"entry {seq} is not in the database")
    data = found[0].record.leaf_bytes()
    notary = c.ledger_notary.notary
    if notary.leaf_hash_at(seq) != leaf_hash(data):
        raise web.HTTPConflict(text=json.dumps({"error": f"entry {seq} in the database is not the one in the signed "
                                                         "tree: it was changed outside the coordinator"}),
                               content_type="application/json")
    return web.json_response({"seq": seq, "index": seq - 1, "size": size, "entry": data.hex(),
                              "proof": encode_proof(notary.inclusion_proof(seq, size))})


async def ledger_consistency(request: web.Request) -> web.Response:
    """Proof that the tree of `old` entries is a prefix of the tree of `new`."""
    c = request.app[COORDINATOR]
    old = query_int(request, "old")
    if old is None:
        raise _bad("old is required: the size of the older checkpoint")
    new = _size(request, "new")
    if old > new:
        raise _bad(f"old={old} exceeds new={new}: a log only grows, so the older size is the smaller")
    return web.json_response({"old": old, "new": new,
                              "proof": encode_proof(c.ledger_notary.notary.consistency_proof(old, new))})


async def ledger_receipts(request: web.Request) -> web.Response:
    """Receipts for a node's credits and clawbacks with after < seq <= the newest checkpoint's size."""
    c = request.app[COORDINATOR]
    node = request.match_info["node"]
    after = query_int(request, "after", default=0)
    limit = query_int(request, "limit", default=1000, minimum=1, maximum=MAX_PAGE)
    assert after is not None and limit is not None
    checkpoint = c.ledger_notary.latest
    if checkpoint is None:
        raise _not_found(f"no checkpoint yet: receipts come within {c.settings.checkpoint_seconds:g} s of a credit")
    entries = [e for e in await c.ledger_history(node) if after < e.seq <= checkpoint.size][:limit]
    try:
        receipts = c.ledger_notary.notary.receipts(entries, checkpoint)
    except LedgerMismatch as exc:
        raise web.HTTPConflict(text=json.dumps({"error": str(exc)}), content_type="application/json") from None
    out: list[dict[str, Any]] = [{"seq": e.seq, **r.to_json()} for e, r in zip(entries, receipts, strict=True)]
    return web.json_response({"checkpoint": checkpoint.to_json(), "receipts": out})


def add_ledger_routes(app: web.Application) -> None:
    app.router.add_get("/v1/ledger/balances", ledger_balances)
    app.router.add_get("/v1/ledger/nodes/{node}", ledger_node)
    app.router.add_get("/v1/ledger/accounts/{name}", ledger_account)
    app.router.add_get("/v1/ledger/entries", ledger_entries)
    app.router.add_get("/v1/ledger/accepted", ledger_accepted)
    app.router.add_get("/v1/ledger/jobs/{job}", ledger_job)
    app.router.add_get("/v1/ledger/checkpoint", ledger_checkpoint)
    app.router.add_get("/v1/ledger/checkpoints", ledger_checkpoints)
    app.router.add_get("/v1/ledger/proof/inclusion", ledger_inclusion)
    app.router.add_get("/v1/ledger/proof/consistency", ledger_consistency)
    app.router.add_get("/v1/ledger/receipts/{node}", ledger_receipts)
