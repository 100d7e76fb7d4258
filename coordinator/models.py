"""Validation of uploaded ONNX models: they are untrusted input (DESIGN.md §8)."""

from __future__ import annotations

from typing import Any

import onnx

from ledger.credit import model_cost
from protocol.digests import sha256_hex
from protocol.modelpolicy import MAX_MODEL_BYTES, ModelPolicyError, load_checked


class InvalidModel(ValueError):
    """The upload is not a model we will hand to volunteers. The message says why."""


def _dtype(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, TypeError):
        return "unsupported"


def _shape(tt: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def inspect_model(data: bytes, *, max_bytes: int = MAX_MODEL_BYTES) -> dict[str, Any]:
    """Parse and check a model; return the metadata the coordinator keeps beside it."""
    try:
        # the shared policy first (protocol/modelpolicy.py): nothing below may touch external data
        model = load_checked(data, max_bytes=max_bytes)
    except ModelPolicyError as exc:
        raise InvalidModel(str(exc)) from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types for garbage input
        raise InvalidModel(f"not a valid ONNX model: {str(exc)[:300]}") from exc
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [{"name": i.name, "dtype": _dtype(i.type.tensor_type.elem_type), "shape": _shape(i.type.tensor_type)}
              for i in graph.input if i.name not in initializers]
    outputs = [{"name": o.name, "dtype": _dtype(o.type.tensor_type.elem_type), "shape": _shape(o.type.tensor_type)}
               for o in graph.output]
    if not inputs or not outputs:
        raise InvalidModel("the model needs at least one input and one output")
    for io_ in (*inputs, *outputs):
        if not graph_is_tensor(model, io_["name"]):
            raise InvalidModel(f"{io_['name']!r} is not a tensor (sequences and maps are not supported; "
                               "for scikit-learn classifiers convert with options={'zipmap': False})")
    return {"model": sha256_hex(data), "size": len(data), "inputs": inputs, "outputs": outputs,
            "flops_per_row": model_cost(data).flops_per_row}


def graph_is_tensor(model: onnx.ModelProto, name: str) -> bool:
    for vi in (*model.graph.input, *model.graph.output):
        if vi.name == name:
            return bool(vi.type.HasField("tensor_type"))
    return False
