"""Amplitude walk correction with dual thresholds (AWC), design section 4.2.

In operation every TOFHIR2 hit has ``t1`` at the operating threshold thr1, ``t2`` at thr2 and a
charge ``Q``. Walk is linear in the inverse dual-threshold slope ``S = (thr2 - thr1) / (t2 - t1)``::

    t1 = t0 + AWC / S            so            t_corr = t1 - AWC / S(Q)

with ``S(Q)`` the mean slope at charge ``Q`` from a lookup table (the per-event slope is too noisy).

The calibration scan keeps thr1 at its operating value and, for each laser intensity k, steps thr2
over a range. The reduction has two halves.

**Sums** (:class:`AwcSums`, the only pass over the hits). Each step is folded, as a whole, into one
record per channel: counts of hits, of hits with a finite t1, with a t2, with a saturated charge;
sums of ``t1``, ``t1**2``, ``d = t2 - t1``, ``d**2`` over the hits with both crossings; and over
those of them with a charge inside the QDC range, ``Q .. Q**4`` and ``d``, ``d**2`` (only for the
steps that can be at the operating pair: :func:`is_charge_step`). Nothing per hit survives the
step. :class:`AwcAccumulator` feeds it from the document stream or a run file, :func:`fit_awc`
from hit arrays; both give the same records and so the same constants, and the records of
several workers add up.

**Fit** (:meth:`AwcSums.fit`, batched over channels, cost linear in the records):

1. Per channel, the operating pair: thr1 = the scan's fixed thr1 (or the one asked for) and thr2 =
   thr1 + 4 uA (or the one asked for), each snapped to a threshold the scan has within half an LSB.
2. Per (channel, intensity): the mean leading edge ``t(thr) = c0 + c1 thr + c2 thr**2``, fitted
   to the step means ``<t1>_k + <t2 - t1>_s`` against thr2 (only the steps within 1.5 uA of the
   operating pair). This is the mean t2 crossing time; taking it through ``t2 - t1`` of the same
   pulses removes the photostatistics and laser jitter the two crossings share, so the edge is
   several times more precise than from raw t2 means. From the edge, ``T_k = t(thr1_op)`` and the
   *secant* slope ``S_k = (thr2_op - thr1_op) / (t(thr2_op) - t(thr1_op))``: the same slope
   definition the correction uses. (The derivative ``1 / t'(thr1)`` is a different quantity when
   the gap is 4 uA; mixing the two leaves about 100 ps of walk.)
3. Per channel, from the hits at the operating pair: one point per intensity (the whole cluster of
   charges the laser made: mean charge and ratio-of-means slope ``gap / <t2 - t1>``), averaged with
   the edge secant ``S_k`` of that intensity; a power law (plus a quadratic term in log-log where
   significant) through them is the table the correction interpolates, stored on log-spaced nodes
   (:func:`_smooth_table` says why not charge bins); the line ``S = a + b Q`` through the same
   points serves the trim. Then the straight line ``T_k = t0 + AWC x_k``, twice: on the edge
   secants ``x_k = 1 / S_k`` and on the table, ``x_k = <1 / S(Q)>`` over the intensity's hits
   (from the cluster's charge moments), which is exactly what the correction subtracts there on
   average. ``awc_uA`` comes from the edge line unless the edge secants and the hits at the
   operating pair disagree beyond their errors (``slope_agreement_p``); then from the table line,
   so that the AWC is defined on the slope the correction uses (``awc_slope_source``).
4. Across channels: the trim, a line ``AWC = alpha + beta * predictor`` (the paper's eq. 5.1-5.2;
   the predictor is the log-log slope of S(Q) by default, see :func:`fit_awc`).

:func:`correct_times` and :class:`AwcCorrection` apply the constants to hits;
:func:`residual_walk` (hit arrays) and :class:`AwcValidationAccumulator` (the ``awc_validation``
method) measure what is left. ``docs/decisions/0003-awc-method.md``
records why the method is built this way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2 as chi2_dist

from teststand.analysis._grouping import (
    LinearFit,
    batched_gls,
    batched_polyfit,
    batched_polyval,
    grouped_interp,
    grouped_stats,
    quantile_bin_index,
    stats_from_sums,
)
from teststand.analysis.scurve import ScurveAccumulator
from teststand.errors import AnalysisError

from .online import StepAccumulator

__all__ = [
    "AWC_DTYPE",
    "AWC_LUT_SIZE",
    "AWC_POINT_DTYPE",
    "AWC_VALIDATION_DTYPE",
    "RESIDUAL_WALK_DTYPE",
    "AwcAccumulator",
    "AwcCorrection",
    "AwcFit",
    "AwcSums",
    "AwcTrim",
    "AwcValidationAccumulator",
    "correct_times",
    "fit_awc",
    "is_charge_step",
    "residual_walk",
]

#: Number of charge nodes stored per channel in the slope lookup table (NaN padded).
AWC_LUT_SIZE = 16

#: chi2 gain that makes the slope table's quadratic term significant (p = 1 % for 1 dof).
_CURVATURE_CHI2 = 6.63

#: Calibration constants, one row per channel. Units: uA, ns, uA/ns, QDC counts.
AWC_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("awc_uA", "<f8"),  # the AWC the correction uses (from the source below)
        ("awc_uA_err", "<f8"),
        ("t0_ns", "<f8"),  # walk-free time: intercept of T_k = t0 + AWC / S_k
        ("t0_ns_err", "<f8"),
        ("awc_slope_source", "<U4"),  # "edge": S_k of the fitted edges; "lut": S(Q_k) of the table
        ("awc_edge_uA", "<f8"),  # AWC on the edge slopes S_k
        ("awc_lut_uA", "<f8"),  # AWC on the table slopes S(Q_k)
        ("slope_agreement_p", "<f8"),  # chi2 p-value: edge S_k against the operating-pair hits
        ("line_chi2", "<f8"),  # of the AWC line actually used
        ("line_ndf", "<i4"),
        ("n_intensities", "<u2"),  # points on the AWC line
        ("awc_trimmed_uA", "<f8"),  # predicted from the slope-versus-charge relation (trim)
        ("slope_a", "<f8"),  # S = a + b Q: uA/ns
        ("slope_b", "<f8"),  # uA/ns per QDC count
        ("slope_loglog", "<f8"),  # d ln S / d ln Q of the table at the channel's mean charge
        # the table the correction interpolates linearly: nodes (QDC counts) and slope (uA/ns)
        ("slope_lut_q", "<f8", (AWC_LUT_SIZE,)),
        ("slope_lut_s", "<f8", (AWC_LUT_SIZE,)),
        ("slope_lut_s_err", "<f8", (AWC_LUT_SIZE,)),
        # the charges the table rests on: mean charge of the lowest and of the highest intensity
        # it was fitted to (the nodes reach 2 sigma of those clusters beyond); the useful range
        ("lut_fit_q_min", "<f8"),
        ("lut_fit_q_max", "<f8"),
        # the measured points behind it, one per laser intensity (the charge "bins" of the
        # design: each is the cluster of charges one intensity made at the operating pair):
        # mean charge, ratio-of-means slope gap / <t2 - t1>, its error, hits with t2
        ("slope_bin_q", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_s", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_s_err", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_n", "<u4", (AWC_LUT_SIZE,)),
        ("thr1_op_uA", "<f8"),  # operating threshold pair the constants belong to
        ("thr2_op_uA", "<f8"),
        ("n_hits", "<u8"),
        # the channel's baseline in DAC codes from the run's noise-scan steps (laser off), so the
        # runs that apply these constants can set the very same codes; NaN without such steps
        ("baseline_code", "<f8"),
        ("flag", "<U96"),  # "" when fine, else reasons joined by "|"
    ]
)

#: One row per (channel, laser intensity) of the scan: the points of the AWC line and their edges.
AWC_POINT_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("intensity", "<f8"),  # the step table's value
        ("q_mean", "<f8"),  # mean charge at the operating thresholds, QDC counts
        ("n_steps", "<u2"),  # thr2 steps in the edge fit
        ("n_hits", "<u8"),  # hits with t2 in all the intensity's steps
        ("edge_c", "<f8", (3,)),  # t(thr) = c0 + c1 thr + c2 thr**2, ns and uA
        ("edge_chi2", "<f8"),
        ("edge_ndf", "<i4"),
        ("t_thr1_ns", "<f8"),  # T_k = t(thr1_op)
        ("t_thr1_ns_err", "<f8"),
        ("t_thr2_ns", "<f8"),  # t(thr2_op)
        ("slope_edge", "<f8"),  # S_k, uA/ns
        ("slope_edge_err", "<f8"),
        ("slope_op", "<f8"),  # (thr2_op - thr1_op) / <t2 - t1> of the hits at the operating pair
        ("slope_op_err", "<f8"),
        ("slope_lut", "<f8"),  # 1 / <1 / S(Q)> of the table over the intensity's hits
        ("slope_lut_err", "<f8"),
        ("used", "?"),  # on the AWC line
        ("flag", "<U64"),
    ]
)

#: Flatness of corrected times versus charge (:func:`residual_walk`), one row per channel.
RESIDUAL_WALK_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("spread_ns", "<f8"),  # max - min of the mean corrected time over the charge bins
        ("spread_err_ns", "<f8"),  # error of that difference from the two bins' errors
        ("chi2_flat", "<f8"),  # of the bin means against their weighted mean
        ("ndf", "<i4"),
        ("q_bin", "<f8", (AWC_LUT_SIZE,)),  # mean charge per bin
        ("t_bin_ns", "<f8", (AWC_LUT_SIZE,)),  # mean corrected time per bin
        ("t_bin_ns_err", "<f8", (AWC_LUT_SIZE,)),
        ("n_bin", "<u8", (AWC_LUT_SIZE,)),
        ("flag", "<U32"),
    ]
)

#: Result of the ``awc_validation`` method (:class:`AwcValidationAccumulator`), one row per
#: channel. The charge bins are fixed per channel before the data, from the constants' table.
AWC_VALIDATION_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("residual_walk_ns", "<f8"),  # max - min of the mean corrected time over the good bins
        ("residual_walk_err_ns", "<f8"),  # from the errors of the two bins that make it
        ("walk_ns", "<f8"),  # the same for the uncorrected t1, over the same bins
        ("walk_err_ns", "<f8"),
        # the uncorrected walk across the whole run: max - min over its laser steps of the
        # channel's mean t1 (steps with at least min_hits_per_bin hits)
        ("walk_range_ns", "<f8"),
        ("chi2_flat", "<f8"),  # of the corrected bin means about their weighted mean
        ("ndf", "<i4"),
        ("n_bins_used", "<u2"),  # bins with at least min_hits_per_bin hits
        ("q_lo", "<f8"),  # the judged charge range, QDC counts
        ("q_hi", "<f8"),
        ("q_bin", "<f8", (AWC_LUT_SIZE,)),  # mean charge per bin
        ("t_corr_bin_ns", "<f8", (AWC_LUT_SIZE,)),  # mean corrected time per bin
        ("t_corr_bin_ns_err", "<f8", (AWC_LUT_SIZE,)),
        ("t1_bin_ns", "<f8", (AWC_LUT_SIZE,)),  # mean uncorrected t1 per bin
        ("n_bin", "<u8", (AWC_LUT_SIZE,)),
        ("n_hits", "<u8"),  # all hits of the channel in the laser steps
        ("n_in_range", "<u8"),  # of them in the judged charge range, at matching thresholds
        ("n_saturated", "<u8"),  # with the charge at or above the QDC saturation
        ("n_bad", "<u8"),  # with a NaN time or charge
        ("n_other_thresholds", "<u8"),  # in steps whose thresholds differ from the constants'
        ("flag", "<U96"),
    ]
)

# Channel flags of the calibration. Those marked "no value" leave the affected numbers NaN.
NO_HITS = "no_hits"  # no value: no hit with both crossings
NO_OPERATING_STEP = "no_operating_step"  # no value: no step at (thr1_op, thr2_op)
NO_SLOPE_TABLE = "no_slope_table"  # no value: the slope table has fewer than 2 nodes
TOO_FEW_HITS = "too_few_hits"  # no value: no step has min_hits_per_step hits with t2
TOO_FEW_INTENSITIES = "too_few_intensities"  # no value: fewer usable intensities than needed
SLOPES_DISAGREE = "slopes_disagree"  # warning: S_k and S(Q_k) differ; AWC from the table
NO_TRIM = "no_trim"  # awc_trimmed NaN: channel not in the trim fit or trim impossible
NAN_TIMES = "nan_times"  # warning: hits with a NaN t1 were left out
SATURATED = "saturated_charge"  # warning: an intensity with saturated charges left the table

# Point flags.
FEW_STEPS = "few_steps"  # fewer than 4 usable thr2 steps for the quadratic
NOT_COVERED = "not_covered"  # the usable thr2 steps do not span thr1_op..thr2_op
NO_SLOPE = "no_slope"  # the edge gives no positive slope between the operating thresholds

# Validation flags.
NO_CONSTANTS = "no_constants"  # no value: no usable constants for the channel
THRESHOLDS_DIFFER = "thresholds_differ"  # steps at another threshold pair were left out
TOO_FEW_BINNED = "too_few_hits"  # no value: fewer than two charge bins with enough hits


class AwcTrim(NamedTuple):
    """The across-channel trim ``AWC = intercept + slope * predictor``.

    ``predictor`` names the per-channel quantity (``slope_loglog``: ``d ln S / d ln Q`` of the
    table, which does not depend on gain and QDC scale; ``slope_b``: ``b`` of ``S = a + b Q``, as
    in the paper). Spreads are standard deviations across the channels in the fit: of the AWC
    (the error of one common AWC for every channel), and of its residuals about the trim line.
    """

    predictor: str
    intercept: float
    slope: float
    awc_spread_before_uA: float
    awc_spread_after_uA: float
    n_channels: int


@dataclass(frozen=True)
class AwcFit:
    """What :func:`fit_awc` and :meth:`AwcSums.fit` return.

    Attributes:
        constants: :data:`AWC_DTYPE`, one row per channel: what the correction and the run file
            need.
        points: :data:`AWC_POINT_DTYPE`, one row per (channel, intensity): the mean edges and the
            points of the AWC line, for plots and checks.
        trim: the across-channel trim.
        parameters: the method parameters as used (for the run file's attributes).
    """

    constants: NDArray[Any]
    points: NDArray[Any]
    trim: AwcTrim
    parameters: dict[str, float | int | str]

    def attrs(self) -> dict[str, float | int | str]:
        """Scalars for the ``/analysis/awc`` attributes: parameters and the trim."""
        out = {f"param_{k}": v for k, v in self.parameters.items()}
        out.update({f"trim_{k}": v for k, v in self.trim._asdict().items()})
        return out


# ------------------------------------------------------------------------------------------------
# the sums


#: Columns of a (channel, step) record, in the order of :meth:`AwcSums.records`. Counts are
#: stored as floats (exact below 2**53). ``d = t2 - t1``; "both" = hits with finite t1 and t2;
#: "in range" = of those, the hits with ``0 < Q < qdc_max``.
RECORD_FIELDS = (
    "row",  # channel row (position in the channel table)
    "intensity",  # the step's laser intensity
    "thr1",  # the channel's thresholds in this step, uA above baseline
    "thr2",
    "n_all",  # every hit
    # summed in every step
    "n_t1",  # hits with a finite t1
    "n_t2",  # hits with both crossings ("both")
    "s_t1",  # sum of t1 over "both"
    "s_d",  # sum of d over "both"
    "s_t1t1",
    "s_dd",
    # summed only in the steps that can be at the operating pair, else NaN
    "n_sat",  # hits with Q >= qdc_max
    "n_k",  # "in range" hits
    "s_q",  # sum of Q over "in range"
    "s_dk",  # sum of d over "in range"
    "s_q2",
    "s_ddk",
    "s_q3",
    "s_q4",
)
_F = {name: i for i, name in enumerate(RECORD_FIELDS)}
_FIRST_SUM = _F["n_t1"]  # the weight stacks of AwcSums.add_step follow this order from here
_N_TIME_SUMS = _F["n_sat"] - _FIRST_SUM
_N_SUMMED = len(RECORD_FIELDS) - _FIRST_SUM
_SUM_OFFSETS = np.arange(_N_SUMMED)[:, None]
_ONE_HOT_MAX = 16


def _time_weights(t1_a: NDArray[np.float64], t2: ArrayLike, n: int) -> NDArray[np.float64]:
    """The weights of the time sums, ``(6, n)`` in RECORD_FIELDS order (n_t1 .. s_dd)."""
    weights = np.empty((_N_TIME_SUMS, n))
    np.subtract(t2, t1_a, out=weights[3])
    both = np.isfinite(weights[3])
    weights[0] = np.isfinite(t1_a)
    weights[1] = both
    np.copyto(weights[2], t1_a)
    if not both.all():
        weights[2:4, ~both] = 0.0
    np.multiply(weights[2:4], weights[2:4], out=weights[4:6])
    return weights


class AwcSums:
    """Running sums of a dual-threshold scan, one record per (channel, step) with hits.

    Args:
        n_channels: channel rows (hits carry rows ``0 .. n_channels - 1``).
        qdc_max: charges at or above this are saturated and stay out of the charge sums.

    :meth:`add_step` folds one whole step; :meth:`fit` turns the records into constants at any
    time. Memory grows with the number of (channel, step) pairs, not with the hits.
    """

    def __init__(self, n_channels: int, *, qdc_max: float = 1023.0) -> None:
        self.n_channels = int(n_channels)
        self.qdc_max = float(qdc_max)
        self.n_steps = 0
        self._blocks: list[NDArray[np.float64]] = []
        self._cache: NDArray[np.float64] | None = None

    def add_step(
        self,
        intensity: float,
        thr1_uA: float | ArrayLike,
        thr2_uA: float | ArrayLike,
        row: ArrayLike,
        t1: ArrayLike,
        t2: ArrayLike,
        q: ArrayLike,
        *,
        rows_wanted: NDArray[np.bool_] | None = None,
        charge_sums: bool = True,
    ) -> None:
        """Fold the hits of one step.

        Args:
            intensity: the step's laser intensity.
            thr1_uA, thr2_uA: the step's thresholds, a scalar or one value per channel row.
            row, t1, t2, q: the hit columns, ``row`` being the channel row of every hit (-1 for
                a channel outside the table: left out).
            rows_wanted: when given, only the records of the rows where it is True are kept
                (e.g. the channels of the bar the laser lit).
            charge_sums: False leaves the charge fields (``n_sat``, ``n_k`` .. ``s_ddk``) NaN:
                they are only used at the operating threshold pair, and the other steps of a
                scan are reduced twice as fast without them (:func:`is_charge_step`).
        """
        self.n_steps += 1
        rows = np.asarray(row, dtype=np.intp)
        n = rows.size
        if n == 0:
            return
        lo, hi = int(rows.min()), int(rows.max())
        if hi >= self.n_channels:
            raise ValueError(f"channel rows must lie in 0..{self.n_channels - 1}")
        if lo < 0:  # hits of channels outside the table: left out
            keep = rows >= 0
            if not keep.any():
                return
            rows, t1, t2, q = (
                rows[keep],
                np.asarray(t1)[keep],
                np.asarray(t2)[keep],
                np.asarray(q)[keep],
            )
            n = rows.size
            lo = int(rows.min())
        # the channels of this step, at a cost that follows the step, not the channel count
        idx_of: NDArray[np.intp] | None = None
        if hi < 4 * n + 64:
            dense = np.bincount(rows)
            present = np.flatnonzero(dense)
            counts = dense[present]
        elif hi - lo < 4 * n + 64:
            dense = np.bincount(rows - lo)
            present = np.flatnonzero(dense)
            counts = dense[present]
            present += lo
        else:
            present, idx_of, counts = np.unique(rows, return_inverse=True, return_counts=True)
        m = present.size
        t1_a = np.asarray(t1, dtype=np.float64)
        # The weights of every summed field stacked as (F, n) in record order, written in place: a
        # step costs a few dozen numpy calls whatever its size, and that is what bounds the rate
        # for steps of a thousand hits.
        with np.errstate(invalid="ignore", over="ignore"):  # a corrupt value: NaN, not a warning
            weights = self._weights(t1_a, t2, q, n) if charge_sums else _time_weights(t1_a, t2, n)
        # The grouped sum in one call: a product with the one-hot matrix when few channels
        # fired (a calibration step lights one bar: two channels), else one bincount.
        sums = None
        if m <= _ONE_HOT_MAX:
            with np.errstate(invalid="ignore", over="ignore"):
                sums = weights @ (rows == present[:, None]).astype(np.float64).T
            if not np.isfinite(sums).all():
                sums = None  # an absurd value (inf * 0): keep it to its own channel
        if sums is None:
            if idx_of is not None:
                idx = idx_of.reshape(-1)
            elif m == hi - lo + 1:
                idx = rows - lo
            else:
                lookup = np.zeros(hi - lo + 1, dtype=np.intp)
                lookup[present - lo] = np.arange(m)
                idx = lookup[rows - lo]
            n_w = weights.shape[0]
            key = idx + _SUM_OFFSETS[:n_w] * m
            with np.errstate(invalid="ignore", over="ignore"):
                sums = np.bincount(key.ravel(), weights=weights.ravel(), minlength=n_w * m)
            sums = sums.reshape(n_w, m)

        rec = np.empty((len(RECORD_FIELDS), m))
        rec[_F["row"]] = present
        rec[_F["intensity"]] = intensity
        rec[_F["thr1"]] = _at_rows(thr1_uA, present, self.n_channels)
        rec[_F["thr2"]] = _at_rows(thr2_uA, present, self.n_channels)
        rec[_F["n_all"]] = counts
        rec[_FIRST_SUM : _FIRST_SUM + sums.shape[0]] = sums
        rec[_FIRST_SUM + sums.shape[0] :] = np.nan
        if rows_wanted is not None:
            wanted = rows_wanted[present]
            if not wanted.all():
                rec = rec[:, wanted]
        self._blocks.append(rec)
        self._cache = None

    def _weights(
        self, t1_a: NDArray[np.float64], t2: ArrayLike, q: ArrayLike, n: int
    ) -> NDArray[np.float64]:
        """The weights of all the sums, ``(14, n)`` in RECORD_FIELDS order (n_t1 .. s_q4)."""
        weights = np.empty((_N_SUMMED, n))
        weights[:_N_TIME_SUMS] = _time_weights(t1_a, t2, n)
        both = weights[1] > 0
        q_a = weights[8]
        np.copyto(q_a, q)
        weights[6] = q_a >= self.qdc_max
        in_range = both & (q_a > 0) & (q_a < self.qdc_max)
        weights[7] = in_range
        weights[9] = weights[3]
        if not in_range.all():
            weights[8:10, ~in_range] = 0.0
        np.multiply(weights[8:10], weights[8:10], out=weights[10:12])
        np.multiply(weights[10], weights[8], out=weights[12])
        np.multiply(weights[10], weights[10], out=weights[13])
        return weights

    def add_records(self, records: ArrayLike) -> None:
        """Append records made elsewhere (``(len(RECORD_FIELDS), m)``), e.g. by another worker."""
        rec = np.asarray(records, dtype=np.float64)
        if rec.ndim != 2 or rec.shape[0] != len(RECORD_FIELDS):
            raise ValueError(f"records must have shape ({len(RECORD_FIELDS)}, m), not {rec.shape}")
        self._blocks.append(rec.copy())
        self._cache = None

    def records(self) -> NDArray[np.float64]:
        """Every record so far, ``(len(RECORD_FIELDS), n_records)``, in the order they came."""
        if self._cache is None:
            self._cache = (
                np.concatenate(self._blocks, axis=1)
                if self._blocks
                else np.zeros((len(RECORD_FIELDS), 0))
            )
            self._blocks = [self._cache]
        return self._cache

    def fit(
        self,
        *,
        channels: ArrayLike | None = None,
        thr1_op_uA: ArrayLike | None = None,
        thr2_op_uA: ArrayLike | None = None,
        thr_gap_uA: float = 4.0,
        lsb_uA: float,
        n_lut_bins: int = AWC_LUT_SIZE,
        min_hits_per_step: int = 50,
        min_hits_per_bin: int = 20,
        min_t2_efficiency: float = 0.99,
        min_intensities: int = 3,
        edge_window_uA: float | None = 1.5,
        agree_p_value: float = 0.01,
        trim_predictor: Literal["slope_loglog", "slope_b", "elasticity"] = "slope_loglog",
        slope_table: Literal["auto", "power_law", "log_quadratic"] = "auto",
        awc_source: Literal["auto", "edge", "lut"] = "auto",
        table_uses_edges: bool = True,
    ) -> AwcFit:
        """The constants from the sums so far; see :func:`fit_awc` for the options.

        ``channels`` gives the channel number of every row (default: the row itself).
        """
        if not 2 <= n_lut_bins <= AWC_LUT_SIZE:
            raise ValueError(f"n_lut_bins must be 2..{AWC_LUT_SIZE}, got {n_lut_bins}")
        if trim_predictor not in ("slope_loglog", "slope_b", "elasticity"):
            raise ValueError(f"unknown trim_predictor {trim_predictor!r}")
        if slope_table not in ("auto", "power_law", "log_quadratic"):
            raise ValueError(f"unknown slope_table {slope_table!r}")
        if awc_source not in ("auto", "edge", "lut"):
            raise ValueError(f"unknown awc_source {awc_source!r}")
        numbers = (
            np.arange(self.n_channels)
            if channels is None
            else np.asarray(channels).astype(np.int64).reshape(-1)
        )
        if numbers.size != self.n_channels:
            raise ValueError(f"channels has {numbers.size} numbers for {self.n_channels} rows")
        return _fit_records(
            self.records(),
            numbers,
            self.qdc_max,
            _Options(
                thr1_op=_per_channel(thr1_op_uA, self.n_channels),
                thr2_op=_per_channel(thr2_op_uA, self.n_channels),
                thr_gap=float(thr_gap_uA),
                lsb=float(lsb_uA),
                n_lut_bins=int(n_lut_bins),
                min_hits_per_step=int(min_hits_per_step),
                min_hits_per_bin=int(min_hits_per_bin),
                min_eff=float(min_t2_efficiency),
                min_intensities=int(min_intensities),
                edge_window=None if edge_window_uA is None else float(edge_window_uA),
                agree_p=float(agree_p_value),
                trim_predictor=trim_predictor,
                slope_table=slope_table,
                awc_source=awc_source,
                table_uses_edges=bool(table_uses_edges),
            ),
        )


def _at_rows(value: float | ArrayLike, rows: NDArray[np.intp], n_channels: int) -> Any:
    """A scalar as it is, or the entries ``rows`` of a per-channel array."""
    if isinstance(value, float):
        return value
    if np.ndim(value) == 0:
        return float(value)  # type: ignore[arg-type]
    a = np.asarray(value, dtype=np.float64)
    if a.shape != (n_channels,):
        raise ValueError(f"per-channel thresholds need {n_channels} values, got {a.shape}")
    return a[rows]


def _per_channel_steps(values: ArrayLike, n_steps: int, n_channels: int, name: str) -> NDArray[Any]:
    """A step-table column as ``(n_channels, n_steps)``: a value per step or per (step, channel)."""
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        if a.size != n_steps:
            raise ValueError(f"{name} has {a.size} values for {n_steps} steps")
        return np.broadcast_to(a, (n_channels, n_steps))
    if a.shape == (n_steps, n_channels):
        return a.T
    raise ValueError(
        f"{name} must have shape ({n_steps},) or ({n_steps}, {n_channels}), not {a.shape}"
    )


def _per_channel(value: ArrayLike | None, n_channels: int) -> NDArray[np.float64] | None:
    if value is None:
        return None
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n_channels,)).copy()


def is_charge_step(
    thr1_uA: float | ArrayLike,
    thr2_uA: float | ArrayLike,
    *,
    thr1_op_uA: float | ArrayLike | None = None,
    thr2_op_uA: float | ArrayLike | None = None,
    thr_gap_uA: float = 4.0,
    lsb_uA: float,
) -> bool:
    """Whether a step may be at the operating threshold pair, so that its charge sums count.

    The fit snaps the operating thresholds to the scan's within half an LSB, so a step at the
    operating pair lies within 1.5 LSB of the requested pair (``thr1_op``, ``thr2_op``, or
    ``thr1 + thr_gap``); every such step keeps its charge sums (a few per intensity).
    """
    near = 1.5 * lsb_uA * (1 + 1e-6)
    if (
        isinstance(thr1_uA, float)
        and isinstance(thr2_uA, float)
        and isinstance(thr1_op_uA, (float, type(None)))
        and isinstance(thr2_op_uA, (float, type(None)))
    ):  # the scalar case of every run-file step, without numpy's per-call cost
        if thr2_op_uA is not None:
            want = thr2_op_uA
        else:
            want = (thr1_uA if thr1_op_uA is None else thr1_op_uA) + thr_gap_uA
        near1 = thr1_op_uA is None or abs(thr1_uA - thr1_op_uA) <= near
        return bool(near1 and abs(thr2_uA - want) <= near)
    t1 = np.asarray(thr1_uA, dtype=np.float64)
    t2 = np.asarray(thr2_uA, dtype=np.float64)
    if thr2_op_uA is not None:
        want2 = np.asarray(thr2_op_uA, dtype=np.float64)
    elif thr1_op_uA is not None:
        want2 = np.asarray(thr1_op_uA, dtype=np.float64) + thr_gap_uA
    else:
        want2 = t1 + thr_gap_uA
    ok = np.abs(t2 - want2) <= near
    if thr1_op_uA is not None:
        ok &= np.abs(t1 - np.asarray(thr1_op_uA, dtype=np.float64)) <= near
    return bool(np.any(ok))


def fit_awc(
    channel: ArrayLike,
    t1: ArrayLike,
    t2: ArrayLike,
    q: ArrayLike,
    step: ArrayLike,
    intensity: ArrayLike,
    thr1_uA: ArrayLike,
    thr2_uA: ArrayLike,
    *,
    n_channels: int | None = None,
    thr1_op_uA: ArrayLike | None = None,
    thr2_op_uA: ArrayLike | None = None,
    thr_gap_uA: float = 4.0,
    lsb_uA: float,
    step_bar: ArrayLike | None = None,
    channel_bar: ArrayLike | None = None,
    n_lut_bins: int = AWC_LUT_SIZE,
    min_hits_per_step: int = 50,
    min_hits_per_bin: int = 20,
    min_t2_efficiency: float = 0.99,
    min_intensities: int = 3,
    edge_window_uA: float | None = 1.5,
    agree_p_value: float = 0.01,
    qdc_max: float = 1023.0,
    trim_predictor: Literal["slope_loglog", "slope_b", "elasticity"] = "slope_loglog",
    slope_table: Literal["auto", "power_law", "log_quadratic"] = "auto",
    awc_source: Literal["auto", "edge", "lut"] = "auto",
    table_uses_edges: bool = True,
) -> AwcFit:
    """Calibrate the dual-threshold amplitude walk correction from a thr2 scan.

    The hits are folded step by step into :class:`AwcSums` (exactly as :class:`AwcAccumulator`
    folds a run) and the constants fitted from the sums.

    Hit columns (one entry per hit; run-file ``/hits`` columns plus the step of each hit):

    Args:
        channel: channel number (``0 .. n_channels - 1``).
        t1, t2: threshold crossing times, ns (t2 NaN when the pulse did not reach thr2).
        q: charge, QDC counts.
        step: row of the step table the hit belongs to.
        intensity: laser intensity of every step (any unit; equal values are one intensity;
            steps with a NaN intensity are ignored).
        thr1_uA, thr2_uA: thresholds of every step in uA above baseline, ``(n_steps,)``, or
            ``(n_steps, n_channels)`` for the thresholds each channel really had (DAC codes round
            differently on every channel).

    Keyword Args:
        n_channels: rows of the result (default: highest channel number + 1).
        thr1_op_uA: operating thr1, scalar or per channel (default: the scan's fixed thr1).
        thr2_op_uA: operating thr2 (default ``thr1_op_uA + thr_gap_uA``). Both are snapped to the
            realised thresholds of the scan steps within half an LSB, which the constants record.
        lsb_uA: threshold DAC step, for the half-LSB tolerance.
        step_bar, channel_bar: lit bar of every step and bar of every channel; when both are given,
            a channel's steps with another bar lit are ignored.
        n_lut_bins: nodes of the slope table (2 .. :data:`AWC_LUT_SIZE`).
        min_hits_per_step: a (channel, step) with fewer hits with t2 is left out of the edge fit.
        min_hits_per_bin: an intensity with fewer hits at the operating pair gives no table point.
        min_t2_efficiency: steps and intensities where fewer of the hits have a t2 (or a charge
            inside the QDC range) are left out: the pulses that miss thr2 are the small ones, so
            the survivors' mean time is biased.
        min_intensities: points needed on a channel's AWC line.
        edge_window_uA: when set, the edge fit only uses thr2 steps within this distance of the
            operating interval (the quadratic then only has to describe the edge there).
        agree_p_value: below this chi2 probability the edge slopes ``S_k`` and the ratio of means
            of the hits at the operating pair disagree (flag ``slopes_disagree``; with
            ``awc_source="auto"`` the AWC is then taken from the table line).
        qdc_max: charges at or above this (QDC saturation) stay out of the slope table.
        trim_predictor: the per-channel quantity the trim regresses the AWC on:
            ``"slope_loglog"`` (default): ``d ln S / d ln Q`` of the table at the channel's mean
            charge, the rate at which the slope develops with charge, free of gain and QDC scale;
            ``"slope_b"``: ``b`` of ``S = a + b Q`` (the paper's MSlQ, in uA/ns per count: it
            mixes in each channel's gain and QDC scale); ``"elasticity"``: ``b <Q> / S(<Q>)``
            of the line.
        slope_table: the curve through the intensities' points that the stored table follows:
            ``"power_law"`` (a line in ``ln S`` versus ``ln Q``), ``"log_quadratic"`` (with a
            quadratic term, for edges that do not scale) or ``"auto"`` (default: the quadratic
            term only where it is significant).
        awc_source: which line gives ``awc_uA`` and ``t0_ns``. ``"auto"`` (default, the design's
            rule): the edge line, unless the two slope measurements disagree, then the table line.
            ``"edge"``: ``T_k`` against the edge secants ``1 / S_k`` (the paper's fit). ``"lut"``:
            against the table's own mean inverse slope at each intensity (what the correction
            subtracts there). Both AWCs are stored (``awc_edge_uA``, ``awc_lut_uA``).
        table_uses_edges: the table's intensity points average the hits at the operating pair
            with the edge secant ``S_k`` of the same intensity (two measurements of the same
            slope; the edge uses all thr2 steps near the pair, so the table gets more precise).

    Returns:
        An :class:`AwcFit`. A channel that cannot be calibrated has NaN and a ``flag``; nothing
        raises for bad data. Inconsistent inputs (lengths, step indices) raise ``ValueError``.
    """
    ch = np.asarray(channel).astype(np.intp, copy=False)
    st = np.asarray(step).astype(np.intp, copy=False)
    t1_a = np.asarray(t1, dtype=np.float64)
    t2_a = np.asarray(t2, dtype=np.float64)
    q_a = np.asarray(q)
    n_hits = ch.size
    if not (st.size == t1_a.size == t2_a.size == q_a.size == n_hits):
        raise ValueError("channel, t1, t2, q and step must have one entry per hit")
    intens = np.asarray(intensity, dtype=np.float64)
    n_steps = intens.size
    n_ch = int(n_channels) if n_channels is not None else (int(ch.max()) + 1 if n_hits else 0)
    if n_hits and (int(st.min()) < 0 or int(st.max()) >= n_steps):
        raise ValueError(f"step indices must lie in 0..{n_steps - 1}")
    if n_hits and (int(ch.min()) < 0 or int(ch.max()) >= n_ch):
        raise ValueError(f"channel numbers must lie in 0..{n_ch - 1}")
    thr1 = _per_channel_steps(thr1_uA, n_steps, n_ch, "thr1_uA")
    thr2 = _per_channel_steps(thr2_uA, n_steps, n_ch, "thr2_uA")
    step_bar_a = channel_bar_a = None
    if step_bar is not None and channel_bar is not None:
        step_bar_a = np.asarray(step_bar, dtype=np.float64)
        channel_bar_a = np.broadcast_to(np.asarray(channel_bar, dtype=np.float64), (n_ch,))

    sums = AwcSums(n_ch, qdc_max=qdc_max)
    order = np.argsort(st, kind="stable")
    bounds = np.searchsorted(st[order], np.arange(n_steps + 1))
    for s in range(n_steps):
        if not np.isfinite(intens[s]):
            continue
        sel = order[bounds[s] : bounds[s + 1]]
        wanted = None
        if step_bar_a is not None and channel_bar_a is not None:
            wanted = channel_bar_a == step_bar_a[s]
        charge = is_charge_step(
            thr1[:, s],
            thr2[:, s],
            thr1_op_uA=thr1_op_uA,
            thr2_op_uA=thr2_op_uA,
            thr_gap_uA=thr_gap_uA,
            lsb_uA=lsb_uA,
        )
        sums.add_step(
            intens[s],
            thr1[:, s],
            thr2[:, s],
            ch[sel],
            t1_a[sel],
            t2_a[sel],
            q_a[sel],
            rows_wanted=wanted,
            charge_sums=charge,
        )
    return sums.fit(
        thr1_op_uA=thr1_op_uA,
        thr2_op_uA=thr2_op_uA,
        thr_gap_uA=thr_gap_uA,
        lsb_uA=lsb_uA,
        n_lut_bins=n_lut_bins,
        min_hits_per_step=min_hits_per_step,
        min_hits_per_bin=min_hits_per_bin,
        min_t2_efficiency=min_t2_efficiency,
        min_intensities=min_intensities,
        edge_window_uA=edge_window_uA,
        agree_p_value=agree_p_value,
        trim_predictor=trim_predictor,
        slope_table=slope_table,
        awc_source=awc_source,
        table_uses_edges=table_uses_edges,
    )


# ------------------------------------------------------------------------------------------------
# the fit from the records


@dataclass(frozen=True)
class _Options:
    thr1_op: NDArray[np.float64] | None
    thr2_op: NDArray[np.float64] | None
    thr_gap: float
    lsb: float
    n_lut_bins: int
    min_hits_per_step: int
    min_hits_per_bin: int
    min_eff: float
    min_intensities: int
    edge_window: float | None
    agree_p: float
    trim_predictor: str
    slope_table: str
    awc_source: str
    table_uses_edges: bool

    def parameters(self, qdc_max: float) -> dict[str, float | int | str]:
        return {
            "thr_gap_uA": self.thr_gap,
            "lsb_uA": self.lsb,
            "n_lut_bins": self.n_lut_bins,
            "min_hits_per_step": self.min_hits_per_step,
            "min_hits_per_bin": self.min_hits_per_bin,
            "min_t2_efficiency": self.min_eff,
            "min_intensities": self.min_intensities,
            "edge_window_uA": float("nan") if self.edge_window is None else self.edge_window,
            "agree_p_value": self.agree_p,
            "qdc_max": qdc_max,
            "trim_predictor": self.trim_predictor,
            "slope_table": self.slope_table,
            "awc_source": self.awc_source,
            "table_uses_edges": int(self.table_uses_edges),
        }


def _group_first(
    group: NDArray[np.intp], key: NDArray[np.float64]
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Per group present, the entry with the smallest ``key``: (groups, entry indices)."""
    order = np.lexsort((key, group))
    g = group[order]
    first = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if g.size else np.zeros(0, np.intp)
    return g[first], order[first]


def _group_lower_median(
    group: NDArray[np.intp], values: NDArray[np.float64], n_groups: int
) -> NDArray[np.float64]:
    """Lower median of the finite ``values`` of every group (NaN for a group without any)."""
    keep = np.isfinite(values)
    g, v = group[keep], values[keep]
    order = np.lexsort((v, g))
    counts = np.bincount(g, minlength=n_groups)[:n_groups]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    out = np.full(n_groups, np.nan)
    has = counts > 0
    out[has] = v[order][(starts + (counts - 1) // 2)[has]]
    return out


def _snap(
    row: NDArray[np.intp],
    values: NDArray[np.float64],
    mask: NDArray[np.bool_],
    wanted: NDArray[np.float64],
    tol: float,
) -> NDArray[np.float64]:
    """Per channel, the record value nearest to ``wanted`` if within ``tol``, else ``wanted``."""
    out = wanted.copy()
    use = mask & np.isfinite(values)
    if not use.any():
        return out
    rows_u = row[use]
    dist = np.abs(values[use] - wanted[rows_u])
    g, first = _group_first(rows_u, np.where(np.isfinite(dist), dist, np.inf))
    close = dist[first] <= tol
    out[g[close]] = values[use][first[close]]
    return out


def _fit_records(
    rec: NDArray[np.float64], numbers: NDArray[np.int64], qdc_max: float, opt: _Options
) -> AwcFit:
    """Stages 1-4 of the module docstring on the (channel, step) records."""
    n_ch = numbers.size
    keep = np.isfinite(rec[_F["intensity"]])
    rec = rec[:, keep]
    row = rec[_F["row"]].astype(np.intp)
    thr1 = rec[_F["thr1"]]
    thr2 = rec[_F["thr2"]]
    n_all, n_t1, n_sat, n_t2 = (rec[_F[k]] for k in ("n_all", "n_t1", "n_sat", "n_t2"))
    tol = 0.5 * opt.lsb * (1 + 1e-6)

    def per_channel(values: NDArray[Any], where: NDArray[np.bool_] | None = None) -> NDArray[Any]:
        w = values if where is None else np.where(where, values, 0.0)
        return np.bincount(row, weights=w, minlength=n_ch)[:n_ch]

    flags: list[list[str]] = [[] for _ in range(n_ch)]

    def flag(mask: NDArray[np.bool_], name: str) -> None:
        for i in np.flatnonzero(mask):
            flags[i].append(name)

    # ---- stage 1: operating thresholds, realised per channel -----------------------------------
    thr1_scan = _group_lower_median(row, thr1, n_ch)
    at_thr1 = np.abs(thr1 - thr1_scan[row]) <= tol
    everything = np.ones(row.size, dtype=bool)
    thr1_op = thr1_scan if opt.thr1_op is None else _snap(row, thr1, everything, opt.thr1_op, tol)
    thr2_req = thr1_op + opt.thr_gap if opt.thr2_op is None else opt.thr2_op
    thr2_op = _snap(row, thr2, at_thr1, thr2_req, tol)
    op = at_thr1 & (np.abs(thr1 - thr1_op[row]) <= tol) & (np.abs(thr2 - thr2_op[row]) <= tol)
    gap = thr2_op - thr1_op

    n_t2_ch = per_channel(n_t2)
    n_hits_ch = per_channel(n_all)
    has_op = per_channel(op.astype(np.float64)) > 0
    flag(n_t2_ch == 0, NO_HITS)
    flag((n_t2_ch > 0) & ~has_op, NO_OPERATING_STEP)
    flag(per_channel(n_all - n_t1) > 0, NAN_TIMES)

    # ---- intensities --------------------------------------------------------------------------
    levels, k_r = np.unique(rec[_F["intensity"]], return_inverse=True)
    n_k = levels.size
    n_pts = n_ch * n_k
    ck = row * n_k + k_r.reshape(-1)

    # ---- stage 2: mean edges per (channel, intensity) -----------------------------------------
    step_stats = stats_from_sums(n_t2, rec[_F["s_d"]], rec[_F["s_dd"]])
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = n_t2 / n_t1
    enough_hits = n_t2 >= max(opt.min_hits_per_step, 2)
    flag((n_t2_ch > 0) & (per_channel(enough_hits.astype(np.float64)) == 0), TOO_FEW_HITS)
    usable = (
        at_thr1
        & enough_hits
        & (eff >= opt.min_eff)
        & np.isfinite(thr2)
        & np.isfinite(step_stats.var)
    )
    if opt.edge_window is not None:
        lo = np.minimum(thr1_op, thr2_op)[row] - opt.edge_window
        hi = np.maximum(thr1_op, thr2_op)[row] + opt.edge_window
        usable &= (thr2 >= lo) & (thr2 <= hi)

    def per_point(values: NDArray[Any], where: NDArray[np.bool_]) -> NDArray[np.float64]:
        return np.asarray(
            np.bincount(ck[where], weights=values[where], minlength=n_pts)[:n_pts], dtype=float
        )

    # the spread of t1 at the operating pair: the error of <t1>_k in T_k
    var_t1 = stats_from_sums(
        per_point(n_t2, op), per_point(rec[_F["s_t1"]], op), per_point(rec[_F["s_t1t1"]], op)
    ).var
    edges = _fit_edges(
        usable,
        ck,
        n_pts,
        row,
        thr2,
        step_stats,
        rec[_F["s_t1"]],
        n_t2,
        thr1_op,
        thr2_op,
        tol,
        var_t1,
    )

    # ---- stage 3a: the intensity clusters at the operating pair and the slope table -----------
    clusters = _Clusters.from_records(rec, op, ck, n_pts, n_ch, n_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        complete = (clusters.n >= max(opt.min_hits_per_bin, 2)) & (
            clusters.n >= opt.min_eff * clusters.n_t1
        )
        saturated = clusters.n_sat > (1.0 - opt.min_eff) * clusters.n_t1
    flag(np.asarray(saturated.any(axis=1)), SATURATED)
    with np.errstate(invalid="ignore"):
        edge_d = (edges.inv_slope * np.repeat(gap, n_k)).reshape(n_ch, n_k)
        edge_d_var = (edges.var_inv_slope * np.repeat(gap, n_k) ** 2).reshape(n_ch, n_k)
    lut = _slope_table(
        clusters,
        complete,
        max(opt.min_hits_per_bin, 2),
        gap,
        opt.n_lut_bins,
        opt.slope_table,
        edge_d if opt.table_uses_edges else None,
        edge_d_var,
    )
    table_nodes = (np.isfinite(lut.s) & np.isfinite(lut.q)).sum(axis=1)
    flag(has_op & (table_nodes < 2), NO_SLOPE_TABLE)

    # ---- stage 3b: the AWC lines on both slope definitions ------------------------------------
    # the table's slope at intensity k is 1 / <1/S(Q)> over that intensity's hits: the mean
    # corrected time there is T_k - AWC <1/S(Q)>, so this is the x that makes the table consistent
    point_ch = np.repeat(np.arange(n_ch), n_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_lut_k = 1.0 / lut.x_k.ravel()
        x_var = np.einsum("gkk->gk", lut.x_k_cov).ravel()
        s_lut_k_err = s_lut_k**2 * np.sqrt(x_var)
    valid_pt = edges.valid & np.isfinite(s_lut_k) & np.isfinite(s_lut_k_err)
    t_k = edges.t_thr1.reshape(n_ch, n_k)
    var_t_k = edges.var_t_thr1.reshape(n_ch, n_k)
    use_edge = edges.valid.reshape(n_ch, n_k)
    use_lut = valid_pt.reshape(n_ch, n_k)
    x_edge = edges.inv_slope.reshape(n_ch, n_k)
    cov_x_edge = np.zeros((n_ch, n_k, n_k))
    cov_x_edge[:, np.arange(n_k), np.arange(n_k)] = edges.var_inv_slope.reshape(n_ch, n_k)
    fit_edge = _awc_line(
        t_k,
        var_t_k,
        x_edge,
        cov_x_edge,
        edges.cov_t_inv.reshape(n_ch, n_k),
        use_edge,
        opt.min_intensities,
    )
    fit_lut = _awc_line(
        t_k,
        var_t_k,
        lut.x_k,
        lut.x_k_cov,
        np.zeros_like(lut.x_k),
        use_lut,
        opt.min_intensities,
    )

    # do the two measurements of each intensity's slope agree: the edge secant S_k (all thr2
    # steps near the operating pair) and the ratio of means of the hits at the operating pair?
    with np.errstate(divide="ignore", invalid="ignore"):
        s_edge = 1.0 / edges.inv_slope
        var_s_edge = edges.var_inv_slope * s_edge**4
        s_op = lut.s_op_k.ravel()
        pull2 = (s_edge - s_op) ** 2 / (var_s_edge + lut.s_op_k_err.ravel() ** 2)
    both = (edges.valid & np.isfinite(pull2)).reshape(n_ch, n_k)
    chi2_agree = np.where(both, pull2.reshape(n_ch, n_k), 0.0).sum(axis=1)
    ndf_agree = both.sum(axis=1)
    p_agree = np.where(ndf_agree > 0, chi2_dist.sf(chi2_agree, np.maximum(ndf_agree, 1)), np.nan)
    if opt.awc_source == "auto":
        take_lut = (p_agree < opt.agree_p) & np.isfinite(fit_lut.awc)
    else:
        take_lut = np.full(n_ch, opt.awc_source == "lut")
    # a channel whose edges give no line but whose table does: the table line is all there is
    take_lut |= ~np.isfinite(fit_edge.awc) & np.isfinite(fit_lut.awc)
    flag(p_agree < opt.agree_p, SLOPES_DISAGREE)

    def pick(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
        return np.where(take_lut, b, a)

    awc = pick(fit_edge.awc, fit_lut.awc)
    n_used = pick(fit_edge.n_points, fit_lut.n_points)
    no_line = ~np.isfinite(awc) & (n_t2_ch > 0)
    flag(no_line & (n_used < opt.min_intensities), TOO_FEW_INTENSITIES)

    # ---- stage 4: trim across channels --------------------------------------------------------
    predictor = {
        "slope_loglog": lut.loglog,
        "slope_b": lut.line_b,
        "elasticity": lut.elasticity,
    }[opt.trim_predictor]
    trim, awc_trimmed = _trim(awc, predictor, opt.trim_predictor)
    flag(np.isfinite(awc) & ~np.isfinite(awc_trimmed), NO_TRIM)

    # ---- assemble -----------------------------------------------------------------------------
    out = np.zeros(n_ch, dtype=AWC_DTYPE)
    out["baseline_code"] = np.nan  # filled by AwcAccumulator from the noise-scan steps
    out["channel"] = numbers
    out["awc_uA"] = awc
    out["awc_uA_err"] = pick(fit_edge.awc_err, fit_lut.awc_err)
    out["t0_ns"] = pick(fit_edge.t0, fit_lut.t0)
    out["t0_ns_err"] = pick(fit_edge.t0_err, fit_lut.t0_err)
    out["awc_slope_source"] = np.where(np.isfinite(awc), np.where(take_lut, "lut", "edge"), "")
    out["awc_edge_uA"] = fit_edge.awc
    out["awc_lut_uA"] = fit_lut.awc
    out["slope_agreement_p"] = p_agree
    out["line_chi2"] = pick(fit_edge.chi2, fit_lut.chi2)
    out["line_ndf"] = pick(fit_edge.ndf, fit_lut.ndf)
    out["n_intensities"] = n_used
    out["awc_trimmed_uA"] = awc_trimmed
    out["slope_a"] = lut.line_a
    out["slope_b"] = lut.line_b
    out["slope_loglog"] = lut.loglog

    def padded(a: NDArray[Any], fill: float = np.nan) -> NDArray[Any]:
        a = a[:, :AWC_LUT_SIZE]
        return np.pad(a, ((0, 0), (0, AWC_LUT_SIZE - a.shape[1])), constant_values=fill)

    out["slope_lut_q"] = padded(lut.q)
    out["slope_lut_s"] = padded(lut.s)
    out["slope_lut_s_err"] = padded(lut.s_err)
    has_table = table_nodes >= 2
    out["lut_fit_q_min"] = np.where(has_table & np.isfinite(lut.fit_q_min), lut.fit_q_min, np.nan)
    out["lut_fit_q_max"] = np.where(has_table & np.isfinite(lut.fit_q_max), lut.fit_q_max, np.nan)
    q_k = clusters.q_mean
    measured = clusters.n > 0
    out["slope_bin_q"] = padded(np.where(measured, q_k, np.nan))
    out["slope_bin_s"] = padded(np.where(measured, lut.s_op_k, np.nan))
    out["slope_bin_s_err"] = padded(np.where(measured, lut.s_op_k_err, np.nan))
    out["slope_bin_n"] = padded(clusters.n, 0)
    out["thr1_op_uA"] = thr1_op
    out["thr2_op_uA"] = thr2_op
    out["n_hits"] = n_hits_ch
    out["flag"] = ["|".join(f) for f in flags]

    points = np.zeros(n_pts, dtype=AWC_POINT_DTYPE)
    points["channel"] = numbers[point_ch]
    points["intensity"] = np.tile(levels, n_ch)
    points["q_mean"] = q_k.ravel()
    points["n_steps"] = edges.n_steps
    points["n_hits"] = edges.n_hits
    points["edge_c"] = edges.coef
    points["edge_chi2"] = edges.chi2
    points["edge_ndf"] = edges.ndf
    points["t_thr1_ns"] = edges.t_thr1
    points["t_thr1_ns_err"] = np.sqrt(edges.var_t_thr1)
    points["t_thr2_ns"] = edges.t_thr2
    points["slope_edge"] = s_edge
    points["slope_edge_err"] = np.sqrt(var_s_edge)
    points["slope_op"] = s_op
    points["slope_op_err"] = lut.s_op_k_err.ravel()
    points["slope_lut"] = s_lut_k
    points["slope_lut_err"] = s_lut_k_err
    points["used"] = np.where(np.repeat(take_lut, n_k), valid_pt, edges.valid)
    points["flag"] = edges.flags
    # rows for intensities a channel never saw (another bar lit) carry no information
    points = points[per_point(n_all, everything) > 0]
    return AwcFit(out, points, trim, opt.parameters(qdc_max))


# ------------------------------------------------------------------------------------------------
# stage 2: mean edges


def _grouped_polyfit(
    group: NDArray[np.intp],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    w: NDArray[np.float64],
    n_groups: int,
    deg: int,
    *,
    rcond: float = 1e-12,
) -> LinearFit:
    """Weighted polynomial fits of ``y`` against ``x`` per group, from grouped sums.

    The normal equations of every group are built with ``bincount`` (no padding of ragged
    groups), equilibrated and solved as :func:`~teststand.analysis._grouping.batched_lstsq`
    does; chi2 is summed from the residuals of the entries.
    """
    p = deg + 1
    power = x[:, None] ** np.arange(2 * deg + 1)
    moments = np.stack(
        [
            np.bincount(group, weights=w * power[:, j], minlength=n_groups)
            for j in range(2 * deg + 1)
        ],
        axis=1,
    )[:n_groups]
    rhs = np.stack(
        [np.bincount(group, weights=w * power[:, j] * y, minlength=n_groups) for j in range(p)],
        axis=1,
    )[:n_groups]
    normal = moments[:, np.add.outer(np.arange(p), np.arange(p))]
    diag = np.sqrt(np.einsum("gii->gi", normal))
    scale = np.where(diag > 0, diag, 1.0)
    n_eq = normal / (scale[:, :, None] * scale[:, None, :])
    eig = np.linalg.eigvalsh(n_eq)
    n_points = np.bincount(group, weights=(w > 0).astype(np.float64), minlength=n_groups)[:n_groups]
    ndf = n_points.astype(np.int64) - p
    ok = (diag > 0).all(axis=1) & (eig[:, 0] > rcond * eig[:, -1]) & (ndf >= 0)
    inv_eq = np.linalg.inv(np.where(ok[:, None, None], n_eq, np.eye(p)))
    cov = inv_eq / (scale[:, :, None] * scale[:, None, :])
    coef = (cov @ rhs[..., None])[..., 0]
    resid = y - np.einsum("ei,ei->e", power[:, :p], coef[group])
    chi2 = np.bincount(group, weights=w * resid * resid, minlength=n_groups)[:n_groups]
    coef[~ok] = np.nan
    cov[~ok] = np.nan
    return LinearFit(coef, cov, np.where(ok, chi2, np.nan), ndf, ok)


class _Edges(NamedTuple):
    coef: NDArray[np.float64]  # (CK, 3), in absolute thr
    chi2: NDArray[np.float64]
    ndf: NDArray[np.int64]
    n_steps: NDArray[np.int64]
    n_hits: NDArray[np.int64]
    t_thr1: NDArray[np.float64]
    var_t_thr1: NDArray[np.float64]
    t_thr2: NDArray[np.float64]
    inv_slope: NDArray[np.float64]  # (t(thr2_op) - t(thr1_op)) / (thr2_op - thr1_op), ns/uA
    var_inv_slope: NDArray[np.float64]
    cov_t_inv: NDArray[np.float64]
    valid: NDArray[np.bool_]
    flags: list[str]


def _fit_edges(
    usable: NDArray[np.bool_],
    ck: NDArray[np.intp],
    n_pts: int,
    row: NDArray[np.intp],
    thr2: NDArray[np.float64],
    step_stats: Any,
    sum_t1: NDArray[np.float64],
    n_t2: NDArray[np.float64],
    thr1_op: NDArray[np.float64],
    thr2_op: NDArray[np.float64],
    tol: float,
    var_t1: NDArray[np.float64],
) -> _Edges:
    """Quadratic mean edge per (channel, intensity) and its values at the operating thresholds.

    ``D(thr) = <t2(thr) - t1>`` is fitted per intensity against ``thr - thr1_op`` (centred, so
    that the normal equations stay well conditioned); the mean t2 edge is ``<t1> + D``.
    """
    n_ch = thr1_op.size
    n_k = n_pts // max(n_ch, 1)
    idx = ck[usable]
    x0 = thr1_op[row[usable]]
    # <t1>_k over the same pulses as the step means
    n_k_hits = np.bincount(idx, weights=n_t2[usable], minlength=n_pts)[:n_pts]
    t1_sum = np.bincount(idx, weights=sum_t1[usable], minlength=n_pts)[:n_pts]
    all_hits = np.bincount(ck, weights=n_t2, minlength=n_pts)[:n_pts]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1_mean = t1_sum / n_k_hits
        var_t1_mean = var_t1 / n_k_hits
    # a step mean is never known better than 0.1 ps: keeps the weights finite when t2 ~ t1
    sem2 = np.maximum(step_stats.var[usable] / n_t2[usable], 1e-8)
    x = thr2[usable] - x0
    fit = _grouped_polyfit(idx, x, step_stats.mean[usable], 1.0 / sem2, n_pts, 2)
    n_steps_pt = np.bincount(idx, minlength=n_pts)[:n_pts]

    # From the edge, as the design has it: T_k = t(thr1_op) = <t1> + D(thr1_op),
    # dt_k = t(thr2_op) - t(thr1_op).
    gap = np.repeat(thr2_op - thr1_op, n_k)
    # t(thr1_op) - <t1> = c0 and t(thr2_op) - t(thr1_op) = c1 gap + c2 gap**2: two linear
    # combinations of the coefficients, with their covariance (matmul: einsum is slow here)
    comb = np.zeros((n_pts, 2, 3))
    comb[:, 0, 0] = 1.0
    comb[:, 1, 1] = gap
    comb[:, 1, 2] = gap * gap
    vals = (comb @ fit.coef[..., None])[..., 0]
    cv = comb @ fit.cov @ comb.transpose(0, 2, 1)
    t_rel, dt = vals[:, 0], vals[:, 1]
    with np.errstate(invalid="ignore"):
        t_thr1 = t1_mean + t_rel
        var_t_thr1 = cv[:, 0, 0] + np.where(np.isfinite(var_t1_mean), var_t1_mean, 0.0)
    # the edge in absolute time and threshold, for the points table
    c0, c1, c2 = fit.coef.T
    a = np.repeat(thr1_op, n_k)
    coef = np.stack([c0 - c1 * a + c2 * a * a + t1_mean, c1 - 2 * c2 * a, c2], axis=1)
    lo_need = np.minimum(gap, 0.0)
    hi_need = np.maximum(gap, 0.0)
    has_lo = np.bincount(idx, weights=(x <= lo_need[idx] + tol), minlength=n_pts)[:n_pts] > 0
    has_hi = np.bincount(idx, weights=(x >= hi_need[idx] - tol), minlength=n_pts)[:n_pts] > 0
    covered = has_lo & has_hi
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_slope = dt / gap
        var_inv = cv[:, 1, 1] / gap**2
        cov_t_inv = cv[:, 0, 1] / gap
    enough = (n_steps_pt >= 4) & fit.ok
    positive = inv_slope > 0
    valid = enough & covered & positive & np.isfinite(t_thr1)
    flags = [""] * n_pts
    for i in np.flatnonzero(~valid & (all_hits > 0)):
        why = [FEW_STEPS] if not enough[i] else []
        if enough[i] and not covered[i]:
            why.append(NOT_COVERED)
        if enough[i] and covered[i] and not positive[i]:
            why.append(NO_SLOPE)
        flags[i] = "|".join(why)
    nan = np.where(valid, 1.0, np.nan)
    return _Edges(
        coef,
        fit.chi2,
        fit.ndf,
        n_steps_pt,
        all_hits.astype(np.int64),
        t_thr1 * nan,
        var_t_thr1 * nan,
        (t_thr1 + dt) * nan,
        inv_slope * nan,
        var_inv * nan,
        cov_t_inv * nan,
        valid,
        flags,
    )


# ------------------------------------------------------------------------------------------------
# stage 3a: slope table


class _Clusters(NamedTuple):
    """Per (channel, intensity), ``(C, K)``: the hits at the operating pair, from the records."""

    n_t1: NDArray[np.float64]  # hits with a finite t1
    n_sat: NDArray[np.float64]  # hits with a saturated charge
    n: NDArray[np.float64]  # hits with t2 and a charge in range
    q_mean: NDArray[np.float64]
    m2: NDArray[np.float64]  # central moments of the charge (population)
    m3: NDArray[np.float64]
    m4: NDArray[np.float64]
    d: Any  # GroupedStats of t2 - t1 over the same hits

    @classmethod
    def from_records(
        cls,
        rec: NDArray[np.float64],
        op: NDArray[np.bool_],
        ck: NDArray[np.intp],
        n_pts: int,
        n_ch: int,
        n_k: int,
    ) -> _Clusters:
        idx = ck[op]

        def total(name: str) -> NDArray[np.float64]:
            return np.asarray(
                np.bincount(idx, weights=rec[_F[name], op], minlength=n_pts)[:n_pts], dtype=float
            )

        n = total("n_k")
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = total("s_q") / n
            e2 = total("s_q2") / n
            e3 = total("s_q3") / n
            e4 = total("s_q4") / n
        m2 = np.maximum(e2 - mu * mu, 0.0)
        m3 = e3 - 3 * mu * e2 + 2 * mu**3
        m4 = np.maximum(e4 - 4 * mu * e3 + 6 * mu * mu * e2 - 3 * mu**4, 0.0)
        d = stats_from_sums(n, total("s_dk"), total("s_ddk"))
        shape = (n_ch, n_k)
        return cls(
            total("n_t1").reshape(shape),
            total("n_sat").reshape(shape),
            n.reshape(shape),
            mu.reshape(shape),
            m2.reshape(shape),
            m3.reshape(shape),
            m4.reshape(shape),
            d,
        )


class _SlopeTable(NamedTuple):
    q: NDArray[np.float64]  # (C, B) the table the correction interpolates
    s: NDArray[np.float64]
    s_err: NDArray[np.float64]
    line_a: NDArray[np.float64]  # (C,) S = a + b Q through the intensities' points
    line_b: NDArray[np.float64]
    elasticity: NDArray[np.float64]  # b <Q> / (a + b <Q>)
    loglog: NDArray[np.float64]  # d ln S / d ln Q of the table at the reference charge
    x_k: NDArray[np.float64]  # (C, K) mean 1/S_table(Q) over the hits of intensity k, ns/uA
    x_k_cov: NDArray[np.float64]  # (C, K, K) covariance of x_k through the table's fit
    s_op_k: NDArray[np.float64]  # (C, K) ratio-of-means slope of the intensity's hits
    s_op_k_err: NDArray[np.float64]
    fit_q_min: NDArray[np.float64]  # (C,) lowest and highest mean charge of the points fitted
    fit_q_max: NDArray[np.float64]


def _inverse_slope_factor(
    coef: NDArray[np.float64],
    u: NDArray[np.float64],
    v2: NDArray[np.float64],
    v3: NDArray[np.float64],
    v4: NDArray[np.float64],
) -> NDArray[np.float64]:
    """``<g(Q)> / g(<Q>)`` for ``g = 1/S = exp(-P(ln Q - ref))``, ``P = c0 + c1 u + c2 u**2``.

    A Taylor series in the charge to fourth order: ``g'' m2 / 2 + g''' m3 / 6 + g'''' m4 / 24``
    over ``g``, with ``v_j = m_j / <Q>**j`` the cluster's relative central moments. For the
    charge spreads of the laser (up to ~15 % rms) the next terms are below 1e-5 of ``g``.
    """
    p1 = coef[:, 1:2] + 2 * coef[:, 2:3] * u
    p2 = 2 * coef[:, 2:3]
    # derivatives of h(u) = exp(-P(u)) over h ...
    h1 = -p1
    h2 = p1**2 - p2
    h3 = -(p1**3) + 3 * p1 * p2
    h4 = p1**4 - 6 * p1**2 * p2 + 3 * p2**2
    # ... and of g(Q) = h(ln Q - ref) over g, times Q**j
    g2 = h2 - h1
    g3 = h3 - 3 * h2 + 2 * h1
    g4 = h4 - 6 * h3 + 11 * h2 - 6 * h1
    return np.asarray(1.0 + g2 * v2 / 2 + g3 * v3 / 6 + g4 * v4 / 24)


def _slope_table(
    clusters: _Clusters,
    complete: NDArray[np.bool_],
    min_hits: int,
    gap: NDArray[np.float64],
    n_nodes: int,
    kind: str,
    edge_d: NDArray[np.float64] | None,
    edge_d_var: NDArray[np.float64],
) -> _SlopeTable:
    """Slope versus charge from the intensity clusters at the operating thresholds."""
    n_ch, n_k = clusters.n.shape
    d_mean = clusters.d.mean.reshape(n_ch, n_k)
    d_var = (clusters.d.sem**2).reshape(n_ch, n_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_op_k = gap[:, None] / d_mean
        s_op_k_err = s_op_k * np.sqrt(d_var) / d_mean
    s_op_k = np.where(clusters.n >= min_hits, s_op_k, np.nan)
    good = complete & (d_mean > 0) & np.isfinite(d_var)
    if edge_d is not None:
        both = np.isfinite(edge_d) & np.isfinite(edge_d_var) & (edge_d_var > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            wa, wb = 1.0 / d_var, np.where(both, 1.0 / edge_d_var, 0.0)
            d_mean = np.where(both, (wa * d_mean + wb * np.nan_to_num(edge_d)) / (wa + wb), d_mean)
            d_var = np.where(both, 1.0 / (wa + wb), d_var)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(good, clusters.q_mean, 1.0)
        v2 = np.where(good, clusters.m2 / q**2, 0.0)
        v3 = np.where(good, clusters.m3 / q**3, 0.0)
        v4 = np.where(good, clusters.m4 / q**4, 0.0)
    table_q, table_s, table_err, coef, cov, ref = _smooth_table(
        clusters.q_mean,
        (v2, v3, v4),
        d_mean,
        np.sqrt(d_var),
        good,
        gap,
        n_nodes,
        {"power_law": "never", "log_quadratic": "always"}.get(kind, "if_needed"),
    )

    # the line S = a + b Q through the measured points, weighted by their errors (the trim's b)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(good & np.isfinite(s_op_k_err) & (s_op_k_err > 0), 1.0 / s_op_k_err**2, 0.0)
    line = batched_polyfit(np.where(w > 0, clusters.q_mean, 0.0), s_op_k, w, deg=1)
    a_, b_ = line.coef[:, 0], line.coef[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_bar = (w * np.where(w > 0, clusters.q_mean, 0.0)).sum(axis=1) / w.sum(axis=1)
        elasticity = b_ * q_bar / (a_ + b_ * q_bar)
    loglog = np.where(np.isfinite(ref), coef[:, 1], np.nan)

    # the mean inverse table slope over each intensity's hits: what the correction subtracts there
    # (every hit of the intensity must be in the charge sums: a partial cluster is no estimate)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_all = np.where(complete, clusters.q_mean, np.nan)
        u_k = np.log(q_all) - ref[:, None]
        v2a = clusters.m2 / q_all**2
        v3a = clusters.m3 / q_all**3
        v4a = clusters.m4 / q_all**4
        ln_s, _ = batched_polyval(np.nan_to_num(coef), np.nan_to_num(u_k))
        x_k = np.exp(-ln_s) * _inverse_slope_factor(coef, u_k, v2a, v3a, v4a)
    x_k = np.where(np.isfinite(u_k) & np.isfinite(ref)[:, None], x_k, np.nan)
    # x_k ~ <exp(-ln S(u))>: its derivatives by the curve's coefficients at u of <Q>_k
    jac = -np.nan_to_num(x_k)[..., None] * np.nan_to_num(u_k)[..., None] ** np.arange(3)
    x_cov = jac @ np.nan_to_num(cov) @ jac.transpose(0, 2, 1)
    fitted = good & np.isfinite(ref)[:, None]
    return _SlopeTable(
        table_q,
        table_s,
        table_err,
        a_,
        b_,
        elasticity,
        loglog,
        x_k,
        x_cov,
        s_op_k,
        np.where(np.isfinite(s_op_k), s_op_k_err, np.nan),
        np.where(fitted, clusters.q_mean, np.inf).min(axis=1, initial=np.inf),
        np.where(fitted, clusters.q_mean, -np.inf).max(axis=1, initial=-np.inf),
    )


def _smooth_table(
    q_k: NDArray[np.float64],
    rel_moments: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]],
    d_k: NDArray[np.float64],
    d_k_err: NDArray[np.float64],
    good: NDArray[np.bool_],
    gap: NDArray[np.float64],
    n_nodes: int,
    curvature: str,
    n_iter: int = 3,
) -> tuple[
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
    NDArray[np.float64],
]:
    """The slope table from the intensity clusters, as a smooth curve on log-spaced nodes.

    Why not straight from charge bins: the calibration lights a few discrete intensities, so the
    charges come in clusters with gaps between them, and straight lines across the gaps cut the
    concave S(Q) short by a few per cent. Within a cluster, a charge bin selects pulses by a charge
    that is smeared by the QDC resolution, so the bins at a cluster's edges see amplitudes pulled
    towards its centre (regression dilution) and the end bins of the table tilt by about 1 %.
    A whole cluster has neither problem: its mean charge and its mean ``t2 - t1`` belong to the
    same pulses. So each intensity gives one point ``(<Q>_k, (thr2 - thr1) / <t2 - t1>_k)``; the
    curvature terms of the cluster's charge spread (:func:`_inverse_slope_factor`) are taken out,
    so that the table applied to the cluster's own charges gives back its mean ``t2 - t1``; and
    ``ln S = p0 + p1 u + p2 u**2``, ``u = ln(Q / Q_ref)``, is fitted through the points (a power
    law is a straight line in log-log; the quadratic term takes up edges that do not scale). The
    curve is tabulated at ``n_nodes`` log-spaced charges from 2 sigma below the lowest cluster to
    2 sigma above the highest, so that linear interpolation of the stored table follows it to
    well below a picosecond.

    Returns the nodes' charges, slopes and slope errors ``(C, n_nodes)``, the curve's
    coefficients ``(C, 3)`` and covariance ``(C, 3, 3)``, and ``ln Q_ref`` per channel.
    """
    v2, v3, v4 = rel_moments
    n_ch = q_k.shape[0]
    n_good = good.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_raw = np.where(good, gap[:, None] / d_k, np.nan)
        rel = np.where(good, d_k_err / d_k, np.nan)
        logq = np.log(np.where(good, q_k, 1.0))
        w = np.where(good, 1.0 / rel**2, 0.0)
        ref = (w * logq).sum(axis=1) / w.sum(axis=1)
    u = np.where(good, logq - np.where(np.isfinite(ref), ref, 0.0)[:, None], 0.0)
    y = np.log(np.where(good, s_raw, 1.0))
    use_quad = (n_good >= 4) & (curvature != "never")
    if curvature == "if_needed":
        # the power law unless the quadratic term is significant (p < 1 % for one more parameter)
        quad0 = batched_polyfit(u, y, w, deg=2)
        line0 = batched_polyfit(u, y, w, deg=1)
        use_quad &= quad0.ok & (line0.chi2 - quad0.chi2 > _CURVATURE_CHI2)
    coef = np.zeros((n_ch, 3))
    cov = np.zeros((n_ch, 3, 3))
    ok = np.zeros(n_ch, dtype=bool)
    for _ in range(n_iter):
        quad = batched_polyfit(u, y, w, deg=2)
        line = batched_polyfit(u, y, w, deg=1)
        pick_q = use_quad & quad.ok
        coef = np.where(pick_q[:, None], quad.coef, np.pad(line.coef, ((0, 0), (0, 1))))
        cov = np.where(pick_q[:, None, None], quad.cov, np.pad(line.cov, ((0, 0), (0, 1), (0, 1))))
        ok = (pick_q | line.ok) & (n_good >= 2)
        # <1/S(Q)> over the cluster = (1/S)(<Q>) * factor, so S(<Q>) = factor * gap / <d>
        factor = _inverse_slope_factor(np.nan_to_num(coef), u, v2, v3, v4)
        y = np.log(np.where(good & ok[:, None] & (factor > 0), s_raw * factor, 1.0))
    sig = np.sqrt(v2)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(good, logq + np.log(np.maximum(1.0 - 2 * sig, 0.1)), np.inf).min(
            axis=1, initial=np.inf
        )
        hi = np.where(good, logq + np.log(1.0 + 2 * sig), -np.inf).max(axis=1, initial=-np.inf)
    ok &= np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
    frac = np.linspace(0.0, 1.0, n_nodes)
    log_nodes = np.where(ok, lo, 0.0)[:, None] + frac * np.where(ok, hi - lo, 0.0)[:, None]
    u_nodes = log_nodes - np.where(ok, ref, 0.0)[:, None]
    basis = u_nodes[..., None] ** np.arange(3)  # (C, nodes, 3)
    ln_s = (basis @ np.nan_to_num(coef)[..., None])[..., 0]
    var_ln_s = ((basis @ np.nan_to_num(cov)) * basis).sum(axis=2)
    nan = np.where(ok, 1.0, np.nan)[:, None]
    nodes_s = np.exp(ln_s)
    nodes_err = nodes_s * np.sqrt(np.maximum(var_ln_s, 0.0))
    ref_out = np.where(ok, ref, np.nan)
    coef_out = np.where(ok[:, None], coef, np.nan)
    return np.exp(log_nodes) * nan, nodes_s * nan, nodes_err * nan, coef_out, cov, ref_out


# ------------------------------------------------------------------------------------------------
# stage 3b: the AWC line


class _Line(NamedTuple):
    awc: NDArray[np.float64]
    awc_err: NDArray[np.float64]
    t0: NDArray[np.float64]
    t0_err: NDArray[np.float64]
    chi2: NDArray[np.float64]
    ndf: NDArray[np.int64]
    n_points: NDArray[np.int64]


def _awc_line(
    t: NDArray[np.float64],
    var_t: NDArray[np.float64],
    x: NDArray[np.float64],
    cov_x: NDArray[np.float64],
    cov_tx: NDArray[np.float64],
    use: NDArray[np.bool_],
    min_points: int,
) -> _Line:
    """``T = t0 + AWC x`` per channel, with errors on both axes.

    ``cov_x`` is the ``(C, K, K)`` covariance of the x values (the table's points are correlated
    through the curve they come from), ``cov_tx`` the covariance of ``T_k`` and ``x_k``. An error
    in ``x`` moves a point by ``-AWC dx`` in T, so the fit is generalised least squares with
    ``V = diag(var_T) + AWC**2 C_x - 2 AWC diag(cov_Tx)``, iterated on the AWC.
    """
    use = use & np.isfinite(t) & np.isfinite(x) & np.isfinite(var_t) & (var_t >= 0)
    cov_x = np.where(np.isfinite(cov_x), cov_x, 0.0)
    cov_tx = np.where(np.isfinite(cov_tx), cov_tx, 0.0)
    n_ch, n_k = t.shape
    design = np.stack([np.ones_like(x), np.where(use, x, 0.0)], axis=2)
    slope = np.zeros(n_ch)
    fit = None
    idx = np.arange(n_k)
    for _ in range(3):
        v = slope[:, None, None] ** 2 * cov_x
        v[:, idx, idx] += np.maximum(var_t - 2 * slope[:, None] * cov_tx, 0.0) + 1e-12
        fit = batched_gls(design, np.where(use, t, 0.0), v, use)
        slope = np.where(np.isfinite(fit.coef[:, 1]), fit.coef[:, 1], 0.0)
    assert fit is not None
    n_points = use.sum(axis=1)
    ok = fit.ok & (n_points >= max(min_points, 2))
    # errors scaled up by sqrt(chi2/ndf) where the points scatter more than their errors say
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.sqrt(np.maximum(np.where(fit.ndf > 0, fit.chi2 / fit.ndf, 1.0), 1.0))
    nan = np.where(ok, 1.0, np.nan)
    return _Line(
        fit.coef[:, 1] * nan,
        np.sqrt(fit.cov[:, 1, 1]) * scale * nan,
        fit.coef[:, 0] * nan,
        np.sqrt(fit.cov[:, 0, 0]) * scale * nan,
        fit.chi2 * nan,
        fit.ndf,
        n_points,
    )


# ------------------------------------------------------------------------------------------------
# stage 4: trim


def _trim(
    awc: NDArray[np.float64], predictor: NDArray[np.float64], name: str
) -> tuple[AwcTrim, NDArray[np.float64]]:
    """Fit ``AWC = alpha + beta * predictor`` across channels (unweighted: the channel-to-channel
    spread, not the fit errors, is what the trim describes)."""
    use = np.isfinite(awc) & np.isfinite(predictor)
    n = int(use.sum())
    nan = float("nan")
    if n < 3 or np.ptp(predictor[use]) == 0:
        spread = float(np.std(awc[use], ddof=1)) if n >= 2 else nan
        return AwcTrim(name, nan, nan, spread, nan, n), np.full(awc.shape, np.nan)
    beta, alpha = np.polyfit(predictor[use], awc[use], 1)
    predicted = alpha + beta * predictor
    before = float(np.std(awc[use], ddof=1))
    after = float(np.sqrt(np.sum((awc[use] - predicted[use]) ** 2) / (n - 2)))
    trim = AwcTrim(name, float(alpha), float(beta), before, after, n)
    return trim, np.where(np.isfinite(predictor), predicted, np.nan)


# ------------------------------------------------------------------------------------------------
# applying the constants


def _row_of_channel(constants: NDArray[Any], channel: NDArray[Any]) -> NDArray[np.intp]:
    """Row of ``constants`` for every hit's channel number, -1 where the channel has none."""
    numbers = constants["channel"].astype(np.intp)
    top = int(channel.max()) if channel.size else -1
    size = max(int(numbers.max()) if numbers.size else -1, top) + 1
    lookup = np.full(size, -1, dtype=np.intp)
    lookup[numbers] = np.arange(numbers.size)
    return lookup[channel.astype(np.intp)]


def correct_times(
    channel: ArrayLike,
    t1: ArrayLike,
    q: ArrayLike,
    constants: NDArray[Any],
    *,
    awc_field: str = "awc_uA",
    operating_thr_uA: tuple[float, float] | None = None,
) -> NDArray[np.float64]:
    """Walk-corrected times ``t1 - AWC_i / S_i(Q)`` for every hit, in ns.

    ``S_i(Q)`` is interpolated linearly in the channel's slope table (held at the end values
    outside it). ``awc_field`` chooses the fitted (``awc_uA``) or the trimmed
    (``awc_trimmed_uA``) coefficient. Hits of channels without constants get NaN.

    The constants hold for the threshold pair they were made for: when ``operating_thr_uA``
    (the data's ``(thr1, thr2)``) is given and differs from theirs by more than 0.2 uA on any
    channel, :class:`~teststand.errors.AnalysisError` is raised.
    """
    ch = np.asarray(channel)
    t1_a = np.asarray(t1, dtype=np.float64)
    q_a = np.asarray(q, dtype=np.float64)
    if operating_thr_uA is not None:
        d1 = np.abs(constants["thr1_op_uA"] - operating_thr_uA[0])
        d2 = np.abs(constants["thr2_op_uA"] - operating_thr_uA[1])
        if np.any((d1 > 0.2) | (d2 > 0.2)):
            made = (
                float(np.nanmedian(constants["thr1_op_uA"])),
                float(np.nanmedian(constants["thr2_op_uA"])),
            )
            raise AnalysisError(
                f"AWC constants were made for thresholds ({made[0]:.2f}, {made[1]:.2f}) uA, the"
                f" data has ({operating_thr_uA[0]:.2f}, {operating_thr_uA[1]:.2f}) uA: recalibrate"
            )
    row = _row_of_channel(constants, ch)
    s = grouped_interp(row, q_a, constants["slope_lut_q"], constants["slope_lut_s"])
    awc = np.asarray(constants[awc_field], dtype=np.float64)
    awc_hit = np.where(row >= 0, awc[np.maximum(row, 0)], np.nan)
    return t1_a - awc_hit / s


def residual_walk(
    channel: ArrayLike,
    t_corr: ArrayLike,
    q: ArrayLike,
    n_bins: int = 10,
    *,
    n_channels: int | None = None,
    q_range: tuple[ArrayLike, ArrayLike] | None = None,
    min_hits_per_bin: int = 20,
) -> NDArray[Any]:
    """How flat the corrected time is versus charge, from hit arrays (equal-count charge bins).

    Per channel, the hits (within ``q_range``: scalars or one value per channel number) are cut
    into ``n_bins`` equal-count charge bins; ``spread_ns`` is max - min of the bins' mean
    corrected times, ``chi2_flat`` the chi2 of those means about their weighted mean. A channel
    with fewer than two populated bins gets NaN and the flag ``too_few_hits``. For runs, the
    ``awc_validation`` method (:class:`AwcValidationAccumulator`) does the same from running
    sums, in bins fixed before the data.
    """
    if not 1 <= n_bins <= AWC_LUT_SIZE:
        raise ValueError(f"n_bins must be 1..{AWC_LUT_SIZE}, got {n_bins}")
    ch = np.asarray(channel).astype(np.intp)
    t = np.asarray(t_corr, dtype=np.float64)
    qf = np.asarray(q, dtype=np.float64)
    n_ch = int(n_channels) if n_channels is not None else (int(ch.max()) + 1 if ch.size else 0)
    keep = np.isfinite(t) & np.isfinite(qf)
    if q_range is not None:
        lo = np.broadcast_to(np.asarray(q_range[0], dtype=np.float64), (n_ch,))
        hi = np.broadcast_to(np.asarray(q_range[1], dtype=np.float64), (n_ch,))
        keep &= (qf >= lo[ch]) & (qf <= hi[ch])
    ch, t, qf = ch[keep], t[keep], qf[keep]
    b = quantile_bin_index(ch, qf, n_ch, n_bins)
    g = ch * n_bins + b
    n_groups = n_ch * n_bins
    ts = grouped_stats(g, n_groups, t)
    q_sum = np.bincount(g, weights=qf, minlength=n_groups)[:n_groups]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_mean = (q_sum / ts.n).reshape(n_ch, n_bins)
    mean = ts.mean.reshape(n_ch, n_bins)
    err = ts.sem.reshape(n_ch, n_bins)
    n = ts.n.reshape(n_ch, n_bins)
    good = (n >= max(min_hits_per_bin, 2)) & np.isfinite(mean) & np.isfinite(err) & (err > 0)
    spread, spread_err, chi2, n_good = _flatness(mean, err, good)
    out = np.zeros(n_ch, dtype=RESIDUAL_WALK_DTYPE)
    out["channel"] = np.arange(n_ch)
    out["spread_ns"] = spread
    out["spread_err_ns"] = spread_err
    out["chi2_flat"] = chi2
    out["ndf"] = n_good - 1
    pad = ((0, 0), (0, AWC_LUT_SIZE - n_bins))
    out["q_bin"] = np.pad(q_mean, pad, constant_values=np.nan)
    out["t_bin_ns"] = np.pad(np.where(good, mean, np.nan), pad, constant_values=np.nan)
    out["t_bin_ns_err"] = np.pad(np.where(good, err, np.nan), pad, constant_values=np.nan)
    out["n_bin"] = np.pad(n, pad)
    out["flag"] = np.where(n_good >= 2, "", TOO_FEW_BINNED)
    return out


def _flatness(
    mean: NDArray[np.float64], err: NDArray[np.float64], good: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Per row: max - min of the good bin means, its error, chi2 about the weighted mean, n."""
    n_good = good.sum(axis=1)
    enough = n_good >= 2
    rows = np.arange(mean.shape[0])
    hi_i = np.argmax(np.where(good, mean, -np.inf), axis=1)
    lo_i = np.argmin(np.where(good, mean, np.inf), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(good, 1.0 / err**2, 0.0)
        wmean = (w * np.where(good, mean, 0.0)).sum(axis=1) / w.sum(axis=1)
        chi2 = (w * np.where(good, mean - wmean[:, None], 0.0) ** 2).sum(axis=1)
        spread = np.where(enough, mean[rows, hi_i] - mean[rows, lo_i], np.nan)
        spread_err = np.where(enough, np.hypot(err[rows, hi_i], err[rows, lo_i]), np.nan)
    return spread, spread_err, np.where(enough, chi2, np.nan), n_good


class AwcCorrection:
    """AWC constants laid out by channel row, to correct the hits of a run step by step.

    Args:
        constants: an :data:`AWC_DTYPE` table (from an earlier calibration).
        numbers: the channel number of every row of the run's channel table.
        use_trimmed: apply ``awc_trimmed_uA`` instead of ``awc_uA``.
        lsb_uA: thresholds within half of it count as the same.

    A row is :attr:`usable` when its channel has a finite AWC, its threshold pair and at least two
    table nodes. Raises :class:`~teststand.errors.AnalysisError` when the table lacks a field.
    """

    FIELDS = ("channel", "awc_uA", "slope_lut_q", "slope_lut_s", "thr1_op_uA", "thr2_op_uA")

    def __init__(
        self,
        constants: NDArray[Any],
        numbers: NDArray[Any],
        *,
        use_trimmed: bool = False,
        lsb_uA: float,
    ) -> None:
        constants = np.asarray(constants)
        field = "awc_trimmed_uA" if use_trimmed else "awc_uA"
        missing = sorted((set(self.FIELDS) | {field}) - set(constants.dtype.names or ()))
        if missing:
            raise AnalysisError(f"AWC constants lack the field(s) {', '.join(missing)}")
        n_ch = numbers.size
        self.tol = 0.5 * float(lsb_uA) * (1 + 1e-6)
        self.awc = np.full(n_ch, np.nan)
        self.thr = np.full((n_ch, 2), np.nan)
        self.lut_q = np.full((n_ch, AWC_LUT_SIZE), np.nan)
        self.lut_s = np.full((n_ch, AWC_LUT_SIZE), np.nan)
        row_of = {int(c): i for i, c in enumerate(np.asarray(numbers).tolist())}
        for j, c in enumerate(constants["channel"].tolist()):
            i = row_of.get(int(c))
            if i is None:
                continue
            self.awc[i] = constants[field][j]
            self.thr[i] = (constants["thr1_op_uA"][j], constants["thr2_op_uA"][j])
            lut_q = np.asarray(constants["slope_lut_q"][j], dtype=np.float64)[:AWC_LUT_SIZE]
            lut_s = np.asarray(constants["slope_lut_s"][j], dtype=np.float64)[:AWC_LUT_SIZE]
            self.lut_q[i, : lut_q.size] = lut_q
            self.lut_s[i, : lut_s.size] = lut_s
        with np.errstate(invalid="ignore"):
            nodes = np.isfinite(self.lut_q) & np.isfinite(self.lut_s) & (self.lut_q > 0)
        #: rows with constants that can be applied
        self.usable = (
            np.isfinite(self.awc) & (nodes.sum(axis=1) >= 2) & np.isfinite(self.thr).all(axis=1)
        )
        #: the charges the table rests on (mean charge of its lowest and highest intensity),
        #: QDC counts; NaN where not usable or not recorded (constants of an older method)
        self.fit_q_min = np.full(n_ch, np.nan)
        self.fit_q_max = np.full(n_ch, np.nan)
        if {"lut_fit_q_min", "lut_fit_q_max"} <= set(constants.dtype.names or ()):
            for j, c in enumerate(constants["channel"].tolist()):
                i = row_of.get(int(c))
                if i is not None:
                    self.fit_q_min[i] = constants["lut_fit_q_min"][j]
                    self.fit_q_max[i] = constants["lut_fit_q_max"][j]
        #: the charge range of every row's table, QDC counts (NaN where not usable)
        self.q_lo = np.where(
            self.usable, np.where(nodes, self.lut_q, np.inf).min(axis=1, initial=np.inf), np.nan
        )
        self.q_hi = np.where(
            self.usable, np.where(nodes, self.lut_q, -np.inf).max(axis=1, initial=-np.inf), np.nan
        )

    def matching(self, thr1_uA: float, thr2_uA: float) -> NDArray[np.bool_]:
        """Per row: usable and made for the threshold pair ``(thr1_uA, thr2_uA)``."""
        with np.errstate(invalid="ignore"):
            same = (np.abs(self.thr - np.array([thr1_uA, thr2_uA])) <= self.tol).all(axis=1)
        return np.asarray(self.usable & same)

    def correct(
        self,
        rows: NDArray[np.intp],
        t1: ArrayLike,
        q: ArrayLike,
        rows_ok: NDArray[np.bool_] | None = None,
    ) -> NDArray[np.float64]:
        """``t1 - AWC / S(Q)`` for hits of channel ``rows``; NaN for rows not usable (or not
        ``rows_ok``) and for hits with a NaN charge."""
        ok = self.usable if rows_ok is None else self.usable & rows_ok
        awc = np.where(ok, self.awc, np.nan)[rows]
        s = grouped_interp(rows, np.asarray(q, dtype=np.float64), self.lut_q, self.lut_s)
        return np.asarray(np.asarray(t1, dtype=np.float64) - awc / s)


# ------------------------------------------------------------------------------------------------
# the accumulators (online and offline)


def _channel_lookup(numbers: NDArray[Any], values: NDArray[Any], fill: Any) -> NDArray[Any]:
    """An array indexed by channel number (0 .. 65535) holding ``values``; ``fill`` elsewhere."""
    out = np.full(max(int(numbers.max()) + 1 if numbers.size else 0, 65536), fill)
    out[numbers.astype(np.intp)] = values
    return out


def check_lsb(lsb_uA: Any) -> None:
    """The DAC step must be known: it comes from the run (its DAC), never from a literal."""
    lsb = float(lsb_uA)
    if np.isnan(lsb):
        raise AnalysisError(
            "the threshold DAC step lsb_uA is not known (the run records no DAC); "
            "give it as a parameter (lsb_uA)"
        )
    if not 0 < lsb < float("inf"):
        raise ValueError(f"lsb_uA must be a positive number, got {lsb_uA!r}")


class AwcAccumulator(StepAccumulator):
    """The ``awc`` method: running sums of an ``awc_calibration`` run and the AWC constants.

    Every completed step with the laser on is folded into one record per channel
    (:class:`AwcSums`); steps with ``laser == 0`` (the baseline noise scan) and steps without an
    intensity or thresholds are ignored, and so are the hits of channels whose bar was not the
    lit one (``bar`` axis) or that are not in the channel table. :meth:`fit` gives the
    :data:`AWC_DTYPE` table (rows in channel-table order); :attr:`last_fit` keeps the full
    :class:`AwcFit` (points and trim) of the last call.

    Parameters (floats; see :func:`fit_awc` for their meaning): ``thr1_op`` (NaN: the scan's
    fixed thr1), ``thr2_op`` (NaN: thr1 + ``thr_gap_uA``, snapped to the nearest thr2 the scan has
    within half an LSB), ``lsb_uA``, ``thr_gap_uA``, ``edge_window_uA`` (NaN: no window),
    ``min_hits_per_step``, ``min_hits_per_bin``, ``min_t2_efficiency``, ``min_intensities``,
    ``agree_p_value``, ``qdc_max``, ``n_lut_bins`` and ``trim_on_slope_b`` (1: trim on the
    paper's ``b`` instead of the log-log slope).
    """

    method: ClassVar[str] = "awc"
    defaults: ClassVar[Mapping[str, Any]] = {
        "thr1_op": float("nan"),
        "thr2_op": float("nan"),
        "lsb_uA": float("nan"),  # the run's DAC step: the caller gives it
        "thr_gap_uA": 4.0,
        "edge_window_uA": 1.5,
        "min_hits_per_step": 50.0,
        "min_hits_per_bin": 20.0,
        "min_t2_efficiency": 0.99,
        "min_intensities": 3.0,
        "agree_p_value": 0.01,
        "qdc_max": 1023.0,
        "n_lut_bins": float(AWC_LUT_SIZE),
        "trim_on_slope_b": 0.0,
    }
    json_keys: ClassVar[Mapping[str, str]] = {
        "awc_uA": "awc_uA",
        "t0_ns": "t0_ns",
        "awc_trimmed_uA": "awc_trimmed_uA",
        "slope_a": "slope_a",
        "slope_b": "slope_b",
        "slope_lut_q": "slope_lut_q",
        "slope_lut_s": "slope_lut_s",
    }
    required_axes: ClassVar[tuple[str, ...]] = ("intensity", "thr1", "thr2")

    def __init__(self, channels: NDArray[Any], axes: Sequence[str], **params: Any) -> None:
        super().__init__(channels, axes, **params)
        missing = [a for a in self.required_axes if a not in self.axes]
        if missing:
            raise AnalysisError(
                f"the {self.method} method needs the scan axes {list(self.required_axes)}; the run"
                f" has {self.axes or 'none'} (missing {', '.join(missing)})"
            )
        p = self.params
        n_lut = int(round(float(p["n_lut_bins"])))
        if not 2 <= n_lut <= AWC_LUT_SIZE:
            raise ValueError(f"n_lut_bins must be 2..{AWC_LUT_SIZE}, got {p['n_lut_bins']}")
        check_lsb(p["lsb_uA"])
        order = np.argsort(self.channels["channel"], kind="stable")
        self._numbers = self.channels["channel"][order].astype(np.int64)
        self._row = _channel_lookup(self._numbers, np.arange(self._numbers.size), -1)
        self._bar: NDArray[Any] | None = None
        if "bar" in self.axes and "bar" in (self.channels.dtype.names or ()):
            self._bar = self.channels["bar"][order].astype(np.float64)
        self._has_laser = "laser" in self.axes
        self._thr1_op = self._optional("thr1_op")
        self._thr2_op = self._optional("thr2_op")
        self._sums = AwcSums(self._numbers.size, qdc_max=float(p["qdc_max"]))
        self.n_ignored_steps = 0
        self.last_fit: AwcFit | None = None
        # The noise-scan steps (laser off) give each channel's baseline, kept with the constants.
        self._baselines: ScurveAccumulator | None = None
        if self._has_laser and "thr_code" in self.axes:
            self._baselines = ScurveAccumulator(self.channels, self.axes)

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: NDArray[Any]) -> None:
        if self._has_laser and not row["laser"] > 0:
            if self._baselines is not None:
                self._baselines.reduce_step(step, row, hits)
            self.n_ignored_steps += 1
            return
        intensity, thr1, thr2 = float(row["intensity"]), float(row["thr1"]), float(row["thr2"])
        if not (np.isfinite(intensity) and np.isfinite(thr1) and np.isfinite(thr2)):
            self.n_ignored_steps += 1
            return
        rows = self._row[hits["channel"]]  # -1 for channels missing from the table
        wanted = None
        if self._bar is not None:
            bar = float(row["bar"])
            if np.isfinite(bar):
                wanted = self._bar == bar
        self._sums.add_step(
            intensity,
            thr1,
            thr2,
            rows,
            hits["t1"],
            hits["t2"],
            hits["q"],
            rows_wanted=wanted,
            charge_sums=is_charge_step(
                thr1,
                thr2,
                thr1_op_uA=self._thr1_op,
                thr2_op_uA=self._thr2_op,
                thr_gap_uA=float(self.params["thr_gap_uA"]),
                lsb_uA=float(self.params["lsb_uA"]),
            ),
        )

    @property
    def sums(self) -> AwcSums:
        """The running sums (one record per channel and laser step)."""
        return self._sums

    def _optional(self, name: str) -> float | None:
        value = float(self.params[name])
        return value if np.isfinite(value) else None

    def fit(self) -> NDArray[Any]:
        """The :data:`AWC_DTYPE` constants from the steps so far (one row per channel)."""
        p = self.params
        optional = self._optional
        self.last_fit = self._sums.fit(
            channels=self._numbers,
            thr1_op_uA=optional("thr1_op"),
            thr2_op_uA=optional("thr2_op"),
            thr_gap_uA=float(p["thr_gap_uA"]),
            lsb_uA=float(p["lsb_uA"]),
            n_lut_bins=int(round(float(p["n_lut_bins"]))),
            min_hits_per_step=int(round(float(p["min_hits_per_step"]))),
            min_hits_per_bin=int(round(float(p["min_hits_per_bin"]))),
            min_t2_efficiency=float(p["min_t2_efficiency"]),
            min_intensities=int(round(float(p["min_intensities"]))),
            edge_window_uA=optional("edge_window_uA"),
            agree_p_value=float(p["agree_p_value"]),
            trim_predictor="slope_b" if float(p["trim_on_slope_b"]) else "slope_loglog",
        )
        constants = self.last_fit.constants
        if self._baselines is not None and self._baselines.n_codes:
            scurve = self._baselines.fit()
            row_of = {int(c): k for k, c in enumerate(scurve["channel"])}
            rows = [row_of.get(int(c), -1) for c in constants["channel"]]
            values = np.where(
                np.asarray(rows) >= 0, scurve["baseline_code"][np.maximum(rows, 0)], np.nan
            )
            constants["baseline_code"] = values
        return constants

    def attrs(self) -> dict[str, Any]:
        """Parameters, the trim and the step counts, for ``/analysis/awc``."""
        if self.last_fit is None:
            self.fit()
        fit = self.last_fit
        assert fit is not None
        out: dict[str, Any] = dict(fit.attrs())
        out["n_steps"] = self.n_steps
        out["n_steps_ignored"] = self.n_ignored_steps
        return out


class AwcValidationAccumulator(StepAccumulator):
    """The ``awc_validation`` method: the walk left after applying constants of an earlier run.

    Every laser step (``laser == 0`` steps are ignored) is corrected hit by hit at its end,
    ``t_corr = t1 - AWC / S(Q)`` (:class:`AwcCorrection`), and folded into sums per (channel,
    charge bin): counts, sums and sums of squares of ``t_corr`` and of ``t1``, and the sum of
    ``Q``. The charge bins are fixed per channel before any data, from the constants:
    ``n_q_bins`` log-spaced bins over the useful range, from the mean charge of the lowest to
    that of the highest intensity the slope table was fitted to (``lut_fit_q_min`` ..
    ``lut_fit_q_max``; beyond them the table extrapolates its curve), narrowed by the factor
    ``q_margin`` at both ends. Saturated charges lie above it. :meth:`fit` gives, per channel
    (:data:`AWC_VALIDATION_DTYPE`), ``residual_walk_ns``: max - min of the mean corrected time
    over the bins with at least ``min_hits_per_bin`` hits, with its error and the chi2 of
    flatness; ``walk_ns``, the same for the uncorrected t1 over the same bins; and
    ``walk_range_ns``, the uncorrected walk across all the run's steps.

    The bins are in measured charge, so the run should spread the amplitudes smoothly over a
    range wider than the judged one (many laser intensities): a bin that only holds the tail of
    one intensity's charge cluster sees amplitudes pulled towards the cluster's centre by the
    QDC resolution (regression dilution), and a walk of a few ps that the correction did not
    leave.

    Parameters: ``constants`` (an :data:`AWC_DTYPE` table; ``None``: every channel is flagged
    ``no_constants``), ``n_q_bins`` (default 10, at most 16), ``min_hits_per_bin`` (100),
    ``q_margin`` (1.0), ``use_trimmed`` (1: apply ``awc_trimmed_uA`` instead of ``awc_uA``),
    ``lsb_uA`` (a step's thresholds must match the constants' within half of it, else its hits
    are left out and the channel flagged ``thresholds_differ``), ``qdc_max``, and
    ``saturated_fraction`` (flag ``saturated_charge`` above this share of saturated hits).

    Flags: ``no_constants`` (no value), ``thresholds_differ`` (steps left out; no value if all
    were), ``too_few_hits`` (no value: fewer than two bins filled), ``nan_times`` and
    ``saturated_charge`` (hits left out; the value stands).
    """

    method: ClassVar[str] = "awc_validation"
    defaults: ClassVar[Mapping[str, Any]] = {
        "constants": None,
        "n_q_bins": 10.0,
        "min_hits_per_bin": 100.0,
        "q_margin": 1.0,
        "use_trimmed": 0.0,
        "lsb_uA": float("nan"),  # the run's DAC step: the caller gives it
        "qdc_max": 1023.0,
        "saturated_fraction": 0.01,
    }
    json_keys: ClassVar[Mapping[str, str]] = {
        "residual_walk_ns": "residual_walk_ns",
        "walk_ns": "walk_ns",
    }

    def __init__(self, channels: NDArray[Any], axes: Sequence[str], **params: Any) -> None:
        super().__init__(channels, axes, **params)
        p = self.params
        self.n_bins = int(round(float(p["n_q_bins"])))
        if not 2 <= self.n_bins <= AWC_LUT_SIZE:
            raise ValueError(f"n_q_bins must be 2..{AWC_LUT_SIZE}, got {p['n_q_bins']}")
        if not float(p["q_margin"]) >= 1.0:
            raise ValueError(f"q_margin must be >= 1, got {p['q_margin']}")
        order = np.argsort(self.channels["channel"], kind="stable")
        self._numbers = self.channels["channel"][order].astype(np.int64)
        n_ch = self._numbers.size
        self._row = _channel_lookup(self._numbers, np.arange(n_ch), -1)
        self._has_thr = "thr1" in self.axes and "thr2" in self.axes
        self._has_laser = "laser" in self.axes
        self.have_constants = p["constants"] is not None
        self._corr: AwcCorrection | None = None
        self._log_lo = np.full(n_ch, np.nan)
        self._log_step = np.full(n_ch, np.nan)
        if self.have_constants:
            check_lsb(p["lsb_uA"])
            self._corr = AwcCorrection(
                np.asarray(p["constants"]),
                self._numbers,
                use_trimmed=bool(float(p["use_trimmed"])),
                lsb_uA=float(p["lsb_uA"]),
            )
            # the useful range: between the charges of the lowest and highest intensity the
            # table was fitted to (beyond, it is an extrapolation of the curve), else its nodes
            known = np.isfinite(self._corr.fit_q_min) & np.isfinite(self._corr.fit_q_max)
            lo = np.where(known, self._corr.fit_q_min, self._corr.q_lo)
            hi = np.where(known, self._corr.fit_q_max, self._corr.q_hi)
            margin = float(p["q_margin"])
            with np.errstate(invalid="ignore", divide="ignore"):
                log_lo = np.log(lo * margin)
                log_hi = np.log(hi / margin)
                fixed = self._corr.usable & (log_hi > log_lo)
            self._log_lo = np.where(fixed, log_lo, np.nan)
            self._log_step = np.where(fixed, (log_hi - log_lo) / self.n_bins, np.nan)
        self._usable = np.isfinite(self._log_step)
        n_groups = n_ch * self.n_bins
        self._n = np.zeros(n_groups)
        self._sums = np.zeros((5, n_groups))  # t_corr, t_corr**2, t1, t1**2 (about the shift), Q
        self._shift = np.full(n_ch, np.nan)  # per channel: the first corrected time seen
        self._counts = np.zeros((5, n_ch))  # hits, in range, saturated, bad, other thresholds
        self._step_t1 = np.array([np.full(n_ch, np.inf), np.full(n_ch, -np.inf)])  # min, max

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: NDArray[Any]) -> None:
        if self._has_laser and not row["laser"] > 0:
            return
        rows = self._row[hits["channel"]]
        if hits.size and rows.min() < 0:  # channels missing from the table: left out
            hits = hits[rows >= 0]
            rows = rows[rows >= 0]
        n_ch = self._numbers.size
        counts = np.bincount(rows, minlength=n_ch).astype(np.float64)
        self._counts[0] += counts
        t1 = hits["t1"].astype(np.float64)
        q = hits["q"].astype(np.float64)
        bad = ~(np.isfinite(t1) & np.isfinite(q))
        self._counts[3] += np.bincount(rows, weights=bad, minlength=n_ch)
        with np.errstate(invalid="ignore"):
            sat = q >= float(self.params["qdc_max"])
        self._counts[2] += np.bincount(rows, weights=sat, minlength=n_ch)
        # the step's mean t1 per channel, for the walk across the whole run
        fine = ~bad
        n_t1 = np.bincount(rows[fine], minlength=n_ch)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_t1 = np.bincount(rows[fine], weights=t1[fine], minlength=n_ch) / n_t1
        enough = n_t1 >= max(float(self.params["min_hits_per_bin"]), 2.0)
        self._step_t1[0] = np.where(enough, np.minimum(self._step_t1[0], mean_t1), self._step_t1[0])
        self._step_t1[1] = np.where(enough, np.maximum(self._step_t1[1], mean_t1), self._step_t1[1])
        if self._corr is None:
            return
        if self._has_thr:
            matching = self._corr.matching(float(row["thr1"]), float(row["thr2"]))
            self._counts[4] += np.where(self._usable & ~matching, counts, 0.0)
        else:
            matching = self._corr.usable
        t_corr = self._corr.correct(rows, t1, q, matching & self._usable)
        with np.errstate(invalid="ignore", divide="ignore"):
            pos = (np.log(q) - self._log_lo[rows]) / self._log_step[rows]
            good = np.isfinite(t_corr) & (pos >= 0) & (pos < self.n_bins) & ~sat
        rows, pos, t_corr, t1, q = rows[good], pos[good], t_corr[good], t1[good], q[good]
        if rows.size == 0:
            return
        self._counts[1] += np.bincount(rows, minlength=n_ch)
        # sums about a fixed per-channel shift (the first corrected time of the channel), so
        # that the variance of times of tens of ns with ps spreads does not cancel
        new = ~np.isfinite(self._shift[rows])
        if new.any():
            first_rows, first = np.unique(rows[new], return_index=True)
            self._shift[first_rows] = t_corr[new][first]
        g = rows * self.n_bins + pos.astype(np.intp)
        n_groups = self._n.size
        dc = t_corr - self._shift[rows]
        d1 = t1 - self._shift[rows]
        self._n += np.bincount(g, minlength=n_groups)
        for i, w in enumerate((dc, dc * dc, d1, d1 * d1, q)):
            self._sums[i] += np.bincount(g, weights=w, minlength=n_groups)

    def fit(self) -> NDArray[Any]:
        """Residual and raw walk per channel from the steps so far."""
        n_ch = self._numbers.size
        nb = self.n_bins
        shape = (n_ch, nb)
        shift = np.repeat(np.where(np.isfinite(self._shift), self._shift, 0.0), nb)
        tc = stats_from_sums(self._n, self._sums[0], self._sums[1], shift=shift)
        raw = stats_from_sums(self._n, self._sums[2], self._sums[3], shift=shift)
        n = self._n.reshape(shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            q_mean = (self._sums[4] / self._n).reshape(shape)
        good = n >= max(float(self.params["min_hits_per_bin"]), 2.0)
        mean_c, err_c = tc.mean.reshape(shape), tc.sem.reshape(shape)
        mean_r, err_r = raw.mean.reshape(shape), raw.sem.reshape(shape)
        good &= np.isfinite(mean_c) & np.isfinite(err_c) & (err_c > 0)
        spread, spread_err, chi2, n_good = _flatness(mean_c, err_c, good)
        walk, walk_err, _, _ = _flatness(mean_r, err_r, good)

        out = np.zeros(n_ch, dtype=AWC_VALIDATION_DTYPE)
        out["channel"] = self._numbers
        out["residual_walk_ns"] = spread
        out["residual_walk_err_ns"] = spread_err
        out["walk_ns"] = walk
        out["walk_err_ns"] = walk_err
        with np.errstate(invalid="ignore"):
            walk_range = self._step_t1[1] - self._step_t1[0]
        out["walk_range_ns"] = np.where(np.isfinite(walk_range), walk_range, np.nan)
        out["chi2_flat"] = chi2
        out["ndf"] = np.maximum(n_good - 1, 0)
        out["n_bins_used"] = n_good
        out["q_lo"] = np.exp(self._log_lo)
        out["q_hi"] = np.exp(self._log_lo + nb * self._log_step)
        pad = ((0, 0), (0, AWC_LUT_SIZE - nb))

        def padded(a: NDArray[Any]) -> NDArray[Any]:
            return np.pad(a, pad, constant_values=np.nan)

        out["q_bin"] = padded(np.where(n > 0, q_mean, np.nan))
        out["t_corr_bin_ns"] = padded(np.where(good, mean_c, np.nan))
        out["t_corr_bin_ns_err"] = padded(np.where(good, err_c, np.nan))
        out["t1_bin_ns"] = padded(np.where(good, mean_r, np.nan))
        out["n_bin"] = np.pad(n, pad)
        hits, in_range, sat, bad, other = self._counts
        out["n_hits"] = hits
        out["n_in_range"] = in_range
        out["n_saturated"] = sat
        out["n_bad"] = bad
        out["n_other_thresholds"] = other

        flags: list[list[str]] = [[] for _ in range(n_ch)]
        for i in range(n_ch):
            if not self._usable[i]:
                flags[i].append(NO_CONSTANTS)
                continue
            if other[i] > 0:
                flags[i].append(THRESHOLDS_DIFFER)
            if n_good[i] < 2:
                flags[i].append(TOO_FEW_BINNED)
            if bad[i] > 0:
                flags[i].append(NAN_TIMES)
            if hits[i] > 0 and sat[i] > float(self.params["saturated_fraction"]) * hits[i]:
                flags[i].append(SATURATED)
        out["flag"] = ["|".join(f) for f in flags]
        for name in ("residual_walk_ns", "residual_walk_err_ns", "walk_ns", "walk_err_ns"):
            out[name][~self._usable] = np.nan
        return out

    def attrs(self) -> dict[str, Any]:
        """The parameters (without the constants table) for ``/analysis/awc_validation``."""
        out: dict[str, Any] = {
            f"param_{k}": float(v) for k, v in self.params.items() if k != "constants"
        }
        out["have_constants"] = bool(self.have_constants)
        out["n_steps"] = self.n_steps
        return out
