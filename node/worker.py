"""The node daemon's MQTT side: ask for work, hold assignments, send results, drain on stop.

Three loops share one broker link: the connection loop (connect, subscribe, announce, receive
assignments, reconnect with backoff), the pull loop (a WorkRequest when room opens up, and every
`heartbeat_seconds` anyway) and the outbox (Results and Releases, batched). Work in progress does
not depend on the connection: its results wait in the outbox across a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

import aiohttp
import aiomqtt

from protocol.codec import open_envelope, seal
from protocol.errors import PeerError
from protocol.messages import Assignment, Assignments, Status, WorkRequest
from protocol.signing import Identity

from . import batching
from .api import CoordinatorInfo, fetch_info
from .cache import ModelCache
from .estimate import TaskTimes, can_finish
from .execute import NotRun, OutputFilter, Pipeline, failed
from .governor import Governor, GovernorSettings
from .idleness import Decision, IdlePolicy
from .link import BrokerLink, new_client
from .logs import kv
from .membership import Registration, RequestSigner, join
from .modelcheck import check_model
from .outbox import Outbox, publish
from .receipts import ReceiptBook
from .runner import RunLimits, Runner, runtime_fingerprint
from .settings import NodeSettings
from .status import NodeState, StatusBoard

log = logging.getLogger(__name__)

IDLE_REPORT_SECONDS = 60.0
SEEN_LEASES = 65536  # leases remembered so a QoS-1 redelivery is not run twice


async def run_node(settings: NodeSettings, *, stop: asyncio.Event | None = None,
                   output_filter: OutputFilter | None = None,
                   on_ready: Callable[[str], None] | None = None, status: StatusBoard | None = None) -> None:
    """Run the node until `stop` is set, then drain: release queued work, finish running tasks
    (up to `drain_seconds`), send their results, announce offline. `output_filter` rewrites
    outputs before they are digested and sent (tests use it to make a node lie); `on_ready`
    gets the node id once the node is connected and subscribed; `status` is told each change of
    state (node/status.py)."""
    stop = stop or asyncio.Event()
    status = status or StatusBoard(settings=settings)  # status hook: a board that keeps no file
    identity = await asyncio.to_thread(Identity.load_or_create, settings.key_path)
    status.node_id = identity.id  # status hook
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=settings.http_timeout_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        info = await fetch_info(http, settings.coordinator_base, stop=stop,
                                default_inline=settings.max_inline_bytes,
                                default_message=settings.max_message_bytes,
                                backoff_min=settings.reconnect_min_seconds,
                                backoff_max=settings.reconnect_max_seconds)
        if info is None:
            log.info(kv("node_stopped", id=identity.id, reason="stopped before the coordinator answered"))
            return
        signer = RequestSigner(identity, info.coordinator)
        status.set_state(NodeState.STARTING, "registering with the coordinator")  # status hook
        registration = await join(http, settings.coordinator_base, info.coordinator, identity, owner=settings.owner,
                                  owner_key=settings.owner_key, cert_path=settings.cert_path, stop=stop,
                                  backoff_min=settings.reconnect_min_seconds,
                                  backoff_max=settings.reconnect_max_seconds)
        if registration is None:
            log.info(kv("node_stopped", id=identity.id, reason="stopped before the coordinator registered it"))
            return
        log.info(kv("registered", id=identity.id, owner=registration.owner,
                    certificate_expires=round(registration.expires_at),
                    broker_login="per-node" if registration.mqtt_username else "none"))
        status.set_state(NodeState.STARTING, "connecting to the broker")  # status hook
        runner = Runner(settings.slots, sessions=settings.sessions_per_slot, idle_seconds=settings.worker_idle_seconds,
                        nice=settings.nice, limits=RunLimits(memory_bytes=settings.run_memory_bytes,
                                                             max_run_seconds=settings.max_run_seconds))
        cache = ModelCache(settings.cache_dir, session=http, base_url=settings.coordinator_base,
                           quota_bytes=settings.cache_quota_bytes, validate=check_model, signer=signer)
        try:
            node = Node(settings, identity, info, http=http, cache=cache, runner=runner,
                        output_filter=output_filter, on_ready=on_ready, signer=signer,
                        registration=registration, status=status)
            await node.run(stop)
        finally:
            await cache.close()
            await runner.close()  # workers killed by PID: a run past the drain deadline is abandoned


class Node:
    def __init__(self, settings: NodeSettings, identity: Identity, info: CoordinatorInfo, *,
                 http: aiohttp.ClientSession, cache: ModelCache, runner: Runner,
                 output_filter: OutputFilter | None = None,
                 on_ready: Callable[[str], None] | None = None, signer: RequestSigner | None = None,
                 registration: Registration | None = None, status: StatusBoard | None = None) -> None:
        self.settings = settings
        self._http = http
        self.registration = registration
        self.identity = identity
        self.id = identity.id
        self.info = info
        self.topics = info.topics
        self.runtime = runtime_fingerprint()
        self.cache = cache
        self.pipeline = Pipeline(
            cache=cache, runner=runner, http=http, base_url=settings.coordinator_base,
            inline_limit=batching.inline_limit(max_inline_bytes=info.max_inline_bytes,
                                               max_message_bytes=info.max_message_bytes),
            max_blob_bytes=settings.max_blob_bytes, fetch_attempts=settings.fetch_attempts,
            output_filter=output_filter, signer=signer)
        self.counters: Counter[str] = Counter()
        self.outbox = Outbox(identity=identity, topics=self.topics, runtime=self.runtime,
                             max_message_bytes=info.max_message_bytes, counters=self.counters)
        self.outbox.busy = lambda: bool(self.pipeline.started & self.held.keys())
        self.link = BrokerLink()
        self.held: dict[str, asyncio.Task[None]] = {}  # lease -> its task, queued or running
        self.draining = False
        self._on_ready = on_ready
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._changed = asyncio.Event()  # held work changed or a new connection: maybe ask for more
        self._force_request = True
        self._task_seconds: float | None = None  # EWMA of task run time, for the adaptive prefetch
        # The coordinator may fill the capacity we last announced even if ours has shrunk since.
        self._announced = 0
        self._seq = time.time_ns() // 1_000_000  # increasing across restarts too, not just in-process
        self._since = 0  # the current broker connection's start (wall ms): names its Status messages
        self._rng = random.Random()
        self._idle_mark = (0.0, 0)  # (since when, assignments then): to explain "why no work"
        self.status = (status or StatusBoard(settings=settings)).attach(self)  # status hook
        self._expires: dict[str, float] = {}  # lease -> its end (wall clock), for the governor
        self._times = TaskTimes()  # seconds a task of each model takes here
        self._estimates: dict[str, float] = {}  # lease -> its estimated run, while held
        self._held_seconds = 0.0  # their sum: the work queued on this node, kept up to date
        self._runner = runner
        runner.cpu_share = settings.cpu_cap_percent / 100
        self.governor = Governor(
            GovernorSettings(idle_only=settings.idle_only, cpu_cap=settings.cpu_cap_percent / 100,
                             policy=IdlePolicy(max_other_cpu_percent=settings.max_other_cpu_percent,
                                               min_user_idle_seconds=settings.user_idle_minutes * 60 or None,
                                               allow_on_battery=settings.run_on_battery,
                                               resume_after_seconds=settings.resume_after_seconds)),
            runner, on_change=self._on_idleness, lease_ends=self._running_lease_ends)

    # ---- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        loops = [asyncio.create_task(self._connection_loop(), name="mqtt"),
                 asyncio.create_task(self._pull_loop(), name="pull"),
                 asyncio.create_task(self.outbox.run(self.link), name="outbox"),
                 asyncio.create_task(self.governor.run(), name="governor"),
                 asyncio.create_task(self._receipts_loop(), name="receipts")]
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([*loops, stopped], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped:  # the loops only end by a bug: fail loudly
                    task.result()
                    raise RuntimeError(f"{task.get_name()} loop ended unexpectedly")
            await self._drain()
            await self._announce_offline()
        finally:
            tasks = [*loops, stopped, *self.held.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info(kv("node_stopped", id=self.id, **dict(sorted(self.counters.items()))))

    async def _receipts_loop(self) -> None:
        """Keep receipts for this node's credit: fetched and checked every `receipts_seconds`,
        once something has been sent (before that there is no credit to prove). A coordinator that
        is away, or that answers with a forged or rewritten log, costs a log line, not the node."""
        book = ReceiptBook(self.settings.receipts_dir, self.id, self.info.public_key)
        while True:
            await asyncio.sleep(self.settings.receipts_seconds)
            if not self.counters["assigned"]:
                continue
            try:
                added = await book.refresh(self._http, self.settings.coordinator_base)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug(kv("receipts_unreachable", error=repr(exc)))
                continue
            if added:
                log.debug(kv("receipts_kept", added=added, last_seq=book.last_seq))

    async def _drain(self) -> None:
        self.draining = True
        self.status.set_state(NodeState.DRAINING, "finishing running tasks before stopping")  # status hook
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_seconds
        unstarted = [lease for lease in self.held if lease not in self.pipeline.started]
        log.info(kv("drain_start", running=len(self.held) - len(unstarted), released=len(unstarted),
                    unsent=len(self.outbox.results), drain_seconds=self.settings.drain_seconds))
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            if self.link.client is not None:  # tell the coordinator to stop sending work at once
                await asyncio.wait_for(self._request(self.link.client, 0), timeout=2.0)
        await self._cancel_and_release(unstarted, "node shutting down")
        running = list(self.held.values())
        if running:
            _, late = await asyncio.wait(running, timeout=max(0.0, deadline - loop.time()))
            if late:
                leases = [lease for lease, task in self.held.items() if task in late]
                log.warning(kv("drain_timeout", abandoned=len(leases)))
                await self._cancel_and_release(leases, "drain timeout: node shutting down")
        try:
            await asyncio.wait_for(self.outbox.idle.wait(), timeout=max(0.5, deadline - loop.time()))
        except TimeoutError:
            log.warning(kv("drain_unsent", results=len(self.outbox.results),
                           releases=len(self.outbox.releases),
                           hint="the broker was unreachable; the coordinator will time these leases out"))

    async def _cancel_and_release(self, leases: list[str], reason: str) -> None:
        tasks = [self.held[lease] for lease in leases if lease in self.held]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.outbox.release(leases, reason)

    def _status(self, state: str, since: int) -> bytes:
        return seal(Status(node=self.id, state=state, since=since), self.identity, namespace=self.topics.prefix)

    async def _announce_offline(self) -> None:
        client = self.link.client
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.publish(self.topics.status(self.id), self._status("offline", self._since), qos=1,
                                     retain=True, timeout=5.0)

    # ---- connection -------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delay = self.settings.reconnect_min_seconds
        broker = self.settings.broker
        if self.registration is not None and self.registration.mqtt_username is not None:
            # The coordinator provisioned a login for this node: it may write only its own topics.
            broker = dataclasses.replace(broker, username=self.registration.mqtt_username,
                                         password=self.registration.mqtt_password)
        while True:
            try:
                # Each connection has its own `since`; its Will is signed now, for the broker to
                # publish if this connection dies, and names this connection only.
                self._since = max(self._since + 1, time.time_ns() // 1_000_000)
                will = self._status("offline", self._since)
                async with new_client(broker, self.id, self.topics, will=will) as client:
                    # subscribe before announcing: nothing sent to us after "online" is missed
                    await client.subscribe(self.topics.assign(self.id), qos=1)
                    await client.publish(self.topics.status(self.id), self._status("online", self._since), qos=1,
                                         retain=True)
                    delay = self.settings.reconnect_min_seconds
                    self._force_request = True
                    self._changed.set()
                    await self.link.set(client)
                    log.info(kv("connected", broker=f"{broker.host}:{broker.port}", id=self.id,
                                prefix=self.topics.prefix))
                    self.status.connected()  # status hook
                    if self._on_ready is not None:
                        on_ready, self._on_ready = self._on_ready, None
                        on_ready(self.id)
                    async for message in client.messages:
                        self._on_message(message.payload)
            except aiomqtt.MqttError as exc:
                # status hook: the board logs the change once (WARNING); each retry only at DEBUG
                self.status.set_state(NodeState.UNREACHABLE, f"cannot reach broker at {broker.url}: {exc}")
                log.debug(kv("broker_unreachable", broker=f"{broker.host}:{broker.port}", error=str(exc),
                             retry_in=round(delay, 2), held=len(self.held), unsent=len(self.outbox.results)))
            finally:
                await self.link.set(None)
            await asyncio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(delay * 2, self.settings.reconnect_max_seconds)

    # ---- incoming ---------------------------------------------------------------------------

    def _drop(self, reason: str, **fields: object) -> None:
        self.counters[f"dropped_{reason}"] += 1
        log.warning(kv("message_dropped", reason=reason, **fields))

    def _on_message(self, payload: object) -> None:
        if not isinstance(payload, bytes | bytearray):
            self._drop("not_bytes")
            return
        try:
            opened = open_envelope(bytes(payload), namespace=self.topics.prefix,
                                   max_size=self.info.max_message_bytes, expect_kind="assign")
        except PeerError as exc:
            self._drop(exc.reason, size=len(payload), error=str(exc))
            return
        message = opened.message
        if opened.public_key != self.info.public_key:
            self._drop("wrong_sender", signer=opened.public_key.hex()[:16])
        elif not isinstance(message, Assignments) or message.node != self.id:
            self._drop("wrong_node", node=getattr(message, "node", "?"))
        else:
            self._accept(message.items)

    def _accept(self, items: tuple[Assignment, ...]) -> None:
        now = time.time()  # wall clock: expires_at crosses a process boundary
        expired: list[str] = []
        refused: list[str] = []
        late: list[str] = []
        for a in items:
            if a.lease in self._seen:
                self.counters["duplicate_assignments"] += 1
                continue
            self._seen[a.lease] = None
            while len(self._seen) > SEEN_LEASES:
                self._seen.popitem(last=False)
            if a.expires_at <= now:
                expired.append(a.lease)
            elif self.draining or self.governor.suspended or len(self.held) >= max(self.capacity, self._announced):
                refused.append(a.lease)
            else:
                own = self._times.get((a.model, a.opt_level))
                if not can_finish(own_seconds=own, ahead_seconds=self._held_seconds, slots=self.settings.slots,
                                  lease_left=a.expires_at - now):
                    late.append(a.lease)
                    continue
                self.counters["assigned"] += 1
                self.held[a.lease] = asyncio.create_task(self._work(a), name=f"task-{a.lease}")
                self._expires[a.lease] = a.expires_at
                if own is not None:
                    self._estimates[a.lease] = own
                    self._held_seconds += own
        self.outbox.release(expired, "expired on arrival")
        if late:  # held, it would only expire here: another node can start it now
            self.counters["released_late"] += len(late)
            self.outbox.release(late, "cannot finish before the lease ends")
        self.outbox.release(refused, "node shutting down" if self.draining else
                            "node suspended" if self.governor.suspended else "over capacity")
        self.status.refresh()  # status hook
        if log.isEnabledFor(logging.DEBUG):
            log.debug(kv("assignments", received=len(items), held=len(self.held), expired=len(expired),
                         refused=len(refused)))

    async def _work(self, a: Assignment) -> None:
        interruptions = self._runner.interruptions
        try:
            result = await self.pipeline.execute(a)
        except NotRun as exc:
            self.outbox.release([a.lease], exc.reason)
        except Exception as exc:  # a bug of ours: report it rather than lose the lease silently
            log.exception(kv("task_crashed", task=a.task, lease=a.lease))
            self.outbox.add_result(failed(a, f"node error: {type(exc).__name__}: {exc}"))
        else:
            self.outbox.add_result(result)
            # a run paused by a suspension took longer than the model needs here: not a measure
            if result.error is None and self._runner.interruptions == interruptions:
                self._times.observe((a.model, a.opt_level), result.elapsed)
                self._observe(result.elapsed)
        finally:
            estimate = self._estimates.pop(a.lease, None)
            if estimate is not None:
                # recomputed when empty, so float error cannot build up over millions of tasks
                self._held_seconds = self._held_seconds - estimate if self._estimates else 0.0
            self.held.pop(a.lease, None)
            self._expires.pop(a.lease, None)
            self.pipeline.started.discard(a.lease)
            self._changed.set()
            self.status.refresh()  # status hook

    # ---- asking for work --------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Leases held at most (running + queued): `--prefetch` if given, else adapted to how long
        tasks take here (see batching.adaptive_prefetch)."""
        if self.governor.suspended:
            return 0
        prefetch = self.settings.prefetch
        if prefetch is None:
            prefetch = batching.adaptive_prefetch(slots=self.settings.slots, task_seconds=self._task_seconds)
        return self.settings.slots + prefetch

    def _on_idleness(self, decision: Decision) -> None:
        """The governor suspended or resumed the node: say so, ask for nothing (or again), and hand
        back the work not started (the coordinator gives it to a node whose machine is spare)."""
        if decision.running:
            self.status.clear(NodeState.SUSPENDED)
        else:
            self.status.set_state(NodeState.SUSPENDED, decision.reason.removeprefix("suspended: "))
            unstarted = [lease for lease in self.held if lease not in self.pipeline.started]
            if unstarted:
                asyncio.get_running_loop().create_task(self._cancel_and_release(unstarted, "node suspended"))
        self._force_request = True
        self._changed.set()

    def _running_lease_ends(self) -> list[float]:
        """The running leases' ends on the loop's clock (the governor's)."""
        offset = asyncio.get_running_loop().time() - time.time()
        return [self._expires[lease] + offset for lease in self.pipeline.started if lease in self._expires]

    def _observe(self, elapsed: float) -> None:
        before = self.capacity
        # EWMA over ~10 tasks: follows a new job's task size quickly, ignores one slow outlier
        self._task_seconds = elapsed if self._task_seconds is None else 0.9 * self._task_seconds + 0.1 * elapsed
        self.pipeline.set_depth(self._task_seconds)
        if self.capacity > before:
            self._force_request = True  # tell the coordinator now, not at the next heartbeat

    async def _request(self, client: aiomqtt.Client, slots: int) -> None:
        self._announced = slots
        # Wall-clock milliseconds, strictly increasing: the coordinator refuses requests older than a
        # few minutes, so a request captured on an open broker cannot be replayed after its restart.
        self._seq = max(self._seq + 1, time.time_ns() // 1_000_000)
        request = WorkRequest(node=self.id, owner=self.settings.owner, slots=slots,
                              models=self.cache.digests(), runtime=self.runtime, seq=self._seq,
                              held=(*self.held, *(r.lease for r in self.outbox.results)))
        await publish(client, self.topics, self.topics.work(self.id), request, self.identity)

    async def _pull_loop(self) -> None:
        """The request states our capacity (slots + prefetch). The coordinator knows which leases
        we hold, grants the difference, and refills us as soon as our results arrive, so no
        request per finished task is needed: one at start, on reconnect, and every heartbeat
        (in case the coordinator restarted and forgot us)."""
        loop = asyncio.get_running_loop()
        last = -float("inf")
        self._idle_mark = (loop.time(), 0)
        while not self.draining:
            wait = max(0.0, last + self.settings.heartbeat_seconds - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=wait)
            self._changed.clear()
            client = await self.link.connected()
            if self.draining:
                return
            due = loop.time() - last >= self.settings.heartbeat_seconds
            if self._force_request or due:
                self._explain_idle(loop.time())
                try:
                    await self._request(client, self.capacity)
                    self._force_request = False
                except aiomqtt.MqttError as exc:
                    log.debug(kv("request_not_sent", error=str(exc)))
                last = loop.time()

    def _explain_idle(self, now: float) -> None:
        """Log, about once a minute, why a connected node is doing nothing."""
        if self.held or self.counters["assigned"] != self._idle_mark[1]:
            self._idle_mark = (now, self.counters["assigned"])
        elif now - self._idle_mark[0] >= IDLE_REPORT_SECONDS:
            log.info(kv("no_work", idle_seconds=round(now - self._idle_mark[0]),
                        asked_for=self.capacity,
                        hint="the coordinator has no open task this node may take (no jobs, or every open "
                             "task already has a replica on this node or owner)"))
            self._idle_mark = (now, self.counters["assigned"])
