"""The live dashboard in a real headless browser (Debian's chromium driven by Playwright; it cannot
download its own browser here): against a real coordinator and two real nodes running a real job,
the page shows the job advancing to done, both nodes, both owners' credit and a signed checkpoint.
Against a feed of hostile names it renders them as text and runs nothing; when the stream drops it
says "disconnected" and comes back by itself. The files themselves: content types, caching and a
content-security policy without inline script or foreign origins.

Screenshots are kept as artifacts: under the test's tmp_path, and copied to $SPARECYCLES_ARTIFACTS
(or test-artifacts/ at the repository's root, which ignores itself) for a person to look at.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from onnx import TensorProto, helper, numpy_helper
from playwright.sync_api import expect, sync_playwright

from coordinator.dashboard_http import ASSETS, CSP, IMMUTABLE, REVALIDATE, add_dashboard_routes, assets
from coordinator.openapi import openapi_document
from sparecycles.cli.processes import free_port
from tests import models
from tests.conftest import IN_CI

from .network import Network, submitter

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<img src=x onerror=alert(1)>"
ROWS, TASK_SIZE, WIDTH, DEPTH = 768, 8, 1024, 768
REPO = Path(__file__).resolve().parents[2]


# ---- the files: types, caching, policy (no browser) ---------------------------------------------
class _PageScan(HTMLParser):
    """Every <script> (its attributes and whether it has a body) and every on* attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.handlers: list[str] = []
        self.urls: list[str] = []
        self._in_script = False
        self.inline_code = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.urls += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline_code += data.strip()


def _files_app() -> web.Application:
    app = web.Application()
    add_dashboard_routes(app)
    return app


async def test_the_page_and_its_files_have_their_types_caching_and_a_policy_without_inline_script() -> None:
    # Attack: a stranger's name that slips past the page's escaping would run as script. The
    # policy is the second wall: scripts only from this origin, none inline, nothing from afar.
    async with TestClient(TestServer(_files_app())) as client:
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        assert page.headers["Cache-Control"] == REVALIDATE
        policy = page.headers["Content-Security-Policy"]
        assert policy == CSP
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "http" not in policy
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        scan = _PageScan()
        scan.feed(await page.text())
        assert scan.scripts and all(s.get("src") for s in scan.scripts) and scan.inline_code == ""
        assert scan.handlers == []
        # every file the page links is this origin's, pinned to the file's digest
        assert all(url.startswith("/dashboard/") for url in scan.urls), scan.urls
        linked = {re.sub(r"\?.*", "", u).rsplit("/", 1)[1]: u.split("?v=")[1] for u in scan.urls}
        assert linked == {name: assets()[name].digest for name in ASSETS}

        types = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "icon.svg": "image/svg+xml"}
        for name, digest in linked.items():
            pinned = await client.get(f"/dashboard/{name}?v={digest}")
            assert pinned.status == 200 and pinned.content_type == types[name]
            assert pinned.headers["Cache-Control"] == IMMUTABLE
            assert pinned.headers["Content-Security-Policy"] == CSP
            assert await pinned.read() == assets()[name].body
            # an old or missing digest: revalidate, and the ETag makes that a 304
            stale = await client.get(f"/dashboard/{name}?v=0123456789abcdef")
            assert stale.headers["Cache-Control"] == REVALIDATE
            again = await client.get(f"/dashboard/{name}", headers={"If-None-Match": stale.headers["ETag"]})
            assert again.status == 304 and await again.read() == b""

        # Attack: path traversal to read the coordinator's key or database through the file route.
        for name in ("index.html", "..%2Fdashboard_http.py", "..%2F..%2Fpyproject.toml", "nope.js", "%2Fetc%2Fpasswd"):
            refused = await client.get(f"/dashboard/{name}")
            assert refused.status == 404, name
            assert "no dashboard file" in (await refused.json())["error"]


def test_the_openapi_document_lists_exactly_the_files_served() -> None:
    item = openapi_document()["paths"]["/dashboard/{file}"]["get"]
    enum = next(p["schema"]["enum"] for p in item["parameters"] if p["name"] == "file")
    assert sorted(enum) == sorted(ASSETS)


# ---- the browser ----------------------------------------------------------------------------------
def _artifact_dir() -> Path:
    """$SPARECYCLES_ARTIFACTS, or test-artifacts/ at the repository's root, which ignores itself
    so no screenshot is ever committed."""
    env = os.environ.get("SPARECYCLES_ARTIFACTS")
    if env:
        out = Path(env) / "dashboard"
    else:
        root = REPO / "test-artifacts"
        root.mkdir(exist_ok=True)
        (root / ".gitignore").write_text("*\n")
        out = root / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shoot(page: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, _artifact_dir() / shot.name)
    return shot


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (Playwright cannot download a browser here)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + "; CI fails instead of skipping")

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _watch(page: Any) -> dict[str, list[str]]:
    """Dialogs (an alert would be XSS), console errors and CSP refusals, as they happen."""
    seen: dict[str, list[str]] = {"dialogs": [], "errors": []}

    def on_dialog(dialog: Any) -> None:
        seen["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("console", lambda msg: seen["errors"].append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: seen["errors"].append(str(exc)))
    return seen


def _slow_model() -> bytes:
    """DEPTH MatMul+Tanh layers sharing one WIDTH x WIDTH weight: 1.6 GFLOP a row from a 4 MiB
    model and 4 KiB of input a row (about 8 ms a row here: ORT reaches ~200 GFLOP/s a core on this
    AVX-512 VM), so the job lasts several of the stream's one-second snapshots. A job of
    tests.models' classifier or deep_mlp finishes between two of them."""
    w = (np.random.default_rng(1).standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(DEPTH):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        prev = f"h{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(nodes, "slow_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", WIDTH])],
                              [numpy_helper.from_array(w, name="w")])
    return models._model(graph)


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def test_the_page_follows_a_real_job_to_done_with_both_nodes_their_credit_and_a_checkpoint(
        network: Network, browser: Any, tmp_path: Path) -> None:
    network.start_node("alice")
    network.start_node("bob")
    with urllib.request.urlopen(network.url + "/", timeout=10) as answer:  # the real app, its middlewares too
        assert answer.headers["Content-Security-Policy"] == CSP
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    seen = _watch(page)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(network.url + "/")
    page.wait_for_selector("[data-testid=connection].pill-live", timeout=15_000)
    # both nodes, by owner, before any work
    expect(page.locator("[data-testid=node]")).to_have_count(2, timeout=20_000)

    model = _slow_model()
    x = np.random.default_rng(0).standard_normal((ROWS, WIDTH)).astype(np.float32)
    outcome: dict[str, Any] = {}

    async def run() -> None:
        async with submitter(network.url) as c:
            job = await c.submit(await c.ensure_model(model), {"x": x}, task_size=TASK_SIZE)
            outcome["job"] = job["job"]
            outcome["status"] = await c.wait(job["job"], timeout=120)

    worker = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    worker.start()
    _wait_for(lambda: "job" in outcome, 30, "the job to be accepted")
    job_id = outcome["job"]
    card = page.locator(f"[data-testid=job][data-job='{job_id}']")
    card.wait_for(timeout=15_000)
    progress = card.locator("[data-testid=progress]")

    def verified() -> tuple[int, int]:
        m = re.match(r"(\d+)/(\d+) verified", progress.inner_text())
        assert m, progress.inner_text()
        return int(m.group(1)), int(m.group(2))

    # the page itself must show the count rising (not only the end state)
    seen_counts: set[int] = set()
    timeline: list[tuple[float, int]] = []
    t0 = time.monotonic()
    deadline = t0 + 120
    while True:
        done, total = verified()
        if done not in seen_counts:
            timeline.append((round(time.monotonic() - t0, 1), done))
        seen_counts.add(done)
        if done == total:
            break
        if 0 < done < total and not (tmp_path / "dashboard-running.png").exists():
            _shoot(page, tmp_path, "dashboard-running")
        assert time.monotonic() < deadline, f"stuck at {done}/{total}"
        time.sleep(0.2)
    worker.join(30)
    assert outcome["status"]["state"] == "done", outcome["status"]
    tasks = ROWS // TASK_SIZE
    assert total == tasks and len(seen_counts - {0, tasks}) >= 2, timeline
    card.locator(".badge-done").wait_for(timeout=10_000)
    assert "0 open" not in progress.inner_text() and "failed" not in progress.inner_text()

    owners = page.locator("[data-testid=node] [data-testid=owner]").all_inner_texts()
    assert sorted(owners) == ["alice", "bob"]
    # each owner earned credit (two replicas of every task): both bars, non-zero
    for owner in ("alice", "bob"):
        value = page.locator(f"[data-testid=balance][data-owner='{owner}'] .hbar-value")
        expect(value).to_have_text(re.compile(r"^[1-9]"), timeout=15_000)
    # the newest signed checkpoint covers every entry of the ledger (how many: trusted nodes' tasks
    # need fewer replicas, so it is asked, not computed)
    size = page.locator("[data-testid=checkpoint-size]")
    entries = len(_get(f"{network.url}/v1/ledger/entries?limit=10000")["entries"])
    assert entries > tasks
    _wait_for(lambda: size.count() == 1 and int(re.sub(r"\D", "", size.inner_text()) or 0) >= entries, 15,
              f"a checkpoint of all {entries} entries (the page: {size.all_inner_texts()}, "
              f"GET /v1/ledger/checkpoint: {_get(network.url + '/v1/ledger/checkpoint')['checkpoint']['size']})")
    assert page.locator("[data-testid=entry]").count() > 0
    assert page.locator("#tp-chart polyline").count() == 1
    shot = _shoot(page, tmp_path, "dashboard-done")
    page.set_viewport_size({"width": 400, "height": 900})
    _shoot(page, tmp_path, "dashboard-phone")
    assert shot.stat().st_size > 10_000
    assert seen["dialogs"] == [] and seen["errors"] == [], seen
    # no CDN, no font service: the page asked its own coordinator for everything
    assert requested and all(url.startswith(network.url + "/") for url in requested), requested


# ---- hostile names and a dropping stream, through a feed of the test's own --------------------
def _hostile_snapshot(n: int) -> dict[str, Any]:
    """A snapshot in GET /v1/events' shape with HOSTILE in every string a stranger could choose.
    The real coordinator refuses such an account name (1-64 letters, digits, '.', '_', '-'), so
    only a feed of our own can put one on the page: the page must not rely on that rule."""
    now = time.time()
    iso = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))
    return {
        "jobs": [{"job": HOSTILE, "state": "running", "submitter": HOSTILE, "created_at_iso": iso,
                  "tasks": {"total": 10, "verified": n % 10, "failed": 1, "open": 9 - n % 10},
                  "why": f"task 7 failed: output '{HOSTILE}' contains NaN on 2 owners", "eta_seconds": 12}],
        "nodes": [{"node": HOSTILE, "owner": HOSTILE, "slots": 2, "state": "working", "online": True, "speed": 1.5,
                   "trust": {"level": HOSTILE, "score": 0.5, "streak": 3, "audit_rate": 0.1},
                   "last_seen_iso": iso}],
        "throughput": {"tasks_per_second": 1.0 + n % 3, "at": now},
        "ledger": {"balances": [{"owner": HOSTILE, "credits": 1234}],
                   "recent": [{"seq": 1, "kind": "grant", "account": HOSTILE, "memo": HOSTILE, "amount": 5,
                               "created_at_iso": iso},
                              {"seq": 2, "kind": HOSTILE, "owner": HOSTILE, "node": HOSTILE, "job": HOSTILE,
                               "amount": 1, "created_at_iso": iso}],
                   "checkpoint": {"origin": HOSTILE, "size": 2, "root": HOSTILE, "timestamp_ms": int(now * 1000),
                                  "time": iso, "signature": HOSTILE}},
        "blocked": [HOSTILE],
        "unit": {"name": "credit", "means": HOSTILE},
    }


class _Feed:
    """The dashboard's files and a stub /v1/events, in a thread: `up` decides whether the stream
    answers (a snapshot every 0.3 s) or refuses with 503, as a coordinator going away would."""

    def __init__(self) -> None:
        self.up = True
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if not self.up:
            return web.json_response({"error": "down"}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        n = 0
        while self.up:
            await resp.write(f"event: snapshot\ndata: {json.dumps(_hostile_snapshot(n))}\n\n".encode())
            n += 1
            await asyncio.sleep(0.3)
        return resp  # ends the stream: the page sees the drop

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = _files_app()
        app.router.add_get("/v1/events", self._events)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def __enter__(self) -> _Feed:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.up = False
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.mark.parametrize("policy", ["enforced", "bypassed"])
def test_hostile_names_render_as_text_and_a_dropped_stream_shows_disconnected_then_recovers(
        browser: Any, tmp_path: Path, policy: str) -> None:
    # Attack: stored XSS through an account name, job id, failure reason or memo: a stranger picks
    # the string, every visitor's browser renders it. It must show as the literal text and run
    # nothing, with the content-security policy and also without it (escaping alone must hold).
    with _Feed() as feed:
        page = browser.new_context(bypass_csp=policy == "bypassed", viewport={"width": 1280, "height": 900}).new_page()
        seen = _watch(page)
        page.goto(f"http://127.0.0.1:{feed.port}/")
        page.wait_for_selector("[data-testid=connection].pill-live", timeout=15_000)
        page.wait_for_selector("[data-testid=job]", timeout=5_000)
        time.sleep(1.0)  # a few snapshots, so any handler that would fire has fired
        assert page.locator("[data-testid=submitter]").inner_text() == HOSTILE
        assert page.locator("[data-testid=node] [data-testid=owner]").inner_text() == HOSTILE
        assert page.locator("[data-testid=blocked-account]").inner_text() == HOSTILE
        assert page.locator("[data-testid=balance] .hbar-name").inner_text() == HOSTILE
        assert HOSTILE in page.locator("[data-testid=why]").inner_text()
        assert page.locator("img[src=x]").count() == 0  # no element was made from the text
        assert page.locator("main img").count() == 0
        assert seen["dialogs"] == [], seen["dialogs"]
        _shoot(page, tmp_path, f"dashboard-hostile-{policy}")

        feed.up = False  # the coordinator goes away: the stream ends, reconnects are refused
        expect(page.locator("[data-testid=connection]")).to_have_text(re.compile("^disconnected"), timeout=10_000)
        assert page.locator("body.offline").count() == 1
        _shoot(page, tmp_path, f"dashboard-disconnected-{policy}")
        feed.up = True  # back: the page reconnects by itself, no reload
        page.wait_for_selector("[data-testid=connection].pill-live", timeout=20_000)
        assert page.locator("body.offline").count() == 0
        assert seen["dialogs"] == [], seen["dialogs"]
        # the only console errors allowed are the browser's own reports of the refused reconnects
        assert all("503" in e or "EventSource" in e for e in seen["errors"]), seen["errors"]
