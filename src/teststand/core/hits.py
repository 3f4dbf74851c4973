"""The hit record: the one array type that moves from readout to disk to analysis."""

from __future__ import annotations

import numpy as np

#: One row per hit, exactly the ``/hits`` compound of run-file format version 1.
#: Packed little-endian so that the bytes on the readout link are the bytes on disk.
HIT_DTYPE = np.dtype(
    [
        ("event", "<u8"),  # trigger or laser pulse number, unique within a run
        ("channel", "<u2"),
        ("t1", "<f8"),  # ns, first threshold crossing relative to the laser/trigger reference
        ("t2", "<f8"),  # ns, second threshold crossing (TOFHIR2), NaN if absent
        ("q", "<f4"),  # QDC counts, NaN if absent
        ("tot", "<f4"),  # ns, time over threshold (HPTDC), NaN if absent
    ]
)


def empty_hits(n: int = 0) -> np.ndarray:
    """Return an array of ``n`` hits with every float field NaN and integers zero."""
    hits = np.zeros(n, dtype=HIT_DTYPE)
    for name in ("t1", "t2", "q", "tot"):
        hits[name] = np.nan
    return hits


#: One row per readout channel: the ``/channels`` compound of run-file format version 1 and the
#: channel map of a stand file.
CHANNEL_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("plane", "<i2"),
        ("bar", "<i2"),  # bar (TOFHIR) or pad (HPTDC)
        ("board", "<i2"),  # readout board position
        ("delay_ns", "<f4"),  # cable or fibre delay, ns
    ]
)
