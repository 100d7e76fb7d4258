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


def agree(a: Vote, b: Vote, tol: Tolerance) -> bool:
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
        if not np.allclose(x, y, rtol=tol.rtol, atol=tol.atol):
            return False
    return True


def decide_quorum(votes: Sequence[Vote], *, k: int, tol: Tolerance) -> Verdict:
    """The first vote (in arrival order) that votes of k distinct owners agree with is canonical."""
    best = 0
    for candidate in votes:
        agreeing = [v for v in votes if v is candidate or agree(candidate, v, tol)]
        owners = {v.owner for v in agreeing}
        if len(owners) >= k:
            # one vote per owner: a second node of the same owner adds no independent evidence
            seen: set[str] = set()
            group = []
            for v in agreeing:
                if v.owner not in seen:
                    seen.add(v.owner)
                    group.append(v)
            return Accepted(canonical=candidate, agreeing=tuple(group))
        best = max(best, len(owners))
    return Undecided(have=len(votes), best_group=best)
