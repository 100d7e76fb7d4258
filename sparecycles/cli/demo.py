"""`sparecycles demo`: a whole network on this machine, a real job through it, and what it measured.

Starts an MQTT broker (the embedded one unless `--broker` is given), a coordinator on a temporary
SQLite file and N node daemons of N different owners; runs scikit-learn's 1,797 digits through an
MLP on them with every task verified by k nodes; checks the answer against a local onnxruntime run
and the true labels; prints the ledger; stops exactly the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from protocol.cliparse import OneLineParser
from protocol.signing import Identity
from sparecycles.errors import SparecyclesError
from sparecycles.progress import ProgressReporter
from sparecycles.sdk import Client

from .accounts import ensure_account
from .processes import ManagedProcess, ProcessError, ProcessGroup, free_port
from .workloads import Workload, accuracy, digits_mlp, missing_demo_extra, predicted_labels, run_onnx

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
WATCH_SECONDS = 0.5
# The network runs each task as one batch while the local check runs all rows at once; batching
# moves a probability by up to ~5.5e-3 on a real classifier (DESIGN §4), so allow a little more.
MAX_PROBABILITY_DIFF = 1e-2
MIN_LABEL_AGREEMENT = 0.99
MIN_ACCURACY = 0.9


class DemoFailed(Exception):
    """A step failed; the message says which and, where a process is to blame, shows its log."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSettings:
    broker: str | None = None
    nodes: int = 2
    replicas: int = 2
    task_size: int = 64
    keep_dir: bool = False
    timeout: float = 600.0
    seed: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class JobReport:
    job: str
    status: dict[str, Any]
    outputs: dict[str, np.ndarray]
    balances: dict[str, Any]
    seconds: float


def say(message: str) -> None:
    print(message, flush=True)


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sparecycles demo", description=__doc__.splitlines()[0])
    parser.add_argument("--broker", metavar="mqtt://HOST:PORT",
                        help="use this MQTT broker (default: start the embedded one on a free port)")
    parser.add_argument("--nodes", type=_at_least(2), default=max(2, os.cpu_count() or 2),
                        help="node daemons to start, each with its own owner (default: one per core, min 2)")
    parser.add_argument("--replicas", type=_at_least(1), default=2, help="nodes that must agree per task (2)")
    parser.add_argument("--task-size", type=_at_least(1), default=64, help="rows per task (64)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the job (600)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the digits model (0)")
    parser.add_argument("--keep-dir", action="store_true", help="keep the working directory (logs, database)")
    return parser


def parse_settings(argv: list[str] | None) -> DemoSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replicas > args.nodes:
        parser.error(f"--replicas {args.replicas} needs at least as many --nodes (of distinct owners)")
    return DemoSettings(
        broker=args.broker, nodes=args.nodes, replicas=args.replicas, task_size=args.task_size,
        keep_dir=args.keep_dir, timeout=args.timeout, seed=args.seed,
    )


# -- processes -------------------------------------------------------------------------------------


def start_broker(group: ProcessGroup) -> str:
    say("[1/6] starting the embedded MQTT broker (amqtt, pure Python) on a free port")
    # Port 0 and the URL read back from the ready line: no window for another program to take it.
    broker = group.start("sparecycles.cli.broker", ["--listen", "127.0.0.1:0"], name="broker")
    url = broker.wait_for_line(r"broker ready (mqtt://\S+)", READY_TIMEOUT).group(1)
    say(f"      broker ready at {url} (pid {broker.pid})")
    return url


def use_broker(url: str) -> str:
    """Check a given broker answers on TCP first: otherwise the coordinator and nodes would only
    retry quietly and the demo would fail a minute later on a ready timeout."""
    say(f"[1/6] using the MQTT broker at {url}")
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise DemoFailed(f"--broker {url!r} is not mqtt://HOST:PORT")
    try:
        with socket.create_connection((parts.hostname, parts.port or 1883), timeout=5):
            pass
    except OSError as exc:
        raise DemoFailed(f"cannot reach the MQTT broker at {url} ({exc}); start one, "
                         "or leave out --broker to use the embedded broker") from None
    return url


def start_coordinator(group: ProcessGroup, broker_url: str, workdir: Path, replicas: int) -> str:
    port = free_port()
    db = workdir / "ledger.db"
    say(f"[2/6] starting the coordinator (SQLite ledger {db})")
    coordinator = group.start(
        "coordinator",
        ["--broker", broker_url, "--db", f"sqlite:///{db}", "--http", f"127.0.0.1:{port}",
         "--replicas", str(replicas)],
        name="coordinator",
    )
    url = coordinator.wait_for_line(r"coordinator ready (http://\S+)", READY_TIMEOUT).group(1)
    say(f"      coordinator ready at {url} (pid {coordinator.pid})")
    return url


def start_nodes(group: ProcessGroup, count: int, broker_url: str, coordinator_url: str,
                workdir: Path) -> list[ManagedProcess]:
    say(f"[3/6] starting {count} node daemons, owners volunteer-1..volunteer-{count}, one slot each")
    return [
        group.start(
            "node",
            ["--broker", broker_url, "--coordinator", coordinator_url,
             "--key", str(workdir / f"node-{i}.key"), "--owner", f"volunteer-{i}", "--slots", "1",
             "--cache-dir", str(workdir / f"cache-{i}"), "--drain-seconds", "5",
             # one machine runs the whole network: the other daemons must not count as its owner's work
             "--idle-only", "false"],
            name=f"node-{i}",
        )
        for i in range(1, count + 1)
    ]


def wait_for_nodes(nodes: list[ManagedProcess]) -> None:
    for node in nodes:
        line = node.wait_for_line(r"node ready (.*)$", READY_TIMEOUT).group(1)
        say(f"      {node.name} ready: {line} (pid {node.pid})")


def build_workload(seed: int) -> Workload:
    say("[4/6] building the workload: scikit-learn's bundled digits through an MLP converted to ONNX")
    started = time.monotonic()
    workload = digits_mlp(seed)
    how = "loaded from cache" if workload.cached else "trained and converted"
    say(f"      {workload.description}")
    say(f"      model {len(workload.model) / 1024:.0f} KiB, {how} in {time.monotonic() - started:.1f} s")
    return workload


async def watch(group: ProcessGroup, replicas: int) -> None:
    """Fail the demo as soon as the broker or coordinator dies, or too few nodes remain to agree."""
    while True:
        for proc in group.processes:
            if proc.module != "node" and not proc.running():
                raise DemoFailed(f"{proc.name} exited with code {proc.returncode} while the job ran\n"
                                 f"--- last lines of {proc.name}'s log ---\n{proc.log_tail()}")
        dead = [p for p in group.processes if p.module == "node" and not p.running()]
        alive = sum(1 for p in group.processes if p.module == "node") - len(dead)
        if alive < replicas:
            tails = "\n".join(f"--- last lines of {p.name}'s log ---\n{p.log_tail(20)}" for p in dead)
            raise DemoFailed(f"only {alive} nodes left, fewer than the {replicas} each task needs\n{tails}")
        await asyncio.sleep(WATCH_SECONDS)


# -- the job ---------------------------------------------------------------------------------------


async def run_job(url: str, workload: Workload, settings: DemoSettings, key: Path) -> JobReport:
    # The demo's submitter is an account like any other: a key of its own, registered on first use,
    # paying for the job out of the open coordinator's starting grant.
    async with Client(url, identity=Identity.load_or_create(key)) as client:
        await ensure_account(client, "demo-submitter")
        digest = await client.ensure_model(workload.model)
        say(f"[5/6] submitting {workload.rows} rows (model sha256 {digest[:12]}…) in tasks of "
            f"{settings.task_size} rows, each verified by {settings.replicas} nodes of different owners")
        started = time.monotonic()
        job = await client.submit(digest, workload.inputs, replicas=settings.replicas,
                                  task_size=settings.task_size)
        job_id = str(job["job"])
        say(f"      job {job_id}: {job['rows']} rows in {job['tasks']} tasks")
        with ProgressReporter(job_id) as report:
            status = await client.wait(job_id, on_progress=report, timeout=settings.timeout)
        seconds = time.monotonic() - started
        return JobReport(job=job_id, status=status, outputs=await client.outputs(job_id),
                         balances=await client.balances(), seconds=seconds)


async def run_job_watched(
    group: ProcessGroup, url: str, workload: Workload, settings: DemoSettings, key: Path
) -> JobReport:
    async with asyncio.TaskGroup() as tasks:
        watcher = tasks.create_task(watch(group, settings.replicas))
        job = tasks.create_task(run_job(url, workload, settings, key))
        await asyncio.wait([job], return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
    return job.result()


def check_outputs(workload: Workload, report: JobReport) -> None:
    say("[6/6] checking the network's outputs against a local onnxruntime run and the true labels")
    local = run_onnx(workload.model, workload.inputs)
    missing = sorted(set(local) - set(report.outputs))
    if missing:
        raise DemoFailed(f"the job's outputs lack {missing}; it returned {sorted(report.outputs)}")
    for name, expected in local.items():
        got = report.outputs[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise DemoFailed(f"output {name!r} is {got.dtype}{list(got.shape)}, "
                             f"a local run gives {expected.dtype}{list(expected.shape)}")
    same = int(np.sum(predicted_labels(report.outputs) == predicted_labels(local)))
    diff = float(np.max(np.abs(report.outputs["probabilities"] - local["probabilities"])))
    tasks = report.status.get("tasks") or {}
    k = report.status.get("replicas", "?")
    overall = accuracy(report.outputs, workload.labels)
    held_out = accuracy(report.outputs, workload.labels, workload.held_out)

    say("")
    say(f"  rows                 {workload.rows}")
    say(f"  tasks verified       {tasks.get('verified')}/{tasks.get('total')} "
        f"({tasks.get('failed')} failed), each by {k} nodes of distinct owners")
    say(f"  wall time            {report.seconds:.2f} s (submit to done)")
    say(f"  throughput           {workload.rows / report.seconds:,.0f} rows/s verified")
    say(f"  agreement with local {same}/{workload.rows} labels identical, "
        f"probabilities max |diff| {diff:.1e}")
    say(f"  accuracy             {overall:.2%} on all rows, {held_out:.2%} on the "
        f"{len(workload.held_out)} rows held out of training")
    say("")
    if same < MIN_LABEL_AGREEMENT * workload.rows or diff > MAX_PROBABILITY_DIFF:
        raise DemoFailed(f"the network's answer differs from a local run: {same}/{workload.rows} labels "
                         f"agree, probabilities differ by up to {diff:.1e}")
    if held_out < MIN_ACCURACY:
        raise DemoFailed(f"held-out accuracy {held_out:.2%} is below {MIN_ACCURACY:.0%}")


def print_balances(balances: dict[str, Any]) -> None:
    nodes = sorted(balances.get("nodes") or [], key=lambda n: str(n.get("owner")))
    rows = [(str(n.get("node")), str(n.get("owner")), f"{float(n.get('credits') or 0):.6g}",
             str(n.get("entries"))) for n in nodes]
    credits = float(balances.get("total_credits") or 0)
    total = f"{credits:.6g} credits in {balances.get('entries')} ledger entries"
    headers = ("node", "owner", "credits", "entries")
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="ledger balances", caption=total, title_justify="left")
        for header in headers:
            table.add_column(header, justify="right" if header in ("credits", "entries") else "left")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)] if rows else None
    say("ledger balances")
    if widths is None:
        say("  (no credits yet)")
    else:
        numeric = (False, False, True, True)
        for row in [headers, *rows]:
            aligned = zip(row, widths, numeric, strict=True)
            cells = (c.rjust(w) if num else c.ljust(w) for c, w, num in aligned)
            say("  " + "  ".join(cells).rstrip())
    say(f"  total: {total}")


# -- entry point -----------------------------------------------------------------------------------


def run(settings: DemoSettings, workdir: Path) -> None:
    with ProcessGroup(workdir / "logs") as group:
        try:
            broker_url = use_broker(settings.broker) if settings.broker else start_broker(group)
            coordinator_url = start_coordinator(group, broker_url, workdir, settings.replicas)
            nodes = start_nodes(group, settings.nodes, broker_url, coordinator_url, workdir)
            workload = build_workload(settings.seed)  # trains while the nodes start up
            wait_for_nodes(nodes)
            report = asyncio.run(run_job_watched(group, coordinator_url, workload, settings,
                                                 workdir / "submitter.key"))
            check_outputs(workload, report)
            print_balances(report.balances)
        finally:
            if group.processes:
                say(f"stopping the {len(group.processes)} processes this demo started (SIGTERM, by PID)")
                report_stops(group.stop_all(STOP_TIMEOUT))


def report_stops(codes: dict[str, int]) -> None:
    killed = [name for name, code in codes.items() if code == -signal.SIGKILL]
    failed = {name: code for name, code in codes.items() if code != 0 and name not in killed}
    if killed:
        say(f"      needed SIGKILL after {STOP_TIMEOUT:g} s: {', '.join(killed)}")
    if failed:
        say(f"      exited with errors: {', '.join(f'{n} ({c})' for n, c in failed.items())}")
    if not killed and not failed:
        say("      all stopped cleanly")


def _unwrap(exc: BaseException) -> BaseException:
    """The first real error inside a TaskGroup's ExceptionGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    missing = missing_demo_extra()
    if missing:  # before any process starts: a plain `pip install sparecycles` has no scikit-learn
        print(f"sparecycles demo needs {' and '.join(missing)}, which plain `pip install sparecycles` leaves out: "
              "pip install 'sparecycles[demo]'", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="sparecycles-demo-"))
    say(f"sparecycles demo: {settings.nodes} nodes, k={settings.replicas}, working directory {workdir}")
    failed = True
    try:
        run(settings, workdir)
        failed = False
    except KeyboardInterrupt:
        print("demo interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except BaseException as raised:  # the expected kinds are reported (exit 1), the rest re-raised
        exc = _unwrap(raised)
        if not isinstance(exc, DemoFailed | ProcessError | SparecyclesError):
            raise
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if settings.keep_dir or failed:
            print(f"logs and database kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("demo finished: the network's answers were verified, checked and credited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
