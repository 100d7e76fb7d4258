"""Checks on an untrusted ONNX file before it enters the cache (DESIGN.md §8).

External-data references are refused: ORT would read the named files from this machine's disk
into the weights, and the outputs would carry them back to whoever sent the model. Operators
must come from the standard domains, ORT's built-in contrib domain, or functions the model
itself defines; this node never loads custom-op libraries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx

from .errors import TaskFailed

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


class UnsafeModel(TaskFailed):
    pass


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def check_model(path: Path) -> None:
    """Raise `UnsafeModel` unless the file parses as ONNX with inline weights and known ops."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own: all mean "not ONNX"
        raise UnsafeModel(f"not an ONNX model: {type(exc).__name__}: {exc}") from exc
    allowed = STANDARD_DOMAINS | {f.domain for f in model.functions}
    graphs = list(_graphs(model.graph))
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.extend(_graphs(attr.g))
    for graph in graphs:
        for tensor in _tensors(graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
                raise UnsafeModel(f"model references external data (tensor {tensor.name!r})")
        for node in graph.node:
            if node.domain not in allowed:
                raise UnsafeModel(f"model uses operator {node.domain}.{node.op_type} from a custom domain")
    for node in (n for f in model.functions for n in f.node):
        if node.domain not in allowed:
            raise UnsafeModel(f"model uses operator {node.domain}.{node.op_type} from a custom domain")
