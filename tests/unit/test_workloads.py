"""The tiny test graphs and the digits workload, run in onnxruntime and checked against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf.message import DecodeError
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

from sparecycles.cli.workloads import DIGITS_INPUT, Workload, accuracy, digits_mlp, predicted_labels, run_onnx
from tests import models

CPU = ["CPUExecutionProvider"]


def run(model: bytes, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    return run_onnx(model, inputs)


def test_classifier_gives_softmax_of_an_exact_affine_map() -> None:
    weights, bias = models.classifier_weights(features=8, classes=4, seed=3)
    x = (np.arange(5 * 8, dtype=np.float32).reshape(5, 8) % 7 - 3) / 4

    probs = run(models.classifier(features=8, classes=4, seed=3), x=x)["probs"]

    logits = x @ weights + bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert probs.dtype == np.float32 and probs.shape == (5, 4)
    # exp() is not bitwise equal across libraries; the decision is, and the values nearly so.
    np.testing.assert_array_equal(probs.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)


def test_classifier_shape_follows_its_arguments() -> None:
    session = ort.InferenceSession(models.classifier(features=3, classes=7), providers=CPU)

    (inp,), (out,) = session.get_inputs(), session.get_outputs()

    assert (inp.name, inp.type, inp.shape) == ("x", "tensor(float)", ["N", 3])
    assert (out.name, out.type, out.shape) == ("probs", "tensor(float)", ["N", 7])


def test_two_inputs_gives_exact_sum_and_product_under_a_dotted_name() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    b = np.full((3, 4), -1.5, dtype=np.float32)

    outputs = run(models.two_inputs(), a=a, b=b)

    assert set(outputs) == {"sum.out", "prod"}
    np.testing.assert_array_equal(outputs["sum.out"], a + b)
    np.testing.assert_array_equal(outputs["prod"], a * b)


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_int_input_gives_the_exact_mean_embedding(index_dtype: type[np.integer]) -> None:
    ids = (np.arange(4 * models.SEQ_IDS).reshape(4, models.SEQ_IDS) * 7 % models.VOCAB).astype(index_dtype)
    model = models.int_input() if index_dtype is np.int64 else models.int32_input()

    emb_mean = run(model, ids=ids)["emb_mean"]

    expected = models.embedding_table()[ids].mean(axis=1, dtype=np.float32)
    assert emb_mean.dtype == np.float32 and emb_mean.shape == (4, models.EMBED_DIM)
    np.testing.assert_array_equal(emb_mean, expected)


@pytest.mark.parametrize("seq", [1, 3, 17])
def test_dynamic_seq_accepts_any_sequence_length(seq: int) -> None:
    tokens = (np.arange(2 * seq, dtype=np.float32).reshape(2, seq) - seq) / 2

    outputs = run(models.dynamic_seq(), tokens=tokens)

    np.testing.assert_array_equal(outputs["scaled"], tokens * 2)
    np.testing.assert_array_equal(outputs["total"], tokens.sum(axis=1))
    assert outputs["total"].shape == (2,)


def test_dynamic_seq_declares_a_symbolic_sequence_axis() -> None:
    session = ort.InferenceSession(models.dynamic_seq(), providers=CPU)

    assert session.get_inputs()[0].shape == ["N", "seq"]


def test_nan_model_outputs_nan_for_finite_inputs() -> None:
    y = run(models.nan_model(), x=np.arange(8, dtype=np.float32).reshape(2, 4))["y"]

    assert y.shape == (2, 4)
    assert np.isnan(y).all()


def test_invalid_model_bytes_are_rejected_by_onnx_and_onnxruntime() -> None:
    with pytest.raises(DecodeError):
        onnx.load_model_from_string(models.invalid_model_bytes())
    with pytest.raises(InvalidProtobuf):
        ort.InferenceSession(models.invalid_model_bytes(), providers=CPU)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workload-cache")


@pytest.fixture(scope="module")
def digits(digits_cache: Path) -> Workload:
    return digits_mlp(seed=0, cache=digits_cache)


def test_digits_workload_holds_all_1797_rows_as_float32(digits: Workload) -> None:
    x = digits.inputs[DIGITS_INPUT]

    assert list(digits.inputs) == [DIGITS_INPUT]
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert digits.labels.shape == (1797,) and digits.rows == 1797
    assert 400 < len(digits.held_out) < 500


def test_digits_model_is_plain_tensors_named_as_the_inputs(digits: Workload) -> None:
    session = ort.InferenceSession(digits.model, providers=CPU)

    inputs = [(i.name, i.type, i.shape[1]) for i in session.get_inputs()]
    assert inputs == [(DIGITS_INPUT, "tensor(float)", 64)]
    assert [(o.name, o.type) for o in session.get_outputs()] == [
        ("label", "tensor(int64)"),
        ("probabilities", "tensor(float)"),
    ]


def test_digits_model_is_at_least_90_percent_right_on_held_out_digits(digits: Workload) -> None:
    outputs = run_onnx(digits.model, digits.inputs)

    assert accuracy(outputs, digits.labels, digits.held_out) >= 0.9
    np.testing.assert_array_equal(outputs["label"], outputs["probabilities"].argmax(axis=1))


def test_a_second_build_loads_the_same_model_from_the_cache(digits: Workload, digits_cache: Path) -> None:
    again = digits_mlp(seed=0, cache=digits_cache)

    assert again.cached and not digits.cached
    assert again.model == digits.model
    np.testing.assert_array_equal(again.held_out, digits.held_out)


def test_a_corrupt_cache_file_is_rebuilt(tmp_path: Path, digits: Workload, digits_cache: Path) -> None:
    for path in digits_cache.glob("*.onnx"):
        (tmp_path / path.name).write_bytes(models.invalid_model_bytes())

    rebuilt = digits_mlp(seed=0, cache=tmp_path)

    assert not rebuilt.cached
    onnx.load_model_from_string(rebuilt.model)


def test_accuracy_uses_labels_or_argmax_and_can_count_only_some_rows() -> None:
    labels = np.array([0, 1, 2, 3])
    probabilities = np.eye(4, dtype=np.float32)[[0, 1, 1, 3]]

    assert accuracy({"label": np.array([0, 1, 1, 3])}, labels) == 0.75
    assert accuracy({"probabilities": probabilities}, labels) == 0.75
    assert accuracy({"probabilities": probabilities}, labels, rows=np.array([0, 1])) == 1.0
    np.testing.assert_array_equal(predicted_labels({"scores": probabilities}), [0, 1, 1, 3])
    with pytest.raises(ValueError, match="3 predictions for 4 labels"):
        accuracy({"label": np.array([0, 1, 2])}, labels)
