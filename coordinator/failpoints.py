"""Named crash points, for tests only: the failpoints of FoundationDB and TiKV's fail-rs, reduced to
the one action our fault tests need, SIGKILL.

`hit("ledger.after_insert")` kills this process, with no cleanup of any kind, when the environment
variable `SPARECYCLES_FAILPOINTS` arms that point and this is the armed hit:

    SPARECYCLES_FAILPOINTS=ledger.after_insert:3        # die on the 3rd hit
    SPARECYCLES_FAILPOINTS=checkpoint.after_save        # die on the 1st hit

Several points may be armed at once, separated by commas. The variable is read once, at import;
unset (every real deployment), `hit` is one lookup in an empty frozenset. A misspelt point is
refused at import with the list of known points: a crash test whose point never fires would pass
without testing anything.

Test-only knob: operators never set it, and nothing else in the coordinator reads it.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Final

ENV: Final = "SPARECYCLES_FAILPOINTS"

POINTS: Final = {
    "ledger.after_insert": "inside the verdict transaction, its ledger entries inserted, not yet committed",
    "ledger.after_commit": "a batch with verdicts just committed, before the coordinator acts on it",
    "checkpoint.before_save": "new entries absorbed into the tree and signed, the checkpoint not yet saved",
    "checkpoint.after_save": "a checkpoint just saved",
}


class FailpointSpecError(ValueError):
    """`SPARECYCLES_FAILPOINTS` does not parse; the message says how to write it."""


def parse(spec: str) -> dict[str, int]:
    """`name[:N],...` -> {name: N}; N (the hit that kills, from 1) defaults to 1."""
    armed: dict[str, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, nth = item.partition(":")
        if name not in POINTS:
            raise FailpointSpecError(f"{ENV}: unknown failpoint {name!r}; known: {', '.join(sorted(POINTS))}")
        if nth and not (nth.isdigit() and int(nth) >= 1):
            raise FailpointSpecError(f"{ENV}: {item!r}: the hit to die on is a whole number from 1, e.g. {name}:3")
        armed[name] = int(nth) if nth else 1
    return armed


_NTH: Final[Mapping[str, int]] = parse(os.environ.get(ENV, ""))
ARMED: Final = frozenset(_NTH)
_hits: Counter[str] = Counter()


def hit(name: str, counts: Callable[[], bool] | None = None) -> None:
    """Die here by SIGKILL if `name` is armed and this is its armed hit. `counts`, evaluated only
    when armed, says whether this pass counts as a hit (e.g. only batches with verdicts)."""
    if name not in ARMED:
        return
    if counts is not None and not counts():
        return
    _hits[name] += 1
    if _hits[name] == _NTH[name]:
        # Straight to the file descriptor: no buffer that SIGKILL would throw away. The test reads
        # this line to know the process died where it meant it to.
        os.write(2, f"failpoint {name} hit {_hits[name]}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
