"""Strict validators for declarative instrument parameters.

A validator is called as ``validator(value, values, instrument=..., what=...)`` before anything is
sent. It returns the value normalised to the type the parameter holds, or raises
:class:`~teststand.errors.RangeError`. Validators never clip: an out-of-range threshold that was
silently clipped would corrupt a calibration without anyone noticing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import numpy as np

from ..errors import RangeError


class Validator(Protocol):
    """The signature every validator has."""

    def __call__(self, value: Any, values: Any, *, instrument: str = ..., what: str = ...) -> Any:
        """Return ``value`` normalised, or raise `RangeError` naming ``instrument`` and ``what``."""
        ...


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def strict_range(
    value: Any, values: tuple[float, float], *, instrument: str = "", what: str = "value"
) -> float:
    """Accept a real number within ``values = (low, high)`` inclusive; return it as a float."""
    low, high = values
    if not _is_real(value) or math.isnan(float(value)):
        raise RangeError(instrument, f"{what} = {value!r} is not a number; nothing was sent")
    if not low <= float(value) <= high:
        raise RangeError(
            instrument,
            f"{what} = {value!r} is outside the strict range [{low:g}, {high:g}]; nothing was sent",
        )
    return float(value)


def strict_int_range(
    value: Any, values: tuple[int, int], *, instrument: str = "", what: str = "value"
) -> int:
    """Accept an integer (not a float, not a bool) within ``values = (low, high)`` inclusive."""
    low, high = values
    if not _is_integer(value):
        raise RangeError(instrument, f"{what} = {value!r} is not an integer; nothing was sent")
    if not low <= int(value) <= high:
        raise RangeError(
            instrument,
            f"{what} = {value!r} is outside the strict range [{low}, {high}]; nothing was sent",
        )
    return int(value)


def strict_discrete_set(
    value: Any, values: Collection[Any], *, instrument: str = "", what: str = "value"
) -> Any:
    """Accept one of ``values`` (the keys, for a mapping); return it unchanged."""
    allowed = list(values.keys()) if isinstance(values, Mapping) else list(values)
    # True == 1 in Python: a bool must not pass for an integer choice or the other way round.
    same_kind = [v for v in allowed if isinstance(v, bool) == isinstance(value, bool | np.bool_)]
    if value not in same_kind:
        raise RangeError(
            instrument, f"{what} = {value!r} is not one of {allowed!r}; nothing was sent"
        )
    return value


def strict_bool(
    value: Any, values: Any = None, *, instrument: str = "", what: str = "value"
) -> bool:
    """Accept ``True`` or ``False`` only (not 0/1, not strings)."""
    if not isinstance(value, bool | np.bool_):
        raise RangeError(instrument, f"{what} = {value!r} is not a bool; nothing was sent")
    return bool(value)


def strict_int_array(
    value: Any, values: tuple[int, int, int], *, instrument: str = "", what: str = "value"
) -> np.ndarray:
    """Accept exactly ``length`` integers in ``[low, high]``; ``values = (low, high, length)``.

    Returns a new ``int64`` array. Floats are refused even when integral: a code computed as a float
    was rounded somewhere, and that rounding belongs to the caller.
    """
    low, high, length = values
    array = np.asarray(value)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise RangeError(
            instrument,
            f"{what} must be a 1-d sequence of integers, got {_describe(array)}; nothing was sent",
        )
    if array.size != length:
        raise RangeError(
            instrument,
            f"{what} needs {length} values (one per channel), got {array.size}; nothing was sent",
        )
    bad = np.flatnonzero((array < low) | (array > high))
    if bad.size:
        shown = ", ".join(f"[{i}]={array[i]}" for i in bad[:5])
        more = f" and {bad.size - 5} more" if bad.size > 5 else ""
        raise RangeError(
            instrument,
            f"{what}: {shown}{more} outside the strict range [{low}, {high}]; nothing was sent",
        )
    return array.astype(np.int64, copy=True)


def _describe(array: np.ndarray) -> str:
    return f"an array of shape {array.shape} and dtype {array.dtype}"
