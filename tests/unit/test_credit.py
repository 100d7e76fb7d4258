"""The cost model on tiny graphs whose FLOPs can be counted by hand, and the credit it prices."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ledger.credit import UNKNOWN_NODE_FLOPS, ModelCost, credit_amount, model_cost
from ledger.entries import MAX_AMOUNT, Charge, Credit, Entry, Grant, charge_for
from ledger.errors import CostModelError, InvalidEntry

Dims = list[int | str]


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, Dims], outputs: dict[str, Dims],
           weights: dict[str, tuple[int, ...]] | None = None, *,
           extra_opsets: tuple[tuple[str, int], ...] = ()) -> bytes:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs.items()],
        [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in (weights or {}).items()],
    )
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def test_matmul_costs_two_flops_per_multiply_add_per_row() -> None:
    # Prepare: [N,4] x [4,3] -> per row 3 outputs, each a 4-long dot product
    model = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], {"X": ["N", 4]}, {"Y": ["N", 3]},
                   {"W": (4, 3)})

    # Execute
    cost = model_cost(model)

    # Assert
    assert cost == ModelCost(flops_per_row=2 * 4 * 3)


def test_batched_matmul_counts_every_output_element() -> None:
    model = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], {"X": ["N", 2, 4]}, {"Y": ["N", 2, 3]},
                   {"W": (4, 3)})

    assert model_cost(model).flops_per_row == 2 * (2 * 3) * 4


def test_gemm_costs_two_m_k_n_per_row() -> None:
    model = _model([helper.make_node("Gemm", ["X", "B", "C"], ["Y"])], {"X": ["N", 4]}, {"Y": ["N", 5]},
                   {"B": (4, 5), "C": (5,)})

    assert model_cost(model).flops_per_row == 2 * 4 * 5


def test_gemm_with_transposed_weights_costs_the_same() -> None:
    model = _model([helper.make_node("Gemm", ["X", "B", "C"], ["Y"], transB=1)], {"X": ["N", 4]},
                   {"Y": ["N", 5]}, {"B": (5, 4), "C": (5,)})

    assert model_cost(model).flops_per_row == 2 * 4 * 5


def test_conv_costs_two_per_output_element_times_input_channels_and_kernel() -> None:
    # Prepare: 3 -> 2 channels, 3x3 kernel, 8x8 -> 6x6 without padding: 2*6*6 = 72 outputs
    model = _model([helper.make_node("Conv", ["X", "W"], ["Y"])], {"X": ["N", 3, 8, 8]},
                   {"Y": ["N", 2, 6, 6]}, {"W": (2, 3, 3, 3)})

    assert model_cost(model).flops_per_row == 2 * 72 * 3 * 3 * 3


def test_grouped_conv_divides_input_channels_by_groups() -> None:
    # 4 -> 4 channels in 2 groups: each output sees 2 input channels; 4*6*6 = 144 outputs
    model = _model([helper.make_node("Conv", ["X", "W"], ["Y"], group=2)], {"X": ["N", 4, 8, 8]},
                   {"Y": ["N", 4, 6, 6]}, {"W": (4, 2, 3, 3)})

    assert model_cost(model).flops_per_row == 2 * 144 * (4 // 2) * 3 * 3


def test_mlp_with_dynamic_batch_sums_matmuls_and_one_flop_per_elementwise_output() -> None:
    # Prepare: X[N,4] @ W1[4,8] + b1 -> Relu -> @ W2[8,3] + b2
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["h3"]),
        helper.make_node("MatMul", ["h3", "W2"], ["h4"]),
        helper.make_node("Add", ["h4", "b2"], ["Y"]),
    ]
    model = _model(nodes, {"X": ["N", 4]}, {"Y": ["N", 3]},
                   {"W1": (4, 8), "b1": (8,), "W2": (8, 3), "b2": (3,)})

    # Execute
    cost = model_cost(model)

    # Assert: 64 + 8 (Add) + 8 (Relu) + 48 + 3 (Add)
    assert cost.flops_per_row == 2 * 4 * 8 + 8 + 8 + 2 * 8 * 3 + 3


def test_a_fixed_batch_is_priced_per_row() -> None:
    model = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], {"X": [4, 4]}, {"Y": [4, 3]},
                   {"W": (4, 3)})

    assert model_cost(model).flops_per_row == 2 * 4 * 3


def test_max_pool_costs_its_kernel_per_output_element() -> None:
    model = _model([helper.make_node("MaxPool", ["X"], ["Y"], kernel_shape=[2, 2], strides=[2, 2])],
                   {"X": ["N", 1, 4, 4]}, {"Y": ["N", 1, 2, 2]})

    assert model_cost(model).flops_per_row == 4 * (2 * 2)


def test_a_reduction_costs_one_flop_per_input_element() -> None:
    model = _model([helper.make_node("ReduceMean", ["X"], ["Y"], keepdims=0)], {"X": ["N", 10]}, {"Y": ["N"]})

    assert model_cost(model).flops_per_row == 10


def test_an_if_is_priced_at_its_dearer_branch() -> None:
    # Prepare: then = MatMul (24), else = MatMul + Relu (27); the If itself outputs 3 per row
    def branch(name: str, relu: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["X", "W"], ["m" if relu else "out_" + name])]
        if relu:
            nodes.append(helper.make_node("Relu", ["m"], ["out_" + name]))
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
            "out_" + name, TensorProto.FLOAT, ["N", 3])])

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=branch("then", False),
                          else_branch=branch("else", True))],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    # Execute
    cost = model_cost(model.SerializeToString())

    # Assert
    assert cost.flops_per_row == 3 + (2 * 4 * 3 + 3)


def test_an_op_of_unknown_shape_costs_a_small_constant() -> None:
    model = _model([helper.make_node("Mystery", ["X"], ["Y"], domain="com.example")], {"X": ["N", 4]},
                   {"Y": ["N", "K"]}, extra_opsets=(("com.example", 1),))

    assert model_cost(model).flops_per_row == UNKNOWN_NODE_FLOPS


def test_an_unknown_non_batch_dimension_is_priced_as_one() -> None:
    model = _model([helper.make_node("Relu", ["X"], ["Y"])], {"X": ["N", "L", 5]}, {"Y": ["N", "L", 5]})

    assert model_cost(model).flops_per_row == 5


def test_a_model_without_shapes_still_gets_a_positive_price() -> None:
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                              [helper.make_value_info("X", onnx.TypeProto())],
                              [helper.make_value_info("Y", onnx.TypeProto())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert model_cost(model.SerializeToString()).flops_per_row >= 1


@pytest.mark.parametrize("data", [b"", b"not an onnx model", b"\x08\x07\x12\x03abc\xff\xff"],
                         ids=["empty", "text", "garbage"])
def test_bytes_that_are_not_a_model_raise_cost_model_error(data: bytes) -> None:
    with pytest.raises(CostModelError) as raised:
        model_cost(data)

    assert raised.value.size == len(data)
    assert "not an ONNX model" in raised.value.reason


def test_a_truncated_model_raises_cost_model_error() -> None:
    model = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], {"X": ["N", 4]}, {"Y": ["N", 3]},
                   {"W": (4, 3)})

    with pytest.raises(CostModelError):
        model_cost(model[: len(model) // 2])


@pytest.mark.parametrize(("flops_per_row", "rows", "credits"), [
    (24, 1, 1),                   # far below one kFLOP still earns the minimum
    (24, 0, 1),                   # an empty task is not worth nothing either
    (1_000, 1, 1),                # exactly one kFLOP
    (1_001, 1, 2),                # a single FLOP over rounds up
    (24, 100_000, 2_400),         # 2.4 MFLOP
    (131, 64, 9),                 # the MLP above on a 64-row task: 8,384 FLOPs
    (10**12, 10**6, 10**15),      # no float rounding at large values
])
def test_credit_amount_is_kflops_rounded_up_with_a_minimum_of_one(flops_per_row: int, rows: int,
                                                                   credits: int) -> None:
    assert credit_amount(ModelCost(flops_per_row=flops_per_row), rows) == credits


def test_credit_amount_is_capped_at_what_a_database_integer_holds() -> None:
    assert credit_amount(ModelCost(flops_per_row=10**30), 10**6) == MAX_AMOUNT


def test_credit_amount_rejects_negative_rows() -> None:
    with pytest.raises(ValueError):
        credit_amount(ModelCost(flops_per_row=1), -1)


def test_a_model_cost_below_one_flop_is_rejected() -> None:
    with pytest.raises(ValueError):
        ModelCost(flops_per_row=0)


# --- the credit entry itself -----------------------------------------------------------------


def _credit(**changes: object) -> Credit:
    fields: dict[str, Any] = {"node": "n1", "owner": "alice", "job": "j1", "task": "t1", "amount": 3,
                              "result_digest": "ab" * 32, "created_at": 1_700_000_000.0}
    return Credit(**(fields | changes))


def test_leaf_bytes_are_a_tagged_array_in_fixed_field_order() -> None:
    leaf = msgpack.unpackb(_credit().leaf_bytes())

    assert leaf == ["credit", "n1", "alice", "j1", "t1", 3, "ab" * 32, 1_700_000_000.0]


def test_leaf_bytes_do_not_depend_on_how_the_time_was_typed() -> None:
    assert _credit(created_at=1_700_000_000).leaf_bytes() == _credit(created_at=1_700_000_000.0).leaf_bytes()


def test_leaf_bytes_differ_when_any_field_differs() -> None:
    base = _credit().leaf_bytes()

    changed = [_credit(**{name: value}).leaf_bytes() for name, value in [
        ("node", "n2"), ("owner", "bob"), ("job", "j2"), ("task", "t2"), ("amount", 4),
        ("result_digest", "cd" * 32), ("created_at", 1_700_000_000.5)]]

    assert base not in changed
    assert len(set(changed)) == len(changed)


@pytest.mark.parametrize(("field", "value"), [
    ("amount", 0), ("amount", -1), ("amount", True), ("amount", 2.0), ("amount", MAX_AMOUNT + 1),
    ("node", ""), ("task", None), ("created_at", float("nan")),
])
def test_a_credit_that_breaks_the_ledgers_invariants_cannot_be_built(field: str, value: object) -> None:
    with pytest.raises(InvalidEntry):
        _credit(**{field: value})


# --- charges and grants: the other kinds of entry ----------------------------------------------


def _charge(**changes: object) -> Charge:
    fields: dict[str, Any] = {"account": "dave", "job": "j1", "task": "t1", "amount": 6,
                              "created_at": 1_700_000_000.0}
    return Charge(**(fields | changes))


def _grant(**changes: object) -> Grant:
    fields: dict[str, Any] = {"account": "dave", "amount": 100, "key": "start:acct-1", "memo": "welcome",
                              "created_at": 1_700_000_000.0}
    return Grant(**(fields | changes))


def test_charge_and_grant_leaves_are_tagged_arrays_in_fixed_field_order() -> None:
    assert msgpack.unpackb(_charge().leaf_bytes()) == ["charge", "dave", "j1", "t1", 6, 1_700_000_000.0]
    assert msgpack.unpackb(_grant().leaf_bytes()) == ["grant", "dave", 100, "start:acct-1", "welcome",
                                                      1_700_000_000.0]


def test_leaves_of_different_kinds_never_read_alike() -> None:
    # A charge and a grant built from the same strings still differ by their tag.
    leaves = {_credit().leaf_bytes(), _charge().leaf_bytes(), _grant().leaf_bytes(),
              _charge(created_at=1_700_000_000).leaf_bytes()}

    assert len(leaves) == 3


def test_grant_leaf_bytes_differ_when_any_field_differs() -> None:
    base = _grant().leaf_bytes()

    changed = [_grant(**{name: value}).leaf_bytes() for name, value in [
        ("account", "erin"), ("amount", 101), ("key", "op-1"), ("memo", ""), ("created_at", 1.5)]]

    assert base not in changed and len(set(changed)) == len(changed)


@pytest.mark.parametrize(("make", "field", "value"), [
    (_charge, "amount", 0), (_charge, "amount", True), (_charge, "account", ""), (_charge, "task", None),
    (_grant, "amount", -5), (_grant, "key", ""), (_grant, "memo", "x" * 1001), (_grant, "memo", None),
    (_grant, "created_at", float("inf")),
])
def test_a_charge_or_grant_that_breaks_the_ledgers_invariants_cannot_be_built(make: Any, field: str,
                                                                               value: object) -> None:
    with pytest.raises(InvalidEntry):
        make(**{field: value})


def test_charge_for_pays_exactly_the_sum_of_one_tasks_credits() -> None:
    credits = [_credit(node="n1", amount=3), _credit(node="n2", owner="bob", amount=3)]

    charge = charge_for(credits, account="dave", created_at=5.0)

    assert charge == Charge(account="dave", job="j1", task="t1", amount=6, created_at=5.0)


@pytest.mark.parametrize("credits", [[], [_credit(task="t1"), _credit(task="t2", node="n2")]])
def test_charge_for_refuses_credits_of_no_task_or_of_several(credits: list[Credit]) -> None:
    with pytest.raises(InvalidEntry):
        charge_for(credits, account="dave", created_at=5.0)


def test_an_entry_moves_its_account_by_its_kinds_sign() -> None:
    assert [Entry(1, r).delta for r in (_grant(), _credit(), _charge())] == [100, 3, -6]
