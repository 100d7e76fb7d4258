"""Sizes decided from lengths must never under-estimate the real encoding: an inline result or a
batch that turned out larger would break the message limit."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from node.batching import result_size_bound
from protocol.messages import Result
from protocol.tensors import encode_tensor_map, encoded_size_bound, tensors_from_arrays

names = st.text(min_size=1, max_size=40)
dtypes = st.sampled_from(["float32", "float64", "int64", "int32", "uint8", "bool", "float16"])
shapes = st.lists(st.integers(0, 70), min_size=0, max_size=4)


@st.composite
def tensor_maps(draw: st.DrawFn) -> dict[str, np.ndarray]:
    return {draw(names): np.zeros(draw(shapes), dtype=draw(dtypes)) for _ in range(draw(st.integers(0, 4)))}


@settings(max_examples=200, deadline=None)
@given(tensor_maps())
def test_the_tensor_map_bound_is_never_below_the_encoded_size(arrays: dict[str, np.ndarray]) -> None:
    tensors = tensors_from_arrays(arrays)
    assert encoded_size_bound(tensors) >= len(encode_tensor_map(tensors))


@settings(max_examples=200, deadline=None)
@given(tensor_maps(), st.text(max_size=60), st.one_of(st.none(), st.text(max_size=500)))
def test_the_result_bound_is_never_below_the_encoded_size(arrays: dict[str, np.ndarray], task: str,
                                                          error: str | None) -> None:
    result = Result(task=task or "t", job="j" * 16, lease="l" * 32, input_digest="a" * 64,
                    output_digest="b" * 64, outputs=tensors_from_arrays(arrays) if arrays else None,
                    elapsed=0.25, error=error)
    assert result_size_bound(result) >= len(msgpack.packb(result.to_wire(), use_bin_type=True))
