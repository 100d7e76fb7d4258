"""A node's receipts for the credit it earns: each of its ledger entries (credits, clawbacks) with an
inclusion proof against a checkpoint the coordinator signed, and the newest checkpoint seen, kept
in the node's own state directory. With them the node's owner can later prove what was credited
(`sparecycles ledger verify --receipts DIR`), and notices a coordinator that rewrites its log.

Files (both JSON, in `state_dir`):
- `receipts.jsonl`: one receipt a line, `{"seq", "entry", "index", "proof", "checkpoint"}`, ascending
  seq, appended and fsynced;
- `checkpoint.json`: the newest checkpoint checked consistent with every one kept before, replaced
  atomically (write, fsync, rename).

Nothing the coordinator sends is trusted: a checkpoint not signed by its pinned key, one that is
not an extension of the last one kept, a receipt whose proof does not verify, that is for another
node, out of order or against another checkpoint: the whole answer is refused and logged, and
nothing is written. The node keeps computing; only its record stops growing until an honest answer.

Imports `ledger.checkpoint` and `ledger.merkle` (pure: proofs and signatures, no store).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import msgpack

from ledger.checkpoint import Checkpoint, CheckpointError, Receipt, check_history, decode_proof

log = logging.getLogger(__name__)

RECEIPTS_FILE: Final = "receipts.jsonl"
CHECKPOINT_FILE: Final = "checkpoint.json"
PAGE: Final = 1000
MAX_PAGES: Final = 1000
"""Pages fetched in one refresh at most: a million receipts; the rest come at the next refresh."""


class RefusedAnswer(ValueError):
    """The coordinator's answer does not check out; the message says why."""


@dataclass(frozen=True, slots=True)
class _Page:
    checkpoint: Checkpoint
    receipts: list[tuple[int, Receipt]]


class ReceiptBook:
    """The receipts of node `node_id` from the coordinator whose key is `coordinator_key`."""

    def __init__(self, state_dir: Path, node_id: str, coordinator_key: bytes) -> None:
        self.state_dir = state_dir
        self.node_id = node_id
        self.coordinator_key = coordinator_key
        self.last_problem: str | None = None
        self.checkpoint = self._load_checkpoint()
        self.last_seq = self._load_last_seq()

    @property
    def receipts_path(self) -> Path:
        return self.state_dir / RECEIPTS_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_FILE

    async def refresh(self, session: aiohttp.ClientSession, base_url: str) -> int:
        """Fetch the receipts after the last one kept, check them and keep them; return how many
        were added. A refused answer is logged (and kept in `last_problem`) and adds nothing;
        connection errors (`aiohttp.ClientError`, `TimeoutError`) are the caller's."""
        base = base_url.rstrip("/")
        added = 0
        for _ in range(MAX_PAGES):
            url = f"{base}/v1/ledger/receipts/{quote(self.node_id, safe='')}"
            try:
                answer = await _get_json(session, url, {"after": str(self.last_seq), "limit": str(PAGE)})
                if answer is None:
                    return added  # no checkpoint signed yet
                page = self._check_page(answer)
                if self.checkpoint is not None and page.checkpoint.size != self.checkpoint.size:
                    proof = await self._consistency(session, base, self.checkpoint.size, page.checkpoint.size)
                else:
                    proof = ()
                self._check_extends(page.checkpoint, proof)
            except (RefusedAnswer, CheckpointError) as exc:
                self.last_problem = f"refused the coordinator's receipts for node {self.node_id}: {exc}"
                log.warning("%s", self.last_problem)
                return added
            self._keep(page)
            added += len(page.receipts)
            if len(page.receipts) < PAGE:
                break
        self.last_problem = None
        return added

    # -- checks --------------------------------------------------------------------------------------

    def _check_page(self, answer: object) -> _Page:
        if not isinstance(answer, dict) or not isinstance(answer.get("receipts"), list):
            raise RefusedAnswer("the answer is not {\"checkpoint\", \"receipts\": [...]}")
        checkpoint = Checkpoint.from_json(answer.get("checkpoint"))
        checkpoint.verify(self.coordinator_key)
        receipts: list[tuple[int, Receipt]] = []
        previous = self.last_seq
        for raw in answer["receipts"]:
            if not isinstance(raw, dict):
                raise RefusedAnswer("a receipt is not a JSON object")
            seq = raw.get("seq")
            receipt = Receipt.from_json({k: v for k, v in raw.items() if k != "seq"})
            if isinstance(seq, bool) or not isinstance(seq, int) or seq != receipt.index + 1:
                raise RefusedAnswer(f"receipt seq {seq!r:.20} does not match its leaf index {receipt.index}")
            if seq <= previous:
                raise RefusedAnswer(f"receipt for seq {seq} is not after seq {previous}")
            if receipt.checkpoint != checkpoint:
                raise RefusedAnswer(f"receipt for seq {seq} is against a checkpoint other than the newest")
            receipt.verify(self.coordinator_key)
            node = _node_of(receipt.entry)
            if node != self.node_id:
                raise RefusedAnswer(f"receipt for seq {seq} is for node {node!r:.70}, not {self.node_id}")
            receipts.append((seq, receipt))
            previous = seq
        return _Page(checkpoint, receipts)

    def _check_extends(self, checkpoint: Checkpoint, proof: tuple[bytes, ...]) -> None:
        kept = self.checkpoint
        if kept is None:
            return
        check_history([kept], checkpoint, {kept.size: proof}, self.coordinator_key)

    async def _consistency(self, session: aiohttp.ClientSession, base: str, old: int, new: int) -> tuple[bytes, ...]:
        if old > new:
            return ()  # check_history names the shrinking log
        answer = await _get_json(session, f"{base}/v1/ledger/proof/consistency", {"old": str(old), "new": str(new)})
        if answer is None or not isinstance(answer, dict) or answer.get("old") != old or answer.get("new") != new:
            raise RefusedAnswer(f"the consistency proof answer is not for sizes {old} to {new}")
        return decode_proof(answer.get("proof"))

    # -- files ---------------------------------------------------------------------------------------

    def _keep(self, page: _Page) -> None:
        """Receipts first, then the checkpoint: after a crash between the two, the kept checkpoint
        is older than the newest receipt's, which the next refresh checks against anyway."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if page.receipts:
            lines = "".join(json.dumps({"seq": seq, **r.to_json()}, separators=(",", ":")) + "\n"
                            for seq, r in page.receipts)
            with self.receipts_path.open("a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            self.last_seq = page.receipts[-1][0]
        if page.checkpoint != self.checkpoint:
            tmp = self.checkpoint_path.with_name(CHECKPOINT_FILE + ".part")
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(page.checkpoint.to_json(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
            self.checkpoint = page.checkpoint

    def _load_checkpoint(self) -> Checkpoint | None:
        try:
            text = self.checkpoint_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        checkpoint = Checkpoint.from_json(json.loads(text))
        checkpoint.verify(self.coordinator_key)  # a file from another coordinator is not ours to extend
        return checkpoint

    def _load_last_seq(self) -> int:
        last = 0
        for seq, _ in read_receipts(self.receipts_path):
            last = seq
        return last


def read_receipts(path: Path) -> list[tuple[int, Receipt]]:
    """The receipts in a `receipts.jsonl`, with their seqs; [] when there is no file. A final line
    without its newline (a crash while appending) is skipped; any other bad line raises
    `CheckpointError` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    if lines and lines[-1]:
        log.warning("%s: ignoring an incomplete last line", path)
    out: list[tuple[int, Receipt]] = []
    for number, line in enumerate(lines[:-1], start=1):
        try:
            raw: Any = json.loads(line)
            seq = raw.pop("seq") if isinstance(raw, dict) else None
            receipt = Receipt.from_json(raw)
        except (ValueError, CheckpointError) as exc:
            raise CheckpointError(f"{path}, line {number}: not a receipt: {exc}") from exc
        if seq != receipt.index + 1:
            raise CheckpointError(f"{path}, line {number}: seq {seq!r:.20} does not match leaf index {receipt.index}")
        out.append((seq, receipt))
    return out


def _node_of(leaf: bytes) -> str | None:
    """The node a credit's or clawback's leaf bytes name (ledger.entries' leaf layout); None for
    any other kind of entry, which is no node's receipt."""
    try:
        fields = msgpack.unpackb(leaf, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return None
    if not isinstance(fields, list) or len(fields) < 3:
        return None
    if fields[0] == "credit":
        node = fields[1]
    elif fields[0] == "clawback":
        node = fields[2]
    else:
        return None
    return node if isinstance(node, str) else None


async def _get_json(session: aiohttp.ClientSession, url: str, params: dict[str, str]) -> object:
    """The JSON answer; None for a 404 (nothing to say yet: no checkpoint signed)."""
    async with session.get(url, params=params) as resp:
        body = await resp.read()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise RefusedAnswer(f"GET {url} answered {resp.status}: {body[:200].decode('utf-8', 'replace')}")
    try:
        value: object = json.loads(body)
    except ValueError as exc:
        raise RefusedAnswer(f"GET {url} did not answer JSON") from exc
    return value
