"""Pure: how many tasks to ask for, and how to cut results into envelopes under the size limit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

from protocol.messages import MAX_BATCH_ITEMS, Result
from protocol.tensors import encoded_size_bound

T = TypeVar("T")

ENVELOPE_OVERHEAD = 512
"""Bytes around a Results body: envelope keys, signature, public key, node id, msgpack headers."""


def adaptive_prefetch(*, slots: int, task_seconds: float | None, window_seconds: float = 0.05,
                      max_per_slot: int = 16) -> int:
    """Assignments to hold beyond the running ones: about `window_seconds` of queued work per slot.

    Tiny tasks need a deep queue or each slot idles for a coordinator round trip (a few ms) after
    every task; long tasks need only one queued per slot, so a node that dies strands little work.
    Before the first task has been timed, one per slot."""
    if task_seconds is None or task_seconds <= 0:
        return slots
    per_slot = math.ceil(window_seconds / task_seconds)
    return slots * max(1, min(max_per_slot, per_slot))


def runs_per_slot(*, task_seconds: float | None, window_seconds: float = 0.05, most: int = 32) -> int:
    """Runs handed to the sandbox pool per slot at once: about `window_seconds` of work, so tiny
    tasks still cross to a worker many to a frame while long ones are handed over one at a time
    (each run handed over is one a suspension can no longer give back). Unmeasured: one."""
    if task_seconds is None or task_seconds <= 0:
        return 1
    return max(1, min(most, math.ceil(window_seconds / task_seconds)))


def inline_limit(*, max_inline_bytes: int, max_message_bytes: int) -> int:
    """Largest encoded output map sent inline: it must fit in one message with room to spare."""
    return max(0, min(max_inline_bytes, max_message_bytes - 4 * ENVELOPE_OVERHEAD))


def result_size_bound(result: Result) -> int:
    """An upper bound of the Result's msgpack size from lengths alone: packing every result just
    to measure it, before packing the batch for real, doubled the encoding work per task."""
    strings = (result.task, result.job, result.lease, result.input_digest, result.output_digest, result.error or "")
    fields = 5 + 8 * 14 + sum(5 + len(s.encode()) for s in strings) + 9  # map, 8 keys, strings, elapsed
    return fields + (1 if result.outputs is None else encoded_size_bound(result.outputs))


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
