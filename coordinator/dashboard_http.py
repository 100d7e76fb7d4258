"""The live dashboard: `GET /` serves its page, `GET /dashboard/{file}` its script, styles and
icon, all shipped as package data (coordinator/dashboard/), so nothing is fetched from a CDN. The
page reads `GET /v1/events` (server-sent snapshots) and draws everything client-side.

Every answer carries a content-security policy that allows scripts, styles and connections from
this origin only, and no inline script: names on the page come from strangers (account names, job
ids, failure reasons), and even a rendering bug must not let one of them run as code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Final

from aiohttp import web

CONTENT_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # RFC 9239
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
ASSETS: Final = ("dashboard.js", "dashboard.css", "icon.svg")
"""The files `GET /dashboard/{file}` serves: a fixed list, so no request can name another file."""

CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# An asset asked for under its current digest (`?v=`, which the page's links carry) never changes:
# the browser may keep it a year. Asked for without, it is revalidated by ETag every time, so an
# upgraded coordinator is never shown with a stale script.
IMMUTABLE: Final = "public, max-age=31536000, immutable"
REVALIDATE: Final = "no-cache"


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    digest: str  # the first 16 hex of sha256: the version in links and the ETag

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def _asset(name: str, body: bytes) -> Asset:
    suffix = name[name.rindex("."):]
    return Asset(body=body, content_type=CONTENT_TYPES[suffix], digest=hashlib.sha256(body).hexdigest()[:16])


@cache
def assets() -> dict[str, Asset]:
    """The page and its files, read once from the package. The page's `{{v:NAME}}` placeholders
    become NAME's digest, so each release links its own script and styles (cache busting without a
    build step)."""
    folder = resources.files("coordinator") / "dashboard"
    out = {name: _asset(name, (folder / name).read_bytes()) for name in ASSETS}
    page = (folder / "index.html").read_text(encoding="utf-8")
    for name, asset in out.items():
        page = page.replace("{{v:" + name + "}}", asset.digest)
    out["index.html"] = _asset("index.html", page.encode())
    return out


def _answer(request: web.Request, asset: Asset, cache_control: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": asset.etag}
    if asset.etag in {tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = asset.content_type
    return web.Response(body=asset.body, headers=headers)


async def dashboard_page(request: web.Request) -> web.Response:
    """`GET /`: the page. Revalidated on every load (it names the current assets' digests)."""
    return _answer(request, assets()["index.html"], REVALIDATE)


async def dashboard_file(request: web.Request) -> web.Response:
    """`GET /dashboard/{file}`: one of ASSETS; 404 with the list otherwise."""
    name = request.match_info["file"]
    asset = assets().get(name) if name in ASSETS else None
    if asset is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no dashboard file {name[:80]!r}: the dashboard has "
                                                         f"{', '.join(ASSETS)}; open / for the page"}),
                               content_type="application/json")
    current = request.query.get("v") == asset.digest
    return _answer(request, asset, IMMUTABLE if current else REVALIDATE)


def add_dashboard_routes(app: web.Application) -> None:
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/dashboard/{file}", dashboard_file)
