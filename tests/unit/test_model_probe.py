"""The probe (coordinator/model_probe.py) loads uploads, and runs a model's first job's real rows,
in real sandboxed children with real memory and time limits."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from coordinator.model_probe import BAD_INPUTS, NOT_RUN, OUT_OF_MEMORY, TOO_SLOW, ProbeBusy, Prober
from coordinator.models import InvalidModel
from protocol.tensors import tensors_from_arrays
from tests import models

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    p = Prober(limit=1, memory_bytes=1 << 30, seconds=20)
    yield p
    await p.close()
    assert p.pids == []


def rows(*values: float) -> dict:
    return tensors_from_arrays({"x": np.array([[v] for v in values], dtype=np.float32)})


def needs_two_samples() -> bytes:
    """x[N,T] -> x[:, 1] - x[:, 0]: as the published audio model of issue 9, it cannot run on a
    row padded to T=1, which is what the old probe's invented rows had."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "i1"], ["b"], axis=1), helper.make_node("Gather", ["x", "i0"], ["a"], axis=1),
         helper.make_node("Sub", ["b", "a"], ["y"])],
        "two_samples", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor("i1", TensorProto.INT64, [], [1]), helper.make_tensor("i0", TensorProto.INT64, [], [0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


async def test_an_ordinary_model_passes_both_checks(prober: Prober) -> None:
    data = models.classifier()
    await prober.check(data)
    await prober.check(data, rows=tensors_from_arrays({"x": np.ones((3, 8), np.float32)}))


async def test_a_model_that_needs_real_rows_passes_on_them(prober: Prober) -> None:
    data = needs_two_samples()
    await prober.check(data)  # loading needs no rows at all
    await prober.check(data, rows=tensors_from_arrays({"x": np.ones((2, 16000), np.float32)}))
    with pytest.raises(InvalidModel, match=NOT_RUN):  # a job whose rows really cannot run is refused
        await prober.check(data, rows=tensors_from_arrays({"x": np.ones((2, 1), np.float32)}))


async def test_a_model_that_allocates_without_bound_on_load_is_refused_with_the_reason(prober: Prober) -> None:
    with pytest.raises(InvalidModel, match=OUT_OF_MEMORY):
        await prober.check(models.memory_bomb())
    await prober.check(models.classifier())  # the next probe still works (a fresh worker)


async def test_rows_that_make_a_model_allocate_without_bound_are_refused(prober: Prober) -> None:
    # Attack: the first job of an upload carries the bomb's trigger in its rows.
    data = models.alloc_bomb()
    await prober.check(data)
    with pytest.raises(InvalidModel, match=OUT_OF_MEMORY):
        await prober.check(data, rows=rows(1e10))


async def test_rows_that_make_a_model_loop_for_hours_are_refused_in_seconds() -> None:
    p = Prober(limit=1, memory_bytes=1 << 30, seconds=1.0)
    try:
        with pytest.raises(InvalidModel, match=TOO_SLOW):
            await p.check(models.loop_bomb(), rows=rows(1e12))
    finally:
        await p.close()


async def test_rows_that_do_not_match_the_model_are_a_reason_not_a_crash(prober: Prober) -> None:
    with pytest.raises(InvalidModel, match=BAD_INPUTS):
        await prober.check(models.classifier(), rows=tensors_from_arrays({"y": np.ones((1, 8), np.float32)}))


async def test_probes_beyond_the_limit_are_busy_not_queued(prober: Prober) -> None:
    import asyncio

    first = asyncio.create_task(prober.check(models.loop_bomb(), rows=rows(1e7)))
    await asyncio.sleep(0.05)
    with pytest.raises(ProbeBusy):
        await prober.check(models.classifier())
    await first
