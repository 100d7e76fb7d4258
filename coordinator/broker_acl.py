"""Least privilege on the broker: Mosquitto's dynamic-security plugin, driven over MQTT.

The plugin takes JSON commands on `$CONTROL/dynamic-security/v1` and answers, for every client
subscribed, on `.../response`; commands are matched to answers by `correlationData`. Spelling of
the commands and their error strings: plugins/dynamic-security/README.md, clients.c and roles.c
of Mosquitto 2.0.11 (the installed broker).

What it grants (DESIGN §12): a node's client, bound to the client id = its node id, may publish
only on its own `work`/`result`/`status` topics and subscribe only to its own `assign` topic; the
coordinator's client, bound to its client id, may publish and subscribe under its prefix. Nobody
else may use either client id, so no one can take over a persistent session.

Command builders are pure (values in, JSON-able dicts out); `DynamicSecurity` is the thin adapter.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.5

from protocol.topics import Topics

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

# Ids become topic levels and the plugin's ACL topics are matched as subscription filters, so a
# node called `+` or `#` would be granted everyone's topics: allow only plain characters.
# (Node ids are 26 lowercase base32 characters; coordinator client ids are `coord-<16 chars>`.)
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")

Command = dict[str, Any]
Response = dict[str, Any]


class BrokerAclError(RuntimeError):
    """The broker refused an access-control command, our credentials, or did not answer.

    `command` is the plugin's command name ("" for connection problems), `error` the broker's text.
    """

    def __init__(self, command: str, error: str) -> None:
        self.command = command
        self.error = error
        super().__init__(f"dynamic security: {command}: {error}" if command else f"dynamic security: {error}")


# ---- pure: names, ACLs, commands ----------------------------------------------------------------
def plain_id(value: str, what: str) -> str:
    if not _PLAIN_ID.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-128 characters of A-Z a-z 0-9 _ . -")
    return value


def node_role(node_id: str) -> str:
    return f"sc-node-{plain_id(node_id, 'node id')}"


def coordinator_role(username: str) -> str:
    return f"sc-coordinator-{plain_id(username, 'username')}"


def acl(acltype: str, topic: str, *, allow: bool = True) -> Command:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": allow}


def node_acls(node_id: str, prefix: str) -> list[Command]:
    """Publish on its own work/result/status (the last also as its will), subscribe to its own
    assign topic literally: a filter like `<prefix>/assign/+` is not that literal, so it is refused."""
    topics = Topics(prefix)  # validates the prefix: no wildcards, no trailing slash
    plain_id(node_id, "node id")
    return [
        acl("publishClientSend", topics.work(node_id)),
        acl("publishClientSend", topics.result(node_id)),
        acl("publishClientSend", topics.status(node_id)),
        acl("subscribeLiteral", topics.assign(node_id)),
    ]


def coordinator_acls(prefix: str) -> list[Command]:
    everything = f"{Topics(prefix).prefix}/#"
    return [acl("publishClientSend", everything), acl("subscribePattern", everything)]


def upsert_commands(*, rolename: str, acls: Sequence[Command], username: str, password: str,
                    clientid: str) -> list[Command]:
    """Create-or-replace a role and a client holding only that role, as one batch.

    The plugin runs a batch in order and answers each command. `create*` fails with "already
    exists" on a second run, and the `modify*` after it then sets the same state, so the batch is
    idempotent and also repairs drift. modifyClient kicks a connected client with that username,
    so a replaced password takes effect at once (the old session does not linger).
    """
    roles = [{"rolename": rolename, "priority": 0}]
    client = {"username": username, "password": password, "clientid": clientid, "roles": roles}
    return [
        {"command": "createRole", "rolename": rolename, "acls": list(acls)},
        {"command": "modifyRole", "rolename": rolename, "acls": list(acls)},
        {"command": "createClient", **client},
        {"command": "modifyClient", **client},
    ]


def lock_down_commands() -> list[Command]:
    """Whoever lacks a role granting it may neither publish nor subscribe. Receiving stays
    allowed: subscriptions are already filtered, and denying it would also need a receive ACL
    for every topic a role may subscribe to."""
    return [{"command": "setDefaultACLAccess", "acls": [
        {"acltype": "publishClientSend", "allow": False},
        {"acltype": "publishClientReceive", "allow": True},
        {"acltype": "subscribe", "allow": False},
        {"acltype": "unsubscribe", "allow": True},
    ]}]


def check_responses(commands: Sequence[Command], responses: Sequence[Response], *,
                    tolerate: Iterable[str] = ()) -> None:
    """Raise BrokerAclError for the first command the broker refused, unless its error text is
    one of `tolerate` (e.g. "Role already exists" in an idempotent batch)."""
    allowed = set(tolerate)
    for command, response in zip(commands, responses, strict=True):
        error = response.get("error")
        if error is not None and error not in allowed:
            raise BrokerAclError(str(command["command"]), str(error))


def parse_admin(value: str) -> tuple[str, str]:
    """`USER:PASSWORD` (the `--broker-admin` flag, env SPARECYCLES_BROKER_ADMIN) -> (user, password)."""
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("broker admin must look like USER:PASSWORD")
    return user, password


# ---- adapter ------------------------------------------------------------------------------------
class DynamicSecurity:
    """An admin connection to the plugin.

    ```
    async with DynamicSecurity(host, port, username="admin", password=pw) as dynsec:
        await dynsec.lock_down()
        password = await dynsec.provision_node(node_id, prefix)
    ```
    Commands run one batch at a time (a lock), each batch one publish and one wait.
    """

    def __init__(self, host: str, port: int = 1883, *, username: str, password: str,
                 timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self._client = aiomqtt.Client(host, port, username=username, password=password, timeout=timeout)
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> DynamicSecurity:
        try:
            await self._client.__aenter__()
        except MqttConnectError as exc:
            raise BrokerAclError("", f"broker {self.host}:{self.port} refused the admin client: {exc}") from exc
        try:
            granted = await self._client.subscribe(RESPONSE_TOPIC, qos=1)
        except BaseException:
            await self._client.__aexit__(None, None, None)
            raise
        if any(_refused(g) for g in granted):  # a SUBACK failure code, not an exception
            await self._client.__aexit__(None, None, None)
            raise BrokerAclError("", f"the admin client may not subscribe to {RESPONSE_TOPIC}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._client.__aexit__(exc_type, exc, tb)

    async def execute(self, commands: Sequence[Command], *, within: float | None = None) -> list[Response]:
        """Send `commands` as one batch; return the broker's answers in the same order.

        Raises TimeoutError if the broker does not answer every command `within` seconds (a broker
        without the plugin never answers). Errors inside answers are left to the caller.
        """
        tagged = [{**c, "correlationData": secrets.token_hex(8)} for c in commands]
        wanted = {c["correlationData"]: i for i, c in enumerate(tagged)}
        answers: dict[int, Response] = {}
        async with self._lock, asyncio.timeout(self.timeout if within is None else within):
            await self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            async for message in self._client.messages:
                # Other admins' answers arrive on the same topic: keep only ours.
                for response in _responses(message.payload):
                    index = wanted.get(response.get("correlationData"))
                    if index is not None:
                        answers[index] = response
                if len(answers) == len(tagged):
                    break
        return [answers[i] for i in range(len(tagged))]

    async def run(self, commands: Sequence[Command], *, tolerate: Iterable[str] = ()) -> list[Response]:
        """`execute`, then raise BrokerAclError for a refused command or a missing answer."""
        try:
            responses = await self.execute(commands)
        except TimeoutError as exc:
            names = ", ".join(str(c["command"]) for c in commands)
            raise BrokerAclError(names, f"no answer within {self.timeout:g} s "
                                        "(is the dynamic-security plugin loaded?)") from exc
        check_responses(commands, responses, tolerate=tolerate)
        return responses

    async def lock_down(self) -> None:
        await self.run(lock_down_commands())

    async def ensure_coordinator(self, *, username: str, password: str, client_id: str, prefix: str) -> None:
        """The coordinator's client: bound to `client_id`, may publish and subscribe under `prefix/#`.

        Idempotent. Call it before the coordinator connects: it kicks a client already connected
        under `username`, which then reconnects with `password`.
        """
        await self.run(upsert_commands(rolename=coordinator_role(username), acls=coordinator_acls(prefix),
                                       username=username, password=password,
                                       clientid=plain_id(client_id, "client id")),
                       tolerate=_ALREADY_EXISTS)

    async def provision_node(self, node_id: str, prefix: str) -> str:
        """Role `sc-node-<id>` and a client (username = client id = node id) with a fresh random
        password, which is returned. Calling it again replaces the password and disconnects a
        node still logged in with the old one."""
        password = secrets.token_urlsafe(24)
        await self.run(upsert_commands(rolename=node_role(node_id), acls=node_acls(node_id, prefix),
                                       username=node_id, password=password, clientid=node_id),
                       tolerate=_ALREADY_EXISTS)
        return password

    async def remove_node(self, node_id: str) -> None:
        """Delete the node's client (disconnecting it) and its role; a no-op for an unknown node."""
        await self.run([{"command": "deleteClient", "username": plain_id(node_id, "node id")},
                        {"command": "deleteRole", "rolename": node_role(node_id)}],
                       tolerate=("Client not found", "Role not found"))


_ALREADY_EXISTS = ("Role already exists", "Client already exists")


def _refused(granted: object) -> bool:
    # MQTT 3.1.1 answers an int per filter (0x80 = failure); MQTT 5 a ReasonCode (>= 0x80 = failure).
    value = getattr(granted, "value", granted)
    return isinstance(value, int) and value >= 0x80


def _responses(payload: object) -> list[Response]:
    if not isinstance(payload, bytes | bytearray):
        return []
    try:
        tree = json.loads(payload)
    except ValueError:
        return []
    responses = tree.get("responses") if isinstance(tree, dict) else None
    return [r for r in responses if isinstance(r, dict)] if isinstance(responses, list) else []


async def probe_dynamic_security(host: str, port: int, username: str, password: str, *,
                                 within: float = 2.0) -> bool:
    """Does the broker at host:port answer dynamic-security commands for these credentials?

    False when it accepts the connection but never answers (within `within` seconds) (a plain Mosquitto: its topics are
    not access-controlled). Raises BrokerAclError when it refuses the credentials (a broker with
    authentication and wrong admin credentials is a misconfiguration, not an open broker), and
    aiomqtt.MqttError when it cannot be reached.
    """
    async with DynamicSecurity(host, port, username=username, password=password, timeout=within) as dynsec:
        try:
            responses = await dynsec.execute([{"command": "getDefaultACLAccess"}])
        except TimeoutError:
            return False
    return responses[0].get("error") is None
