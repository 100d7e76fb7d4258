"""coordinator/retention.py: the byte bound and the checks of an upload, and when a job expires;
and the engine forgetting an expired job. Plain values, no I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.engine import Engine
from coordinator.retention import (
    check_upload,
    expiry_cutoff,
    has_expired,
    output_bound,
    parse_duration,
    upload_limit,
)
from protocol.tensors import Tensor, encode_tensor_map, tensors_from_arrays

from .test_engine import answer, honest, make_engine

# A classifier as skl2onnx exports it (zipmap off): a label per row and a row of probabilities.
CLASSIFIER: list[dict[str, Any]] = [{"name": "label", "dtype": "int64", "shape": [None]},
                                    {"name": "probabilities", "dtype": "float32", "shape": ["N", 10]}]


def outputs(rows: int, **changes: np.ndarray) -> dict[str, np.ndarray]:
    base: dict[str, np.ndarray] = {"label": np.arange(rows, dtype=np.int64),
                                   "probabilities": np.zeros((rows, 10), np.float32)}
    return {**base, **changes}


# ---- the byte bound ---------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_the_bound_holds_real_encodings_within_a_few_hundred_bytes(rows: int) -> None:
    encoded = len(encode_tensor_map(tensors_from_arrays(outputs(rows))))
    bound = output_bound(CLASSIFIER, rows)
    assert bound is not None and encoded <= bound <= encoded + 400


def test_the_bound_counts_only_numeric_outputs() -> None:
    # A string output is never requested from ONNX Runtime, so it is never uploaded: no room for it.
    with_text = [*CLASSIFIER, {"name": "names", "dtype": "object", "shape": ["N", 1000]}]
    assert output_bound(with_text, 5) == output_bound(CLASSIFIER, 5)


@pytest.mark.parametrize("shape", [["N", "seq"], ["N", None], ["N", 0], [], ["N", True]])
def test_a_symbolic_non_batch_axis_or_an_unknown_rank_falls_back_to_the_global_cap(shape: list[Any]) -> None:
    model = [{"name": "y", "dtype": "float32", "shape": shape}]
    assert output_bound(model, 4) is None
    assert upload_limit(model, 4, fallback=1000, ceiling=10**9) == 1000


def test_the_limit_never_passes_the_body_ceiling() -> None:
    huge = [{"name": "y", "dtype": "float64", "shape": ["N", 10**6]}]
    assert upload_limit(huge, 1000, fallback=10, ceiling=5000) == 5000


def test_a_fixed_leading_axis_is_still_the_tasks_rows() -> None:
    # The engine wants the task's rows first whatever the model declares: the bound follows it.
    fixed = [{"name": "y", "dtype": "float32", "shape": [1, 4]}]
    assert output_bound(fixed, 8) == output_bound([{"name": "y", "dtype": "float32", "shape": ["N", 4]}], 8)


# ---- what an upload must be -------------------------------------------------------------------
def test_the_models_numeric_outputs_with_the_tasks_rows_pass() -> None:
    assert check_upload(tensors_from_arrays(outputs(3)), CLASSIFIER, 3) is None


@pytest.mark.parametrize(("arrays", "rows", "says"), [
    # Attack: a node stores an arbitrary payload under its lease, as a tensor of another name.
    ({"label": np.zeros(3, np.int64), "probabilities": np.zeros((3, 10), np.float32),
      "junk": np.zeros(10, np.uint8)}, 3, "are not the model's numeric outputs"),
    ({"label": np.zeros(3, np.int64)}, 3, "are not the model's numeric outputs"),
    (outputs(3, label=np.zeros(3, np.float64)), 3, "'label' has dtype float64; the model's is int64"),
    (outputs(4), 3, "'label' has 4 rows; the lease's task has 3"),
    (outputs(3, probabilities=np.zeros((3, 11), np.float32)), 3, "'probabilities' axis 1 is 11; the model's is 10"),
    (outputs(3, probabilities=np.zeros((3, 10, 2), np.float32)), 3, "has shape [3, 10, 2]"),
])
def test_other_names_dtypes_or_shapes_are_refused_with_one_line(arrays: dict[str, np.ndarray], rows: int,
                                                                 says: str) -> None:
    problem = check_upload(tensors_from_arrays(arrays), CLASSIFIER, rows)
    assert problem is not None and says in problem and "\n" not in problem


def test_a_scalar_output_is_refused() -> None:
    tensors = {**tensors_from_arrays(outputs(3)), "label": Tensor("int64", (), bytes(8))}
    assert check_upload(tensors, CLASSIFIER, 3) == "output 'label' is a scalar; outputs have the task's rows first"


def test_an_output_of_unknown_rank_is_checked_for_dtype_and_rows_only() -> None:
    model = [{"name": "y", "dtype": "float32", "shape": []}]
    assert check_upload(tensors_from_arrays({"y": np.zeros((2, 3, 4), np.float32)}), model, 2) is None
    assert check_upload(tensors_from_arrays({"y": np.zeros((3, 3), np.float32)}), model, 2) is not None


# ---- when a job expires -----------------------------------------------------------------------
def test_retention_zero_keeps_everything() -> None:
    assert expiry_cutoff(1000.0, 0) is None
    assert not has_expired(0.0, 1e12, 0)


def test_a_job_expires_retention_seconds_after_it_finished_and_a_running_one_never() -> None:
    assert expiry_cutoff(1000.0, 60) == 940.0
    assert has_expired(940.0, 1000.0, 60) and not has_expired(940.5, 1000.0, 60)
    assert not has_expired(None, 1e12, 60)


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600.0), ("90s", 90.0), ("30m", 1800.0), ("12h", 43200.0),
                                               ("7d", 604800.0), ("0", 0.0), ("1.5h", 5400.0), (" 2 d ", 172800.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-1", "d", "1e3", "7 days"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="give seconds, or a number with s, m, h or d"):
        parse_duration(text)


# ---- the engine forgets an expired job ---------------------------------------------------------
def finished_engine() -> tuple[Engine, str]:
    engine = make_engine(rows=2, task_size=2)
    for node, owner in (("n1", "o1"), ("n2", "o2")):
        a = engine.on_work_request(node, owner, 1, 1, now=0, now_wall=0)[node][0]
        result, arrays = answer(a, honest(a))
        engine.on_result(node, result, arrays, None, now=1, now_wall=1)
    (job_id,) = engine.jobs
    return engine, job_id


def test_a_forgotten_job_leaves_memory_and_its_deadline_passes_quietly() -> None:
    engine, job_id = finished_engine()
    assert engine.job_view(job_id) is not None and engine.job_view(job_id).state == "done"  # type: ignore[union-attr]
    engine.forget_jobs([job_id])
    assert engine.job_view(job_id) is None and engine.jobs == {} and engine.tasks == {}
    # its job deadline (an hour after creation) comes and goes: nothing to look up, nothing raised
    assert engine.sweep(now=10_000, now_wall=10_000) == {}


def test_a_running_job_is_not_forgotten() -> None:
    engine = make_engine(rows=2, task_size=2)
    (job_id,) = engine.jobs
    engine.forget_jobs([job_id])
    assert engine.job_view(job_id) is not None
