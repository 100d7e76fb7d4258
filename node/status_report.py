"""`sparecycles node status`: read the local daemon's status document and say, in one screen, what
it is doing and why, what it has done, and (asking its coordinator) what that earned.

Whether a daemon runs is asked of its instance lock (node/instance.py), not of the PID in the
document: a PID can be reused by an unrelated process once the daemon dies, a lock cannot outlive
its holder. Only when the lock file cannot be read (another user's daemon) is the PID checked.

Exit codes: 0 running and healthy (working, waiting or suspended); 1 running but not healthy
(starting, cannot reach its broker, refused, draining, or no longer updating its status);
2 bad usage or configuration; 3 not running (as LSB's `status` action says it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from protocol.cliparse import OneLineParser

from . import config, instance
from .status import FRESH_SECONDS, HEALTHY, NodeState, status_path

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
HTTP_TIMEOUT = 3.0
STARTING_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Verdict:
    running: bool
    healthy: bool
    headline: str
    code: int


def _age(doc: Mapping[str, Any], field: str, now: float) -> float | None:
    try:
        return now - datetime.fromisoformat(str(doc[field])).timestamp()
    except (KeyError, ValueError):
        return None


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe(doc: Mapping[str, Any], now: float) -> str:
    """The state and why, as the document's author saw it: "working: 2 of 2 slots busy"."""
    state, reason = str(doc.get("state", "?")), str(doc.get("reason", ""))
    match state:
        case NodeState.WORKING:
            return f"working: {doc.get('slots_busy', 0)} of {doc.get('slots', 0)} slots busy"
        case NodeState.UNREACHABLE:
            return reason or "cannot reach the broker"
        case NodeState.STARTING:
            since = _age(doc, "since", now)
            if since is not None and since > STARTING_GRACE:  # e.g. the coordinator does not answer
                return f"starting: {reason} for {ago(since)}; is it running and reachable?"
            return f"starting: {reason}"
        case _:
            return f"{state}: {reason}" if reason else state


def judge(doc: Mapping[str, Any] | None, *, held: bool | None, pid_alive: bool | None, key: Path,
          now: float) -> Verdict:
    """Pure: the verdict from the document (None: none found), whether the key's lock is held
    (None: unknown) and whether the document's PID is alive (None: not checked)."""
    running = held if held is not None else bool(pid_alive)
    if doc is None:
        if running:
            return Verdict(True, False, "running, but it has written no status yet", EXIT_UNHEALTHY)
        return Verdict(False, False, f"not running (no daemon for key {key})", EXIT_NOT_RUNNING)
    state = str(doc.get("state"))
    if not running:
        updated = _age(doc, "updated_at", now)
        when = f" {ago(updated)} ago" if updated is not None else ""
        if state == NodeState.STOPPED:
            return Verdict(False, False, f"not running (stopped{when})", EXIT_NOT_RUNNING)
        if state == NodeState.REFUSED:
            return Verdict(False, False, f"not running: refused{when}: {doc.get('reason', '')}", EXIT_NOT_RUNNING)
        return Verdict(False, False, f"not running (the daemon died{when}, last {describe(doc, now)})",
                       EXIT_NOT_RUNNING)
    updated = _age(doc, "updated_at", now)
    if updated is None or updated > FRESH_SECONDS:
        shown = "never" if updated is None else f"{ago(updated)} ago"
        return Verdict(True, False, f"not responding: pid {doc.get('pid')} runs but last updated its status {shown}",
                       EXIT_UNHEALTHY)
    healthy = state in HEALTHY
    return Verdict(True, healthy, describe(doc, now), EXIT_HEALTHY if healthy else EXIT_UNHEALTHY)


def read_document(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def pid_alive(pid: object) -> bool | None:
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read(1 << 22))
    except urllib.error.HTTPError as exc:
        return exc.code, None


def ledger_view(coordinator: str, node: str) -> dict[str, Any]:
    """What the coordinator says this node earned: accepted tasks and credit from its ledger (the
    node's credits, less clawbacks), rejected results from its trust record. Public reads."""
    base = coordinator.rstrip("/")
    quoted = urllib.parse.quote(node, safe="")
    try:
        status, ledger = _get_json(f"{base}/v1/ledger/nodes/{quoted}")
        if status == 404:
            ledger = {"credits": 0, "entries": []}  # no credit yet
        elif status != 200 or not isinstance(ledger, dict):
            return {"error": f"the coordinator's ledger answered HTTP {status}"}
        status, trust = _get_json(f"{base}/v1/nodes/{quoted}/trust")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"error": f"cannot reach the coordinator at {coordinator}: {reason}"}
    kinds = [e.get("kind") for e in ledger.get("entries", []) if isinstance(e, dict)]
    record = trust.get("record") if status == 200 and isinstance(trust, dict) else None
    return {"accepted": kinds.count("credit") - kinds.count("clawback"),
            "rejected": record.get("invalid", 0) if isinstance(record, dict) else (0 if status == 200 else None),
            "credit": ledger.get("credits", 0)}


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "kB", "MB"):
        if x < 1000:
            return f"{x:.0f} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1000
    return f"{x:.1f} GB"


def render(doc: Mapping[str, Any] | None, verdict: Verdict, ledger: Mapping[str, Any] | None, now: float) -> str:
    if doc is None:
        return verdict.headline
    node = str(doc.get("node") or "?")
    short = node[:12] + "…" if len(node) > 12 else node
    lines = [f"node {short} (owner {doc.get('owner', '?')}) — {verdict.headline}"]
    since = _age(doc, "since", now)
    if since is not None:
        lines.append(f"  since        {doc['since']} ({ago(since)} ago)")
    updated = _age(doc, "updated_at", now)
    lines.append(f"  daemon       pid {doc.get('pid')}, status written {ago(updated or 0)} ago, "
                 f"{doc.get('slots', 0)} slots, {doc.get('held', 0)} tasks held")
    lines.append(f"  broker       {doc.get('broker', '?')}")
    lines.append(f"  coordinator  {doc.get('coordinator', '?')}")
    tasks = doc.get("tasks") or {}
    lines.append(f"  tasks        {tasks.get('done', 0)} done, {tasks.get('failed', 0)} failed, "
                 f"{tasks.get('released', 0)} handed back (since the daemon started)")
    if ledger is not None and "error" not in ledger:
        lines.append(f"  coordinator  {ledger['accepted']} accepted, "
                     f"{'?' if ledger['rejected'] is None else ledger['rejected']} rejected, "
                     f"credit earned {ledger['credit']}")
    elif ledger is not None:
        lines.append(f"  credit       unknown: {ledger['error']}")
    models = doc.get("models") or {}
    lines.append(f"  models       {models.get('count', 0)} cached, {_size(int(models.get('bytes', 0)))}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="sparecycles node status",
        description="What the node daemon running with this key is doing, and why.",
        epilog="exit codes: 0 running and healthy (working, waiting, suspended); 1 running but not healthy; "
               "2 usage or configuration error; 3 not running")
    p.add_argument("--config", type=Path, default=None, metavar="PATH",
                   help="the daemon's config file, to find its key (default: as the daemon)")
    p.add_argument("--key", type=Path, default=None, metavar="PATH", help="the daemon's node key")
    p.add_argument("--json", action="store_true", help="print the status document, with 'running' and 'healthy'")
    p.add_argument("--offline", action="store_true", help="do not ask the coordinator for credit")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        key = config.load({"config": args.config, "key": args.key}, os.environ).settings.key_path
    except config.ConfigError as exc:
        print(f"sparecycles node status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    doc = read_document(status_path(key))
    probe = instance.holder(key)
    held = None if probe is None else probe[0]
    verdict = judge(doc, held=held, pid_alive=pid_alive(doc.get("pid")) if doc else None, key=key, now=now)
    ledger = None
    if doc is not None and doc.get("node") and doc.get("coordinator") and not args.offline:
        ledger = ledger_view(str(doc["coordinator"]), str(doc["node"]))
    if args.json:
        out = dict(doc or {"key": str(key)})
        out.update(running=verdict.running, healthy=verdict.healthy, summary=verdict.headline)
        tasks = dict(out.get("tasks") or {})
        tasks.update(accepted=None, rejected=None)
        if ledger is not None and "error" not in ledger:
            tasks.update(accepted=ledger["accepted"], rejected=ledger["rejected"])
        out.update(tasks=tasks, credit=None if not ledger or "error" in ledger else ledger["credit"],
                   coordinator_error=ledger.get("error") if ledger else None)
        print(json.dumps(out, indent=2))
    else:
        print(render(doc, verdict, ledger, now))
    return verdict.code
