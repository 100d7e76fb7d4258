"""Storage with limits and retention, through HTTP against a real coordinator process (and real
nodes, the real Mosquitto): blob uploads bounded by what a lease expects, the submitter's DELETE,
and expiry after --retention, with the ledger still checkable afterwards."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from yarl import URL

from ledger.verify import find_discrepancies
from protocol.httpauth import sign_request
from protocol.messages import Assignment
from protocol.signing import Identity
from protocol.tensors import digest_tensors, encode_tensor_map, tensors_from_arrays
from sparecycles import Client
from sparecycles.cli.processes import ProcessGroup

from .network import Network, submitter
from .test_access import BROKER, MODEL, Api, Puppet, api_for, certificate, until
from .test_end_to_end import local_run

pytestmark = pytest.mark.integration

X = np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[ProcessGroup]:
    with ProcessGroup(tmp_path / "logs") as g:
        yield g


def network_with(group: ProcessGroup, tmp_path: Path, url: str, *args: str) -> Network:
    net = Network(group=group, tmp=tmp_path, broker_url=url)
    net.start_coordinator(*args)
    return net


async def put(api: Api, node: Identity, digest: str, lease: str, body: bytes) -> tuple[int, Any]:
    status, answer, _ = await api("PUT", f"/v1/blobs/{digest}", node, data=body, params={"lease": lease},
                                  headers={"Content-Type": "application/msgpack"})
    return status, answer


async def put_chunked(api: Api, node: Identity, digest: str, lease: str, body: bytes) -> tuple[int, Any]:
    """The same, with no Content-Length: the body arrives in chunks, as a stream would."""
    url = URL(f"{api.url}/v1/blobs/{digest}").with_query(lease=lease)
    auth = sign_request(node, method="PUT", path_qs=url.raw_path_qs, body=body, audience=api.audience,
                        now=time.time())

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 4096):
            yield body[i:i + 4096]

    async with api.session.put(url, data=chunks(), headers={"Authorization": auth}) as r:
        assert "Content-Length" not in r.request_info.headers
        return r.status, await r.json(content_type=None)


def outputs_of(a: Assignment, scale: float = 1.0) -> tuple[str, bytes, dict[str, np.ndarray]]:
    assert a.inputs is not None
    arrays = {n: v * scale for n, v in local_run(MODEL, {n: t.to_array() for n, t in a.inputs.items()}).items()}
    tensors = tensors_from_arrays(arrays)
    return digest_tensors(tensors), encode_tensor_map(tensors), arrays


def test_blob_uploads_take_only_what_the_lease_expects(mosquitto_url: str, group: ProcessGroup,
                                                       tmp_path: Path) -> None:
    """Attack: a node holding a live lease uploads (a) a body far larger than its task's outputs,
    declared or (b) streamed without a Content-Length; (c) a tensor map of other names, (d) of
    other rows, (e) a second, different upload under the same lease; (f) anything without a live
    lease. Refused with 413 before the body is read (a, f), 413 at the limit (b), 400 (c, d),
    409 (e), one line each and never a 5xx; the honest upload is stored, and stored once."""
    net = network_with(group, tmp_path, mosquitto_url)

    async def scenario() -> None:
        async with api_for(net.url) as api, aiomqtt.Client(*BROKER) as conn:
            alice = Identity.generate()
            assert (await api.register(alice, "alice"))[0] == 201
            v = Puppet(conn, api)
            assert (await api.certify(v.identity, certificate(alice, v.identity)))[0] == 200
            await v.listen()
            await v.ask(2, owner="alice")
            await until(lambda: _waiting(api), "the node to wait for work")
            async with submitter(net.url) as c:
                await c.submit(await c.ensure_model(MODEL), {"x": X}, task_size=4)
            a, _ = await v.receive(2)
            digest, body, arrays = outputs_of(a)
            limit = len(body) + 400  # 4 rows x 4 float32 and a few hundred bytes of headers at most

            status, answer = await put(api, v.identity, digest, a.lease, body + bytes(2000))
            assert status == 413 and "take at most" in answer["error"], answer  # (a)
            assert int(answer["error"].split("at most ")[1].split()[0]) <= limit
            status, answer = await put_chunked(api, v.identity, digest, a.lease, bytes(1 << 20))
            assert status == 413 and "refused past" in answer["error"], answer  # (b)
            junk = encode_tensor_map(tensors_from_arrays({"junk": np.zeros(4, np.uint8)}))
            status, answer = await put(api, v.identity, digest_tensors(tensors_from_arrays(
                {"junk": np.zeros(4, np.uint8)})), a.lease, junk)
            assert status == 400 and "not the model's numeric outputs ['probs']" in answer["error"], answer  # (c)
            fewer = tensors_from_arrays({"probs": arrays["probs"][:2]})
            status, answer = await put(api, v.identity, digest_tensors(fewer), a.lease, encode_tensor_map(fewer))
            assert status == 400 and "has 2 rows; the lease's task has 4" in answer["error"], answer  # (d)

            assert (await put(api, v.identity, digest, a.lease, body))[0] == 201  # the honest upload
            assert (await put(api, v.identity, digest, a.lease, body))[0] == 200  # retried: the same, stored once
            other, other_body, _ = outputs_of(a, scale=0.5)
            status, answer = await put(api, v.identity, other, a.lease, other_body)
            assert status == 409 and "one per lease" in answer["error"], answer  # (e)
            status, answer = await put(api, v.identity, digest, "no-such-lease", body)
            assert status == 413 and "live lease" in answer["error"], answer  # (f)

            counters = await api.counters()
            assert counters.get("http_body_over_limit") == 3 and counters.get("refused_upload") == 3
            assert (await api.health())["status"] == "ok"
        with sqlite3.connect(f"file:{net.db}?mode=ro", uri=True) as db:
            assert db.execute("SELECT count(*) FROM uploads").fetchone()[0] == 1
            assert db.execute("SELECT count(*) FROM blobs WHERE digest=?", (other,)).fetchone()[0] == 0

    asyncio.run(scenario())


async def _waiting(api: Api) -> bool:
    return int((await api.health())["nodes_waiting"]) >= 1


async def finished_job(c: Client, x: np.ndarray) -> dict[str, Any]:
    job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=4)
    assert (await c.wait(job["job"], timeout=60))["state"] == "done"
    return job


def test_the_submitter_deletes_a_finished_job_and_nobody_else_can(mosquitto_url: str, group: ProcessGroup,
                                                                 tmp_path: Path) -> None:
    """Attack: (a) another account deletes someone's job; (b) a holder of the read token (meant for
    reading) deletes it; (c) a submitter deletes a job whose inputs and outputs are shared (same
    blobs) with another account's job, to make that job's outputs unreadable. Refused: 404 to the
    other account (as for a job that does not exist), 401 to the token, and the other job's outputs
    stay readable. The submitter's own delete frees the job's inputs and outputs at once: its
    outputs then answer 410, and its bytes no longer count toward the quota."""
    net = network_with(group, tmp_path, mosquitto_url)

    async def scenario() -> None:
        mallory_key = Identity.generate()
        async with api_for(net.url) as api, submitter(net.url) as me, \
                submitter(net.url, mallory_key, "mallory") as mallory:
            running = await me.submit(await me.ensure_model(MODEL), {"x": X}, task_size=4)
            status, answer, _ = await api("DELETE", f"/v1/jobs/{running['job']}", me.identity)
            assert status == 409 and "cancel it first" in answer["error"], answer
            await asyncio.to_thread(net.start_node, "alice")
            await asyncio.to_thread(net.start_node, "bob")
            assert (await me.wait(running["job"], timeout=60))["state"] == "done"
            mine = await finished_job(me, X)
            theirs = await finished_job(mallory, X)  # the same rows: the same input and output blobs
            expected = await mallory.outputs(theirs["job"])
            stored_before = (await me.me())["stored_bytes"]

            path = f"/v1/jobs/{mine['job']}"
            status, answer, _ = await api("DELETE", path, mallory_key)
            assert status == 404 and answer == {"error": "unknown job"}  # (a), as for no such job
            assert (await api("DELETE", "/v1/jobs/no-such-job", mallory_key))[:2] == (404, {"error": "unknown job"})
            status, _, _ = await api("DELETE", path, None, headers={"X-Sparecycles-Job-Token": mine["read_token"]})
            assert status == 401  # (b)
            assert (await me.outputs(mine["job"]))["probs"].shape == (8, 4)  # nothing was deleted

            status, answer, _ = await api("DELETE", path, me.identity)
            assert status == 200 and answer["reason"] == "deleted by its submitter", answer
            assert (await api("DELETE", path, me.identity))[0] == 200  # again: it is gone already
            for reader in ({"identity": me.identity}, {"headers": {"X-Sparecycles-Job-Token": mine["read_token"]}}):
                status, answer, _ = await api("GET", f"{path}/outputs", **reader)
                assert status == 410 and "deleted by its submitter" in answer["error"], answer
                assert (await api("GET", path, **reader))[0] == 410
            assert (await api("GET", f"{path}/outputs", mallory_key))[0] == 403  # still not theirs to read
            # (c) the other account's job, sharing every blob, still reads the same outputs
            got = await mallory.outputs(theirs["job"])
            np.testing.assert_array_equal(got["probs"], expected["probs"])
            assert (await me.me())["stored_bytes"] < stored_before
            assert find_discrepancies(await me.entries(), await me.accepted(), await me.balances()) == []

    asyncio.run(scenario())


def test_finished_jobs_expire_after_the_retention_and_stay_expired_after_a_restart(
        mosquitto_url: str, group: ProcessGroup, tmp_path: Path) -> None:
    """A finished job's inputs, outputs and leases go --retention seconds after it finished: its
    outputs answer 410 with the retention, its blobs and leases leave the database, its rows and
    the ledger stay (verify still passes), and a restarted coordinator neither loads nor revives it."""
    args = ("--retention", "3", "--retention-sweep-seconds", "0.2")
    net = network_with(group, tmp_path, mosquitto_url, *args)
    net.start_node("alice")
    net.start_node("bob")

    async def scenario() -> str:
        async with submitter(net.url) as c:
            job = await finished_job(c, X)
            path = f"/v1/jobs/{job['job']}"
            assert (await c.outputs(job["job"]))["probs"].shape == (8, 4)  # within the retention
            async with api_for(net.url) as api:
                async def gone() -> bool:
                    assert c.identity is not None
                    return await api.fetch_status(c.identity, f"{path}/outputs") == 410

                await until(gone, "the job to expire", within=20)
                status, answer, _ = await api("GET", f"{path}/outputs", c.identity)
                assert status == 410
                assert answer["error"] == (f"outputs of job {job['job']} expired after the retention of 3 s: "
                                           "its inputs and outputs are deleted")
                assert (await api.health())["jobs"] == {}
                assert (await api.counters())["jobs_expired"] == 1
            entries = await c.entries()
            assert len(await c.accepted()) == 4  # 2 tasks x 2 owners: still on record
            assert find_discrepancies(entries, await c.accepted(), await c.balances()) == []
            return str(job["job"])

    job_id = asyncio.run(scenario())
    with sqlite3.connect(f"file:{net.db}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM blobs").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM tasks WHERE job=?", (job_id,)).fetchone()[0] == 2
        assert db.execute("SELECT expiry FROM jobs WHERE id=?", (job_id,)).fetchone()[0] == \
            "expired after the retention of 3 s"

    assert net.coordinator is not None
    net.coordinator.terminate()
    net.start_coordinator(*args)

    async def after_restart() -> None:
        async with api_for(net.url) as api, submitter(net.url) as c:
            assert (await api.health())["jobs"] == {}  # not loaded back into memory
            assert (await api("GET", f"/v1/jobs/{job_id}/outputs", c.identity))[0] == 410

    asyncio.run(after_restart())
