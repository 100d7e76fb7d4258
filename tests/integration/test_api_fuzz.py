"""Fuzz the coordinator's HTTP API from the OpenAPI document it serves (schemathesis generates the
requests): unsigned, signed by a registered account, and signed by an operator. Not one answer may
be a 5xx, every answer must be one the document describes (status, content type, schema), and the
coordinator must still be up and healthy afterwards.

schemathesis' own runner cannot sign: the signature covers the path and query exactly as they go
on the wire and the body's digest, which only exist once the request is prepared. So each
generated case is turned into a `requests` request here, prepared, signed over the prepared
target and body, and sent.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, SerializationContext
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.openapi import OPENAPI_PATH
from protocol.httpauth import sign_request
from protocol.signing import Identity

from .network import Network

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 30
BUDGET_SECONDS = 40.0  # generation stops early past this; keeps the test near a minute on 2 cores
TIMEOUT = 30.0


@schemathesis.serializer("application/x-npz", "application/msgpack")
def _raw_bytes(ctx: SerializationContext, value: Any) -> bytes:
    """Binary bodies (NPZ, msgpack) go as generated: the server must refuse garbage with a 4xx."""
    return value if isinstance(value, bytes) else str(value).encode()


CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]


class Signer:
    def __init__(self, base: str, session: requests.Session) -> None:
        self.base = base
        self.session = session
        self.audience = str(session.get(f"{base}/v1/info", timeout=TIMEOUT).json()["coordinator"])

    def send(self, kwargs: dict[str, Any], identity: Identity | None) -> requests.Response:
        kwargs = dict(kwargs)
        kwargs.pop("cookies", None)
        prepared = self.session.prepare_request(requests.Request(**kwargs))
        if identity is not None:
            body = prepared.body or b""
            assert isinstance(body, (bytes, str)), "requests prepares every body this test sends in memory"
            prepared.headers["Authorization"] = sign_request(
                identity, method=prepared.method or "GET", path_qs=prepared.path_url,
                body=body.encode() if isinstance(body, str) else body, audience=self.audience, now=time.time())
        return self.session.send(prepared, timeout=TIMEOUT, allow_redirects=False)


def _register(signer: Signer, identity: Identity, name: str) -> None:
    answer = signer.send({"method": "POST", "url": f"{signer.base}/v1/accounts", "json": {"name": name}}, identity)
    assert answer.status_code in (200, 201), answer.text


def test_fuzzing_the_api_from_its_openapi_document_gets_no_5xx_signed_or_not(network: Network) -> None:
    """Attack: any request a client can send, well-formed per the document or not, by a stranger,
    an account or an operator; a 5xx means an unhandled exception a hostile client can trigger
    at will (and, unbounded, a way to take the coordinator down)."""
    base = network.url
    session = requests.Session()
    served = session.get(f"{base}{OPENAPI_PATH}", timeout=TIMEOUT)
    assert served.status_code == 200
    schema = schemathesis.openapi.from_dict(served.json())
    signer = Signer(base, session)
    account = Identity.generate()
    _register(signer, account, "fuzzer")
    operator = Identity.load_or_create(Path(f"{network.db}.key"))  # the coordinator's own key
    signers: dict[str, Identity | None] = {"unsigned": None, "account": account, "operator": operator}

    statuses: Counter[tuple[str, int]] = Counter()
    server_errors: list[str] = []
    nonconforming: list[str] = []
    operations = 0
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err raises here: the document is invalid
        if operation.definition.raw.get("x-sparecycles-stream"):
            continue  # an event stream never ends: tests/integration/test_events.py covers them
        operations += 1
        cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                          operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=cases, who=st.sampled_from(sorted(signers)))
        def fuzz(case: Any, who: str) -> None:
            if time.monotonic() - started > BUDGET_SECONDS:
                return
            response = signer.send(case.as_transport_kwargs(base_url=base), signers[who])
            statuses[(who, response.status_code)] += 1
            target = f"{case.method} {response.request.path_url}"
            if response.status_code >= 500:
                server_errors.append(f"{who} {target} -> {response.status_code} {response.text[:200]}")
                return
            try:  # every answer is one the document describes: its status, content type and schema
                case.validate_response(response, checks=CONFORMANCE)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a group of failures
                nonconforming.append(f"{who} {target} -> {response.status_code}: {str(exc)[:300]}")

        fuzz()

    assert operations >= 25  # every route of the document was fuzzed
    assert not server_errors, "\n".join(server_errors)
    assert not nonconforming, "\n".join(nonconforming[:20])
    coordinator = network.coordinator
    assert coordinator is not None and coordinator.popen.poll() is None, "the coordinator died"
    health = session.get(f"{base}/v1/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] in ("ok", "degraded")
    # The harness really signed: a signature over anything but the exact target and body is a 401,
    # so no signed request may get one, and both signers must have reached handlers that said yes.
    assert not [k for k in statuses if k[0] != "unsigned" and k[1] == 401], statuses
    assert all(any(w == who and 200 <= code < 300 for w, code in statuses) for who in ("account", "operator")), \
        statuses
    assert sum(n for (w, code), n in statuses.items() if w == "unsigned" and code == 401) > 0, statuses


def test_ledger_paging_past_int64_is_a_4xx_not_a_5xx(network: Network) -> None:
    """Attack: a public, unsigned request that raised inside the coordinator at will (found by the
    fuzz): an `after` beyond the ledger's 64-bit sequence numbers is clamped, and the page is empty."""
    for path in ("/v1/ledger/entries", "/v1/ledger/accepted"):
        answer = requests.get(f"{network.url}{path}", params={"after": str(2**63)}, timeout=TIMEOUT)
        assert answer.status_code < 500, (path, answer.status_code, answer.text)
