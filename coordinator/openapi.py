"""The OpenAPI 3.1 description of the coordinator's HTTP API, as data, served at
`GET /v1/openapi.json` (public).

Built in Python rather than shipped as a JSON file so it installs with the package and shares the
constants it describes (the auth scheme, the job-token header). docs/http-api.md is the prose;
tests/unit/test_openapi.py holds this document, the routes `add_routes` registers and that table
to the same set of (method, path), so none of the three can drift from the others.

Each operation carries `x-sparecycles-access`, the level `@access(...)` gives its handler
(coordinator/http_auth.py); the test checks those agree too.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from aiohttp import web

from ledger.entries import SIGNS
from protocol.httpauth import SCHEME

from .http_auth import JOB_TOKEN_HEADER, Access

OPENAPI_PATH: Final = "/v1/openapi.json"
NPZ: Final = "application/x-npz"
Schema = dict[str, Any]

_SIGNED: Final = "SparecyclesEd25519"
_TOKEN: Final = "JobToken"
_HEX64: Final = "^[0-9a-f]{64}$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *,
         extra: bool = True) -> Schema:
    """An object schema. Answers may grow fields, so they stay open (`extra`); request bodies are
    closed only where the handler ignores nothing it would silently drop."""
    out: Schema = {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required)}
    if not extra:
        out["additionalProperties"] = False
    return out


_STR: Final[Schema] = {"type": "string"}
_INT: Final[Schema] = {"type": "integer"}
_NUM: Final[Schema] = {"type": "number"}
_BOOL: Final[Schema] = {"type": "boolean"}
_BINARY: Final[Schema] = {"type": "string", "format": "binary"}
_NULLABLE_STR: Final[Schema] = {"type": ["string", "null"]}
_NULLABLE_INT: Final[Schema] = {"type": ["integer", "null"]}
_POSITIVE: Final[Schema] = {"type": "integer", "minimum": 1}
_MAP: Final[Schema] = {"type": "object"}

_ERROR_TEXT: Final = {
    400: "malformed request (the error says which field)",
    401: "unsigned, bad signature, stale timestamp or replayed nonce",
    402: "not enough credit",
    403: "signed but not allowed (the error says why)",
    404: "unknown",
    409: "conflict (the error says with what)",
    410: "gone: the job's inputs and outputs were deleted (retention, or its submitter)",
    413: "body too large",
    415: "unsupported content type",
    422: "the job failed",
    429: "rate limit or quota: retry after Retry-After seconds",
    503: "a dependency (the broker, the database) is away; retry after Retry-After seconds",
    507: "the coordinator's storage is full; retry once its operator has freed space",
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): {"$ref": f"#/components/responses/E{code}"} for code in codes}


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _path_param(name: str, description: str, schema: Schema | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1}}


def _query(name: str, description: str, schema: Schema, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_AUTH_ERRORS: Final = (401, 403, 429)


def _op(summary: str, level: Access, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, errors: tuple[int, ...] = ()) -> dict[str, Any]:
    """One operation. The access level decides the security requirement and the auth errors."""
    op: dict[str, Any] = {"summary": summary, "x-sparecycles-access": str(level)}
    if level is Access.PUBLIC:
        op["security"] = []
    elif level is Access.JOB:
        op["security"] = [{_SIGNED: []}, {_TOKEN: []}]
    else:
        op["security"] = [{_SIGNED: []}]
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    codes = set(errors) | (set() if level is Access.PUBLIC else set(_AUTH_ERRORS))
    op["responses"] = {**responses, **_errors(*sorted(codes))}
    return op


_SCHEMAS: Final[dict[str, Schema]] = {
    "Error": _obj({"error": {"type": "string", "description": "what went wrong and what to do"}}),
    "Info": _obj({"coordinator": _STR, "public_key": {"type": "string", "pattern": _HEX64},
                  "topic_prefix": _STR, "max_inline_bytes": _INT, "max_message_bytes": _INT,
                  "protocol": {"const": 1}, "replicas": _POSITIVE}),
    "Health": _obj({"status": {"enum": ["ok", "degraded"]}, "broker_connected": _BOOL, "jobs": _MAP,
                    "nodes_waiting": _INT, "live_leases": _INT, "counters": _MAP}),
    "Credit": _obj({"balance": _INT, "reserved": _INT, "available": _INT}),
    "Account": _obj({"account": _STR, "name": _STR, "public_key": _STR, "created_at": _NUM, "blocked": _BOOL,
                     "operator": _BOOL}),
    "AccountWithCredit": {"allOf": [_ref("Account"), _ref("Credit")]},
    "NodeRecord": _obj({"node": _STR, "owner": _STR, "account": _STR, "expires_at": _NUM, "registered_at": _NUM}),
    "Me": {"allOf": [_ref("AccountWithCredit"),
                     _obj({"open_jobs": _INT, "stored_bytes": _INT,
                           "nodes": {"type": "array", "items": _ref("NodeRecord")}})]},
    "NodeRegistered": {"allOf": [_ref("NodeRecord"), _obj({"mqtt": {
        "oneOf": [{"type": "null"}, _obj({"username": _STR, "password": _STR})],
        "description": "the broker login when the broker is access-controlled"}})]},
    "TensorSpec": _obj({"name": _STR, "dtype": _STR, "shape": {"type": "array"}}),
    "Model": _obj({"model": {"type": "string", "pattern": _HEX64}, "size": _INT,
                   "inputs": {"type": "array", "items": _ref("TensorSpec")},
                   "outputs": {"type": "array", "items": _ref("TensorSpec")}, "flops_per_row": _INT}),
    "JsonTensor": _obj({"dtype": {"type": "string", "examples": ["float32"]},
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "data": {"type": "array", "description": "nested list of the given shape"}}),
    "JobRequest": _obj(
        {"model": {"type": "string", "pattern": _HEX64, "description": "sha256 of an uploaded model"},
         "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _ref("JsonTensor"),
                    "description": "one tensor per ONNX input name; first axis = batch"}},
        {"replicas": _POSITIVE, "task_size": _POSITIVE, "max_results": _POSITIVE,
         "final": {"enum": ["argmax", "exact", "none"]},
         "deadline": {**_POSITIVE, "description": "seconds after submission by which every task must be decided"}}),
    "JobCreated": _obj({"job": _STR, "rows": _INT, "tasks": _INT, "task_size": _INT, "replicas": _INT,
                        "submitter": _STR, "read_token": {"type": "string",
                                                          "description": f"send as {JOB_TOKEN_HEADER}"}}),
    "JobStatus": _obj(
        {"job": _STR, "model": _STR, "state": {"enum": ["running", "done", "failed"]}, "rows": _INT,
         "replicas": _INT, "task_size": _INT,
         "tasks": _obj({"total": _INT, "verified": _INT, "failed": _INT, "open": _INT}),
         "error": _NULLABLE_STR,
         "failures": {"type": "array", "items": _obj({"task": _STR, "reason": _STR})},
         "created_at": _NUM, "finished_at": {"type": ["number", "null"]}},
        {"waiting": {"type": "array", "items": _obj({"task": _STR, "waiting": _STR},
                                                    {"notes": {"type": "array", "items": _STR}})}}),
    "JsonOutputs": {"type": "object", "additionalProperties": _ref("JsonTensor")},
    "JobDeleted": _obj({"job": _STR, "deleted_at": _NUM,
                        "reason": {"type": "string", "examples": ["deleted by its submitter"]}}),
    "BlobStored": _obj({"blob": {"type": "string", "pattern": _HEX64}, "size": _INT}),
    "Unit": _obj({"name": {"const": "credit"}, "means": {"type": "string", "description": "what 1 credit is"}}),
    "Checkpoint": _obj({"origin": {"type": "string", "description": "the coordinator id (GET /v1/info)"},
                        "size": {"type": "integer", "minimum": 0}, "root": {"type": "string", "pattern": _HEX64},
                        "timestamp_ms": _INT, "time": {"type": "string", "description": "ISO 8601, UTC"},
                        "signature": {"type": "string", "pattern": "^[0-9a-f]{128}$"}}),
    "LatestCheckpoint": _obj({"checkpoint": _ref("Checkpoint"), "public_key": {"type": "string", "pattern": _HEX64}}),
    "Checkpoints": _obj({"checkpoints": {"type": "array", "items": _ref("Checkpoint")}}),
    "InclusionProof": _obj({"seq": _POSITIVE, "index": _INT, "size": _INT,
                            "entry": {"type": "string", "description": "the entry's leaf bytes, hex"},
                            "proof": {"type": "array", "items": {"type": "string", "pattern": _HEX64}}}),
    "ConsistencyProof": _obj({"old": _INT, "new": _INT,
                              "proof": {"type": "array", "items": {"type": "string", "pattern": _HEX64}}}),
    "Receipts": _obj({"checkpoint": _ref("Checkpoint"), "receipts": {"type": "array", "items": _obj(
        {"seq": _POSITIVE, "entry": _STR, "index": _INT,
         "proof": {"type": "array", "items": {"type": "string", "pattern": _HEX64}},
         "checkpoint": _ref("Checkpoint")})}}),
    "JobLedger": _obj({"job": _STR, "entries": {"type": "array", "items": _ref("Entry")},
                       "cost": {"type": "integer", "description": "charges less refunds, in credits"},
                       "computed_by": {"type": "array", "items": _obj({"node": _STR, "owner": _STR, "credits": _INT})},
                       "unit": _ref("Unit")}),
    "Balances": _obj({"nodes": {"type": "array", "items": _obj({"node": _STR, "owner": _STR, "credits": _INT,
                                                                 "entries": _INT})},
                      "owners": {"type": "array", "items": _obj({"owner": _STR, "credits": _INT, "entries": _INT})},
                      "total_credits": _INT, "entries": _INT, "unit": _ref("Unit")},
                     {"accounts": {"type": "array", "items": _obj({"account": _STR, "balance": _INT},
                                                                  {"granted": _INT, "earned": _INT, "spent": _INT})},
                      "total_granted": _INT}),
    "Entry": _obj({"kind": {"enum": sorted(SIGNS)}}, {"seq": {**_POSITIVE, "description": "its place in the log"},
                                                     "account": _STR, "amount": _INT, "created_at": _NUM,
                                                     "created_at_iso": {"type": "string",
                                                                        "description": "ISO 8601, UTC, ms"}}),
    "NodeLedger": _obj({"node": _STR, "owner": _STR, "credits": _INT,
                        "entries": {"type": "array", "items": _ref("Entry")}, "unit": _ref("Unit")}),
    "AccountLedger": _obj({"account": _STR, "balance": _INT, "entries": {"type": "array", "items": _ref("Entry")},
                           "unit": _ref("Unit")}),
    "Entries": _obj({"entries": {"type": "array", "items": _ref("Entry")}, "next": _NULLABLE_INT}),
    "Accepted": _obj({"accepted": {"type": "array", "items": _obj(
        {"task": _STR, "job": _STR, "node": _STR, "owner": _STR, "output_digest": _STR, "task_state": _STR},
        {"verdict_seq": {"type": "integer", "description": "the ledger size right after its verdict was recorded"}})},
        "next": _NULLABLE_INT}),
    "Trust": _obj({"node": _STR, "owner": _NULLABLE_STR, "trusted": _BOOL, "blocked": _BOOL, "why": _STR,
                   "audit_rate": _NUM, "record": {"type": ["object", "null"]}, "leases": _INT,
                   "allowed_leases": _INT}),
    "AdminAccounts": _obj({"registration": {"enum": ["open", "invite", "closed"]},
                           "accounts": {"type": "array", "items": {"allOf": [
                               _ref("AccountWithCredit"), _obj({"nodes": _INT, "open_jobs": _INT})]}}}),
    "Granted": {"allOf": [_obj({"account": _STR, "granted": _INT}), _ref("Credit")]},
}

_DIGEST: Final = _path_param("digest", "sha256 hex of the model's bytes", {"type": "string", "pattern": _HEX64})
_BLOB: Final = _path_param("digest", "`protocol.tensors.digest_tensors` of the tensor map",
                           {"type": "string", "pattern": _HEX64})
_LEASE: Final = _query("lease", "a live lease of the signing node", {"type": "string", "minLength": 1},
                       required=True)
_JOB: Final = _path_param("job", "the job id `POST /v1/jobs` answered")
_NAME: Final = _path_param("name", "an account name", {"type": "string", "minLength": 1, "maxLength": 64})
_PAGING: Final = [_query("after", "answer entries after this sequence number",
                         {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
                  _query("limit", "at most this many (1..10000)",
                         {"type": "integer", "minimum": 1, "maximum": 10_000})]
_SIZE: Final[Schema] = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_UPTO: Final = _query("upto", "only entries with seq <= upto (a checkpoint's size): one consistent snapshot", _SIZE)
_PAGE: Final = [_query("after", "after this size", _SIZE),
                _query("limit", "at most this many (1..10000)", {"type": "integer", "minimum": 1, "maximum": 10_000})]


def _admin_block(action: str) -> dict[str, Any]:
    what = "blocked: it submits nothing and its nodes get no work and earn nothing" if action == "block" \
        else "unblocked"
    return {"post": _op(f"mark the account {what}", Access.OPERATOR, {"200": _json(_ref("Account"), "the account")},
                        params=[_NAME], errors=(404,))}


_PATHS: Final[dict[str, dict[str, Any]]] = {
    "/v1/health": {"get": _op("liveness and counters", Access.PUBLIC, {"200": _json(_ref("Health"), "health")})},
    "/v1/info": {"get": _op("the coordinator's identity (its id is the signature audience)", Access.PUBLIC,
                            {"200": _json(_ref("Info"), "identity")})},
    OPENAPI_PATH: {"get": _op("this document", Access.PUBLIC, {"200": _json(_MAP, "OpenAPI 3.1")})},
    "/v1/accounts": {"post": _op(
        "register the signing key as an account", Access.SIGNED,
        {"201": _json(_ref("AccountWithCredit"), "registered"),
         "200": _json(_ref("AccountWithCredit"), "this key already has this name")},
        body=_json_body(_obj({"name": {"type": "string", "minLength": 1, "maxLength": 64}},
                             {"invite": {"type": "string", "minLength": 1, "maxLength": 512}})),
        errors=(400, 409))},
    "/v1/accounts/me": {"get": _op("the signing account, its credit, usage and nodes", Access.ACCOUNT,
                                   {"200": _json(_ref("Me"), "the account")})},
    "/v1/nodes": {"get": _op(
        "nodes online (working, idle) and seen in the last 5 minutes (`online`: false)", Access.PUBLIC,
        {"200": _json(_obj({"nodes": {"type": "array", "items": _obj(
            {"node": _STR, "owner": _STR, "slots": _INT, "leases": _INT,
             "state": {"enum": ["working", "idle", "away", "blocked"]}, "online": _BOOL,
             "speed": {"type": ["number", "null"], "description": "measured results per second"},
             "speed_unit": {"const": "tasks/s"},
             "trust": _obj({"level": {"enum": ["trusted", "untrusted", "blocked"]}, "score": _NUM,
                            "streak": _INT, "audit_rate": _NUM}),
             "last_seen": {"type": ["number", "null"]}, "last_seen_iso": _NULLABLE_STR})}}), "the nodes")}),
                  "post": _op(
        "register the signing node key under the account that certified it", Access.SIGNED,
        {"200": _json(_ref("NodeRegistered"), "registered")},
        body=_json_body(_obj({"certificate": {"type": "string", "minLength": 1, "maxLength": 4096,
                                              "description": "protocol.certs.NodeCertificate.to_text"}})),
        errors=(400, 503))},
    "/v1/models": {"put": _op(
        "upload an ONNX model (checked, then run on one row in a child process)", Access.ACCOUNT,
        {"201": _json(_ref("Model"), "new"), "200": _json(_ref("Model"), "already known")},
        body={"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}},
        errors=(400, 413))},
    "/v1/models/{digest}": {
        "head": _op("is this model known", Access.MEMBER,
                    {"200": {"description": "known"}, "404": {"description": "unknown (no body: a HEAD)"}},
                    params=[_DIGEST]),
        "get": _op("a model's ONNX bytes", Access.MEMBER,
                   {"200": {"description": "the model", "content": {"application/octet-stream": {"schema": _BINARY}}}},
                   params=[_DIGEST], errors=(404,)),
    },
    "/v1/jobs": {"get": _op(
        "jobs, newest first: unsigned, every job's public summary (no model, no failure details); signed by an "
        "account, its own jobs in full; by an operator, every job in full", Access.JOB,
        {"200": _json(_obj({"jobs": {"type": "array", "items": _obj(
            {"job": _STR, "state": {"enum": ["running", "done", "failed"]}, "submitter": _STR,
             "created_at": _NUM, "created_at_iso": _STR, "finished_at": {"type": ["number", "null"]},
             "tasks": _obj({"total": _INT, "verified": _INT, "failed": _INT, "open": _INT}), "rows": _INT,
             "model": _NULLABLE_STR, "why": _NULLABLE_STR, "eta_seconds": {"type": ["number", "null"]}})}}),
            "the jobs")},
        params=[_query("state", "which jobs (default all)", {"enum": ["running", "done", "failed", "all"]}),
                _query("limit", "at most this many (default 50)", {"type": "integer", "minimum": 1,
                                                                    "maximum": 500})],
        errors=(400,)),
                 "post": _op(
        "submit a job: JSON, or NPZ bytes with the options in the query", Access.ACCOUNT,
        {"202": _json(_ref("JobCreated"), "accepted; poll GET /v1/jobs/{job}")},
        params=[_query("model", "NPZ bodies: the model's sha256", {"type": "string", "pattern": _HEX64}),
                _query("replicas", "NPZ bodies", _POSITIVE), _query("task_size", "NPZ bodies", _POSITIVE),
                _query("max_results", "NPZ bodies", _POSITIVE),
                _query("final", "NPZ bodies", {"enum": ["argmax", "exact", "none"]}),
                _query("deadline", "NPZ bodies: seconds", _POSITIVE)],
        body={"required": True, "content": {"application/json": {"schema": _ref("JobRequest")},
                                            NPZ: {"schema": _BINARY}}},
        errors=(400, 402, 404, 413, 415, 429, 503, 507))},
    "/v1/jobs/{job}": {
        "get": _op("a job's status; `wait` long-polls for it to finish", Access.JOB,
                   {"200": _json(_ref("JobStatus"), "status")},
                   params=[_JOB, _query("wait", "seconds to wait (at most 60)", {"type": "number", "minimum": 0,
                                                                                  "maximum": 60})],
                   errors=(400, 404, 410)),
        "delete": _op("delete a finished job's inputs and outputs now (its submitter only; as retention would)",
                      Access.ACCOUNT, {"200": _json(_ref("JobDeleted"), "deleted (or deleted before)")},
                      params=[_JOB], errors=(404, 409)),
    },
    "/v1/jobs/{job}/outputs": {"get": _op(
        "a finished job's outputs: NPZ, or JSON with Accept: application/json", Access.JOB,
        {"200": {"description": "one array per ONNX output name, rows in input order",
                 "content": {NPZ: {"schema": _BINARY}, "application/json": {"schema": _ref("JsonOutputs")}}}},
        params=[_JOB], errors=(404, 409, 410, 422))},
    "/v1/blobs/{digest}": {
        "get": _op("a task's inputs, for the node holding its lease", Access.NODE,
                   {"200": {"description": "msgpack tensor map (protocol.tensors.tensors_to_wire)",
                            "content": {"application/msgpack": {"schema": _BINARY}}}},
                   params=[_BLOB, _LEASE], errors=(404,)),
        "put": _op("a node's outputs too large to go inline: the lease's task's outputs, once per lease",
                   Access.NODE,
                   {"201": _json(_ref("BlobStored"), "stored"),
                    "200": _json(_ref("BlobStored"), "the same upload was stored under this lease before")},
                   params=[_BLOB, _LEASE],
                   body={"required": True, "content": {"application/msgpack": {"schema": _BINARY}}},
                   errors=(400, 409, 413)),
    },
    "/v1/ledger/balances": {"get": _op("every contributor's and account's credits", Access.PUBLIC,
                                       {"200": _json(_ref("Balances"), "balances")}, params=[_UPTO],
                                       errors=(400,))},
    "/v1/ledger/nodes/{node}": {"get": _op(
        "a node's credit entries", Access.PUBLIC, {"200": _json(_ref("NodeLedger"), "entries")},
        params=[_path_param("node", "a node id")], errors=(404,))},
    "/v1/ledger/accounts/{name}": {"get": _op(
        "an account's entries and balance (0 when it has none)", Access.PUBLIC,
        {"200": _json(_ref("AccountLedger"), "entries")}, params=[_NAME])},
    "/v1/ledger/entries": {"get": _op("the ledger, in order", Access.PUBLIC,
                                      {"200": _json(_ref("Entries"), "a page")}, params=[*_PAGING, _UPTO],
                                      errors=(400,))},
    "/v1/ledger/accepted": {"get": _op("accepted (task, node) pairs, for `ledger verify`", Access.PUBLIC,
                                       {"200": _json(_ref("Accepted"), "a page")}, params=[*_PAGING, _UPTO],
                                       errors=(400,))},
    "/v1/ledger/jobs/{job}": {"get": _op(
        "what a job cost and who computed it", Access.PUBLIC, {"200": _json(_ref("JobLedger"), "the job's entries")},
        params=[_JOB], errors=(404,))},
    "/v1/ledger/checkpoint": {"get": _op(
        "the newest signed checkpoint and the key that signed it", Access.PUBLIC,
        {"200": _json(_ref("LatestCheckpoint"), "the checkpoint")}, errors=(404,))},
    "/v1/ledger/checkpoints": {"get": _op(
        "signed checkpoints, ascending size", Access.PUBLIC, {"200": _json(_ref("Checkpoints"), "a page")},
        params=_PAGE, errors=(400,))},
    "/v1/ledger/proof/inclusion": {"get": _op(
        "proof that entry seq is in the tree of size entries (default: the newest checkpoint's)", Access.PUBLIC,
        {"200": _json(_ref("InclusionProof"), "the entry and its audit path")},
        params=[_query("seq", "the entry", {"type": "integer", "minimum": 1}, required=True),
                _query("size", "the tree size (seq <= size <= the tree's)", _SIZE)],
        errors=(400, 404, 409))},
    "/v1/ledger/proof/consistency": {"get": _op(
        "proof that the tree of old entries is a prefix of the tree of new (default: the newest checkpoint's)",
        Access.PUBLIC, {"200": _json(_ref("ConsistencyProof"), "the proof")},
        params=[_query("old", "the older size", _SIZE, required=True), _query("new", "the newer size", _SIZE)],
        errors=(400, 404))},
    "/v1/ledger/receipts/{node}": {"get": _op(
        "receipts for a node's credits and clawbacks up to the newest checkpoint", Access.PUBLIC,
        {"200": _json(_ref("Receipts"), "a page, ascending seq")},
        params=[_path_param("node", "a node id"), *_PAGE], errors=(400, 404, 409))},
    "/v1/nodes/{node}/trust": {"get": _op(
        "why a node is or is not trusted", Access.PUBLIC, {"200": _json(_ref("Trust"), "trust")},
        params=[_path_param("node", "a node id")])},
    "/v1/admin/accounts": {
        "get": _op("every account", Access.OPERATOR, {"200": _json(_ref("AdminAccounts"), "accounts")}),
        "post": _op("add an account (any registration policy)", Access.OPERATOR,
                    {"201": _json(_ref("Account"), "added")},
                    body=_json_body(_obj({"name": {"type": "string", "minLength": 1, "maxLength": 64},
                                          "public_key": {"type": "string", "pattern": _HEX64}},
                                         {"operator": _BOOL})),
                    errors=(400, 409)),
    },
    "/v1/admin/accounts/{name}/block": _admin_block("block"),
    "/v1/admin/accounts/{name}/unblock": _admin_block("unblock"),
    "/v1/admin/accounts/{name}/grant": {"post": _op(
        "grant credit (a ledger entry)", Access.OPERATOR, {"200": _json(_ref("Granted"), "granted")},
        params=[_NAME], body=_json_body(_obj({"amount": _POSITIVE}, {"memo": {"type": "string", "minLength": 1,
                                                                              "maxLength": 200}})),
        errors=(400, 404))},
    "/v1/admin/invites": {"post": _op("a one-time registration token", Access.OPERATOR,
                                      {"201": _json(_obj({"invite": _STR}), "the token")})},
    "/v1/jobs/{job}/cancel": {"post": _op(
        "cancel a running job (its submitter or an operator): open tasks fail, the job ends failed, the unspent "
        "reservation is released", Access.ACCOUNT,
        {"200": _json(_obj({"job": _STR, "cancelled_tasks": _INT, "state": _STR}), "cancelled")},
        params=[_JOB], errors=(404, 409))},
    "/v1/jobs/{job}/events": {"get": {**_op(
        "server-sent events: `progress` (the job's JSON, as GET /v1/jobs/{job}) when its counts change, then "
        "`done` or `failed` and the end; a comment every 15 s", Access.JOB,
        {"200": {"description": "an event stream", "content": {"text/event-stream": {"schema": _STR}}}},
        params=[_JOB], errors=(404, 410, 503)), "x-sparecycles-stream": True}},
    "/v1/events": {"get": {**_op(
        "server-sent events for the dashboard: a `snapshot` every second (jobs, nodes, throughput, ledger, "
        "blocked accounts, unit)", Access.PUBLIC,
        {"200": {"description": "an event stream", "content": {"text/event-stream": {"schema": _STR}}}},
        errors=(503,)), "x-sparecycles-stream": True}},
    "/": {"get": _op("the live dashboard's page (reads GET /v1/events; docs/dashboard.md); 304 on If-None-Match",
                     Access.PUBLIC, {"200": {"description": "the page",
                                             "content": {"text/html": {"schema": _STR}}}})},
    "/dashboard/{file}": {"get": _op(
        "one of the dashboard's files: its script, styles or icon (with ?v=<digest>, cached for a year); "
        "304 on If-None-Match",
        Access.PUBLIC,
        {"200": {"description": "the file", "content": {"text/javascript": {"schema": _STR},
                                                          "text/css": {"schema": _STR},
                                                          "image/svg+xml": {"schema": _STR}}}},
        params=[_path_param("file", "a file name", {"type": "string", "enum": ["dashboard.js", "dashboard.css",
                                                                               "icon.svg"]}),
                _query("v", "the file's digest, as the page links it", _STR)],
        errors=(404,))},
    "/metrics": {"get": _op(
        "Prometheus metrics in its text format: jobs and tasks by state, results by verdict, refused messages by "
        "reason, nodes online, queue depths, broker connection, task latency and HTTP duration histograms "
        "(docs/operations.md)", Access.PUBLIC,
        {"200": {"description": "text exposition format 0.0.4", "content": {"text/plain": {"schema": _STR}}}})},
}

_DOCUMENT: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "sparecycles coordinator", "version": "1",
             "description": "Verified ONNX inference on volunteer nodes. Prose: docs/http-api.md."},
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "responses": {f"E{code}": _json(_ref("Error"), text) for code, text in _ERROR_TEXT.items()},
        "securitySchemes": {
            _SIGNED: {"type": "http", "scheme": SCHEME, "description": (
                f"Authorization: {SCHEME} key=<64 hex>,ts=<unix ms>,nonce=<32 hex>,sig=<128 hex>; the "
                "Ed25519 signature (protocol/httpauth.py) over the NUL-separated coordinator id (GET /v1/info), "
                "METHOD, path and query exactly as sent, ts, nonce and sha256 hex of the body.")},
            _TOKEN: {"type": "apiKey", "in": "header", "name": JOB_TOKEN_HEADER,
                     "description": "a job's read token (POST /v1/jobs answers it)"},
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change theirs)."""
    return copy.deepcopy(_DOCUMENT)


async def serve_openapi(request: web.Request) -> web.Response:
    """`GET /v1/openapi.json`: public, like /v1/info."""
    return web.json_response(_DOCUMENT)
