"""`sparecycles`: the one console script.

Process commands (coordinator, node, broker, demo) hand their arguments untouched to their own
entry points, so `sparecycles coordinator --help` shows the coordinator's options. Client
commands (submit, status, trust, ledger) talk to a coordinator's HTTP API through `client.sdk`.

Exit codes: 0 success; 1 the job failed, the ledger does not verify, or the coordinator refused;
2 bad usage or unreadable input files; 3 the coordinator cannot be reached; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from protocol.cliparse import OneLineParser, positive_int
from protocol.signing import Identity
from sparecycles.errors import (
    BadNpz,
    CoordinatorUnavailable,
    JobFailed,
    RequestRejected,
    SparecyclesError,
    WaitTimeout,
)
from sparecycles.identity import default_key_path, load_or_create_key
from sparecycles.npz import from_npz, to_npz
from sparecycles.progress import ProgressReporter
from sparecycles.sdk import Client

from . import accounts as accounts_cli
from . import jobs_cli, ledger_cli

ENV_COORDINATOR = "SPARECYCLES_COORDINATOR"
DEFAULT_COORDINATOR = "http://127.0.0.1:8080"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

# command -> (module whose `main(argv)` runs it, one-line help)
FORWARDED: dict[str, tuple[str, str]] = {
    "coordinator": ("coordinator.__main__", "run a coordinator (HTTP API + MQTT); --help lists its options"),
    "node": ("node.__main__", "run a volunteer node daemon; --help lists its options"),
    "broker": ("sparecycles.cli.broker", "run the embedded MQTT broker (demo and tests; use Mosquitto in production)"),
    "demo": ("sparecycles.cli.demo", "run broker, coordinator and nodes on this machine and submit a real job"),
}
MAX_FAILURES_SHOWN = 20

T = TypeVar("T")


class CliExit(Exception):
    """Stop with `code`, after printing `message` (what went wrong and what to do) to stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- parser ----------------------------------------------------------------------------------------


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return x


def _add_coordinator(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(ENV_COORDINATOR) or DEFAULT_COORDINATOR
    parser.add_argument(
        "--coordinator", metavar="URL", default=default,
        help=f"coordinator HTTP address (default: ${ENV_COORDINATOR}, else {DEFAULT_COORDINATOR})",
    )


def _version() -> str:
    from sparecycles import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sparecycles",
        description="Verified ONNX inference on volunteer CPUs: run the services, submit jobs, "
        "check the ledger.",
        epilog="exit codes: 0 ok, 1 job failed / ledger mismatch / request refused, 2 usage or input error, "
        "3 coordinator unreachable",
    )
    parser.add_argument("--version", action="version", version=f"sparecycles {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, (_module, help_text) in FORWARDED.items():
        # No option prefixes and no -h: every argument, --help included, goes to the real entry point.
        fwd = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\x00")
        fwd.add_argument("args", nargs=argparse.REMAINDER)

    submit = sub.add_parser(
        "submit", help="run a model over the rows of an .npz and save the outputs",
        description="Upload MODEL (if the coordinator lacks it), submit INPUTS, wait, and write the outputs "
        "(one array per ONNX output name, rows in input order) to -o.",
    )
    submit.add_argument("model", metavar="MODEL.onnx")
    submit.add_argument("inputs", metavar="INPUTS.npz", help="one array per ONNX input name, rows on axis 0")
    _add_coordinator(submit)
    submit.add_argument("--replicas", type=positive_int, metavar="K", help="nodes that must agree per task")
    submit.add_argument("--task-size", type=positive_int, metavar="N", help="rows per task")
    submit.add_argument("--final", choices=["argmax", "exact", "none"], help="how results are compared")
    submit.add_argument("--timeout", type=_positive_float, metavar="S", help="stop waiting after S seconds")
    submit.add_argument("--deadline", type=positive_int, metavar="S",
                        help="seconds for every task to be decided, else the job fails with the reason "
                             "(default: the coordinator's --job-deadline)")
    submit.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="where to write the outputs")
    _add_account_key(submit)
    submit.add_argument("--as", dest="account_name", default=None, metavar="NAME",
                        help="the account name to register on first use (default: your login name)")

    status = sub.add_parser("status", help="show a job's state and progress")
    status.add_argument("job", metavar="JOB")
    _add_coordinator(status)
    status.add_argument("--json", action="store_true", help="print the coordinator's JSON")
    _add_account_key(status)
    status.add_argument("--token", default=None, metavar="READ_TOKEN",
                        help="the job's read token (from submit), instead of the submitter's key")
    status.add_argument("--follow", action="store_true",
                        help="follow the job's progress (its event stream) until it is done or failed")
    jobs_cli.add_parsers(sub, _add_coordinator, _add_account_key)

    trust = sub.add_parser(
        "trust", help="why a node is or is not trusted, or blocked",
        description="Show how far the coordinator trusts NODE: whether its results may stand alone, why (its "
        "streak of results confirmed by the coordinator's own runs), how often they are audited, its record "
        "(valid, invalid, errors, audits passed and failed, last problem) and the leases it may hold.")
    trust.add_argument("node", metavar="NODE", help="the node id (`sparecycles key NODE_KEY_FILE` shows it)")
    _add_coordinator(trust)
    trust.add_argument("--json", action="store_true", help="print the coordinator's JSON")

    ledger = sub.add_parser("ledger", help="credits earned, what jobs cost, and checking it all from outside")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", metavar="LEDGER_COMMAND")
    ledger_cli.add_parsers(ledger_sub, _add_coordinator)
    accounts_cli.add_parsers(sub, _add_coordinator)
    return parser


def _add_account_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", type=Path, default=None, metavar="PATH",
                        help=f"your account key, created (mode 0600) and registered on first use "
                             f"(default {default_key_path()})")


# -- entry point -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help, or a usage error argparse has already explained
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        if args.command in FORWARDED:
            return forward(args.command, args.args)
        if args.command == "ledger" and args.ledger_command is None:
            raise CliExit(EXIT_USAGE, "say which: `sparecycles ledger balances|history NAME|job JOB|checkpoint|"
                                      "proof SEQ|export|verify`")
        for group, attr, choices in GROUPS:
            if args.command == group and getattr(args, attr) is None:
                raise CliExit(EXIT_USAGE, f"say which: `sparecycles {group} {choices}`")
        if args.command in ACCOUNT_COMMANDS:
            return ACCOUNT_COMMANDS[args.command](args)
        return COMMANDS[args.ledger_command if args.command == "ledger" else args.command](args)
    except CliExit as exc:
        if exc.message:
            print(f"sparecycles: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("sparecycles: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (`| head`) has all it wanted: end quietly. Point stdout at /dev/null so that
        # the interpreter's final flush does not raise again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _import(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        needed = "" if module.startswith(missing) else f" (needed by {module})"
        raise CliExit(
            EXIT_USAGE,
            f"cannot import {missing}{needed}: {exc}; "
            "install sparecycles with its dependencies (`pip install -e .`)",
        ) from exc


def forward(command: str, argv: Sequence[str]) -> int:
    """Run a process command's own `main(argv)`, imported only now (the client needs none of them)."""
    entry: Callable[[list[str]], Any] = _import(FORWARDED[command][0]).main
    code = entry(list(argv))
    if inspect.iscoroutine(code):
        code = asyncio.run(code)
    return int(code or 0)


# -- client commands -------------------------------------------------------------------------------


def _run(url: str, action: Callable[[Client], Awaitable[T]], *, identity: Identity | None = None) -> T:
    """Run `action` with a client for `url` (signing with `identity`); expected failures become
    `CliExit` with advice."""

    async def go() -> T:
        async with Client(url, identity=identity) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except CoordinatorUnavailable as exc:
        raise CliExit(EXIT_UNAVAILABLE, str(exc)) from exc
    except JobFailed as exc:
        raise CliExit(EXIT_FAILED, _describe_failure(exc)) from exc
    except WaitTimeout as exc:
        raise CliExit(EXIT_FAILED, str(exc)) from exc
    except RequestRejected as exc:
        code = EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILED
        where = f"{exc.status} on {exc.method} {exc.path}"
        raise CliExit(code, f"the coordinator refused: {exc.message} ({where})") from exc
    except SparecyclesError as exc:
        raise CliExit(EXIT_FAILED, str(exc)) from exc


def _describe_failure(exc: JobFailed) -> str:
    lines = [f"job {exc.job} failed" + (f": {exc.error}" if exc.error else "")]
    for failure in exc.failures[:MAX_FAILURES_SHOWN]:
        lines.append(f"  task {failure.get('task')}: {failure.get('reason')}")
    if len(exc.failures) > MAX_FAILURES_SHOWN:
        lines.append(f"  ... and {len(exc.failures) - MAX_FAILURES_SHOWN} more failed tasks")
    lines.append(f"  details: sparecycles status {exc.job} --json")
    return "\n".join(lines)


def _read_input_file(path: str, what: str) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CliExit(EXIT_USAGE, f"{what} file {path} not found") from None
    except IsADirectoryError:
        raise CliExit(EXIT_USAGE, f"{what} file {path} is a directory, not a file") from None
    except OSError as exc:
        raise CliExit(EXIT_USAGE, f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not data:
        raise CliExit(EXIT_USAGE, f"{what} file {path} is empty")
    return data


def _cmd_submit(args: argparse.Namespace) -> int:
    model = _read_input_file(args.model, "model")
    try:
        inputs = from_npz(_read_input_file(args.inputs, "inputs"))
    except BadNpz as exc:
        raise CliExit(
            EXIT_USAGE,
            f"{args.inputs} is not a .npz file of named arrays ({exc}); write one with "
            "numpy.savez(path, input_name=array)",
        ) from None
    if not inputs:
        raise CliExit(EXIT_USAGE, f"{args.inputs} holds no arrays; it needs one per ONNX input name")
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliExit(EXIT_USAGE, f"cannot write {out}: directory {out.parent} does not exist")

    started = time.monotonic()

    identity = _account_key(args.key)

    submitted: dict[str, str] = {}

    async def action(client: Client) -> tuple[dict[str, Any], dict[str, Any]]:
        await accounts_cli.ensure_account(client, args.account_name)
        digest = await client.ensure_model(model)
        job = await client.submit(digest, inputs, replicas=args.replicas, task_size=args.task_size,
                                  final=args.final, deadline=args.deadline)
        submitted["job"] = str(job["job"])
        with ProgressReporter(str(job["job"])) as report:
            # the job's event stream: progress as it happens, and "why" when it stalls
            await client.follow(str(job["job"]), on_progress=jobs_cli.StallReporter(report), timeout=args.timeout)
        return job, await client.outputs(str(job["job"]))

    try:
        job, outputs = _run(args.coordinator, action, identity=identity)
    except KeyboardInterrupt:
        # Ctrl-C asks nothing: the job keeps running on the coordinator; say how to get back to it.
        if "job" not in submitted:
            raise CliExit(EXIT_INTERRUPTED, "interrupted before the job was submitted: nothing is running") from None
        j, where = submitted["job"], f" --coordinator {args.coordinator}"
        raise CliExit(EXIT_INTERRUPTED,
                      f"interrupted; job {j} keeps running. Follow it: sparecycles status {j} --follow{where}; "
                      f"cancel it: sparecycles cancel {j}{where}; its outputs once done: "
                      f"sparecycles outputs {j} -o OUT.npz{where}") from None
    _write_replacing(out, to_npz(outputs))
    seconds = time.monotonic() - started
    print(f"job {job['job']}: {job.get('rows')} rows in {job.get('tasks')} tasks, {seconds:.1f} s -> {out}",
          file=sys.stderr)
    return EXIT_OK


def _write_replacing(path: Path, data: bytes) -> None:
    """Write via a temporary file so a reader never sees half an output file."""
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CliExit(EXIT_FAILED, f"cannot write {path}: {exc.strerror or exc}") from None


def _cmd_status(args: argparse.Namespace) -> int:
    identity = None if args.token else _account_key(args.key)
    if args.follow:
        async def follow(c: Client) -> dict[str, Any]:
            with ProgressReporter(args.job) as report:
                return await c.follow(args.job, on_progress=jobs_cli.StallReporter(report), read_token=args.token)

        _run(args.coordinator, follow, identity=identity)
    st = _run(args.coordinator, lambda c: c.status(args.job, read_token=args.token), identity=identity)
    if args.json:
        print(json.dumps(st))
        return EXIT_OK
    tasks = st.get("tasks") or {}
    print(f"job {st.get('job', args.job)}: {st.get('state')}")
    print(f"  model     {st.get('model')}")
    print(f"  rows      {st.get('rows')} (task size {st.get('task_size')}, replicas {st.get('replicas')})")
    print(f"  tasks     {tasks.get('verified')}/{tasks.get('total')} verified, {tasks.get('failed')} failed, "
          f"{tasks.get('open')} open")
    if st.get("why"):
        print(f"  why       {st['why']}")
    if st.get("state") == "running":
        print(f"  eta       {jobs_cli.eta_text(st.get('eta_seconds'))}")
    if st.get("error"):
        print(f"  error     {st['error']}")
    for failure in (st.get("failures") or [])[:MAX_FAILURES_SHOWN]:
        print(f"  failed    task {failure.get('task')}: {failure.get('reason')}")
    # A running job says, task by task (the first few open ones), why each is not decided yet and
    # what happened to it: replicated, audited, results rejected.
    for waiting in (st.get("waiting") or [])[:MAX_FAILURES_SHOWN]:
        print(f"  waiting   task {waiting.get('task')}: {waiting.get('waiting')}")
        for note in waiting.get("notes") or []:
            print(f"              {note}")
    return EXIT_OK


def _cmd_trust(args: argparse.Namespace) -> int:
    view = _run(args.coordinator, lambda c: c.trust(args.node))
    if args.json:
        print(json.dumps(view))
        return EXIT_OK
    state = "BLOCKED" if view.get("blocked") else "trusted" if view.get("trusted") else "not trusted"
    print(f"node {view.get('node', args.node)} (owner {view.get('owner') or '?'}): {state}")
    print(f"  why         {view.get('why')}")
    rate = view.get("audit_rate")
    if isinstance(rate, int | float):
        print(f"  audited     {rate:.3f} of its results (ones standing alone or agreed only by untrusted owners)")
    record = view.get("record")
    if isinstance(record, dict):
        print(f"  streak      {record.get('streak')} results in a row confirmed by the coordinator's checks")
        print(f"  results     {record.get('valid')} valid, {record.get('invalid')} shown wrong, "
              f"{record.get('errors')} errors reported")
        print(f"  audits      {record.get('audits_passed')} passed, {record.get('audits_failed')} failed")
        if record.get("last_problem"):
            print(f"  last problem {record['last_problem']}")
    else:
        print("  record      none: the coordinator has judged no result of this node")
    print(f"  leases      {view.get('leases')} held, at most {view.get('allowed_leases')} allowed now")
    return EXIT_OK


def _ledger(command: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """A `sparecycles ledger` command with this module's client runner; its refusals exit like ours."""

    def go(args: argparse.Namespace) -> int:
        def run(action: Callable[[Client], Awaitable[Any]]) -> Any:
            return _run(args.coordinator, action)

        try:
            if command is ledger_cli.cmd_verify:
                return command(args, run, args.coordinator)
            return command(args, run)
        except ledger_cli.LedgerCliError as exc:
            raise CliExit(exc.code, exc.message) from exc

    return go


def _account_key(path: Path | None) -> Identity:
    try:
        return load_or_create_key(path)
    except SparecyclesError as exc:
        raise CliExit(EXIT_USAGE, str(exc)) from exc


def _cmd_key(args: argparse.Namespace) -> int:
    return accounts_cli.cmd_key(args)


def _cmd_owner(args: argparse.Namespace) -> int:
    return accounts_cli.cmd_certify(args, lambda message: CliExit(EXIT_USAGE, message))


def _cmd_account(args: argparse.Namespace) -> int:
    answer = _run(args.coordinator, lambda c: accounts_cli.account_action(args, c), identity=_account_key(args.key))
    if args.json:
        print(json.dumps(answer))
    else:
        accounts_cli.print_account(answer)
    return EXIT_OK


def _cmd_admin(args: argparse.Namespace) -> int:
    answer = _run(args.coordinator, lambda c: accounts_cli.admin_action(args, c), identity=_account_key(args.key))
    if args.json:
        print(json.dumps(answer))
    else:
        accounts_cli.print_admin(args.admin_command, answer)
    return EXIT_OK


ACCOUNT_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "key": _cmd_key, "owner": _cmd_owner, "account": _cmd_account, "admin": _cmd_admin}
GROUPS = (("owner", "owner_command", "certify NODE"), ("account", "account_command", "register NAME|show"),
          ("admin", "admin_command", "accounts|add|block|unblock|grant|invite"))

def _cmd_jobs(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 500:
        raise CliExit(EXIT_USAGE, f"--limit must be in 1..500, got {args.limit}")
    identity = None if args.everyone else _account_key(args.key)
    rows = jobs_cli.cmd_jobs(args, lambda action: _run(args.coordinator, action, identity=identity))
    jobs_cli.print_jobs(rows, as_json=args.json)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    answer = _run(args.coordinator, lambda c: c.cancel(args.job), identity=_account_key(args.key))
    print(f"job {answer.get('job', args.job)}: cancelled {answer.get('cancelled_tasks')} open tasks; "
          f"state {answer.get('state')}")
    return EXIT_OK


def _cmd_outputs(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if not out.parent.is_dir():
        raise CliExit(EXIT_USAGE, f"cannot write {out}: directory {out.parent} does not exist")
    identity = None if args.token else _account_key(args.key)
    arrays = _run(args.coordinator, lambda c: c.outputs(args.job, read_token=args.token), identity=identity)
    jobs_cli.write_outputs(out, to_npz(arrays), lambda message: CliExit(EXIT_FAILED, message))
    rows = next(iter(arrays.values())).shape[0] if arrays else 0
    print(f"job {args.job}: {len(arrays)} outputs, {rows} rows -> {out}", file=sys.stderr)
    return EXIT_OK


def _cmd_nodes(args: argparse.Namespace) -> int:
    jobs_cli.print_nodes(_run(args.coordinator, lambda c: c.nodes()), as_json=args.json)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "submit": _cmd_submit,
    "status": _cmd_status,
    "jobs": _cmd_jobs,
    "cancel": _cmd_cancel,
    "outputs": _cmd_outputs,
    "nodes": _cmd_nodes,
    "trust": _cmd_trust,
    "balances": _ledger(ledger_cli.cmd_balances),
    "history": _ledger(ledger_cli.cmd_history),
    "job": _ledger(ledger_cli.cmd_job),
    "checkpoint": _ledger(ledger_cli.cmd_checkpoint),
    "proof": _ledger(ledger_cli.cmd_proof),
    "export": _ledger(ledger_cli.cmd_export),
    "verify": _ledger(ledger_cli.cmd_verify),
}
