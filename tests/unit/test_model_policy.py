"""The one model policy (protocol/modelpolicy.py), checked by the coordinator at upload and by the
node before it loads: a corpus of hostile models built with onnx.helper, each refused by both.

Attack (issue 9): a model whose tensors name a file by `location` (external data) makes ONNX
Runtime read that file (the coordinator's key beside its database) into the weights, and its
outputs or error text carry the bytes back to the uploader. Every place ONNX allows a tensor is
tried: initializers, sparse initializers, Constant attributes, Loop/If subgraphs, model-local
functions. Custom operator domains and over-deep graphs are refused too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from coordinator.models import InvalidModel, inspect_model
from node.modelcheck import UnsafeModel, check_model
from protocol.modelpolicy import ModelPolicyError, check_model_policy, load_checked
from tests import models

SECRET = b"sparecycles-fake-coordinator-key"  # 32 known bytes: must never come back to a client


def _external(name: str, location: str) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.UINT8
    t.dims.extend([len(SECRET)])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(SECRET)))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _io() -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])])


def _model(nodes: list[onnx.NodeProto], *, initializer: list[TensorProto] | None = None,
           sparse: list[onnx.SparseTensorProto] | None = None, functions: list[onnx.FunctionProto] | None = None,
           domains: tuple[str, ...] = ()) -> bytes:
    inputs, outputs = _io()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"]), *nodes], "hostile", inputs, outputs,
                              initializer=initializer or [], sparse_initializer=sparse or [])
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _leaking_constant(location: str, out: str = "leak") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], value=_external("k", location))


def _branch(location: str) -> onnx.GraphProto:
    return helper.make_graph([_leaking_constant(location, "b")], "branch", [],
                             [helper.make_tensor_value_info("b", TensorProto.UINT8, [len(SECRET)])])


def _nested_if(depth: int) -> onnx.NodeProto:
    """An If whose branches hold an If ... `depth` graphs below the main one."""
    inner = helper.make_graph([helper.make_node("Constant", [], ["b"], value_int=1)], "leaf", [],
                              [helper.make_tensor_value_info("b", TensorProto.INT64, [])])
    leaf = inner  # the else branches stay leaves: nesting, not a tree that doubles at each level
    for _ in range(depth - 1):
        node = helper.make_node("If", ["c"], ["b"], then_branch=inner, else_branch=leaf)
        inner = helper.make_graph([helper.make_node("Constant", [], ["c"], value_int=1), node], "level", [],
                                  [helper.make_tensor_value_info("b", TensorProto.INT64, [])])
    return helper.make_node("If", ["cond"], ["deep"], then_branch=inner, else_branch=leaf)


def hostile_models(location: str) -> dict[str, tuple[bytes, str]]:
    """name -> (model bytes, the reason the policy gives); `location` names the secret file."""
    values = _external("sv", location)
    indices = helper.make_tensor("si", TensorProto.INT64, [len(SECRET)], list(range(len(SECRET))))
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), _leaking_constant(location, "b")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("b", TensorProto.UINT8, [len(SECRET)])])
    function = helper.make_function("local.fn", "Leak", ["a"], ["o"], [_leaking_constant(location, "o")],
                                    [helper.make_opsetid("", 17)])
    cond = helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True]))
    trip = helper.make_node("Constant", [], ["trip"], value_int=1)
    external = "external data"
    return {
        "initializer": (_model([], initializer=[_external("w", location)]), external),
        "constant attribute": (_model([_leaking_constant(location)]), external),
        "sparse initializer": (_model([], sparse=[helper.make_sparse_tensor(values, indices, [len(SECRET)])]),
                               external),
        "sparse attribute": (_model([helper.make_node(
            "Constant", [], ["leak"], sparse_value=helper.make_sparse_tensor(values, indices, [len(SECRET)]))]),
            external),
        "if subgraph": (_model([cond, helper.make_node("If", ["cond"], ["leak"], then_branch=_branch(location),
                                                        else_branch=_branch(location))]), external),
        "loop subgraph": (_model([cond, trip, helper.make_node("Loop", ["trip", "cond"], ["leak"], body=loop_body)]),
                          external),
        "model-local function": (_model([helper.make_node("Leak", ["x"], ["leak"], domain="local.fn")],
                                        functions=[function], domains=("local.fn",)), external),
        "custom domain": (_model([helper.make_node("Evil", ["x"], ["z"], domain="com.example.evil")],
                                 domains=("com.example.evil",)), "custom domain"),
        "ORT contrib domain": (_model([helper.make_node("Gelu", ["x"], ["z"], domain="com.microsoft")],
                                      domains=("com.microsoft",)), "custom domain"),
        "undeclared function op": (_model([helper.make_node("Leak", ["x"], ["z"], domain="local.fn")],
                                          domains=("local.fn",)), "custom domain"),
        "over-deep graph": (_model([helper.make_node("Constant", [], ["cond"], value_int=1), _nested_if(20)]),
                            "nested more than"),
    }


@pytest.fixture
def secret_location(tmp_path: Path) -> str:
    """A fake key beside a database, named as the attack names it: relative to the process's cwd."""
    key = tmp_path / "coordinator.db.key"
    key.write_bytes(SECRET)
    return os.path.relpath(key, os.getcwd())


CASES = list(hostile_models("x.key"))


@pytest.mark.parametrize("name", CASES)
def test_every_hostile_model_is_refused_by_the_policy_the_coordinator_and_the_node(
        name: str, secret_location: str, tmp_path: Path) -> None:
    """Attack: see the module docstring; `name` says where the hostile tensor or op hides."""
    data, reason = hostile_models(secret_location)[name]
    with pytest.raises(ModelPolicyError, match=reason):
        load_checked(data)
    with pytest.raises(InvalidModel, match=reason) as coordinator_refusal:
        inspect_model(data)
    assert SECRET.decode() not in str(coordinator_refusal.value)
    path = tmp_path / "model.onnx"  # beside the secret, as in a node's cache directory
    path.write_bytes(data)
    with pytest.raises(UnsafeModel, match=reason):
        check_model(path)


@pytest.mark.parametrize("build", [models.classifier, models.two_inputs, models.int_input, models.dynamic_seq,
                                   models.nan_model, models.deep_mlp, models.wide_projection])
def test_good_models_keep_the_policy(build: Callable[[], bytes], tmp_path: Path) -> None:
    data = build()
    load_checked(data)
    inspect_model(data)
    (tmp_path / "m.onnx").write_bytes(data)
    check_model(tmp_path / "m.onnx")


def test_a_function_the_model_defines_is_its_own_domain_and_allowed() -> None:
    function = helper.make_function("local.fn", "Twice", ["a"], ["o"], [helper.make_node("Add", ["a", "a"], ["o"])],
                                    [helper.make_opsetid("", 17)])
    load_checked(_model([helper.make_node("Twice", ["x"], ["z"], domain="local.fn")], functions=[function],
                        domains=("local.fn",)))


def test_size_and_depth_limits_are_parameters() -> None:
    """Attack: a model too large to be worth loading anywhere, or nested to exhaust a recursive loader."""
    data = models.classifier()
    with pytest.raises(ModelPolicyError, match="larger than"):
        load_checked(data, max_bytes=len(data) - 1)
    shallow = onnx.load_from_string(_model([helper.make_node("Constant", [], ["cond"], value_int=1),
                                            _nested_if(3)]))
    check_model_policy(shallow, size=1, max_depth=4)  # main graph + 3 levels
    with pytest.raises(ModelPolicyError, match="nested more than 3"):
        check_model_policy(shallow, size=1, max_depth=3)
