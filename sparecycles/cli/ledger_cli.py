"""`sparecycles ledger ...`: read and check a coordinator's ledger from outside.

    sparecycles ledger balances                      # per node, owner and account, unit spelled out
    sparecycles ledger history NAME                  # a node's or an account's entries
    sparecycles ledger job JOB                       # what a job cost and who computed it
    sparecycles ledger checkpoint                    # the newest signed checkpoint
    sparecycles ledger proof SEQ [--size N]          # an entry's inclusion proof, checked here
    sparecycles ledger export --format jsonl|csv [-o FILE]
    sparecycles ledger verify [--receipts DIR] [--state-dir DIR] [--coordinator-key HEX]

`verify` trusts the coordinator's key only: pinned on first use (or given), then every later run
must see the same key. It fetches the checkpoint first, then everything with upto = its size, so
credits recorded meanwhile are not in the snapshot (no false alarm under load), and remembers each
checkpoint it verified in the state directory, to check the next one extends it.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, TypeVar

from ledger.checkpoint import Checkpoint, CheckpointError, Receipt, decode_proof
from ledger.errors import InvalidEntry
from ledger.merkle import InvalidProof, leaf_hash, verify_inclusion
from ledger.outside import Evidence, check, sizes_to_prove
from node.receipts import CHECKPOINT_FILE, read_receipts
from protocol.cliparse import OneLineParser, positive_int

from ..sdk import Client
from .tables import fmt, print_table

T = TypeVar("T")
Run = Callable[[Callable[[Client], Awaitable[T]]], T]

UNIT_FALLBACK: Final = {"name": "credit", "means": "1 credit = 1,000 floating-point operations (1 kFLOP) of "
                                                   "the coordinator's own count of the model's work"}
"""What a coordinator from before issue 11 does not say itself (ledger/credit.py's FLOPS_PER_CREDIT)."""
KEEP_CHECKPOINTS: Final = 32
"""Checkpoints remembered per coordinator: the first, the newest and evenly spaced ones between.
Consistency is transitive, so more only narrow down where a rewrite starts."""
PROGRESS_ENTRIES: Final = 100_000
CSV_FIELDS: Final = ("seq", "kind", "created_at_iso", "created_at", "account", "node", "owner", "job", "task",
                     "amount", "ref", "result_digest", "key", "memo", "reason")


class LedgerCliError(Exception):
    """Stop with `code` after printing `message` (main turns it into its CliExit)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_parsers(ledger_sub: argparse._SubParsersAction[OneLineParser],
                add_coordinator: Callable[[argparse.ArgumentParser], None]) -> None:
    balances = ledger_sub.add_parser("balances", help="credits per node, per owner and per account")
    history = ledger_sub.add_parser("history", help="a node's or an account's entries")
    history.add_argument("node", metavar="NAME", help="a node id, or an account (owner) name")
    job = ledger_sub.add_parser("job", help="what a job cost and who computed it")
    job.add_argument("job", metavar="JOB")
    checkpoint = ledger_sub.add_parser("checkpoint", help="the newest checkpoint the coordinator signed")
    proof = ledger_sub.add_parser("proof", help="the inclusion proof of entry SEQ, checked against the checkpoint")
    proof.add_argument("seq", metavar="SEQ", type=positive_int)
    proof.add_argument("--size", type=positive_int, default=None, metavar="N",
                       help="prove against the tree of N entries (default: the newest checkpoint's size)")
    export = ledger_sub.add_parser("export", help="the whole ledger as JSON Lines or CSV")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    export.add_argument("-o", "--output", type=Path, default=None, metavar="FILE",
                        help="write here (replaced whole at the end) instead of standard output")
    export.add_argument("--upto", type=positive_int, default=None, metavar="SEQ", help="entries up to SEQ only")
    verify = ledger_sub.add_parser(
        "verify", help="check the ledger from outside: signatures, history, entries, receipts, balances",
        description="Fetch the newest signed checkpoint, then every entry, accepted result and balance up to "
        "its size; check the checkpoint against the pinned key, every checkpoint seen before against it, the "
        "entries against its root, each receipt, each credit against its accepted result and the cost model, "
        "and the balances. Exit 0 ok, 1 a problem (each one listed), 2 usage.")
    verify.add_argument("--receipts", type=Path, default=None, metavar="DIR",
                        help="a node's state directory: check its receipts.jsonl and checkpoint.json too")
    verify.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                        help="where the pinned key and the checkpoints seen are kept (default "
                             "$XDG_STATE_HOME or ~/.local/state, then sparecycles/ledger/<coordinator id>)")
    verify.add_argument("--coordinator-key", default=None, metavar="HEX",
                        help="the coordinator's public key (64 hex), instead of trusting it on first use")
    for p in (balances, history, job, checkpoint, proof, verify):
        add_coordinator(p)
        if p is not verify:
            p.add_argument("--json", action="store_true", help="print the coordinator's JSON")
    add_coordinator(export)


# -- inspection ------------------------------------------------------------------------------------------


def cmd_balances(args: argparse.Namespace, run: Run[dict[str, Any]]) -> int:
    balances = run(lambda c: c.balances())
    if args.json:
        print(json.dumps(balances))
        return 0
    nodes = [[n.get(k) for k in ("node", "owner", "credits", "entries")] for n in balances.get("nodes") or []]
    owners = [[o.get(k) for k in ("owner", "credits", "entries")] for o in balances.get("owners") or []]
    print_table("nodes", ["node", "owner", "credits", "entries"], nodes)
    print()
    print_table("owners", ["owner", "credits", "entries"], owners)
    accounts = balances.get("accounts")
    if accounts is not None:  # a coordinator from before the double-entry ledger sends none
        columns = ["account", "granted", "earned", "spent", "balance"]
        print()
        print_table("accounts", columns, [[a.get(k) for k in columns] for a in accounts or []])
    print()
    print(_unit_line(balances))
    if accounts is not None:
        print(f"granted: {fmt(balances.get('total_granted'))} credits in all, {len(accounts or [])} accounts")
    total, count = fmt(balances.get("total_credits")), fmt(balances.get("entries"))
    print(f"total: {total} credits in {count} entries")
    return 0


def cmd_history(args: argparse.Namespace, run: Run[tuple[str, dict[str, Any]]]) -> int:
    async def fetch(c: Client) -> tuple[str, dict[str, Any]]:
        from ..errors import RequestRejected

        try:
            return "node", await c.history(args.node)
        except RequestRejected as exc:
            if exc.status != 404:
                raise
        return "account", await c.account(args.node)  # not a node: an owner or submitter account

    what, history = run(fetch)
    entries = history.get("entries") or []
    if what == "account" and not entries:
        raise LedgerCliError(2, f"no node or account named {args.node} has ledger entries; "
                                f"`sparecycles ledger balances` lists the names that do")
    if args.json:
        print(json.dumps(history))
        return 0
    if what == "node":
        print(f"node {history.get('node', args.node)} (owner {history.get('owner')}): "
              f"{fmt(history.get('credits'))} credits in {len(entries)} entries")
    else:
        print(f"account {history.get('account', args.node)}: balance {fmt(history.get('balance'))} credits "
              f"(granted {fmt(history.get('granted'))}, earned {fmt(history.get('earned'))}, "
              f"spent {fmt(history.get('spent'))}) in {len(entries)} entries")
    columns = ["seq", "time", "kind", "job", "task", "node", "amount"]
    rows = [[e.get("seq"), _iso(e), e.get("kind"), e.get("job"), e.get("task"), e.get("node", ""), e.get("amount")]
            for e in entries]
    if rows:
        print()
        print_table("entries", columns, rows)
    print(_unit_line(history))
    return 0


def cmd_job(args: argparse.Namespace, run: Run[dict[str, Any]]) -> int:
    answer = run(lambda c: c.job_ledger(args.job))
    if args.json:
        print(json.dumps(answer))
        return 0
    entries = answer.get("entries") or []
    print(f"job {answer.get('job', args.job)}: cost {fmt(answer.get('cost'))} credits, {len(entries)} entries")
    computed = answer.get("computed_by") or []
    print()
    print_table("computed by", ["node", "owner", "credits"],
                [[n.get("node"), n.get("owner"), n.get("credits")] for n in computed])
    print(_unit_line(answer))
    return 0


def cmd_checkpoint(args: argparse.Namespace, run: Run[dict[str, Any]]) -> int:
    answer = run(lambda c: c.checkpoint())
    if args.json:
        print(json.dumps(answer))
        return 0
    cp = _checkpoint_of(answer)
    print(f"checkpoint of {cp.size} entries, signed {cp.time_iso()}")
    print(f"  root        {cp.root.hex()}")
    print(f"  coordinator {cp.origin}")
    print(f"  public key  {answer.get('public_key')}")
    print(f"  signature   {cp.signature.hex()}")
    return 0


def cmd_proof(args: argparse.Namespace, run: Run[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    async def fetch(c: Client) -> tuple[dict[str, Any], dict[str, Any]]:
        head = await c.checkpoint()
        size = args.size or _checkpoint_of(head).size
        return head, await c.inclusion_proof(args.seq, size)

    head, answer = run(fetch)
    if args.json:
        print(json.dumps(answer))
        return 0
    cp, key = _checkpoint_of(head), _key_of(head)
    try:
        cp.verify(key)
        entry = bytes.fromhex(str(answer.get("entry")))
        proof = decode_proof(answer.get("proof"))
        size = answer.get("size")
        if size != cp.size:
            raise LedgerCliError(1, f"the proof is for a tree of {size} entries; the checkpoint says {cp.size}: "
                                    f"this command checks proofs against the newest checkpoint only")
        verify_inclusion(leaf_hash(entry), args.seq - 1, cp.size, proof, cp.root)
    except (CheckpointError, InvalidProof, ValueError) as exc:
        raise LedgerCliError(1, f"the inclusion proof of seq {args.seq} does not verify: {exc}") from exc
    print(f"seq {args.seq} is in the checkpoint of {cp.size} entries signed {cp.time_iso()} "
          f"({len(proof)} hashes, verified)")
    try:
        print(f"  entry {json.dumps(record_from_json_leaf(entry))}")
    except InvalidEntry:
        pass
    for h in proof:
        print(f"  {h.hex()}")
    return 0


def record_from_json_leaf(leaf: bytes) -> list[Any]:
    """The leaf's fields, for people (msgpack array: kind first)."""
    import msgpack

    fields = msgpack.unpackb(leaf, raw=False)
    if not isinstance(fields, list):
        raise InvalidEntry("a leaf is a msgpack array")
    return fields


def cmd_export(args: argparse.Namespace, run: Run[int]) -> int:
    """Page by page to the output, so that a ledger larger than memory exports too."""
    out: IO[str]
    tmp = args.output.with_name(args.output.name + ".part") if args.output else None
    if args.output is not None and not args.output.parent.is_dir():
        raise LedgerCliError(2, f"cannot write {args.output}: directory {args.output.parent} does not exist")

    async def go(c: Client) -> int:
        count = 0
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n") \
            if args.format == "csv" else None
        if writer is not None:
            writer.writeheader()
        async for page in c.entry_pages(upto=args.upto):
            for entry in page:
                if writer is not None:
                    writer.writerow({**entry, "created_at_iso": _iso(entry)})
                else:
                    out.write(json.dumps({**entry, "created_at_iso": _iso(entry)}) + "\n")
            count += len(page)
        return count

    if tmp is None:
        out = sys.stdout
        run(go)
        return 0
    try:
        with tmp.open("w", encoding="utf-8", newline="") as out:
            count = run(go)
        os.replace(tmp, args.output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LedgerCliError(1, f"cannot write {args.output}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"exported {count} entries to {args.output}", file=sys.stderr)
    return 0


# -- verify ----------------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, run: Run[Any], url: str) -> int:
    given = _parse_key(args.coordinator_key) if args.coordinator_key else None
    head = run(lambda c: c.checkpoint())
    newest, served_key = _checkpoint_of(head), _key_of(head)
    key = given or served_key
    if given is not None and served_key != given:
        raise LedgerCliError(1, f"the coordinator at {url} serves public key {served_key.hex()}, not the "
                                f"{given.hex()} you gave: it is another coordinator, or someone in between")
    state = args.state_dir or default_state_dir(newest.origin)
    _pin(state, url, key, explicit=args.state_dir is not None)
    remembered = load_checkpoints(state)
    receipts: list[Receipt] = []
    if args.receipts is not None:
        receipts, node_checkpoint = _load_receipt_dir(args.receipts)
        remembered += [node_checkpoint] if node_checkpoint is not None else []
    size = newest.size
    sizes = sizes_to_prove(remembered, receipts, newest)
    started = time.monotonic()

    async def fetch(c: Client) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[int, Any]]:
        entries: list[dict[str, Any]] = []
        async for page in c.entry_pages(upto=size):
            entries += page
            if size >= PROGRESS_ENTRIES and len(entries) % PROGRESS_ENTRIES < len(page):
                print(f"fetched {len(entries):,} of {size:,} entries", file=sys.stderr)
        accepted = await c.accepted(upto=size)
        balances = await c.balances(upto=size)
        proofs = {m: await c.consistency_proof(m, size) for m in sizes}
        return entries, accepted, balances, proofs

    entries, accepted, balances, raw_proofs = run(fetch)
    try:
        proofs = {m: decode_proof(p) for m, p in raw_proofs.items()}
    except CheckpointError as exc:
        raise LedgerCliError(1, f"ledger verify FAILED: a consistency proof is malformed: {exc}") from exc
    gc.freeze()  # the fetched documents live to the end: no collector passes over them while checking
    progress = _progress if size >= PROGRESS_ENTRIES else None
    problems = check(Evidence(checkpoint=newest, public_key=key, entries=entries, accepted=accepted,
                              balances=balances, remembered=remembered, consistency=proofs, receipts=receipts),
                     progress=progress)
    seconds = time.monotonic() - started
    if problems and not getattr(args, "retried", False) and all(_about_acceptance(p) for p in problems):
        # The accepted results are the coordinator's current record, read as of the snapshot by each
        # verdict's ledger position; a task reopened between our checkpoint and that read has left
        # it, while its credits are still standing in the snapshot (their clawback came after). One
        # more pass against a newer checkpoint, which includes the clawback, tells that race from
        # an operator who deleted accepted results: those stay missing.
        print("some credits have no accepted result in this snapshot; checking once more against a newer "
              "checkpoint (a task may have been reopened while reading)", file=sys.stderr)
        args.retried = True
        return cmd_verify(args, run, url)
    if problems:
        print(f"ledger verify FAILED: {len(problems)} problems in the snapshot of {size} entries "
              f"(checkpoint of {newest.time_iso()}):")
        for problem in problems[:20]:
            print(f"  - {problem}")
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more")
        return 1
    save_checkpoints(state, [*load_checkpoints(state), newest])
    mine = f", {len(receipts)} receipts included" if args.receipts is not None else ""
    print(f"ledger OK: {size} entries up to the checkpoint of {newest.time_iso()}, "
          f"{fmt(balances.get('total_credits'))} credits, {len(balances.get('nodes') or [])} nodes, "
          f"{len(remembered)} earlier checkpoints consistent{mine} ({seconds:.1f} s)")
    return 0


def _about_acceptance(problem: str) -> bool:
    """A problem a task reopened during the read can cause (see `cmd_verify`)."""
    return "record of accepted results" in problem or "result was not accepted" in problem


def _progress(done: int, total: int) -> None:
    print(f"checked {done:,} of {total:,} entries", file=sys.stderr)


def default_state_dir(coordinator_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sparecycles" / "ledger" / coordinator_id


def _pin(state: Path, url: str, key: bytes, *, explicit: bool) -> None:
    """Trust on first use: the key seen first for this state directory (and, by default, for this
    URL: a new key would otherwise just get a new directory) must be the key seen every time."""
    files = [state / "coordinator.json"]
    if not explicit:
        files.append(state.parent / "pins" / (_safe(url) + ".json"))
    for path in files:
        try:
            pinned = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise LedgerCliError(1, f"cannot read the pinned key in {path}: {exc}") from exc
        if not isinstance(pinned, dict) or pinned.get("public_key") != key.hex():
            was = pinned.get("public_key") if isinstance(pinned, dict) else None
            raise LedgerCliError(1, f"the coordinator at {url} now signs with key {key.hex()}, but key {was} was "
                                    f"pinned in {path} on first use: another coordinator, or someone in between. "
                                    f"If its operator really changed the key, delete {path} and verify again")
    record = {"url": url, "public_key": key.hex(), "pinned_at": _now_iso()}
    for path in files:
        if not path.exists():
            _write_json(path, record)


def _safe(url: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in url)[:200]


def load_checkpoints(state: Path) -> list[Checkpoint]:
    path = state / "checkpoints.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return [Checkpoint.from_json(c) for c in raw]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerCliError(1, f"cannot read the checkpoints seen before in {path}: {exc}; "
                                f"move it away to start afresh (losing what it proves)") from exc


def save_checkpoints(state: Path, checkpoints: Iterable[Checkpoint]) -> None:
    by_size = sorted({c.size: c for c in checkpoints}.values(), key=lambda c: c.size)
    if len(by_size) > KEEP_CHECKPOINTS:
        last = len(by_size) - 1
        picks = {round(i * last / (KEEP_CHECKPOINTS - 1)) for i in range(KEEP_CHECKPOINTS)}
        by_size = [by_size[i] for i in sorted(picks)]
    _write_json(state / "checkpoints.json", [c.to_json() for c in by_size])


def _load_receipt_dir(directory: Path) -> tuple[list[Receipt], Checkpoint | None]:
    path = directory / "receipts.jsonl"
    if not directory.is_dir():
        raise LedgerCliError(2, f"--receipts {directory} is not a directory; give a node's state directory "
                                f"(the one holding receipts.jsonl)")
    try:
        receipts = [r for _, r in read_receipts(path)]
        node_cp = directory / CHECKPOINT_FILE
        checkpoint = Checkpoint.from_json(json.loads(node_cp.read_text(encoding="utf-8"))) if node_cp.exists() \
            else None
    except (CheckpointError, ValueError, OSError) as exc:
        raise LedgerCliError(1, f"cannot read the receipts in {directory}: {exc}") from exc
    if not receipts and checkpoint is None:
        raise LedgerCliError(2, f"{directory} holds no receipts.jsonl nor checkpoint.json: is it a node's "
                                f"state directory?")
    return receipts, checkpoint


def _checkpoint_of(answer: dict[str, Any]) -> Checkpoint:
    try:
        return Checkpoint.from_json(answer.get("checkpoint"))
    except CheckpointError as exc:
        raise LedgerCliError(1, f"the coordinator's checkpoint is malformed: {exc}") from exc


def _key_of(answer: dict[str, Any]) -> bytes:
    value = answer.get("public_key")
    try:
        return _parse_key(value if isinstance(value, str) else "")
    except LedgerCliError:
        raise LedgerCliError(1, f"the coordinator's public key {value!r:.80} is not 64 hex characters") from None


def _parse_key(value: str) -> bytes:
    try:
        key = bytes.fromhex(value)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise LedgerCliError(2, f"a coordinator key is 64 hex characters (GET /v1/info's public_key), got "
                                f"{value!r:.80}")
    return key


def _unit_line(answer: dict[str, Any]) -> str:
    unit = answer.get("unit") if isinstance(answer.get("unit"), dict) else UNIT_FALLBACK
    assert isinstance(unit, dict)
    return f"unit: {unit.get('name', 'credit')}: {unit.get('means')}"


def _iso(entry: dict[str, Any]) -> str:
    iso = entry.get("created_at_iso")
    if isinstance(iso, str):
        return iso
    at = entry.get("created_at")
    if isinstance(at, int | float) and not isinstance(at, bool):
        try:
            return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        except (OverflowError, OSError, ValueError):
            pass
    return "-"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    os.replace(tmp, path)

