"""Pure: how many tasks to ask for, and how to cut results into envelopes under the size limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import msgpack

from protocol.messages import MAX_BATCH_ITEMS, Result

T = TypeVar("T")

ENVELOPE_OVERHEAD = 512
"""Bytes around a Results body: envelope keys, signature, public key, node id, msgpack headers."""


def want(*, capacity: int, held: int) -> int:
    """Tasks to ask for: room for `capacity` (slots + prefetch) minus those running or queued."""
    return max(0, capacity - held)


def inline_limit(*, max_inline_bytes: int, max_message_bytes: int) -> int:
    """Largest encoded output map sent inline: it must fit in one message with room to spare."""
    return max(0, min(max_inline_bytes, max_message_bytes - 4 * ENVELOPE_OVERHEAD))


def result_size(result: Result) -> int:
    return len(msgpack.packb(result.to_wire(), use_bin_type=True))


def split_batches(items: Sequence[T], sizes: Sequence[int], *, budget: int,
                  max_items: int = MAX_BATCH_ITEMS) -> list[list[T]]:
    """Greedy, order-preserving: consecutive items whose sizes sum to at most `budget` per batch.

    An item larger than the budget alone gets a batch of its own (the caller decides what to do
    with a message that cannot fit)."""
    batches: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item, size in zip(items, sizes, strict=True):
        if current and (used + size > budget or len(current) >= max_items):
            batches.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        batches.append(current)
    return batches


def results_budget(*, max_message_bytes: int, node: str, runtime: str) -> int:
    return max_message_bytes - ENVELOPE_OVERHEAD - len(node.encode()) - len(runtime.encode())
