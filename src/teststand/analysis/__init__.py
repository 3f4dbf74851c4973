"""Calibration analyses: pure numpy/scipy; arrays in, structured arrays (a row per channel) out.

No instruments, no h5py, no Qt here. Each method lives in its own module; its public names are
re-exported below in one block per module (append a block for a new module).
"""

__all__: list[str] = []

from teststand.analysis.scurve import (  # noqa: E402
    SCURVE_DTYPE,
    ScurveCounts,
    fit_scurves,
    scurve_counts,
    scurve_moments,
)

__all__ += ["SCURVE_DTYPE", "ScurveCounts", "fit_scurves", "scurve_counts", "scurve_moments"]
