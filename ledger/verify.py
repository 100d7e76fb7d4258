"""Pure consistency check of a ledger against the coordinator's record of accepted results.

`sparecycles ledger verify` fetches three JSON documents over HTTP (entries, accepted results,
balances) and hands them here. They come from a coordinator being audited, so nothing in them is
trusted: a missing field or a wrong type is reported as a discrepancy, never raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

VERIFIED: Final = "verified"


@dataclass(frozen=True, slots=True)
class _Credit:
    seq: int
    node: str
    owner: str
    job: str
    task: str
    amount: int

    def where(self) -> str:
        return f"seq {self.seq} (task {self.task}, node {self.node})"


@dataclass(frozen=True, slots=True)
class _Accepted:
    task: str
    job: str
    node: str
    owner: str
    task_state: str


def find_discrepancies(entries: Sequence[Mapping[str, Any]], accepted: Sequence[Mapping[str, Any]],
                       balances: Mapping[str, Any]) -> list[str]:
    """Every way the three documents disagree, one sentence each, naming the seq, task and node.
    Entry problems come first, in entry order; then accepted results left uncredited; then balances.
    Returns [] when the ledger is consistent."""
    found: list[str] = []
    records = _accepted_records(accepted, found)
    by_key = {(r.task, r.node): r for r in records}
    state_of_task = {r.task: r.task_state for r in records}
    credits = _check_entries(entries, by_key, state_of_task, found)

    credited = {(c.task, c.node) for c in credits}
    for record in by_key.values():
        if record.task_state == VERIFIED and (record.task, record.node) not in credited:
            found.append(f"task {record.task} is verified and node {record.node}'s result was accepted, "
                         f"but the ledger has no credit for it")
    _check_balances(credits, balances, found)
    return found


def _check_entries(entries: Sequence[Mapping[str, Any]], by_key: Mapping[tuple[str, str], _Accepted],
                   state_of_task: Mapping[str, str], found: list[str]) -> list[_Credit]:
    credits: list[_Credit] = []
    first_seq: dict[tuple[str, str], int] = {}
    previous = 0
    for index, raw in enumerate(entries, start=1):
        credit = _parse_credit(raw)
        if isinstance(credit, str):
            found.append(f"entry #{index} is malformed: {credit}")
            seq = raw.get("seq") if isinstance(raw, Mapping) else None
            previous = seq if _is_int(seq) and seq > previous else previous + 1
            continue
        where = credit.where()
        if credit.seq <= previous:
            found.append(f"{where}: seq does not increase, it follows seq {previous}")
        elif credit.seq > previous + 1:
            missing = str(previous + 1) if credit.seq == previous + 2 else f"{previous + 1}..{credit.seq - 1}"
            found.append(f"{where}: gap in seq, {missing} missing")
        previous = max(previous, credit.seq)

        key = (credit.task, credit.node)
        if key in first_seq:
            found.append(f"{where}: duplicate credit for this (task, node), already credited at seq "
                         f"{first_seq[key]}")
        else:
            first_seq[key] = credit.seq
        if credit.amount <= 0:
            found.append(f"{where}: amount {credit.amount} is not positive")
        _check_against_record(credit, by_key.get(key), state_of_task.get(credit.task), found)
        credits.append(credit)
    return credits


def _check_against_record(credit: _Credit, record: _Accepted | None, task_state: str | None,
                          found: list[str]) -> None:
    where = credit.where()
    if task_state is None:
        found.append(f"{where}: task {credit.task} is not in the coordinator's record of accepted results")
        return
    state = record.task_state if record is not None else task_state
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


def _check_balances(credits: Sequence[_Credit], balances: Mapping[str, Any], found: list[str]) -> None:
    want_nodes: dict[tuple[str, str], tuple[int, int]] = {}
    want_owners: dict[str, tuple[int, int]] = {}
    for c in credits:
        amount, count = want_nodes.get((c.node, c.owner), (0, 0))
        want_nodes[(c.node, c.owner)] = (amount + c.amount, count + 1)
        amount, count = want_owners.get(c.owner, (0, 0))
        want_owners[c.owner] = (amount + c.amount, count + 1)

    got_nodes = _balance_rows(balances, "nodes", ("node", "owner"), found)
    got_owners = _balance_rows(balances, "owners", ("owner",), found)
    for (node, owner), want in want_nodes.items():
        _compare(f"node {node} (owner {owner})", want, got_nodes.pop((node, owner), None), found)
    for (node, owner), got in got_nodes.items():
        _compare(f"node {node} (owner {owner})", None, got, found)
    for owner, want in want_owners.items():
        _compare(f"owner {owner}", want, got_owners.pop((owner,), None), found)
    for (owner,), got in got_owners.items():
        _compare(f"owner {owner}", None, got, found)

    total, count = sum(c.amount for c in credits), len(credits)
    if balances.get("total_credits") != total or not _is_int(balances.get("total_credits")):
        found.append(f"balance total_credits is {balances.get('total_credits')!r}, "
                     f"but the entries sum to {total}")
    if balances.get("entries") != count or not _is_int(balances.get("entries")):
        found.append(f"balance entries count is {balances.get('entries')!r}, but there are {count} entries")


def _compare(who: str, want: tuple[int, int] | None, got: tuple[int, int] | None, found: list[str]) -> None:
    if want == got:
        return
    if got is None:
        assert want is not None
        found.append(f"balance for {who} is missing; its entries sum to {want[0]} credits over "
                     f"{want[1]} entries")
    elif want is None:
        found.append(f"balance lists {who} with {got[0]} credits over {got[1]} entries, "
                     f"but no entry credits it")
    else:
        found.append(f"balance for {who} is {got[0]} credits over {got[1]} entries, but its entries "
                     f"sum to {want[0]} credits over {want[1]} entries")


def _balance_rows(balances: Mapping[str, Any], section: str, key_fields: tuple[str, ...],
                  found: list[str]) -> dict[tuple[str, ...], tuple[int, int]]:
    rows = balances.get(section)
    if not isinstance(rows, list):
        found.append(f"balances have no {section!r} list")
        return {}
    result: dict[tuple[str, ...], tuple[int, int]] = {}
    for index, row in enumerate(rows, start=1):
        key = _strings(row, key_fields)
        if isinstance(key, str) or not _is_int(row.get("credits")) or not _is_int(row.get("entries")):
            found.append(f"balance row #{index} of {section!r} is malformed: {row!r}")
            continue
        if key in result:
            found.append(f"balance lists {section[:-1]} {' / '.join(key)} twice")
            continue
        result[key] = (row["credits"], row["entries"])
    return result


def _accepted_records(accepted: Sequence[Mapping[str, Any]], found: list[str]) -> list[_Accepted]:
    records: list[_Accepted] = []
    for index, raw in enumerate(accepted, start=1):
        fields = _strings(raw, ("task", "job", "node", "owner", "task_state"))
        if isinstance(fields, str):
            found.append(f"accepted result #{index} is malformed: {fields}")
            continue
        task, job, node, owner, task_state = fields
        records.append(_Accepted(task, job, node, owner, task_state))
    return records


def _parse_credit(raw: object) -> _Credit | str:
    """A well-formed credit, or what is wrong with it."""
    fields = _strings(raw, ("node", "owner", "job", "task"))
    if isinstance(fields, str):
        return fields
    assert isinstance(raw, Mapping)
    node, owner, job, task = fields
    seq, amount = raw.get("seq"), raw.get("amount")
    if not _is_int(seq):
        return f"seq {seq!r} is not an integer (task {task}, node {node})"
    if not _is_int(amount):
        return f"amount {amount!r} is not an integer (task {task}, node {node})"
    return _Credit(seq, node, owner, job, task, amount)


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
