"""Account commands: keys, certificates for nodes, registration, and the operator's tools.

    sparecycles key PATH                          # a key's id and public key (created 0600 if absent)
    sparecycles owner certify NODE [-o FILE]      # the owner's certificate for a node key
    sparecycles account register NAME [--invite T]
    sparecycles account show
    sparecycles admin accounts|add|block|unblock|grant|invite --key OPERATOR_KEY
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.certs import issue_certificate
from protocol.cliparse import OneLineParser
from protocol.errors import LocalError, ProtocolError
from protocol.signing import Identity

from ..errors import AuthenticationFailed, RequestRejected
from ..identity import default_key_path, load_or_create_key
from ..sdk import Client

DAY = 24 * 3600.0


def add_parsers(sub: argparse._SubParsersAction[OneLineParser],
                add_coordinator: Callable[[argparse.ArgumentParser], None]) -> None:
    key = sub.add_parser("key", help="show a key file's id and public key (creating the key if absent)")
    key.add_argument("path", metavar="PATH", type=Path, help="an Ed25519 key file (node, owner or account)")
    key.add_argument("--json", action="store_true", help="print JSON")

    owner = sub.add_parser("owner", help="certify nodes as yours")
    owner_sub = owner.add_subparsers(dest="owner_command", metavar="OWNER_COMMAND")
    certify = owner_sub.add_parser(
        "certify", help="sign a certificate saying a node key acts for your account",
        description="Write a certificate, signed by your account key, that NODE acts for you. Start the node "
        "with --cert FILE; it needs no copy of your key.")
    certify.add_argument("node", metavar="NODE", help="the node's public key (64 hex) or its key file")
    certify.add_argument("--key", type=Path, default=None, metavar="PATH",
                         help=f"your account key (default {default_key_path()})")
    certify.add_argument("--days", type=float, default=365.0, help="validity in days (default %(default)s)")
    certify.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                         help="where to write it (default: standard output)")

    account = sub.add_parser("account", help="your account on a coordinator")
    account_sub = account.add_subparsers(dest="account_command", metavar="ACCOUNT_COMMAND")
    register = account_sub.add_parser("register", help="register your key under a name")
    register.add_argument("name", metavar="NAME")
    register.add_argument("--invite", default=None, metavar="TOKEN", help="an invite from the operator")
    show = account_sub.add_parser("show", help="your balance, reservations, quota use and nodes")
    for p in (register, show):
        p.add_argument("--key", type=Path, default=None, metavar="PATH",
                       help=f"your account key (default {default_key_path()})")
        add_coordinator(p)
        p.add_argument("--json", action="store_true", help="print the coordinator's JSON")

    admin = sub.add_parser("admin", help="operator commands: accounts, blocking, grants, invites")
    admin_sub = admin.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND")
    listing = admin_sub.add_parser("accounts", help="every account with its balance and nodes")
    add = admin_sub.add_parser("add", help="add an account (any registration policy)")
    add.add_argument("name", metavar="NAME")
    add.add_argument("public_key", metavar="PUBKEY", help="the account's public key, 64 hex")
    add.add_argument("--operator", action="store_true", help="the account may run these commands too")
    block = admin_sub.add_parser("block", help="block an account: its nodes stop earning, it stops submitting")
    block.add_argument("name", metavar="NAME")
    unblock = admin_sub.add_parser("unblock", help="lift a block")
    unblock.add_argument("name", metavar="NAME")
    grant = admin_sub.add_parser("grant", help="grant credit: the only way credit is created")
    grant.add_argument("name", metavar="NAME")
    grant.add_argument("amount", type=int, metavar="CREDITS")
    grant.add_argument("--memo", default="operator grant")
    invite = admin_sub.add_parser("invite", help="issue a one-time registration token")
    for p in (listing, add, block, unblock, grant, invite):
        p.add_argument("--key", type=Path, required=True, metavar="PATH",
                       help="an operator's key (the coordinator's own key file, beside its database, is one)")
        add_coordinator(p)
        p.add_argument("--json", action="store_true", help="print the coordinator's JSON")


def cmd_key(args: argparse.Namespace) -> int:
    existed = args.path.exists()
    identity = _load(args.path)
    if args.json:
        print(json.dumps({"id": identity.id, "public_key": identity.public_key.hex(), "path": str(args.path)}))
    else:
        print(f"{'' if existed else 'created '}{args.path}\n  id          {identity.id}\n"
              f"  public key  {identity.public_key.hex()}")
    return 0


def cmd_certify(args: argparse.Namespace, fail: Callable[[str], Exception]) -> int:
    node_public_key = _node_public_key(args.node, fail)
    if not args.days > 0:
        raise fail("--days must be positive")
    owner = _load(args.key or default_key_path())
    cert = issue_certificate(owner, node_public_key, now=time.time(), valid_seconds=args.days * DAY)
    text = cert.to_text()
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n")
        print(f"certificate for node {cert.node_id} by account {owner.id}, valid {args.days:g} days -> "
              f"{args.output}", file=sys.stderr)
    return 0


def _node_public_key(value: str, fail: Callable[[str], Exception]) -> bytes:
    if len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    path = Path(value).expanduser()
    if path.is_file():
        return _load(path, create=False).public_key
    raise fail(f"{value!r} is neither a 64-hex public key nor a key file; `sparecycles key NODE_KEY_FILE` shows it")


def _load(path: Path, *, create: bool = True) -> Identity:
    try:
        if not create and not path.exists():
            raise LocalError(f"key file {path} does not exist")
        return load_or_create_key(path)
    except (LocalError, ProtocolError, OSError) as exc:
        raise SystemExit(f"sparecycles: {exc}") from None


def default_account_name() -> str:
    """The login name, made a valid account name (letters, digits, '.', '_', '-')."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = "user"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", user).lstrip("._-")[:40]
    return name or "user"


async def ensure_account(client: Client, name: str | None) -> dict[str, Any]:
    """The client's account, registered on first use: under `name`, or the login name (with the key's
    id appended if another key already has it: two people on one coordinator may share a login name)."""
    try:
        return await client.me()
    except AuthenticationFailed:
        pass  # not registered yet (a blocked account gets 409 from register below, with the reason)
    wanted = name or default_account_name()
    try:
        return await client.register(wanted)
    except RequestRejected as exc:
        if exc.status != 409 or name is not None or client.identity is None:
            raise
        return await client.register(f"{wanted}-{client.identity.id[:6]}")


async def account_action(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    if args.account_command == "register":
        return await client.register(args.name, invite=args.invite)
    return await client.me()


async def admin_action(args: argparse.Namespace, client: Client) -> dict[str, Any]:
    command = args.admin_command
    if command == "accounts":
        return await client.admin_accounts()
    if command == "add":
        return await client.admin_add(args.name, args.public_key, operator=args.operator)
    if command in ("block", "unblock"):
        return await client.admin_block(args.name, blocked=command == "block")
    if command == "grant":
        return await client.admin_grant(args.name, args.amount, memo=args.memo)
    return await client.admin_invite()


def print_account(answer: dict[str, Any]) -> None:
    print(f"account {answer.get('name')} ({answer.get('account')})"
          + ("  BLOCKED" if answer.get("blocked") else ""))
    print(f"  balance    {answer.get('balance')} credits ({answer.get('reserved')} reserved by running jobs, "
          f"{answer.get('available')} available)")
    if "open_jobs" in answer:
        print(f"  jobs       {answer.get('open_jobs')} open, {answer.get('stored_bytes')} bytes stored")
    for node in answer.get("nodes") or []:
        print(f"  node       {node.get('node')} certified until {_iso(node.get('expires_at'))}")


def print_admin(command: str, answer: dict[str, Any]) -> None:
    if command == "accounts":
        print(f"registration: {answer.get('registration')}")
        for a in answer.get("accounts") or []:
            flags = "".join((" blocked" if a.get("blocked") else "", " operator" if a.get("operator") else ""))
            print(f"  {a.get('name'):<24} {a.get('balance'):>16} credits  {a.get('nodes')} nodes  "
                  f"{a.get('open_jobs')} open jobs{flags}")
        return
    if command == "invite":
        print(answer.get("invite"))
        return
    if command == "grant":
        print(f"granted {answer.get('granted')} credits to {answer.get('account')}: balance {answer.get('balance')}")
        return
    print(f"{answer.get('name')}: {'blocked' if answer.get('blocked') else 'active'}"
          + (" operator" if answer.get("operator") else ""))


def _iso(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "?"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
