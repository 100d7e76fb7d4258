"""client.npz: names and dtypes survive a round trip; pickles and non-NPZ bytes are refused."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pytest

from sparecycles.errors import BadNpz
from sparecycles.npz import from_npz, to_npz


@pytest.mark.parametrize(
    "name",
    ["x", "sum.out", "a.b.c", "output.npy", "with space", "slash/inside", "ünïcode", "file", "allow_pickle"],
)
def test_a_name_survives_the_round_trip_exactly(name: str) -> None:
    arrays = {name: np.arange(6, dtype=np.int64).reshape(3, 2)}

    back = from_npz(to_npz(arrays))

    assert list(back) == [name]
    np.testing.assert_array_equal(back[name], arrays[name])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.float64, np.uint8, np.bool_])
def test_dtype_shape_and_values_survive_the_round_trip(dtype: type[np.generic]) -> None:
    rng = np.random.default_rng(7)
    original = (rng.standard_normal((5, 3, 2)) * 100).astype(dtype)

    back = from_npz(to_npz({"t": original}))["t"]

    assert back.dtype == original.dtype
    assert back.shape == original.shape
    assert back.tobytes() == original.tobytes()


def test_several_arrays_keep_their_names_and_order() -> None:
    arrays: dict[str, Any] = {
        "probabilities.out": np.zeros((4, 10), np.float32),
        "label": np.arange(4, dtype=np.int64),
        "mask": np.array([True, False, True, True]),
    }

    back = from_npz(to_npz(arrays))

    assert list(back) == list(arrays)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(back[name], arr)


def test_output_is_a_standard_npz_that_numpy_loads_without_pickle() -> None:
    data = to_npz({"sum.out": np.array([1.5, 2.5], np.float32), "idx": np.array([3], np.int32)})

    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == ["idx", "sum.out"]
        np.testing.assert_array_equal(loaded["sum.out"], np.array([1.5, 2.5], np.float32))


def test_an_npz_written_by_numpy_savez_is_read_with_dotted_names_intact() -> None:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {"sum.out": np.arange(3, dtype=np.int32), "y": np.ones(2, bool)}
    np.savez_compressed(buf, **arrays)

    back = from_npz(buf.getvalue())

    assert set(back) == {"sum.out", "y"}
    assert back["sum.out"].dtype == np.int32


def test_zero_rows_and_scalars_round_trip() -> None:
    arrays: dict[str, Any] = {"empty": np.zeros((0, 4), np.float32), "scalar": np.array(3, np.int64)}

    back = from_npz(to_npz(arrays))

    assert back["empty"].shape == (0, 4)
    assert back["scalar"].shape == ()
    assert int(back["scalar"]) == 3


def test_writing_an_object_array_is_refused() -> None:
    with pytest.raises(BadNpz, match="object"):
        to_npz({"bad": np.array([{"a": 1}, None], dtype=object)})


def test_reading_a_pickled_object_array_is_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, bad=np.array([{"a": 1}, None], dtype=object))  # numpy pickles object arrays

    with pytest.raises(BadNpz, match="pickle"):
        from_npz(buf.getvalue())


@pytest.mark.parametrize("name", ["", "nul\x00byte"])
def test_names_that_cannot_survive_are_refused(name: str) -> None:
    with pytest.raises(BadNpz):
        to_npz({name: np.zeros(1)})


def test_bytes_that_are_not_a_zip_are_not_an_npz() -> None:
    with pytest.raises(BadNpz, match=r"not a \.npz"):
        from_npz(b"\x93NUMPY this is a lone .npy header, not a zip")


def test_a_zip_holding_something_other_than_npy_files_is_not_an_npz() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "hello")

    with pytest.raises(BadNpz, match=r"notes\.txt"):
        from_npz(buf.getvalue())


def test_bad_npz_is_also_a_value_error_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError):
        from_npz(b"")
