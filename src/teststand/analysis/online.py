"""Step accumulators: one reduction that serves the online and the offline analysis alike.

A calibration method is a :class:`StepAccumulator`. It is fed step by step: the hits of a step
(:meth:`~StepAccumulator.add_hits`, any number of blocks) and then the step's ``/steps`` row
(:meth:`~StepAccumulator.end_step`), where the step is reduced to running sums per (channel,
step) or per (channel, bin). :meth:`~StepAccumulator.fit` turns the sums into the per-channel
table at any time.

Online, a subscriber of the document stream feeds it as the run goes; offline, ``teststand
analyze`` feeds it the steps of the finished file in the same order. Because a step is reduced
as a whole at its end (its blocks are concatenated first), the two see exactly the same arrays in
the same order and produce the same numbers: the online result at the end of a run *is* the
offline result. Memory is bounded by one step's hits plus the sums.

Pure numpy: no instruments, no h5py, no Qt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from ..core.hits import HIT_DTYPE


class StepAccumulator(ABC):
    """Base of every method's accumulator.

    Args:
        channels: the run's ``/channels`` table (channel, plane, bar, board, delay_ns).
        axes: the scan axes, as in ``/steps``.
        params: the method's parameters (defaults in :attr:`defaults`); unknown names raise
            ``ValueError``.

    Subclasses set :attr:`method`, :attr:`defaults` and :attr:`json_keys` and implement
    :meth:`reduce_step` and :meth:`fit`.
    """

    #: the method's name (``/analysis/<method>``)
    method: ClassVar[str] = ""
    #: parameter defaults; a parameter not listed here is refused
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: JSON key -> field of the result table (design section 6)
    json_keys: ClassVar[Mapping[str, str]] = {}

    def __init__(self, channels: NDArray[Any], axes: Sequence[str], **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"method {self.method!r} has no parameter {unknown[0]!r}"
                + (f" (it takes {', '.join(sorted(self.defaults))})" if self.defaults else "")
            )
        self.channels = np.asarray(channels)
        self.axes = list(axes)
        self.params: dict[str, Any] = {**self.defaults, **params}
        self.n_steps = 0
        self._pending: list[NDArray[Any]] = []
        self._pending_step: int | None = None

    @property
    def n_channels(self) -> int:
        """Number of channels in the channel map."""
        return int(self.channels.size)

    def add_hits(self, step: int, hits: NDArray[Any]) -> None:
        """Buffer a block of the hits of ``step`` (reduced when the step ends)."""
        if self._pending_step is not None and step != self._pending_step:
            self._pending.clear()  # the previous step never completed: it is not recorded
        self._pending_step = step
        if hits.size:
            self._pending.append(hits)

    def end_step(self, step: int, row: Mapping[str, Any]) -> None:
        """Reduce ``step``: ``row`` holds its ``/steps`` fields (axes, n_triggers, n_hits, ...)."""
        if self._pending_step == step and self._pending:
            hits = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        else:
            hits = np.empty(0, dtype=HIT_DTYPE)
        self._pending = []
        self._pending_step = None
        self.reduce_step(step, row, hits)
        self.n_steps += 1

    @abstractmethod
    def reduce_step(self, step: int, row: Mapping[str, Any], hits: NDArray[Any]) -> None:
        """Fold one complete step into the running sums."""

    @abstractmethod
    def fit(self) -> NDArray[Any]:
        """The per-channel result table from the sums so far (one row per channel)."""

    def attrs(self) -> dict[str, Any]:
        """Scalar results and parameters for the ``/analysis/<method>`` attributes."""
        return {}

    def json_rows(self, table: NDArray[Any]) -> list[dict[str, Any]]:
        """The JSON rows of design section 6 for ``table``."""
        rows = []
        names = table.dtype.names or ()
        for row in table:
            out: dict[str, Any] = {"channel": int(row["channel"])}
            for key, field in self.json_keys.items():
                out[key] = json_value(row[field])
            if "flag" in names:
                out["flag"] = str(row["flag"])
            rows.append(out)
        return rows


def json_value(value: Any) -> Any:
    """A numpy value as plain JSON data (NaN becomes ``None``; arrays lose their NaN padding)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            value = value[np.isfinite(value)]
        return [json_value(v) for v in value.tolist()]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.str_):
        return str(value)
    return value
