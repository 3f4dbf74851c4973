"""The run-file reader (also while the run is written) and the analysis writer."""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.hits import HIT_DTYPE
from ..errors import RunFileError
from ._hdf5 import (
    ACTIVE_WRITERS,
    attr_value,
    one_line,
    open_for_reading,
    open_for_update,
    readable_table,
    storable_table,
)
from ._schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INSTRUMENT_IDENTITY_ATTRS,
    REQUIRED_DATASETS,
    REQUIRED_ROOT_ATTRS,
    RESERVED_STEP_FIELDS,
    axes_of,
    hits_dtype_ok,
)

log = logging.getLogger(__name__)

#: Rows read at once by :meth:`RunFile.columns` and :meth:`RunFile.iter_steps` (about 36 MB of
#: hits): large reads are fast, and memory stays bounded on long runs.
READ_BLOCK_ROWS = 1 << 20

# HDF5 keeps one open file per process and path: a RunFile in the process that writes the run
# shares the writer's file, and an update in r+ mode could not open a file a reader here holds
# in read-only mode. The writer therefore has every RunFile of this process on its path let go
# of its handle while it updates the file (see readers_released); they reopen on next use.
_registry_lock = threading.RLock()
_readers: weakref.WeakSet[RunFile] = weakref.WeakSet()


@contextmanager
def readers_released(path: Path) -> Iterator[None]:
    """Close the handles of every :class:`RunFile` of this process on ``path`` for the duration.

    The readers wait (they hold no handle) until the block ends, then reopen on their next use.
    """
    key = path.resolve()
    held: list[RunFile] = []
    with _registry_lock:
        try:
            for reader in list(_readers):
                if reader._key == key:
                    reader._lock.acquire()
                    held.append(reader)
                    reader._drop_handle()
            yield
        finally:
            for reader in held:
                reader._lock.release()


def python_value(value: Any) -> Any:
    """An attribute value as plain Python: ``str``, ``int``, ``float``, ``bool`` or a list."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OS":  # text arrays: bytes or str objects
            return [python_value(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return python_value(value.item())
    return value


class RunFile:
    """A run file opened for reading: validated on open, usable while it is still being written.

    Opens with plain h5py in SWMR read mode, so it works on a finished run, on a run being
    written (call :meth:`refresh` to see the new steps) and on the file of a writer that died.
    Safe to share between threads (one lock per instance).

    >>> with RunFile("run.h5") as run:
    ...     for step, hits in run.iter_steps():
    ...         print(step["index"], step["thr2"], hits["t1"].mean())

    Raises:
        RunFileError: not HDF5, not a teststand run file, another format version, or incomplete;
            the one-line message names the file and what is wrong.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._key = self.path.resolve()
        self._lock = threading.RLock()
        self._cache: dict[str, Any] = {}
        self._closed = False
        with _registry_lock:
            self._file: h5py.File | None = open_for_reading(self.path)
            try:
                self._validate(self._file)
            except BaseException:
                self._file.close()
                raise
            _readers.add(self)

    # -- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            self._closed = True
            self._drop_handle()
        _readers.discard(self)

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunFile({str(self.path)!r}{', closed' if self._closed else ''})"

    def refresh(self) -> None:
        """See what a writer added since the file was opened or last refreshed.

        While the run is ``running`` this reopens the file: SWMR shows appended rows, but the
        final status is written outside SWMR and only a fresh open sees it. A finished file does
        not change; then this only drops the cached tables.
        """
        with self._lock:
            running = self.status == "running"
            self._cache.clear()
            if running:
                self._drop_handle()
                self._validate(self._h5())

    @property
    def file(self) -> h5py.File:
        """The underlying :class:`h5py.File` (SWMR read), valid until the next :meth:`refresh`."""
        with self._lock:
            return self._h5()

    # -- metadata ------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes as plain Python values."""
        with self._lock:
            if "attrs" not in self._cache:
                self._cache["attrs"] = {k: python_value(v) for k, v in self._h5().attrs.items()}
            return dict(self._cache["attrs"])

    @property
    def run_id(self) -> str:
        """The run's id."""
        return str(self.attrs["run_id"])

    @property
    def kind(self) -> str:
        """The plan kind the run executed (``threshold_scan``, ``awc_calibration``, ...)."""
        return str(self.attrs["kind"])

    @property
    def status(self) -> str:
        """``running``, ``completed``, ``aborted``, ``failed`` or ``interrupted``."""
        return str(self.attrs["status"])

    @property
    def simulated(self) -> bool:
        """Whether the run was taken on simulated instruments."""
        return bool(self.attrs["simulated"])

    @property
    def recipe_text(self) -> str:
        """The recipe (TOML) as run."""
        with self._lock:
            return str(self._h5()["recipe"].asstr()[()])

    @property
    def stand_text(self) -> str:
        """The stand file (TOML) as run."""
        with self._lock:
            return str(self._h5()["stand"].asstr()[()])

    @property
    def instruments(self) -> dict[str, dict[str, Any]]:
        """``{name: {idn, serial, firmware, resource, settings: {...}}}`` as recorded at start."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            group = self._h5().get("instruments")
            for name, sub in group.items() if group is not None else ():
                attrs = {k: python_value(v) for k, v in sub.attrs.items()}
                info: dict[str, Any] = {k: attrs.pop(k, "") for k in INSTRUMENT_IDENTITY_ATTRS}
                info["settings"] = attrs
                out[name] = info
        return out

    # -- tables --------------------------------------------------------------------------------
    @property
    def axes(self) -> list[str]:
        """The scan axes: the ``/steps`` fields other than the fixed ones, in file order."""
        return axes_of(self.steps.dtype)

    @property
    def steps(self) -> np.ndarray:
        """``/steps``: one row per completed step (index, the axes, first_hit, n_hits, ...)."""
        return self._table("steps")

    @property
    def channels(self) -> np.ndarray:
        """``/channels``: channel, plane, bar, board, delay_ns per readout channel."""
        return self._table("channels")

    @property
    def truth(self) -> np.ndarray | None:
        """``/truth`` (the simulator's true parameters per channel), or ``None``."""
        with self._lock:
            if "truth" not in self._h5():
                return None
            return readable_table(self._table("truth"))

    @property
    def truth_attrs(self) -> dict[str, Any]:
        """Attributes of ``/truth`` (stand-wide true values such as the seed), or ``{}``."""
        with self._lock:
            ds = self._h5().get("truth")
            return {} if ds is None else {k: python_value(v) for k, v in ds.attrs.items()}

    @property
    def n_hits(self) -> int:
        """Hits of the completed steps (``/hits`` may hold more rows while a step is in flight)."""
        steps = self.steps
        return int(steps["first_hit"][-1] + steps["n_hits"][-1]) if steps.size else 0

    # -- hits ----------------------------------------------------------------------------------
    def step_hits(self, index: int) -> np.ndarray:
        """The hits (``HIT_DTYPE``) of the step whose ``index`` field is ``index``.

        Raises:
            IndexError: no completed step has that index.
        """
        steps = self.steps
        rows = np.flatnonzero(steps["index"] == index)
        if rows.size == 0:
            raise IndexError(f"{self.path}: no completed step {index}")
        row = steps[rows[-1]]
        first = int(row["first_hit"])
        return self._read(first, first + int(row["n_hits"]))

    def hits(self, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``/hits`` (Python slice rules) as ``HIT_DTYPE``."""
        with self._lock:
            first, last, _ = slice(start, stop).indices(int(self._h5()["hits"].shape[0]))
            return self._read(first, max(first, last))

    def columns(
        self, names: str | Sequence[str], steps: Iterable[int] | np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Read hit columns, one 1-D array each, for analysis.

        Args:
            names: hit fields (``event``, ``channel``, ``t1``, ``t2``, ``q``, ``tot``) and/or scan
                axes (the step's axis value repeated for each of its hits).
            steps: rows of ``/steps`` to read (positions, as from ``np.flatnonzero(mask)``, or a
                boolean mask over the steps); ``None`` reads every completed step.

        Returns:
            ``{name: array}`` for the names asked for, plus ``"step"``: for every hit, the
            position of its step in the selection (``steps=None``: its row of ``/steps``), as
            ``int64``. Hits come in the order of the selection.

        Raises:
            ValueError: a name that is neither a hit field nor a scan axis.
            IndexError: a step row out of range.
        """
        wanted = list(dict.fromkeys([names] if isinstance(names, str) else names))
        table = self._select_steps(steps)
        axes = axes_of(table.dtype)
        hit_fields = HIT_DTYPE.names or ()
        unknown = [n for n in wanted if n not in hit_fields and n not in axes and n != "step"]
        if unknown:
            raise ValueError(
                f"{self.path}: no column {unknown[0]!r}; the hit fields are "
                f"{', '.join(hit_fields)}, the scan axes {', '.join(axes) or '(none)'}"
            )
        counts = table["n_hits"].astype(np.int64)
        starts = table["first_hit"].astype(np.int64)
        fields = [n for n in wanted if n in hit_fields]
        total = int(counts.sum())
        out = {n: np.empty(total, dtype=HIT_DTYPE[n]) for n in fields}
        if fields and total:
            with self._lock:
                # Whole rows, then the fields: HDF5 reads a subset of compound fields through its
                # type conversion, three times slower than reading whole rows.
                reader = self._hits_dataset(int((starts + counts).max()))
                pos = 0
                for first, last in _contiguous_ranges(starts, counts):
                    for a in range(first, last, READ_BLOCK_ROWS):
                        block = reader[a : min(last, a + READ_BLOCK_ROWS)]
                        for n in fields:
                            out[n][pos : pos + block.size] = block[n]
                        pos += block.size
        position = np.repeat(np.arange(table.size, dtype=np.int64), counts)
        for n in wanted:
            if n in axes and n not in out:
                out[n] = table[n][position]
        out["step"] = position
        return out

    def iter_steps(self) -> Iterator[tuple[np.void, np.ndarray]]:
        """Yield ``(step_row, hits)`` per completed step; ``/hits`` is read in large blocks."""
        table = self.steps
        starts = table["first_hit"].astype(np.int64)
        ends = starts + table["n_hits"].astype(np.int64)
        i = 0
        while i < table.size:
            # Gather the following steps that are contiguous in /hits, up to a block's worth.
            j = i + 1
            while (
                j < table.size
                and starts[j] == ends[j - 1]
                and ends[j] - starts[i] <= READ_BLOCK_ROWS
            ):
                j += 1
            block = self._read(int(starts[i]), int(ends[j - 1]))
            for k in range(i, j):
                yield table[k], block[starts[k] - starts[i] : ends[k] - starts[i]]
            i = j

    # -- analysis results ----------------------------------------------------------------------
    def analysis_methods(self) -> list[str]:
        """The methods with a result under ``/analysis``, sorted."""
        with self._lock:
            group = self._h5().get("analysis")
            return sorted(group.keys()) if group is not None else []

    def analysis(self, method: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """``(table, attrs)`` of ``/analysis/<method>``, or ``None`` when there is none.

        ``attrs["parameters"]`` is decoded from its JSON text into a dict.
        """
        with self._lock:
            group = self._h5().get("analysis")
            if group is None or method not in group:
                return None
            ds = group[method]
            attrs = {k: python_value(v) for k, v in ds.attrs.items()}
            table = readable_table(ds[...])
        if isinstance(attrs.get("parameters"), str):
            try:
                attrs["parameters"] = json.loads(attrs["parameters"])
            except json.JSONDecodeError:
                log.warning("%s: /analysis/%s: parameters are not JSON", self.path, method)
        return table, attrs

    # -- internals -----------------------------------------------------------------------------
    def _h5(self) -> h5py.File:
        """The open file; reopened when a writer of this process made us let go. Hold the lock."""
        if self._closed:
            raise RunFileError(f"{self.path}: the run file is closed")
        if self._file is None:
            self._file = open_for_reading(self.path)
            self._cache.clear()
        return self._file

    def _drop_handle(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _table(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._cache:
                self._cache[name] = np.asarray(self._h5()[name][...])
            table: np.ndarray = self._cache[name]
            return table

    def _validate(self, f: h5py.File) -> None:
        p = self.path
        if "format" not in f.attrs:
            raise RunFileError(f"{p}: not a teststand run file (no 'format' attribute)")
        fmt = python_value(f.attrs["format"])
        if fmt != FORMAT_NAME:
            raise RunFileError(
                f"{p}: not a teststand run file (format {fmt!r}, not {FORMAT_NAME!r})"
            )
        version = python_value(f.attrs.get("format_version"))
        if isinstance(version, bool) or not isinstance(version, int):
            raise RunFileError(f"{p}: format_version {version!r} is not an integer")
        if version != FORMAT_VERSION:
            newer = " (written by a newer teststand: update teststand)" if version > 1 else ""
            raise RunFileError(
                f"{p}: format version {version} is not supported, this teststand reads version "
                f"{FORMAT_VERSION}{newer}"
            )
        missing = [a for a in REQUIRED_ROOT_ATTRS if a not in f.attrs]
        if missing:
            raise RunFileError(f"{p}: incomplete run file: no root attribute {', '.join(missing)}")
        for name in REQUIRED_DATASETS:
            if not isinstance(f.get(name), h5py.Dataset):
                raise RunFileError(f"{p}: incomplete run file: no /{name} dataset")
        lacking = sorted(RESERVED_STEP_FIELDS - set(f["steps"].dtype.names or ()))
        if lacking:
            raise RunFileError(f"{p}: /steps lacks the field(s) {', '.join(lacking)}")
        if not hits_dtype_ok(f["hits"].dtype):
            raise RunFileError(f"{p}: /hits is {f['hits'].dtype}, not the hit record {HIT_DTYPE}")

    def _select_steps(self, steps: Iterable[int] | np.ndarray | None) -> np.ndarray:
        table = self.steps
        if steps is None:
            return table
        rows = np.asarray(steps if isinstance(steps, np.ndarray) else list(steps))
        if rows.dtype == bool:
            if rows.shape != table.shape:
                raise IndexError(
                    f"{self.path}: a step mask needs {table.size} entries, got {rows.size}"
                )
            return np.asarray(table[rows])
        rows = rows.astype(np.int64, copy=False).reshape(-1)
        bad = rows[(rows < 0) | (rows >= table.size)]
        if bad.size:
            raise IndexError(f"{self.path}: no step row {int(bad[0])} (the run has {table.size})")
        return table[rows]

    def _hits_dataset(self, needed_rows: int) -> h5py.Dataset:
        """``/hits``, refreshed if a step read from ``/steps`` reaches beyond what we saw."""
        f = self._h5()
        ds = f["hits"]
        if ds.shape[0] < needed_rows and f.swmr_mode:
            ds.refresh()
        if ds.shape[0] < needed_rows:
            raise RunFileError(
                f"{self.path}: /hits has {ds.shape[0]} rows, the steps need {needed_rows}"
            )
        return ds

    def _read(self, first: int, last: int) -> np.ndarray:
        if last <= first:
            return np.empty(0, dtype=HIT_DTYPE)
        with self._lock:
            block = np.asarray(self._hits_dataset(last)[first:last])
        return block if block.dtype == HIT_DTYPE else block.astype(HIT_DTYPE)


def _contiguous_ranges(starts: np.ndarray, counts: np.ndarray) -> list[tuple[int, int]]:
    """Merge consecutive ``[start, start + count)`` ranges that touch into longer ones."""
    ranges: list[tuple[int, int]] = []
    for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
        if count == 0:
            continue
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + count)
        else:
            ranges.append((start, start + count))
    return ranges


def write_analysis(
    path: str | os.PathLike[str], method: str, table: np.ndarray, attrs: Mapping[str, Any]
) -> None:
    """Write (or replace) ``/analysis/<method>`` in a finished run file.

    Args:
        path: the run file; its run must not be being written.
        method: the analysis method (``scurve``, ``awc``, ...), the dataset's name.
        table: one row per channel, a structured array (numpy text fields are stored as UTF-8).
        attrs: attributes; ``parameters`` (a mapping, or its JSON text) is stored as JSON text,
            ``software_version`` and ``created_utc`` default to this teststand and now, and
            ``method`` is always ``method``. Other entries are stored as they are.

    Raises:
        RunFileError: not a valid run file, or open for writing elsewhere.
        ValueError: a bad method name, table or parameters.
    """
    from .. import __version__

    path = Path(path)
    if not method or "/" in method or method in (".", ".."):
        raise ValueError(f"analysis method {method!r} cannot name an HDF5 dataset")
    data = storable_table(table, f"/analysis/{method}")
    values = dict(attrs)
    parameters = values.pop("parameters", {})
    if isinstance(parameters, str):
        try:
            json.loads(parameters)
        except json.JSONDecodeError as exc:
            raise ValueError(f"analysis parameters are not JSON: {one_line(exc)}") from None
    else:
        parameters = json.dumps(dict(parameters), sort_keys=True, default=str)
    values["method"] = method
    values["parameters"] = parameters
    values.setdefault("software_version", __version__)
    values.setdefault("created_utc", datetime.now(UTC).isoformat(timespec="seconds"))
    if path.resolve() in ACTIVE_WRITERS:
        raise RunFileError(f"{path}: the run is still being written (by this process)")
    with RunFile(path):
        pass  # validates the format before anything is changed
    with readers_released(path), open_for_update(path) as f:
        group = f.require_group("analysis")
        if method in group:
            del group[method]
        ds = group.create_dataset(method, data=data)
        for key, value in values.items():
            ds.attrs[key] = attr_value(value)
    log.info("%s: wrote /analysis/%s (%d rows)", path, method, data.size)
