"""The OpenAPI document (coordinator/openapi.py) against the routes `add_routes` registers, the
access level each handler declares, and the route table in docs/http-api.md: the three describe
the same API, so none can drift. Fuzzing the API from it: tests/integration/test_api_fuzz.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from coordinator.http_api import add_routes
from coordinator.http_auth import Access, make_middleware
from coordinator.openapi import OPENAPI_PATH, openapi_document

DOCS = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
Route = tuple[str, str]  # (METHOD, /path/{param})


def _templates(pattern: str) -> list[str]:
    """The OpenAPI paths an aiohttp route pattern stands for: `{name}` stays a parameter, a
    `{name:a|b}` alternative of literals becomes one path per literal."""
    parts: list[list[str]] = [[]]
    for segment in pattern.split("/"):
        m = re.fullmatch(r"\{(\w+):([\w|]+)\}", segment)
        choices = m.group(2).split("|") if m else [segment]
        parts = [[*p, c] for p in parts for c in choices]
    return ["/".join(p) for p in parts]


def _app() -> web.Application:
    def no_gate(request: web.Request) -> Any:
        raise AssertionError("a public route must not consult the gate")

    app = web.Application(middlewares=[make_middleware(no_gate)])
    add_routes(app)
    return app


def registered_routes() -> dict[Route, Access]:
    """(METHOD, path) -> access level of every route add_routes registers, without the HEAD that
    aiohttp adds beside each GET by itself (same handler: nothing of its own to describe)."""
    out: dict[Route, Access] = {}
    app = _app()
    gets = {(r.resource.canonical, r.handler) for r in app.router.routes()
            if r.method == "GET" and r.resource is not None}
    for route in app.router.routes():
        assert route.resource is not None
        if route.method == "HEAD" and (route.resource.canonical, route.handler) in gets:
            continue
        info = route.resource.get_info()
        pattern = str(info.get("formatter") or info.get("path"))
        if "pattern" in info:  # a dynamic resource: recover the alternatives the formatter hides
            pattern = re.sub(r"\(\?P<(\w+)>\[\^\{\}/\]\+\)", r"{\1}", info["pattern"].pattern).replace("\\/", "/")
            pattern = re.sub(r"\(\?P<(\w+)>([\w|]+)\)", r"{\1:\2}", pattern)
        for path in _templates(pattern):
            out[(route.method, path)] = getattr(route.handler, "sc_access", Access.PUBLIC)
    return out


def documented_routes() -> dict[Route, str]:
    doc = openapi_document()
    return {(method.upper(), path): op["x-sparecycles-access"]
            for path, item in doc["paths"].items() for method, op in item.items() if method in METHODS}


def _unnamed(path: str) -> str:
    """The prose may name a parameter for what it holds (`{sha256}`) where the route says `{digest}`."""
    return re.sub(r"\{\w+\}", "{}", path)


def prose_routes() -> dict[Route, str]:
    """(METHOD, path) -> access from the `## Routes` table of docs/http-api.md: `GET /v1/x?q=..`,
    `GET /v1/x[?q=..]` and `.../unblock` (the previous path's parent) forms included."""
    out: dict[Route, str] = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`") or cells[0].startswith("`method"):
            continue
        method, previous = "", ""
        for verb, path in re.findall(r"`(?:([A-Z]+) )?([^`]+)`", cells[0]):
            method = verb or method
            path = re.sub(r"\[.*?\]|\?.*$", "", path)
            if path.startswith(".../"):
                path = previous.rsplit("/", 1)[0] + path[3:]
            previous = path
            out[(method, _unnamed(path))] = cells[1].split()[0]
    return out


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on anything the OpenAPI 3.1 meta-schema refuses


def test_every_registered_route_is_documented_with_its_access_level_and_nothing_else_is() -> None:
    registered = registered_routes()
    documented = documented_routes()
    assert sorted(registered) == sorted(documented), (
        f"only in add_routes: {sorted(set(registered) - set(documented))}; "
        f"only in the OpenAPI document: {sorted(set(documented) - set(registered))}")
    # A route documented "public" that its handler guards (or the reverse) would mislead every
    # client generated from the document.
    assert {r: str(a) for r, a in registered.items()} == documented


def test_docs_http_api_lists_the_same_routes_with_the_same_access() -> None:
    prose = prose_routes()
    documented = {(method, _unnamed(path)): level for (method, path), level in documented_routes().items()}
    assert sorted(prose) == sorted(documented), (
        f"only in docs/http-api.md: {sorted(set(prose) - set(documented))}; "
        f"only in the OpenAPI document: {sorted(set(documented) - set(prose))}")
    assert prose == documented


def test_every_operation_answers_the_error_object_for_its_errors_and_guarded_ones_name_the_scheme() -> None:
    doc = openapi_document()
    scheme = doc["components"]["securitySchemes"]["SparecyclesEd25519"]
    assert scheme == {**scheme, "type": "http", "scheme": "Sparecycles-Ed25519"}
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["type"] == "string"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            codes = {int(c) for c in op["responses"]}
            assert any(200 <= c < 300 for c in codes), (method, path)
            for code in codes - set(range(200, 300)):
                if method == "head":  # a HEAD answer has no body to describe
                    assert "content" not in op["responses"][str(code)]
                    continue
                ref = op["responses"][str(code)]["$ref"]
                body = doc["components"]["responses"][ref.rsplit("/", 1)[1]]
                assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if op["x-sparecycles-access"] == "public":
                assert op["security"] == [], (method, path)
            else:
                assert {"SparecyclesEd25519": []} in op["security"] and {401, 403} <= codes, (method, path)


@pytest.mark.parametrize("path", ["/v1/jobs/{job}", "/v1/blobs/{digest}", "/v1/admin/accounts/{name}/grant"])
def test_path_parameters_are_declared(path: str) -> None:
    item = openapi_document()["paths"][path]
    for op in item.values():
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path))


async def test_the_document_is_served_unsigned_and_equals_the_module_data() -> None:
    async with TestClient(TestServer(_app())) as client:
        response = await client.get(OPENAPI_PATH)
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == openapi_document()
        assert "Authorization" not in response.headers.get("WWW-Authenticate", "")
