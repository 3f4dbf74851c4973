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
"""

from __future__ import annotations

import warnings
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.special import ndtr

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

#: Half-width of the Gaussian core window, in core sigmas.
CORE_K = 2.5

#: One row per channel. ``sigma_ps`` (with its statistical error) is the channel's resolution,
#: ``sigma_intrinsic_ps`` the same with the TDC binning removed (NaN unless ``tdc_bin_ns`` is
#: given), ``sigma_delta_ps`` the core width of ``t_p - T_others`` and ``sigma_others_ps`` the
#: resolution of the weighted combination of the other planes. ``n_tracks`` tracks measured the
#: channel; ``n_iterations`` and ``converged`` describe the reweighting; ``plane`` is -1 for a
#: channel without tracks. Flags: ``""`` (fine);
#: ``not_converged`` (numbers given); ``negative_variance``, ``too_few_tracks``, ``no_tracks``,
#: ``too_few_planes`` (sigma NaN).
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
        channel: ``(n_tracks, n_planes)`` channel hit in each plane.
        t_ns: ``(n_tracks, n_planes)`` its time.
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
    good = np.all(counts == 1, axis=1)
    keep = good[track]
    new_id = np.cumsum(good) - 1
    n_good = int(good.sum())
    ch_out = np.zeros((n_good, n_planes), dtype=np.int64)
    t_out = np.zeros((n_good, n_planes))
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
    mean = np.stack([np.bincount(g, infl[:, p], minlength=n_groups) for p in range(n_pl)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean /= n[:, None]
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
        return np.asarray(res[key], dtype=np.float64).ravel()[ok_row]

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
