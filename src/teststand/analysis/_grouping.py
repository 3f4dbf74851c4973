"""Grouped statistics and batched least squares: the array kernels every calibration uses.

The calibrations reduce millions of hits to a few numbers per (channel, step) and then fit many
small models at once. Two kinds of kernel do that work without a Python loop per hit or channel:

* grouped reductions over an integer group index (``channel * n_steps + step``, say) with
  :func:`numpy.bincount`: counts, sums, means and variances per group in one or two passes;
* batched weighted least squares: ``G`` independent linear models with ``P`` points each, stacked
  as ``(G, P)`` arrays, solved through their normal equations in one call. A point with weight 0
  does not exist, so ragged groups are padded with zero weights.

Everything here is pure numpy and knows nothing about hits or instruments.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "GroupedStats",
    "LinearFit",
    "batched_gls",
    "batched_lstsq",
    "batched_polyfit",
    "batched_polyval",
    "group_index",
    "grouped_count",
    "grouped_interp",
    "grouped_stats",
    "grouped_sum",
    "pad_groups",
    "quantile_bin_index",
    "stats_from_sums",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]


def group_index(major: ArrayLike, minor: ArrayLike, n_minor: int) -> IntArray:
    """Return the flat group index ``major * n_minor + minor`` as ``intp``.

    ``major`` is usually the channel and ``minor`` the step, so that the grouped arrays reshape to
    ``(n_channels, n_steps)``. Negative or out-of-range ``minor`` values are the caller's business.
    """
    major_i = np.asarray(major).astype(np.intp, copy=False)
    minor_i = np.asarray(minor).astype(np.intp, copy=False)
    out = major_i * n_minor
    out += minor_i
    return out


def grouped_count(index: ArrayLike, n_groups: int) -> NDArray[np.int64]:
    """Number of entries per group: ``np.bincount`` with a fixed length.

    Indices must lie in ``0 .. n_groups - 1``; entries to be ignored should be removed beforehand
    (or sent to an extra overflow group the caller drops).
    """
    counts: NDArray[np.int64] = np.bincount(np.asarray(index, dtype=np.intp), minlength=n_groups)[
        :n_groups
    ].astype(np.int64, copy=False)
    return counts


def grouped_sum(index: ArrayLike, n_groups: int, values: ArrayLike) -> FloatArray:
    """Sum of ``values`` per group (float64)."""
    sums: FloatArray = np.bincount(
        np.asarray(index, dtype=np.intp),
        weights=np.asarray(values, dtype=np.float64),
        minlength=n_groups,
    )[:n_groups].astype(np.float64, copy=False)
    return sums


class GroupedStats(NamedTuple):
    """Count, mean and variance per group.

    ``mean`` and ``var`` are NaN where the group has too few entries (``n == 0`` for the mean,
    ``n <= ddof`` for the variance). ``sem`` is the standard error of the mean.
    """

    n: NDArray[np.int64]
    mean: FloatArray
    var: FloatArray

    @property
    def sem(self) -> FloatArray:
        """Standard error of the mean, ``sqrt(var / n)`` (NaN where undefined)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(self.var / self.n)


def grouped_stats(
    index: ArrayLike,
    n_groups: int,
    values: ArrayLike,
    *,
    ddof: int = 1,
    shift: ArrayLike | None = None,
) -> GroupedStats:
    """Count, mean and variance of ``values`` per group, in three ``bincount`` passes.

    The sums are taken about ``shift`` (a scalar or one value per group, default the overall mean),
    which keeps ``sum(x**2) - sum(x)**2 / n`` free of cancellation when the values sit on a large
    offset (hit times of tens of ns with ps spreads).
    """
    idx = np.asarray(index, dtype=np.intp)
    x = np.asarray(values, dtype=np.float64)
    n = np.bincount(idx, minlength=n_groups)[:n_groups]
    if shift is None:
        ref = float(x.mean()) if x.size else 0.0
        dx = x - ref
    elif np.ndim(shift) == 0:
        ref = float(shift)  # type: ignore[arg-type]
        dx = x - ref
    else:
        ref_g = np.asarray(shift, dtype=np.float64)
        ref = ref_g  # type: ignore[assignment]
        dx = x - ref_g[idx]
    s1 = np.bincount(idx, weights=dx, minlength=n_groups)[:n_groups]
    s2 = np.bincount(idx, weights=dx * dx, minlength=n_groups)[:n_groups]
    return stats_from_sums(n, s1, s2, ddof=ddof, shift=ref)


def stats_from_sums(
    n: ArrayLike, s1: ArrayLike, s2: ArrayLike, *, ddof: int = 1, shift: ArrayLike = 0.0
) -> GroupedStats:
    """Turn running sums ``n, sum(x - shift), sum((x - shift)**2)`` into :class:`GroupedStats`.

    This is the form online accumulators keep: sums add up block by block, and the statistics at the
    end equal those of one pass over all the data.
    """
    n_a = np.asarray(n)
    s1_a = np.asarray(s1, dtype=np.float64)
    s2_a = np.asarray(s2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_shifted = s1_a / n_a
        var = (s2_a - s1_a * mean_shifted) / (n_a - ddof)
    mean = np.where(n_a > 0, mean_shifted + np.asarray(shift, dtype=np.float64), np.nan)
    var = np.where(n_a > ddof, np.maximum(var, 0.0), np.nan)
    return GroupedStats(n_a.astype(np.int64, copy=False), mean, var)


def pad_groups(
    index: ArrayLike, n_groups: int, *arrays: ArrayLike, fill: float = np.nan
) -> tuple[NDArray[np.intp], list[FloatArray]]:
    """Scatter entries into a dense ``(n_groups, max_group_size)`` layout for batched fits.

    Returns the count per group and, for each of ``arrays``, a float array of shape
    ``(n_groups, width)`` holding the group's entries in their original order, padded with ``fill``.
    Costs one stable sort of the index: meant for small per-group tables (steps, bins), not hits.
    """
    idx = np.asarray(index, dtype=np.intp)
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    counts = np.bincount(sidx, minlength=n_groups)[:n_groups]
    width = int(counts.max()) if counts.size else 0
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(sidx.size) - starts[sidx]
    out = []
    for a in arrays:
        dense = np.full((n_groups, width), fill, dtype=np.float64)
        dense[sidx, pos] = np.asarray(a, dtype=np.float64)[order]
        out.append(dense)
    return counts, out


class LinearFit(NamedTuple):
    """Result of ``G`` weighted least-squares fits with ``p`` parameters each.

    Attributes:
        coef: ``(G, p)`` best-fit parameters, NaN where the fit is not determined.
        cov: ``(G, p, p)`` covariance ``(A^T W A)^-1``, for weights ``1 / sigma**2``; NaN likewise.
        chi2: ``(G,)`` weighted sum of squared residuals.
        ndf: ``(G,)`` number of points with positive weight minus ``p``.
        ok: ``(G,)`` True where the normal equations were well conditioned.
    """

    coef: FloatArray
    cov: FloatArray
    chi2: FloatArray
    ndf: NDArray[np.int64]
    ok: NDArray[np.bool_]


def batched_lstsq(
    design: ArrayLike, y: ArrayLike, w: ArrayLike, *, rcond: float = 1e-12
) -> LinearFit:
    """Solve ``G`` weighted linear least-squares problems ``y ~ design @ coef`` at once.

    Args:
        design: ``(G, P, p)`` design matrices (or ``(P, p)``, shared by all groups).
        y: ``(G, P)`` observations; entries with zero weight may be NaN.
        w: ``(G, P)`` weights, ``1 / sigma**2`` for a covariance in the units of ``y``; 0 drops a
            point.
        rcond: a fit whose equilibrated normal matrix has an eigenvalue ratio below this is not
            determined (too few distinct points): its row is NaN and ``ok`` is False.

    Columns are equilibrated before solving, so polynomial design matrices in raw units (thresholds
    in uA, charges in QDC counts) stay well conditioned.
    """
    w_a = np.asarray(w, dtype=np.float64)
    y_a = np.asarray(y, dtype=np.float64)
    good = (w_a > 0) & np.isfinite(w_a) & np.isfinite(y_a)
    w_a = np.where(good, w_a, 0.0)
    y_a = np.where(good, y_a, 0.0)
    a = np.asarray(design, dtype=np.float64)
    if a.ndim == 2:
        a = np.broadcast_to(a, (w_a.shape[0], *a.shape))
    a = np.where(good[..., None], a, 0.0)
    n_par = a.shape[-1]
    aw = a * w_a[..., None]
    normal = np.einsum("gpi,gpj->gij", aw, a)
    rhs = np.einsum("gpi,gp->gi", aw, y_a)
    # equilibrate: D^-1 N D^-1 has a unit diagonal, so the eigenvalue test is scale free
    diag = np.sqrt(np.einsum("gii->gi", normal))
    scale = np.where(diag > 0, diag, 1.0)
    n_eq = normal / (scale[:, :, None] * scale[:, None, :])
    eig = np.linalg.eigvalsh(n_eq)
    ndf = good.sum(axis=1) - n_par
    ok = (diag > 0).all(axis=1) & (eig[:, 0] > rcond * eig[:, -1]) & (ndf >= 0)
    n_safe = np.where(ok[:, None, None], n_eq, np.eye(n_par))
    inv_eq = np.linalg.inv(n_safe)
    cov = inv_eq / (scale[:, :, None] * scale[:, None, :])
    coef = np.einsum("gij,gj->gi", cov, rhs)
    resid = y_a - np.einsum("gpi,gi->gp", a, coef)
    chi2 = np.einsum("gp,gp->g", w_a * resid, resid)
    coef[~ok] = np.nan
    cov[~ok] = np.nan
    chi2 = np.where(ok, chi2, np.nan)
    return LinearFit(coef, cov, chi2, ndf.astype(np.int64), ok)


def batched_polyfit(x: ArrayLike, y: ArrayLike, w: ArrayLike, deg: int) -> LinearFit:
    """Fit ``y = c0 + c1 x + ... + c_deg x**deg`` to each row of ``(G, P)`` arrays at once.

    Coefficients come in increasing power (``coef[:, k]`` multiplies ``x**k``), the order
    :func:`batched_polyval` expects. Weights are ``1 / sigma_y**2``; zero or NaN drops a point.
    """
    x_a = np.asarray(x, dtype=np.float64)
    x_safe = np.where(np.isfinite(x_a), x_a, 0.0)
    w_a = np.where(np.isfinite(x_a), np.asarray(w, dtype=np.float64), 0.0)
    design = x_safe[..., None] ** np.arange(deg + 1)
    return batched_lstsq(design, y, w_a)


def batched_polyval(
    coef: ArrayLike, x: ArrayLike, cov: ArrayLike | None = None
) -> tuple[FloatArray, FloatArray | None]:
    """Evaluate ``G`` polynomials at ``E`` points each, with the covariance of the values.

    Args:
        coef: ``(G, p)`` coefficients in increasing power.
        x: ``(E,)`` points shared by all groups, or ``(G, E)``.
        cov: ``(G, p, p)`` coefficient covariance, or None.

    Returns:
        ``values`` of shape ``(G, E)`` and, when ``cov`` is given, their covariance ``(G, E, E)``
        (needed for differences such as ``t(thr2) - t(thr1)``, whose errors are correlated).
    """
    c = np.asarray(coef, dtype=np.float64)
    x_a = np.asarray(x, dtype=np.float64)
    if x_a.ndim == 1:
        x_a = np.broadcast_to(x_a, (c.shape[0], x_a.size))
    basis = x_a[..., None] ** np.arange(c.shape[1])  # (G, E, p)
    values = np.einsum("gep,gp->ge", basis, c)
    if cov is None:
        return values, None
    v = np.einsum("gep,gpq,gfq->gef", basis, np.asarray(cov, dtype=np.float64), basis)
    return values, v


def quantile_bin_index(
    group: ArrayLike,
    values: ArrayLike,
    n_groups: int,
    n_bins: int,
    *,
    method: str = "sort",
    n_fine: int = 4096,
) -> NDArray[np.intp]:
    """Equal-count bins of ``values`` within each group: bin ``0 .. n_bins - 1`` of every entry.

    The entries of a group are ranked by value and cut into ``n_bins`` slices of (nearly) equal
    size, so the bin edges follow each group's own distribution (charge spectra of channels with
    different gains). NaN values get bin -1.

    ``method="sort"`` ranks exactly (one ``lexsort``; equal values may fall in neighbouring bins).
    ``method="histogram"`` is O(n): it histograms every group in ``n_fine`` cells over the overall
    range and cuts the cumulative counts, keeping each cell (and so equal values) in one bin. For
    integer-valued data such as QDC counts with fewer distinct values than ``n_fine`` the bins are
    as even as ties allow.
    """
    g = np.asarray(group, dtype=np.intp)
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if method == "histogram":
        out = np.full(g.size, -1, dtype=np.intp)
        if not finite.any():
            return out
        vf = v[finite]
        lo, hi = float(vf.min()), float(vf.max())
        width = (hi - lo) / n_fine if hi > lo else 1.0
        cell = np.minimum(((vf - lo) / width).astype(np.intp), n_fine - 1)
        gc = g[finite] * n_fine + cell
        hist = np.bincount(gc, minlength=n_groups * n_fine)[: n_groups * n_fine]
        hist = hist.reshape(n_groups, n_fine)
        cdf = np.cumsum(hist, axis=1)
        total = np.maximum(cdf[:, -1:], 1)
        # a cell goes to the bin of the rank at its middle
        cell_bin = ((cdf - 0.5 * hist) * n_bins // total).astype(np.intp)
        cell_bin = np.minimum(cell_bin, n_bins - 1).ravel()
        out[finite] = cell_bin[gc]
        return out
    if method != "sort":
        raise ValueError(f"method must be 'sort' or 'histogram', not {method!r}")
    order = np.lexsort((v, ~finite, g))  # by group, finite first, then value
    g_sorted = g[order]
    n_finite = np.bincount(g[finite], minlength=n_groups)[:n_groups]
    n_all = np.bincount(g, minlength=n_groups)[:n_groups]
    starts = np.concatenate(([0], np.cumsum(n_all)[:-1]))
    rank = np.arange(g.size) - starts[g_sorted]
    b = (rank * n_bins) // np.maximum(n_finite[g_sorted], 1)
    b = np.where(rank < n_finite[g_sorted], b, -1)
    out = np.empty(g.size, dtype=np.intp)
    out[order] = b
    return out


def grouped_interp(group: ArrayLike, x: ArrayLike, xp: ArrayLike, fp: ArrayLike) -> FloatArray:
    """Linear interpolation of ``x`` in a per-group table, for all entries in one call.

    Args:
        group: ``(n,)`` row of the table each entry belongs to (``0 .. G - 1``).
        x: ``(n,)`` abscissae.
        xp: ``(G, B)`` table abscissae, ascending within a row, NaN padded (NaNs anywhere are
            skipped).
        fp: ``(G, B)`` table values, NaN where the node is missing.

    Returns:
        ``(n,)`` interpolated values; outside a row's range the end value is held (as
        :func:`numpy.interp`); NaN for rows without a valid node or entries with NaN ``x``.

    The rows are laid end to end on one axis, each shifted past the previous one, so a single
    :func:`numpy.interp` serves every group.
    """
    g = np.asarray(group, dtype=np.intp)
    xv = np.asarray(x, dtype=np.float64)
    xp_a = np.atleast_2d(np.asarray(xp, dtype=np.float64))
    fp_a = np.atleast_2d(np.asarray(fp, dtype=np.float64))
    valid = np.isfinite(xp_a) & np.isfinite(fp_a)
    n_valid = valid.sum(axis=1)
    lo = np.where(valid, xp_a, np.inf).min(axis=1, initial=np.inf)
    hi = np.where(valid, xp_a, -np.inf).max(axis=1, initial=-np.inf)
    out = np.full(g.size, np.nan)
    if not valid.any():
        return out
    span = float(np.max(hi[n_valid > 0] - lo[n_valid > 0])) + 1.0
    pitch = 2.0 * span
    row, col = np.nonzero(valid)
    key_nodes = (row * pitch) + (xp_a[row, col] - lo[row])
    order = np.argsort(key_nodes, kind="stable")
    key_nodes = key_nodes[order]
    f_nodes = fp_a[row, col][order]
    has = (g >= 0) & (g < xp_a.shape[0])
    g_safe = np.where(has, g, 0)
    has &= n_valid[g_safe] > 0
    xc = np.clip(xv, lo[g_safe], hi[g_safe]) - lo[g_safe]
    key = g_safe * pitch + xc
    res = np.interp(key, key_nodes, f_nodes)
    out[has] = res[has]
    out[~np.isfinite(xv)] = np.nan
    return out


def batched_gls(
    design: ArrayLike, y: ArrayLike, cov: ArrayLike, use: ArrayLike, *, rcond: float = 1e-12
) -> LinearFit:
    """Generalised least squares for ``G`` small problems with correlated errors.

    Args:
        design: ``(G, P, p)`` design matrices.
        y: ``(G, P)`` observations.
        cov: ``(G, P, P)`` covariance of the observations (correlations between points allowed).
        use: ``(G, P)`` which points exist; the others are cut out of ``cov`` and the design.

    Returns:
        The :class:`LinearFit` with ``coef = (A^T V^-1 A)^-1 A^T V^-1 y``, its covariance and
        ``chi2 = r^T V^-1 r``. Rows whose problem is not determined are NaN with ``ok`` False.
    """
    a = np.asarray(design, dtype=np.float64)
    y_a = np.asarray(y, dtype=np.float64)
    v = np.asarray(cov, dtype=np.float64)
    u = np.asarray(use, dtype=bool) & np.isfinite(y_a) & np.isfinite(np.einsum("gii->gi", v))
    u &= np.isfinite(a).all(axis=2)
    n_pts = y_a.shape[1]
    both = u[:, :, None] & u[:, None, :]
    eye = np.eye(n_pts, dtype=bool)
    v = np.where(both, v, np.where(eye, 1.0, 0.0))
    v = np.where(np.isfinite(v), v, 0.0)
    a = np.where(u[..., None], a, 0.0)
    y_a = np.where(u, y_a, 0.0)
    n_par = a.shape[-1]
    ndf = u.sum(axis=1) - n_par
    # a covariance that is not positive definite (or a point with zero variance) is no problem we
    # can solve; guard the inverse and mark the row
    diag_v = np.einsum("gii->gi", v)
    ok = (ndf >= 0) & np.all(np.where(u, diag_v > 0, True), axis=1)
    v_safe = np.where(ok[:, None, None], v, np.eye(n_pts))
    sign, _ = np.linalg.slogdet(v_safe)
    ok &= sign > 0
    v_safe = np.where(ok[:, None, None], v_safe, np.eye(n_pts))
    w = np.linalg.inv(v_safe)
    w = np.where(u[:, :, None] & u[:, None, :], w, 0.0)
    normal = np.einsum("gpi,gpq,gqj->gij", a, w, a)
    rhs = np.einsum("gpi,gpq,gq->gi", a, w, y_a)
    diag = np.sqrt(np.abs(np.einsum("gii->gi", normal)))
    scale = np.where(diag > 0, diag, 1.0)
    n_eq = normal / (scale[:, :, None] * scale[:, None, :])
    eig = np.linalg.eigvalsh(n_eq)
    ok &= (diag > 0).all(axis=1) & (eig[:, 0] > rcond * np.abs(eig[:, -1]))
    inv_eq = np.linalg.inv(np.where(ok[:, None, None], n_eq, np.eye(n_par)))
    cov_c = inv_eq / (scale[:, :, None] * scale[:, None, :])
    coef = np.einsum("gij,gj->gi", cov_c, rhs)
    resid = np.where(u, y_a - np.einsum("gpi,gi->gp", a, coef), 0.0)
    chi2 = np.einsum("gp,gpq,gq->g", resid, w, resid)
    coef[~ok] = np.nan
    cov_c[~ok] = np.nan
    return LinearFit(coef, cov_c, np.where(ok, chi2, np.nan), ndf.astype(np.int64), ok)
