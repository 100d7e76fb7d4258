"""The one policy for untrusted ONNX models: the coordinator checks it at upload, a node again
before it loads (DESIGN.md §8). One walk, one allowlist, so the two sides cannot drift apart.

Refused anywhere in the model (every graph, every subgraph in `g`/`graphs` attributes, every
function body): tensors with external data (ONNX Runtime would read the named file relative to the
loader's directory and the model's outputs or error text would carry its bytes back to the
sender), operators outside the standard domains, models over a size limit, and graphs nested past
a depth limit (the walk recurses; so does ORT's loader).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx

# "com.microsoft" (ORT's contrib ops) is deliberately NOT allowed: hundreds of operators outside the
# ONNX spec, with less-fuzzed kernels (attention, custom quantisation, string ops), whose results
# need not agree across ORT versions or builds, so redundancy checks would misfire; exporters emit
# them only after ORT-specific optimisation, which nodes do themselves at load time anyway.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
MAX_MODEL_BYTES = 256 * 1024 * 1024  # the coordinator's default max_model_bytes
MAX_GRAPH_DEPTH = 16  # main graph = 1; real models nest If/Loop/Scan two or three deep


class ModelPolicyError(ValueError):
    """The model breaks the policy; the message is one short reason, safe to send to its author."""


def _attr_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    sparses = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
    for sparse in (*sparses, *attr.sparse_tensors):
        yield sparse.values
        yield sparse.indices


def _nodes_and_tensors(nodes: list[onnx.NodeProto], depth: int, *, max_depth: int
                       ) -> Iterator[onnx.NodeProto | onnx.TensorProto]:
    for node in nodes:
        yield node
        for attr in node.attribute:
            yield from _attr_tensors(attr)
            subgraphs = [attr.g] if attr.HasField("g") else []
            for sub in (*subgraphs, *attr.graphs):
                yield from _graph_items(sub, depth + 1, max_depth=max_depth)


def _graph_items(graph: onnx.GraphProto, depth: int, *, max_depth: int) -> Iterator[onnx.NodeProto | onnx.TensorProto]:
    if depth > max_depth:
        raise ModelPolicyError(f"graphs are nested more than {max_depth} deep")
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _nodes_and_tensors(list(graph.node), depth, max_depth=max_depth)


def check_model_policy(model: onnx.ModelProto, *, size: int, max_bytes: int = MAX_MODEL_BYTES,
                       max_depth: int = MAX_GRAPH_DEPTH) -> None:
    """Raise `ModelPolicyError` unless `model` (serialised as `size` bytes) keeps the policy."""
    if size > max_bytes:
        raise ModelPolicyError(f"the model is larger than {max_bytes} bytes")
    local = {(f.domain, f.name) for f in model.functions}
    for opset in model.opset_import:
        if opset.domain not in ALLOWED_DOMAINS and opset.domain not in {d for d, _ in local}:
            raise ModelPolicyError(f"operators of custom domain {opset.domain!r} are not allowed")
    items = [_graph_items(model.graph, 1, max_depth=max_depth)]
    items += [_nodes_and_tensors(list(f.node), 1, max_depth=max_depth) for f in model.functions]
    for walk in items:
        for item in walk:
            if isinstance(item, onnx.TensorProto):
                if item.data_location == onnx.TensorProto.EXTERNAL or len(item.external_data):
                    raise ModelPolicyError("the model references external data: embed the weights")
            elif item.domain not in ALLOWED_DOMAINS and (item.domain, item.op_type) not in local:
                # a function the model defines is its own op only if model.functions has it
                raise ModelPolicyError(f"operator {item.op_type} of custom domain {item.domain!r} is not allowed")


def load_checked(data: bytes, *, max_bytes: int = MAX_MODEL_BYTES, max_depth: int = MAX_GRAPH_DEPTH) -> onnx.ModelProto:
    """Parse `data` without loading external data and check the policy; `ModelPolicyError` if
    it is not ONNX or breaks the policy."""
    if len(data) > max_bytes:
        raise ModelPolicyError(f"the model is larger than {max_bytes} bytes")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, onnx its own: all mean "not ONNX"
        raise ModelPolicyError("not an ONNX model") from exc
    check_model_policy(model, size=len(data), max_bytes=max_bytes, max_depth=max_depth)
    return model
