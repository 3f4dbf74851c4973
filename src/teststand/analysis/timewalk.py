"""HPTDC time walk versus time over threshold (CMS PPS diamond timing).

A leading-edge discriminator fires later for smaller pulses; the time over threshold (ToT) measures
the amplitude, so the walk is a function of ToT. Per channel the profile of the leading time ``t``
versus ToT (mean and error of the mean in ToT bins) is fitted with the PPS sigmoid

    f(ToT) = p0 / (exp((ToT - p1) / p2) + 1) + p3          (all in ns)

within bounds (``p0`` 0..10 ns, ``p1`` 0..40 ns, ``p2`` 0.05..10 ns, ``p3`` within the data's
time range +-50 ns). ``p0`` is the walk amplitude, ``p1`` and ``p2`` the ToT of the midpoint and the
width of the transition, ``p3`` the time of an infinitely large pulse: the asymptote absorbs every
constant of the channel (its own ``t0``, cable delay, clock), which is why the PPS correction
``t - f(ToT)`` both removes the walk and aligns the channels.

The fit range is chosen by chi2/ndf: starting from every profile bin with enough entries, the
sparser end bin is dropped and the fit repeated until chi2/ndf is acceptable (at most half of the
bins are dropped). As the classic (ALICE) reference the same bins are fitted with polynomials of
order 1..5 in ToT and the lowest order with an acceptable chi2/ndf (within 3 sigma of 1, at most
``max_chi2ndf``) is kept, else the order with the smallest chi2/ndf.

A profile bin holds the mean of ``t`` over the hits in it, i.e. the mean of ``f`` over the bin, not
``f`` at its centre; for a steep sigmoid (``p2`` of 0.2 ns) that difference reaches 10 ps in a
0.1 ns bin. Each bin therefore records the mean and variance of ToT of its hits and both models are
compared with the data as ``f(mean) + f''(mean) var / 2``, exact to second order.

Inputs are the hit columns (``channel``, ``t1`` as ``t``, ``tot``). Outputs are structured arrays,
one row per channel, with a ``flag`` (the package convention): ``""`` when fine; ``chi2_high`` or
``at_bound`` (numbers given but doubtful); ``no_hits``, ``too_few_bins``, ``fit_failed`` (NaN).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import optimize

from teststand.analysis._grouping import batched_lstsq, grouped_stats

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Parameter bounds of the sigmoid (ns); ``p3`` is bounded relative to the data (see module doc).
P0_BOUNDS_NS = (0.0, 10.0)
P1_BOUNDS_NS = (0.0, 40.0)
P2_BOUNDS_NS = (0.05, 10.0)
P3_MARGIN_NS = 50.0
#: Highest polynomial order of the ALICE-style reference fit.
MAX_POLY_ORDER = 5

#: One row per (channel, ToT bin) with enough entries: bin edges (ns), number of hits, mean and
#: variance of ToT in the bin (ns, ns^2), mean of ``t`` (ns), its error and the RMS of ``t`` (ns).
TIMEWALK_PROFILE_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("tot_lo_ns", "<f8"),
        ("tot_hi_ns", "<f8"),
        ("n", "<i8"),
        ("tot_ns", "<f8"),
        ("tot_var_ns2", "<f8"),
        ("t_ns", "<f8"),
        ("t_err_ns", "<f8"),
        ("t_rms_ns", "<f8"),
    ]
)

#: One row per channel. Sigmoid ``p0_ns..p3_ns`` with errors (scaled by sqrt(chi2/ndf) when that
#: exceeds 1), the ToT range and number of profile bins of its fit, chi2/ndf of the sigmoid and of
#: the polynomial. The polynomial is fitted on the sigmoid's bins when the sigmoid was accepted
#: (flag ``""`` or ``at_bound``), so the two chi2/ndf compare like with like, and on all bins
#: otherwise; it is ``sum_k poly_coef[k] x**k`` with ``x = (ToT - poly_center_ns) /
#: poly_scale_ns`` (coefficients in ns, orders above ``poly_order`` zero) and is only used inside
#: ``[poly_tot_min_ns, poly_tot_max_ns]`` (clamped outside). ``better`` names the model with the
#: smaller chi2/ndf (``sigmoid`` or ``poly``, empty if neither fitted).
TIMEWALK_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("n_hits", "<i8"),
        ("n_bins", "<i4"),
        ("tot_min_ns", "<f8"),
        ("tot_max_ns", "<f8"),
        ("p0_ns", "<f8"),
        ("p0_err_ns", "<f8"),
        ("p1_ns", "<f8"),
        ("p1_err_ns", "<f8"),
        ("p2_ns", "<f8"),
        ("p2_err_ns", "<f8"),
        ("p3_ns", "<f8"),
        ("p3_err_ns", "<f8"),
        ("chi2ndf_sigmoid", "<f8"),
        ("ndf_sigmoid", "<i4"),
        ("poly_order", "<i2"),
        ("poly_tot_min_ns", "<f8"),
        ("poly_tot_max_ns", "<f8"),
        ("poly_center_ns", "<f8"),
        ("poly_scale_ns", "<f8"),
        ("poly_coef", "<f8", (MAX_POLY_ORDER + 1,)),
        ("poly_coef_err", "<f8", (MAX_POLY_ORDER + 1,)),
        ("chi2ndf_poly", "<f8"),
        ("ndf_poly", "<i4"),
        ("better", "<U8"),
        ("flag", "<U24"),
    ]
)

_SIGMOID_FIELDS = ("p0_ns", "p1_ns", "p2_ns", "p3_ns")


def timewalk_sigmoid(
    tot_ns: npt.ArrayLike,
    p0: npt.ArrayLike,
    p1: npt.ArrayLike,
    p2: npt.ArrayLike,
    p3: npt.ArrayLike,
) -> FloatArray:
    """The PPS walk function ``p0 / (exp((ToT - p1) / p2) + 1) + p3`` (ns); broadcasts."""
    u = (np.asarray(tot_ns, dtype=np.float64) - p1) / np.asarray(p2, dtype=np.float64)
    # 1 / (exp(u) + 1) written without overflow for large u
    s = 0.5 * (1.0 - np.tanh(0.5 * u))
    return np.asarray(np.asarray(p0) * s + p3, dtype=np.float64)


def _sigmoid_binned(x: FloatArray, v: FloatArray, p: Sequence[float]) -> FloatArray:
    """Mean of the sigmoid over a bin with ToT mean ``x`` and variance ``v`` (second order)."""
    p0, p1, p2, p3 = p
    s = 0.5 * (1.0 - np.tanh(0.5 * (x - p1) / p2))
    f = p0 * s + p3
    f2 = p0 / p2**2 * s * (1.0 - s) * (1.0 - 2.0 * s)
    return np.asarray(f + 0.5 * f2 * v, dtype=np.float64)


def timewalk_profile(
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    tot_ns: npt.ArrayLike,
    *,
    bin_width_ns: float = 0.1,
    tot_range_ns: tuple[float, float] = (0.0, 50.0),
    min_entries: int = 20,
) -> np.ndarray:
    """Profile of ``t`` versus ToT per channel: one pass of grouped sums, no loop.

    Args:
        channel, t_ns, tot_ns: hit columns (``t_ns`` is the leading time ``t1``).
        bin_width_ns: ToT bin width.
        tot_range_ns: ToT range binned; hits outside it, or with NaN time or ToT, are ignored.
        min_entries: bins with fewer hits are left out.

    Returns:
        A :data:`TIMEWALK_PROFILE_DTYPE` array sorted by channel and ToT.
    """
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    t = np.asarray(t_ns, dtype=np.float64).ravel()
    tot = np.asarray(tot_ns, dtype=np.float64).ravel()
    lo, hi = tot_range_ns
    n_tot = int(np.ceil((hi - lo) / bin_width_ns))
    ok = np.isfinite(t) & np.isfinite(tot) & (tot >= lo) & (tot < hi)
    ch, t, tot = ch[ok], t[ok], tot[ok]
    channels, ch_idx = np.unique(ch, return_inverse=True)
    b = np.minimum(((tot - lo) / bin_width_ns).astype(np.int64), n_tot - 1)
    idx = ch_idx * n_tot + b
    n_groups = channels.size * n_tot
    # Shift by the channel's mean time and the bin's lower edge: no cancellation in the sums.
    t_shift = np.bincount(ch_idx, t, minlength=channels.size) / np.maximum(
        np.bincount(ch_idx, minlength=channels.size), 1
    )
    t_shift_g = np.repeat(t_shift, n_tot)
    tot_shift_g = np.tile(lo + bin_width_ns * np.arange(n_tot), channels.size)
    st = grouped_stats(idx, n_groups, t, ddof=1, shift=t_shift_g)
    sx = grouped_stats(idx, n_groups, tot, ddof=0, shift=tot_shift_g)
    keep = np.flatnonzero(st.n >= max(min_entries, 2))
    out = np.empty(keep.size, dtype=TIMEWALK_PROFILE_DTYPE)
    out["channel"] = channels[keep // n_tot]
    out["tot_lo_ns"] = lo + bin_width_ns * (keep % n_tot)
    out["tot_hi_ns"] = out["tot_lo_ns"] + bin_width_ns
    out["n"] = st.n[keep]
    out["tot_ns"] = sx.mean[keep]
    out["tot_var_ns2"] = sx.var[keep]
    out["t_ns"] = st.mean[keep]
    out["t_rms_ns"] = np.sqrt(st.var[keep])
    out["t_err_ns"] = np.sqrt(st.var[keep] / st.n[keep])
    return out


def _initial_guesses(x: FloatArray, y: FloatArray) -> list[list[float]]:
    """Starting points for the sigmoid from the profile's shape (several widths)."""
    n_edge = max(1, x.size // 5)
    y_hi = float(np.mean(y[-n_edge:]))
    y_lo = float(np.mean(y[:n_edge]))
    p0 = float(np.clip(y_lo - y_hi, 0.05, P0_BOUNDS_NS[1] - 0.05))
    p3 = y_hi
    half = y_hi + 0.5 * (y_lo - y_hi)
    below = np.flatnonzero(y < half)
    p1 = float(x[below[0]]) if below.size else float(x[-1])
    p1 = float(np.clip(p1, P1_BOUNDS_NS[0] + 0.05, P1_BOUNDS_NS[1] - 0.05))
    # 25 % and 75 % of the drop are 2 ln 3 widths apart
    q25 = np.flatnonzero(y < y_hi + 0.75 * (y_lo - y_hi))
    q75 = np.flatnonzero(y < y_hi + 0.25 * (y_lo - y_hi))
    widths = [0.3, 1.0, 3.0]
    if q25.size and q75.size and x[q75[0]] > x[q25[0]]:
        widths.insert(0, float((x[q75[0]] - x[q25[0]]) / (2 * np.log(3))))
    return [
        [p0, p1, float(np.clip(w, P2_BOUNDS_NS[0] + 0.01, P2_BOUNDS_NS[1] - 0.01)), p3]
        for w in widths
    ]


def _sigmoid_binned_jac(x: FloatArray, v: FloatArray, p: Sequence[float]) -> FloatArray:
    """Jacobian of :func:`_sigmoid_binned` with respect to (p0, p1, p2, p3), shape (n, 4)."""
    p0, p1, p2, _ = p
    u = (x - p1) / p2
    s = 0.5 * (1.0 - np.tanh(0.5 * u))
    ds = s * (1.0 - s)  # d s / d(-u)
    g = ds * (1.0 - 2.0 * s)  # f'' = p0 g / p2**2
    dg = 1.0 - 6.0 * s + 6.0 * s * s  # d g / d s
    half_v = 0.5 * v / p2**2
    common = p0 * (1.0 + half_v * dg) * ds / p2
    return np.stack(
        [s + half_v * g, common, common * u - 2.0 * p0 * half_v * g / p2, np.ones_like(x)], -1
    )


def _fit_sigmoid(
    x: FloatArray,
    v: FloatArray,
    y: FloatArray,
    e: FloatArray,
    starts: list[list[float]],
    bounds: tuple[list[float], list[float]],
    good_chi2ndf: float,
) -> tuple[FloatArray, FloatArray, float] | None:
    """Bounded least-squares fits from several starts; returns (p, cov, chi2) or None.

    The starts are tried in order until one reaches ``chi2/ndf <= good_chi2ndf``; otherwise the
    best one is returned.
    """
    best: tuple[FloatArray, FloatArray, float] | None = None
    ndf = max(x.size - 4, 1)

    def model(xv: FloatArray, *p: float) -> FloatArray:
        return _sigmoid_binned(xv[0], xv[1], p)

    def jac(xv: FloatArray, *p: float) -> FloatArray:
        return _sigmoid_binned_jac(xv[0], xv[1], p)

    xv = np.vstack([x, v])
    for start in starts:
        p_start = np.clip(start, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optimize.OptimizeWarning)
                popt, pcov = optimize.curve_fit(
                    model, xv, y, p0=p_start, sigma=e, absolute_sigma=True, jac=jac,
                    bounds=bounds, max_nfev=500,
                )  # fmt: skip
        except (RuntimeError, ValueError):
            continue
        chi2 = float(np.sum(((y - model(xv, *popt)) / e) ** 2))
        if best is None or chi2 < best[2]:
            best = (popt, pcov, chi2)
        if chi2 / ndf <= good_chi2ndf:
            break
    return best


def fit_timewalk_profile(
    profile: np.ndarray,
    *,
    max_chi2ndf: float = 2.0,
    min_bins: int = 8,
    max_trim_fraction: float = 0.5,
    n_hits: npt.ArrayLike | None = None,
) -> np.ndarray:
    """Fit the sigmoid and the reference polynomial to a ToT profile, per channel.

    Args:
        profile: a :data:`TIMEWALK_PROFILE_DTYPE` array (from :func:`timewalk_profile`).
        max_chi2ndf: a fit with chi2/ndf at or below this is accepted; above it, the sparser end
            bin is dropped and the fit repeated.
        min_bins: fewer usable bins than this: the channel is flagged ``too_few_bins``.
        max_trim_fraction: at most this fraction of the bins is dropped; if no range is accepted the
            best fit found is kept and flagged ``chi2_high``.
        n_hits: number of hits per channel to report (defaults to the hits in the profile).

    Returns:
        A :data:`TIMEWALK_DTYPE` array, one row per channel of the profile.
    """
    channels, counts = np.unique(profile["channel"], return_counts=True)
    order = np.lexsort((profile["tot_ns"], profile["channel"]))
    prof = profile[order]
    n_ch = channels.size
    out = np.zeros(n_ch, dtype=TIMEWALK_DTYPE)
    out["channel"] = channels
    out["n_hits"] = (
        np.bincount(np.searchsorted(channels, prof["channel"]), prof["n"], minlength=n_ch)
        if n_hits is None
        else np.asarray(n_hits)
    )
    for name in out.dtype.names or ():
        if out.dtype[name].kind == "f":
            out[name] = np.nan
    out["flag"] = ""
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    # Bins used by the accepted sigmoid range, per channel: the polynomial uses the same ones.
    used = np.zeros(prof.size, dtype=bool)

    # One bounded nonlinear fit (with range trimming) per channel: 32 channels, unavoidable.
    for k in range(n_ch):
        sl = slice(starts[k], starts[k] + counts[k])
        x, v = prof["tot_ns"][sl], prof["tot_var_ns2"][sl]
        y, e, n = prof["t_ns"][sl], prof["t_err_ns"][sl], prof["n"][sl]
        e = np.where(e > 0, e, np.max(e[e > 0]) if np.any(e > 0) else 1e-3)
        if x.size < max(min_bins, 5):
            out["flag"][k] = "too_few_bins"
            continue
        bounds = (
            [P0_BOUNDS_NS[0], P1_BOUNDS_NS[0], P2_BOUNDS_NS[0], float(y.min()) - P3_MARGIN_NS],
            [P0_BOUNDS_NS[1], P1_BOUNDS_NS[1], P2_BOUNDS_NS[1], float(y.max()) + P3_MARGIN_NS],
        )
        lo, hi = 0, x.size
        max_drop = int(max_trim_fraction * x.size)
        best: tuple[float, int, int, FloatArray, FloatArray, float] | None = None
        guesses = _initial_guesses(x, y)
        while True:
            fit = _fit_sigmoid(x[lo:hi], v[lo:hi], y[lo:hi], e[lo:hi], guesses, bounds, max_chi2ndf)
            if fit is not None:
                ndf = (hi - lo) - 4
                chi2ndf = fit[2] / ndf
                if best is None or chi2ndf < best[0]:
                    best = (chi2ndf, lo, hi, fit[0], fit[1], fit[2])
                if chi2ndf <= max_chi2ndf:
                    break
                # warm start the trimmed fit from this one, keep one generic start
                guesses = [list(fit[0]), guesses[-1]]
            if (lo + x.size - hi) >= max_drop or (hi - lo - 1) < min_bins:
                break
            # drop the sparser end bin: sparse tails are where extra hits (noise, pile-up)
            # and a model that is only close to the sigmoid disagree most
            if n[lo] <= n[hi - 1]:
                lo += 1
            else:
                hi -= 1
        if best is None:
            out["flag"][k] = "fit_failed"
            continue
        chi2ndf, lo, hi, popt, pcov, _ = best
        ndf = hi - lo - 4
        scale = max(1.0, chi2ndf)
        perr = np.sqrt(np.clip(np.diag(pcov), 0.0, None) * scale)
        if not np.all(np.isfinite(perr)):
            out["flag"][k] = "fit_failed"
            continue
        for name, value, err in zip(_SIGMOID_FIELDS, popt, perr, strict=True):
            out[name][k] = value
            out[name.replace("_ns", "_err_ns")][k] = err
        out["chi2ndf_sigmoid"][k] = chi2ndf
        out["ndf_sigmoid"][k] = ndf
        out["n_bins"][k] = hi - lo
        out["tot_min_ns"][k] = prof["tot_lo_ns"][sl][lo]
        out["tot_max_ns"][k] = prof["tot_hi_ns"][sl][hi - 1]
        used[starts[k] + lo : starts[k] + hi] = True
        lower = np.array(bounds[0])
        upper = np.array(bounds[1])
        tol = 1e-6 * (upper - lower)
        if chi2ndf > max_chi2ndf:
            out["flag"][k] = "chi2_high"
        elif np.any((popt - lower < tol) | (upper - popt < tol)):
            out["flag"][k] = "at_bound"

    g = np.searchsorted(channels, prof["channel"])
    # Where the sigmoid was not accepted its range means nothing: the polynomial takes all bins.
    all_bins = np.isin(out["flag"], ("chi2_high", "fit_failed"))[g]
    _fit_polynomials(prof, used | all_bins, g, out, max_chi2ndf)
    sig_ok = np.isfinite(out["chi2ndf_sigmoid"])
    poly_ok = np.isfinite(out["chi2ndf_poly"])
    poly_better = poly_ok & (~sig_ok | (out["chi2ndf_poly"] < out["chi2ndf_sigmoid"]))
    out["better"] = np.where(poly_better, "poly", np.where(sig_ok, "sigmoid", ""))
    return out


def _fit_polynomials(
    prof: np.ndarray,
    used: npt.NDArray[np.bool_],
    g: npt.NDArray[np.intp],
    out: np.ndarray,
    max_chi2ndf: float,
) -> None:
    """Batched polynomial fits of order 1..5 on the ``used`` bins of each channel."""
    n_ch = out.size
    if not used.any():
        return
    idx = np.flatnonzero(used)
    gi = g[idx]
    lo = np.full(n_ch, np.inf)
    hi = np.full(n_ch, -np.inf)
    np.minimum.at(lo, gi, prof["tot_lo_ns"][idx])
    np.maximum.at(hi, gi, prof["tot_hi_ns"][idx])
    center = np.where(np.isfinite(lo), 0.5 * (lo + hi), 0.0)
    scale = np.where(np.isfinite(lo) & (hi > lo), 0.5 * (hi - lo), 1.0)
    counts = np.bincount(gi, minlength=n_ch)
    width = int(counts.max())
    pos = np.arange(idx.size) - np.concatenate(([0], np.cumsum(counts)[:-1]))[gi]
    x = np.zeros((n_ch, width))
    v = np.zeros((n_ch, width))
    y = np.zeros((n_ch, width))
    w = np.zeros((n_ch, width))
    x[gi, pos] = (prof["tot_ns"][idx] - center[gi]) / scale[gi]
    v[gi, pos] = prof["tot_var_ns2"][idx] / scale[gi] ** 2
    y[gi, pos] = prof["t_ns"][idx]
    w[gi, pos] = 1.0 / prof["t_err_ns"][idx] ** 2
    w = np.where(np.isfinite(w), w, 0.0)

    chosen = np.full(n_ch, -1)
    fits = []
    for order in range(1, MAX_POLY_ORDER + 1):
        powers = np.arange(order + 1)
        # Mean of x**k over a bin to second order: x**k + k (k - 1) x**(k - 2) var / 2.
        with np.errstate(divide="ignore", invalid="ignore"):
            design = (
                x[..., None] ** powers
                + 0.5
                * powers
                * (powers - 1)
                * np.where(powers >= 2, x[..., None] ** np.maximum(powers - 2, 0), 0.0)
                * v[..., None]
            )
        fit = batched_lstsq(design, y, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            chi2ndf = np.where(fit.ndf > 0, fit.chi2 / fit.ndf, np.nan)
        fits.append((fit, chi2ndf))
        # Acceptable: chi2/ndf within 3 sigma of 1 (its spread is sqrt(2 / ndf)), and never above
        # max_chi2ndf; otherwise a higher order is tried.
        with np.errstate(invalid="ignore", divide="ignore"):
            limit = np.minimum(max_chi2ndf, 1.0 + 3.0 * np.sqrt(2.0 / fit.ndf))
        accept = (chosen < 0) & fit.ok & (chi2ndf <= limit)
        chosen[accept] = order
    # No order acceptable: the order with the smallest chi2/ndf.
    all_chi = np.stack([c for _, c in fits], axis=1)
    all_chi_safe = np.where(np.isfinite(all_chi), all_chi, np.inf)
    fallback = np.argmin(all_chi_safe, axis=1) + 1
    chosen = np.where(chosen > 0, chosen, np.where(np.isfinite(all_chi_safe.min(1)), fallback, -1))
    for order in range(1, MAX_POLY_ORDER + 1):
        sel = chosen == order
        if not sel.any():
            continue
        fit, chi2ndf = fits[order - 1]
        err_scale = np.maximum(1.0, chi2ndf[sel])
        coef = np.zeros((sel.sum(), MAX_POLY_ORDER + 1))
        cerr = np.zeros_like(coef)
        coef[:, : order + 1] = fit.coef[sel]
        cerr[:, : order + 1] = np.sqrt(np.einsum("gii->gi", fit.cov[sel]) * err_scale[:, None])
        out["poly_order"][sel] = order
        out["poly_coef"][sel] = coef
        out["poly_coef_err"][sel] = cerr
        out["chi2ndf_poly"][sel] = chi2ndf[sel]
        out["ndf_poly"][sel] = fit.ndf[sel]
    fitted = chosen > 0
    out["poly_center_ns"][fitted] = center[fitted]
    out["poly_scale_ns"][fitted] = scale[fitted]
    out["poly_tot_min_ns"][fitted] = lo[fitted]
    out["poly_tot_max_ns"][fitted] = hi[fitted]


def fit_timewalk(
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    tot_ns: npt.ArrayLike,
    *,
    channels: npt.ArrayLike | None = None,
    bin_width_ns: float = 0.1,
    tot_range_ns: tuple[float, float] = (0.0, 50.0),
    min_entries: int = 20,
    max_chi2ndf: float = 2.0,
    min_bins: int = 8,
    max_trim_fraction: float = 0.5,
) -> np.ndarray:
    """Time-walk calibration from hit columns: profile, sigmoid and polynomial per channel.

    Args:
        channel, t_ns, tot_ns: hit columns (``t1`` and ``tot`` of the HPTDC hits).
        channels: channels to report (e.g. the run's channel table); channels without hits get a
            ``no_hits`` row. Default: the channels present in the hits.
        bin_width_ns, tot_range_ns, min_entries: profile binning, see :func:`timewalk_profile`.
        max_chi2ndf, min_bins, max_trim_fraction: fit-range choice, see
            :func:`fit_timewalk_profile`.

    Returns:
        A :data:`TIMEWALK_DTYPE` array, one row per channel, sorted by channel.
    """
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    profile = timewalk_profile(
        ch, t_ns, tot_ns, bin_width_ns=bin_width_ns, tot_range_ns=tot_range_ns,
        min_entries=min_entries,
    )  # fmt: skip
    fitted = fit_timewalk_profile(
        profile, max_chi2ndf=max_chi2ndf, min_bins=min_bins, max_trim_fraction=max_trim_fraction
    )
    wanted = np.unique(ch) if channels is None else np.unique(np.asarray(channels, dtype=np.int64))
    out = np.zeros(wanted.size, dtype=TIMEWALK_DTYPE)
    for name in out.dtype.names or ():
        if out.dtype[name].kind == "f":
            out[name] = np.nan
    out["channel"] = wanted
    out["flag"] = "no_hits"
    mine = ch[np.isin(ch, wanted)]
    out["n_hits"] = np.bincount(np.searchsorted(wanted, mine), minlength=wanted.size)
    pos = np.searchsorted(wanted, fitted["channel"])
    inside = (pos < wanted.size) & (wanted[np.minimum(pos, wanted.size - 1)] == fitted["channel"])
    n_hits = out["n_hits"].copy()
    out[pos[inside]] = fitted[inside]
    out["n_hits"] = n_hits
    # Channels with hits but no profile bin with enough entries.
    out["flag"][(out["flag"] == "no_hits") & (n_hits > 0)] = "too_few_bins"
    return out


def _rows_for(channel: npt.ArrayLike, constants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ch = np.asarray(channel).astype(np.int64, copy=False)
    table = np.atleast_1d(constants)
    order = np.argsort(table["channel"], kind="stable")
    sorted_ch = table["channel"][order].astype(np.int64)
    if sorted_ch.size == 0:
        return np.zeros(ch.shape, dtype=np.intp), np.zeros(ch.shape, dtype=bool)
    pos = np.clip(np.searchsorted(sorted_ch, ch), 0, sorted_ch.size - 1)
    return order[pos], sorted_ch[pos] == ch


def evaluate_timewalk(
    channel: npt.ArrayLike,
    tot_ns: npt.ArrayLike,
    constants: np.ndarray,
    *,
    method: Literal["sigmoid", "poly", "better"] = "sigmoid",
) -> FloatArray:
    """The fitted walk curve ``f(ToT)`` (ns, including the asymptote ``p3``) for each hit.

    ``poly`` evaluates the polynomial with ToT clamped to its fit range; ``better`` takes, per
    channel, the model named in ``better``. NaN for channels without usable constants.
    """
    row, known = _rows_for(channel, constants)
    c = np.atleast_1d(constants)[row]
    tot = np.asarray(tot_ns, dtype=np.float64)
    # Rows without constants hold NaN: they compute NaN quietly and are masked below.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        sig = timewalk_sigmoid(tot, c["p0_ns"], c["p1_ns"], c["p2_ns"], c["p3_ns"])
        x = np.clip(tot, c["poly_tot_min_ns"], c["poly_tot_max_ns"])
        x = (x - c["poly_center_ns"]) / c["poly_scale_ns"]
        poly = np.zeros_like(x)
        for k in range(MAX_POLY_ORDER, -1, -1):  # Horner; unused orders have zero coefficients
            poly = poly * x + c["poly_coef"][..., k]
    if method == "sigmoid":
        f = sig
        ok = np.isin(c["flag"], ("", "chi2_high", "at_bound"))
    elif method == "poly":
        f = poly
        ok = c["poly_order"] > 0
    elif method == "better":
        use_poly = c["better"] == "poly"
        f = np.where(use_poly, poly, sig)
        ok = c["better"] != ""
    else:
        raise ValueError(f"method must be 'sigmoid', 'poly' or 'better', got {method!r}")
    return np.where(known & ok, f, np.nan)


def correct_timewalk(
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    tot_ns: npt.ArrayLike,
    constants: np.ndarray,
    *,
    method: Literal["sigmoid", "poly", "better"] = "sigmoid",
    keep_offset: bool = False,
) -> FloatArray:
    """Correct hit times for the walk: ``t - f(ToT)`` per hit, vectorised.

    By default the whole fitted curve is subtracted, asymptote included (the PPS convention): the
    corrected times of every channel are centred on zero, so the channels are aligned as well.
    With ``keep_offset=True`` only the walk is removed and each channel keeps its time at large
    amplitude: ``p3`` for the sigmoid, the polynomial's value at ``poly_tot_max_ns`` for ``poly``.

    Returns:
        Corrected times (ns); NaN for hits of channels without usable constants or with NaN ToT.
    """
    f = evaluate_timewalk(channel, tot_ns, constants, method=method)
    t = np.asarray(t_ns, dtype=np.float64)
    if not keep_offset:
        return np.asarray(t - f, dtype=np.float64)
    row, _ = _rows_for(channel, constants)
    c = np.atleast_1d(constants)[row]
    if method == "sigmoid":
        offset = c["p3_ns"]
    else:
        top = evaluate_timewalk(channel, c["poly_tot_max_ns"], constants, method="poly")
        offset = top if method == "poly" else np.where(c["better"] == "poly", top, c["p3_ns"])
    return np.asarray(t - f + offset, dtype=np.float64)
