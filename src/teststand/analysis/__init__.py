"""Calibration analyses: pure numpy/scipy; arrays in, structured arrays (a row per channel) out.

No instruments, no h5py, no Qt here. Each method lives in its own module; its public names are
re-exported here.
"""

from .differential import (
    PEAK_DTYPE,
    PEAK_FLAGS,
    PHASE_CORRECTION_DTYPE,
    correct_peak_time,
    differential_peak_time,
    fit_phase_correction,
    phase_correction_from_shape,
    sampling_phase,
)
from .offsets import BOARD_DTYPE, BOARD_FIT_DTYPE, OFFSET_DTYPE, OffsetResult, channel_offsets
from .online import StepAccumulator, json_value
from .resolution import (
    RESOLUTION_DTYPE,
    THREE_PLANE_DTYPE,
    Tracks,
    fit_resolution,
    resolve_planes,
    select_tracks,
    three_plane_resolution,
)
from .scurve import (
    SCURVE_DTYPE,
    ScurveAccumulator,
    ScurveCounts,
    fit_scurves,
    scurve_counts,
    scurve_moments,
)
from .timewalk import (
    MAX_POLY_ORDER,
    TIMEWALK_DTYPE,
    TIMEWALK_PROFILE_DTYPE,
    correct_timewalk,
    evaluate_timewalk,
    fit_timewalk,
    fit_timewalk_profile,
    timewalk_profile,
    timewalk_sigmoid,
)
from .walk import (
    AWC_DTYPE,
    AWC_LUT_SIZE,
    AWC_POINT_DTYPE,
    RESIDUAL_WALK_DTYPE,
    AwcFit,
    AwcTrim,
    correct_times,
    fit_awc,
    residual_walk,
)

__all__ = [
    "AWC_DTYPE",
    "AWC_LUT_SIZE",
    "AWC_POINT_DTYPE",
    "BOARD_DTYPE",
    "BOARD_FIT_DTYPE",
    "MAX_POLY_ORDER",
    "OFFSET_DTYPE",
    "PEAK_DTYPE",
    "PEAK_FLAGS",
    "PHASE_CORRECTION_DTYPE",
    "RESIDUAL_WALK_DTYPE",
    "RESOLUTION_DTYPE",
    "SCURVE_DTYPE",
    "THREE_PLANE_DTYPE",
    "TIMEWALK_DTYPE",
    "TIMEWALK_PROFILE_DTYPE",
    "AwcFit",
    "AwcTrim",
    "OffsetResult",
    "ScurveAccumulator",
    "ScurveCounts",
    "StepAccumulator",
    "Tracks",
    "channel_offsets",
    "correct_peak_time",
    "correct_times",
    "correct_timewalk",
    "differential_peak_time",
    "evaluate_timewalk",
    "fit_awc",
    "fit_phase_correction",
    "fit_resolution",
    "fit_scurves",
    "fit_timewalk",
    "fit_timewalk_profile",
    "json_value",
    "phase_correction_from_shape",
    "residual_walk",
    "resolve_planes",
    "sampling_phase",
    "scurve_counts",
    "scurve_moments",
    "select_tracks",
    "three_plane_resolution",
    "timewalk_profile",
    "timewalk_sigmoid",
]
