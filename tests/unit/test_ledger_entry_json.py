"""Entry JSON as served, and read back strictly: a verifier outside the coordinator rebuilds each
leaf's bytes from the JSON alone, so the round trip must be exact for every kind and every float."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.entries import (
    Charge,
    Clawback,
    Credit,
    Entry,
    Grant,
    LedgerRecord,
    Refund,
    entry_from_json,
    iso_time,
    record_from_json,
)
from ledger.errors import InvalidEntry, LedgerError

T = 1_700_000_000.123456789


def every_kind(created_at: float = T, ref: str = "lease-1") -> list[LedgerRecord]:
    return [
        Credit(node="n1", owner="bob", job="j", task="t", amount=5, result_digest="ab" * 32, created_at=created_at,
               ref=ref),
        Credit(node="n1", owner="bob", job="j", task="t", amount=5, result_digest="ab" * 32, created_at=created_at),
        Charge(account="alice", job="j", task="t", amount=10, created_at=created_at, ref=ref),
        Charge(account="alice", job="j", task="t", amount=10, created_at=created_at),
        Grant(account="alice", amount=2**63 - 1, key="start:a", memo="starting grant \u00e9\u2603",
              created_at=created_at),
        Clawback(account="bob", node="n1", job="j", task="t", amount=5, reason="failed an audit", ref=ref,
                 created_at=created_at),
        Refund(account="alice", job="j", task="t", amount=10, ref=ref, created_at=created_at),
    ]


def over_the_wire(entry: Entry) -> object:
    """What a client holds after the HTTP API sent `entry`: JSON text parsed again."""
    return json.loads(json.dumps(entry.to_json()))


@pytest.mark.parametrize("record", every_kind(), ids=lambda r: f"{r.kind}{'-ref' if getattr(r, 'ref', '') else ''}")
def test_every_kind_round_trips_to_the_same_leaf_bytes(record: LedgerRecord) -> None:
    entry = Entry(7, record)

    back = entry_from_json(over_the_wire(entry))

    assert back == entry
    assert back.record.leaf_bytes() == record.leaf_bytes()
    assert record_from_json(over_the_wire(entry)).leaf_bytes() == record.leaf_bytes()


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53))
def test_any_finite_time_round_trips_exactly(created_at: float) -> None:
    # Attack (on the verifier): a time that reads back one ulp off would hash differently and make
    # an honest ledger look tampered with; one that did not could hide a change.
    for record in every_kind(created_at):
        assert record_from_json(over_the_wire(Entry(1, record))).leaf_bytes() == record.leaf_bytes()


def test_created_at_iso_is_utc_with_milliseconds() -> None:
    entry = Entry(1, every_kind(1_700_000_000.9999)[0])

    assert entry.to_json()["created_at_iso"] == "2023-11-14T22:13:20.999Z"
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(-1.5) == "1969-12-31T23:59:58.500Z"
    assert iso_time(1e20) is None  # past year 9999: no ISO form, and no crash serving it


def test_a_created_at_iso_that_disagrees_with_created_at_is_refused() -> None:
    # Attack: a coordinator showing people one time while the signed leaf holds another.
    served = Entry(1, every_kind()[0]).to_json()
    served["created_at_iso"] = "2020-01-01T00:00:00.000Z"

    with pytest.raises(InvalidEntry, match=r"created_at_iso .* does not match"):
        record_from_json(served)


DROP = object()


def credit_json(**change: object) -> dict[str, object]:
    """A served credit entry with fields changed, or removed by `DROP`."""
    value = Entry(3, every_kind()[0]).to_json()
    value.update(change)
    return {k: v for k, v in value.items() if v is not DROP}


@pytest.mark.parametrize(("value", "sentence"), [
    ([], "a ledger entry is a JSON object"),
    ({"kind": "bonus"}, "kind must be one of"),
    (credit_json(amount=DROP), r"missing \['amount'\]"),
    (credit_json(bonus=1), r"unknown \['bonus'\]"),
    (credit_json(memo="x"), r"unknown \['memo'\]"),
    (credit_json(amount="5"), "amount must be an int"),
    (credit_json(amount=True), "amount must be an int"),
    (credit_json(amount=0), "amount must be an int"),
    (credit_json(amount=2**63), "amount must be an int"),
    (credit_json(node=""), "'node' must be a non-empty string"),
    (credit_json(node=5), "'node' must be a non-empty string"),
    (credit_json(ref=None), "ref must be a string"),
    (credit_json(created_at="2023-11-14"), "created_at must be a finite number"),
    (credit_json(created_at=float("inf"), created_at_iso=DROP), "created_at must be a finite number"),
    (credit_json(created_at=10 ** 400, created_at_iso=DROP), "created_at must be a finite number"),
    ({"kind": "grant", "account": "a", "amount": 1, "key": "k", "memo": 5, "created_at": 1.0}, "memo must be"),
])
def test_malformed_json_is_refused_with_a_sentence(value: object, sentence: str) -> None:
    with pytest.raises(InvalidEntry, match=sentence) as raised:
        record_from_json(value)
    assert isinstance(raised.value, LedgerError)


@pytest.mark.parametrize("seq", [0, -1, "3", True, 2**63, None])
def test_an_entry_needs_a_positive_integer_seq(seq: object) -> None:
    with pytest.raises(InvalidEntry, match="seq must be an integer"):
        entry_from_json(credit_json(seq=seq))


def test_an_entry_without_its_seq_is_refused_but_its_record_reads() -> None:
    value = credit_json(seq=DROP)

    with pytest.raises(InvalidEntry, match="seq"):
        entry_from_json(value)
    assert record_from_json(value) == every_kind()[0]


def test_a_float_time_that_is_an_integer_reads_as_the_same_leaf() -> None:
    # JSON encoders may write 5.0 as 5; the leaf packs a float64 either way.
    record = every_kind(5.0)[2]
    value = {**record.to_json(), "created_at": 5}

    assert record_from_json(value).leaf_bytes() == record.leaf_bytes()
