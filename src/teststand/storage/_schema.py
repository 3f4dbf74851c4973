"""The layout of run-file format version 1: names, dtypes and sizes in one place.

``docs/data-format.md`` is the prose reference of the same layout; a change to anything here
changes the format and must bump :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

from ..core.hits import HIT_DTYPE

#: Value of the root attribute ``format``.
FORMAT_NAME: Final = "teststand.run"

#: Value of the root attribute ``format_version``; any change of the layout bumps it.
FORMAT_VERSION: Final = 1

#: Values of the root attribute ``status``.
RUN_STATUSES: Final = ("running", "completed", "aborted", "failed", "interrupted")

#: Statuses a ``stop`` document may carry (every status but ``running``).
STOP_STATUSES: Final = RUN_STATUSES[1:]


#: The ``/steps`` fields that are not scan axes, in file order: ``index`` first, the axes, then
#: the rest. An axis may not take one of these names.
STEP_FIELDS_BEFORE_AXES: Final = (("index", "<u4"),)
STEP_FIELDS_AFTER_AXES: Final = (
    ("first_hit", "<u8"),
    ("n_hits", "<u8"),
    ("n_triggers", "<u8"),
    ("t_start", "<f8"),
    ("t_stop", "<f8"),
)
RESERVED_STEP_FIELDS: Final = frozenset(
    name for name, _ in STEP_FIELDS_BEFORE_AXES + STEP_FIELDS_AFTER_AXES
)

#: Rows per ``/hits`` chunk: 65536 x 34 B = 2.2 MB, larger than HDF5's default 1 MB chunk cache,
#: so appends go straight to disk, and large enough that reading a whole run is one I/O per chunk.
HITS_CHUNK_ROWS: Final = 65536

#: Rows per ``/steps`` chunk: a few kB, rewritten once per step.
STEPS_CHUNK_ROWS: Final = 256

#: Attributes every ``/instruments/<name>`` group has; the other attributes are settings.
INSTRUMENT_IDENTITY_ATTRS: Final = ("idn", "serial", "firmware", "resource")

#: Root attributes a valid file must have (``seed`` is optional).
REQUIRED_ROOT_ATTRS: Final = (
    "format",
    "format_version",
    "run_id",
    "recipe",
    "kind",
    "status",
    "started_utc",
    "finished_utc",
    "software_version",
    "stand",
    "simulated",
    "settings_sha256",
)

#: Datasets every file has (``/truth`` and ``/analysis`` are optional).
REQUIRED_DATASETS: Final = ("recipe", "stand", "channels", "steps", "hits")


def steps_dtype(axes: Sequence[str]) -> np.dtype:
    """Return the ``/steps`` compound for a scan over ``axes`` (one f8 field per axis, in order).

    Raises:
        ValueError: an axis repeats or takes the name of a fixed field.
    """
    axes = list(axes)
    clash = sorted(set(axes) & RESERVED_STEP_FIELDS)
    if clash:
        raise ValueError(f"scan axes may not be named {clash} (fields of /steps)")
    if len(set(axes)) != len(axes):
        raise ValueError(f"scan axes repeat: {axes}")
    if any(not isinstance(a, str) or not a for a in axes):
        raise ValueError(f"scan axes must be non-empty strings: {axes!r}")
    return np.dtype(
        [*STEP_FIELDS_BEFORE_AXES, *((a, "<f8") for a in axes), *STEP_FIELDS_AFTER_AXES]
    )


def axes_of(dtype: np.dtype) -> list[str]:
    """Return the scan axes of a ``/steps`` compound, in file order."""
    return [name for name in dtype.names or () if name not in RESERVED_STEP_FIELDS]


def hits_dtype_ok(dtype: np.dtype) -> bool:
    """Whether ``dtype`` (as read from a file) is the ``/hits`` compound."""
    names = HIT_DTYPE.names or ()
    return dtype.names == names and all(dtype[n] == HIT_DTYPE[n] for n in names)
