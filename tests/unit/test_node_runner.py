"""node.runner and node.execute against the real onnxruntime, with tiny graphs built here."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from aiohttp import web
from onnx import TensorProto, helper, numpy_helper

from node.cache import ModelCache
from node.errors import TaskFailed
from node.execute import NotRun, Pipeline
from node.modelcheck import UnsafeModel, check_model
from node.runner import Runner, RunOutcome, runtime_fingerprint
from protocol.messages import Assignment
from protocol.runrecipe import OPT_LEVEL_NAMES, UnknownOptLevel, session_options
from protocol.tensors import digest_tensors, tensors_from_arrays, tensors_from_wire, tensors_to_wire

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)
TABLE = RNG.standard_normal((10, 5)).astype(np.float32)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def classifier() -> onnx.ModelProto:
    """x[N,4] -> softmax(x @ W + B)[N,3], batch dimension dynamic."""
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])


def two_inputs() -> onnx.ModelProto:
    """a[N,3] + b[N,3] -> sum, and a * b -> prod."""
    return _model(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["prod"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("sum", "prod")], [])


def embedding() -> onnx.ModelProto:
    """ids[N,2] int64 -> sum of embedding rows [N,5] float, and its argmax [N] int64."""
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("ReduceSum", ["rows", "axes"], ["pooled"], keepdims=0),
         helper.make_node("ArgMax", ["pooled"], ["label"], axis=-1, keepdims=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 2])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([1], np.int64), "axes")])


def _direct(path: Path, feeds: dict[str, npt.NDArray[Any]], opt_level: int = 99
            ) -> dict[str, npt.NDArray[Any]]:
    session = ort.InferenceSession(str(path), sess_options=session_options(ort, opt_level),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
async def runner() -> AsyncIterator[Runner]:
    r = Runner(2)
    yield r
    await r.close()


async def _run(runner: Runner, path: Path, opt_level: int, arrays: dict[str, npt.NDArray[Any]],
               digest: str | None = None) -> RunOutcome:
    """`Runner.run` on arrays, answering arrays: the wire tensors in and out are tested elsewhere."""
    outcome = await runner.run(path, digest or _digest(path), opt_level, tensors_from_arrays(arrays))
    return RunOutcome({n: t.to_array() for n, t in outcome.outputs.items()}, outcome.elapsed)  # type: ignore[misc]


async def test_classifier_outputs_equal_a_direct_onnxruntime_run(tmp_path: Path, runner: Runner) -> None:
    path = _save(classifier(), tmp_path / "clf.onnx")
    x = RNG.standard_normal((16, 4)).astype(np.float32)

    outcome = await _run(runner, path, 99, {"x": x})

    expected = _direct(path, {"x": x})
    assert set(outcome.outputs) == {"probs"}
    np.testing.assert_array_equal(outcome.outputs["probs"], expected["probs"])
    logits = x @ W + B
    softmax = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(outcome.outputs["probs"], softmax / softmax.sum(-1, keepdims=True), rtol=1e-5)
    assert outcome.elapsed > 0


async def test_read_only_wire_tensors_feed_the_model(tmp_path: Path, runner: Runner) -> None:
    path = _save(classifier(), tmp_path / "clf.onnx")
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    wire = tensors_from_arrays({"x": x})["x"].to_array()
    assert not wire.flags.writeable

    outcome = await _run(runner, path, 99, {"x": wire})

    np.testing.assert_array_equal(outcome.outputs["probs"], _direct(path, {"x": x})["probs"])


@pytest.mark.parametrize("opt_level", sorted(OPT_LEVEL_NAMES))
async def test_every_opt_level_runs_and_matches_direct_run_at_that_level(
        tmp_path: Path, runner: Runner, opt_level: int) -> None:
    path = _save(classifier(), tmp_path / "clf.onnx")
    x = RNG.standard_normal((5, 4)).astype(np.float32)

    outcome = await _run(runner, path, opt_level, {"x": x})

    np.testing.assert_array_equal(outcome.outputs["probs"], _direct(path, {"x": x}, opt_level)["probs"])


def test_opt_levels_map_to_ort_graph_optimisation_levels() -> None:
    assert session_options(ort, 0).graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert session_options(ort, 1).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session_options(ort, 2).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert session_options(ort, 99).graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_sessions_are_single_threaded_and_sequential() -> None:
    opts = session_options(ort, 99)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_an_unknown_opt_level_is_refused() -> None:
    with pytest.raises(UnknownOptLevel, match="optimisation level 3"):
        session_options(ort, 3)


async def test_a_model_with_two_inputs_gets_both(tmp_path: Path, runner: Runner) -> None:
    path = _save(two_inputs(), tmp_path / "two.onnx")
    a = RNG.standard_normal((4, 3)).astype(np.float32)
    b = RNG.standard_normal((4, 3)).astype(np.float32)

    outcome = await _run(runner, path, 99, {"a": a, "b": b})

    np.testing.assert_array_equal(outcome.outputs["sum"], a + b)
    np.testing.assert_array_equal(outcome.outputs["prod"], a * b)


async def test_int64_inputs_and_outputs_round_trip(tmp_path: Path, runner: Runner) -> None:
    path = _save(embedding(), tmp_path / "emb.onnx")
    ids = np.array([[0, 1], [2, 9], [5, 5]], dtype=np.int64)

    outcome = await _run(runner, path, 99, {"ids": ids})

    pooled = TABLE[ids].sum(axis=1)
    np.testing.assert_allclose(outcome.outputs["pooled"], pooled, rtol=1e-6)
    assert outcome.outputs["label"].dtype == np.int64
    np.testing.assert_array_equal(outcome.outputs["label"], pooled.argmax(-1))


async def test_string_and_sequence_outputs_are_left_out_and_tensors_kept(tmp_path: Path, runner: Runner) -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Cast", ["x"], ["text"], to=TensorProto.STRING),
         helper.make_node("SequenceConstruct", ["x", "x"], ["seq"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
         helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2]),
         helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, ["N", 2])], [])
    path = _save(model, tmp_path / "mixed.onnx")
    x = np.ones((3, 2), np.float32)

    outcome = await _run(runner, path, 99, {"x": x})

    assert set(outcome.outputs) == {"y"}
    np.testing.assert_array_equal(outcome.outputs["y"], x)


async def test_missing_input_fails_the_task_with_a_reason(tmp_path: Path, runner: Runner) -> None:
    path = _save(two_inputs(), tmp_path / "two.onnx")

    with pytest.raises(TaskFailed, match="do not match"):
        await _run(runner, path, 99, {"a": np.zeros((1, 3), np.float32)})


async def test_wrong_dtype_fails_the_task_with_an_onnxruntime_reason(tmp_path: Path, runner: Runner) -> None:
    path = _save(classifier(), tmp_path / "clf.onnx")

    with pytest.raises(TaskFailed, match="onnxruntime"):
        await _run(runner, path, 99, {"x": np.zeros((1, 4), np.float64)})


async def test_a_file_that_is_not_a_model_fails_to_load(tmp_path: Path, runner: Runner) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")

    with pytest.raises(TaskFailed, match="onnxruntime could not run the model"):
        await _run(runner, path, 99, {"x": np.zeros((1, 4), np.float32)})


async def test_concurrent_runs_on_all_slots_give_the_same_answers(tmp_path: Path, runner: Runner) -> None:
    path = _save(classifier(), tmp_path / "clf.onnx")
    digest = _digest(path)
    batches = [RNG.standard_normal((32, 4)).astype(np.float32) for _ in range(12)]

    outcomes = await asyncio.gather(*(_run(runner, path, 99, {"x": x}, digest) for x in batches))

    for x, outcome in zip(batches, outcomes, strict=True):
        np.testing.assert_array_equal(outcome.outputs["probs"], _direct(path, {"x": x})["probs"])
    assert runner.busy == 0


def test_runtime_fingerprint_names_ort_version_isa_and_python() -> None:
    parts = dict(p.split("=", 1) for p in runtime_fingerprint().split(";"))
    assert set(parts) == {"ort", "isa", "py"}
    assert parts["ort"] == ort.__version__


def test_model_check_accepts_a_plain_model(tmp_path: Path) -> None:
    check_model(_save(classifier(), tmp_path / "clf.onnx"))


def test_model_check_rejects_external_data(tmp_path: Path) -> None:
    model = classifier()
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)

    with pytest.raises(UnsafeModel, match="external data"):
        check_model(tmp_path / "ext.onnx")


def test_model_check_rejects_custom_operator_domains(tmp_path: Path) -> None:
    model = _model([helper.make_node("Evil", ["x"], ["y"], domain="com.example.custom")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [])
    model.opset_import.append(helper.make_opsetid("com.example.custom", 1))
    onnx.save(model, str(tmp_path / "custom.onnx"))

    with pytest.raises(UnsafeModel, match="custom domain"):
        check_model(tmp_path / "custom.onnx")


def test_model_check_rejects_bytes_that_are_not_onnx(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe definitely not protobuf")

    with pytest.raises(UnsafeModel):
        check_model(tmp_path / "junk.onnx")


# ---- the whole task pipeline against a real HTTP server ------------------------------------


class FakeCoordinator:
    """The slice of the coordinator's HTTP API a node uses: models and blobs."""

    def __init__(self) -> None:
        self.models: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.uploads: dict[str, tuple[str, bytes]] = {}  # digest -> (lease, body)
        self.app = web.Application()
        self.app.router.add_get("/v1/models/{digest}", self.get_model)
        self.app.router.add_get("/v1/blobs/{digest}", self.get_blob)
        self.app.router.add_put("/v1/blobs/{digest}", self.put_blob)

    async def get_model(self, request: web.Request) -> web.Response:
        body = self.models.get(request.match_info["digest"])
        return web.Response(body=body) if body is not None else web.Response(status=404)

    async def get_blob(self, request: web.Request) -> web.Response:
        body = self.blobs.get(request.match_info["digest"])
        if body is None or not request.query.get("lease"):
            return web.Response(status=404)
        return web.Response(body=body)

    async def put_blob(self, request: web.Request) -> web.Response:
        body = await request.read()
        digest = request.match_info["digest"]
        if digest_tensors(tensors_from_wire(msgpack.unpackb(body, raw=False))) != digest:
            return web.Response(status=400)
        self.uploads[digest] = (request.query["lease"], body)
        return web.Response(status=201)


@pytest.fixture
async def coordinator() -> AsyncIterator[tuple[FakeCoordinator, str]]:
    fake = FakeCoordinator()
    app_runner = web.AppRunner(fake.app)
    await app_runner.setup()
    site = web.TCPSite(app_runner, "127.0.0.1", 0)
    await site.start()
    port = app_runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await app_runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _publish_model(fake: FakeCoordinator, model: onnx.ModelProto) -> str:
    data = model.SerializeToString()
    digest = hashlib.sha256(data).hexdigest()
    fake.models[digest] = data
    return digest


def _pipeline(tmp_path: Path, base: str, http: aiohttp.ClientSession, runner: Runner, *,
              inline_limit: int = 256 * 1024, **kw: Any) -> Pipeline:
    cache = ModelCache(tmp_path / "cache", session=http, base_url=base, quota_bytes=10**8,
                       validate=check_model)
    return Pipeline(cache=cache, runner=runner, http=http, base_url=base, inline_limit=inline_limit,
                    max_blob_bytes=10**8, fetch_attempts=1, **kw)


def _assignment(model: str, inputs: dict[str, npt.NDArray[Any]], *, inline: bool = True,
                expires_in: float = 60.0, **kw: Any) -> Assignment:
    tensors = tensors_from_arrays(inputs)
    return Assignment(task="t1", job="j1", lease="L1", model=model, input_digest=digest_tensors(tensors),
                      expires_at=time.time() + expires_in, inputs=tensors if inline else None, **kw)


async def test_an_inline_task_returns_outputs_and_their_digest(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, classifier())
    x = RNG.standard_normal((8, 4)).astype(np.float32)

    result = await _pipeline(tmp_path, base, http, runner).execute(_assignment(model, {"x": x}))

    assert result.error is None and result.outputs is not None
    assert result.output_digest == digest_tensors(result.outputs)
    path = tmp_path / "cache" / f"{model}.onnx"
    np.testing.assert_array_equal(result.outputs["probs"].to_array(), _direct(path, {"x": x})["probs"])


async def test_inputs_by_digest_are_fetched_with_the_lease(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, two_inputs())
    inputs = {"a": np.ones((2, 3), np.float32), "b": np.full((2, 3), 2, np.float32)}
    a = _assignment(model, inputs, inline=False)
    body = msgpack.packb(tensors_to_wire(tensors_from_arrays(inputs)), use_bin_type=True)
    fake.blobs[a.input_digest] = body

    result = await _pipeline(tmp_path, base, http, runner).execute(a)

    assert result.error is None and result.outputs is not None
    np.testing.assert_array_equal(result.outputs["sum"].to_array(), np.full((2, 3), 3, np.float32))


async def test_inputs_that_do_not_match_their_digest_fail_the_task(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, two_inputs())
    inputs = {"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)}
    a = _assignment(model, inputs, inline=False)
    other = tensors_from_arrays({"a": np.zeros((2, 3), np.float32), "b": np.ones((2, 3), np.float32)})
    fake.blobs[a.input_digest] = msgpack.packb(tensors_to_wire(other), use_bin_type=True)

    result = await _pipeline(tmp_path, base, http, runner).execute(a)

    assert result.error is not None and "digest" in result.error
    assert result.output_digest == "" and result.outputs is None


async def test_large_outputs_are_uploaded_and_sent_by_digest_only(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, classifier())
    a = _assignment(model, {"x": RNG.standard_normal((64, 4)).astype(np.float32)})

    result = await _pipeline(tmp_path, base, http, runner, inline_limit=100).execute(a)

    assert result.error is None and result.outputs is None
    lease, body = fake.uploads[result.output_digest]
    assert lease == a.lease
    assert digest_tensors(tensors_from_wire(msgpack.unpackb(body, raw=False))) == result.output_digest


async def test_an_unknown_model_fails_the_task_instead_of_crashing(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    _, base = coordinator
    a = _assignment("ab" * 32, {"x": np.zeros((1, 4), np.float32)})

    result = await _pipeline(tmp_path, base, http, runner).execute(a)

    assert result.error is not None and "404" in result.error


async def test_the_output_filter_changes_what_is_digested_and_sent(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, classifier())
    a = _assignment(model, {"x": RNG.standard_normal((4, 4)).astype(np.float32)})

    def lie(outputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return {name: np.zeros_like(v) for name, v in outputs.items()}

    result = await _pipeline(tmp_path, base, http, runner, output_filter=lie).execute(a)

    assert result.outputs is not None
    assert not result.outputs["probs"].to_array().any()
    assert result.output_digest == digest_tensors(result.outputs)


async def test_a_lease_that_expires_before_a_slot_is_free_is_not_run(
        tmp_path: Path, coordinator: tuple[FakeCoordinator, str], http: aiohttp.ClientSession,
        runner: Runner) -> None:
    fake, base = coordinator
    model = _publish_model(fake, classifier())
    a = _assignment(model, {"x": np.zeros((1, 4), np.float32)}, expires_in=-1.0)

    with pytest.raises(NotRun):
        await _pipeline(tmp_path, base, http, runner).execute(a)
