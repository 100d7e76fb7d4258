"""Attacks on accounts and access rules, each against a real coordinator process (issue 7).

Every test names its attacks ("Attack: ...") and shows each one refused with a reason, counted in
/v1/health's `counters`, and changing no state: not the ledger, the jobs, the accounts, nor the
leases. Where a node's messages must be chosen one by one (claiming another owner, holding leases
while its presence is forged, replaying into another namespace), a `Puppet` stands in for the node
process: a real key, certified over HTTP, sealing real envelopes on the real broker, and running
its tasks with ONNX Runtime like an honest node when the test lets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import msgpack
import numpy as np
import pytest
from yarl import URL

from protocol import PROTOCOL_VERSION
from protocol.certs import KIND as CERT_KIND
from protocol.certs import NodeCertificate, issue_certificate
from protocol.codec import open_envelope, seal
from protocol.digests import sha256_hex
from protocol.httpauth import sign_request
from protocol.messages import Assignment, Assignments, Message, Result, Results, Status, WorkRequest
from protocol.signing import Identity
from protocol.tensors import digest_tensors, tensors_from_arrays
from protocol.topics import Topics
from sparecycles.cli.processes import ManagedProcess, free_port
from tests import models

from . import signed
from .network import SUBMITTER, Network, submitter
from .test_end_to_end import cli, local_run

pytestmark = pytest.mark.integration

Answer = tuple[int, Any, dict[str, str]]
BROKER = ("127.0.0.1", 1883)  # the shared Mosquitto of the `network` fixture
MODEL = models.classifier()  # 8 features -> 4 classes: tasks take microseconds, inputs travel inline


# ---- helpers -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Api:
    """Raw requests to one coordinator, signed by whichever key the test names."""

    session: aiohttp.ClientSession
    url: str
    audience: str
    prefix: str
    coordinator_key: bytes

    async def __call__(self, method: str, path: str, identity: Identity | None = None, **kw: Any) -> Answer:
        return await signed.call(self.session, self.url, method, path, identity=identity, audience=self.audience,
                                 **kw)

    async def health(self) -> dict[str, Any]:
        status, body, _ = await self("GET", "/v1/health")
        assert status == 200, body
        return dict(body)

    async def counters(self) -> dict[str, int]:
        return dict((await self.health())["counters"])

    async def fetch_status(self, identity: Identity, path: str, **query: str) -> int:
        """The status of a signed GET whose answer is not text (a blob)."""
        url = URL(f"{self.url}{path}").with_query(query)
        header = sign_request(identity, method="GET", path_qs=url.raw_path_qs, body=b"", audience=self.audience,
                              now=time.time())
        async with self.session.get(url, headers={"Authorization": header}) as r:
            await r.read()
            return r.status

    async def register(self, identity: Identity, name: str, invite: str | None = None) -> Answer:
        return await self("POST", "/v1/accounts", identity, json={"name": name, "invite": invite})

    async def certify(self, node: Identity, certificate: NodeCertificate) -> Answer:
        """POST /v1/nodes signed by the node key, presenting `certificate`."""
        return await self("POST", "/v1/nodes", node, json={"certificate": certificate.to_text()})

    async def me(self, identity: Identity) -> dict[str, Any]:
        status, body, _ = await self("GET", "/v1/accounts/me", identity)
        assert status == 200, body
        return dict(body)

    async def account_names(self, operator: Identity) -> list[str]:
        status, body, _ = await self("GET", "/v1/admin/accounts", operator)
        assert status == 200, body
        return [a["name"] for a in body["accounts"]]

    async def balances(self) -> dict[str, Any]:
        status, body, _ = await self("GET", "/v1/ledger/balances")
        assert status == 200, body
        return dict(body)

    async def upload(self, identity: Identity, model: bytes = MODEL) -> str:
        status, body, _ = await self("PUT", "/v1/models", identity, data=model)
        assert status in (200, 201), body
        return str(body["model"])

    async def submit(self, identity: Identity, digest: str, x: np.ndarray, **options: Any) -> Answer:
        inputs = {"x": {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.tolist()}}
        return await self("POST", "/v1/jobs", identity, json={"model": digest, "inputs": inputs, **options})


@contextlib.asynccontextmanager
async def api_for(url: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/info") as r:
        info = await r.json()
        yield Api(session, url, info["coordinator"], info["topic_prefix"], bytes.fromhex(info["public_key"]))


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def counted(api: Api, **expected: int) -> dict[str, int]:
    """Wait until each named counter reaches its expected value (messages on the broker arrive
    asynchronously); then it must be exactly that, not more."""

    async def reached() -> bool:
        now = await api.counters()
        return all(now.get(name, 0) >= want for name, want in expected.items())

    await until(reached, f"counters {expected}", within=15.0)
    now = await api.counters()
    assert {name: now.get(name, 0) for name in expected} == expected, now
    return now


def operator_key(net: Network) -> Identity:
    """The coordinator's own key, beside its database: an operator's key."""
    path = Path(f"{net.db}.key")
    assert path.exists()
    return Identity.load_or_create(path)


def certificate(owner: Identity, node: Identity, **kw: Any) -> NodeCertificate:
    return issue_certificate(owner, node.public_key, now=kw.pop("now", time.time()), **kw)


def forged_certificate(node: Identity, *, claimed_owner: Identity, signer: Identity) -> NodeCertificate:
    """A certificate naming `claimed_owner` as the node's owner, signed by someone else."""
    shape = certificate(signer, node)
    claimed = dataclasses.replace(shape, owner_public_key=claimed_owner.public_key)
    return dataclasses.replace(claimed, signature=signer.sign(CERT_KIND, claimed.signed_part()))


def run_outputs(a: Assignment, model: bytes = MODEL) -> Result:
    """What an honest node reports for `a`: the model run on the assignment's inline inputs."""
    assert a.inputs is not None
    outputs = tensors_from_arrays(local_run(model, {n: t.to_array() for n, t in a.inputs.items()}))
    return Result(task=a.task, job=a.job, lease=a.lease, input_digest=a.input_digest,
                  output_digest=digest_tensors(outputs), outputs=outputs, elapsed=0.001)


def opened_assignments(message: aiomqtt.Message, prefix: str, coordinator_key: bytes) -> Assignments:
    assert isinstance(message.payload, bytes | bytearray)
    opened = open_envelope(bytes(message.payload), namespace=prefix, expect_kind="assign")
    assert opened.public_key == coordinator_key and isinstance(opened.message, Assignments)
    return opened.message


class Puppet:
    """A node the test drives message by message on its own broker connection."""

    def __init__(self, client: aiomqtt.Client, api: Api, identity: Identity | None = None) -> None:
        self.identity = identity or Identity.generate()
        self.id = self.identity.id
        self.client = client
        self.api = api
        self.topics = Topics(api.prefix)
        self.seq = time.time_ns() // 1_000_000
        self.held: list[Assignment] = []

    def seal(self, message: Message, namespace: str | None = None) -> bytes:
        return seal(message, self.identity, namespace=namespace or self.topics.prefix)

    async def listen(self) -> None:
        await self.client.subscribe(self.topics.assign(self.id), qos=1)

    async def status(self, state: str, since: int) -> bytes:
        payload = self.seal(Status(node=self.id, state=state, since=since))
        await self.client.publish(self.topics.status(self.id), payload, qos=1)
        return payload

    def request(self, slots: int, owner: str) -> WorkRequest:
        self.seq += 1
        return WorkRequest(node=self.id, owner=owner, slots=slots, seq=self.seq,
                           held=tuple(a.lease for a in self.held))

    async def ask(self, slots: int, *, owner: str) -> None:
        await self.client.publish(self.topics.work(self.id), self.seal(self.request(slots, owner)), qos=1)

    async def receive(self, count: int, within: float = 30.0) -> list[Assignment]:
        """Wait until `count` assignments are held."""
        async with asyncio.timeout(within):
            while len(self.held) < count:
                message = opened_assignments(await anext(self.client.messages), self.topics.prefix,
                                             self.api.coordinator_key)
                assert message.node == self.id
                self.held.extend(message.items)
        return list(self.held)

    async def nothing_arrives(self, seconds: float = 1.0) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await anext(self.client.messages)
        except TimeoutError:
            return True
        return False

    async def answer(self) -> None:
        """Run every held assignment and report the results, as an honest node does."""
        items, self.held = tuple(run_outputs(a) for a in self.held), []
        await self.client.publish(self.topics.result(self.id),
                                  self.seal(Results(node=self.id, runtime="puppet", items=items)), qos=1)


def start_node_process(net: Network, name: str, key: Path, *extra: str) -> ManagedProcess:
    """A real node process; not waited for: the tests here expect it to be refused and exit."""
    return net.group.start("node", ["--broker", net.broker_url, "--coordinator", net.url, "--key", str(key),
                                    "--slots", "1", "--cache-dir", str(net.tmp / f"cache-{name}"), *extra],
                           name=name)


def exits_saying(proc: ManagedProcess, *phrases: str) -> str:
    code = proc.wait(60)
    text = proc.log_text()
    assert code is not None and code != 0, f"{proc.name} did not exit with an error:\n{text}"
    for phrase in phrases:
        assert phrase in text, f"{proc.name}'s log does not say {phrase!r}:\n{text}"
    return text


def cli_json(*args: str) -> dict[str, Any]:
    done = cli(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


def admin(net: Network, *args: str) -> dict[str, Any]:
    """`sparecycles admin ...` as the operator would type it, with the coordinator's key file."""
    return cli_json("admin", *args, "--key", f"{net.db}.key", "--coordinator", net.url)


# ---- 1, 2a: certificates and names ---------------------------------------------------------------
def test_a_node_with_a_forged_expired_or_borrowed_certificate_or_another_owners_name_is_refused(
        network: Network) -> None:
    """Attack: a node presents a certificate naming alice as its owner but signed by mallory's key.
    Attack: a node presents alice's genuine certificate that expired an hour ago.
    Attack: a node presents alice's valid certificate issued to another node key.
    Attack: a node presents a certificate from a key that is no account at all.
    Attack: a node process started with `--owner alice` and a key of its own claims the name alice.
    Each is refused (403 / 409 with the reason; the node processes exit non-zero and log it), counted,
    and no account or node is registered."""
    tmp = network.tmp
    alice, mallory = Identity.generate(), Identity.generate()
    forged_node = Identity.load_or_create(tmp / "forged.key")
    expired_node = Identity.load_or_create(tmp / "expired.key")
    (tmp / "forged.cert").write_text(forged_certificate(forged_node, claimed_owner=alice, signer=mallory).to_text())
    (tmp / "expired.cert").write_text(
        certificate(alice, expired_node, now=time.time() - 7200, valid_seconds=3600).to_text())

    async def over_http() -> None:
        async with api_for(network.url) as api:
            assert (await api.register(alice, "alice"))[0] == 201
            before = await api.balances()
            forged, expired = (NodeCertificate.from_text((tmp / f"{n}.cert").read_text())
                               for n in ("forged", "expired"))
            refusals = [
                (forged_node, forged, "signature does not verify"),
                (expired_node, expired, "certificate expired at"),
                (Identity.generate(), certificate(alice, forged_node), "for another node key"),
            ]
            for node, cert, reason in refusals:
                status, body, _ = await api.certify(node, cert)
                assert status == 403 and reason in body["error"], body
            status, body, _ = await api.certify(forged_node, certificate(mallory, forged_node))
            assert status == 403 and "not a registered account" in body["error"], body
            await counted(api, refused_bad_certificate=3, refused_unknown_owner=1)
            assert (await api.me(alice))["nodes"] == []
            assert await api.account_names(operator_key(network)) == ["alice"]
            assert await api.balances() == before

    asyncio.run(over_http())

    procs = [start_node_process(network, "forged", tmp / "forged.key", "--owner", "alice", "--cert",
                                str(tmp / "forged.cert")),
             start_node_process(network, "expired", tmp / "expired.key", "--owner", "alice", "--cert",
                                str(tmp / "expired.cert")),
             # no --cert: the node makes an owner key of its own beside its key and registers alice with it
             start_node_process(network, "impostor", tmp / "impostor" / "node.key", "--owner", "alice")]
    exits_saying(procs[0], "refused this node", "signature does not verify")
    exits_saying(procs[1], "refused this node", "certificate expired at")
    exits_saying(procs[2], "owner 'alice' on this coordinator belongs to another key")

    async def afterwards() -> None:
        async with api_for(network.url) as api:
            await counted(api, refused_bad_certificate=5, refused_unknown_owner=1, refused_name_taken=1)
            assert (await api.me(alice))["nodes"] == []
            assert await api.account_names(operator_key(network)) == ["alice"]
            health = await api.health()
            assert health["nodes_waiting"] == 0 and health["live_leases"] == 0

    asyncio.run(afterwards())


# ---- 2b, 3: the owner is the certified one; uncertified keys get nothing -------------------------
def test_a_node_claiming_another_owner_earns_for_its_certifier_and_an_uncertified_key_gets_nothing(
        network: Network) -> None:
    """Attack: mallory certifies a node of hers and has it claim owner "alice" in every WorkRequest,
    to earn for alice or to pass as alice beside alice's own node.
    Attack: a key nobody certified asks for work, and reports a result for a lease it copied off the
    open broker.
    Refused: every lease and credit of mallory's node is mallory's (had the claim counted, her node
    and alice's would be one owner and the job could never reach two owners' agreement); the
    uncertified key's requests and results are counted as rejected_unregistered_node and get it
    no lease and no credit."""
    network.start_node("alice")
    x = np.random.default_rng(11).standard_normal((20, 8)).astype(np.float32)

    async def scenario() -> None:
        async with api_for(network.url) as api, aiomqtt.Client(*BROKER) as m_conn, \
                aiomqtt.Client(*BROKER) as u_conn:
            mallory = Identity.generate()
            assert (await api.register(mallory, "mallory"))[0] == 201
            m = Puppet(m_conn, api)
            status, body, _ = await api.certify(m.identity, certificate(mallory, m.identity))
            assert status == 200 and body["owner"] == "mallory", body
            await m.listen()
            u = Puppet(u_conn, api)
            await u_conn.subscribe(f"{api.prefix}/assign/+", qos=1)  # an open broker: u reads everyone's work
            await u.ask(4, owner="ursula")
            await m.ask(4, owner="alice")

            async def both_asked() -> bool:
                h = await api.health()
                return bool(h["nodes_waiting"] == 2 and h["counters"].get("rejected_unregistered_node", 0) == 1)

            await until(both_asked, "alice's node and mallory's to wait for work, the uncertified one refused")

            async with submitter(network.url) as c:
                # two tasks: a new node holds at most two leases (coordinator/capacity.py)
                job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=10)
                held = await m.receive(2)  # one replica of each task, as mallory's
                # u copies a lease it saw go to another node and reports honest outputs for it
                async with asyncio.timeout(30):
                    copied = opened_assignments(await anext(u_conn.messages), api.prefix, api.coordinator_key)
                assert copied.node != u.id
                await u.ask(4, owner="ursula")
                await u_conn.publish(u.topics.result(u.id), u.seal(Results(
                    node=u.id, runtime="puppet", items=(run_outputs(copied.items[0]),))), qos=1)
                await counted(api, rejected_unregistered_node=3)
                await m.answer()
                assert (await c.wait(job["job"], timeout=60))["state"] == "done"
            while len(u_conn.messages):  # everything u saw on the broker went to other nodes
                assert opened_assignments(await anext(u_conn.messages), api.prefix, api.coordinator_key).node != u.id

            balances = await api.balances()
            m_rows = [(n["node"], n["owner"], n["entries"]) for n in balances["nodes"] if n["node"] == m.id]
            assert m_rows == [(m.id, "mallory", 2)]
            assert u.id not in {n["node"] for n in balances["nodes"]}
            _, entries, _ = await api("GET", "/v1/ledger/entries")
            credits = [e for e in entries["entries"] if e["kind"] == "credit"]
            assert {(e["node"], e["owner"]) for e in credits if e["node"] == m.id} == {(m.id, "mallory")}
            assert {e["task"] for e in credits if e["node"] == m.id} == {a.task for a in held}
            assert len({a.task for a in held}) == 2
            alice_node = {e["node"] for e in credits if e["owner"] == "alice"}
            assert len(alice_node) == 1 and m.id not in alice_node
            assert [n["node"] for n in (await api.me(mallory))["nodes"]] == [m.id]
            alice = Identity.load_or_create(network.tmp / "owner-alice.key")  # the node process made it
            assert [n["node"] for n in (await api.me(alice))["nodes"]] == list(alice_node)
            counters = await api.counters()
            assert counters.get("rejected_unregistered_node") == 3
            assert "rejected_unknown_or_closed_lease" not in counters
            assert (await api.health())["live_leases"] == 0

    asyncio.run(scenario())


# ---- 4, 5: forged presence; who reads a job ------------------------------------------------------
def test_a_forged_or_replayed_offline_revokes_no_lease_and_only_the_submitter_or_token_reads_the_job(
        network: Network) -> None:
    """Attack: anyone on the broker publishes `offline` for a live node holding leases: (a) unsigned
    bytes, as an envelope with a blank signature and as a bare message; (b) a Status signed by
    another key; (c) the node's own Will from an earlier connection, captured and replayed.
    Refused: none of its leases is revoked (live_leases stays, each lease still opens its input),
    each is counted (rejected_bad_signature, _unsupported_version, _wrong_sender, _stale_status), and the job
    completes with the node's results on those very leases.
    Attack: another account reads the job's status and outputs (403), or nobody at all (401), or
    someone with a guessed read token (403); only the submitter and the token's holder read it."""
    x = np.random.default_rng(12).standard_normal((8, 8)).astype(np.float32)

    async def scenario() -> None:
        async with api_for(network.url) as api, aiomqtt.Client(*BROKER) as v_conn, \
                aiomqtt.Client(*BROKER) as attacker:
            alice, mallory = Identity.generate(), Identity.generate()
            assert (await api.register(alice, "alice"))[0] == 201
            v = Puppet(v_conn, api)
            assert (await api.certify(v.identity, certificate(alice, v.identity)))[0] == 200
            await v.listen()
            await attacker.subscribe(v.topics.status(v.id), qos=1)
            # An earlier connection of the node ends and the broker publishes its Will: anyone
            # subscribed keeps a copy.
            first = time.time_ns() // 1_000_000
            await v.status("online", first)
            await v.status("offline", first)
            old_will = None
            async with asyncio.timeout(10):
                while old_will is None:
                    payload = (await anext(attacker.messages)).payload
                    assert isinstance(payload, bytes)
                    status = open_envelope(payload, namespace=api.prefix).message
                    if isinstance(status, Status) and status.state == "offline":
                        old_will = payload
            now = first + 1000
            await v.status("online", now)  # the node reconnects
            await v.ask(4, owner="alice")
            await until(lambda: _waiting(api, 1), "the node to wait for work")
            async with submitter(network.url) as c:
                job = await c.submit(await c.ensure_model(MODEL), {"x": x}, task_size=4)
            leases = await v.receive(2)  # a new node holds at most two leases (coordinator/capacity.py)
            assert (await api.health())["live_leases"] == 2
            before = await api.counters()

            topic = v.topics.status(v.id)
            offline = Status(node=v.id, state="offline", since=now)
            body = msgpack.packb(offline.to_wire(), use_bin_type=True)
            await attacker.publish(topic, msgpack.packb({"v": PROTOCOL_VERSION, "kind": "status", "body": body,
                                                         "sig": bytes(64), "pk": v.identity.public_key}), qos=1)
            await attacker.publish(topic, body, qos=1)
            await attacker.publish(topic, seal(offline, mallory, namespace=api.prefix), qos=1)
            await attacker.publish(topic, old_will, qos=1)
            await counted(api, **{name: before.get(name, 0) + 1 for name in (
                "rejected_bad_signature", "rejected_unsupported_version", "rejected_wrong_sender",
                "rejected_stale_status")})

            health = await api.health()
            assert health["live_leases"] == 2 and health["jobs"] == {"running": 1}
            for a in leases:  # each lease still lets its node fetch its inputs: it is live
                assert await api.fetch_status(v.identity, f"/v1/blobs/{a.input_digest}", lease=a.lease) == 200

            await asyncio.to_thread(network.start_node, "bob")  # the second owner each task needs
            await v.answer()
            async with submitter(network.url) as c:
                assert (await c.wait(job["job"], timeout=60))["state"] == "done"
            counters = await api.counters()
            assert "rejected_unknown_or_closed_lease" not in counters
            credited = {e["task"] for e in (await api("GET", "/v1/ledger/entries"))[1]["entries"]
                        if e["kind"] == "credit" and e["node"] == v.id}
            assert credited == {a.task for a in leases}  # paid on the very leases the forgeries aimed at

            # Who may read the job.
            eve = Identity.generate()
            assert (await api.register(eve, "eve"))[0] == 201
            job_path, token = f"/v1/jobs/{job['job']}", job["read_token"]
            reads = {}
            for path in (job_path, job_path + "/outputs"):
                json_accept = {"Accept": "application/json"}
                reads[path] = [
                    (await api("GET", path, eve, headers=json_accept))[0],
                    (await api("GET", path, headers=json_accept))[0],
                    (await api("GET", path, headers={**json_accept, "X-Sparecycles-Job-Token": "guess" + token}))[0],
                    (await api("GET", path, headers={**json_accept, "X-Sparecycles-Job-Token": token}))[0],
                    (await api("GET", path, SUBMITTER, headers=json_accept))[0],
                ]
            assert reads == {job_path: [403, 401, 403, 200, 200], job_path + "/outputs": [403, 401, 403, 200, 200]}
            status_code, body, _ = await api("GET", job_path, eve)
            assert status_code == 403 and "read token" in body["error"]
            after = await api.counters()
            assert after.get("http_auth_missing", 0) == 2
            assert after.get("http_auth_forbidden", 0) == counters.get("http_auth_forbidden", 0) + 5

    asyncio.run(scenario())


async def _waiting(api: Api, count: int) -> bool:
    return bool((await api.health())["nodes_waiting"] == count)


# ---- 6: a namespace is part of every signature ---------------------------------------------------
def test_a_message_signed_for_one_coordinator_is_rejected_by_another_on_the_same_broker(network: Network) -> None:
    """Attack: a node's signed WorkRequest and offline Status for coordinator A are replayed under
    coordinator B's topic prefix on the same broker, where the same node (same key, same owner) is
    registered too.
    Refused: B counts both as rejected_bad_signature and gives the node nothing; the same request
    sealed for B gets a lease at once, and A accepts the original: only the namespace differs."""
    other_port = free_port()
    network.group.start("coordinator", ["--broker", network.broker_url, "--db", f"sqlite:///{network.tmp / 'b.db'}",
                                        "--http", f"127.0.0.1:{other_port}"],
                        ready=r"coordinator ready", timeout=60, name="coordinator-b")
    b_url = f"http://127.0.0.1:{other_port}"

    async def scenario() -> None:
        async with api_for(network.url) as a, api_for(b_url) as b, aiomqtt.Client(*BROKER) as conn:
            assert a.prefix != b.prefix
            olga = Identity.generate()
            node = Puppet(conn, b)
            for api in (a, b):
                assert (await api.register(olga, "olga"))[0] == 201
                assert (await api.certify(node.identity, certificate(olga, node.identity)))[0] == 200
            await node.listen()
            async with submitter(b_url) as c:
                await c.submit(await c.ensure_model(MODEL), {"x": np.ones((4, 8), np.float32)}, task_size=2)

            for_a = node.seal(node.request(2, "olga"), namespace=a.prefix)
            await conn.publish(node.topics.work(node.id), for_a, qos=1)
            await conn.publish(node.topics.status(node.id),
                               node.seal(Status(node=node.id, state="offline", since=1), namespace=a.prefix), qos=1)
            await counted(b, rejected_bad_signature=2)
            assert await node.nothing_arrives(1.0)
            health = await b.health()
            assert health["live_leases"] == 0 and health["nodes_waiting"] == 0 and health["jobs"] == {"running": 1}

            # Where it was signed, the same bytes are a valid request.
            await conn.publish(Topics(a.prefix).work(node.id), for_a, qos=1)
            await until(lambda: _waiting(a, 1), "coordinator A to take the request signed for it")
            assert "rejected_bad_signature" not in await a.counters()
            # And sealed for B, the same request gets work from B.
            await node.ask(2, owner="olga")
            assert len(await node.receive(2)) == 2
            assert (await b.health())["live_leases"] == 2

    asyncio.run(scenario())


# ---- 7, 10: replayed requests; replicas ----------------------------------------------------------
def test_a_replayed_request_and_a_job_below_the_replica_minimum_change_nothing(network: Network) -> None:
    """Attack: a captured signed POST /v1/jobs is sent again (a second job charged to its signer).
    Attack: a captured operator grant is sent again (credit granted twice).
    Refused: the second of each is 401 "replayed", counted as http_auth_replayed; one job, one grant.
    Attack: a submitter asks for 1 replica (below this coordinator's minimum of 2), or for
    `"replicas": true`, 0 or "2", to have a single node of their own verify, and be paid for, the job.
    Refused: 400 saying the minimum, counted as refused_bad_job; no job, no reservation."""
    x = np.ones((4, 8), dtype=np.float32)
    operator = operator_key(network)

    async def replay(api: Api, identity: Identity, path: str, payload: dict[str, Any]) -> list[Answer]:
        body = json.dumps(payload).encode()
        header = sign_request(identity, method="POST", path_qs=path, body=body, audience=api.audience,
                              now=time.time())
        return [await api("POST", path, data=body, headers={"Content-Type": "application/json"},
                          authorization=header) for _ in range(2)]

    async def scenario() -> None:
        async with api_for(network.url) as api:
            async with submitter(network.url):
                pass  # registers "tester"
            digest = await api.upload(SUBMITTER)
            inputs = {"x": {"dtype": "float32", "shape": [4, 8], "data": x.tolist()}}
            first, second = await replay(api, SUBMITTER, "/v1/jobs", {"model": digest, "inputs": inputs})
            assert first[0] == 202, first
            assert second[0] == 401 and "replayed" in second[1]["error"], second
            assert (await api.health())["jobs"] == {"running": 1}
            me = await api.me(SUBMITTER)
            assert me["open_jobs"] == 1 and me["reserved"] > 0

            granted, again = await replay(api, operator, "/v1/admin/accounts/tester/grant",
                                          {"amount": 1000, "memo": "once"})
            assert granted[0] == 200 and again[0] == 401 and "replayed" in again[1]["error"], (granted, again)
            _, history, _ = await api("GET", "/v1/ledger/accounts/tester")
            assert [e["amount"] for e in history["entries"] if e.get("memo") == "once"] == [1000]
            assert (await api.me(SUBMITTER))["balance"] == me["balance"] + 1000
            await counted(api, http_auth_replayed=2)

            for replicas, reason in ((1, "at least 2"), (True, "positive integer"), (0, "positive integer"),
                                     ("2", "positive integer")):
                status, body, _ = await api.submit(SUBMITTER, digest, x, replicas=replicas)
                assert status == 400 and reason in body["error"], (replicas, body)
            await counted(api, refused_bad_job=4)
            assert (await api.health())["jobs"] == {"running": 1}
            after = await api.me(SUBMITTER)
            assert (after["open_jobs"], after["reserved"]) == (1, me["reserved"])

    asyncio.run(scenario())


# ---- 8: quotas and request rates -----------------------------------------------------------------
def test_a_submitter_over_its_open_job_quota_or_request_rate_gets_429_and_nothing_is_created(
        network: Network) -> None:
    """Attack: a submitter floods the coordinator with jobs (past --max-open-jobs) or with requests
    (past --request-rate), to crowd out everyone else.
    Refused: 429 with Retry-After and the reason, counted (refused_quota_open_jobs,
    http_rate_limited); no job and no reservation is added."""
    x = np.ones((4, 8), dtype=np.float32)
    assert network.coordinator is not None
    network.coordinator.terminate()
    network.start_coordinator("--max-open-jobs", "1")

    async def over_quota() -> None:
        async with api_for(network.url) as api:
            async with submitter(network.url):
                pass
            digest = await api.upload(SUBMITTER)
            assert (await api.submit(SUBMITTER, digest, x))[0] == 202
            me = await api.me(SUBMITTER)
            status, body, headers = await api.submit(SUBMITTER, digest, x)
            assert status == 429 and "the limit is 1" in body["error"], body
            assert int(headers["Retry-After"]) >= 1
            await counted(api, refused_quota_open_jobs=1)
            assert (await api.health())["jobs"] == {"running": 1}
            after = await api.me(SUBMITTER)
            assert (after["open_jobs"], after["reserved"], after["stored_bytes"]) == \
                (1, me["reserved"], me["stored_bytes"])

    asyncio.run(over_quota())
    network.coordinator.terminate()
    network.start_coordinator("--request-rate", "0.25")  # a burst of one request, then one per 4 s

    async def over_rate() -> None:
        async with api_for(network.url) as api:
            assert (await api("GET", "/v1/accounts/me", SUBMITTER))[0] == 200
            digest = sha256_hex(MODEL)  # uploaded before the restart
            status, body, headers = await api.submit(SUBMITTER, digest, x)
            assert status == 429 and "too many requests" in body["error"], body
            assert int(headers["Retry-After"]) >= 1
            await counted(api, http_rate_limited=1)
            assert (await api.health())["jobs"] == {"running": 1}  # the one restored from before

    asyncio.run(over_rate())


# ---- 9: credit -----------------------------------------------------------------------------------
def test_a_submitter_without_credit_gets_402_until_an_operator_grants_it_and_credit_is_conserved(
        network: Network) -> None:
    """Attack: a fresh account (no starting grant) submits a job it cannot pay for, to have
    volunteers work for free or mint their credit from nothing.
    Refused: 402 saying how much is missing, counted as refused_insufficient_credit; no job, no
    reservation. After an operator grants that much, the same job runs on two owners' nodes, and
    the sum of all balances equals the credit granted before and after it."""
    assert network.coordinator is not None
    network.coordinator.terminate()
    network.start_coordinator("--starting-grant", "0")
    network.start_node("alice")
    network.start_node("bob")
    x = np.random.default_rng(13).standard_normal((12, 8)).astype(np.float32)

    def conserved(balances: dict[str, Any]) -> int:
        assert sum(a["balance"] for a in balances["accounts"]) == balances["total_granted"]
        return int(balances["total_granted"])

    async def scenario() -> None:
        async with api_for(network.url) as api:
            async with submitter(network.url):
                pass
            digest = await api.upload(SUBMITTER)
            status, body, _ = await api.submit(SUBMITTER, digest, x, task_size=3)
            assert status == 402 and "missing" in body["error"], body
            found = re.search(r"needs ([\d,]+) credits", body["error"])
            assert found is not None, body
            needed = int(found.group(1).replace(",", ""))
            assert f"{needed:,} missing" in body["error"]
            await counted(api, refused_insufficient_credit=1)
            assert (await api.health())["jobs"] == {}
            me = await api.me(SUBMITTER)
            assert (me["balance"], me["reserved"], me["open_jobs"]) == (0, 0, 0)
            assert conserved(await api.balances()) == 0

            status, body, _ = await api("POST", "/v1/admin/accounts/tester/grant", operator_key(network),
                                        json={"amount": needed})
            assert status == 200, body
            assert conserved(await api.balances()) == needed
            status, job, _ = await api.submit(SUBMITTER, digest, x, task_size=3)
            assert status == 202, job
            status, done, _ = await api("GET", f"/v1/jobs/{job['job']}", SUBMITTER, params={"wait": "60"})
            assert done["state"] == "done", done

            balances = await api.balances()
            assert conserved(balances) == needed
            rows = {a["account"]: a for a in balances["accounts"]}
            assert rows["tester"]["spent"] == needed and rows["tester"]["balance"] == 0
            assert rows["alice"]["earned"] + rows["bob"]["earned"] == needed
            me = await api.me(SUBMITTER)
            assert (me["balance"], me["reserved"]) == (0, 0)

    asyncio.run(scenario())


# ---- 11: registration policies, names, blocking --------------------------------------------------
def test_registration_policies_hold_names_are_bound_to_keys_and_a_blocked_owner_gets_nothing(
        network: Network) -> None:
    """Attack: on a closed coordinator, anyone registers an account (403; the operator's
    `sparecycles admin add` does it). Attack: on an invite-only one, a second key reuses an invite
    (403). Attack: a second key takes the name "dave" (409, and the invite it presented stays unused).
    Attack: an owner the operator blocked keeps earning through a certified node (its WorkRequests
    are refused, counted, and get no lease) or keeps submitting (403), or certifies a new node (403).
    Each refusal is counted and leaves the account list as it was."""
    assert network.coordinator is not None
    network.coordinator.terminate()
    network.start_coordinator("--registration", "closed")
    operator = operator_key(network)
    carol, dave, erin, frank = (Identity.generate() for _ in range(4))

    async def closed() -> None:
        async with api_for(network.url) as api:
            status, body, _ = await api.register(carol, "carol")
            assert status == 403 and "registration is closed" in body["error"], body
            await counted(api, refused_registration_closed=1)
            assert await api.account_names(operator) == []

    asyncio.run(closed())
    added = admin(network, "add", "carol", carol.public_key.hex())
    assert added["name"] == "carol" and added["public_key"] == carol.public_key.hex()

    async def carol_exists() -> None:
        async with api_for(network.url) as api:
            assert (await api.me(carol))["name"] == "carol"

    asyncio.run(carol_exists())
    network.coordinator.terminate()
    network.start_coordinator("--registration", "invite")
    invite = admin(network, "invite")["invite"]

    async def invite_only() -> None:
        async with api_for(network.url) as api:
            assert (await api.register(dave, "dave", invite))[0] == 201
            status, body, _ = await api.register(erin, "erin", invite)
            assert status == 403 and "unused invite" in body["error"], body
            status, body, _ = await api.register(erin, "erin")
            assert status == 403 and "invite" in body["error"], body
            await counted(api, refused_bad_invite=2)
            status, body, _ = await api("POST", "/v1/admin/invites", operator, json={})
            fresh = body["invite"]
            status, body, _ = await api.register(erin, "dave", fresh)
            assert status == 409 and "belongs to another key" in body["error"], body
            await counted(api, refused_name_taken=1)
            assert (await api.register(erin, "erin", fresh))[0] == 201  # the 409 did not use it up
            status, _, _ = await api.register(frank, "frank", fresh)
            assert status == 403
            await counted(api, refused_bad_invite=3)
            assert await api.account_names(operator) == ["carol", "dave", "erin"]
            assert (await api.me(dave))["name"] == "dave"

    asyncio.run(invite_only())

    d_node = Identity.generate()

    async def before_block() -> None:
        async with api_for(network.url) as api:
            assert (await api.certify(d_node, certificate(dave, d_node)))[0] == 200
            assert (await api("POST", "/v1/admin/accounts/carol/grant", operator, json={"amount": 10**12}))[0] == 200
            status, body, _ = await api.submit(carol, await api.upload(carol), np.ones((4, 8), np.float32),
                                               task_size=2)
            assert status == 202, body

    asyncio.run(before_block())
    assert admin(network, "block", "dave")["blocked"] is True

    async def blocked() -> None:
        async with api_for(network.url) as api, aiomqtt.Client(*BROKER) as conn:
            node = Puppet(conn, api, d_node)
            await node.listen()
            await node.ask(2, owner="dave")
            await counted(api, rejected_unregistered_node=1)
            assert await node.nothing_arrives(1.0)
            health = await api.health()
            assert health["live_leases"] == 0 and health["nodes_waiting"] == 0

            forbidden = (await api.counters()).get("http_auth_forbidden", 0)
            status, body, _ = await api.submit(dave, sha256_hex(MODEL), np.ones((4, 8), np.float32))
            assert status == 403 and "blocked" in body["error"], body
            await counted(api, http_auth_forbidden=forbidden + 1)
            another = Identity.generate()
            status, body, _ = await api.certify(another, certificate(dave, another))
            assert status == 403 and "blocked" in body["error"], body
            await counted(api, refused_owner_blocked=1)
            assert (await api.health())["jobs"] == {"running": 1}
            assert await api.account_names(operator) == ["carol", "dave", "erin"]

            # Lifting the block gives the same node work at once: the block was all that stood in the way.
            await asyncio.to_thread(admin, network, "unblock", "dave")
            await node.ask(2, owner="dave")
            assert len(await node.receive(2)) == 2

    asyncio.run(blocked())


def test_a_work_request_replayed_after_minutes_is_refused(network: Network) -> None:
    """Attack: a node's signed WorkRequest captured on an open broker is replayed later (after a
    coordinator restart nothing newer from the node is known) to hand work to a node that is gone.
    Refused: a request's seq is its node's wall clock in ms, and one older than 5 minutes is counted
    as rejected_stale_work_request and changes nothing; a fresh one gets work."""

    async def scenario() -> None:
        async with api_for(network.url) as api, aiomqtt.Client(*BROKER) as conn:
            owner = Identity.generate()
            node = Puppet(conn, api)
            assert (await api.register(owner, "ruth"))[0] == 201
            assert (await api.certify(node.identity, certificate(owner, node.identity)))[0] == 200
            await node.listen()
            old = WorkRequest(node=node.id, owner="ruth", slots=2, seq=(time.time_ns() // 1_000_000) - 600_000)
            await conn.publish(node.topics.work(node.id), node.seal(old), qos=1)
            await counted(api, rejected_stale_work_request=1)
            assert (await api.health())["nodes_waiting"] == 0
            await node.ask(2, owner="ruth")
            await until(lambda: _waiting(api, 1), "the fresh request to be served")

    asyncio.run(scenario())
