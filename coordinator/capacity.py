"""Pure: how many leases a node may hold, from what it has shown, never from what it claims.

A node asks for `slots` leases; it is granted at most what it has earned: new nodes start small and
grow by one lease per result returned (additive increase), a lease it lets expire or abandons halves
its allowance (multiplicative decrease), and never more than its measured speed can finish within
a lease. A node claiming 4,096 slots and answering nothing holds `start` leases, then fewer.
Time is passed in (monotonic seconds).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Final

START: Final = 2.0
WINDOW: Final = 256  # result arrival times kept per node, for its measured rate


@dataclass(slots=True)
class NodeSpeed:
    allowed: float = START
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    lost: int = 0  # leases it let expire, abandoned or went silent on
    lost_in_a_row: int = 0  # since its last result
    benched_until: float = 0.0  # no leases before this (monotonic): it lost its last ones unanswered

    def rate(self) -> float | None:
        """Results per second over the kept arrivals, once they span at least a second."""
        if len(self.arrivals) < 2:
            return None
        span = self.arrivals[-1] - self.arrivals[0]
        return None if span < 1.0 else (len(self.arrivals) - 1) / span


class Capacity:
    def __init__(self, *, lease_seconds: float, start: float = START, ceiling: int = 4096) -> None:
        self.lease_seconds = lease_seconds
        self.start = start
        self.ceiling = ceiling
        self._nodes: dict[str, NodeSpeed] = {}

    def speed(self, node: str) -> NodeSpeed:
        s = self._nodes.get(node)
        if s is None:
            s = self._nodes[node] = NodeSpeed(allowed=self.start)
        return s

    def grant(self, node: str, requested: int, now: float = 0.0) -> int:
        """Leases the node may hold now: what it asked for, capped by what it has earned."""
        s = self.speed(node)
        if now < s.benched_until:
            return 0
        cap = int(s.allowed)
        rate = s.rate()
        if rate is not None:
            # what it returned over the last stretch, scaled to most of a lease
            cap = min(cap, max(1, math.ceil(rate * self.lease_seconds * 0.8)))
        return max(0, min(requested, cap))

    def on_result(self, node: str, now: float) -> None:
        s = self.speed(node)
        s.arrivals.append(now)
        s.lost_in_a_row = 0
        s.allowed = min(float(self.ceiling), s.allowed + 1.0)

    def on_lost(self, node: str, now: float = 0.0) -> None:
        """A lease of the node expired or was taken back unanswered: its allowance halves, and after
        two such losses in a row with no result between, it gets nothing for a lease's time (then one
        lease at a time): a node that takes work and sits on it cannot keep passing tasks around."""
        s = self.speed(node)
        s.lost += 1
        s.lost_in_a_row += 1
        s.allowed = max(1.0, s.allowed / 2.0)
        if s.lost_in_a_row >= 2:
            s.benched_until = now + self.lease_seconds
