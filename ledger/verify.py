"""Pure consistency check of a ledger against the coordinator's record of accepted results.

`sparecycles ledger verify` fetches three JSON documents over HTTP (entries, accepted results,
balances) and hands them here. They come from a coordinator being audited, so nothing in them is
trusted: a missing field or a wrong type is reported as a discrepancy, never raised.

Besides the contributors' side (each credit matches an accepted result, exactly once), it checks
the double entry: each verified task of a job with a submitter is charged to that submitter exactly
the sum of the task's credits, account balances equal the sums of their entries, and together they
add up to the credit granted - plus, until every job has a submitter, the credits of jobs without
one, which nobody pays for.

Each standing credit also names the accepted result's outputs (`result_digest` against the row's
`output_digest`) and, when the accepted row carries `flops_per_row` and `rows` (the cost model's
inputs, `ledger.credit`), its amount must be what the cost model gives for them.

Reopened tasks (issue 8). A task's entries fall into rounds, one per verdict: its credits and its
charge, then, if the task was reopened, a clawback for each of those credits and a refund of the
charge, all under the ref of the lease no longer believed. A reversed round must be reversed
whole and exactly (same node, owner, job and amount; same account and amount); it is not checked
against the accepted results, because a result clawed back is no longer accepted: the
coordinator's `accepted` document lists the results of each task's current verdict only. Only the
last round of a task, if not reversed, is the task's standing verdict, and is checked against the
accepted results as before. Credits are exactly once per (task, node, ref), so a node may be
credited for a task again after a clawback, but never twice within one round.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

VERIFIED: Final = "verified"
KINDS: Final = ("credit", "charge", "grant", "clawback", "refund")


@dataclass(slots=True)
class _Credit:
    seq: int
    node: str
    owner: str
    job: str
    task: str
    amount: int
    ref: str
    result_digest: str = ""

    @property
    def account(self) -> str:
        return self.owner

    def where(self) -> str:
        return f"seq {self.seq} (task {self.task}, node {self.node})"


@dataclass(slots=True)
class _Charge:
    seq: int
    account: str
    job: str
    task: str
    amount: int
    ref: str

    def where(self) -> str:
        return f"seq {self.seq} (charge, task {self.task})"


@dataclass(slots=True)
class _Grant:
    seq: int
    account: str
    key: str
    amount: int

    def where(self) -> str:
        return f"seq {self.seq} (grant {self.key})"


@dataclass(slots=True)
class _Clawback:
    seq: int
    account: str
    node: str
    job: str
    task: str
    amount: int
    ref: str

    def where(self) -> str:
        return f"seq {self.seq} (clawback, task {self.task}, node {self.node})"


@dataclass(slots=True)
class _Refund:
    seq: int
    account: str
    job: str
    task: str
    amount: int
    ref: str

    def where(self) -> str:
        return f"seq {self.seq} (refund, task {self.task})"


_Parsed = _Credit | _Charge | _Grant | _Clawback | _Refund
"""Not frozen, never changed: a frozen dataclass builds through object.__setattr__, and a ledger
parses millions of these (ledger verify's goal is 100,000 entries/s)."""


@dataclass(eq=False, slots=True)
class _Round:
    """One verdict of a task: what it paid, and what reversed it if the task was reopened (`ref`,
    the lease no longer believed; None while the verdict stands)."""

    ref: str | None = None
    credits: list[_Credit] = field(default_factory=list)
    charges: list[_Charge] = field(default_factory=list)
    clawbacks: list[_Clawback] = field(default_factory=list)
    refunds: list[_Refund] = field(default_factory=list)


@dataclass(slots=True)
class _Accepted:
    task: str
    job: str
    node: str
    owner: str
    task_state: str
    submitter: str  # "" for a job without a submitter (internal use): nobody is charged
    output_digest: str = ""  # "" when the row does not say
    price: tuple[int, int] | None = None  # (flops_per_row, rows) when the row carries the cost model's inputs


@dataclass(frozen=True, slots=True)
class _Task:
    """What the accepted results say about one task."""

    job: str
    state: str
    submitter: str


def find_discrepancies(entries: Sequence[Mapping[str, Any]], accepted: Sequence[Mapping[str, Any]],
                       balances: Mapping[str, Any]) -> list[str]:
    """Every way the three documents disagree, one sentence each, naming the seq, task and node.
    Entry problems come first, in entry order; then accepted results left uncredited and tasks
    left uncharged; then charges that differ from their round's credits; then balances.
    Returns [] when the ledger is consistent."""
    found: list[str] = []
    records = _accepted_records(accepted, found)
    by_key = {(r.task, r.node): r for r in records}
    tasks: dict[str, _Task] = {}
    for r in records:
        tasks.setdefault(r.task, _Task(r.job, r.task_state, r.submitter))
    items = [_parse_entry(raw) for raw in entries]
    repeats = _repeats(items)
    rounds = _rounds(items, repeats)
    _check_entries(entries, items, repeats, rounds, by_key, tasks, found)
    parsed = [p for p in items if not isinstance(p, str)]
    standing = [(p, rnd) for p, rnd in zip(items, rounds, strict=True)
                if rnd is not None and rnd.ref is None and not isinstance(p, str)]

    credited = {(c.task, c.node) for c, _ in standing if isinstance(c, _Credit)}
    for record in by_key.values():
        if record.task_state == VERIFIED and (record.task, record.node) not in credited:
            found.append(f"task {record.task} is verified and node {record.node}'s result was accepted, "
                         f"but the ledger has no credit for it")
    charged = {c.task for c, _ in standing if isinstance(c, _Charge)}
    for task_id, task in tasks.items():
        if task.state == VERIFIED and task.submitter and task_id not in charged:
            found.append(f"task {task_id} is verified and job {task.job} was submitted by {task.submitter}, "
                         f"but the ledger has no charge for it")
    for item, rnd in zip(items, rounds, strict=True):
        if isinstance(item, _Charge) and rnd is not None:
            due = sum(c.amount for c in rnd.credits)
            if item.amount != due:
                found.append(f"{item.where()}: charge of {item.amount} does not equal the task's credits, {due}")
    _check_balances(parsed, balances, found)
    _check_accounts(parsed, tasks, balances, found)
    return found


def _repeats(items: Sequence[_Parsed | str]) -> dict[int, tuple[int, str]]:
    """Index of each entry whose exactly-once key an earlier entry holds -> (that seq, the key's name)."""
    first_seq: dict[tuple[str, ...], int] = {}
    out: dict[int, tuple[int, str]] = {}
    for index, entry in enumerate(items):
        if isinstance(entry, str):
            continue
        key, what = _unique_key(entry)
        if key in first_seq:
            out[index] = (first_seq[key], what)
        else:
            first_seq[key] = entry.seq
    return out


def _rounds(items: Sequence[_Parsed | str], repeats: Mapping[int, object]) -> list[_Round | None]:
    """Each task entry's round (None for grants, malformed entries and repeats, reported alone).
    A credit or charge after a reversal opens the task's next round; a reversal under another ref
    than the one under way starts a round of its own (it then reverses nothing)."""
    current: dict[str, _Round] = {}
    out: list[_Round | None] = []
    for index, entry in enumerate(items):
        if isinstance(entry, str | _Grant) or index in repeats:
            out.append(None)
            continue
        rnd = current.get(entry.task)
        if isinstance(entry, _Credit | _Charge):
            if rnd is None or rnd.ref is not None:
                rnd = current[entry.task] = _Round()
            if isinstance(entry, _Credit):
                rnd.credits.append(entry)
            else:
                rnd.charges.append(entry)
        else:
            if rnd is None or (rnd.ref is not None and rnd.ref != entry.ref):
                rnd = current[entry.task] = _Round(ref=entry.ref)
            rnd.ref = entry.ref
            if isinstance(entry, _Clawback):
                rnd.clawbacks.append(entry)
            else:
                rnd.refunds.append(entry)
        out.append(rnd)
    return out


def _check_entries(entries: Sequence[Mapping[str, Any]], items: Sequence[_Parsed | str],
                   repeats: Mapping[int, tuple[int, str]], rounds: Sequence[_Round | None],
                   by_key: Mapping[tuple[str, str], _Accepted], tasks: Mapping[str, _Task],
                   found: list[str]) -> None:
    previous = 0
    for index, (raw, entry, rnd) in enumerate(zip(entries, items, rounds, strict=True)):
        if isinstance(entry, str):
            found.append(f"entry #{index + 1} is malformed: {entry}")
            seq = raw.get("seq") if isinstance(raw, Mapping) else None
            previous = seq if _is_int(seq) and seq > previous else previous + 1
            continue
        if entry.seq <= previous:
            found.append(f"{entry.where()}: seq does not increase, it follows seq {previous}")
        elif entry.seq > previous + 1:
            missing = str(previous + 1) if entry.seq == previous + 2 else f"{previous + 1}..{entry.seq - 1}"
            found.append(f"{entry.where()}: gap in seq, {missing} missing")
        previous = max(previous, entry.seq)

        if index in repeats:
            first, what = repeats[index]
            found.append(f"{entry.where()}: duplicate {what}, already {_verb(entry)} at seq {first}")
        if entry.amount <= 0:
            found.append(f"{entry.where()}: amount {entry.amount} is not positive")
        if rnd is None:
            continue
        if isinstance(entry, _Credit | _Charge):
            _check_once_per_round(entry, rnd, found)
        if rnd.ref is not None:
            _check_reversal(entry, rnd, found)
        elif isinstance(entry, _Credit):
            _check_against_record(entry, by_key.get((entry.task, entry.node)), tasks.get(entry.task), found)
        elif isinstance(entry, _Charge):
            _check_charge(entry, tasks.get(entry.task), found)


def _unique_key(entry: _Parsed) -> tuple[tuple[str, ...], str]:
    """The key each kind is exactly-once by (as `ledger.entries.UniqueKey`), and its name."""
    if isinstance(entry, _Credit):
        return ("credit", entry.task, entry.node, entry.ref), "credit for this (task, node)"
    if isinstance(entry, _Charge):
        return ("charge", entry.task, entry.ref), "charge for this task"
    if isinstance(entry, _Clawback):
        return ("clawback", entry.task, entry.node, entry.ref), "clawback for this (task, node, lease)"
    if isinstance(entry, _Refund):
        return ("refund", entry.task, entry.ref), "refund for this (task, lease)"
    return ("grant", entry.key), "grant under this key"


def _verb(entry: _Parsed) -> str:
    return {_Credit: "credited", _Charge: "charged", _Grant: "granted", _Clawback: "clawed back",
            _Refund: "refunded"}[type(entry)]


def _check_once_per_round(entry: _Credit | _Charge, rnd: _Round, found: list[str]) -> None:
    """A verdict pays each node once and is charged once, whatever the refs say."""
    if isinstance(entry, _Credit):
        earlier = next((c for c in rnd.credits if c.node == entry.node), entry)
        if earlier is not entry:
            found.append(f"{entry.where()}: node {entry.node} is credited again for task {entry.task} "
                         f"without a clawback of its credit at seq {earlier.seq}")
    elif rnd.charges[0] is not entry:
        found.append(f"{entry.where()}: task {entry.task} is charged again without a refund of its charge "
                     f"at seq {rnd.charges[0].seq}")


def _check_reversal(entry: _Parsed, rnd: _Round, found: list[str]) -> None:
    """Within a reversed round: every credit clawed back and the charge refunded, exactly."""
    where, ref = entry.where(), rnd.ref
    if isinstance(entry, _Credit):
        if not any(k.node == entry.node for k in rnd.clawbacks):
            found.append(f"{where}: task {entry.task} was reopened (lease {ref}), but this credit was not "
                         f"clawed back")
    elif isinstance(entry, _Charge):
        if not rnd.refunds:
            found.append(f"{where}: task {entry.task} was reopened (lease {ref}), but this charge was not refunded")
    elif isinstance(entry, _Clawback):
        credit = next((c for c in rnd.credits if c.node == entry.node), None)
        if credit is None:
            found.append(f"{where}: claws back nothing: no credit of node {entry.node} for task {entry.task} "
                         f"stands before it")
            return
        _check_same(where, "clawback", entry, credit, "owner", credit.owner, found)
    elif isinstance(entry, _Refund):
        if not rnd.charges:
            found.append(f"{where}: refunds nothing: no charge for task {entry.task} stands before it")
            return
        _check_same(where, "refund", entry, rnd.charges[0], "account", rnd.charges[0].account, found)


def _check_same(where: str, what: str, entry: _Clawback | _Refund, paid: _Credit | _Charge, name: str,
                account: str, found: list[str]) -> None:
    if entry.amount != paid.amount:
        found.append(f"{where}: {what} of {entry.amount} does not equal the {paid.amount} paid at seq {paid.seq}")
    if entry.account != account:
        found.append(f"{where}: {what} to {entry.account}, but the {name} at seq {paid.seq} is {account}")
    if entry.job != paid.job:
        found.append(f"{where}: job {entry.job} does not match job {paid.job} at seq {paid.seq}")


def _check_against_record(credit: _Credit, record: _Accepted | None, task: _Task | None,
                          found: list[str]) -> None:
    if task is None:
        found.append(f"{credit.where()}: task {credit.task} is not in the coordinator's record of accepted results")
        return
    state = record.task_state if record is not None else task.state
    if state != VERIFIED:
        found.append(f"{credit.where()}: task {credit.task} is {state!r}, not verified")
    if record is None:
        found.append(f"{credit.where()}: node {credit.node}'s result was not accepted for task {credit.task}")
        return
    if credit.job != record.job:
        found.append(f"{credit.where()}: job {credit.job} does not match the accepted result's job {record.job}")
    if credit.owner != record.owner:
        found.append(f"{credit.where()}: owner {credit.owner} does not match the accepted result's owner "
                     f"{record.owner}")
    if credit.result_digest and record.output_digest and credit.result_digest != record.output_digest:
        found.append(f"{credit.where()}: credits result {credit.result_digest[:16]}..., but the accepted "
                     f"result's outputs are {record.output_digest[:16]}...")
    if record.price is not None:
        due = _price(*record.price)
        if credit.amount != due:
            flops, rows = record.price
            found.append(f"{credit.where()}: amount {credit.amount} does not follow from the cost model: "
                         f"{rows} rows of {flops} FLOPs each are worth {due} credits")


@functools.lru_cache(maxsize=1024)
def _price(flops_per_row: int, rows: int) -> int:
    """Cached: a job's tasks share a model and mostly a row count, so a ledger has few prices."""
    # Imported here: ledger.credit loads onnx (~250 ms), needed only when the rows carry a price.
    from .credit import ModelCost, credit_amount

    return credit_amount(ModelCost(flops_per_row), rows)


def _check_charge(charge: _Charge, task: _Task | None, found: list[str]) -> None:
    if task is None:
        found.append(f"{charge.where()}: task {charge.task} is not in the coordinator's record of accepted results")
        return
    if task.state != VERIFIED:
        found.append(f"{charge.where()}: task {charge.task} is {task.state!r}, not verified")
    if charge.job != task.job:
        found.append(f"{charge.where()}: job {charge.job} does not match the task's job {task.job}")
    if not task.submitter:
        found.append(f"{charge.where()}: job {task.job} has no submitter, so nobody may be charged for it")
    elif charge.account != task.submitter:
        found.append(f"{charge.where()}: {charge.account} is charged, but job {task.job} was submitted by "
                     f"{task.submitter}")


def _check_balances(parsed: Sequence[_Parsed], balances: Mapping[str, Any], found: list[str]) -> None:
    """The contributors' view: per node, per owner and in total, credits net of clawbacks (a
    clawback subtracts its amount and one entry, as `ledger.entries.Balances` says)."""
    want_nodes: dict[tuple[str, ...], tuple[int, ...]] = {}
    want_owners: dict[tuple[str, ...], tuple[int, ...]] = {}
    total = count = 0
    for c in parsed:
        kind = type(c)  # exact types, no property calls: this loop runs once per entry
        if kind is _Credit:
            sign, account = 1, c.owner  # type: ignore[union-attr]
        elif kind is _Clawback:
            sign, account = -1, c.account
        else:
            continue
        amount = sign * c.amount
        key = (c.node, account)  # type: ignore[union-attr]
        have, entries = want_nodes.get(key, (0, 0))
        want_nodes[key] = (have + amount, entries + sign)
        have, entries = want_owners.get((account,), (0, 0))
        want_owners[(account,)] = (have + amount, entries + sign)
        total, count = total + amount, count + sign

    got_nodes = _balance_rows(balances, "nodes", ("node", "owner"), ("credits", "entries"), found)
    got_owners = _balance_rows(balances, "owners", ("owner",), ("credits", "entries"), found)
    unnamed = "no entry credits it"
    _compare_rows(want_nodes, got_nodes, lambda k: f"node {k[0]} (owner {k[1]})", _credits_phrase, found,
                  unnamed=unnamed)
    _compare_rows(want_owners, got_owners, lambda k: f"owner {k[0]}", _credits_phrase, found, unnamed=unnamed)

    if balances.get("total_credits") != total or not _is_int(balances.get("total_credits")):
        found.append(f"balance total_credits is {balances.get('total_credits')!r}, "
                     f"but the entries sum to {total}")
    if balances.get("entries") != count or not _is_int(balances.get("entries")):
        found.append(f"balance entries count is {balances.get('entries')!r}, but there are {count} credit "
                     f"entries")


_ACCOUNT_FIELDS: Final = {_Grant: 0, _Credit: 1, _Charge: 2, _Clawback: 3, _Refund: 4}
"""Where each kind adds in an account's row (granted, earned, spent, clawed_back, refunded)."""


def _check_accounts(parsed: Sequence[_Parsed], tasks: Mapping[str, _Task], balances: Mapping[str, Any],
                    found: list[str]) -> None:
    """The double entry: each account's row against its entries, and conservation of credit."""
    want: dict[tuple[str, ...], tuple[int, ...]] = {}
    for entry in parsed:
        row = list(want.get((entry.account,), (0, 0, 0, 0, 0)))
        row[_ACCOUNT_FIELDS[type(entry)]] += entry.amount
        want[(entry.account,)] = tuple(row)
    fields = ("granted", "earned", "spent", "clawed_back", "refunded", "balance")
    # An account row names clawed_back and refunded only when not zero (ledger.entries.AccountBalance).
    got_full = _balance_rows(balances, "accounts", ("account",), fields, found, optional=("clawed_back", "refunded"))
    for (account,), (*parts, balance) in got_full.items():
        if balance != _net(parts):
            found.append(f"balance for account {account} is {balance}, but {_sum_phrase(parts)} is {_net(parts)}")
    got = {key: row[:5] for key, row in got_full.items()}
    _compare_rows(want, got, lambda k: f"account {k[0]}", _account_phrase, found, unnamed="no entry names it")

    total_granted = sum(e.amount for e in parsed if isinstance(e, _Grant))
    reported = balances.get("total_granted")
    if reported != total_granted or not _is_int(reported):
        found.append(f"balance total_granted is {reported!r}, but the grants sum to {total_granted}")
        return
    if not isinstance(balances.get("accounts"), list):
        return  # already reported: there is nothing to add up
    # Credits of jobs without a submitter are paid by nobody (internal use, until every job has
    # one): they are the only credit that may exist beyond what was granted. Net of clawbacks.
    unpaid = sum(e.amount if isinstance(e, _Credit) else -e.amount for e in parsed
                 if isinstance(e, _Credit | _Clawback) and e.task in tasks and not tasks[e.task].submitter)
    held = sum(row[5] for row in got_full.values())
    off = held - total_granted - unpaid
    if off:
        beyond = f" (plus {unpaid} credited for jobs without a submitter)" if unpaid else ""
        what = f"{off} credits were made from nothing" if off > 0 else f"{-off} credits vanished"
        found.append(f"account balances add up to {held}, but {total_granted} credits were granted{beyond}: {what}")


def _net(parts: Sequence[int]) -> int:
    granted, earned, spent, clawed_back, refunded = parts
    return granted + earned - spent - clawed_back + refunded


def _sum_phrase(parts: Sequence[int]) -> str:
    granted, earned, spent, clawed_back, refunded = parts
    reversed_ = f" - clawed back {clawed_back} + refunded {refunded}" if clawed_back or refunded else ""
    return f"granted {granted} + earned {earned} - spent {spent}{reversed_}"


def _credits_phrase(row: tuple[int, ...]) -> str:
    return f"{row[0]} credits over {row[1]} entries"


def _account_phrase(row: tuple[int, ...]) -> str:
    granted, earned, spent, clawed_back, refunded = row
    reversed_ = f", clawed back {clawed_back}, refunded {refunded}" if clawed_back or refunded else ""
    return f"granted {granted}, earned {earned}, spent {spent}{reversed_}"


Rows = Mapping[tuple[str, ...], tuple[int, ...]]


def _compare_rows(want: Rows, got: Rows, who: Callable[[tuple[str, ...]], str],
                  phrase: Callable[[tuple[int, ...]], str], found: list[str], *, unnamed: str) -> None:
    for key, wanted in want.items():
        have = got.get(key)
        if have is None:
            found.append(f"balance for {who(key)} is missing; its entries sum to {phrase(wanted)}")
        elif have != wanted:
            found.append(f"balance for {who(key)} is {phrase(have)}, but its entries sum to {phrase(wanted)}")
    for key, have in got.items():
        if key not in want:
            found.append(f"balance lists {who(key)} with {phrase(have)}, but {unnamed}")


def _balance_rows(balances: Mapping[str, Any], section: str, key_fields: tuple[str, ...],
                  int_fields: tuple[str, ...], found: list[str], *,
                  optional: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Rows of one section by key; a field in `optional` may be absent and then reads 0."""
    rows = balances.get(section)
    if not isinstance(rows, list):
        found.append(f"balances have no {section!r} list")
        return {}
    result: dict[tuple[str, ...], tuple[int, ...]] = {}
    for index, row in enumerate(rows, start=1):
        key = _strings(row, key_fields)
        if isinstance(key, str) or not all(_is_int(row.get(f, 0 if f in optional else None)) for f in int_fields):
            found.append(f"balance row #{index} of {section!r} is malformed: {row!r}")
            continue
        if key in result:
            found.append(f"balance lists {section[:-1]} {' / '.join(key)} twice")
            continue
        result[key] = tuple(row.get(f, 0) for f in int_fields)
    return result


def _accepted_records(accepted: Sequence[Mapping[str, Any]], found: list[str]) -> list[_Accepted]:
    records: list[_Accepted] = []
    for index, raw in enumerate(accepted, start=1):
        fields = _strings(raw, ("task", "job", "node", "owner", "task_state"))
        if isinstance(fields, str):
            found.append(f"accepted result #{index} is malformed: {fields}")
            continue
        submitter = raw.get("submitter")
        if not isinstance(submitter, str):  # "" is valid: a job nobody is charged for
            found.append(f"accepted result #{index} is malformed: field 'submitter' is missing or not a string")
            continue
        task, job, node, owner, task_state = fields
        digest = raw.get("output_digest")
        flops, rows = raw.get("flops_per_row"), raw.get("rows")
        price = (flops, rows) if _is_int(flops) and flops > 0 and _is_int(rows) and rows >= 0 else None
        records.append(_Accepted(task, job, node, owner, task_state, submitter,
                                 digest if isinstance(digest, str) else "", price))
    return records


_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "credit": ("node", "owner", "job", "task"), "charge": ("account", "job", "task"), "grant": ("account", "key"),
    "clawback": ("account", "node", "job", "task", "ref"), "refund": ("account", "job", "task", "ref")}
"""The non-empty strings each kind must carry. A credit's or charge's `ref` is optional ("" before
issue 8, and absent from the JSON then)."""


def _parse_entry(raw: object) -> _Parsed | str:
    """A well-formed entry of a known kind, or what is wrong with it."""
    if type(raw) is not dict and not isinstance(raw, Mapping):  # the exact type first: ABC checks are slow
        return f"not an object: {raw!r}"
    kind = raw.get("kind")
    names = _FIELDS.get(kind if isinstance(kind, str) else "")
    if names is None:
        return f"field 'kind' is {kind!r}, not one of {', '.join(KINDS)}"
    fields = _strings(raw, names)
    if isinstance(fields, str):
        return fields
    seq, amount, ref = raw.get("seq"), raw.get("amount"), raw.get("ref", "")
    if not _is_int(seq):
        return f"seq {seq!r} is not an integer ({_what(str(kind), names, fields)})"
    if not _is_int(amount):
        return f"amount {amount!r} is not an integer ({_what(str(kind), names, fields)})"
    if not isinstance(ref, str):
        return f"ref {ref!r} is not a string ({_what(str(kind), names, fields)})"
    if kind == "credit":
        node, owner, job, task = fields
        digest = raw.get("result_digest")
        return _Credit(seq, node, owner, job, task, amount, ref, digest if isinstance(digest, str) else "")
    if kind == "charge":
        account, job, task = fields
        return _Charge(seq, account, job, task, amount, ref)
    if kind == "clawback":
        account, node, job, task, ref = fields
        return _Clawback(seq, account, node, job, task, amount, ref)
    if kind == "refund":
        account, job, task, ref = fields
        return _Refund(seq, account, job, task, amount, ref)
    account, key = fields
    return _Grant(seq, account, key, amount)


_GETTERS: dict[tuple[str, ...], Callable[[Mapping[str, Any]], Any]] = {}


def _what(kind: str, names: tuple[str, ...], fields: tuple[str, ...]) -> str:
    return f"{kind} " + ", ".join(f"{n} {v}" for n, v in zip(names, fields, strict=True) if n != "owner")


def _strings(raw: object, names: tuple[str, ...]) -> tuple[str, ...] | str:
    if type(raw) is dict:  # the common case, in C calls only (a ledger has millions of these)
        getter = _GETTERS.get(names) or _GETTERS.setdefault(names, operator.itemgetter(*names))
        try:
            found = getter(raw)
        except KeyError:
            pass
        else:
            found = found if type(found) is tuple else (found,)
            if "" not in found and set(map(type, found)) == {str}:
                return found  # all str: just checked
    if not isinstance(raw, Mapping):
        return f"not an object: {raw!r}"
    values: list[str] = []
    for name in names:
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            return f"field {name!r} is missing or not a non-empty string"
        values.append(value)
    return tuple(values)


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int in Python; JSON true must not pass for a count.
    return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))
