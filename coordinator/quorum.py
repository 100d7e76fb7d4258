"""Pure: when do two results agree, and when does a set of results make a quorum.

No I/O and no clock: the dispatch feeds in votes and acts on the verdict (STYLE.md §1, after
Flower's aggregate.py). Agreement follows DESIGN.md §4: bitwise-equal digests agree at once;
otherwise integer outputs (labels, ids) must be equal, the final answer (argmax over the last axis
by default) must be equal, and floats must be allclose. NaN/Inf never gets this far: `check_finite`
turns such a result into an invalid vote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

FinalAnswer = Literal["argmax", "exact", "none"]
FINAL_ANSWERS: tuple[str, ...] = ("argmax", "exact", "none")


@dataclass(frozen=True, slots=True)
class Tolerance:
    rtol: float = 1e-3
    atol: float = 1e-4
    final: FinalAnswer = "argmax"


@dataclass(frozen=True, slots=True)
class Vote:
    lease: str
    node: str
    owner: str
    output_digest: str
    outputs: Mapping[str, npt.NDArray[Any]]
    stored: bool = False  # its outputs are already in the blob store (uploaded over HTTP)


@dataclass(frozen=True, slots=True)
class Accepted:
    canonical: Vote
    agreeing: tuple[Vote, ...]


@dataclass(frozen=True, slots=True)
class Undecided:
    have: int
    best_group: int  # distinct owners in the largest agreeing group so far


Verdict = Accepted | Undecided


def check_finite(outputs: Mapping[str, npt.NDArray[Any]]) -> str | None:
    """None if every float output is finite, else the reason the result is invalid."""
    for name, arr in outputs.items():
        if arr.dtype.kind == "f" and not bool(np.isfinite(arr).all()):
            return f"output {name!r} contains NaN or Inf"
    return None


def close(x: npt.NDArray[Any], y: npt.NDArray[Any], tol: Tolerance) -> bool:
    """|x - y| <= atol + rtol * max(|x|, |y|) elementwise: symmetric, unlike `np.allclose`, whose
    tolerance scales with its second argument only (so a ~ b did not imply b ~ a)."""
    diff = np.abs(x - y)
    return bool(np.all(diff <= tol.atol + tol.rtol * np.maximum(np.abs(x), np.abs(y))))


def agree(a: Vote, b: Vote, tol: Tolerance) -> bool:
    """Symmetric: agree(a, b, tol) == agree(b, a, tol) for every pair."""
    if a.output_digest == b.output_digest:
        return True
    if tol.final == "exact" or a.outputs.keys() != b.outputs.keys():
        return False
    for name, x in a.outputs.items():
        y = b.outputs[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.dtype.kind != "f":
            if not np.array_equal(x, y):  # labels, ids, decisions: the final answer, exactly
                return False
            continue
        if tol.final == "argmax" and x.ndim >= 2 and x.shape[-1] > 1 \
                and not np.array_equal(x.argmax(axis=-1), y.argmax(axis=-1)):
            return False
        if not close(x, y, tol):
            return False
    return True


def decide_quorum(votes: Sequence[Vote], *, k: int, tol: Tolerance) -> Verdict:
    """The first vote (in arrival order) around which votes of k distinct owners form a group that
    all agree with one another is canonical. Tolerance is not transitive (a ~ b and b ~ c does not
    give a ~ c), so every member must agree with every other, not just with the candidate: an
    accepted group never holds two results that disagree. One vote per owner: a second node of the
    same owner adds no independent evidence."""
    best = 0
    for candidate in votes:
        group = [candidate]
        for v in votes:
            if v is candidate or any(v.owner == g.owner for g in group):
                continue
            if all(agree(g, v, tol) for g in group):
                group.append(v)
        if len(group) >= k:
            return Accepted(canonical=candidate, agreeing=tuple(group))
        best = max(best, len(group))
    return Undecided(have=len(votes), best_group=best)
