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

The profile is kept as running sums per (channel, ToT bin): number of hits, sums of ``t`` and
``t**2`` and of ToT and ToT**2 (:class:`TimewalkSums`). :func:`fit_timewalk` on hit columns and the
step-by-step :class:`TimewalkAccumulator` (the online and offline method ``timewalk``) both fill
those sums and fit the profile made from them, so they agree to rounding.

Outliers. A noise hit (HPTDC noise, about 2e-4 per channel and trigger, uniform over a 100 ns
gate) in a bin of 50 signal hits moves its mean by its distance / 50, up to a nanosecond, and
inflates the bin's error so much that the bin loses its weight in the fit. Each channel's
ToT range is cut into bands (``band_ns``, 1 ns); a band's reference time is the median of its first
``window_min_hits`` hits (more exactly: of all its hits up to the end of the block in which it
reaches that many; until then they wait in a small buffer), and only hits within ``window_ns``
(2 ns) of it enter the sums. The window is wide against the walk inside a band (at most ~1 ns for
slopes up to 1 ns/ns) and the resolution, and keeps ~4 % of the noise instead of all of it. The
reference depends only on the order of the data, so the same blocks in the same order (online, and
offline from the file) give the same sums. Hits cut are counted (``n_outliers``); a channel where
more than ``max_outlier_fraction`` of the hits are cut is flagged ``outliers``: the window is then
too narrow for its walk, or the data are bad.

Inputs are the hit columns (``channel``, ``t1`` as ``t``, ``tot``). Outputs are structured arrays,
one row per channel, with a ``flag`` (the package convention): ``""`` when fine; ``chi2_high``,
``at_bound`` or ``outliers`` (numbers given but doubtful); ``no_hits``, ``nan_times`` (every hit
had a NaN time or ToT), ``too_few_bins``, ``fit_failed`` (NaN).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from scipy import optimize

from teststand.analysis._grouping import batched_lstsq, stats_from_sums
from teststand.analysis.online import StepAccumulator

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Parameter bounds of the sigmoid (ns); ``p3`` is bounded relative to the data (see module doc).
P0_BOUNDS_NS = (0.0, 10.0)
P1_BOUNDS_NS = (0.0, 40.0)
P2_BOUNDS_NS = (0.05, 10.0)
P3_MARGIN_NS = 50.0
#: Highest polynomial order of the ALICE-style reference fit.
MAX_POLY_ORDER = 5
#: Outlier window: half-width (ns) around the reference time of a ToT band, the band width (ns)
#: and the number of hits a band's reference is taken from (see the module docstring).
WINDOW_NS = 2.0
BAND_NS = 1.0
WINDOW_MIN_HITS = 50

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
#: smaller chi2/ndf (``sigmoid`` or ``poly``, empty if neither fitted). ``n_hits`` counts every hit
#: of the channel, ``n_outliers`` those the outlier window cut.
TIMEWALK_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("n_hits", "<i8"),
        ("n_outliers", "<i8"),
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
#: Flags of a channel whose sigmoid has numbers (doubtful ones included) that a correction uses.
SIGMOID_USABLE_FLAGS = ("", "chi2_high", "at_bound", "outliers")


def timewalk_sigmoid(
    tot_ns: npt.ArrayLike,
    p0: npt.ArrayLike,
    p1: npt.ArrayLike,
    p2: npt.ArrayLike,
    p3: npt.ArrayLike,
) -> FloatArray:
    """The PPS walk function ``p0 / (exp((ToT - p1) / p2) + 1) + p3`` (ns); broadcasts."""
    u = (np.asarray(tot_ns, dtype=np.float64) - np.asarray(p1, dtype=np.float64)) / np.asarray(
        p2, dtype=np.float64
    )
    # 1 / (exp(u) + 1) written without overflow for large u
    s = 0.5 * (1.0 - np.tanh(0.5 * u))
    return np.asarray(
        np.asarray(p0, dtype=np.float64) * s + np.asarray(p3, dtype=np.float64), dtype=np.float64
    )


def _sigmoid_binned(x: FloatArray, v: FloatArray, p: Sequence[float]) -> FloatArray:
    """Mean of the sigmoid over a bin with ToT mean ``x`` and variance ``v`` (second order)."""
    p0, p1, p2, p3 = p
    s = 0.5 * (1.0 - np.tanh(0.5 * (x - p1) / p2))
    f = p0 * s + p3
    f2 = p0 / p2**2 * s * (1.0 - s) * (1.0 - 2.0 * s)
    return np.asarray(f + 0.5 * f2 * v, dtype=np.float64)


def _grouped_median(group: npt.NDArray[np.intp], x: FloatArray, n_groups: int) -> FloatArray:
    """Median of ``x`` per group (mean of the two middle values for even counts); NaN if empty."""
    srt = np.lexsort((x, group))
    xs = x[srt]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    out = np.full(n_groups, np.nan)
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    out[has] = 0.5 * (xs[lo] + xs[hi])
    return out


class TimewalkSums:
    """Running sums of the ToT profile per (channel row, ToT bin), behind an outlier window.

    Per bin: the number of hits and the sums of ``t - ref`` and its square (``ref`` the reference
    time of the bin's ToT band) and of ``ToT - lower edge`` and its square. The bins are fixed
    before any data (``bin_width_ns`` over ``tot_range_ns``). A band's reference is set once, from
    the median of its first hits (see the module docstring), and is also the shift that keeps the
    sums free of cancellation. Blocks added in the same order give the same sums.

    Args:
        n_channels: number of channel rows; :meth:`add` takes row indices ``0 .. n_channels - 1``.
        bin_width_ns, tot_range_ns: the ToT bins.
        window_ns: half-width of the outlier window around a band's reference; ``None`` or
            ``<= 0``: no window (every hit counts).
        band_ns: width of a band (rounded to whole bins).
        window_min_hits: hits a band collects before its reference is set.
    """

    def __init__(
        self,
        n_channels: int,
        *,
        bin_width_ns: float = 0.1,
        tot_range_ns: tuple[float, float] = (0.0, 50.0),
        window_ns: float | None = WINDOW_NS,
        band_ns: float = BAND_NS,
        window_min_hits: int = WINDOW_MIN_HITS,
    ) -> None:
        lo, hi = float(tot_range_ns[0]), float(tot_range_ns[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"ToT range must be finite with max > min, got ({lo}, {hi})")
        if not (math.isfinite(bin_width_ns) and bin_width_ns > 0):
            raise ValueError(f"bin_width_ns must be > 0, got {bin_width_ns}")
        if not (math.isfinite(band_ns) and band_ns > 0):
            raise ValueError(f"band_ns must be > 0, got {band_ns}")
        if window_min_hits < 1:
            raise ValueError(f"window_min_hits must be >= 1, got {window_min_hits}")
        self.n_channels = int(n_channels)
        self.tot_lo = lo
        self.bin_width = float(bin_width_ns)
        self.n_bins = int(np.ceil((hi - lo) / self.bin_width))
        self.tot_hi = hi
        self.bins_per_band = max(1, int(round(band_ns / self.bin_width)))
        self.n_bands = -(-self.n_bins // self.bins_per_band)
        self.window = float(window_ns) if window_ns is not None and window_ns > 0 else None
        self.window_min_hits = int(window_min_hits)
        size = self.n_channels * self.n_bins
        self.n = np.zeros(size, dtype=np.int64)
        self.s_t = np.zeros(size)
        self.s_t2 = np.zeros(size)
        self.s_x = np.zeros(size)
        self.s_x2 = np.zeros(size)
        self.ref = np.full(self.n_channels * self.n_bands, np.nan)
        #: per channel row: hits given, hits with a NaN time or ToT, hits cut by the window
        self.n_hits = np.zeros(self.n_channels, dtype=np.int64)
        self.n_nan = np.zeros(self.n_channels, dtype=np.int64)
        self.n_outliers = np.zeros(self.n_channels, dtype=np.int64)
        # hits of bands without a reference yet: (row, bin, t, tot)
        self._buffer: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], FloatArray, FloatArray]
        self._buffer = (np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0), np.zeros(0))

    def add(self, row: npt.ArrayLike, t_ns: npt.ArrayLike, tot_ns: npt.ArrayLike) -> None:
        """Fold a block of hits: channel rows (others are ignored), times and ToT (ns)."""
        r = np.asarray(row).astype(np.intp, copy=False).ravel()
        t = np.asarray(t_ns, dtype=np.float64).ravel()
        tot = np.asarray(tot_ns, dtype=np.float64).ravel()
        if not r.size == t.size == tot.size:
            raise ValueError("row, t_ns and tot_ns must have the same length")
        known = (r >= 0) & (r < self.n_channels)
        r, t, tot = r[known], t[known], tot[known]
        self.n_hits += np.bincount(r, minlength=self.n_channels)
        finite = np.isfinite(t) & np.isfinite(tot)
        self.n_nan += np.bincount(r[~finite], minlength=self.n_channels)
        ok = finite & (tot >= self.tot_lo) & (tot < self.tot_hi)
        r, t, tot = r[ok], t[ok], tot[ok]
        b = np.minimum(((tot - self.tot_lo) / self.bin_width).astype(np.intp), self.n_bins - 1)
        g = r * self.n_bands + b // self.bins_per_band
        has_ref = np.isfinite(self.ref[g])
        self._fold(self, r[has_ref], b[has_ref], t[has_ref], tot[has_ref], self.ref[g[has_ref]])
        wait = ~has_ref
        buf = self._buffer
        pr = np.concatenate((buf[0], r[wait]))
        pb = np.concatenate((buf[1], b[wait]))
        pt = np.concatenate((buf[2], t[wait]))
        px = np.concatenate((buf[3], tot[wait]))
        pg = pr * self.n_bands + pb // self.bins_per_band
        n_groups = self.ref.size
        ready = np.bincount(pg, minlength=n_groups) >= self.window_min_hits
        go = ready[pg]
        if go.any():
            med = _grouped_median(pg[go], pt[go], n_groups)
            self.ref[ready] = med[ready]
            self._fold(self, pr[go], pb[go], pt[go], px[go], self.ref[pg[go]])
        keep = ~go
        self._buffer = (pr[keep], pb[keep], pt[keep], px[keep])

    def _fold(
        self,
        into: TimewalkSums,
        r: npt.NDArray[np.intp],
        b: npt.NDArray[np.intp],
        t: FloatArray,
        tot: FloatArray,
        ref: FloatArray,
    ) -> None:
        """Add hits with known band references to the sums of ``into`` (self or a copy)."""
        d = t - ref
        if self.window is not None:
            inside = np.abs(d) <= self.window
            into.n_outliers += np.bincount(r[~inside], minlength=self.n_channels)
            r, b, d, tot = r[inside], b[inside], d[inside], tot[inside]
        size = self.n.size
        idx = r * self.n_bins + b
        dx = tot - (self.tot_lo + self.bin_width * b)
        into.n += np.bincount(idx, minlength=size)
        into.s_t += np.bincount(idx, d, minlength=size)
        into.s_t2 += np.bincount(idx, d * d, minlength=size)
        into.s_x += np.bincount(idx, dx, minlength=size)
        into.s_x2 += np.bincount(idx, dx * dx, minlength=size)

    def _settled(self) -> TimewalkSums:
        """The sums with the buffered hits folded in, each waiting band referenced to its own
        median; ``self`` when nothing waits. ``self`` is not changed."""
        pr, pb, pt, px = self._buffer
        if pr.size == 0:
            return self
        out = object.__new__(TimewalkSums)
        out.__dict__.update(self.__dict__)
        for name in ("n", "s_t", "s_t2", "s_x", "s_x2", "ref", "n_outliers"):
            setattr(out, name, getattr(self, name).copy())
        pg = pr * self.n_bands + pb // self.bins_per_band
        med = _grouped_median(pg, pt, self.ref.size)
        waiting = np.isfinite(med)
        out.ref[waiting] = med[waiting]
        self._fold(out, pr, pb, pt, px, out.ref[pg])
        out._buffer = (pr[:0], pb[:0], pt[:0], px[:0])
        return out

    def profile(self, channels: npt.ArrayLike | None = None, min_entries: int = 20) -> np.ndarray:
        """The profile of every (row, bin) with at least ``min_entries`` hits (and at least 2).

        Args:
            channels: the channel number of each row (default: the row index).
            min_entries: bins with fewer hits are left out.

        Returns:
            A :data:`TIMEWALK_PROFILE_DTYPE` array sorted by channel row and ToT.
        """
        s = self._settled()
        numbers = (
            np.arange(self.n_channels)
            if channels is None
            else np.asarray(channels).astype(np.int64).ravel()
        )
        if numbers.size != self.n_channels:
            raise ValueError(f"expected {self.n_channels} channel numbers, got {numbers.size}")
        keep = np.flatnonzero(s.n >= max(int(min_entries), 2))
        b = keep % self.n_bins
        r = keep // self.n_bins
        edge = self.tot_lo + self.bin_width * b
        ref = s.ref[r * self.n_bands + b // self.bins_per_band]
        st = stats_from_sums(s.n[keep], s.s_t[keep], s.s_t2[keep], ddof=1, shift=ref)
        sx = stats_from_sums(s.n[keep], s.s_x[keep], s.s_x2[keep], ddof=0, shift=edge)
        out = np.empty(keep.size, dtype=TIMEWALK_PROFILE_DTYPE)
        out["channel"] = numbers[r]
        out["tot_lo_ns"] = edge
        out["tot_hi_ns"] = edge + self.bin_width
        out["n"] = st.n
        out["tot_ns"] = sx.mean
        out["tot_var_ns2"] = sx.var
        out["t_ns"] = st.mean
        out["t_rms_ns"] = np.sqrt(st.var)
        out["t_err_ns"] = np.sqrt(st.var / st.n)
        return out


def timewalk_profile(
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    tot_ns: npt.ArrayLike,
    *,
    bin_width_ns: float = 0.1,
    tot_range_ns: tuple[float, float] = (0.0, 50.0),
    min_entries: int = 20,
    window_ns: float | None = None,
    band_ns: float = BAND_NS,
    window_min_hits: int = WINDOW_MIN_HITS,
) -> np.ndarray:
    """Profile of ``t`` versus ToT per channel: one block of :class:`TimewalkSums`, no loop.

    Args:
        channel, t_ns, tot_ns: hit columns (``t_ns`` is the leading time ``t1``).
        bin_width_ns: ToT bin width.
        tot_range_ns: ToT range binned; hits outside it, or with NaN time or ToT, are ignored.
        min_entries: bins with fewer hits are left out.
        window_ns, band_ns, window_min_hits: the outlier window (default: none), see
            :class:`TimewalkSums`.

    Returns:
        A :data:`TIMEWALK_PROFILE_DTYPE` array sorted by channel and ToT.
    """
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    channels, rows = np.unique(ch, return_inverse=True)
    sums = TimewalkSums(
        channels.size, bin_width_ns=bin_width_ns, tot_range_ns=tot_range_ns,
        window_ns=window_ns, band_ns=band_ns, window_min_hits=window_min_hits,
    )  # fmt: skip
    sums.add(rows.ravel(), t_ns, tot_ns)
    return sums.profile(channels, min_entries)


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


def _channel_table(
    wanted: npt.ArrayLike,
    fitted: np.ndarray,
    n_hits: npt.ArrayLike,
    n_nan: npt.ArrayLike,
    n_outliers: npt.ArrayLike,
    max_outlier_fraction: float,
) -> np.ndarray:
    """One :data:`TIMEWALK_DTYPE` row per ``wanted`` channel: the fit where there is one, the
    reason where there is none; ``n_hits``, ``n_nan``, ``n_outliers`` are per wanted channel."""
    wanted = np.asarray(wanted, dtype=np.int64)
    out = np.zeros(wanted.size, dtype=TIMEWALK_DTYPE)
    for name in out.dtype.names or ():
        if out.dtype[name].kind == "f":
            out[name] = np.nan
    out["channel"] = wanted
    out["flag"] = "no_hits"
    pos = np.searchsorted(wanted, fitted["channel"])
    inside = (pos < wanted.size) & (wanted[np.minimum(pos, wanted.size - 1)] == fitted["channel"])
    out[pos[inside]] = fitted[inside]
    hits = np.asarray(n_hits, dtype=np.int64)
    nan = np.asarray(n_nan, dtype=np.int64)
    cut = np.asarray(n_outliers, dtype=np.int64)
    out["n_hits"] = hits
    out["n_outliers"] = cut
    unfitted = out["flag"] == "no_hits"
    # Channels with hits but no profile bin with enough entries: say why.
    out["flag"][unfitted & (hits > 0) & (nan == hits)] = "nan_times"
    out["flag"][unfitted & (hits > 0) & (nan < hits)] = "too_few_bins"
    with np.errstate(invalid="ignore", divide="ignore"):
        many = cut > max_outlier_fraction * np.maximum(hits - nan, 1)
    out["flag"][(out["flag"] == "") & many] = "outliers"
    return out


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
    window_ns: float | None = WINDOW_NS,
    band_ns: float = BAND_NS,
    window_min_hits: int = WINDOW_MIN_HITS,
    max_outlier_fraction: float = 0.01,
) -> np.ndarray:
    """Time-walk calibration from hit columns: profile, sigmoid and polynomial per channel.

    The hits are one block of :class:`TimewalkSums`; :class:`TimewalkAccumulator` fed the same
    hits as one step gives the same table, and fed them step by step the same to rounding.

    Args:
        channel, t_ns, tot_ns: hit columns (``t1`` and ``tot`` of the HPTDC hits).
        channels: channels to report (e.g. the run's channel table); channels without hits get a
            ``no_hits`` row. Default: the channels present in the hits.
        bin_width_ns, tot_range_ns, min_entries: profile binning, see :func:`timewalk_profile`.
        max_chi2ndf, min_bins, max_trim_fraction: fit-range choice, see
            :func:`fit_timewalk_profile`.
        window_ns, band_ns, window_min_hits: the outlier window (``None``: none), see
            :class:`TimewalkSums`.
        max_outlier_fraction: a fitted channel with more of its hits cut is flagged ``outliers``.

    Returns:
        A :data:`TIMEWALK_DTYPE` array, one row per channel, sorted by channel.
    """
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    wanted = np.unique(ch) if channels is None else np.unique(np.asarray(channels, dtype=np.int64))
    rows = np.full(ch.size, -1, dtype=np.intp)
    if wanted.size:
        pos = np.clip(np.searchsorted(wanted, ch), 0, wanted.size - 1)
        rows = np.where(wanted[pos] == ch, pos, -1).astype(np.intp)
    sums = TimewalkSums(
        wanted.size, bin_width_ns=bin_width_ns, tot_range_ns=tot_range_ns, window_ns=window_ns,
        band_ns=band_ns, window_min_hits=window_min_hits,
    )  # fmt: skip
    sums.add(rows, t_ns, tot_ns)
    return _fit_sums(
        sums, wanted, min_entries=min_entries, max_chi2ndf=max_chi2ndf, min_bins=min_bins,
        max_trim_fraction=max_trim_fraction, max_outlier_fraction=max_outlier_fraction,
    )  # fmt: skip


def _fit_sums(
    sums: TimewalkSums,
    channels: npt.NDArray[np.int64],
    *,
    min_entries: int,
    max_chi2ndf: float,
    min_bins: int,
    max_trim_fraction: float,
    max_outlier_fraction: float,
) -> np.ndarray:
    """The per-channel table from the sums (``channels``: the channel number of each row),
    sorted by channel."""
    settled = sums._settled()
    profile = settled.profile(channels, min_entries)
    fitted = fit_timewalk_profile(
        profile, max_chi2ndf=max_chi2ndf, min_bins=min_bins, max_trim_fraction=max_trim_fraction
    )
    order = np.argsort(channels, kind="stable")
    return _channel_table(
        channels[order], fitted, settled.n_hits[order], settled.n_nan[order],
        settled.n_outliers[order], max_outlier_fraction,
    )  # fmt: skip


class TimewalkAccumulator(StepAccumulator):
    """The ``timewalk`` method, online and offline: profile sums per (channel, ToT bin).

    At each step end the step's hits (``channel``, ``t1``, ``tot``) are folded into
    :class:`TimewalkSums` over bins fixed by the parameters; :meth:`fit` builds the profile and
    fits the sigmoid and the polynomial per channel (:func:`fit_timewalk_profile`). Parameters
    (all floats, for ``--param``): the ToT bins ``bin_width_ns`` over ``tot_min_ns ..
    tot_max_ns``; ``min_entries`` per bin; the fit-range choice ``max_chi2ndf``, ``min_bins``,
    ``max_trim_fraction``; the outlier window ``window_ns`` (``<= 0``: none), ``band_ns``,
    ``window_min_hits`` and ``max_outlier_fraction``.

    The result is a :data:`TIMEWALK_DTYPE` table, one row per channel of the run's channel table
    (sorted by channel); it is also the constants table that :func:`correct_timewalk` and the
    ``resolution`` method apply.
    """

    method: ClassVar[str] = "timewalk"
    defaults: ClassVar[Mapping[str, Any]] = {
        "bin_width_ns": 0.1,
        "tot_min_ns": 0.0,
        "tot_max_ns": 50.0,
        "min_entries": 20.0,
        "max_chi2ndf": 2.0,
        "min_bins": 8.0,
        "max_trim_fraction": 0.5,
        "window_ns": WINDOW_NS,
        "band_ns": BAND_NS,
        "window_min_hits": float(WINDOW_MIN_HITS),
        "max_outlier_fraction": 0.01,
    }
    json_keys: ClassVar[Mapping[str, str]] = {
        "p0_ns": "p0_ns",
        "p1_ns": "p1_ns",
        "p2_ns": "p2_ns",
        "p3_ns": "p3_ns",
        "p0_err_ns": "p0_err_ns",
        "p1_err_ns": "p1_err_ns",
        "p2_err_ns": "p2_err_ns",
        "p3_err_ns": "p3_err_ns",
        "better": "better",
    }

    def __init__(self, channels: npt.NDArray[Any], axes: Sequence[str], **params: Any) -> None:
        super().__init__(channels, axes, **params)
        p = {k: float(v) for k, v in self.params.items()}
        self.params = p
        for name in ("min_entries", "min_bins", "window_min_hits"):
            if not (p[name] >= 1 and float(p[name]).is_integer()):
                raise ValueError(f"{name} must be a whole number >= 1, got {p[name]}")
        if not 0.0 <= p["max_trim_fraction"] < 1.0:
            raise ValueError(f"max_trim_fraction must be in [0, 1), got {p['max_trim_fraction']}")
        if not p["max_chi2ndf"] > 0:
            raise ValueError(f"max_chi2ndf must be > 0, got {p['max_chi2ndf']}")
        table = np.asarray(self.channels["channel"]).astype(np.int64)
        self._order = np.argsort(table, kind="stable")
        self._sorted = table[self._order]
        self.sums = TimewalkSums(
            self.n_channels,
            bin_width_ns=p["bin_width_ns"],
            tot_range_ns=(p["tot_min_ns"], p["tot_max_ns"]),
            window_ns=p["window_ns"],
            band_ns=p["band_ns"],
            window_min_hits=int(p["window_min_hits"]),
        )
        self._last: np.ndarray | None = None

    def _rows(self, channel: npt.ArrayLike) -> npt.NDArray[np.intp]:
        """Row in the channel table of every hit's channel; -1 for channels not in it."""
        ch = np.asarray(channel).astype(np.int64)
        if self._sorted.size == 0:
            return np.full(ch.shape, -1, dtype=np.intp)
        pos = np.clip(np.searchsorted(self._sorted, ch), 0, self._sorted.size - 1)
        return np.where(self._sorted[pos] == ch, self._order[pos], -1).astype(np.intp)

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: npt.NDArray[Any]) -> None:
        """Fold the step's hits into the profile sums."""
        if hits.size:
            self.sums.add(self._rows(hits["channel"]), hits["t1"], hits["tot"])

    def fit(self) -> np.ndarray:
        """Sigmoid and polynomial per channel of the channel table, from the sums so far."""
        p = self.params
        table = _fit_sums(
            self.sums,
            np.asarray(self.channels["channel"]).astype(np.int64),
            min_entries=int(p["min_entries"]),
            max_chi2ndf=p["max_chi2ndf"],
            min_bins=int(p["min_bins"]),
            max_trim_fraction=p["max_trim_fraction"],
            max_outlier_fraction=p["max_outlier_fraction"],
        )
        self._last = table
        return table

    def attrs(self) -> dict[str, Any]:
        """How many channels each model describes better, and the hits cut as outliers."""
        table = self._last if self._last is not None else self.fit()
        return {
            "n_better_sigmoid": int(np.sum(table["better"] == "sigmoid")),
            "n_better_poly": int(np.sum(table["better"] == "poly")),
            "n_outliers": int(table["n_outliers"].sum()),
        }


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
    if method not in ("sigmoid", "poly", "better"):
        raise ValueError(f"method must be 'sigmoid', 'poly' or 'better', got {method!r}")
    ch_b, tot_b = np.broadcast_arrays(np.asarray(channel), np.asarray(tot_ns, dtype=np.float64))
    out = np.full(tot_b.shape, np.nan)
    table = np.atleast_1d(constants)
    if table.size == 0:
        return out
    # Per row of the constants first, then gathered field by field for the hits: no per-hit copy
    # of whole constants rows.
    if method == "sigmoid":
        ok_row = np.isin(table["flag"], SIGMOID_USABLE_FLAGS)
        poly_row = np.zeros(table.size, dtype=bool)
    elif method == "poly":
        ok_row = table["poly_order"] > 0
        poly_row = np.ones(table.size, dtype=bool)
    else:
        ok_row = table["better"] != ""
        poly_row = table["better"] == "poly"
    row, known = _rows_for(ch_b, table)
    good = known & ok_row[row]
    r = row[good]
    x = tot_b[good]
    use_poly = poly_row[r]
    f = np.empty(r.size)
    # Rows without usable numbers (NaN) are masked above; NaN ToT stays NaN quietly.
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        rs, xs = r[~use_poly], x[~use_poly]
        f[~use_poly] = timewalk_sigmoid(
            xs, table["p0_ns"][rs], table["p1_ns"][rs], table["p2_ns"][rs], table["p3_ns"][rs]
        )
        rp = r[use_poly]
        xp = np.clip(x[use_poly], table["poly_tot_min_ns"][rp], table["poly_tot_max_ns"][rp])
        xp = (xp - table["poly_center_ns"][rp]) / table["poly_scale_ns"][rp]
        coef = table["poly_coef"]
        poly = np.zeros_like(xp)
        for k in range(MAX_POLY_ORDER, -1, -1):  # Horner; unused orders have zero coefficients
            poly = poly * xp + coef[rp, k]
        f[use_poly] = poly
    out[good] = f
    return out


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
    table = np.atleast_1d(constants)
    row, _ = _rows_for(channel, table)
    p3 = table["p3_ns"][row]
    if method == "sigmoid":
        offset = p3
    else:
        top = evaluate_timewalk(channel, table["poly_tot_max_ns"][row], table, method="poly")
        offset = top if method == "poly" else np.where(table["better"][row] == "poly", top, p3)
    return np.asarray(t - f + offset, dtype=np.float64)
