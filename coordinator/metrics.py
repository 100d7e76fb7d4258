"""`GET /metrics`: the coordinator in Prometheus' text format.

Nearly everything is read from state the coordinator keeps anyway (its jobs, leases and counters)
when Prometheus scrapes, by a Collector: the result path, ~2,000 tasks/s, pays nothing for it. The
two histograms are the exception, one observe() per decided task and per HTTP request.

Public, like /v1/health: a scraper cannot sign requests, and what is shown is aggregate (counts
by state, verdict, reason; route templates, never job, node or account ids), all of it already
readable by anyone from /v1/health's counters. An operator who wants it private keeps it off the
public listener at the reverse proxy (docs/operations.md)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .app_keys import COORDINATOR
from .service import Coordinator

METRICS_PATH = "/metrics"
# Reasons a result is refused before it is counted (Engine.check_result): "rejected" results.
RESULT_REJECTIONS = ("unknown_or_closed_lease", "lease_of_another_node", "result_does_not_match_lease")
# From a tiny model's few milliseconds to a job deadline's hour.
TASK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
# Any other method is "other": a label per made-up method would let a client grow /metrics at will.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0)


class CoordinatorCollector(Collector):
    """Reads the coordinator at scrape time, on the event loop's thread (the handler calls it), so
    it sees a consistent state without locks."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[Metric]:
        c, engine = self.c, self.c.engine
        jobs = GaugeMetricFamily("sparecycles_jobs", "Jobs held by the coordinator, by state (finished jobs "
                                 "leave when their retention expires)", labels=["state"])
        states = Counter(str(j.state) for j in engine.jobs.values())
        for state in ("running", "done", "failed", "cancelled"):
            states.setdefault(state, 0)
        for state, n in sorted(states.items()):
            jobs.add_metric([state], n)
        yield jobs

        verified = failed = total = 0
        for j in engine.jobs.values():
            verified, failed, total = verified + j.verified, failed + j.failed, total + len(j.tasks)
        tasks = GaugeMetricFamily("sparecycles_tasks", "Tasks of the jobs held, by state", labels=["state"])
        tasks.add_metric(["open"], total - verified - failed)
        tasks.add_metric(["verified"], verified)
        tasks.add_metric(["failed"], failed)
        yield tasks

        counts = engine.counters
        decided = CounterMetricFamily("sparecycles_tasks_decided", "Tasks decided since start, by outcome "
                                      "(verified after the coordinator's own check, verified on agreement "
                                      "or trust alone, failed)", labels=["outcome"])
        decided.add_metric(["verified_checked"], counts["task_verified_checked"])
        decided.add_metric(["verified_unchecked"], counts["task_verified_unchecked"])
        decided.add_metric(["failed"], counts["task_failed"])
        yield decided

        results = CounterMetricFamily("sparecycles_results", "Results from nodes since start, by verdict: "
                                      "accepted (counted towards a quorum), error (the node reported an "
                                      "error or its outputs were unusable), rejected (refused before "
                                      "counting: unknown, closed or foreign lease)", labels=["verdict"])
        results.add_metric(["accepted"], counts["result_counted"])
        results.add_metric(["error"], counts["invalid_result"])
        results.add_metric(["rejected"], sum(c.counters[f"rejected_{r}"] for r in RESULT_REJECTIONS))
        yield results

        refused = CounterMetricFamily("sparecycles_messages_rejected", "MQTT messages refused since start, by "
                                      "reason (malformed, forged, replayed, unregistered node, ...)",
                                      labels=["reason"])
        for key, n in sorted(c.counters.items()):
            if key.startswith("rejected_"):
                refused.add_metric([key.removeprefix("rejected_")], n)
        yield refused

        audits = CounterMetricFamily("sparecycles_audits", "Tasks the coordinator ran itself since start")
        audits.add_metric([], c.counters["audits_run"])
        yield audits

        yield GaugeMetricFamily("sparecycles_nodes_online", "Nodes asking for work or holding a lease",
                                value=len(engine.node_views()))
        yield GaugeMetricFamily("sparecycles_broker_connected", "1 while the MQTT broker connection is up",
                                value=1 if c.connected.is_set() else 0)
        depth = GaugeMetricFamily("sparecycles_queue_depth", "What is waiting: tasks no node has taken yet, "
                                  "leases out, changes not yet committed, audits running, assignments not "
                                  "yet published", labels=["queue"])
        for queue, n in c.queue_depths().items():
            depth.add_metric([queue], n)
        yield depth


class CoordinatorMetrics:
    """One registry per coordinator (tests run several in one process), its collector and the two
    histograms."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(CoordinatorCollector(coordinator))
        self.task_seconds = Histogram("sparecycles_task_seconds", "Seconds from a task's first lease to its "
                                      "verdict (verified or failed)", buckets=TASK_BUCKETS, registry=self.registry)
        self.http_seconds = Histogram("sparecycles_http_request_seconds", "HTTP request handling time, by route "
                                      "template, method and status", ["route", "method", "status"],
                                      buckets=HTTP_BUCKETS, registry=self.registry)
        coordinator.engine.observe_task_seconds = self.task_seconds.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


METRICS: web.AppKey[CoordinatorMetrics] = web.AppKey("metrics", CoordinatorMetrics)


async def serve_metrics(request: web.Request) -> web.Response:
    metrics = request.app.get(METRICS)
    if metrics is None:
        return web.json_response({"error": "metrics are not ready: the coordinator is starting"}, status=503)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def time_requests(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Innermost: times the handler (and aiohttp's own 404/405), labelled by the route's template so a
    job id never becomes a label. Requests the signature check refuses are not timed."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = request.app.get(METRICS)
        if metrics is not None:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            method = request.method if request.method in METHODS else "other"
            metrics.http_seconds.labels(route, method, str(status)).observe(time.perf_counter() - start)


def add_metrics_routes(app: web.Application) -> None:
    """`GET /metrics`, the request timer, and the metrics made once the coordinator exists (its
    cleanup context runs before other startup hooks)."""

    async def start_metrics(app: web.Application) -> None:
        coordinator = app.get(COORDINATOR)
        if coordinator is not None:  # an app of routes alone (the OpenAPI tests) has none to measure
            app[METRICS] = CoordinatorMetrics(coordinator)

    app.on_startup.append(start_metrics)
    app.middlewares.append(time_requests)
    app.router.add_get(METRICS_PATH, serve_metrics)
