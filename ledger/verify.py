"""Pure consistency check of a ledger against the coordinator's record of accepted results.

`sparecycles ledger verify` fetches three JSON documents over HTTP (entries, accepted results,
balances) and hands them here. They come from a coordinator being audited, so nothing in them is
trusted: a missing field or a wrong type is reported as a discrepancy, never raised.

Besides the contributors' side (each credit matches an accepted result, exactly once), it checks
the double entry: each verified task of a job with a submitter is charged to that submitter exactly
the sum of the task's credits, account balances equal the sums of their entries, and together they
add up to the credit granted - plus, until every job has a submitter, the credits of jobs without
one, which nobody pays for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

VERIFIED: Final = "verified"
KINDS: Final = ("credit", "charge", "grant")


@dataclass(frozen=True, slots=True)
class _Credit:
    seq: int
    node: str
    owner: str
    job: str
    task: str
    amount: int

    @property
    def account(self) -> str:
        return self.owner

    def where(self) -> str:
        return f"seq {self.seq} (task {self.task}, node {self.node})"


@dataclass(frozen=True, slots=True)
class _Charge:
    seq: int
    account: str
    job: str
    task: str
    amount: int

    def where(self) -> str:
        return f"seq {self.seq} (charge, task {self.task})"


@dataclass(frozen=True, slots=True)
class _Grant:
    seq: int
    account: str
    key: str
    amount: int

    def where(self) -> str:
        return f"seq {self.seq} (grant {self.key})"


_Parsed = _Credit | _Charge | _Grant


@dataclass(frozen=True, slots=True)
class _Accepted:
    task: str
    job: str
    node: str
    owner: str
    task_state: str
    submitter: str  # "" for a job without a submitter (internal use): nobody is charged


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
    left uncharged; then charges that differ from their task's credits; then balances.
    Returns [] when the ledger is consistent."""
    found: list[str] = []
    records = _accepted_records(accepted, found)
    by_key = {(r.task, r.node): r for r in records}
    tasks: dict[str, _Task] = {}
    for r in records:
        tasks.setdefault(r.task, _Task(r.job, r.task_state, r.submitter))
    parsed = _check_entries(entries, by_key, tasks, found)
    credits = [p for p in parsed if isinstance(p, _Credit)]
    charges = [p for p in parsed if isinstance(p, _Charge)]

    credited = {(c.task, c.node) for c in credits}
    for record in by_key.values():
        if record.task_state == VERIFIED and (record.task, record.node) not in credited:
            found.append(f"task {record.task} is verified and node {record.node}'s result was accepted, "
                         f"but the ledger has no credit for it")
    charged = {c.task for c in charges}
    for task_id, task in tasks.items():
        if task.state == VERIFIED and task.submitter and task_id not in charged:
            found.append(f"task {task_id} is verified and job {task.job} was submitted by {task.submitter}, "
                         f"but the ledger has no charge for it")
    _check_charges_pay_credits(charges, credits, found)
    _check_balances(credits, balances, found)
    _check_accounts(parsed, tasks, balances, found)
    return found


def _check_entries(entries: Sequence[Mapping[str, Any]], by_key: Mapping[tuple[str, str], _Accepted],
                   tasks: Mapping[str, _Task], found: list[str]) -> list[_Parsed]:
    parsed: list[_Parsed] = []
    first_seq: dict[tuple[str, ...], int] = {}
    previous = 0
    for index, raw in enumerate(entries, start=1):
        entry = _parse_entry(raw)
        if isinstance(entry, str):
            found.append(f"entry #{index} is malformed: {entry}")
            seq = raw.get("seq") if isinstance(raw, Mapping) else None
            previous = seq if _is_int(seq) and seq > previous else previous + 1
            continue
        where = entry.where()
        if entry.seq <= previous:
            found.append(f"{where}: seq does not increase, it follows seq {previous}")
        elif entry.seq > previous + 1:
            missing = str(previous + 1) if entry.seq == previous + 2 else f"{previous + 1}..{entry.seq - 1}"
            found.append(f"{where}: gap in seq, {missing} missing")
        previous = max(previous, entry.seq)

        key, what = _unique_key(entry)
        if key in first_seq:
            found.append(f"{where}: duplicate {what}, already {_verb(entry)} at seq {first_seq[key]}")
        else:
            first_seq[key] = entry.seq
        if entry.amount <= 0:
            found.append(f"{where}: amount {entry.amount} is not positive")
        if isinstance(entry, _Credit):
            _check_against_record(entry, by_key.get((entry.task, entry.node)), tasks.get(entry.task), found)
        elif isinstance(entry, _Charge):
            _check_charge(entry, tasks.get(entry.task), found)
        parsed.append(entry)
    return parsed


def _unique_key(entry: _Parsed) -> tuple[tuple[str, ...], str]:
    """The key each kind is exactly-once by (as `ledger.entries.UniqueKey`), and its name."""
    if isinstance(entry, _Credit):
        return ("credit", entry.task, entry.node), "credit for this (task, node)"
    if isinstance(entry, _Charge):
        return ("charge", entry.task), "charge for this task"
    return ("grant", entry.key), "grant under this key"


def _verb(entry: _Parsed) -> str:
    return {_Credit: "credited", _Charge: "charged", _Grant: "granted"}[type(entry)]


def _check_against_record(credit: _Credit, record: _Accepted | None, task: _Task | None,
                          found: list[str]) -> None:
    where = credit.where()
    if task is None:
        found.append(f"{where}: task {credit.task} is not in the coordinator's record of accepted results")
        return
    state = record.task_state if record is not None else task.state
    if state != VERIFIED:
        found.append(f"{where}: task {credit.task} is {state!r}, not verified")
    if record is None:
        found.append(f"{where}: node {credit.node}'s result was not accepted for task {credit.task}")
        return
    if credit.job != record.job:
        found.append(f"{where}: job {credit.job} does not match the accepted result's job {record.job}")
    if credit.owner != record.owner:
        found.append(f"{where}: owner {credit.owner} does not match the accepted result's owner "
                     f"{record.owner}")


def _check_charge(charge: _Charge, task: _Task | None, found: list[str]) -> None:
    where = charge.where()
    if task is None:
        found.append(f"{where}: task {charge.task} is not in the coordinator's record of accepted results")
        return
    if task.state != VERIFIED:
        found.append(f"{where}: task {charge.task} is {task.state!r}, not verified")
    if charge.job != task.job:
        found.append(f"{where}: job {charge.job} does not match the task's job {task.job}")
    if not task.submitter:
        found.append(f"{where}: job {task.job} has no submitter, so nobody may be charged for it")
    elif charge.account != task.submitter:
        found.append(f"{where}: {charge.account} is charged, but job {task.job} was submitted by "
                     f"{task.submitter}")


def _check_charges_pay_credits(charges: Sequence[_Charge], credits: Sequence[_Credit], found: list[str]) -> None:
    paid: dict[str, int] = {}
    for c in credits:
        paid[c.task] = paid.get(c.task, 0) + c.amount
    for charge in charges:
        due = paid.get(charge.task, 0)
        if charge.amount != due:
            found.append(f"{charge.where()}: charge of {charge.amount} does not equal the task's credits, {due}")


def _check_balances(credits: Sequence[_Credit], balances: Mapping[str, Any], found: list[str]) -> None:
    """The contributors' view: per node, per owner and in total, over credit entries only."""
    want_nodes: dict[tuple[str, ...], tuple[int, ...]] = {}
    want_owners: dict[tuple[str, ...], tuple[int, ...]] = {}
    for c in credits:
        amount, count = want_nodes.get((c.node, c.owner), (0, 0))
        want_nodes[(c.node, c.owner)] = (amount + c.amount, count + 1)
        amount, count = want_owners.get((c.owner,), (0, 0))
        want_owners[(c.owner,)] = (amount + c.amount, count + 1)

    got_nodes = _balance_rows(balances, "nodes", ("node", "owner"), ("credits", "entries"), found)
    got_owners = _balance_rows(balances, "owners", ("owner",), ("credits", "entries"), found)
    unnamed = "no entry credits it"
    _compare_rows(want_nodes, got_nodes, lambda k: f"node {k[0]} (owner {k[1]})", _credits_phrase, found,
                  unnamed=unnamed)
    _compare_rows(want_owners, got_owners, lambda k: f"owner {k[0]}", _credits_phrase, found, unnamed=unnamed)

    total, count = sum(c.amount for c in credits), len(credits)
    if balances.get("total_credits") != total or not _is_int(balances.get("total_credits")):
        found.append(f"balance total_credits is {balances.get('total_credits')!r}, "
                     f"but the entries sum to {total}")
    if balances.get("entries") != count or not _is_int(balances.get("entries")):
        found.append(f"balance entries count is {balances.get('entries')!r}, but there are {count} credit "
                     f"entries")


def _check_accounts(parsed: Sequence[_Parsed], tasks: Mapping[str, _Task], balances: Mapping[str, Any],
                    found: list[str]) -> None:
    """The double entry: each account's row against its entries, and conservation of credit."""
    want: dict[tuple[str, ...], tuple[int, ...]] = {}
    for entry in parsed:
        granted, earned, spent = want.get((entry.account,), (0, 0, 0))
        if isinstance(entry, _Grant):
            granted += entry.amount
        elif isinstance(entry, _Credit):
            earned += entry.amount
        else:
            spent += entry.amount
        want[(entry.account,)] = (granted, earned, spent)
    fields = ("granted", "earned", "spent", "balance")
    got_full = _balance_rows(balances, "accounts", ("account",), fields, found)
    for (account,), (granted, earned, spent, balance) in got_full.items():
        if balance != granted + earned - spent:
            found.append(f"balance for account {account} is {balance}, but granted {granted} + earned {earned} "
                         f"- spent {spent} is {granted + earned - spent}")
    got = {key: row[:3] for key, row in got_full.items()}
    _compare_rows(want, got, lambda k: f"account {k[0]}", _account_phrase, found, unnamed="no entry names it")

    total_granted = sum(e.amount for e in parsed if isinstance(e, _Grant))
    reported = balances.get("total_granted")
    if reported != total_granted or not _is_int(reported):
        found.append(f"balance total_granted is {reported!r}, but the grants sum to {total_granted}")
        return
    if not isinstance(balances.get("accounts"), list):
        return  # already reported: there is nothing to add up
    # Credits of jobs without a submitter are paid by nobody (internal use, until every job has
    # one): they are the only credit that may exist beyond what was granted.
    unpaid = sum(e.amount for e in parsed if isinstance(e, _Credit)
                 and e.task in tasks and not tasks[e.task].submitter)
    held = sum(row[3] for row in got_full.values())
    off = held - total_granted - unpaid
    if off:
        beyond = f" (plus {unpaid} credited for jobs without a submitter)" if unpaid else ""
        what = f"{off} credits were made from nothing" if off > 0 else f"{-off} credits vanished"
        found.append(f"account balances add up to {held}, but {total_granted} credits were granted{beyond}: {what}")


def _credits_phrase(row: tuple[int, ...]) -> str:
    return f"{row[0]} credits over {row[1]} entries"


def _account_phrase(row: tuple[int, ...]) -> str:
    return f"granted {row[0]}, earned {row[1]}, spent {row[2]}"


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
                  int_fields: tuple[str, ...], found: list[str]) -> dict[tuple[str, ...], tuple[int, ...]]:
    rows = balances.get(section)
    if not isinstance(rows, list):
        found.append(f"balances have no {section!r} list")
        return {}
    result: dict[tuple[str, ...], tuple[int, ...]] = {}
    for index, row in enumerate(rows, start=1):
        key = _strings(row, key_fields)
        if isinstance(key, str) or not all(_is_int(row.get(f)) for f in int_fields):
            found.append(f"balance row #{index} of {section!r} is malformed: {row!r}")
            continue
        if key in result:
            found.append(f"balance lists {section[:-1]} {' / '.join(key)} twice")
            continue
        result[key] = tuple(row[f] for f in int_fields)
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
        records.append(_Accepted(task, job, node, owner, task_state, submitter))
    return records


def _parse_entry(raw: object) -> _Parsed | str:
    """A well-formed entry of a known kind, or what is wrong with it."""
    if not isinstance(raw, Mapping):
        return f"not an object: {raw!r}"
    kind = raw.get("kind")
    names = {"credit": ("node", "owner", "job", "task"), "charge": ("account", "job", "task"),
             "grant": ("account", "key")}.get(kind if isinstance(kind, str) else "")
    if names is None:
        return f"field 'kind' is {kind!r}, not one of {', '.join(KINDS)}"
    fields = _strings(raw, names)
    if isinstance(fields, str):
        return fields
    seq, amount = raw.get("seq"), raw.get("amount")
    what = f"{kind} " + ", ".join(f"{n} {v}" for n, v in zip(names, fields, strict=True) if n != "owner")
    if not _is_int(seq):
        return f"seq {seq!r} is not an integer ({what})"
    if not _is_int(amount):
        return f"amount {amount!r} is not an integer ({what})"
    if kind == "credit":
        node, owner, job, task = fields
        return _Credit(seq, node, owner, job, task, amount)
    if kind == "charge":
        account, job, task = fields
        return _Charge(seq, account, job, task, amount)
    account, key = fields
    return _Grant(seq, account, key, amount)


def _strings(raw: object, names: tuple[str, ...]) -> tuple[str, ...] | str:
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
    return isinstance(value, int) and not isinstance(value, bool)
