"""Pure-ish: turn an upload (model metadata + named input arrays) into a job, its tasks and the
tasks' input blobs. Checks every input against the model before anything is stored."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.tensors import ALLOWED_DTYPES, Tensor, digest_tensors, encode_tensor_map

from .partition import auto_task_size, partition_rows
from .quorum import FINAL_ANSWERS, Tolerance
from .records import JobRecord, JobSpec, TaskRecord


class BadJob(ValueError):
    """The submitter's request cannot become a job; the message says what to fix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class JobOptions:
    replicas: int
    task_size: int | None
    max_results: int | None
    final: str
    opt_level: int = 99
    submitter: str = ""
    read_token_sha256: str = ""
    deadline_seconds: float = 0.0  # 0: the coordinator's default


def check_inputs(meta: Mapping[str, Any], inputs: Mapping[str, npt.NDArray[Any]]) -> int:
    """Return the row count; raise BadJob naming the first mismatch."""
    expected = {i["name"]: i for i in meta["inputs"]}
    if set(inputs) != set(expected):
        raise BadJob(f"inputs {sorted(inputs)} do not match the model's inputs {sorted(expected)}")
    rows: int | None = None
    for name, arr in inputs.items():
        want = expected[name]
        if arr.dtype.name not in ALLOWED_DTYPES:
            raise BadJob(f"input {name!r} has dtype {arr.dtype.name}, which is not allowed")
        if arr.dtype.name != want["dtype"]:
            raise BadJob(f"input {name!r} has dtype {arr.dtype.name}; the model wants {want['dtype']}")
        if arr.ndim != len(want["shape"]) or arr.ndim == 0:
            raise BadJob(f"input {name!r} has shape {list(arr.shape)}; the model wants {want['shape']} "
                         "(first axis = batch)")
        for axis, (have, dim) in enumerate(zip(arr.shape, want["shape"], strict=True)):
            if axis > 0 and isinstance(dim, int) and dim > 0 and have != dim:
                raise BadJob(f"input {name!r} axis {axis} is {have}; the model wants {dim}")
        if rows is None:
            rows = int(arr.shape[0])
        elif arr.shape[0] != rows:
            raise BadJob(f"inputs disagree on the batch size: {name!r} has {arr.shape[0]} rows, others {rows}")
    if not rows:
        raise BadJob("the job has no rows")
    return rows


def plan_job(meta: Mapping[str, Any], inputs: Mapping[str, npt.NDArray[Any]], options: JobOptions, *,
             now_wall: float, max_inline_bytes: int) -> tuple[JobRecord, list[TaskRecord], dict[str, bytes]]:
    if not 1 <= options.replicas <= 16:
        raise BadJob("replicas must be between 1 and 16")
    if options.final not in FINAL_ANSWERS:
        raise BadJob(f"final must be one of {', '.join(FINAL_ANSWERS)}")
    rows = check_inputs(meta, inputs)
    flops = int(meta["flops_per_row"])
    task_size = options.task_size or auto_task_size(flops)
    max_results = options.max_results or options.replicas + 4
    if max_results < options.replicas:
        raise BadJob("max_results must be at least replicas")
    try:
        ranges = partition_rows(rows, task_size)
    except ValueError as exc:
        raise BadJob(str(exc)) from exc
    job_id = secrets.token_hex(8)
    spec = JobSpec(id=job_id, model=meta["model"], rows=rows, replicas=options.replicas, task_size=task_size,
                   max_results=max_results, tolerance=Tolerance(final=options.final),  # type: ignore[arg-type]
                   opt_level=options.opt_level, output_names=tuple(o["name"] for o in meta["outputs"]),
                   flops_per_row=flops, created_at=now_wall, submitter=options.submitter,
                   deadline_seconds=options.deadline_seconds,
                   read_token_sha256=options.read_token_sha256)
    contiguous = {n: np.ascontiguousarray(a) for n, a in inputs.items()}
    tasks, blobs = [], {}
    for r in ranges:
        tmap = {n: Tensor.from_array(a[r.start:r.stop]) for n, a in contiguous.items()}
        digest = digest_tensors(tmap)
        blob = encode_tensor_map(tmap)
        blobs[digest] = blob
        tasks.append(TaskRecord(id=f"{job_id}-{r.index:05d}", job=job_id, index=r.index, start=r.start,
                                stop=r.stop, input_digest=digest, input_bytes=len(blob),
                                inputs=tmap if len(blob) <= max_inline_bytes else None))
    spec = dataclasses.replace(spec, input_bytes=sum(len(b) for b in blobs.values()))
    job = JobRecord(spec=spec, tasks=[t.id for t in tasks])
    return job, tasks, blobs
