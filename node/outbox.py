"""Results and Releases waiting to be sent, and the loop that sends them.

Whatever completes while a publish is in flight goes out in the next envelope: one signature per
batch instead of one per result (a signature check costs the coordinator ~0.1 ms, DESIGN §11).
Nothing is lost on a disconnect: unsent items go back to the front and wait for the next link.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable

import aiomqtt

from protocol.codec import seal
from protocol.messages import Message, Release, Result, Results
from protocol.signing import Identity
from protocol.topics import Topics

from . import batching
from .link import BrokerLink
from .logs import kv

log = logging.getLogger(__name__)


async def publish(client: aiomqtt.Client, topics: Topics, topic: str, message: Message, identity: Identity) -> int:
    payload = seal(message, identity, namespace=topics.prefix)
    await client.publish(topic, payload, qos=1)
    return len(payload)


# How long a busy node holds a finished result for others to join it (see Outbox.run).
COALESCE_SECONDS = 0.002

class Outbox:
    def __init__(self, *, identity: Identity, topics: Topics, runtime: str, max_message_bytes: int,
                 counters: Counter[str]) -> None:
        self._identity = identity
        self._node = identity.id
        self._topics = topics
        self._runtime = runtime
        self._max_message_bytes = max_message_bytes
        self._counters = counters
        self.results: list[Result] = []
        self.releases: list[tuple[str, str]] = []  # (lease, reason)
        self._pending = asyncio.Event()  # something to send
        self.busy: Callable[[], bool] | None = None  # True while more results are on their way
        self.idle = asyncio.Event()  # nothing to send and nothing being sent
        self.idle.set()

    def add_result(self, result: Result) -> None:
        self._counters["failed" if result.error else "done"] += 1
        self.results.append(result)
        self._wake()

    def release(self, leases: list[str], reason: str) -> None:
        if not leases:
            return
        self._counters["released"] += len(leases)
        log.info(kv("release", count=len(leases), reason=reason))
        self.releases.extend((lease, reason) for lease in leases)
        self._wake()

    def _wake(self) -> None:
        self.idle.clear()
        self._pending.set()

    async def run(self, link: BrokerLink) -> None:
        failed: aiomqtt.Client | None = None
        while True:
            await self._pending.wait()
            if self.busy is not None and self.busy():
                # More results are about to finish: a short wait sends them in one signed envelope
                # (fewer messages per task under load); an idle node's result goes out at once.
                await asyncio.sleep(COALESCE_SECONDS)
            client = await link.connected(not_this=failed)
            self._pending.clear()
            releases, self.releases = self.releases, []
            results, self.results = self.results, []
            try:
                await self._send_releases(client, releases)
                releases = []
                await self._send_results(client, results)
                failed = None
            except aiomqtt.MqttError as exc:
                failed = client  # wait for the next connection before trying again
                log.warning(kv("send_failed", error=str(exc), results=len(results), releases=len(releases)))
                self.releases[:0] = releases
                self.results[:0] = results
                self._pending.set()
            if not self.results and not self.releases:
                self.idle.set()

    async def _send_releases(self, client: aiomqtt.Client, releases: list[tuple[str, str]]) -> None:
        by_reason: dict[str, list[str]] = {}
        for lease, reason in releases:
            by_reason.setdefault(reason, []).append(lease)
        budget = self._max_message_bytes - batching.ENVELOPE_OVERHEAD
        for reason, leases in by_reason.items():
            for batch in batching.split_batches(leases, [len(x) + 2 for x in leases], budget=budget):
                await publish(client, self._topics, self._topics.work(self._node),
                              Release(node=self._node, leases=tuple(batch), reason=reason), self._identity)

    async def _send_results(self, client: aiomqtt.Client, results: list[Result]) -> None:
        """Send `results` in as few envelopes as fit; on failure the unsent ones are left in the list."""
        budget = batching.results_budget(max_message_bytes=self._max_message_bytes, node=self._node,
                                         runtime=self._runtime)
        sizes = [batching.result_size_bound(r) for r in results]
        for i, size in enumerate(sizes):
            if size > budget:  # cannot happen with sane limits: outputs over the inline limit go by HTTP
                results[i] = dataclasses.replace(results[i], output_digest="", outputs=None,
                                                 error="result too large for one message")
                sizes[i] = batching.result_size_bound(results[i])
        for batch in batching.split_batches(results, sizes, budget=budget):
            nbytes = await publish(client, self._topics, self._topics.result(self._node),
                                   Results(node=self._node, runtime=self._runtime, items=tuple(batch)),
                                   self._identity)
            del results[:len(batch)]
            log.debug(kv("results_sent", count=len(batch), bytes=nbytes))
