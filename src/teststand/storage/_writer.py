"""The run-file writer: a document-stream subscriber that records one run in SWMR mode."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.hits import CHANNEL_DTYPE, HIT_DTYPE
from ..errors import RunFileError
from ._hdf5 import (
    ACTIVE_WRITERS,
    attr_value,
    clear_status_flags,
    one_line,
    open_for_update,
    storable_table,
)
from ._reader import RunFile, readers_released
from ._schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HITS_CHUNK_ROWS,
    INSTRUMENT_IDENTITY_ATTRS,
    STEPS_CHUNK_ROWS,
    STOP_STATUSES,
    steps_dtype,
)

log = logging.getLogger(__name__)

#: Keys a ``start`` document must carry (``truth``, ``truth_attrs``, ``n_steps`` and ``seed`` may
#: be absent or ``None``).
START_KEYS = (
    "run_id",
    "recipe_name",
    "kind",
    "recipe_text",
    "stand_name",
    "stand_text",
    "simulated",
    "software_version",
    "started_utc",
    "settings_sha256",
    "axes",
    "channels",
    "instruments",
)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunWriter:
    """Record the document stream of one run in an HDF5 run file (format version 1).

    Subscribe an instance to the engine: ``engine.subscribe(RunWriter(path))``. The file is
    created by the ``start`` document and must not exist yet (a run file is never overwritten).
    Every dataset and attribute is created before SWMR mode is switched on, so that readers can
    follow the run while it is written (:class:`~teststand.storage.RunFile` does).

    Hits are buffered and appended to ``/hits`` in slices of at least one chunk
    (:data:`HITS_CHUNK_ROWS` rows) or whenever ``flush_interval_s`` has passed since the last
    flush. A step is recorded when its ``step`` document arrives: its hits and its ``/steps`` row
    are then flushed, in that order, so a process that dies after a ``step`` document loses no
    completed step. Hits of a step that never completed are cut from ``/hits`` at ``stop``.

    On ``stop`` the writer closes the SWMR session and reopens the file briefly in ``r+`` mode to
    set ``status``, ``finished_utc`` and ``stop_reason``: SWMR cannot safely change attributes
    (rewriting a variable-length string attribute under SWMR corrupts the file in HDF5 2.0).

    The writer has no thread of its own: flushes happen when documents arrive.

    Args:
        path: the run file to create.
        flush_interval_s: longest time between flushes while hits stream in, in seconds.
    """

    def __init__(self, path: str | os.PathLike[str], *, flush_interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.flush_interval_s = float(flush_interval_s)
        self._state = "idle"  # idle -> recording -> closed
        self._file: h5py.File | None = None
        self._hits_ds: h5py.Dataset | None = None
        self._steps_ds: h5py.Dataset | None = None
        self._run_id = ""
        self._axes: list[str] = []
        self._steps_dtype = steps_dtype([])
        self._n_steps = 0  # rows of /steps
        self._hits_done = 0  # hits of completed steps: the end of the last step in /hits
        self._write_pos = 0  # next /hits row to write (>= _hits_done)
        self._ds_rows = 0  # rows of the /hits dataset (>= _write_pos after a discarded step)
        # Small hits blocks are copied into one reusable buffer and written a chunk at a time;
        # blocks of a chunk or more go to the file as they are.
        self._buffer = np.empty(0, dtype=HIT_DTYPE)
        self._pending_rows = 0
        self._step_index: int | None = None  # the step in flight
        self._step_axes: Mapping[str, Any] = {}
        self._step_t_start = 0.0
        self._last_flush = time.monotonic()
        self._reopened = False
        self._warned: set[str] = set()

    # -- state ---------------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """Whether a run is open (between ``start`` and ``stop``)."""
        return self._state == "recording"

    @property
    def run_id(self) -> str:
        """The run being (or last) recorded; empty before ``start``."""
        return self._run_id

    @property
    def n_steps(self) -> int:
        """Completed steps recorded so far."""
        return self._n_steps

    @property
    def n_hits(self) -> int:
        """Hits of the completed steps recorded so far."""
        return self._hits_done

    # -- the subscriber ------------------------------------------------------------------------
    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Handle one document of the stream; other document names are ignored."""
        if name == "start":
            self._start(doc)
        elif name in ("step_start", "hits", "step", "stop") and not self.recording:
            self._warn_once(name, f"{self.path}: {name!r} document without an open run ignored")
        elif name == "step_start":
            self._step_start(doc)
        elif name == "hits":
            self._hits(doc)
        elif name == "step":
            self._step(doc)
        elif name == "stop":
            self._stop(doc)

    def close(self) -> None:
        """Close the file if a run is still open (no ``stop`` arrived).

        The completed steps are kept, the hits of the step in flight are cut, and ``status``
        stays ``running``, exactly as after a crash: the run can be resumed with :meth:`reopen`.
        """
        if self.recording:
            log.warning("%s: closed without a stop document; status stays 'running'", self.path)
            self._discard_step_in_flight()
            self._finish(None, "", "")

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- resume --------------------------------------------------------------------------------
    @classmethod
    def reopen(cls, path: str | os.PathLike[str], *, flush_interval_s: float = 1.0) -> RunWriter:
        """Reopen an interrupted run file to append more steps (for ``teststand resume``).

        Clears the "open for write" mark a dead writer leaves in the superblock, cuts ``/hits``
        back to the end of the last completed step, sets ``status`` to ``running`` (and
        ``finished_utc``, ``stop_reason`` to empty) and switches SWMR on. The returned writer
        takes ``step_start``, ``hits``, ``step`` and ``stop`` documents as usual; a ``start``
        document for the same run id is accepted and ignored (the metadata stay those of the first
        start). The next step's ``index`` is up to the caller, normally :attr:`n_steps`.

        The caller must make sure no other process is writing the file: the cleared mark is what
        keeps a second writer out.

        Raises:
            RunFileError: not a valid run file, or a run that completed.
        """
        path = Path(path)
        if path.resolve() in ACTIVE_WRITERS:
            raise RunFileError(f"{path}: a writer of this process is recording it")
        with RunFile(path) as run:
            status, run_id, axes = run.status, run.run_id, run.axes
        if status == "completed":
            raise RunFileError(f"{path}: the run completed; there is nothing to resume")
        writer = cls(path, flush_interval_s=flush_interval_s)
        with readers_released(path):
            clear_status_flags(path)
            f = open_for_update(path)
            try:
                steps = f["steps"][...]
                done = int(steps["first_hit"][-1] + steps["n_hits"][-1]) if steps.size else 0
                hits = f["hits"]
                if hits.shape[0] > done:
                    log.info("%s: cutting %d hits of a step in flight", path, hits.shape[0] - done)
                    hits.resize((done,))
                f.attrs["status"] = "running"
                f.attrs["finished_utc"] = ""
                f.attrs["stop_reason"] = ""
                f.swmr_mode = True
            except BaseException:
                f.close()
                raise
        writer._file = f
        writer._hits_ds = f["hits"]
        writer._steps_ds = f["steps"]
        writer._run_id = run_id
        writer._axes = axes
        writer._steps_dtype = f["steps"].dtype
        writer._n_steps = int(steps.size)
        writer._hits_done = writer._write_pos = writer._ds_rows = done
        writer._state = "recording"
        writer._reopened = True
        ACTIVE_WRITERS.add(path.resolve())
        log.info("%s: reopened run %s after %d steps (was %s)", path, run_id, steps.size, status)
        return writer

    # -- documents -----------------------------------------------------------------------------
    def _start(self, doc: Mapping[str, Any]) -> None:
        if self.recording:
            if self._reopened and doc.get("run_id") == self._run_id:
                if list(doc.get("axes", self._axes)) != self._axes:
                    raise ValueError(
                        f"{self.path}: resumed run {self._run_id} has axes {self._axes}, "
                        f"the start document {list(doc['axes'])}"
                    )
                return
            raise RunFileError(f"{self.path}: already recording run {self._run_id}")
        if self._state == "closed":
            raise RunFileError(f"{self.path}: this writer has recorded its run; use a new one")
        missing = [key for key in START_KEYS if key not in doc]
        if missing:
            raise ValueError(f"start document lacks {', '.join(missing)}")
        axes = [str(a) for a in doc["axes"]]
        step_dtype = steps_dtype(axes)
        channels = _channel_table(doc["channels"])
        truth = doc.get("truth")
        truth = None if truth is None else storable_table(truth, "truth")
        instruments = _instrument_attrs(doc["instruments"])

        if self.path.exists():
            raise RunFileError(f"{self.path}: already exists; a run file is never overwritten")
        try:
            f = h5py.File(self.path, "w-", libver="latest")
        except OSError as exc:
            raise RunFileError(f"{self.path}: cannot create ({one_line(exc)})") from None
        try:
            _write_root_attrs(f, doc)
            text = h5py.string_dtype("utf-8")
            f.create_dataset("recipe", data=str(doc["recipe_text"]), dtype=text)
            f.create_dataset("stand", data=str(doc["stand_text"]), dtype=text)
            group = f.create_group("instruments")
            for name, attrs in instruments.items():
                sub = group.create_group(name)
                for key, value in attrs.items():
                    sub.attrs[key] = value
            f.create_dataset("channels", data=channels)
            if truth is not None:
                truth_ds = f.create_dataset("truth", data=truth)
                for key, value in dict(doc.get("truth_attrs") or {}).items():
                    truth_ds.attrs[str(key)] = attr_value(value)
            steps = f.create_dataset(
                "steps", shape=(0,), maxshape=(None,), chunks=(STEPS_CHUNK_ROWS,), dtype=step_dtype
            )
            hits = f.create_dataset(
                "hits", shape=(0,), maxshape=(None,), chunks=(HITS_CHUNK_ROWS,), dtype=HIT_DTYPE
            )
            # Nothing may be created from here on: SWMR allows appending data only.
            f.swmr_mode = True
        except BaseException:
            f.close()
            self.path.unlink(missing_ok=True)
            raise
        self._file, self._hits_ds, self._steps_ds = f, hits, steps
        self._run_id = str(doc["run_id"])
        self._axes = axes
        self._steps_dtype = step_dtype
        self._state = "recording"
        self._last_flush = time.monotonic()
        ACTIVE_WRITERS.add(self.path.resolve())
        log.info("%s: recording run %s (axes %s)", self.path, self._run_id, ", ".join(axes))

    def _step_start(self, doc: Mapping[str, Any]) -> None:
        index = int(doc["index"])
        if self._step_index is not None:
            # The engine retries a step (same index) or dropped one: its hits so far go.
            log.warning(
                "%s: step %d started while step %d was in flight; dropping the %d hits of step %d",
                self.path,
                index,
                self._step_index,
                self._step_rows,
                self._step_index,
            )
            self._discard_step_in_flight()
        self._open_step(index, doc.get("axes") or {})

    def _hits(self, doc: Mapping[str, Any]) -> None:
        index = int(doc["index"])
        if self._step_index is None:
            self._open_step(index, {})
        elif index != self._step_index:
            raise ValueError(
                f"{self.path}: hits for step {index} while step {self._step_index} is in flight"
            )
        block = _as_hits(doc["hits"])
        if block.size >= HITS_CHUNK_ROWS:
            self._write_pending()
            self._write(block)
        elif block.size:
            if self._pending_rows + block.size > self._buffer.size:
                self._write_pending()
                if self._buffer.size == 0:
                    self._buffer = np.empty(2 * HITS_CHUNK_ROWS, dtype=HIT_DTYPE)
            # A byte copy: numpy assigns structured arrays field by field, 20 times slower.
            size = HIT_DTYPE.itemsize
            start = self._pending_rows * size
            self._buffer.view(np.uint8)[start : start + block.nbytes] = block.view(np.uint8)
            self._pending_rows += block.size
            if self._pending_rows >= HITS_CHUNK_ROWS:
                self._write_pending()
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self._write_pending()
            self._flush()

    def _step(self, doc: Mapping[str, Any]) -> None:
        index = int(doc["index"])
        if self._step_index is not None and index != self._step_index:
            raise ValueError(
                f"{self.path}: step document for step {index} while step {self._step_index} "
                "is in flight"
            )
        if self._step_index is None:
            self._open_step(index, {})
        axes = dict(self._step_axes)
        axes.update(doc.get("axes") or {})
        unknown = sorted(set(axes) - set(self._axes))
        if unknown:
            raise ValueError(f"{self.path}: step {index} has undeclared axes {unknown}")
        self._write_pending()
        n_hits = self._write_pos - self._hits_done
        if "n_hits" in doc and int(doc["n_hits"]) != n_hits:
            log.warning(
                "%s: step %d: the step document counts %d hits, the writer received %d",
                self.path,
                index,
                int(doc["n_hits"]),
                n_hits,
            )
        row = np.zeros((), dtype=self._steps_dtype)
        row["index"] = index
        for axis in self._axes:
            row[axis] = float(axes.get(axis, np.nan))
        row["first_hit"] = self._hits_done
        row["n_hits"] = n_hits
        row["n_triggers"] = int(doc.get("n_triggers", 0))
        row["t_start"] = float(doc.get("t_start", self._step_t_start))
        row["t_stop"] = float(doc.get("t_stop", time.time()))
        # The hits reach the file before the row that points at them: a reader or a crash
        # never sees a step whose hits are missing.
        assert self._hits_ds is not None and self._steps_ds is not None
        self._hits_ds.flush()
        self._steps_ds.resize((self._n_steps + 1,))
        self._steps_ds[self._n_steps] = row
        self._n_steps += 1
        self._hits_done = self._write_pos
        self._step_index = None
        self._flush()

    def _stop(self, doc: Mapping[str, Any]) -> None:
        status = str(doc.get("status", ""))
        if status not in STOP_STATUSES:
            raise ValueError(
                f"{self.path}: stop status must be one of {', '.join(STOP_STATUSES)}, "
                f"got {status!r}"
            )
        if self._step_index is not None:
            log.info(
                "%s: run stopped during step %d; its %d hits are not recorded",
                self.path,
                self._step_index,
                self._step_rows,
            )
        self._discard_step_in_flight()
        self._finish(status, str(doc.get("finished_utc") or utc_now()), str(doc.get("reason", "")))
        log.info(
            "%s: run %s %s, %d steps, %d hits",
            self.path,
            self._run_id,
            status,
            self._n_steps,
            self._hits_done,
        )

    # -- internals -----------------------------------------------------------------------------
    @property
    def _step_rows(self) -> int:
        return self._write_pos - self._hits_done + self._pending_rows

    def _open_step(self, index: int, axes: Mapping[str, Any]) -> None:
        self._step_index = index
        self._step_axes = dict(axes)
        self._step_t_start = time.time()

    def _discard_step_in_flight(self) -> None:
        # Rows already written past the last step stay in the dataset until overwritten or cut
        # at the end; they belong to no step.
        self._pending_rows = 0
        self._write_pos = self._hits_done
        self._step_index = None

    def _write_pending(self) -> None:
        if self._pending_rows:
            self._write(self._buffer[: self._pending_rows])
            self._pending_rows = 0

    def _write(self, block: np.ndarray) -> None:
        start, stop = self._write_pos, self._write_pos + block.size
        assert self._hits_ds is not None
        if stop > self._ds_rows:
            self._hits_ds.resize((stop,))
            self._ds_rows = stop
        self._hits_ds[start:stop] = block
        self._write_pos = stop

    def _flush(self) -> None:
        assert self._file is not None
        self._file.flush()
        self._last_flush = time.monotonic()

    def _finish(self, status: str | None, finished_utc: str, reason: str) -> None:
        """End the SWMR session, cut partial hits and (with a status) write the final attributes."""
        f = self._file
        self._file = self._hits_ds = self._steps_ds = None
        self._state = "closed"
        assert f is not None
        # Readers of this process share the writer's HDF5 file; they let go so that closing
        # really closes it and the r+ open below gets a file of its own.
        with readers_released(self.path):
            try:
                f.flush()
            finally:
                f.close()
                ACTIVE_WRITERS.discard(self.path.resolve())
            if status is None and self._ds_rows == self._hits_done:
                return
            with open_for_update(self.path) as g:
                hits = g["hits"]
                if hits.shape[0] > self._hits_done:
                    hits.resize((self._hits_done,))
                if status is not None:
                    g.attrs["status"] = status
                    g.attrs["finished_utc"] = finished_utc
                    g.attrs["stop_reason"] = reason

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)


# -- document contents -> HDF5 -----------------------------------------------------------------
def _write_root_attrs(f: h5py.File, doc: Mapping[str, Any]) -> None:
    attrs = f.attrs
    attrs["format"] = FORMAT_NAME
    attrs["format_version"] = np.int64(FORMAT_VERSION)
    attrs["run_id"] = str(doc["run_id"])
    attrs["recipe"] = str(doc["recipe_name"])
    attrs["kind"] = str(doc["kind"])
    attrs["status"] = "running"
    attrs["started_utc"] = str(doc["started_utc"])
    attrs["finished_utc"] = ""
    attrs["stop_reason"] = ""
    attrs["software_version"] = str(doc["software_version"])
    attrs["stand"] = str(doc["stand_name"])
    attrs["simulated"] = np.bool_(bool(doc["simulated"]))
    attrs["settings_sha256"] = str(doc["settings_sha256"])
    if doc.get("seed") is not None:
        attrs["seed"] = np.int64(int(doc["seed"]))
    if doc.get("n_steps") is not None:
        attrs["n_steps_planned"] = np.int64(int(doc["n_steps"]))


def _channel_table(channels: Any) -> np.ndarray:
    """The ``/channels`` rows from the start document's table (fields taken by name)."""
    if channels is None:
        return np.zeros(0, dtype=CHANNEL_DTYPE)
    array = np.asarray(channels)
    names = array.dtype.names or ()
    missing = [n for n in CHANNEL_DTYPE.names or () if n not in names]
    if missing or array.ndim != 1:
        raise ValueError(
            f"channels must be a 1-D structured array with fields {CHANNEL_DTYPE.names}, "
            f"missing {missing}"
        )
    table = np.zeros(array.shape, dtype=CHANNEL_DTYPE)
    for name in CHANNEL_DTYPE.names or ():
        table[name] = array[name]
    return table


def _instrument_attrs(instruments: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``/instruments/<name>`` attributes: the identity, then the read-back settings."""
    out: dict[str, dict[str, Any]] = {}
    for name, info in (instruments or {}).items():
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"instrument name {name!r} cannot name an HDF5 group")
        attrs = {key: str(info.get(key, "") or "") for key in INSTRUMENT_IDENTITY_ATTRS}
        for key, value in dict(info.get("settings") or {}).items():
            if key in INSTRUMENT_IDENTITY_ATTRS:
                raise ValueError(f"instrument {name!r}: a setting may not be called {key!r}")
            attrs[str(key)] = attr_value(value)
        out[str(name)] = attrs
    return out


def _as_hits(hits: Any) -> np.ndarray:
    array = np.asarray(hits)
    if array.dtype != HIT_DTYPE:
        if array.dtype.names != HIT_DTYPE.names:
            raise ValueError(f"hits must have the fields {HIT_DTYPE.names}, got {array.dtype}")
        array = array.astype(HIT_DTYPE)
    return np.ascontiguousarray(array.reshape(-1))
