"""Amplitude walk correction with dual thresholds (AWC), design section 4.2.

In operation every TOFHIR2 hit has ``t1`` at the operating threshold thr1, ``t2`` at thr2 and a
charge ``Q``. Walk is linear in the inverse dual-threshold slope ``S = (thr2 - thr1) / (t2 - t1)``::

    t1 = t0 + AWC / S            so            t_corr = t1 - AWC / S(Q)

with ``S(Q)`` the mean slope at charge ``Q`` from a lookup table (the per-event slope is too noisy).

The calibration scan keeps thr1 at its operating value and, for each laser intensity k, steps thr2
over a range. :func:`fit_awc` reduces it in four stages, all batched over channels:

1. Per (channel, step): count, mean and variance of ``t2 - t1`` and the mean ``t1``, with
   ``np.bincount`` over the hit columns (the only pass over the hits, plus one selection of the
   hits at the operating thresholds).
2. Per (channel, intensity): the mean leading edge ``t(thr) = c0 + c1 thr + c2 thr**2``, fitted
   to the step means ``<t1>_k + <t2 - t1>_s`` against thr2 (by default only the steps within
   1.5 uA of the operating pair). This is the mean t2 crossing time; taking it through ``t2 - t1``
   of the same pulses removes the photostatistics and laser jitter the two crossings share, so the
   edge is several times more precise than from raw t2 means. From the edge, ``T_k = t(thr1_op)``
   and the *secant* slope ``S_k = (thr2_op - thr1_op) / (t(thr2_op) - t(thr1_op))``: the same
   slope definition the correction uses. (The derivative ``1 / t'(thr1)`` is a different
   quantity when the gap is 4 uA; mixing the two leaves about 100 ps of walk.)
3. Per channel, from the hits at the operating pair (thr2 = thr2_op): equal-count charge bins with
   ``(thr2 - thr1) / mean(t2 - t1)`` in each (a ratio of means: the mean of per-event ratios is
   biased by the jitter) and the line ``S = a + b Q`` through them (for the trim); and the table
   the correction interpolates: one point per intensity (the whole cluster of charges the laser
   made), averaged with the edge secant ``S_k`` of that intensity, joined by a power law in
   ``S(Q)`` and stored on log-spaced nodes (:func:`_smooth_table` says why not the bins).
   Then the straight line ``T_k = t0 + AWC x_k``, twice: on the edge secants ``x_k = 1 / S_k``
   and on the table, ``x_k = <1 / S(Q)>`` over the intensity's hits, which is exactly what the
   correction subtracts there on average. ``awc_uA`` comes from the edge line unless the edge
   secants and the hits at the operating pair disagree beyond their errors
   (``slope_agreement_p``); then from the table line, so that the AWC is defined on the slope
   the correction uses (``awc_slope_source``).
4. Across channels: the trim, a line ``AWC = alpha + beta * b`` (the paper's eq. 5.1-5.2).

:func:`correct_times` applies the constants to hits, :func:`residual_walk` measures what is left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import chi2 as chi2_dist

from teststand.analysis._grouping import (
    batched_gls,
    batched_polyfit,
    batched_polyval,
    grouped_interp,
    grouped_stats,
    pad_groups,
    quantile_bin_index,
    stats_from_sums,
)
from teststand.errors import AnalysisError

__all__ = [
    "AWC_DTYPE",
    "AWC_LUT_SIZE",
    "AWC_POINT_DTYPE",
    "RESIDUAL_WALK_DTYPE",
    "AwcFit",
    "AwcTrim",
    "correct_times",
    "fit_awc",
    "residual_walk",
]

#: Number of charge bins stored per channel in the slope lookup table (NaN padded).
AWC_LUT_SIZE = 16

#: TOFHIR2 threshold DAC step, uA.
TOFHIR_LSB_UA = 0.3125

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
        # the table the correction interpolates linearly: nodes (QDC counts) and slope (uA/ns)
        ("slope_lut_q", "<f8", (AWC_LUT_SIZE,)),
        ("slope_lut_s", "<f8", (AWC_LUT_SIZE,)),
        ("slope_lut_s_err", "<f8", (AWC_LUT_SIZE,)),
        # the measured charge bins behind it: mean charge, ratio-of-means slope, hits with t2
        ("slope_bin_q", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_s", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_s_err", "<f8", (AWC_LUT_SIZE,)),
        ("slope_bin_n", "<u4", (AWC_LUT_SIZE,)),
        ("thr1_op_uA", "<f8"),  # operating threshold pair the constants belong to
        ("thr2_op_uA", "<f8"),
        ("n_hits", "<u8"),
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
        ("n_hits", "<u8"),  # hits with t2 in those steps
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

#: Flatness of corrected times versus charge, one row per channel.
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

# Channel flags. Those marked "no value" leave the affected numbers NaN.
NO_HITS = "no_hits"  # no value: no hit with both crossings
NO_OPERATING_STEP = "no_operating_step"  # no value: no step at (thr1_op, thr2_op)
NO_SLOPE_TABLE = "no_slope_table"  # no value: the slope table has fewer than 2 nodes
TOO_FEW_INTENSITIES = "too_few_intensities"  # no value: fewer usable intensities than needed
SLOPES_DISAGREE = "slopes_disagree"  # warning: S_k and S(Q_k) differ; AWC from the table
NO_TRIM = "no_trim"  # awc_trimmed NaN: channel not in the trim fit or trim impossible

# Point flags.
FEW_STEPS = "few_steps"  # fewer than 4 usable thr2 steps for the quadratic
NOT_COVERED = "not_covered"  # the usable thr2 steps do not span thr1_op..thr2_op
NO_SLOPE = "no_slope"  # the edge gives no positive slope between the operating thresholds


class AwcTrim(NamedTuple):
    """The across-channel trim ``AWC = intercept + slope * predictor``.

    ``predictor`` names the per-channel quantity (``slope_b``: ``b`` of ``S = a + b Q``, as in the
    paper; ``elasticity``: ``b <Q> / S(<Q>)``, which does not depend on gain and QDC scale).
    Spreads are standard deviations across the channels in the fit: of the AWC, and of its
    residuals about the trim line.
    """

    predictor: str
    intercept: float
    slope: float
    awc_spread_before_uA: float
    awc_spread_after_uA: float
    n_channels: int


@dataclass(frozen=True)
class AwcFit:
    """What :func:`fit_awc` returns.

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
    lsb_uA: float = TOFHIR_LSB_UA,
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
    trim_predictor: Literal["slope_b", "elasticity"] = "slope_b",
    slope_table: Literal["auto", "power_law", "log_quadratic", "bins"] = "auto",
    awc_source: Literal["auto", "edge", "lut"] = "auto",
    table_uses_edges: bool = True,
) -> AwcFit:
    """Calibrate the dual-threshold amplitude walk correction from a thr2 scan.

    Hit columns (one entry per hit; run-file ``/hits`` columns plus the step of each hit):

    Args:
        channel: channel number (``0 .. n_channels - 1``).
        t1, t2: threshold crossing times, ns (t2 NaN when the pulse did not reach thr2).
        q: charge, QDC counts.
        step: row of the step table the hit belongs to.
        intensity: laser intensity of every step (any unit; equal values are one intensity).
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
        n_lut_bins: charge bins of the slope table (at most :data:`AWC_LUT_SIZE`).
        min_hits_per_step: a (channel, step) with fewer hits with t2 is left out of the edge fit.
        min_hits_per_bin: a table bin with fewer hits with t2 gets no slope.
        min_t2_efficiency: steps and table bins where fewer of the hits have a t2 are left out:
            the pulses that miss thr2 are the small ones, so the survivors' mean time is biased.
        min_intensities: points needed on a channel's AWC line.
        edge_window_uA: when set, the edge fit only uses thr2 steps within this distance of the
            operating interval (the quadratic then only has to describe the edge there).
        agree_p_value: below this chi2 probability the edge slopes ``S_k`` and the ratio of means
            of the hits at the operating pair disagree (flag ``slopes_disagree``; with
            ``awc_source="auto"`` the AWC is then taken from the table line).
        qdc_max: charges at or above this (QDC saturation) stay out of the slope table.
        trim_predictor: the per-channel quantity the trim regresses the AWC on.
        slope_table: what the correction interpolates. ``"power_law"``: a line in ``ln S``
            versus ``ln Q`` through the intensities' points, tabulated on log-spaced nodes;
            ``"log_quadratic"``: the same with a quadratic term (edges that do not scale, an
            offset between the T1 and T2 discriminators); ``"auto"`` (default): the quadratic
            term only where it is significant; ``"bins"``: the measured equal-count charge bins
            themselves (see :func:`_smooth_table` for why these serve the correction less well).
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
    if not 1 <= n_lut_bins <= AWC_LUT_SIZE:
        raise ValueError(f"n_lut_bins must be 1..{AWC_LUT_SIZE}, got {n_lut_bins}")
    ch = np.asarray(channel)
    st = np.asarray(step)
    if ch.dtype.kind not in "iu":
        ch = ch.astype(np.intp)
    if st.dtype.kind not in "iu":
        st = st.astype(np.intp)
    # t1 is read twice (difference and sums): one contiguous copy of a record-array view pays off
    t1_a = np.ascontiguousarray(t1, dtype=np.float64)
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
    if n_hits and n_channels is not None and int(ch.max()) >= n_ch:
        raise ValueError(f"channel numbers must lie in 0..{n_ch - 1}")
    thr1 = _per_channel_steps(thr1_uA, n_steps, n_ch, "thr1_uA")
    thr2 = _per_channel_steps(thr2_uA, n_steps, n_ch, "thr2_uA")
    tol = 0.5 * lsb_uA * (1 + 1e-6)

    # ---- stage 1: one pass over the hits, grouped by (channel, step) --------------------------
    acc = _accumulate_steps(ch, st, t1_a, t2_a, n_ch, n_steps)
    n_t2 = acc.n_t2.reshape(n_ch, n_steps)
    n_all = n_t2 + acc.n_no_t2.reshape(n_ch, n_steps)
    step_stats = stats_from_sums(
        n_t2, acc.sum_d.reshape(n_ch, n_steps), acc.sum_dd.reshape(n_ch, n_steps)
    )
    sum_t1 = acc.sum_t1.reshape(n_ch, n_steps)

    # ---- operating thresholds, realised per channel -------------------------------------------
    flags: list[list[str]] = [[] for _ in range(n_ch)]

    def flag(mask: NDArray[np.bool_], name: str) -> None:
        for i in np.flatnonzero(mask):
            flags[i].append(name)

    has_data = n_all > 0
    lit = np.ones((n_ch, n_steps), dtype=bool)
    if step_bar is not None and channel_bar is not None:
        sb = np.asarray(step_bar)
        cb = np.broadcast_to(np.asarray(channel_bar), (n_ch,))
        lit = cb[:, None] == sb[None, :]
    live = has_data & lit
    # the scan's fixed thr1 (realised, per channel), and the operating thr1 (the same by default)
    thr1_scan = _snap(thr1, live, _masked_median(thr1, live), tol)
    at_thr1 = live & (np.abs(thr1 - thr1_scan[:, None]) <= tol)
    thr1_req = _per_channel(thr1_op_uA, n_ch)
    thr1_op = thr1_scan if thr1_req is None else _snap(thr1, live, thr1_req, tol)
    thr2_req = _per_channel(thr2_op_uA, n_ch)
    if thr2_req is None:
        thr2_req = thr1_op + thr_gap_uA
    thr2_op = _snap(thr2, at_thr1, thr2_req, tol)
    # the hits at the operating pair itself: they make the slope table
    op_step = (
        at_thr1
        & (np.abs(thr1 - thr1_op[:, None]) <= tol)
        & (np.abs(thr2 - thr2_op[:, None]) <= tol)
    )
    gap = thr2_op - thr1_op

    n_hits_ch = n_all.sum(axis=1)
    flag(n_t2.sum(axis=1) == 0, NO_HITS)
    flag((n_t2.sum(axis=1) > 0) & ~op_step.any(axis=1), NO_OPERATING_STEP)

    # ---- intensities --------------------------------------------------------------------------
    levels, k_of_step = np.unique(intens, return_inverse=True)
    n_k = levels.size
    ck = np.arange(n_ch)[:, None] * n_k + k_of_step[None, :]  # (C, S) -> (channel, intensity)

    # ---- the hits at the operating thresholds -------------------------------------------------
    op_hits = _select_hits(acc.group, op_step.ravel())
    op_ch = ch[op_hits].astype(np.intp)
    op_k = k_of_step[st[op_hits]]
    op_ok = acc.d_ok[op_hits]
    # spread of t1 per (channel, intensity): the error of <t1>_k in T_k
    var_t1 = grouped_stats((op_ch * n_k + op_k)[op_ok], n_ch * n_k, t1_a[op_hits][op_ok]).var

    # ---- stage 2: mean edges per (channel, intensity) -----------------------------------------
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = n_t2 / n_all
    usable = (
        at_thr1
        & (n_t2 >= max(min_hits_per_step, 2))
        & (eff >= min_t2_efficiency)
        & np.isfinite(thr2)
        & np.isfinite(step_stats.var)
    )
    if edge_window_uA is not None:
        lo = np.minimum(thr1_op, thr2_op)[:, None] - edge_window_uA
        hi = np.maximum(thr1_op, thr2_op)[:, None] + edge_window_uA
        usable &= (thr2 >= lo) & (thr2 <= hi)
    edges = _fit_edges(
        usable,
        ck,
        n_ch * n_k,
        thr2,
        step_stats,
        sum_t1,
        n_t2,
        thr1_op,
        thr2_op,
        tol,
        var_t1,
    )

    # ---- stage 3a: the slope table ------------------------------------------------------------
    with np.errstate(invalid="ignore"):
        edge_d = (edges.inv_slope * np.repeat(gap, n_k)).reshape(n_ch, n_k)
        edge_d_var = (edges.var_inv_slope * np.repeat(gap, n_k) ** 2).reshape(n_ch, n_k)
    lut = _slope_table(
        op_ch,
        q_a[op_hits],
        acc.d[op_hits],
        op_ok,
        op_k,
        n_ch,
        n_k,
        gap,
        n_lut_bins,
        min_hits_per_bin,
        min_t2_efficiency,
        qdc_max,
        slope_table,
        edge_d if table_uses_edges else None,
        edge_d_var,
    )
    table_nodes = (np.isfinite(lut.s) & np.isfinite(lut.q)).sum(axis=1)
    flag(op_step.any(axis=1) & (table_nodes < 2), NO_SLOPE_TABLE)

    # ---- stage 3b: the AWC lines on both slope definitions ------------------------------------
    # the table's slope at intensity k is 1 / <1/S(Q)> over that intensity's hits: the mean
    # corrected time there is T_k - AWC <1/S(Q)>, so this is the x that makes the table consistent
    point_ch = np.repeat(np.arange(n_ch), n_k)
    q_k = lut.q_k.ravel()
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
        min_intensities,
    )
    fit_lut = _awc_line(
        t_k, var_t_k, lut.x_k, lut.x_k_cov, np.zeros_like(lut.x_k), use_lut, min_intensities
    )

    # do the two measurements of each intensity's slope agree: the edge secant S_k (all thr2
    # steps near the operating pair) and the ratio of means of the hits at the operating pair?
    s_edge = 1.0 / edges.inv_slope
    s_op = lut.s_op_k.ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        var_s_edge = edges.var_inv_slope * s_edge**4
        pull2 = (s_edge - s_op) ** 2 / (var_s_edge + lut.s_op_k_err.ravel() ** 2)
    both = (edges.valid & np.isfinite(pull2)).reshape(n_ch, n_k)
    chi2_agree = np.where(both, pull2.reshape(n_ch, n_k), 0.0).sum(axis=1)
    ndf_agree = both.sum(axis=1)
    p_agree = np.where(ndf_agree > 0, chi2_dist.sf(chi2_agree, np.maximum(ndf_agree, 1)), np.nan)
    if awc_source == "auto":
        take_lut = (p_agree < agree_p_value) & np.isfinite(fit_lut.awc)
    else:
        take_lut = np.full(n_ch, awc_source == "lut")
    # a channel whose edges give no line but whose table does: the table line is all there is
    take_lut |= ~np.isfinite(fit_edge.awc) & np.isfinite(fit_lut.awc)
    flag(p_agree < agree_p_value, SLOPES_DISAGREE)

    def pick(a: NDArray[Any], b: NDArray[Any]) -> NDArray[Any]:
        return np.where(take_lut, b, a)

    awc = pick(fit_edge.awc, fit_lut.awc)
    n_used = pick(fit_edge.n_points, fit_lut.n_points)
    no_line = ~np.isfinite(awc) & (n_t2.sum(axis=1) > 0)
    flag(no_line & (n_used < min_intensities), TOO_FEW_INTENSITIES)

    # ---- stage 4: trim across channels --------------------------------------------------------
    predictor = lut.line_b if trim_predictor == "slope_b" else lut.elasticity
    trim, awc_trimmed = _trim(awc, predictor, trim_predictor)
    flag(np.isfinite(awc) & ~np.isfinite(awc_trimmed), NO_TRIM)

    # ---- assemble -----------------------------------------------------------------------------
    out = np.zeros(n_ch, dtype=AWC_DTYPE)
    out["channel"] = np.arange(n_ch)
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
    pad = AWC_LUT_SIZE - n_lut_bins
    out["slope_lut_q"] = np.pad(lut.q, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_lut_s"] = np.pad(lut.s, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_lut_s_err"] = np.pad(lut.s_err, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_bin_q"] = np.pad(lut.bin_q, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_bin_s"] = np.pad(lut.bin_s, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_bin_s_err"] = np.pad(lut.bin_s_err, ((0, 0), (0, pad)), constant_values=np.nan)
    out["slope_bin_n"] = np.pad(lut.bin_n, ((0, 0), (0, pad)))
    out["thr1_op_uA"] = thr1_op
    out["thr2_op_uA"] = thr2_op
    out["n_hits"] = n_hits_ch
    out["flag"] = ["|".join(f) for f in flags]

    points = np.zeros(n_ch * n_k, dtype=AWC_POINT_DTYPE)
    points["channel"] = point_ch
    points["intensity"] = np.tile(levels, n_ch)
    points["q_mean"] = q_k
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
    points = points[edges.n_hits > 0]

    parameters: dict[str, float | int | str] = {
        "thr_gap_uA": thr_gap_uA,
        "lsb_uA": lsb_uA,
        "n_lut_bins": n_lut_bins,
        "min_hits_per_step": min_hits_per_step,
        "min_hits_per_bin": min_hits_per_bin,
        "min_t2_efficiency": min_t2_efficiency,
        "min_intensities": min_intensities,
        "edge_window_uA": float("nan") if edge_window_uA is None else edge_window_uA,
        "agree_p_value": agree_p_value,
        "qdc_max": qdc_max,
        "trim_predictor": trim_predictor,
        "slope_table": slope_table,
        "awc_source": awc_source,
        "table_uses_edges": int(table_uses_edges),
    }
    return AwcFit(out, points, trim, parameters)


# ------------------------------------------------------------------------------------------------
# stage 1: the pass over the hits


class _StepSums(NamedTuple):
    """Sums per (channel, step) group, flat ``(n_channels * n_steps,)``, and per-hit arrays kept."""

    n_t2: NDArray[np.int64]
    n_no_t2: NDArray[np.int64]
    sum_d: NDArray[np.float64]
    sum_dd: NDArray[np.float64]
    sum_t1: NDArray[np.float64]
    group: NDArray[np.intp]  # per hit: group, or group + G for a hit without t2
    d: NDArray[np.float64]  # per hit: t2 - t1, 0 without t2
    d_ok: NDArray[np.bool_]  # per hit: has t2


def _accumulate_steps(
    ch: NDArray[Any],
    st: NDArray[Any],
    t1: NDArray[np.float64],
    t2: NDArray[np.float64],
    n_ch: int,
    n_steps: int,
) -> _StepSums:
    """Counts and sums of ``d = t2 - t1`` and ``t1`` per (channel, step).

    Hits without t2 are sent to a second copy of the group range (group + G) instead of being
    filtered out, so one ``bincount`` counts both kinds and no boolean compaction is needed.
    """
    n_groups = n_ch * n_steps
    group = np.multiply(ch, n_steps, dtype=np.intp)
    group += st
    d = np.subtract(t2, t1)
    d_ok = d == d  # False for NaN
    no_t2 = ~d_ok
    np.add(group, n_groups, out=group, where=no_t2)
    np.copyto(d, 0.0, where=no_t2)

    counts = np.bincount(group, minlength=2 * n_groups)
    sum_d = np.bincount(group, weights=d, minlength=2 * n_groups)[:n_groups]
    sum_dd = np.bincount(group, weights=d * d, minlength=2 * n_groups)[:n_groups]
    sum_t1 = np.bincount(group, weights=t1, minlength=2 * n_groups)[:n_groups]
    return _StepSums(counts[:n_groups], counts[n_groups:], sum_d, sum_dd, sum_t1, group, d, d_ok)


def _select_hits(group: NDArray[np.intp], selected_groups: NDArray[np.bool_]) -> NDArray[np.intp]:
    """Indices of the hits (with or without t2) whose (channel, step) group is selected."""
    if not selected_groups.any():
        return np.zeros(0, dtype=np.intp)
    both = np.concatenate([selected_groups, selected_groups])
    return np.flatnonzero(both[group])


def _masked_median(values: NDArray[np.float64], mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Median of every row over the masked entries (NaN for an empty row)."""
    keep = mask & np.isfinite(values)
    v = np.sort(np.where(keep, values, np.inf), axis=1)  # the masked-out sort last
    n = keep.sum(axis=1)
    rows = np.arange(values.shape[0])
    lo = v[rows, np.maximum((n - 1) // 2, 0)] if values.shape[1] else np.full(n.size, np.nan)
    hi = v[rows, np.maximum(n // 2, 0)] if values.shape[1] else lo
    return np.where(n > 0, 0.5 * (lo + hi), np.nan)


def _snap(
    thr: NDArray[np.float64], mask: NDArray[np.bool_], wanted: NDArray[np.float64], tol: float
) -> NDArray[np.float64]:
    """Per channel, the realised step threshold nearest to ``wanted`` if within ``tol``, else it."""
    dist = np.where(mask & np.isfinite(thr), np.abs(thr - wanted[:, None]), np.inf)
    j = np.argmin(dist, axis=1) if thr.shape[1] else np.zeros(thr.shape[0], dtype=np.intp)
    rows = np.arange(thr.shape[0])
    close = dist[rows, j] <= tol if thr.shape[1] else np.zeros(thr.shape[0], dtype=bool)
    realised = thr[rows, j] if thr.shape[1] else wanted
    return np.where(close, realised, wanted)


# ------------------------------------------------------------------------------------------------
# stage 3a: slope table


class _SlopeTable(NamedTuple):
    bin_q: NDArray[np.float64]  # (C, B) measured bins: mean charge
    bin_s: NDArray[np.float64]  # (C, B) ratio-of-means slope, NaN where not measured
    bin_s_err: NDArray[np.float64]
    bin_n: NDArray[np.int64]
    q: NDArray[np.float64]  # (C, B) the table the correction interpolates
    s: NDArray[np.float64]
    s_err: NDArray[np.float64]
    n_bins_ok: NDArray[np.int64]  # (C,) measured bins with a slope
    line_a: NDArray[np.float64]  # (C,)
    line_b: NDArray[np.float64]
    elasticity: NDArray[np.float64]
    x_k: NDArray[np.float64]  # (C, K) mean 1/S_table(Q) over the hits of intensity k, ns/uA
    x_k_cov: NDArray[np.float64]  # (C, K, K) covariance of x_k through the table's fit
    q_k: NDArray[np.float64]  # (C, K) mean charge per intensity at the operating thresholds
    s_op_k: NDArray[np.float64]  # (C, K) ratio-of-means slope of the intensity's hits
    s_op_k_err: NDArray[np.float64]


def _slope_table(
    c: NDArray[np.intp],
    q: NDArray[Any],
    d: NDArray[np.float64],
    d_ok: NDArray[np.bool_],
    k: NDArray[np.intp],
    n_ch: int,
    n_k: int,
    gap: NDArray[np.float64],
    n_bins: int,
    min_hits: int,
    min_eff: float,
    qdc_max: float,
    kind: str,
    edge_d: NDArray[np.float64] | None,
    edge_d_var: NDArray[np.float64],
) -> _SlopeTable:
    """Slope versus charge from the hits at the operating thresholds."""
    qf = q.astype(np.float64)
    in_range = np.isfinite(qf) & (qf < qdc_max)

    # measured bins: equal-count charge bins over all intensities pooled, ratio of means in each
    b = quantile_bin_index(c, np.where(in_range, qf, np.nan), n_ch, n_bins, method="histogram")
    n_groups = n_ch * n_bins
    g = np.where(b >= 0, c * n_bins + b, n_groups)  # overflow group: saturated or NaN charge
    ok = d_ok & (b >= 0)
    n_all = np.bincount(g, minlength=n_groups + 1)[:n_groups]
    g_ok = g[ok]
    stats = grouped_stats(g_ok, n_groups, d[ok])
    q_sum = np.bincount(g_ok, weights=qf[ok], minlength=n_groups)[:n_groups]
    shape = (n_ch, n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        q_mean = (q_sum / stats.n).reshape(shape)
        eff = (stats.n / n_all).reshape(shape)
        s = gap[:, None] / stats.mean.reshape(shape)
        s_err = s * (stats.sem / stats.mean).reshape(shape)
    n_ok = stats.n.reshape(shape)
    good = (n_ok >= max(min_hits, 2)) & (eff >= min_eff) & np.isfinite(s) & (s > 0)
    good &= np.isfinite(s_err)
    s = np.where(good, s, np.nan)
    s_err = np.where(good, s_err, np.nan)
    q_mean = np.where(n_ok > 0, q_mean, np.nan)
    w = np.where(good, 1.0 / s_err**2, 0.0)

    # the line S = a + b Q through the bins, weighted by the slope errors (the trim's b)
    line = batched_polyfit(q_mean, s, w, deg=1)
    a_, b_ = line.coef[:, 0], line.coef[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_bar = (w * np.where(good, q_mean, 0.0)).sum(axis=1) / w.sum(axis=1)
        elasticity = b_ * q_bar / (a_ + b_ * q_bar)

    # per intensity: the whole cluster of charges the laser made, at the operating thresholds
    ck = c * n_k + k
    n_pts = n_ch * n_k
    ck_ok = ck[d_ok]
    k_all = np.bincount(ck[in_range], minlength=n_pts)[:n_pts]
    k_ok = d_ok & in_range
    k_q = grouped_stats(ck[k_ok], n_pts, qf[k_ok])
    k_d = grouped_stats(ck[k_ok], n_pts, d[k_ok])
    if kind == "bins":
        table_q, table_s, table_err = q_mean, s, s_err
        table_cov = ref = None
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            k_good = (k_d.n >= max(min_hits, 2)) & (k_d.n >= min_eff * k_all) & (k_d.mean > 0)
        d_mean = k_d.mean.reshape(n_ch, n_k)
        d_var = k_d.sem.reshape(n_ch, n_k) ** 2
        if edge_d is not None:
            both = np.isfinite(edge_d) & np.isfinite(edge_d_var) & (edge_d_var > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                wa, wb = 1.0 / d_var, np.where(both, 1.0 / edge_d_var, 0.0)
                d_mean = np.where(
                    both, (wa * d_mean + wb * np.nan_to_num(edge_d)) / (wa + wb), d_mean
                )
                d_var = np.where(both, 1.0 / (wa + wb), d_var)
        table_q, table_s, table_err, table_cov, ref = _smooth_table(
            k_q.mean.reshape(n_ch, n_k),
            k_q.var.reshape(n_ch, n_k),
            d_mean,
            np.sqrt(d_var),
            k_good.reshape(n_ch, n_k),
            gap,
            n_bins,
            {"power_law": "never", "log_quadratic": "always"}.get(kind, "if_needed"),
        )

    with np.errstate(divide="ignore", invalid="ignore"):
        s_op_k = np.repeat(gap, n_k) / k_d.mean
        s_op_k_err = s_op_k * k_d.sem / k_d.mean
        s_op_k = np.where(k_d.n >= max(min_hits, 2), s_op_k, np.nan)

    # the mean inverse table slope over each intensity's hits: what the correction subtracts there
    s_hit = grouped_interp(c[d_ok], qf[d_ok], table_q, table_s)
    fin = np.isfinite(s_hit)
    x_stats = grouped_stats(ck_ok[fin], n_pts, 1.0 / s_hit[fin])
    all_stats_n = np.bincount(ck_ok, minlength=n_pts)[:n_pts]
    point_ch = np.repeat(np.arange(n_ch), n_k)
    with np.errstate(divide="ignore", invalid="ignore"):
        # every hit of the intensity must have a slope: a partial cover is no estimate
        x_k = np.where(x_stats.n == all_stats_n, x_stats.mean, np.nan).reshape(n_ch, n_k)
        if table_cov is None or ref is None:
            rel = grouped_interp(point_ch, k_q.mean, table_q, table_err / table_s)
            x_cov = np.zeros((n_ch, n_k, n_k))
            x_cov[:, np.arange(n_k), np.arange(n_k)] = (x_k * rel.reshape(n_ch, n_k)) ** 2
        else:
            # x_k ~ <exp(-ln S(u))>: its derivatives by the curve's coefficients at u of <Q>_k
            u_k = np.log(k_q.mean.reshape(n_ch, n_k)) - ref[:, None]
            jac = -x_k[..., None] * u_k[..., None] ** np.arange(3)
            x_cov = np.einsum("gki,gij,glj->gkl", jac, table_cov, jac)
    return _SlopeTable(
        q_mean,
        s,
        s_err,
        n_ok,
        table_q,
        table_s,
        table_err,
        good.sum(axis=1),
        a_,
        b_,
        elasticity,
        x_k,
        x_cov,
        k_q.mean.reshape(n_ch, n_k),
        s_op_k.reshape(n_ch, n_k),
        s_op_k_err.reshape(n_ch, n_k),
    )


def _smooth_table(
    q_k: NDArray[np.float64],
    var_q_k: NDArray[np.float64],
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
]:
    """The slope table from the intensity clusters, as a smooth curve on log-spaced nodes.

    Why not straight from charge bins: the calibration lights a few discrete intensities, so the
    charges come in clusters with gaps between them, and straight lines across the gaps cut the
    concave S(Q) short by a few per cent. Within a cluster, a charge bin selects pulses by a charge
    that is smeared by the QDC resolution, so the bins at a cluster's edges see amplitudes pulled
    towards its centre (regression dilution) and the end bins of the table tilt by about 1 %.
    A whole cluster has neither problem: its mean charge and its mean ``t2 - t1`` belong to the
    same pulses. So each intensity gives one point ``(<Q>_k, (thr2 - thr1) / <t2 - t1>_k)``; the
    curvature term ``f'' Var(Q) / 2`` of a cluster's spread is taken out (``f = t2 - t1`` as a
    function of Q); and ``ln S = p0 + p1 u + p2 u**2``, ``u = ln(Q / Q_ref)``, is fitted through
    the points (a power law is a straight line in log-log; the quadratic term takes up edges that
    do not scale). The curve is tabulated at ``n_nodes`` log-spaced charges from 2 sigma below the
    lowest cluster to 2 sigma above the highest, so that linear interpolation of the stored table
    follows it to well below a picosecond.
    """
    n_ch = q_k.shape[0]
    n_good = good.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s_raw = np.where(good, gap[:, None] / d_k, np.nan)
        rel = np.where(good, d_k_err / d_k, np.nan)
        logq = np.log(np.where(good, q_k, 1.0))
        w = np.where(good, 1.0 / rel**2, 0.0)
        ref = (w * logq).sum(axis=1) / w.sum(axis=1)
    u = np.where(good, logq - np.where(np.isfinite(ref), ref, 0.0)[:, None], 0.0)
    v_rel = np.where(good, var_q_k / np.where(good, q_k, 1.0) ** 2, 0.0)
    v_rel = np.where(np.isfinite(v_rel), v_rel, 0.0)
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
        # Jensen: <f(Q)> = f(<Q>) + f''(<Q>) Var(Q) / 2, with f = gap * exp(-ln S)
        g1 = coef[:, 1:2] + 2 * coef[:, 2:3] * u
        g2 = 2 * coef[:, 2:3]
        factor = 1.0 + 0.5 * (g1**2 - g2 + g1) * v_rel
        y = np.log(np.where(good & ok[:, None] & (factor > 0), s_raw * factor, 1.0))
    sig = np.sqrt(v_rel)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(good, logq + np.log(np.maximum(1.0 - 2 * sig, 0.1)), np.inf).min(axis=1)
        hi = np.where(good, logq + np.log(1.0 + 2 * sig), -np.inf).max(axis=1)
    ok &= np.isfinite(lo) & np.isfinite(hi) & (hi > lo)
    frac = np.linspace(0.0, 1.0, n_nodes)
    log_nodes = np.where(ok, lo, 0.0)[:, None] + frac * np.where(ok, hi - lo, 0.0)[:, None]
    u_nodes = log_nodes - np.where(ok, ref, 0.0)[:, None]
    ln_s, v = batched_polyval(np.nan_to_num(coef), u_nodes, np.nan_to_num(cov))
    assert v is not None
    nan = np.where(ok, 1.0, np.nan)[:, None]
    nodes_s = np.exp(ln_s)
    nodes_err = nodes_s * np.sqrt(np.maximum(np.einsum("gee->ge", v), 0.0))
    ref_out = np.where(ok, ref, np.nan)
    return np.exp(log_nodes) * nan, nodes_s * nan, nodes_err * nan, cov, ref_out


# ------------------------------------------------------------------------------------------------
# stage 2: mean edges


class _Edges(NamedTuple):
    coef: NDArray[np.float64]  # (CK, 3)
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
    thr2: NDArray[np.float64],
    step_stats: Any,
    sum_t1: NDArray[np.float64],
    n_t2: NDArray[np.int64],
    thr1_op: NDArray[np.float64],
    thr2_op: NDArray[np.float64],
    tol: float,
    var_t1: NDArray[np.float64],
) -> _Edges:
    """Quadratic mean edge per (channel, intensity) and its values at the operating thresholds."""
    n_ch = usable.shape[0]
    n_k = n_pts // max(n_ch, 1)
    idx = ck[usable]
    # <t1>_k over the same pulses as the step means
    n_k_hits = np.bincount(idx, weights=n_t2[usable], minlength=n_pts)[:n_pts]
    t1_sum = np.bincount(idx, weights=sum_t1[usable], minlength=n_pts)[:n_pts]
    all_hits = np.bincount(ck.ravel(), weights=n_t2.ravel(), minlength=n_pts)[:n_pts]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1_mean = t1_sum / n_k_hits
        var_t1_mean = var_t1 / n_k_hits
    # a step mean is never known better than 0.1 ps: keeps the weights finite when t2 ~ t1
    sem2 = np.maximum(step_stats.var[usable] / step_stats.n[usable], 1e-8)
    n_steps_pt, (x, y, w) = pad_groups(
        idx, n_pts, thr2[usable], step_stats.mean[usable], 1.0 / sem2
    )
    if x.shape[1] == 0:
        x = y = w = np.zeros((n_pts, 1))
    fit = batched_polyfit(x, y, np.nan_to_num(w), deg=2)

    # D(thr) = <t2(thr) - t1> per intensity; the mean t2 edge is <t1> + D. From it, as the design
    # has it: T_k = t(thr1_op) = <t1> + D(thr1_op), dt_k = t(thr2_op) - t(thr1_op).
    ops = np.stack([np.repeat(thr1_op, n_k), np.repeat(thr2_op, n_k)], axis=1)
    vals, v = batched_polyval(fit.coef, ops, fit.cov)
    assert v is not None
    comb = np.array([[1.0, 0.0], [-1.0, 1.0]])
    t_rel = vals @ comb[0]
    dt = vals @ comb[1]
    cv = np.einsum("ai,gij,bj->gab", comb, v, comb)
    with np.errstate(invalid="ignore"):
        t_thr1 = t1_mean + t_rel
        var_t_thr1 = cv[:, 0, 0] + np.where(np.isfinite(var_t1_mean), var_t1_mean, 0.0)
    coef = fit.coef.copy()
    coef[:, 0] += t1_mean  # the edge in absolute time, for the points table
    gap = ops[:, 1] - ops[:, 0]
    with np.errstate(invalid="ignore"):
        x_lo = np.nanmin(np.where(w > 0, x, np.nan), axis=1, initial=np.inf)
        x_hi = np.nanmax(np.where(w > 0, x, np.nan), axis=1, initial=-np.inf)
    lo_need = ops.min(axis=1)
    hi_need = ops.max(axis=1)
    covered = (x_lo <= lo_need + tol) & (x_hi >= hi_need - tol)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_slope = dt / gap
        var_inv = cv[:, 1, 1] / gap**2
        cov_t_inv = cv[:, 0, 1] / gap
    enough = (n_steps_pt >= 4) & fit.ok
    positive = inv_slope > 0
    valid = enough & covered & positive
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
    after = float(np.sqrt(np.sum((awc[use] - predicted[use]) ** 2) / (n - 2))) if n > 2 else nan
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
    """How flat the corrected time is versus charge: the design's acceptance test.

    Per channel, the hits (within ``q_range``: scalars or one value per channel number) are cut
    into ``n_bins`` equal-count charge bins; ``spread_ns`` is max - min of the bins' mean
    corrected times, ``chi2_flat`` the chi2 of those means about their weighted mean. A channel
    with fewer than two populated bins gets NaN and the flag ``too_few_hits``.
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
    q_mean = np.bincount(g, weights=qf, minlength=n_groups)[:n_groups]
    with np.errstate(divide="ignore", invalid="ignore"):
        q_mean = (q_mean / ts.n).reshape(n_ch, n_bins)
    mean = ts.mean.reshape(n_ch, n_bins)
    err = ts.sem.reshape(n_ch, n_bins)
    n = ts.n.reshape(n_ch, n_bins)
    good = (n >= max(min_hits_per_bin, 2)) & np.isfinite(mean) & np.isfinite(err) & (err > 0)
    mean_g = np.where(good, mean, np.nan)
    n_good = good.sum(axis=1)
    enough = n_good >= 2
    hi_i = np.argmax(np.where(good, mean, -np.inf), axis=1)
    lo_i = np.argmin(np.where(good, mean, np.inf), axis=1)
    rows = np.arange(n_ch)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(good, 1.0 / err**2, 0.0)
        wmean = (w * np.where(good, mean, 0.0)).sum(axis=1) / w.sum(axis=1)
        chi2 = (w * np.where(good, mean - wmean[:, None], 0.0) ** 2).sum(axis=1)
    out = np.zeros(n_ch, dtype=RESIDUAL_WALK_DTYPE)
    out["channel"] = rows
    out["spread_ns"] = np.where(enough, mean[rows, hi_i] - mean[rows, lo_i], np.nan)
    out["spread_err_ns"] = np.where(enough, np.hypot(err[rows, hi_i], err[rows, lo_i]), np.nan)
    out["chi2_flat"] = np.where(enough, chi2, np.nan)
    out["ndf"] = n_good - 1
    pad = ((0, 0), (0, AWC_LUT_SIZE - n_bins))
    out["q_bin"] = np.pad(q_mean, pad, constant_values=np.nan)
    out["t_bin_ns"] = np.pad(mean_g, pad, constant_values=np.nan)
    out["t_bin_ns_err"] = np.pad(np.where(good, err, np.nan), pad, constant_values=np.nan)
    out["n_bin"] = np.pad(n, pad)
    out["flag"] = np.where(enough, "", "too_few_hits")
    return out
