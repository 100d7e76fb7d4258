"""The notary's adapter: rebuilds the ledger's tree from the store at start, refuses a ledger that
no longer matches its latest checkpoint, then every tick reads the entries committed since, in
pages, and signs and saves a checkpoint when the tree grew.

It only reads the store, on its own tick: the path that records verdicts and credits is untouched,
and a fresh entry is covered by a signed checkpoint about one tick after its commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from ledger.checkpoint import Checkpoint, CheckpointError
from ledger.notary import Notary, NotaryError
from protocol.signing import Identity

from . import failpoints
from .store import CoordinatorStore

log = logging.getLogger("sparecycles.coordinator.notary")

PAGE: Final = 10_000
"""Entries read per store call: a page's leaf hashing (~30 ms) holds the event loop no longer."""
PROGRESS_SECONDS: Final = 5.0


class LedgerRefused(Exception):
    """The coordinator must not start on this ledger; the message is the one line to print."""


class LedgerNotary:
    def __init__(self, store: CoordinatorStore, identity: Identity) -> None:
        self.store = store
        self.notary = Notary(identity)
        self.latest: Checkpoint | None = None  # the newest checkpoint saved

    async def open(self) -> None:
        """Rebuild the tree from every stored entry and check it against the latest checkpoint.
        Raises `LedgerRefused` with one line saying what is wrong and what to do."""
        latest = await self.store.latest_checkpoint()
        where = "" if latest is None else \
            f"ledger does not match its checkpoint of size {latest.size} signed at {latest.time_iso()}: "
        started = last = time.monotonic()
        try:
            while await self._absorb_page():
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    log.info("rebuilding the ledger's Merkle tree: %d entries so far (%.0f/s)", self.notary.size,
                             self.notary.size / (last - started))
        except NotaryError as exc:
            raise LedgerRefused(f"{where or 'ledger is not a gapless log: '}{exc}: entries were deleted or "
                                "inserted outside the coordinator; restore the database from a backup") from exc
        if latest is not None:
            try:
                self.notary.check(latest)
            except CheckpointError as exc:
                raise LedgerRefused(str(exc)) from exc
        self.latest = latest
        log.info("ledger tree rebuilt entries=%d seconds=%.1f checkpoint=%s", self.notary.size,
                 time.monotonic() - started, "none" if latest is None else latest.size)

    async def tick(self, now_ms: int) -> Checkpoint | None:
        """Absorb the entries committed since the last tick; sign and save a checkpoint if the tree
        grew past the latest saved one. Returns the new checkpoint, or None."""
        while await self._absorb_page():
            pass
        if self.notary.size == 0 or (self.latest is not None and self.latest.size >= self.notary.size):
            return None
        checkpoint = self.notary.sign(now_ms)
        failpoints.hit("checkpoint.before_save")
        await self.store.save_checkpoint(checkpoint)
        failpoints.hit("checkpoint.after_save")
        self.latest = checkpoint
        return checkpoint

    async def run(self, seconds: float) -> None:
        """`tick` every `seconds` until cancelled. A store error is logged and retried at the next
        tick: a database that went away must not take the coordinator down with it."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.tick(time.time_ns() // 1_000_000)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checkpointing the ledger failed; retrying in %.1f s", seconds)

    async def _absorb_page(self) -> bool:
        """Absorb one page; True if it was full (there may be more)."""
        page = await self.store.ledger_entries(self.notary.size, PAGE)
        self.notary.absorb(page)
        return len(page) == PAGE
