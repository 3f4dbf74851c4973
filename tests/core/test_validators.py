"""Strict validators: accept in range, refuse (never clip) out of range, name what was refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from teststand.core import (
    strict_bool,
    strict_discrete_set,
    strict_int_array,
    strict_int_range,
    strict_range,
)
from teststand.errors import RangeError


@given(st.floats(min_value=0.0, max_value=100.0))
def test_strict_range_accepts_inside_unchanged(value: float) -> None:
    assert strict_range(value, (0.0, 100.0)) == value


@given(
    st.one_of(
        st.floats(max_value=-1e-9, allow_nan=False),
        st.floats(min_value=100.0 + 1e-9, allow_nan=False),
    )
)
def test_strict_range_refuses_outside_never_clips(value: float) -> None:
    with pytest.raises(RangeError):
        strict_range(value, (0.0, 100.0))


@pytest.mark.parametrize("value", [float("nan"), "5", None, True, np.bool_(False)])
def test_strict_range_refuses_non_numbers(value: object) -> None:
    with pytest.raises(RangeError):
        strict_range(value, (0.0, 100.0))


def test_strict_range_error_names_instrument_and_parameter() -> None:
    with pytest.raises(RangeError) as info:
        strict_range(101.0, (0.0, 100.0), instrument="laser", what="intensity")
    assert info.value.instrument == "laser"
    assert "intensity" in str(info.value) and "101" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_strict_range_normalises_ints_and_numpy_to_float() -> None:
    assert strict_range(5, (0, 10)) == 5.0 and isinstance(strict_range(5, (0, 10)), float)
    assert isinstance(strict_range(np.float32(2.5), (0, 10)), float)


def test_strict_int_range() -> None:
    assert strict_int_range(16, (0, 16)) == 16
    assert strict_int_range(np.int64(3), (0, 16)) == 3
    for bad in (17, -1, 2.0, True, "3"):
        with pytest.raises(RangeError):
            strict_int_range(bad, (0, 16))


def test_strict_discrete_set_with_mapping_and_list() -> None:
    assert strict_discrete_set("internal", {"internal": "INT", "external": "EXT"}) == "internal"
    assert strict_discrete_set(2, [1, 2, 3]) == 2
    with pytest.raises(RangeError):
        strict_discrete_set("INT", {"internal": "INT", "external": "EXT"})
    with pytest.raises(RangeError):
        strict_discrete_set(True, [0, 1])  # a bool is not a number here
    with pytest.raises(RangeError):
        strict_discrete_set(1, [True, False])


def test_strict_bool() -> None:
    assert strict_bool(True) is True
    assert strict_bool(np.bool_(False)) is False
    for bad in (0, 1, "True", None):
        with pytest.raises(RangeError):
            strict_bool(bad)


def test_strict_int_array_accepts_and_copies() -> None:
    source = np.array([0, 63, 12], dtype=np.int16)
    out = strict_int_array(source, (0, 63, 3))
    assert out.dtype == np.int64 and out.tolist() == [0, 63, 12]
    out[0] = 5
    assert source[0] == 0
    assert strict_int_array([1, 2, 3], (0, 63, 3)).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "value",
    [
        [0, 64, 1],  # above range
        [-1, 0, 1],  # below range
        [1, 2],  # too short
        [1, 2, 3, 4],  # too long
        [1.0, 2.0, 3.0],  # floats, even integral
        [[1, 2, 3]],  # 2-d
        [True, False, True],  # bools
        5,  # scalar
    ],
)
def test_strict_int_array_refuses(value: object) -> None:
    with pytest.raises(RangeError):
        strict_int_array(value, (0, 63, 3))


def test_strict_int_array_error_lists_offending_channels() -> None:
    with pytest.raises(RangeError, match=r"\[2\]=70"):
        strict_int_array([0, 1, 70], (0, 63, 3), instrument="dac", what="t1_codes")
