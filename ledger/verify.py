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

import contextlib
import functools
import gc
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

VERIFIED: Final = "verified"
KINDS: Final = ("credit", "charge", "grant", "clawback", "refund")


@dataclass(slots=True)
class CreditEntry:
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
class ChargeEntry:
    seq: int
    account: str
    job: str
    task: str
    amount: int
    ref: str

    def where(self) -> str:
        return f"seq {self.seq} (charge, task {self.task})"


@dataclass(slots=True)
class GrantEntry:
    seq: int
    account: str
    key: str
    amount: int

    def where(self) -> str:
        return f"seq {self.seq} (grant {self.key})"


@dataclass(slots=True)
class ClawbackEntry:
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
class RefundEntry:
    seq: int
    account: str
    job: str
    task: str
    amount: int
    ref: str

    def where(self) -> str:
        return f"seq {self.seq} (refund, task {self.task})"


ParsedEntry = CreditEntry | ChargeEntry | GrantEntry | ClawbackEntry | RefundEntry
"""Not frozen, never changed: a frozen dataclass builds through object.__setattr__, and a ledger
parses millions of these (ledger verify's goal is 100,000 entries/s)."""


@dataclass(eq=False, slots=True)
class _Round:
    """One verdict of a task: what it paid, and what reversed it if the task was reopened (`ref`,
    the lease no longer believed; None while the verdict stands)."""

    ref: str | None = None
    credits: list[CreditEntry] = field(default_factory=list)
    charges: list[ChargeEntry] = field(default_factory=list)
    clawbacks: list[ClawbackEntry] = field(default_factory=list)
    refunds: list[RefundEntry] = field(default_factory=list)


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


@dataclass(slots=True)
class _Task:
    """What the accepted results say about one task (not frozen, for the reason ParsedEntry says)."""

    job: str
    state: str
    submitter: str


def find_discrepancies(entries: Sequence[Mapping[str, Any]], accepted: Sequence[Mapping[str, Any]],
                       balances: Mapping[str, Any], *,
                       parsed: Sequence[ParsedEntry | str] | None = None) -> list[str]:
    """Every way the three documents disagree, one sentence each, naming the seq, task and node.
    Entry problems come first, in entry order; then accepted results left uncredited and tasks
    left uncharged; then charges that differ from their round's credits; then balances.
    Returns [] when the ledger is consistent.

    `parsed`, when given, must be `parse_entries(entries)`: a caller that parsed the entries
    already (`ledger.outside`, to rebuild their leaves) saves parsing them twice."""
    with collector_paused():
        return _find_discrepancies(entries, accepted, balances, parsed)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a check runs. A check allocates a few objects per
    entry and frees none of them until it ends, so every collection would walk them all again for
    nothing (on a large ledger, about a third of the check's time); they form no reference
    cycles, so nothing is left for the collector once the check is over."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _find_discrepancies(entries: Sequence[Mapping[str, Any]], accepted: Sequence[Mapping[str, Any]],
                        balances: Mapping[str, Any], parsed: Sequence[ParsedEntry | str] | None) -> list[str]:
    found: list[str] = []
    by_key, tasks = _accepted_index(accepted, found)
    items = parse_entries(entries) if parsed is None else parsed
    if len(items) != len(entries):
        raise ValueError(f"parsed holds {len(items)} entries, not the {len(entries)} given")
    repeats, rounds = _rounds(items)
    _check_entries(entries, items, repeats, rounds, by_key, tasks, found)
    tally = _tally(items, rounds, tasks)

    for record in by_key.values():
        if record.task_state == VERIFIED and (record.task, record.node) not in tally.credited:
            found.append(f"task {record.task} is verified and node {record.node}'s result was accepted, "
                         f"but the ledger has no credit for it")
    for task_id, task in tasks.items():
        if task.state == VERIFIED and task.submitter and task_id not in tally.charged:
            found.append(f"task {task_id} is verified and job {task.job} was submitted by {task.submitter}, "
                         f"but the ledger has no charge for it")
    found.extend(tally.charges_off)
    _check_balances(tally, balances, found)
    _check_accounts(tally, balances, found)
    return found


_REPEATED: Final = {
    CreditEntry: "credit for this (task, node)", ChargeEntry: "charge for this task",
    ClawbackEntry: "clawback for this (task, node, lease)", RefundEntry: "refund for this (task, lease)",
    GrantEntry: "grant under this key"}
"""The name of the key each kind is exactly-once by (as `ledger.entries.UniqueKey`)."""


def _rounds(items: Sequence[ParsedEntry | str]) -> tuple[dict[int, tuple[int, str]], list[_Round | None]]:
    """In one pass: the index of each entry whose exactly-once key an earlier entry holds -> (that
    seq, the key's name); and each entry's round (None for grants, malformed entries and repeats,
    reported alone). A credit or charge after a reversal opens the task's next round; a reversal
    under another ref than the one under way starts a round of its own (it then reverses nothing)."""
    first_seq: dict[tuple[str, ...], int] = {}
    repeats: dict[int, tuple[int, str]] = {}
    current: dict[str, _Round] = {}
    out: list[_Round | None] = []
    append = out.append
    for index, entry in enumerate(items):
        if isinstance(entry, CreditEntry):  # the common kinds' keys built here, not by a call
            key: tuple[str, ...] = ("credit", entry.task, entry.node, entry.ref)
        elif isinstance(entry, ChargeEntry):
            key = ("charge", entry.task, entry.ref)
        elif isinstance(entry, str):
            append(None)
            continue
        else:
            key = _reversal_or_grant_key(entry)
        first = first_seq.get(key)
        if first is not None:
            repeats[index] = (first, _REPEATED[type(entry)])
            append(None)
            continue
        first_seq[key] = entry.seq
        if isinstance(entry, GrantEntry):
            append(None)
            continue
        rnd = current.get(entry.task)
        if isinstance(entry, CreditEntry | ChargeEntry):
            if rnd is None or rnd.ref is not None:
                rnd = current[entry.task] = _Round()
            if isinstance(entry, CreditEntry):
                rnd.credits.append(entry)
            else:
                rnd.charges.append(entry)
        else:
            if rnd is None or (rnd.ref is not None and rnd.ref != entry.ref):
                rnd = current[entry.task] = _Round(ref=entry.ref)
            rnd.ref = entry.ref
            if isinstance(entry, ClawbackEntry):
                rnd.clawbacks.append(entry)
            else:
                rnd.refunds.append(entry)
        append(rnd)
    return repeats, out


def _reversal_or_grant_key(entry: ClawbackEntry | RefundEntry | GrantEntry) -> tuple[str, ...]:
    """The key these kinds are exactly-once by (as `ledger.entries.UniqueKey`); credits' and
    charges', the bulk of a ledger, are built inline in `_rounds`."""
    if isinstance(entry, ClawbackEntry):
        return ("clawback", entry.task, entry.node, entry.ref)
    if isinstance(entry, RefundEntry):
        return ("refund", entry.task, entry.ref)
    return ("grant", entry.key)


def _check_entries(entries: Sequence[Mapping[str, Any]], items: Sequence[ParsedEntry | str],
                   repeats: Mapping[int, tuple[int, str]], rounds: Sequence[_Round | None],
                   by_key: Mapping[tuple[str, str], _Accepted], tasks: Mapping[str, _Task],
                   found: list[str]) -> None:
    previous = 0
    for index, (entry, rnd) in enumerate(zip(items, rounds, strict=True)):
        if isinstance(entry, str):
            found.append(f"entry #{index + 1} is malformed: {entry}")
            raw = entries[index]
            seq = raw.get("seq") if isinstance(raw, Mapping) else None
            previous = seq if _is_int(seq) and seq > previous else previous + 1
            continue
        seq = entry.seq
        if seq <= previous:
            found.append(f"{entry.where()}: seq does not increase, it follows seq {previous}")
        elif seq > previous + 1:
            missing = str(previous + 1) if seq == previous + 2 else f"{previous + 1}..{seq - 1}"
            found.append(f"{entry.where()}: gap in seq, {missing} missing")
        if seq > previous:
            previous = seq

        if repeats and index in repeats:
            first, what = repeats[index]
            found.append(f"{entry.where()}: duplicate {what}, already {_verb(entry)} at seq {first}")
        if entry.amount <= 0:
            found.append(f"{entry.where()}: amount {entry.amount} is not positive")
        if rnd is None:
            continue
        if isinstance(entry, CreditEntry):
            node = entry.node
            for earlier in rnd.credits:  # a verdict pays each node once, whatever the refs say
                if earlier.node == node:
                    break
            if earlier is not entry:
                found.append(f"{entry.where()}: node {node} is credited again for task {entry.task} "
                             f"without a clawback of its credit at seq {earlier.seq}")
            if rnd.ref is None:
                _check_against_record(entry, by_key.get((entry.task, node)), tasks.get(entry.task), found)
                continue
        elif isinstance(entry, ChargeEntry):
            if rnd.charges[0] is not entry:  # and is charged once
                found.append(f"{entry.where()}: task {entry.task} is charged again without a refund of its "
                             f"charge at seq {rnd.charges[0].seq}")
            if rnd.ref is None:
                _check_charge(entry, tasks.get(entry.task), found)
                continue
        _check_reversal(entry, rnd, found)


def _verb(entry: ParsedEntry) -> str:
    return {CreditEntry: "credited", ChargeEntry: "charged", GrantEntry: "granted", ClawbackEntry: "clawed back",
            RefundEntry: "refunded"}[type(entry)]


def _check_reversal(entry: ParsedEntry, rnd: _Round, found: list[str]) -> None:
    """Within a reversed round: every credit clawed back and the charge refunded, exactly."""
    where, ref = entry.where(), rnd.ref
    if isinstance(entry, CreditEntry):
        if not any(k.node == entry.node for k in rnd.clawbacks):
            found.append(f"{where}: task {entry.task} was reopened (lease {ref}), but this credit was not "
                         f"clawed back")
    elif isinstance(entry, ChargeEntry):
        if not rnd.refunds:
            found.append(f"{where}: task {entry.task} was reopened (lease {ref}), but this charge was not refunded")
    elif isinstance(entry, ClawbackEntry):
        credit = next((c for c in rnd.credits if c.node == entry.node), None)
        if credit is None:
            found.append(f"{where}: claws back nothing: no credit of node {entry.node} for task {entry.task} "
                         f"stands before it")
            return
        _check_same(where, "clawback", entry, credit, "owner", credit.owner, found)
    elif isinstance(entry, RefundEntry):
        if not rnd.charges:
            found.append(f"{where}: refunds nothing: no charge for task {entry.task} stands before it")
            return
        _check_same(where, "refund", entry, rnd.charges[0], "account", rnd.charges[0].account, found)


def _check_same(where: str, what: str, entry: ClawbackEntry | RefundEntry, paid: CreditEntry | ChargeEntry, name: str,
                account: str, found: list[str]) -> None:
    if entry.amount != paid.amount:
        found.append(f"{where}: {what} of {entry.amount} does not equal the {paid.amount} paid at seq {paid.seq}")
    if entry.account != account:
        found.append(f"{where}: {what} to {entry.account}, but the {name} at seq {paid.seq} is {account}")
    if entry.job != paid.job:
        found.append(f"{where}: job {entry.job} does not match job {paid.job} at seq {paid.seq}")


def _check_against_record(credit: CreditEntry, record: _Accepted | None, task: _Task | None,
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


def _check_charge(charge: ChargeEntry, task: _Task | None, found: list[str]) -> None:
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


@dataclass(eq=False, slots=True)
class _Tally:
    """What the entries add up to, summed in one pass (`_tally`)."""

    nodes: dict[tuple[str, ...], list[int]] = field(default_factory=dict)  # (node, owner) -> [credits, entries]
    owners: dict[str, list[int]] = field(default_factory=dict)  # owner -> [credits, entries]
    total: int = 0
    count: int = 0
    accounts: dict[str, list[int]] = field(default_factory=dict)  # granted, earned, spent, clawed_back, refunded
    granted: int = 0
    unpaid: int = 0  # credits of jobs without a submitter, net of clawbacks
    credited: set[tuple[str, str]] = field(default_factory=set)  # (task, node) of standing credits
    charged: set[str] = field(default_factory=set)  # tasks of standing charges
    charges_off: list[str] = field(default_factory=list)  # charges that differ from their round's credits


_ACCOUNT_FIELDS: Final = {GrantEntry: 0, CreditEntry: 1, ChargeEntry: 2, ClawbackEntry: 3, RefundEntry: 4}
"""Where each kind adds in an account's row (granted, earned, spent, clawed_back, refunded)."""


def _tally(items: Sequence[ParsedEntry | str], rounds: Sequence[_Round | None], tasks: Mapping[str, _Task]) -> _Tally:
    """Every well-formed entry counts towards the sums, repeats included: the balances a coordinator
    serves sum what its log holds, and the repeat itself is reported on its own. A standing entry
    is one in a round not reversed."""
    t = _Tally()
    nodes, owners, accounts, credited, charged = t.nodes, t.owners, t.accounts, t.credited, t.charged
    total = count = granted = unpaid = 0
    for entry, rnd in zip(items, rounds, strict=True):
        if isinstance(entry, (CreditEntry, ClawbackEntry)):
            # The contributors' view: credits net of clawbacks (a clawback subtracts its amount
            # and one entry, as `ledger.entries.Balances` says).
            amount = entry.amount
            if isinstance(entry, CreditEntry):
                sign, signed, account, column = 1, amount, entry.owner, 1
                if rnd is not None and rnd.ref is None:
                    credited.add((entry.task, entry.node))
            else:
                sign, signed, account, column = -1, -amount, entry.account, 3
            key = (entry.node, account)
            have = nodes.get(key)
            if have is None:
                nodes[key] = [signed, sign]
            else:
                have[0] += signed
                have[1] += sign
            have = owners.get(account)
            if have is None:
                owners[account] = [signed, sign]
            else:
                have[0] += signed
                have[1] += sign
            total += signed
            count += sign
            task = tasks.get(entry.task)
            if task is not None and not task.submitter:
                unpaid += signed
        elif isinstance(entry, str):
            continue
        else:
            account, amount, column = entry.account, entry.amount, _ACCOUNT_FIELDS[type(entry)]
            if isinstance(entry, ChargeEntry) and rnd is not None:
                if rnd.ref is None:
                    charged.add(entry.task)
                due = 0
                for credit in rnd.credits:
                    due += credit.amount
                if amount != due:
                    t.charges_off.append(f"{entry.where()}: charge of {amount} does not equal the task's credits, "
                                         f"{due}")
            elif isinstance(entry, GrantEntry):
                granted += amount
        row = accounts.get(account)
        if row is None:
            row = accounts[account] = [0, 0, 0, 0, 0]
        row[column] += amount
    t.total, t.count, t.granted, t.unpaid = total, count, granted, unpaid
    return t


def _check_balances(tally: _Tally, balances: Mapping[str, Any], found: list[str]) -> None:
    """The contributors' view: per node, per owner and in total, credits net of clawbacks."""
    want_nodes = {key: tuple(row) for key, row in tally.nodes.items()}
    want_owners: Rows = {(owner,): tuple(row) for owner, row in tally.owners.items()}
    got_nodes = _balance_rows(balances, "nodes", ("node", "owner"), ("credits", "entries"), found)
    got_owners = _balance_rows(balances, "owners", ("owner",), ("credits", "entries"), found)
    unnamed = "no entry credits it"
    _compare_rows(want_nodes, got_nodes, lambda k: f"node {k[0]} (owner {k[1]})", _credits_phrase, found,
                  unnamed=unnamed)
    _compare_rows(want_owners, got_owners, lambda k: f"owner {k[0]}", _credits_phrase, found, unnamed=unnamed)

    total, count = tally.total, tally.count
    if balances.get("total_credits") != total or not _is_int(balances.get("total_credits")):
        found.append(f"balance total_credits is {balances.get('total_credits')!r}, "
                     f"but the entries sum to {total}")
    if balances.get("entries") != count or not _is_int(balances.get("entries")):
        found.append(f"balance entries count is {balances.get('entries')!r}, but there are {count} credit "
                     f"entries")


def _check_accounts(tally: _Tally, balances: Mapping[str, Any], found: list[str]) -> None:
    """The double entry: each account's row against its entries, and conservation of credit."""
    want: Rows = {(account,): tuple(row) for account, row in tally.accounts.items()}
    fields = ("granted", "earned", "spent", "clawed_back", "refunded", "balance")
    # An account row names clawed_back and refunded only when not zero (ledger.entries.AccountBalance).
    got_full = _balance_rows(balances, "accounts", ("account",), fields, found, optional=("clawed_back", "refunded"))
    for (account,), (*parts, balance) in got_full.items():
        if balance != _net(parts):
            found.append(f"balance for account {account} is {balance}, but {_sum_phrase(parts)} is {_net(parts)}")
    got = {key: row[:5] for key, row in got_full.items()}
    _compare_rows(want, got, lambda k: f"account {k[0]}", _account_phrase, found, unnamed="no entry names it")

    total_granted = tally.granted
    reported = balances.get("total_granted")
    if reported != total_granted or not _is_int(reported):
        found.append(f"balance total_granted is {reported!r}, but the grants sum to {total_granted}")
        return
    if not isinstance(balances.get("accounts"), list):
        return  # already reported: there is nothing to add up
    # Credits of jobs without a submitter are paid by nobody (internal use, until every job has
    # one): they are the only credit that may exist beyond what was granted. Net of clawbacks.
    unpaid = tally.unpaid
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
    width = len(key_fields)
    # The common row, a dict with every field of its exact type, is checked in C calls only; any
    # other row goes the careful way below, which says what is wrong with it.
    getter = operator.itemgetter(*key_fields, *int_fields) if not optional else None
    types = (str,) * width + (int,) * len(int_fields)
    for index, row in enumerate(rows, start=1):
        if getter is not None and type(row) is dict:
            try:
                values = getter(row)
            except KeyError:
                pass
            else:
                if tuple(map(type, values)) == types and "" not in values:
                    key = values[:width]
                    if key in result:
                        found.append(f"balance lists {section[:-1]} {' / '.join(key)} twice")
                    else:
                        result[key] = values[width:]
                    continue
        key = _strings(row, key_fields)
        if isinstance(key, str) or not all(_is_int(row.get(f, 0 if f in optional else None)) for f in int_fields):
            found.append(f"balance row #{index} of {section!r} is malformed: {row!r}")
            continue
        if key in result:
            found.append(f"balance lists {section[:-1]} {' / '.join(key)} twice")
            continue
        result[key] = tuple(row.get(f, 0) for f in int_fields)
    return result


_ACCEPTED_NAMES: Final = ("task", "job", "node", "owner", "task_state")
_ACCEPTED_GET: Final = operator.itemgetter(*_ACCEPTED_NAMES)


def _accepted_index(accepted: Sequence[Mapping[str, Any]],
                    found: list[str]) -> tuple[dict[tuple[str, str], _Accepted], dict[str, _Task]]:
    """The accepted results by (task, node), the last row winning; and each task as its first
    row says."""
    by_key: dict[tuple[str, str], _Accepted] = {}
    tasks: dict[str, _Task] = {}
    for index, raw in enumerate(accepted, start=1):
        fields: tuple[str, ...] | str | None = None
        if type(raw) is dict:  # the common row, in C calls only: a dict with five non-empty str
            try:
                fields = _ACCEPTED_GET(raw)
            except KeyError:
                pass
            else:
                if tuple(map(type, fields)) != _FIVE_STR or "" in fields:
                    fields = None
        if fields is None:
            fields = _strings(raw, _ACCEPTED_NAMES)
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
        price = (flops, rows) if (type(flops) is int or _is_int(flops)) and flops > 0 \
            and (type(rows) is int or _is_int(rows)) and rows >= 0 else None
        by_key[(task, node)] = _Accepted(task, job, node, owner, task_state, submitter,
                                         digest if isinstance(digest, str) else "", price)
        if task not in tasks:
            tasks[task] = _Task(job, task_state, submitter)
    return by_key, tasks


_FIVE_STR: Final = (str,) * 5


_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "credit": ("node", "owner", "job", "task"), "charge": ("account", "job", "task"), "grant": ("account", "key"),
    "clawback": ("account", "node", "job", "task", "ref"), "refund": ("account", "job", "task", "ref")}
"""The non-empty strings each kind must carry. A credit's or charge's `ref` is optional ("" before
issue 8, and absent from the JSON then)."""


_FAST: Final[Mapping[str, tuple[Callable[[Mapping[str, Any]], Any], tuple[type, ...]]]] = {
    # kind -> (the fields the parsed entry is built from, in its order; their exact types)
    "credit": (operator.itemgetter("seq", "node", "owner", "job", "task", "amount"), (int, str, str, str, str, int)),
    "charge": (operator.itemgetter("seq", "account", "job", "task", "amount"), (int, str, str, str, int)),
    "grant": (operator.itemgetter("seq", "account", "key", "amount"), (int, str, str, int)),
    "clawback": (operator.itemgetter("seq", "account", "node", "job", "task", "amount", "ref"),
                 (int, str, str, str, str, int, str)),
    "refund": (operator.itemgetter("seq", "account", "job", "task", "amount", "ref"), (int, str, str, str, int, str)),
}


def parse_entries(entries: Iterable[object]) -> list[ParsedEntry | str]:
    """Each entry as `find_discrepancies` reads it, or what is wrong with it.

    An entry as the coordinator writes it (a dict whose fields have their exact JSON types) is
    checked in a few C calls; anything else, or anything that fails them, goes through
    `_parse_entry`, which accepts exactly the same entries and says what is wrong with the others.
    A ledger has millions of entries: this is most of the cost of checking one."""
    out: list[ParsedEntry | str] = []
    append = out.append
    fast = _FAST.get
    for raw in entries:
        item: ParsedEntry | None = None
        if type(raw) is dict:
            kind = raw.get("kind")
            spec = fast(kind) if type(kind) is str else None
            if spec is not None:
                getter, types = spec
                values: tuple[Any, ...]
                try:
                    values = getter(raw)
                except KeyError:
                    values = ()
                ref = raw.get("ref", "")
                # Exact types (no bool for an int, no str subclass) and no empty name: what
                # _parse_entry demands, and what it would build from.
                if tuple(map(type, values)) == types and "" not in values and type(ref) is str:
                    if kind == "credit":
                        digest = raw.get("result_digest", "")
                        if type(digest) is str:
                            seq, node, owner, job, task, amount = values
                            item = CreditEntry(seq, node, owner, job, task, amount, ref, digest)
                    elif kind == "charge":
                        seq, account, job, task, amount = values
                        item = ChargeEntry(seq, account, job, task, amount, ref)
                    elif kind == "grant":
                        item = GrantEntry(*values)
                    elif kind == "clawback":
                        item = ClawbackEntry(*values)
                    else:
                        item = RefundEntry(*values)
        append(_parse_entry(raw) if item is None else item)
    return out


def _parse_entry(raw: object) -> ParsedEntry | str:
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
        return CreditEntry(seq, node, owner, job, task, amount, ref, digest if isinstance(digest, str) else "")
    if kind == "charge":
        account, job, task = fields
        return ChargeEntry(seq, account, job, task, amount, ref)
    if kind == "clawback":
        account, node, job, task, ref = fields
        return ClawbackEntry(seq, account, node, job, task, amount, ref)
    if kind == "refund":
        account, job, task, ref = fields
        return RefundEntry(seq, account, job, task, amount, ref)
    account, key = fields
    return GrantEntry(seq, account, key, amount)


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
