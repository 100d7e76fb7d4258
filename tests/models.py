"""Tiny ONNX graphs built with `onnx.helper`, for exact and fast tests.

Each function returns the serialized model. Opset 17 with IR version 8 (ONNX 1.12's pairing), which
every onnxruntime since 1.13 loads. Where numbers are involved they are chosen to be exact in
float32, so a test can compare onnxruntime's answer with numpy's bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
VOCAB = 50
EMBED_DIM = 3
SEQ_IDS = 6


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sparecycles-tests"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def classifier_weights(features: int = 8, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W [features, classes], b [classes]); multiples of 1/8 so the logits are exact in float32."""
    rng = np.random.default_rng(seed)
    weights = (rng.integers(-8, 9, size=(features, classes)) / 8).astype(np.float32)
    bias = (rng.integers(-8, 9, size=classes) / 8).astype(np.float32)
    return weights, bias


def classifier(features: int = 8, classes: int = 4, seed: int = 0) -> bytes:
    """probs = Softmax(x @ W + b): input "x" float32 [N, features], output "probs" float32 [N, classes]."""
    weights, bias = classifier_weights(features, classes, seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["logits_nobias"]),
            helper.make_node("Add", ["logits_nobias", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _model(graph)


def two_inputs() -> bytes:
    """Inputs "a", "b" float32 [N, 4]; outputs "sum.out" = a + b (a name with a dot) and "prod" = a * b."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum.out"]),
            helper.make_node("Mul", ["a", "b"], ["prod"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("sum.out", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    return _model(graph)


def embedding_table(seed: int = 0) -> np.ndarray:
    """[VOCAB, EMBED_DIM] float32, multiples of 1.5: a sum of six is a multiple of 1.5, so its mean
    is a multiple of 0.25 and exact however the runtime divides by six."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-8, 9, size=(VOCAB, EMBED_DIM)) * 1.5).astype(np.float32)


def int_input(index_dtype: type[np.integer] = np.int64, seed: int = 0) -> bytes:
    """emb_mean = mean over the ids of table[ids]: input "ids" int64 (or int32) [N, 6],
    output "emb_mean" float32 [N, 3]. Opset 17's ReduceMean takes `axes` as an attribute (18 moved
    it to an input)."""
    elem = {np.int64: TensorProto.INT64, np.int32: TensorProto.INT32}[index_dtype]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["embedded"], axis=0),
            helper.make_node("ReduceMean", ["embedded"], ["emb_mean"], axes=[1], keepdims=0),
        ],
        "int_input",
        [helper.make_tensor_value_info("ids", elem, ["N", SEQ_IDS])],
        [helper.make_tensor_value_info("emb_mean", TensorProto.FLOAT, ["N", EMBED_DIM])],
        initializer=[numpy_helper.from_array(embedding_table(seed), "table")],
    )
    return _model(graph)


def int32_input(seed: int = 0) -> bytes:
    """`int_input` with int32 ids."""
    return int_input(np.int32, seed)


def dynamic_seq() -> bytes:
    """Input "tokens" float32 [N, "seq"] (a symbolic non-batch axis); outputs "scaled" [N, "seq"] =
    tokens * 2 and "total" [N] = sum over seq (ReduceSum takes `axes` as an input since opset 13)."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["tokens", "two"], ["scaled"]),
            helper.make_node("ReduceSum", ["tokens", "seq_axis"], ["total"], keepdims=0),
        ],
        "dynamic_seq",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", "seq"])],
        [
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["N", "seq"]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis"),
        ],
    )
    return _model(graph)


def nan_model() -> bytes:
    """Input "x" float32 [N, 4]; output "y" = (x - x) / (x - x), NaN for every finite input."""
    graph = helper.make_graph(
        [
            helper.make_node("Sub", ["x", "x"], ["zero"]),
            helper.make_node("Div", ["zero", "zero"], ["y"]),
        ],
        "nan_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return _model(graph)


def invalid_model_bytes() -> bytes:
    """Bytes no ONNX parser accepts: 0xFF starts a protobuf field with the invalid wire type 7."""
    return b"\xff\xff\xff\xffthis is not an ONNX model\x00"


def deep_mlp(width: int = 384, depth: int = 6, seed: int = 7) -> bytes:
    """~1.8 MFLOP a row (MatMul+Tanh layers, Softmax): heavy enough that compute, not the network,
    dominates a task; used where a task must stay busy long enough to kill a node mid-task."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i in range(depth):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name=f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        prev = f"h{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(nodes, "deep_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", width])], inits)
    return _model(graph)


def wide_projection(inputs: int = 1024, outputs: int = 3072, seed: int = 3) -> bytes:
    """A 12.6 MB model (one [1024, 3072] float32 weight) with wide outputs: `proj` [N, 3072] and a
    copy of the input `echo` [N, 1024], i.e. 16 KiB of outputs a row. For the large-job path."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((inputs, outputs)) / np.sqrt(inputs)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["proj"]), helper.make_node("Identity", ["x"], ["echo"])],
        "wide_projection", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["N", outputs]),
         helper.make_tensor_value_info("echo", TensorProto.FLOAT, ["N", inputs])],
        [numpy_helper.from_array(w, name="w")])
    return _model(graph)


def memory_bomb(side: int = 15000) -> bytes:
    """196 bytes that pass onnx.checker, yet onnxruntime folds a side x side float constant at load:
    ~0.9 GB allocated (1.8 GB peak measured) before a single row runs."""
    shape = numpy_helper.from_array(np.array([side, side], dtype=np.int64), name="shape")
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
         helper.make_node("Add", ["x", "total"], ["y"])],
        "memory_bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])], [shape])
    return _model(graph)


def _count_from_rows(prefix: str) -> list[onnx.NodeProto]:
    """Nodes that turn x[N,1] (float) into the int64 scalar max(x): a size chosen by the rows' values."""
    return [helper.make_node("ReduceMax", ["x"], [f"{prefix}_max"], keepdims=0),
            helper.make_node("Cast", [f"{prefix}_max"], [f"{prefix}_n"], to=TensorProto.INT64)]


def loop_bomb() -> bytes:
    """y[N,1] = x + max(x): a Loop of max(x) iterations adds 1 each time. Rows of 1.0 run in
    microseconds; a row of 1e12 runs for hours. The running time is chosen by the submitter's
    values, not by anything a check of the graph or of invented rows could see."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [*_count_from_rows("loop"),
         helper.make_node("Loop", ["loop_n", "", "zero"], ["count"], body=body),
         helper.make_node("Add", ["x", "count"], ["y"])],
        "loop_bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.zeros(1, np.float32), name="zero")])
    return _model(graph)


def alloc_bomb() -> bytes:
    """y[N,1] = x + sum(ones(max(x))): rows of 1.0 allocate 4 bytes; a row of 1e10 asks for 40 GB."""
    graph = helper.make_graph(
        [*_count_from_rows("alloc"),
         helper.make_node("Reshape", ["alloc_n", "one_dim"], ["shape"]),
         helper.make_node("ConstantOfShape", ["shape"], ["big"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
         helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
         helper.make_node("Add", ["x", "total"], ["y"])],
        "alloc_bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), name="one_dim")])
    return _model(graph)


def doubler(features: int = 2) -> bytes:
    """y[N,F] = 2x: outputs a test can compute exactly."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])])
    return _model(graph)
