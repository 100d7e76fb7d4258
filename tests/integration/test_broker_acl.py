"""Least privilege on a real Mosquitto with dynamic security (coordinator/broker_acl.py): each
test tries an attack from DESIGN §12 and shows the broker refuses it, next to a control showing
the same client can do what it is meant to."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Iterable

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.broker_acl import (
    BrokerAclError,
    DynamicSecurity,
    node_acls,
    parse_admin,
    probe_dynamic_security,
)
from protocol.topics import Topics

from .dynsec import DynsecBroker, dynsec_broker  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

PREFIX = "sc/v1/acltest"
TOPICS = Topics(PREFIX)
COORD_ID = "coord-0123456789abcdef"
COORD_USER, COORD_PASSWORD = "coordinator", "coordinator-password"
QUIET = 0.5  # seconds to wait for a message that must not come (after a sentinel that must)


def client(broker: DynsecBroker, username: str | None, password: str | None, identifier: str,
           **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, username=username, password=password,
                          identifier=identifier, timeout=5, **kwargs)  # type: ignore[arg-type]


def admin(broker: DynsecBroker) -> DynamicSecurity:
    return DynamicSecurity(broker.host, broker.port, username=broker.admin_user, password=broker.admin_password)


@pytest.fixture
async def provisioned(dynsec_broker: DynsecBroker) -> AsyncIterator[dict[str, str]]:  # noqa: F811
    """Locked down, a coordinator and nodes A and B; yields each username's password."""
    async with admin(dynsec_broker) as dynsec:
        await dynsec.lock_down()
        await dynsec.ensure_coordinator(username=COORD_USER, password=COORD_PASSWORD, client_id=COORD_ID,
                                        prefix=PREFIX)
        yield {COORD_USER: COORD_PASSWORD, "A": await dynsec.provision_node("A", PREFIX),
               "B": await dynsec.provision_node("B", PREFIX)}


async def granted(c: aiomqtt.Client, topic: str) -> list[int]:
    """The SUBACK's code for `topic`: the QoS granted, or 0x80 when the broker refuses."""
    return [code.value if isinstance(code, ReasonCode) else code for code in await c.subscribe(topic, qos=1)]


async def refused(broker: DynsecBroker, username: str | None, password: str | None, identifier: str) -> bool:
    try:
        async with client(broker, username, password, identifier):
            return False
    except MqttConnectError:
        return True


async def collect_until(c: aiomqtt.Client, sentinels: Iterable[str], *, within: float = 5.0) -> list[str]:
    """Topics received until every sentinel topic arrived, then QUIET more seconds of whatever else."""
    waiting, seen = set(sentinels), []
    async with asyncio.timeout(within):
        async for message in c.messages:
            seen.append(str(message.topic))
            waiting.discard(str(message.topic))
            if not waiting:
                break
    try:
        async with asyncio.timeout(QUIET):
            async for message in c.messages:
                seen.append(str(message.topic))
    except TimeoutError:
        pass
    return seen


# ---- connecting ---------------------------------------------------------------------------------
async def test_anonymous_clients_cannot_connect(provisioned: dict[str, str], dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a stranger connects without credentials to read inputs and results under `sc/#`."""
    assert await refused(dynsec_broker, None, None, "stranger")
    assert not await refused(dynsec_broker, "A", provisioned["A"], "A")  # control


async def test_a_wrong_password_is_refused(provisioned: dict[str, str], dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: guessing a node's or the coordinator's password."""
    assert await refused(dynsec_broker, "A", provisioned["A"] + "x", "A")
    assert await refused(dynsec_broker, COORD_USER, "guess", COORD_ID)
    assert await refused(dynsec_broker, "A", provisioned["B"], "A")  # B's password is not A's


@pytest.mark.parametrize(("username", "identifier"), [
    ("A", COORD_ID),   # a node's credentials under the coordinator's client id
    ("A", "B"),        # ... or another node's
    ("B", "A"),
    (COORD_USER, "A"),  # the coordinator's credentials are bound to its own id too
])
async def test_credentials_are_bound_to_their_client_id(provisioned: dict[str, str], dynsec_broker: DynsecBroker,  # noqa: F811
                                                        username: str, identifier: str) -> None:
    """Attack: session theft. A client id names a persistent session (queued results or
    assignments); connecting under it would take the session over and disconnect its owner."""
    async with client(dynsec_broker, COORD_USER, COORD_PASSWORD, COORD_ID) as coord:
        assert await granted(coord, TOPICS.all_of("work")) == [1]
        assert await refused(dynsec_broker, username, provisioned[username], identifier)
        # The owner of the id was not thrown out: it still receives.
        async with client(dynsec_broker, "A", provisioned["A"], "A") as a:
            await a.publish(TOPICS.work("A"), b"still here", qos=1)
        assert await collect_until(coord, [TOPICS.work("A")]) == [TOPICS.work("A")]


async def test_reprovisioning_replaces_the_password_and_drops_the_old_session(
        provisioned: dict[str, str], dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a leaked or revoked node password keeps working (or an open session does)."""
    old = provisioned["A"]
    async with client(dynsec_broker, "A", old, "A") as a:
        assert await granted(a, TOPICS.assign("A")) == [1]
        async with admin(dynsec_broker) as dynsec:
            new = await dynsec.provision_node("A", PREFIX)
        assert new != old
        with pytest.raises(aiomqtt.MqttError):  # the broker kicked the session that used the old one
            async with asyncio.timeout(5):
                async for _ in a.messages:
                    pass
    assert await refused(dynsec_broker, "A", old, "A")
    assert not await refused(dynsec_broker, "A", new, "A")


async def test_a_removed_node_cannot_connect(provisioned: dict[str, str], dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a node the coordinator dropped keeps using the network."""
    async with admin(dynsec_broker) as dynsec:
        await dynsec.remove_node("A")
        await dynsec.remove_node("A")  # idempotent
    assert await refused(dynsec_broker, "A", provisioned["A"], "A")
    assert not await refused(dynsec_broker, "B", provisioned["B"], "B")


# ---- subscribing --------------------------------------------------------------------------------
async def test_a_node_reads_only_its_own_assignments(provisioned: dict[str, str], dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a node reads another node's assignments (inputs) or everyone's results, to copy
    them instead of computing, or to read a submitter's data."""
    forbidden = [TOPICS.assign("B"), TOPICS.all_of("result"), TOPICS.all_of("assign"), "#", f"{PREFIX}/#", "sc/#"]
    async with client(dynsec_broker, "A", provisioned["A"], "A") as a, \
            client(dynsec_broker, "B", provisioned["B"], "B") as b, \
            client(dynsec_broker, COORD_USER, COORD_PASSWORD, COORD_ID) as coord:
        for topic in forbidden:
            assert await granted(a, topic) == [0x80], f"A may subscribe to {topic}"
        assert await granted(a, TOPICS.assign("A")) == [1]
        assert await granted(b, TOPICS.assign("B")) == [1]
        await coord.publish(TOPICS.assign("B"), b"inputs for B", qos=1)
        await coord.publish(TOPICS.result("B"), b"a result", qos=1)
        await coord.publish(TOPICS.assign("A"), b"inputs for A", qos=1)  # the sentinel
        assert await collect_until(a, [TOPICS.assign("A")]) == [TOPICS.assign("A")]
        assert await collect_until(b, [TOPICS.assign("B")]) == [TOPICS.assign("B")]  # it was published


# ---- publishing ---------------------------------------------------------------------------------
async def test_a_node_publishes_only_on_its_own_topics(provisioned: dict[str, str],
                                                       dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a node writes results, work requests or status under another node's name (to
    take its credit, exhaust its leases or mark it offline), or assignments to other nodes."""
    own = [TOPICS.work("A"), TOPICS.result("A"), TOPICS.status("A")]
    theirs = [TOPICS.work("B"), TOPICS.result("B"), TOPICS.status("B")]
    async with client(dynsec_broker, COORD_USER, COORD_PASSWORD, COORD_ID) as coord, \
            client(dynsec_broker, "B", provisioned["B"], "B") as b:
        for kind in ("work", "result", "status"):
            assert await granted(coord, TOPICS.all_of(kind)) == [1]
        assert await granted(b, TOPICS.assign("B")) == [1]
        async with client(dynsec_broker, "A", provisioned["A"], "A") as a:
            for topic in [*theirs, TOPICS.assign("B"), *own]:  # QoS 1: each is acknowledged in turn
                await a.publish(topic, b"from A", qos=1)
        assert sorted(await collect_until(coord, own)) == sorted(own)
        await coord.publish(TOPICS.assign("B"), b"sentinel", qos=1)
        assert await collect_until(b, [TOPICS.assign("B")]) == [TOPICS.assign("B")]  # one, not two


def raw_connect(port: int, *, username: str, password: str, client_id: str, will_topic: str) -> socket.socket:
    """An MQTT 3.1.1 CONNECT with a will, by hand, so the test can drop the TCP connection without
    a DISCONNECT: only an unclean end makes the broker publish the will."""

    def field(data: bytes) -> bytes:
        return struct.pack("!H", len(data)) + data

    flags = 0x80 | 0x40 | 0x08 | 0x04 | 0x02  # username, password, will QoS 1, will, clean session
    body = (field(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + field(client_id.encode())
            + field(will_topic.encode()) + field(b"offline") + field(username.encode()) + field(password.encode()))
    assert len(body) < 128
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(bytes([0x10, len(body)]) + body)
    connack = sock.recv(4)
    assert connack[:2] == b"\x20\x02" and connack[3] == 0, f"CONNACK {connack!r}"
    return sock


async def test_a_node_cannot_forge_another_nodes_offline_will(provisioned: dict[str, str],
                                                               dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a node connects with its will on another node's status topic and drops the
    connection, so the broker itself announces the other node offline."""
    async with client(dynsec_broker, COORD_USER, COORD_PASSWORD, COORD_ID) as coord:
        assert await granted(coord, TOPICS.all_of("status")) == [1]
        raw_connect(dynsec_broker.port, username="A", password=provisioned["A"], client_id="A",
                    will_topic=TOPICS.status("B")).close()
        await asyncio.sleep(0.2)
        raw_connect(dynsec_broker.port, username="A", password=provisioned["A"], client_id="A",
                    will_topic=TOPICS.status("A")).close()  # the control: its own will does go out
        assert await collect_until(coord, [TOPICS.status("A")]) == [TOPICS.status("A")]


# ---- the coordinator's role ---------------------------------------------------------------------
async def test_the_coordinator_is_confined_to_its_prefix(provisioned: dict[str, str],
                                                         dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: one deployment on a shared broker reads or writes another deployment's namespace."""
    other = Topics("sc/v1/someone-else")
    async with client(dynsec_broker, COORD_USER, COORD_PASSWORD, COORD_ID) as coord:
        assert await granted(coord, other.all_of("result")) == [0x80]
        assert await granted(coord, "#") == [0x80]
        assert await granted(coord, f"{PREFIX}/#") == [1]
        await coord.publish(other.assign("A"), b"x", qos=1)
        await coord.publish(TOPICS.assign("A"), b"x", qos=1)
        assert await collect_until(coord, [TOPICS.assign("A")]) == [TOPICS.assign("A")]


async def test_lock_down_denies_what_no_role_grants(dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    """Attack: a plugin file whose defaults allow everything (a hand edit, another tool's init):
    every authenticated node could then subscribe to `#`. lock_down() restores deny-by-default."""
    open_defaults = [{"command": "setDefaultACLAccess", "acls": [
        {"acltype": t, "allow": True} for t in ("publishClientSend", "publishClientReceive", "subscribe")]}]
    async with admin(dynsec_broker) as dynsec:
        await dynsec.run(open_defaults)
        password = await dynsec.provision_node("A", PREFIX)
        async with client(dynsec_broker, "A", password, "A") as a:
            assert await granted(a, "#") == [1]  # the danger is real
        await dynsec.lock_down()
        [defaults] = await dynsec.run([{"command": "getDefaultACLAccess"}])
    assert {a["acltype"]: a["allow"] for a in defaults["data"]["acls"]} == {
        "publishClientSend": False, "publishClientReceive": True, "subscribe": False, "unsubscribe": True}
    async with client(dynsec_broker, "A", password, "A") as a:
        assert await granted(a, "#") == [0x80]


# ---- the adapter itself -------------------------------------------------------------------------
async def test_a_refused_command_raises_with_the_brokers_error_text(dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    async with admin(dynsec_broker) as dynsec:
        with pytest.raises(BrokerAclError, match="Role not found") as caught:
            await dynsec.run([{"command": "deleteRole", "rolename": "no-such-role"}])
    assert (caught.value.command, caught.value.error) == ("deleteRole", "Role not found")


async def test_provisioning_twice_leaves_one_client_with_one_role(dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    async with admin(dynsec_broker) as dynsec:
        await dynsec.provision_node("A", PREFIX)
        await dynsec.provision_node("A", PREFIX)
        [answer] = await dynsec.run([{"command": "getClient", "username": "A"}])
        [role] = await dynsec.run([{"command": "getRole", "rolename": "sc-node-A"}])
    data = answer["data"]["client"]
    assert (data["username"], data["clientid"], [r["rolename"] for r in data["roles"]]) == ("A", "A", ["sc-node-A"])
    assert sorted((a["acltype"], a["topic"]) for a in role["data"]["role"]["acls"]) == sorted(
        (a["acltype"], a["topic"]) for a in node_acls("A", PREFIX))


async def test_the_admin_is_refused_with_a_wrong_password(dynsec_broker: DynsecBroker) -> None:  # noqa: F811
    with pytest.raises(BrokerAclError, match="refused the admin client"):
        async with DynamicSecurity(dynsec_broker.host, dynsec_broker.port, username=dynsec_broker.admin_user,
                                   password="wrong"):
            pass


async def test_probe_tells_a_dynamic_security_broker_from_a_plain_one(dynsec_broker: DynsecBroker,  # noqa: F811
                                                                       mosquitto_url: str) -> None:
    assert await probe_dynamic_security(dynsec_broker.host, dynsec_broker.port, dynsec_broker.admin_user,
                                        dynsec_broker.admin_password)
    # The shared anonymous broker accepts any credentials and never answers: not access-controlled.
    assert not await probe_dynamic_security("127.0.0.1", 1883, "anyone", "anything", within=1.0)


# ---- pure checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("node_id", ["+", "#", "a/b", "", "a b", "x" * 129])
def test_a_node_id_that_would_widen_its_acls_is_rejected(node_id: str) -> None:
    """Attack: a node id such as `+` or `#` would turn the node's ACL topics into wildcards."""
    with pytest.raises(ValueError, match="node id"):
        node_acls(node_id, PREFIX)


def test_a_wildcard_prefix_is_rejected() -> None:
    with pytest.raises(ValueError, match="prefix"):
        node_acls("A", "sc/+")


def test_parse_admin_splits_user_and_password() -> None:
    assert parse_admin("admin:pa:ss") == ("admin", "pa:ss")
    with pytest.raises(ValueError):
        parse_admin("admin")
