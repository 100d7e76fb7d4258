"""`sparecycles coordinator ...` / `python -m coordinator ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import aiomqtt
from aiohttp import web

from protocol.cliparse import OneLineParser
from protocol.logformat import ENV_LOG_FORMAT, LOG_FORMATS, announce, make_handler

from .app import make_app
from .broker_acl import BrokerAclError, parse_admin
from .http_api import COORDINATOR
from .ledger_notary import LedgerRefused
from .retention import parse_duration
from .service import Coordinator
from .settings import CoordinatorSettings, parse_hostport
from .store import StoreError
from .store_factory import db_url

BROKER_WAIT_SECONDS = 30.0  # for a broker that is slow to answer; a refused connection is told at once


def build_parser() -> argparse.ArgumentParser:
    d = CoordinatorSettings()
    p = OneLineParser(prog="sparecycles coordinator",
                                description="Run the coordinator: HTTP API, MQTT dispatch, verification, ledger.")
    p.add_argument("--broker", default=d.broker_url, help="MQTT broker URL (default %(default)s)")
    p.add_argument("--db", default=d.db_url,
                   help="where state and ledger live: a file path (SQLite; state.db is sqlite:///state.db), "
                        "sqlite:////abs/path.db, postgresql://USER@HOST:PORT/DB, or memory (default %(default)s)")
    p.add_argument("--http", default=f"{d.http_host}:{d.http_port}", help="HOST:PORT to serve (default %(default)s)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="default k per job (default %(default)s)")
    p.add_argument("--key", default=None, help="coordinator key file (default: beside the database)")
    p.add_argument("--topic-prefix", default=None, help="MQTT topic prefix (default sc/v1/<coordinator id>)")
    p.add_argument("--lease-seconds", type=float, default=d.lease_seconds, metavar="S",
                   help="longest a node may hold a task before it is offered to another (default %(default)s)")
    p.add_argument("--max-inline-kb", type=int, default=d.max_inline_bytes // 1024, metavar="KB",
                   help="task inputs up to this size travel inside the assignment, larger ones are fetched over "
                        "HTTP (default %(default)s)")
    p.add_argument("--max-body-mb", type=int, default=d.max_body_bytes // 2**20, metavar="MB",
                   help="largest HTTP request body, e.g. a job's inputs (default %(default)s)")
    p.add_argument("--registration", choices=["open", "invite", "closed"], default=d.registration,
                   help="who may create accounts: anyone (rate-limited per address), holders of an operator's "
                        "invite, or nobody but the operator (default %(default)s)")
    p.add_argument("--starting-grant", type=int, default=None, metavar="CREDITS",
                   help="credit granted to each new account (default: 10**12 when open, else 0)")
    p.add_argument("--min-replicas", type=int, default=None, metavar="K",
                   help="lowest replicas a submitter may ask for (default: 2, or 1 if --replicas is 1)")
    p.add_argument("--operator", action="append", default=[], metavar="PUBKEY",
                   help="a public key (64 hex) allowed to manage accounts, besides the coordinator's own key "
                        "(repeatable)")
    p.add_argument("--broker-admin", default=os.environ.get("SPARECYCLES_BROKER_ADMIN"), metavar="USER:PASSWORD",
                   help="the broker's dynamic-security admin: per-node broker logins and ACLs "
                        "(default: $SPARECYCLES_BROKER_ADMIN; unset: topics are not access-controlled)")
    p.add_argument("--max-open-jobs", type=int, default=d.max_open_jobs, metavar="N",
                   help="running jobs per account (default %(default)s)")
    p.add_argument("--max-stored-mb", type=int, default=d.max_stored_bytes // 2**20, metavar="MB",
                   help="job inputs and models stored per account (default %(default)s)")
    p.add_argument("--request-rate", type=float, default=d.request_rate, metavar="PER_S",
                   help="signed requests per second per account, after a burst of 4x (default %(default)s)")
    v = p.add_argument_group("verification", "trust earned against the coordinator's own runs (audits)")
    v.add_argument("--trusted-owner", action="append", default=[], metavar="NAME",
                   help="an account whose results are ground truth (repeatable; default: none)")
    v.add_argument("--trusted-after", type=int, default=d.trusted_after, metavar="N",
                   help="audited-valid results in a row before a node's results may stand alone (default %(default)s)")
    v.add_argument("--min-audit-rate", type=float, default=d.min_audit_rate, metavar="P",
                   help="a trusted node's results are audited at max(P, 1/streak) (default %(default)s)")
    v.add_argument("--untrusted-audit-rate", type=float, default=d.untrusted_audit_rate, metavar="P",
                   help="agreement among untrusted owners is audited at this rate (default %(default)s)")
    v.add_argument("--no-adaptive", action="store_true",
                   help="every task runs on --replicas owners, even on trusted nodes")
    v.add_argument("--block-after", type=int, default=d.block_after, metavar="N",
                   help="results shown wrong before an owner is blocked (default %(default)s)")
    v.add_argument("--silence-seconds", type=float, default=d.silence_seconds, metavar="S",
                   help="a node silent this long loses its leases (default %(default)s)")
    v.add_argument("--job-deadline", type=float, default=d.job_deadline, metavar="S",
                   help="seconds for a job's tasks to be decided, else they fail with the reason (default %(default)s)")
    v.add_argument("--audit-workers", type=int, default=d.audit_workers, metavar="N",
                   help="sandboxed processes running audits at once (default %(default)s)")
    v.add_argument("--model-probes", type=int, default=d.model_probes, metavar="N",
                   help="new models checked in sandboxed processes at once; more uploads get 429 (default %(default)s)")
    st = p.add_argument_group("storage", "what is kept, for how long, and how large an upload may be")
    st.add_argument("--retention", type=_duration, default=d.retention_seconds, metavar="DURATION",
                    help="a finished job's inputs and outputs are deleted this long after it finished: seconds, "
                         "or 90m, 12h, 7d; 0 keeps them forever (default 7d)")
    st.add_argument("--retention-sweep-seconds", type=float, default=d.retention_sweep_seconds, metavar="S",
                    help="how often expired jobs are looked for (default %(default)s)")
    st.add_argument("--max-output-mb", type=int, default=d.max_output_bytes // 2**20, metavar="MB",
                    help="most bytes a node may upload for one task when the model's output shapes do not bound "
                         "it (default %(default)s)")
    lg = p.add_argument_group("ledger", "the signed, tamper-evident log of credits")
    lg.add_argument("--checkpoint-seconds", type=float, default=d.checkpoint_seconds, metavar="S",
                    help="how often new ledger entries are put under a signed checkpoint (default %(default)s)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="INFO tells jobs created and finished, nodes joining, leaving and refused "
                        "(default %(default)s)")
    p.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get(ENV_LOG_FORMAT) or "text",
                   help=f"text lines, or one JSON object per line for a log collector (default: ${ENV_LOG_FORMAT}, "
                        "else text)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparecycles")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def settings_from_args(args: argparse.Namespace) -> CoordinatorSettings:
    host, port = parse_hostport(args.http, 8080)
    if args.log_format not in LOG_FORMATS:  # from the environment, which argparse does not check
        raise ValueError(f"{ENV_LOG_FORMAT} must be one of {', '.join(LOG_FORMATS)}, got {args.log_format!r}")
    if args.db.startswith(("postgresql://", "postgres://")) and not args.key:
        # SQLite keeps the key beside its file; a database server has no such place. A new key per
        # start would disown every checkpoint signed before it, and the ledger would be refused.
        raise ValueError("a coordinator on PostgreSQL needs --key FILE: it signs the ledger's checkpoints with "
                         "that key, so keep the file (and a backup of it) across restarts")
    return CoordinatorSettings(broker_url=args.broker, db_url=db_url(args.db), http_host=host, http_port=port,
                               replicas=args.replicas, key_path=args.key, topic_prefix=args.topic_prefix,
                               lease_seconds=args.lease_seconds, max_inline_bytes=args.max_inline_kb * 1024,
                               max_body_bytes=args.max_body_mb * 2**20, registration=args.registration,
                               starting_grant=args.starting_grant, min_replicas=args.min_replicas,
                               operator_keys=tuple(_public_key(k) for k in args.operator),
                               broker_admin=args.broker_admin or None, max_open_jobs=args.max_open_jobs,
                               max_stored_bytes=args.max_stored_mb * 2**20, request_rate=args.request_rate,
                               request_burst=4 * args.request_rate, trusted_owners=tuple(args.trusted_owner),
                               trusted_after=args.trusted_after, min_audit_rate=args.min_audit_rate,
                               untrusted_audit_rate=args.untrusted_audit_rate, adaptive=not args.no_adaptive,
                               block_after=args.block_after, silence_seconds=args.silence_seconds,
                               job_deadline=args.job_deadline, audit_workers=args.audit_workers,
                               model_probes=args.model_probes, retention_seconds=args.retention,
                               retention_sweep_seconds=args.retention_sweep_seconds,
                               max_output_bytes=args.max_output_mb * 2**20,
                               checkpoint_seconds=args.checkpoint_seconds)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _public_key(value: str) -> str:
    try:
        if len(bytes.fromhex(value)) == 32:
            return value.lower()
    except ValueError:
        pass
    raise ValueError(f"--operator {value!r} is not a 64-hex Ed25519 public key (`sparecycles key FILE` shows one)")


async def serve(settings: CoordinatorSettings, *, log_format: str = "text") -> None:
    app = make_app(settings)
    # A stuck long poll must not hold up SIGTERM for aiohttp's default 60 s.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()  # the coordinator stops cleanly: its store closed, its loops ended
        raise
    coordinator = app[COORDINATOR]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await _wait_for_broker(coordinator, settings)
    print(announce(f"coordinator ready http://{settings.http_host}:{settings.http_port} "
                   f"id={coordinator.identity.id} prefix={coordinator.topics.prefix}", log_format, "coordinator"),
          file=sys.stderr, flush=True)
    await stop.wait()
    await runner.cleanup()


async def _wait_for_broker(coordinator: Coordinator, settings: CoordinatorSettings) -> None:
    """Wait until MQTT connects; if it fails first (or takes too long), say so in one line that names
    the address and what to do, and go on serving: the connection is retried in the background, and
    until it succeeds /v1/health says "degraded" and job submissions are refused with a 503."""
    waits = [asyncio.create_task(coordinator.connected.wait()), asyncio.create_task(coordinator.broker_failed.wait())]
    await asyncio.wait(waits, timeout=BROKER_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if coordinator.connected.is_set():
        return
    host, port = settings.broker
    why = coordinator.broker_error or f"no answer in {BROKER_WAIT_SECONDS:g} s"
    logging.getLogger("sparecycles.coordinator").warning(
        "cannot reach the MQTT broker at %s:%d (%s): start one there (Mosquitto, or `sparecycles broker`) or point "
        "--broker at it; serving HTTP meanwhile, with /v1/health \"degraded\" and new jobs refused (503) until "
        "it connects", host, port, why)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The event loop hands work to the SQLite thread and back many times per job; at CPython's
    # default 5 ms GIL switch interval each hand-off can wait that long behind the busy loop.
    sys.setswitchinterval(0.0005)
    try:
        settings = settings_from_args(args)
        settings.broker  # noqa: B018 - validates the URL before anything starts
        if settings.broker_admin:
            parse_admin(settings.broker_admin)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = logging.getLogger()
    root.handlers[:] = [make_handler(sys.stderr, args.log_format)]
    root.setLevel(args.log_level)
    try:
        asyncio.run(serve(settings, log_format=args.log_format))
    except LedgerRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokerAclError as exc:
        print(f"error: {exc}. Check --broker-admin and that the broker loads the dynamic-security plugin "
              "(deploy/mosquitto-dynsec.conf).", file=sys.stderr)
        return 1
    except aiomqtt.MqttError as exc:
        print(f"error: cannot set up broker access control at {settings.broker_url}: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: cannot open the database: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot serve HTTP on {settings.http_host}:{settings.http_port}: {exc.strerror or exc}. "
              "Pick another --http HOST:PORT, or stop what already listens there.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
