"""Per-channel time resolution, iterative (CMS PPS timing planes).

A 'track' crosses every plane once; in the laser bench it is one laser pulse lighting the same
pad (column) in every plane, so a track is the set of hits of one event in one column, and the
resolution of each plane's channel of that column is measured from the others. For plane ``p``
the other planes are combined with weights ``1 / sigma_q**2``,

    T_others = sum_q t_q / sigma_q**2 / sum_q 1 / sigma_q**2,

a Gaussian core is fitted to ``Delta_p = t_p - T_others`` and

    sigma_p**2 = sigma_Delta**2 - sigma_others**2,
    sigma_others**2 = 1 / sum_{q != p} 1 / sigma_q**2.

The weights start equal and are updated until the sigmas are stable. The common laser time jitter
cancels in every ``Delta_p``. With three planes the closed form
``sigma_1**2 = (s12**2 + s13**2 - s23**2) / 2`` from the pairwise differences is the cross-check
(:func:`three_plane_resolution`).

Gaussian core. A plain fit of the central +-2.5 sigma of a Gaussian finds a width 4.5 % too small,
because the window cuts the tails off. The core width here is the iterated truncated standard
deviation corrected for exactly that: with ``k = 2.5`` the variance of a Gaussian truncated at
``+-k sigma`` is ``c(k) sigma**2``, ``c(k) = 1 - 2 k phi(k) / (2 Phi(k) - 1)`` (0.911), so
``sigma**2 = var(window) / c(k)`` and the window is re-centred and re-sized until it stops moving.
The estimate is unbiased for Gaussian data and ignores tails beyond the window (noise, pile-up).

Statistical errors, by default, by linear propagation: each track's influence on the core
variances of the ``Delta_p`` (they are correlated, as they share the times) is propagated through
``sigma_p**2 = V_p - S_p(sigma)``; checked against the bootstrap and, on the simulator, by pulls
of unit width. On request a Poisson bootstrap over tracks: each replica reweights the tracks
with Poisson(1) weights and the whole iteration runs on all replicas at once (arrays of shape
``(replicas, tracks, planes)``, in chunks), so there is no loop over tracks either way (slower:
seconds for 100 replicas of 80,000 tracks).

What a sigma means (and what a comparison with a simulator's truth must include): ``sigma_ps``
is the spread of the measured times of the channel, everything that is independent between
planes included: the intrinsic resolution, the HPTDC binning of the leading edge (24.414 ps /
sqrt(12) = 7.0 ps in quadrature) and whatever the walk correction leaves (the ToT binning through
the walk slope, ``|f'(ToT)| * 7.0 ps``, at most 7 ps for a slope of 1 ns/ns). This is the right
weight for combining channels. ``sigma_intrinsic_ps`` removes the leading-edge binning only, when
``tdc_bin_ns`` is given. The intended input is walk-corrected times (:func:`teststand.analysis.
timewalk.correct_timewalk`): uncorrected times carry the walk of each pulse's own photoelectron
fluctuation (independent between planes, so it looks like resolution) and of the common laser
intensity jitter (correlated, so it biases the differences); a fixed-intensity run does not
remove the first.

Running sums: the method ``resolution`` (:class:`ResolutionAccumulator`, online and offline).
The reweighting changes ``Delta_p`` at every iteration, so no histogram of it can be filled
while the data arrive. What does not change is the covariance of the plane times: per channel
combination (a pad column) the accumulator keeps the number of tracks and the sums of the
differences ``z = t @ B`` (``B``: :func:`helmert_basis`, orthogonal to a common shift, so the
laser jitter and any offset drop out exactly) and of their outer products up to the fourth.
``Delta_p`` is the contrast ``a_p . t`` for any weights, so ``sigma_Delta**2 = a_p^T C a_p`` and
the iteration runs on the covariance ``C`` at fit time (:func:`solve_covariance`), with the same
fixed point as on the events. Outliers are kept out by a window fixed per combination from its
first ``min_tracks`` tracks: the ellipsoid holding all but ``window_tail`` (1e-4) of Gaussian
tracks, whose truncation shrinks the covariance by the known factor ``F_{d+2}(k2) / F_d(k2)``
(:func:`window_factor`, 0.9993 for three differences), divided out. Inside this wide window the
estimate is the full variance, with ``2 sigma**4 / N`` against the core fit's ``3 sigma**4 / N``:
errors sqrt(2/3) of those of :func:`fit_resolution`, which it agrees with within the spread of the
difference. Errors come from the fourth-moment sums (the sampling covariance of ``C``, no Gaussian
assumption), propagated like the event-level ones. ``docs/decisions/0004`` gives the reasons.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr
from scipy.stats import chi2 as chi2_dist

from teststand.analysis.online import StepAccumulator
from teststand.analysis.timewalk import correct_timewalk

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: Half-width of the Gaussian core window, in core sigmas.
CORE_K = 2.5

#: One row per channel. ``sigma_ps`` (with its statistical error) is the channel's resolution,
#: ``sigma_intrinsic_ps`` the same with the TDC binning removed (NaN unless ``tdc_bin_ns`` is
#: given), ``sigma_delta_ps`` the width of ``t_p - T_others`` and ``sigma_others_ps`` the
#: resolution of the weighted combination of the other planes. ``n_tracks`` tracks measured the
#: channel; ``n_iterations`` and ``converged`` describe the reweighting. ``n_planes`` is the
#: number of planes of the tracks that measured it. From the running sums
#: (:class:`ResolutionAccumulator`) only: ``sigma_3plane_ps``, the three-plane closed form (mean of
#: ``sigma**2`` over the plane triples holding the channel) as a cross-check, and ``n_outliers``,
#: the tracks cut by the outlier window; :func:`fit_resolution` leaves them NaN and 0. ``plane``
#: is -1 for a channel without tracks in :func:`fit_resolution`. Flags: ``""`` (fine);
#: ``not_converged``, ``outliers``, ``walk_not_corrected`` (numbers given);
#: ``negative_variance``, ``too_few_tracks``, ``no_tracks``, ``too_few_planes``, ``no_hits``,
#: ``nan_times``, ``no_constants``, ``no_error`` (sigma NaN).
RESOLUTION_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("plane", "<i2"),
        ("n_tracks", "<i8"),
        ("sigma_ps", "<f8"),
        ("sigma_err_ps", "<f8"),
        ("sigma_intrinsic_ps", "<f8"),
        ("sigma_intrinsic_err_ps", "<f8"),
        ("sigma_delta_ps", "<f8"),
        ("sigma_others_ps", "<f8"),
        ("sigma_3plane_ps", "<f8"),
        ("n_planes", "<i2"),
        ("n_outliers", "<i8"),
        ("n_iterations", "<i2"),
        ("converged", "?"),
        ("flag", "<U24"),
    ]
)

#: One row per plane of :func:`three_plane_resolution`: ``s_ab_ps`` are the core widths of the
#: pairwise differences with the two other planes (in plane order).
THREE_PLANE_DTYPE = np.dtype(
    [
        ("plane", "<i2"),
        ("n_tracks", "<i8"),
        ("sigma_ps", "<f8"),
        ("sigma_err_ps", "<f8"),
        ("flag", "<U24"),
    ]
)


def _core_factor(k: float) -> float:
    """Variance of a unit Gaussian truncated at +-k."""
    phi = np.exp(-0.5 * k * k) / np.sqrt(2 * np.pi)
    return float(1.0 - 2.0 * k * phi / (2.0 * ndtr(k) - 1.0))


class Tracks(NamedTuple):
    """Tracks with exactly one hit in every plane (from :func:`select_tracks`).

    Attributes:
        event: event number of each track, ``(n_tracks,)``.
        column: column (pad) of each track, or 0 when tracks are whole events.
        channel: ``(n_tracks, n_planes)`` channel hit in each plane; -1 for a plane without
            exactly one hit (only with ``select_tracks(..., min_planes=...)``).
        t_ns: ``(n_tracks, n_planes)`` its time (NaN where the channel is -1).
        planes: the plane numbers, ``(n_planes,)``, the order of the columns above.
    """

    event: npt.NDArray[np.uint64]
    column: npt.NDArray[np.int64]
    channel: npt.NDArray[np.int64]
    t_ns: FloatArray
    planes: npt.NDArray[np.int64]


def select_tracks(
    event: npt.ArrayLike,
    channel: npt.ArrayLike,
    t_ns: npt.ArrayLike,
    channels: np.ndarray,
    *,
    column_field: str | None = "bar",
    planes: npt.ArrayLike | None = None,
    min_planes: int | None = None,
) -> Tracks:
    """Group hits into tracks and keep those with exactly one hit in every plane (vectorised).

    Args:
        event, channel, t_ns: hit columns (``t_ns``: walk-corrected times, ns).
        channels: the channel table (structured array with ``channel``, ``plane`` and, for the
            default ``column_field``, ``bar``).
        column_field: field of the channel table naming the column a laser track lights (the pad,
            ``bar``); a track is one event in one column. ``None``: a track is a whole event.
        planes: the planes to use (default: every plane of the table). Hits in other planes and
            hits of channels missing from the table are ignored.
        min_planes: if given, keep the tracks with exactly one hit in at least this many planes;
            the other planes of such a track (no hit, or several) hold channel -1 and time NaN.

    Returns:
        :class:`Tracks`, sorted by event and column. Hits with a NaN time count as absent.
    """
    table = np.asarray(channels)
    ev = np.asarray(event).astype(np.uint64, copy=False).ravel()
    ch = np.asarray(channel).astype(np.int64, copy=False).ravel()
    t = np.asarray(t_ns, dtype=np.float64).ravel()
    if not ev.size == ch.size == t.size:
        raise ValueError("event, channel and t_ns must have the same length")
    order = np.argsort(table["channel"], kind="stable")
    tab_ch = table["channel"][order].astype(np.int64)
    tab_plane = table["plane"][order].astype(np.int64)
    tab_col = (
        np.zeros(tab_ch.size, dtype=np.int64)
        if column_field is None
        else table[column_field][order].astype(np.int64)
    )
    plane_list = np.unique(tab_plane) if planes is None else np.unique(np.asarray(planes))
    n_planes = plane_list.size
    pos = np.clip(np.searchsorted(tab_ch, ch), 0, max(tab_ch.size - 1, 0))
    known = (tab_ch[pos] == ch) & np.isfinite(t)
    pl = np.searchsorted(plane_list, tab_plane[pos])
    known &= (pl < n_planes) & (plane_list[np.minimum(pl, n_planes - 1)] == tab_plane[pos])
    ev, ch, t, pl, col = ev[known], ch[known], t[known], pl[known], tab_col[pos[known]]

    srt = np.lexsort((pl, col, ev))
    ev, ch, t, pl, col = ev[srt], ch[srt], t[srt], pl[srt], col[srt]
    new = np.ones(ev.size, dtype=bool)
    new[1:] = (ev[1:] != ev[:-1]) | (col[1:] != col[:-1])
    track = np.cumsum(new) - 1
    n_tr = int(track[-1]) + 1 if track.size else 0
    counts = np.bincount(track * n_planes + pl, minlength=n_tr * n_planes).reshape(n_tr, n_planes)
    single = counts == 1
    if min_planes is None:
        good = np.all(single, axis=1)
    else:
        good = single.sum(axis=1) >= min_planes
    keep = good[track] & single[track, pl]
    new_id = np.cumsum(good) - 1
    n_good = int(good.sum())
    ch_out = np.full((n_good, n_planes), -1, dtype=np.int64)
    t_out = np.full((n_good, n_planes), np.nan)
    rows = new_id[track[keep]]
    ch_out[rows, pl[keep]] = ch[keep]
    t_out[rows, pl[keep]] = t[keep]
    firsts = np.flatnonzero(new)[good]
    return Tracks(ev[firsts], col[firsts], ch_out, t_out, plane_list.astype(np.int64))


class _CoreFit(NamedTuple):
    mean: FloatArray
    sigma: FloatArray


def _grouped_median(idx: IntArray, x: FloatArray, n_groups: int) -> FloatArray:
    """Median per group (lower median for even counts), by one sort."""
    srt = np.lexsort((x, idx))
    counts = np.bincount(idx, minlength=n_groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    mid = starts + (counts - 1) // 2
    out = np.full(n_groups, np.nan)
    has = counts > 0
    out[has] = x[srt][mid[has]]
    return out


def _robust_start(x: FloatArray, idx: IntArray, n_groups: int) -> _CoreFit:
    """Median and 1.4826 * MAD per group (the standard deviation where the MAD is 0)."""
    mu = _grouped_median(idx, x, n_groups)
    s = 1.4826 * _grouped_median(idx, np.abs(x - mu[idx]), n_groups)
    n0 = np.bincount(idx, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(np.bincount(idx, (x - mu[idx]) ** 2, minlength=n_groups) / n0)
    return _CoreFit(mu, np.where(s > 0, s, sd))


def _core_step(
    x: FloatArray,
    idx: IntArray,
    n_groups: int,
    w: FloatArray | None,
    core: _CoreFit,
    k: float = CORE_K,
) -> _CoreFit:
    """One step of the truncation-corrected core fit: re-centre and re-size the +-k window.

    Its fixed point is the Gaussian (mean, sigma) for Gaussian data: the variance inside
    ``+-k sigma`` is ``c(k) sigma**2``.
    """
    inside = np.abs(x - core.mean[idx]) < k * core.sigma[idx]
    wi = inside.astype(np.float64) if w is None else w * inside
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.bincount(idx, wi, minlength=n_groups)
        mu = np.bincount(idx, wi * x, minlength=n_groups) / n
        var = np.bincount(idx, wi * (x - mu[idx]) ** 2, minlength=n_groups) / n
    return _CoreFit(mu, np.sqrt(var / _core_factor(k)))


def _core_fit(
    x: FloatArray,
    idx: IntArray,
    n_groups: int,
    w: FloatArray | None = None,
    start: _CoreFit | None = None,
    max_iter: int = 100,
    tol: float = 1e-9,
) -> _CoreFit:
    """Gaussian core (mean, sigma) of ``x`` per group, iterated to its fixed point."""
    core = _robust_start(x, idx, n_groups) if start is None else start
    for _ in range(max_iter):
        new = _core_step(x, idx, n_groups, w, core)
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.nanmax(np.abs(new.sigma - core.sigma) / new.sigma, initial=0.0)
        core = new
        if change < tol:
            break
    return core


def _core_influence(x: FloatArray, idx: IntArray, core: _CoreFit, k: float = CORE_K) -> FloatArray:
    """Influence of each entry on the core variance estimate (ns^2), for Gaussian data.

    The estimator solves ``E[1{|x - mu| < k s} ((x - mu)**2 - c s**2)] = 0``; differentiating
    that condition (window edges included) gives the influence
    ``1{in} ((x - mu)**2 - c s**2) / kappa`` with ``kappa = c P_in - k (k**2 - c) phi(k)``
    (0.666 for k = 2.5). ``var(V) = var(influence) / N``: 3.0 sigma**4 / N for Gaussian data,
    against 2 sigma**4 / N for the sample variance (the price of ignoring the tails).
    """
    c = _core_factor(k)
    phi = np.exp(-0.5 * k * k) / np.sqrt(2 * np.pi)
    p_in = 2.0 * ndtr(k) - 1.0
    kappa = c * p_in - k * (k * k - c) * phi
    dx = x - core.mean[idx]
    s = core.sigma[idx]
    inside = np.abs(dx) < k * s
    return np.asarray(np.where(inside, (dx * dx - c * s * s) / kappa, 0.0), dtype=np.float64)


class _Solution(NamedTuple):
    sigma2: FloatArray  # (B, G, P) ns^2, may be <= 0
    var_delta: FloatArray  # (B, G, P)
    var_others: FloatArray  # (B, G, P)
    delta: FloatArray  # flat (B, n, P) differences t_p - T_others at the solution
    core: _CoreFit  # flat over (B, G, P)
    n_iter: int
    converged: npt.NDArray[np.bool_]  # (B, G)


def _iterate(
    t: FloatArray,
    g: IntArray,
    n_groups: int,
    w: FloatArray | None,
    start: _Solution | None,
    max_iter: int,
    tol: float,
) -> _Solution:
    """The reweighting iteration for ``B`` event weightings at once (``w`` is (B, n) or None).

    Each round updates the weights from the current sigmas and moves the core window of every
    ``Delta_p`` one step; both converge together to the same fixed point as nested loops would,
    at the cost of one pass over the data per round.
    """
    n_ev, n_pl = t.shape
    n_b = 1 if w is None else w.shape[0]
    n_cells = n_b * n_groups * n_pl
    idx = ((np.arange(n_b)[:, None, None] * n_groups + g[None, :, None]) * n_pl
           + np.arange(n_pl)[None, None, :]).ravel()  # fmt: skip
    w_flat = None if w is None else np.repeat(w[:, :, None], n_pl, axis=2).ravel()
    core: _CoreFit | None
    if start is None:
        sig2 = np.ones((n_b, n_groups, n_pl))
        core = None
    else:
        # The start is a single (central) solution: one copy per replica.
        sig2 = np.broadcast_to(start.sigma2, (n_b, n_groups, n_pl)).copy()
        core = _CoreFit(*(np.tile(a[: n_groups * n_pl], n_b) for a in start.core))
    converged = np.zeros((n_b, n_groups), dtype=bool)
    var_d = var_o = np.full((n_b, n_groups, n_pl), np.nan)
    delta = np.zeros(0)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        # A plane whose variance came out <= 0 keeps a finite weight, at most 100 times that of
        # the worst plane of its group, so that it cannot swamp the combination.
        positive = np.where(sig2 > 0, sig2, 0.0)
        floor = 0.01 * positive.max(axis=2, keepdims=True)
        wq = 1.0 / np.maximum(sig2, np.where(floor > 0, floor, 1e-6))  # (B, G, P)
        we = wq[:, g, :]  # (B, n, P)
        sw = we.sum(axis=2, keepdims=True)
        swt = (we * t[None]).sum(axis=2, keepdims=True)
        delta = (t[None] - (swt - we * t[None]) / (sw - we)).ravel()
        var_o = 1.0 / (wq.sum(axis=2, keepdims=True) - wq)
        if core is None:
            core = _robust_start(delta, idx, n_cells)
        core = _core_step(delta, idx, n_cells, w_flat, core)
        var_d = (core.sigma**2).reshape(n_b, n_groups, n_pl)
        new = var_d - var_o
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.abs(new - sig2) / var_d
        converged = np.all((change < tol) | ~np.isfinite(change), axis=2)
        sig2 = new
        if converged.all():
            break
    assert core is not None
    return _Solution(sig2, var_d, var_o, delta, core, n_iter, converged)


def _analytic_errors(t: FloatArray, g: IntArray, n_groups: int, sol: _Solution) -> FloatArray:
    """Errors (ns) of the central sigmas by linear propagation; (G, P).

    The core variances ``V_p`` of the ``Delta_p`` fluctuate together (they share the times);
    their covariance is that of the per-track influence values. ``sigma_p**2 = V_p - S_p`` with
    ``S_p = 1 / sum_{q != p} 1 / sigma_q**2`` gives ``(I + A) d sigma**2 = d V``,
    ``A_pq = S_p**2 / sigma_q**4`` (q != p). The weights themselves do not enter to first order:
    ``V_p`` is stationary at the optimal weights.
    """
    n_ev, n_pl = t.shape
    idx = (g[:, None] * n_pl + np.arange(n_pl)[None, :]).ravel()
    infl = _core_influence(sol.delta, idx, sol.core).reshape(n_ev, n_pl)
    n = np.bincount(g, minlength=n_groups).astype(np.float64)
    sums = np.stack([np.bincount(g, infl[:, p], minlength=n_groups) for p in range(n_pl)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.asarray(sums / n[:, None], dtype=np.float64)
        cov_v = np.empty((n_groups, n_pl, n_pl))
        for p in range(n_pl):
            for q in range(p, n_pl):
                s_pq = np.bincount(g, infl[:, p] * infl[:, q], minlength=n_groups)
                cov_v[:, p, q] = cov_v[:, q, p] = (s_pq / n - mean[:, p] * mean[:, q]) / n
        sig2 = sol.sigma2[0]
        s_o = sol.var_others[0]
        a = s_o[:, :, None] ** 2 / np.where(sig2 > 0, sig2, np.nan)[:, None, :] ** 2
        a[:, np.arange(n_pl), np.arange(n_pl)] = 0.0
        m = np.eye(n_pl)[None] + a
        ok = np.all(np.isfinite(m), axis=(1, 2)) & np.all(np.isfinite(cov_v), axis=(1, 2))
        jac = np.full_like(m, np.nan)
        jac[ok] = np.linalg.inv(m[ok])
        cov_s2 = np.einsum("gpi,gij,gqj->gpq", jac, cov_v, jac)
        var_s2 = np.einsum("gpp->gp", cov_s2)
        return np.asarray(np.sqrt(np.maximum(var_s2, 0.0)) / (2.0 * np.sqrt(sig2)))


def _bootstrap(
    t: FloatArray,
    g: IntArray,
    n_groups: int,
    central: _Solution,
    n_boot: int,
    seed: int | None,
    max_iter: int,
    tol: float,
    chunk_elements: int = 4_000_000,
) -> FloatArray:
    """Sigma (ns) of every (replica, group, plane) from Poisson-bootstrap replicas."""
    rng = np.random.default_rng(seed)
    n_ev, n_pl = t.shape
    chunk = max(1, min(n_boot, chunk_elements // max(n_ev * n_pl, 1)))
    out = []
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        w = rng.poisson(1.0, size=(b, n_ev)).astype(np.float64)
        sol = _iterate(t, g, n_groups, w, central, max_iter, tol)
        out.append(np.sqrt(np.where(sol.sigma2 > 0, sol.sigma2, np.nan)))
        done += b
    return np.concatenate(out, axis=0)


def resolve_planes(
    t_ns: npt.ArrayLike,
    group: npt.ArrayLike | None = None,
    *,
    max_iter: int = 200,
    tol: float = 1e-7,
    errors: Literal["analytic", "bootstrap"] = "analytic",
    n_boot: int = 100,
    seed: int | None = 0,
) -> dict[str, np.ndarray]:
    """The iterative method on a ``(n_tracks, n_planes)`` time array, one result per group.

    Args:
        t_ns: times of each track in each plane (ns).
        group: group of each track (e.g. the channel combination); default one group.
        max_iter, tol: the iteration stops when every sigma**2 moves by less than
            ``tol * sigma_Delta**2`` in a round, or after ``max_iter`` rounds.
        errors: ``analytic`` (linear propagation of the per-track influence on the core
            widths; fast) or ``bootstrap`` (Poisson bootstrap over tracks, ``n_boot`` replicas
            solved together, seeded by ``seed``).

    Returns:
        Arrays of shape ``(n_groups, n_planes)``: ``sigma_ns``, ``sigma2_ns2``, ``sigma_err_ns``,
        ``sigma_delta_ns``, ``sigma_others_ns``, ``n_tracks``; ``converged`` ``(n_groups,)`` and
        ``n_iterations``.
    """
    t = np.asarray(t_ns, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] < 3:
        raise ValueError(f"t_ns must be (n_tracks, n_planes >= 3), got shape {t.shape}")
    if errors not in ("analytic", "bootstrap"):
        raise ValueError(f"errors must be 'analytic' or 'bootstrap', got {errors!r}")
    gi = (
        np.zeros(t.shape[0], dtype=np.intp)
        if group is None
        else np.unique(np.asarray(group), return_inverse=True)[1].astype(np.intp).ravel()
    )
    n_groups = int(gi.max()) + 1 if gi.size else 0
    # Remove each group's mean time per plane: the differences then sit near zero and carry
    # no large offsets into the sums (offsets cancel in the core fit anyway).
    cnt = np.bincount(gi, minlength=n_groups)[:, None]
    means = np.stack([np.bincount(gi, t[:, p], minlength=n_groups) for p in range(t.shape[1])], 1)
    t = t - (means / np.maximum(cnt, 1))[gi]
    central = _iterate(t, gi, n_groups, None, None, max_iter, tol)
    sigma2 = central.sigma2[0]
    sigma = np.sqrt(np.where(sigma2 > 0, sigma2, np.nan))
    if errors == "analytic":
        err = _analytic_errors(t, gi, n_groups, central)
    elif n_boot > 1 and n_groups:
        reps = _bootstrap(t, gi, n_groups, central, n_boot, seed, max_iter, 1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (negative) cells
            err = np.nanstd(reps, axis=0, ddof=1)
    else:
        err = np.full_like(sigma, np.nan)
    return {
        "sigma_ns": sigma,
        "sigma2_ns2": sigma2,
        "sigma_err_ns": np.where(np.isfinite(sigma), err, np.nan),
        "sigma_delta_ns": np.sqrt(central.var_delta[0]),
        "sigma_others_ns": np.sqrt(central.var_others[0]),
        "n_tracks": np.broadcast_to(np.bincount(gi, minlength=n_groups)[:, None], sigma.shape),
        "converged": central.converged[0],
        "n_iterations": np.asarray(central.n_iter),
    }


def fit_resolution(
    tracks: Tracks,
    *,
    channels: npt.ArrayLike | None = None,
    min_tracks: int = 200,
    tdc_bin_ns: float | None = None,
    max_iter: int = 200,
    tol: float = 1e-7,
    errors: Literal["analytic", "bootstrap"] = "analytic",
    n_boot: int = 100,
    seed: int | None = 0,
) -> np.ndarray:
    """Per-channel resolution by the iterative method (see the module docstring).

    Tracks are grouped by their channel combination (one group per laser column); each group is
    solved on its own, all groups at once. A channel measured in several combinations gets the
    error-weighted mean of its sigmas.

    Args:
        tracks: from :func:`select_tracks` (walk-corrected times).
        channels: channel numbers to report (default: those in the tracks); channels without
            tracks are flagged ``no_tracks``.
        min_tracks: combinations with fewer tracks are flagged ``too_few_tracks``.
        tdc_bin_ns: TDC bin width to remove in quadrature for ``sigma_intrinsic_ps`` (25/1024 ns
            for the HPTDC); ``None`` leaves it NaN.
        max_iter, tol, errors, n_boot, seed: see :func:`resolve_planes`.

    Returns:
        A :data:`RESOLUTION_DTYPE` array, one row per channel, sorted by channel.
    """
    ch_tr = np.asarray(tracks.channel, dtype=np.int64)
    n_tr, n_pl = ch_tr.shape if ch_tr.ndim == 2 else (0, 0)
    wanted = (
        np.unique(ch_tr) if channels is None else np.unique(np.asarray(channels, dtype=np.int64))
    )
    out = np.zeros(wanted.size, dtype=RESOLUTION_DTYPE)
    for name in out.dtype.names or ():
        if out.dtype[name].kind == "f":
            out[name] = np.nan
    out["channel"] = wanted
    out["plane"] = -1
    out["flag"] = "no_tracks"
    if n_tr == 0:
        return out
    combos, combo_of, combo_n = np.unique(ch_tr, axis=0, return_inverse=True, return_counts=True)
    combo_of = combo_of.ravel()
    usable = combo_n >= min_tracks
    flat_ch = combos.ravel()
    flat_plane = np.broadcast_to(np.asarray(tracks.planes)[None, :], combos.shape).ravel()
    flat_n = np.repeat(combo_n, n_pl)
    # Rows of every (combination, plane) in the output.
    pos = np.searchsorted(wanted, flat_ch)
    inside = (pos < wanted.size) & (wanted[np.minimum(pos, wanted.size - 1)] == flat_ch)
    out["plane"][pos[inside]] = flat_plane[inside]
    n_per = np.bincount(pos[inside], flat_n[inside], minlength=wanted.size).astype(np.int64)
    out["n_tracks"] = n_per
    out["flag"][n_per > 0] = "too_few_tracks"
    if n_pl < 3:
        out["flag"][n_per > 0] = "too_few_planes"
        return out
    if not usable.any():
        return out

    sel = usable[combo_of]
    res = resolve_planes(
        tracks.t_ns[sel], combo_of[sel], max_iter=max_iter, tol=tol, errors=errors,
        n_boot=n_boot, seed=seed,
    )  # fmt: skip
    # Map (usable combination, plane) back to channels; combine repeats by inverse variance.
    used_combos = np.flatnonzero(usable)
    fch = combos[used_combos].ravel()
    p = np.searchsorted(wanted, fch)
    ok_row = (p < wanted.size) & (wanted[np.minimum(p, wanted.size - 1)] == fch)
    p = p[ok_row]

    def pick(key: str) -> FloatArray:
        return np.asarray(np.asarray(res[key], dtype=np.float64).ravel()[ok_row])

    sigma2, err = pick("sigma2_ns2"), pick("sigma_err_ns")
    s_delta, s_oth = pick("sigma_delta_ns"), pick("sigma_others_ns")
    conv = np.repeat(res["converged"], n_pl)[ok_row]
    positive = sigma2 > 0
    sigma = np.sqrt(np.where(positive, sigma2, np.nan))
    wgt = np.where(positive & (err > 0), 1.0 / err**2, 0.0)
    m = wanted.size
    sw = np.bincount(p, wgt, minlength=m)
    has_err = sw > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        s_mean = np.bincount(p, wgt * np.nan_to_num(sigma), minlength=m) / sw
        e_mean = 1.0 / np.sqrt(sw)
        # Without bootstrap errors: plain mean over the combinations.
        n_pos = np.bincount(p, positive, minlength=m)
        s_plain = np.bincount(p, np.nan_to_num(sigma), minlength=m) / n_pos
        d_mean = np.bincount(p, s_delta, minlength=m) / np.bincount(p, minlength=m)
        o_mean = np.bincount(p, s_oth, minlength=m) / np.bincount(p, minlength=m)
    seen = np.bincount(p, minlength=m) > 0
    all_conv = np.bincount(p, ~conv, minlength=m) == 0
    sig_ns = np.where(has_err, s_mean, np.where(n_pos > 0, s_plain, np.nan))
    err_ns = np.where(has_err, e_mean, np.nan)
    out["sigma_ps"][seen] = 1e3 * sig_ns[seen]
    out["sigma_err_ps"][seen] = 1e3 * err_ns[seen]
    out["sigma_delta_ps"][seen] = 1e3 * d_mean[seen]
    out["sigma_others_ps"][seen] = 1e3 * o_mean[seen]
    out["n_iterations"][seen] = int(res["n_iterations"])
    out["n_planes"][seen] = n_pl
    out["converged"][seen] = all_conv[seen]
    out["flag"][seen] = np.where(
        n_pos[seen] == 0, "negative_variance", np.where(all_conv[seen], "", "not_converged")
    )
    if tdc_bin_ns is not None:
        q_ps2 = (1e3 * tdc_bin_ns) ** 2 / 12.0
        s = out["sigma_ps"]
        with np.errstate(invalid="ignore"):
            intrinsic = np.sqrt(s**2 - q_ps2)
            out["sigma_intrinsic_ps"] = intrinsic
            out["sigma_intrinsic_err_ps"] = out["sigma_err_ps"] * s / intrinsic
    return out


def three_plane_resolution(
    t_ns: npt.ArrayLike,
    *,
    planes: npt.ArrayLike | None = None,
    errors: Literal["analytic", "bootstrap"] = "analytic",
    n_boot: int = 100,
    seed: int | None = 0,
) -> np.ndarray:
    """Closed-form resolutions of three planes from their pairwise differences.

    ``sigma_1**2 = (s12**2 + s13**2 - s23**2) / 2`` and cyclically, with ``s_ab`` the Gaussian
    core width of ``t_a - t_b`` (the same truncation-corrected estimator as the iterative
    method). Errors as in :func:`resolve_planes`.

    Args:
        t_ns: ``(n_tracks, 3)`` times (ns), one channel per plane.
        planes: plane numbers for the rows (default 0, 1, 2).
        errors, n_boot, seed: ``analytic`` propagation or a Poisson bootstrap over tracks.

    Returns:
        A :data:`THREE_PLANE_DTYPE` array, three rows (``sigma_ps`` NaN and flagged
        ``negative_variance`` when the combination is negative).
    """
    t = np.asarray(t_ns, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] != 3:
        raise ValueError(f"t_ns must be (n_tracks, 3), got shape {t.shape}")
    if errors not in ("analytic", "bootstrap"):
        raise ValueError(f"errors must be 'analytic' or 'bootstrap', got {errors!r}")
    n = t.shape[0]
    t = t - t.mean(axis=0)
    d = np.stack([t[:, 0] - t[:, 1], t[:, 0] - t[:, 2], t[:, 1] - t[:, 2]], axis=1)  # (n, 3)
    idx = np.broadcast_to(np.arange(3), d.shape).ravel()
    # sigma**2 = M s**2 for s**2 = (s12**2, s13**2, s23**2)
    m = 0.5 * np.array([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])

    central = _core_fit(d.ravel(), idx, 3)
    sig2 = m @ central.sigma**2
    err = np.full(3, np.nan)
    if n > 1 and errors == "analytic":
        infl = _core_influence(d.ravel(), idx, central).reshape(n, 3)
        cov_v = np.cov(infl, rowvar=False, ddof=0) / n
        var_s2 = np.diag(m @ cov_v @ m.T)
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.sqrt(var_s2) / (2.0 * np.sqrt(sig2))
    elif n > 1 and n_boot > 1:
        rng = np.random.default_rng(seed)
        w = rng.poisson(1.0, size=(n_boot, n)).astype(np.float64)
        idx_b = np.arange(n_boot)[:, None, None] * 3 + np.arange(3)[None, None, :]
        idx_b = np.broadcast_to(idx_b, (n_boot, n, 3)).ravel()
        start = _CoreFit(*(np.tile(a, n_boot) for a in central))
        reps = _core_fit(
            np.broadcast_to(d[None], (n_boot, n, 3)).ravel(), idx_b, 3 * n_boot,
            np.repeat(w[:, :, None], 3, axis=2).ravel(), start, tol=1e-6,
        )  # fmt: skip
        rep_sig2 = reps.sigma.reshape(n_boot, 3) ** 2 @ m.T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            err = np.nanstd(np.sqrt(np.where(rep_sig2 > 0, rep_sig2, np.nan)), axis=0, ddof=1)
    out = np.zeros(3, dtype=THREE_PLANE_DTYPE)
    out["plane"] = np.arange(3) if planes is None else np.asarray(planes)
    out["n_tracks"] = n
    positive = sig2 > 0
    out["sigma_ps"] = np.where(positive, 1e3 * np.sqrt(np.where(positive, sig2, 1.0)), np.nan)
    out["sigma_err_ps"] = np.where(positive, 1e3 * err, np.nan)
    out["flag"] = np.where(positive, "", "negative_variance")
    return out


# -- Running sums: the online and offline method ---------------------------------------------------

#: Tail probability of a Gaussian track outside the outlier window (Mahalanobis ellipsoid).
WINDOW_TAIL = 1e-4
#: The HPTDC bin (25 ns / 1024), the default ``tdc_bin_ns`` of :class:`ResolutionAccumulator`.
HPTDC_BIN_NS = 25.0 / 1024.0


def helmert_basis(n_planes: int) -> FloatArray:
    """``(n_planes, n_planes - 1)`` orthonormal basis of the differences between planes.

    Its columns are orthogonal to ``(1, ..., 1)``: ``z = t @ B`` holds everything of a track's
    times except their mean, so the common laser jitter and any common offset drop out exactly.
    """
    b = np.zeros((n_planes, n_planes - 1))
    for j in range(1, n_planes):
        norm = np.sqrt(j * (j + 1.0))
        b[:j, j - 1] = 1.0 / norm
        b[j, j - 1] = -j / norm
    return b


def window_factor(dim: int, tail: float) -> tuple[float, float]:
    """Radius**2 ``k2`` of the ellipsoid holding all but ``tail`` of a ``dim``-d Gaussian, and the
    factor ``c`` by which truncation to it shrinks the covariance: ``F_{dim+2}(k2) / F_dim(k2)``
    with ``F_m`` the chi2 distribution function of ``m`` degrees of freedom."""
    k2 = float(chi2_dist.isf(tail, dim))
    return k2, float(chi2_dist.cdf(k2, dim + 2) / chi2_dist.cdf(k2, dim))


class _Window(NamedTuple):
    centre: FloatArray  # (d,) in difference space
    inv_cov: FloatArray  # (d, d)


def _robust_window(t: FloatArray, k2: float, c: float, max_iter: int = 100) -> _Window:
    """The outlier window of a group's first tracks ``t`` (n, P).

    Start: the median of the differences and per-plane variances solved from the pairwise
    ``(1.4826 MAD)**2`` of ``t_p - t_q`` (they are ``sigma_p**2 + sigma_q**2``). Then the
    truncation-corrected covariance of the tracks inside the ellipsoid ``k2`` is iterated to its
    fixed point, the multivariate twin of the Gaussian-core iteration of :func:`fit_resolution`.
    """
    n_pl = t.shape[1]
    basis = helmert_basis(n_pl)
    z = t @ basis
    centre = np.median(z, axis=0)
    pairs = [(p, q) for p in range(n_pl) for q in range(p + 1, n_pl)]
    design = np.zeros((len(pairs), n_pl))
    s2 = np.empty(len(pairs))
    for k, (p, q) in enumerate(pairs):
        d = t[:, p] - t[:, q]
        design[k, [p, q]] = 1.0
        s2[k] = (1.4826 * np.median(np.abs(d - np.median(d)))) ** 2
    sig2 = np.linalg.lstsq(design, s2, rcond=None)[0]
    # (0.01 ps)**2 on the diagonal keeps the window's covariance invertible for degenerate data
    # (equal times, a perfect plane); it shapes the window only, never the sums.
    eps = 1e-10
    floor = max(1e-3 * float(np.max(s2, initial=0.0)), eps)
    cov = basis.T @ np.diag(np.maximum(sig2, floor)) @ basis
    for _ in range(max_iter):
        dz = z - centre
        inside = np.einsum("ni,ij,nj->n", dz, np.linalg.inv(cov), dz) < k2
        if inside.sum() <= n_pl + 1:
            break
        zi = z[inside]
        new_centre = zi.mean(axis=0)
        new_cov = np.atleast_2d(np.cov(zi, rowvar=False, ddof=1)) / c + eps * np.eye(n_pl - 1)
        scale = np.sqrt(np.diag(new_cov))
        moved = np.max(np.abs(new_centre - centre) / scale) + np.max(
            np.abs(new_cov - cov) / np.outer(scale, scale)
        )
        centre, cov = new_centre, new_cov
        if moved < 1e-9:
            break
    return _Window(np.asarray(centre, dtype=np.float64), np.asarray(np.linalg.inv(cov)))


class _TrackGroup:
    """Running sums of one channel combination's tracks (in the difference space)."""

    def __init__(self, channels: npt.NDArray[np.int64], planes: npt.NDArray[np.int64]) -> None:
        self.channels = channels
        self.planes = planes
        n_pl = channels.size
        d = n_pl - 1
        self.basis = helmert_basis(n_pl)
        self.window: _Window | None = None
        self._buffer: list[FloatArray] = []
        self.n_seen = 0  # every track given, in the window or not
        self.n_outliers = 0
        self.n = 0
        self.s1 = np.zeros(d)
        self.s2 = np.zeros((d, d))
        self.s3 = np.zeros((d, d, d))
        self.s4 = np.zeros((d, d, d, d))

    def add(self, t: FloatArray, min_tracks: int, k2: float, c: float) -> None:
        """Fold tracks ``t`` (n, P); before the window is known they wait until ``min_tracks``."""
        self.n_seen += t.shape[0]
        if self.window is None:
            self._buffer.append(t)
            if sum(b.shape[0] for b in self._buffer) < min_tracks:
                return
            t = np.concatenate(self._buffer)
            self._buffer = []
            self.window = _robust_window(t, k2, c)
        dz = t @ self.basis - self.window.centre
        inside = np.einsum("ni,ij,nj->n", dz, self.window.inv_cov, dz) < k2
        self.n_outliers += int(np.count_nonzero(~inside))
        dz = dz[inside]
        self.n += dz.shape[0]
        self.s1 += dz.sum(axis=0)
        d = dz.shape[1]
        outer = (dz[:, :, None] * dz[:, None, :]).reshape(-1, d * d)
        self.s2 += dz.T @ dz
        self.s3 += (outer.T @ dz).reshape(d, d, d)
        self.s4 += (outer.T @ outer).reshape(d, d, d, d)


def _central_fourth(
    n: int, s1: FloatArray, s2: FloatArray, s3: FloatArray, s4: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Central second and fourth moment tensors from the raw sums (population normalisation)."""
    m1, m2, m3, m4 = s1 / n, s2 / n, s3 / n, s4 / n
    c2 = m2 - np.outer(m1, m1)
    e = np.einsum
    c4 = (
        m4
        - e("i,jkl->ijkl", m1, m3) - e("j,ikl->ijkl", m1, m3)
        - e("k,ijl->ijkl", m1, m3) - e("l,ijk->ijkl", m1, m3)
        + e("i,j,kl->ijkl", m1, m1, m2) + e("i,k,jl->ijkl", m1, m1, m2)
        + e("i,l,jk->ijkl", m1, m1, m2) + e("j,k,il->ijkl", m1, m1, m2)
        + e("j,l,ik->ijkl", m1, m1, m2) + e("k,l,ij->ijkl", m1, m1, m2)
        - 3.0 * e("i,j,k,l->ijkl", m1, m1, m1, m1)
    )  # fmt: skip
    return c2, c4


class GroupSolution(NamedTuple):
    """The iterative method on one channel combination's sums (all per plane, ns or ns^2)."""

    sigma2: FloatArray
    sigma_err: FloatArray
    var_delta: FloatArray
    var_others: FloatArray
    sigma2_three_plane: FloatArray  # mean over the plane triples holding the plane (closed form)
    n_iterations: int
    converged: bool


def solve_covariance(
    cov: FloatArray,
    *,
    c4: FloatArray | None = None,
    c2_kept: FloatArray | None = None,
    n: int = 0,
    shrink: float = 1.0,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> GroupSolution:
    """The iterative PPS method on the covariance of the plane times.

    ``cov`` is the ``(d, d)`` covariance of the differences ``z = t @ helmert_basis(P)``. For
    plane ``p`` with weights ``w_q = 1 / sigma_q**2`` the difference ``Delta_p = t_p -
    T_others`` is the contrast ``a_p = e_p - w_(q != p) / sum w``, so ``sigma_Delta**2 =
    a_p^T B cov B^T a_p`` for any weights; ``sigma_p**2 = sigma_Delta**2 - 1 / sum_(q != p) w_q``
    is iterated until every ``sigma**2`` moves by less than ``tol * sigma_Delta**2``.

    Errors (when ``c4``, ``c2_kept`` and ``n`` are given: the central fourth and second moments
    of the ``n`` tracks the covariance came from, before the truncation correction ``shrink``):
    the covariance of the ``sigma_Delta**2`` from the fourth moments, ``(E[y_p**2 y_q**2] - V_p
    V_q) / n`` with ``y_p`` the projection on ``a_p`` (no Gaussian assumption), propagated
    through ``(I + A) d sigma**2 = d V``, ``A_pq = S_p**2 / sigma_q**4``.
    """
    d = cov.shape[0]
    n_pl = d + 1
    basis = helmert_basis(n_pl)
    ct = basis @ cov @ basis.T  # plane-space covariance, exact for contrasts
    eye = np.eye(n_pl)
    sig2 = np.ones(n_pl)
    converged = False
    n_iter = 0
    v = s_o = np.full(n_pl, np.nan)
    proj = np.zeros((n_pl, n_pl))
    w = floored = np.zeros(n_pl)
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        # A plane whose variance came out <= 0 keeps a finite weight, at most 100 times that of
        # the worst plane, so that it cannot swamp the combination (as in fit_resolution).
        positive = np.where(sig2 > 0, sig2, 0.0)
        floor = 0.01 * positive.max()
        floor = floor if floor > 0 else 1e-6
        floored = sig2 <= floor
        w = 1.0 / np.maximum(sig2, floor)
        others = w[None, :] * (1.0 - eye)
        proj = eye - others / others.sum(axis=1, keepdims=True)  # rows a_p
        v = np.einsum("pi,ij,pj->p", proj, ct, proj)
        s_o = 1.0 / others.sum(axis=1)
        new = v - s_o
        with np.errstate(invalid="ignore", divide="ignore"):
            change = np.abs(new - sig2) / v
        sig2 = new
        if np.all((change < tol) | ~np.isfinite(change)):
            converged = True
            break
    three = np.full(n_pl, np.nan)
    if n_pl >= 3:
        diag = np.diag(ct)
        pair = diag[:, None] + diag[None, :] - 2.0 * ct
        acc = np.zeros(n_pl)
        cnt = np.zeros(n_pl)
        for p, q, r in itertools.combinations(range(n_pl), 3):
            for i, j, k in ((p, q, r), (q, p, r), (r, p, q)):
                acc[i] += 0.5 * (pair[i, j] + pair[i, k] - pair[j, k])
                cnt[i] += 1
        three = acc / cnt
    err = np.full(n_pl, np.nan)
    if c4 is not None and c2_kept is not None and n > 1:
        y = proj @ basis  # (P, d): Delta_p = y_p . z
        e22 = np.einsum("pi,pj,qk,ql,ijkl->pq", y, y, y, y, c4)
        vk = np.einsum("pi,ij,pj->p", y, c2_kept, y)
        cov_v = (e22 - np.outer(vk, vk)) / n / shrink**2
        # A plane on the weight floor (sigma**2 <= 0 or tiny) has a fixed weight: its sigma**2
        # does not enter the others' S_p, so its column of A is zero.
        with np.errstate(invalid="ignore", divide="ignore"):
            a = np.where(floored[None, :], 0.0, s_o[:, None] ** 2 * w[None, :] ** 2)
            a[np.arange(n_pl), np.arange(n_pl)] = 0.0
            m = eye + a
            if np.all(np.isfinite(m)):
                jac = np.linalg.inv(m)
                var_s2 = np.einsum("pi,ij,pj->p", jac, cov_v, jac)
                err = np.sqrt(np.maximum(var_s2, 0.0)) / (2.0 * np.sqrt(sig2))
    return GroupSolution(sig2, err, v, s_o, three, n_iter, converged)


class ResolutionSums:
    """Running sums of tracks per channel combination, and the iterative method on them.

    Per combination (one pad column, or the planes of it that had exactly one hit) the tracks are
    kept as the sums of the differences ``z = t @ helmert_basis(P)`` and of their second, third
    and fourth powers (outer products), for the tracks inside an outlier window: the ellipsoid
    ``(z - centre)^T cov^-1 (z - centre) < k2`` holding all but ``window_tail`` of Gaussian
    tracks. The window is set once per combination, from its first ``min_tracks`` tracks (those
    of the block in which it reaches that number; the tracks before wait in a buffer), by the
    iteration of :func:`_robust_window`. Blocks added in the same order give the same sums.

    :meth:`solve` turns the sums into the covariance of the differences (truncation corrected:
    divided by :func:`window_factor`'s ``c``) and runs :func:`solve_covariance` on it.
    """

    def __init__(self, *, min_tracks: int = 200, window_tail: float = WINDOW_TAIL) -> None:
        if min_tracks < 10:
            raise ValueError(f"min_tracks must be >= 10, got {min_tracks}")
        if not 0.0 < window_tail < 0.5:
            raise ValueError(f"window_tail must be in (0, 0.5), got {window_tail}")
        self.min_tracks = int(min_tracks)
        self.window_tail = float(window_tail)
        self.groups: dict[tuple[int, ...], _TrackGroup] = {}
        self._factors: dict[int, tuple[float, float]] = {}

    def _factor(self, dim: int) -> tuple[float, float]:
        if dim not in self._factors:
            self._factors[dim] = window_factor(dim, self.window_tail)
        return self._factors[dim]

    def add(self, tracks: Tracks) -> None:
        """Fold tracks (from :func:`select_tracks`, walk-corrected times); planes marked -1 are
        left out of their track's combination."""
        ch = np.asarray(tracks.channel, dtype=np.int64)
        if ch.ndim != 2 or ch.shape[0] == 0:
            return
        planes = np.asarray(tracks.planes, dtype=np.int64)
        # Tracks grouped by channel combination: one lexsort, stable, so each group keeps the
        # order of its tracks.
        order = np.lexsort(ch.T[::-1])
        srt = ch[order]
        new = np.ones(srt.shape[0], dtype=bool)
        new[1:] = np.any(srt[1:] != srt[:-1], axis=1)
        bounds = np.append(np.flatnonzero(new), srt.shape[0])
        # One pass per channel combination (a pad column): a few dozen, not per track.
        for k in range(bounds.size - 1):
            combo = srt[bounds[k]]
            present = combo >= 0
            if present.sum() < 3:
                continue
            rows = order[bounds[k] : bounds[k + 1]]
            key = tuple(int(c) for c in combo)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _TrackGroup(combo[present], planes[present])
            k2, c = self._factor(int(present.sum()) - 1)
            group.add(tracks.t_ns[np.ix_(rows, np.flatnonzero(present))], self.min_tracks, k2, c)

    def solve(
        self, key: tuple[int, ...], *, max_iter: int = 200, tol: float = 1e-10
    ) -> GroupSolution | None:
        """The solution of combination ``key``; ``None`` with fewer than ``min_tracks`` tracks
        in its window."""
        g = self.groups[key]
        if g.window is None or g.n < self.min_tracks:
            return None
        _, c = self._factor(g.channels.size - 1)
        c2, c4 = _central_fourth(g.n, g.s1, g.s2, g.s3, g.s4)
        cov = c2 * g.n / (g.n - 1) / c
        return solve_covariance(cov, c4=c4, c2_kept=c2, n=g.n, shrink=c, max_iter=max_iter, tol=tol)


class ResolutionAccumulator(StepAccumulator):
    """The ``resolution`` method, online and offline: tracks folded into :class:`ResolutionSums`.

    At each step end the hit times are corrected for the walk (:func:`~teststand.analysis.
    timewalk.correct_timewalk` with ``constants``, a :data:`~teststand.analysis.timewalk.
    TIMEWALK_DTYPE` table from an ``hptdc_timewalk`` run, model ``walk_model``: ``better`` by
    default, per channel the model that fitted it better); tracks are selected (one hit per
    plane in a pad column and event, at least ``min_planes`` planes: :func:`select_tracks`) and
    folded. :meth:`fit` solves every channel combination with ``min_tracks`` tracks and gives
    each channel the inverse-variance mean over the combinations it is in (normally one: its
    column with all planes; a column with a dead channel is measured with the other planes).

    Without ``constants`` the raw leading times are used: every channel is flagged
    ``walk_not_corrected`` (numbers given) and the attribute ``walk_corrected`` is False.

    Parameters (floats, for ``--param``): ``tdc_bin_ns`` (the TDC bin removed in quadrature for
    ``sigma_intrinsic_ps``; ``<= 0``: not removed), ``min_tracks``, ``min_planes``,
    ``window_tail`` (tail probability of the outlier window), ``max_outlier_fraction`` (more
    tracks cut: flag ``outliers``), ``max_iter``, ``tol``.
    """

    method: ClassVar[str] = "resolution"
    defaults: ClassVar[Mapping[str, Any]] = {
        "tdc_bin_ns": HPTDC_BIN_NS,
        "min_tracks": 200.0,
        "min_planes": 3.0,
        "window_tail": WINDOW_TAIL,
        "max_outlier_fraction": 0.01,
        "max_iter": 200.0,
        "tol": 1e-10,
    }
    json_keys: ClassVar[Mapping[str, str]] = {
        "sigma_ps": "sigma_ps",
        "sigma_err_ps": "sigma_err_ps",
        "plane": "plane",
        "n_tracks": "n_tracks",
    }

    def __init__(
        self,
        channels: npt.NDArray[Any],
        axes: Sequence[str],
        *,
        constants: np.ndarray | None = None,
        walk_model: Literal["sigmoid", "poly", "better"] = "better",
        **params: Any,
    ) -> None:
        super().__init__(channels, axes, **params)
        p = {k: float(v) for k, v in self.params.items()}
        self.params = p
        for name in ("min_tracks", "min_planes", "max_iter"):
            if not float(p[name]).is_integer():
                raise ValueError(f"{name} must be a whole number, got {p[name]}")
        if p["min_planes"] < 3:
            raise ValueError(f"min_planes must be >= 3, got {p['min_planes']}")
        if walk_model not in ("sigmoid", "poly", "better"):
            raise ValueError(
                f"walk_model must be 'sigmoid', 'poly' or 'better', got {walk_model!r}"
            )
        table = np.asarray(self.channels)
        missing = {"channel", "plane", "bar"} - set(table.dtype.names or ())
        if missing:
            raise ValueError(f"the channel table lacks {sorted(missing)}")
        if constants is not None:
            need = {"channel", "p0_ns", "p1_ns", "p2_ns", "p3_ns", "flag", "better"}
            need |= {"poly_order", "poly_coef", "poly_center_ns", "poly_scale_ns"}
            need |= {"poly_tot_min_ns", "poly_tot_max_ns"}
            lacking = need - set(np.asarray(constants).dtype.names or ())
            if lacking:
                raise ValueError(f"constants are not a timewalk table (no {sorted(lacking)})")
        self.constants = None if constants is None else np.atleast_1d(np.asarray(constants))
        self.walk_model = walk_model
        self.sums = ResolutionSums(min_tracks=int(p["min_tracks"]), window_tail=p["window_tail"])
        numbers = table["channel"].astype(np.int64)
        self._order = np.argsort(numbers, kind="stable")
        self._sorted = numbers[self._order]
        self.n_hits = np.zeros(self.n_channels, dtype=np.int64)
        self.n_nan_raw = np.zeros(self.n_channels, dtype=np.int64)
        self.n_nan = np.zeros(self.n_channels, dtype=np.int64)
        self._last: np.ndarray | None = None
        self._attrs: dict[str, Any] = {}

    def _rows(self, channel: npt.ArrayLike) -> npt.NDArray[np.intp]:
        ch = np.asarray(channel).astype(np.int64)
        if self._sorted.size == 0:
            return np.full(ch.shape, -1, dtype=np.intp)
        pos = np.clip(np.searchsorted(self._sorted, ch), 0, self._sorted.size - 1)
        return np.where(self._sorted[pos] == ch, self._order[pos], -1).astype(np.intp)

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: npt.NDArray[Any]) -> None:
        """Correct the walk, select the tracks of the step and fold them."""
        if hits.size == 0:
            return
        rows = self._rows(hits["channel"])
        known = rows >= 0
        t1 = hits["t1"].astype(np.float64)
        if self.constants is None:
            t = t1
            raw_bad = ~np.isfinite(t1)
        else:
            tot = hits["tot"].astype(np.float64)
            raw_bad = ~(np.isfinite(t1) & np.isfinite(tot))
            t = correct_timewalk(hits["channel"], t1, tot, self.constants, method=self.walk_model)
        bad = ~np.isfinite(t)
        c = self.n_channels
        self.n_hits += np.bincount(rows[known], minlength=c)
        self.n_nan_raw += np.bincount(rows[known & raw_bad], minlength=c)
        self.n_nan += np.bincount(rows[known & bad], minlength=c)
        tracks = select_tracks(
            hits["event"],
            hits["channel"],
            t,
            self.channels,
            min_planes=int(self.params["min_planes"]),
        )
        self.sums.add(tracks)

    def fit(self) -> np.ndarray:
        """Per-channel resolution from the sums so far (one row per channel, sorted)."""
        p = self.params
        table = np.asarray(self.channels)[self._order]
        numbers = table["channel"].astype(np.int64)
        m = numbers.size
        out = np.zeros(m, dtype=RESOLUTION_DTYPE)
        for name in out.dtype.names or ():
            if out.dtype[name].kind == "f":
                out[name] = np.nan
        out["channel"] = numbers
        out["plane"] = table["plane"]
        # Per channel: inverse-variance sums over the combinations it was measured in.
        sw = np.zeros(m)
        sws = np.zeros(m)
        n_used = np.zeros(m, dtype=np.int64)
        n_seen = np.zeros(m, dtype=np.int64)
        n_cut = np.zeros(m, dtype=np.int64)
        n_solved = np.zeros(m, dtype=np.int64)
        n_negative = np.zeros(m, dtype=np.int64)
        all_conv = np.ones(m, dtype=bool)
        n_planes = np.zeros(m, dtype=np.int64)
        s_delta = np.zeros(m)
        s_oth = np.zeros(m)
        s_three = np.zeros(m)
        n_three = np.zeros(m)
        iterations = np.zeros(m, dtype=np.int64)
        three_diffs: list[float] = []
        for key, group in self.sums.groups.items():
            pos = np.searchsorted(numbers, group.channels)
            n_seen[pos] += group.n_seen
            sol = self.sums.solve(key, max_iter=int(p["max_iter"]), tol=p["tol"])
            if sol is None:
                continue
            n_used[pos] += group.n
            n_cut[pos] += group.n_outliers
            n_solved[pos] += 1
            n_planes[pos] = np.maximum(n_planes[pos], group.channels.size)
            iterations[pos] = np.maximum(iterations[pos], sol.n_iterations)
            positive = sol.sigma2 > 0
            n_negative[pos] += ~positive
            all_conv[pos] &= sol.converged
            sigma = np.sqrt(np.where(positive, sol.sigma2, np.nan))
            ok = positive & np.isfinite(sol.sigma_err) & (sol.sigma_err > 0)
            wgt = np.where(ok, 1.0 / np.where(ok, sol.sigma_err, 1.0) ** 2, 0.0)
            sw[pos] += wgt
            sws[pos] += wgt * np.nan_to_num(sigma)
            s_delta[pos] += wgt * np.sqrt(sol.var_delta)
            s_oth[pos] += wgt * np.sqrt(sol.var_others)
            three_ok = ok & (sol.sigma2_three_plane > 0)
            s_three[pos] += np.where(three_ok, wgt * np.sqrt(np.abs(sol.sigma2_three_plane)), 0.0)
            n_three[pos] += np.where(three_ok, wgt, 0.0)
            three_diffs.extend(
                (np.sqrt(sol.sigma2_three_plane[three_ok]) / sigma[three_ok] - 1.0).tolist()
            )
        has = sw > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            out["sigma_ps"] = np.where(has, 1e3 * sws / sw, np.nan)
            out["sigma_err_ps"] = np.where(has, 1e3 / np.sqrt(sw), np.nan)
            out["sigma_delta_ps"] = np.where(has, 1e3 * s_delta / sw, np.nan)
            out["sigma_others_ps"] = np.where(has, 1e3 * s_oth / sw, np.nan)
            out["sigma_3plane_ps"] = np.where(n_three > 0, 1e3 * s_three / n_three, np.nan)
        out["n_tracks"] = np.where(n_solved > 0, n_used, n_seen)
        out["n_outliers"] = n_cut
        out["n_planes"] = n_planes
        out["n_iterations"] = iterations
        out["converged"] = (n_solved > 0) & all_conv
        tdc = p["tdc_bin_ns"]
        if tdc > 0:
            q_ps2 = (1e3 * tdc) ** 2 / 12.0
            s = out["sigma_ps"]
            with np.errstate(invalid="ignore"):
                intrinsic = np.sqrt(s**2 - q_ps2)
            out["sigma_intrinsic_ps"] = intrinsic
            out["sigma_intrinsic_err_ps"] = out["sigma_err_ps"] * s / intrinsic
        out["flag"] = self._flags(table, n_seen, n_solved, n_negative, has, all_conv, n_cut, n_used)
        self._last = out
        diffs = np.asarray(three_diffs)
        self._attrs = {
            "walk_corrected": self.constants is not None,
            "walk_model": self.walk_model if self.constants is not None else "",
            "n_combinations": len(self.sums.groups),
            "n_combinations_solved": int(
                sum(
                    1
                    for g in self.sums.groups.values()
                    if g.window is not None and g.n >= self.sums.min_tracks
                )
            ),
            "three_plane_max_rel_diff": float(np.max(np.abs(diffs))) if diffs.size else np.nan,
            "three_plane_mean_rel_diff": float(np.mean(diffs)) if diffs.size else np.nan,
        }
        return out

    def _flags(
        self,
        table: np.ndarray,
        n_seen: npt.NDArray[np.int64],
        n_solved: npt.NDArray[np.int64],
        n_negative: npt.NDArray[np.int64],
        has: npt.NDArray[np.bool_],
        converged: npt.NDArray[np.bool_],
        n_cut: npt.NDArray[np.int64],
        n_used: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.str_]:
        """The reason per channel (rows in channel order), the first that applies."""
        hits = self.n_hits[self._order]
        nan_raw = self.n_nan_raw[self._order]
        nan = self.n_nan[self._order]
        planes_in_column = np.zeros(table.size, dtype=np.int64)
        for col in np.unique(table["bar"]):
            in_col = table["bar"] == col
            planes_in_column[in_col] = np.unique(table["plane"][in_col]).size
        flags = np.full(table.size, "", dtype="<U24")
        with np.errstate(invalid="ignore", divide="ignore"):
            many_cut = n_cut > self.params["max_outlier_fraction"] * (n_used + n_cut)
        no_walk = "walk_not_corrected" if self.constants is None else ""
        rules = [
            (planes_in_column < int(self.params["min_planes"]), "too_few_planes"),
            (hits == 0, "no_hits"),
            ((hits > 0) & (nan_raw == hits), "nan_times"),
            ((hits > 0) & (nan == hits), "no_constants"),
            (n_seen == 0, "no_tracks"),
            (n_solved == 0, "too_few_tracks"),
            (~has & (n_negative > 0), "negative_variance"),
            (~has, "no_error"),
            (~converged, "not_converged"),
            (many_cut, "outliers"),
        ]
        done = np.zeros(table.size, dtype=bool)
        for cond, name in rules:
            hit = cond & ~done
            flags[hit] = name
            done |= hit
        if no_walk:
            flags[~done] = no_walk
        return flags

    def attrs(self) -> dict[str, Any]:
        """Walk correction, combinations and the three-plane cross-check (from the last fit)."""
        if self._last is None:
            self.fit()
        return dict(self._attrs)
