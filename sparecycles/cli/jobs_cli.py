"""`sparecycles jobs`, `cancel`, `outputs`, `nodes`, and how `status` and `submit` show why a job
is not moving and when it should be done. The runner (`run`) comes from main.py, which turns
client errors into exit codes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from sparecycles.sdk import Client

from .tables import print_table

Runner = Callable[[Callable[[Client], Awaitable[Any]]], Any]
AddCoordinator = Callable[[argparse.ArgumentParser], None]
AddKey = Callable[[argparse.ArgumentParser], None]


def add_parsers(sub: Any, add_coordinator: AddCoordinator, add_key: AddKey) -> None:
    jobs = sub.add_parser("jobs", help="list jobs with their state and progress",
                          description="Your jobs (signed with your key), newest first; with --all, every job's "
                                      "public summary on the coordinator.")
    jobs.add_argument("--state", choices=["running", "done", "failed", "all"], default="all",
                      help="only jobs in this state (default: all)")
    jobs.add_argument("--limit", type=int, default=50, metavar="N", help="at most N jobs (1..500, default 50)")
    jobs.add_argument("--all", dest="everyone", action="store_true",
                      help="every account's jobs, as public summaries (unsigned)")
    jobs.add_argument("--json", action="store_true", help="print the coordinator's JSON")
    add_coordinator(jobs)
    add_key(jobs)

    cancel = sub.add_parser("cancel", help="cancel one of your running jobs",
                            description="Fail the job's open tasks now; verified tasks stay paid for, the rest of "
                                        "the credit reserved for it is released.")
    cancel.add_argument("job", metavar="JOB", help="the job id (submit and `sparecycles jobs` print it)")
    add_coordinator(cancel)
    add_key(cancel)

    outputs = sub.add_parser("outputs", help="download a finished job's outputs again",
                             description="Write a done job's outputs (one array per ONNX output name, rows in "
                                         "input order) to -o.")
    outputs.add_argument("job", metavar="JOB", help="the job id")
    outputs.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="where to write the outputs")
    outputs.add_argument("--token", default=None, metavar="READ_TOKEN",
                         help="the job's read token (from submit), instead of the submitter's key")
    add_coordinator(outputs)
    add_key(outputs)

    nodes = sub.add_parser("nodes", help="nodes online: owner, slots, state, speed, trust, last seen")
    nodes.add_argument("--json", action="store_true", help="print the coordinator's JSON")
    add_coordinator(nodes)


def cmd_jobs(args: argparse.Namespace, run: Runner) -> list[dict[str, Any]]:
    return list(run(lambda c: c.jobs(state=args.state, limit=args.limit)))


def print_jobs(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"jobs": rows}))
        return
    table = []
    for j in rows:
        t = j.get("tasks") or {}
        total = int(t.get("total") or 0)
        verified = int(t.get("verified") or 0)
        percent = f"{100 * verified // total}%" if total else "-"
        table.append([j.get("job"), j.get("state"), f"{verified}/{total}", percent, int(t.get("failed") or 0),
                      j.get("submitter") or "", j.get("created_at_iso") or "", eta_text(j.get("eta_seconds")),
                      j.get("why") or ""])
    print_table("jobs", ["job", "state", "verified", "done", "failed", "submitter", "created", "eta", "why"], table)


def print_nodes(rows: list[dict[str, Any]], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"nodes": rows}))
        return
    table = []
    for n in rows:
        trust = n.get("trust") or {}
        speed = n.get("speed")
        table.append([n.get("node"), n.get("owner"), n.get("slots"), n.get("state"),
                      "-" if speed is None else f"{speed:g} {n.get('speed_unit', 'tasks/s')}",
                      f"{trust.get('level')} ({trust.get('score')})", n.get("last_seen_iso") or "-"])
    print_table("nodes", ["node", "owner", "slots", "state", "speed", "trust", "last seen"], table)


def eta_text(eta: Any) -> str:
    if not isinstance(eta, int | float):
        return "unknown"
    seconds = round(eta)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def write_outputs(path: Path, data: bytes, fail: Callable[[str], Exception]) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise fail(f"cannot write {path}: {exc.strerror or exc}") from None


class StallReporter:
    """Wraps a progress callback: when the job's counts have not moved for `after` updates (the
    stream repeats on "why" changes) or the job waits, print its "why" once per new reason."""

    def __init__(self, inner: Callable[[dict[str, Any]], None], *, stream: TextIO | None = None) -> None:
        self.inner = inner
        self.stream = stream if stream is not None else sys.stderr
        self._said: str | None = None

    def __call__(self, doc: dict[str, Any]) -> None:
        self.inner(doc)
        why = doc.get("why")
        if doc.get("state") == "running" and isinstance(why, str) and not why.startswith("running") \
                and why != self._said:
            print(f"  {why}", file=self.stream, flush=True)
            self._said = why
