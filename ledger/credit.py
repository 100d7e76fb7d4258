"""Pure cost model: what one accepted (task, node) result is worth.

Credit comes from the coordinator's own count of the work — floating-point operations read off the
ONNX graph, times the task's rows — never from a time a node reports, which a node could inflate.
The count is an estimate that ranks models fairly against each other, not a profiler: a MatMul is
priced exactly, a Relu at one operation per element, and what cannot be priced is priced low.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import onnx

from .entries import MAX_AMOUNT
from .errors import CostModelError

FLOPS_PER_CREDIT: Final = 1_000
"""One credit is one kFLOP of the coordinator's own count. Fine enough that small tasks are priced
by their size rather than all rounded up to the minimum: the demo's digits MLP (skl2onnx, 64 hidden
units) counts ~13k FLOPs a row, so a 64-row task earns ~813 credits."""

UNKNOWN_NODE_FLOPS: Final = 1_000
"""Price of a node whose output shape cannot be known: small, so a model cannot earn much through
shapes the counter cannot see, yet not zero, so such a node is never free."""

# Ops whose work is not one per output element, and where their weight input sits.
_MATMUL_B: Final = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3}
_CONV_W: Final = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}
_POOLS: Final = frozenset({"MaxPool", "AveragePool", "LpPool"})
# These read every input element and write few: priced per input element.
_REDUCTIONS: Final = frozenset({
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
})
_STANDARD_DOMAINS: Final = frozenset({"", "ai.onnx"})

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Floating-point operations to run one row (batch of 1) through a model."""

    flops_per_row: int

    def __post_init__(self) -> None:
        if not isinstance(self.flops_per_row, int) or isinstance(self.flops_per_row, bool) \
                or self.flops_per_row < 1:
            raise ValueError(f"flops_per_row must be a positive int, got {self.flops_per_row!r}")


def model_cost(model_bytes: bytes) -> ModelCost:
    """Count a model's FLOPs per row. Raises `CostModelError` only for bytes that are not a model;
    any valid model gets a price, however little of its graph the counter understands."""
    model = _parse(model_bytes)
    batch = _pin_input_dims(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False,
                                                  data_prop=True)
    except Exception:
        pass  # inference is best effort: shapes already written in the file still count
    flops = _graph_flops(model.graph, {})
    return ModelCost(flops_per_row=max(1, -(-flops // batch)))


def credit_amount(cost: ModelCost, rows: int) -> int:
    """Credits for one (task, node): FLOPs of `rows` rows in kFLOP, rounded up, at least 1 — a
    verified result is never worth nothing. Integer arithmetic only, so every backend agrees.

    Capped at `MAX_AMOUNT`: shapes declared in a model can be absurd, and an amount the database
    cannot store would fail the transaction that verifies the task, leaving it stuck for good.
    """
    if rows < 0:
        raise ValueError(f"rows must not be negative, got {rows}")
    return min(MAX_AMOUNT, max(1, -(-(cost.flops_per_row * rows) // FLOPS_PER_CREDIT)))


def _parse(model_bytes: bytes) -> onnx.ModelProto:
    size = len(model_bytes)
    try:
        model = onnx.load_model_from_string(bytes(model_bytes))
    except Exception as exc:  # the protobuf backends (upb, cpp, python) each raise their own type
        raise CostModelError(f"not an ONNX model: {exc}", size=size) from exc
    # Protobuf parses many byte strings (the empty one included) into an empty message.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node \
            or not model.graph.output:
        raise CostModelError("not an ONNX model: no IR version, no graph nodes or no graph outputs",
                             size=size)
    return model


def _pin_input_dims(graph: onnx.GraphProto) -> int:
    """Set every unknown input dimension to 1 and return the batch size the count will be for.

    The first dimension is the batch (tasks are row ranges of it); other unknown dimensions have no
    value the coordinator could know at pricing time, and 1 keeps the estimate low rather than
    guessing high. A model with a fixed batch of B rows is priced per row by dividing by B.
    """
    initializers = {t.name for t in graph.initializer}
    batch: int | None = None
    for value in graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type") \
                or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        for dim in dims:
            if not dim.HasField("dim_value") or dim.dim_value < 0:
                dim.dim_value = 1  # a oneof: this also clears dim_param
        if batch is None and len(dims) > 0:
            batch = dims[0].dim_value
    return max(1, batch or 1)


def _shape(value: onnx.ValueInfoProto) -> Shape | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims = value.type.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


def _shapes_of(graph: onnx.GraphProto, outer: Mapping[str, Shape | None]) -> dict[str, Shape | None]:
    """Known shapes by value name; a subgraph also sees its enclosing graph's values."""
    shapes: dict[str, Shape | None] = dict(outer)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    for sparse in graph.sparse_initializer:
        shapes[sparse.values.name] = tuple(sparse.dims)
    for value in (*graph.input, *graph.value_info, *graph.output):
        shape = _shape(value)
        if shape is not None or value.name not in shapes:
            shapes[value.name] = shape
    return shapes


def _graph_flops(graph: onnx.GraphProto, outer: Mapping[str, Shape | None]) -> int:
    shapes = _shapes_of(graph, outer)
    total = 0
    for node in graph.node:
        try:
            total += _node_flops(node, shapes)
        except Exception:  # a counter bug or an odd attribute must not make a valid model unpriceable
            total += UNKNOWN_NODE_FLOPS
        branches = [_graph_flops(a.g, shapes) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        branches += [_graph_flops(g, shapes) for a in node.attribute
                     if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
        # Only one branch of an If runs; a Loop's trip count is unknown, so its body counts once.
        total += max(branches, default=0) if node.op_type == "If" else sum(branches)
    return total


def _node_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape | None]) -> int:
    def input_shape(index: int) -> Shape | None:
        return shapes.get(node.input[index]) if index < len(node.input) and node.input[index] else None

    outputs = [shapes.get(name) for name in node.output if name]
    out = outputs[0] if outputs else None
    op = node.op_type if node.domain in _STANDARD_DOMAINS else ""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
             if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)}

    if op in _MATMUL_B and out is not None:
        a, b = input_shape(0), input_shape(_MATMUL_B[op])
        k = a[-1] if a else (b[-2] if b and len(b) >= 2 else (b[0] if b else None))
        if k is not None:
            return 2 * math.prod(out) * k  # each output element is a K-long dot product
    if op == "Gemm" and out is not None:
        a = input_shape(0)
        if a is not None and len(a) == 2:
            return 2 * math.prod(out) * (a[0] if attrs.get("transA", 0) else a[1])
    if op in _CONV_W and out is not None:
        w = input_shape(_CONV_W[op])
        if w is not None and len(w) >= 3:
            return 2 * math.prod(out) * math.prod(w[1:])  # w[1] is already C_in / groups
    if op == "ConvTranspose":
        x, w = input_shape(0), input_shape(1)
        if x is not None and w is not None and len(w) >= 3:
            return 2 * math.prod(x) * math.prod(w[1:])
    kernel = attrs.get("kernel_shape")
    if op in _POOLS and out is not None and isinstance(kernel, list):
        return math.prod(out) * math.prod(int(k) for k in kernel)
    if op in _REDUCTIONS:
        x = input_shape(0)
        if x is not None:
            return math.prod(x)
    known = [s for s in outputs if s is not None]
    return sum(math.prod(s) for s in known) if known else UNKNOWN_NODE_FLOPS
