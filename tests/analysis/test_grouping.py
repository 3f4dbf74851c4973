"""The grouped-statistics and batched-fit kernels against plain numpy, group by group."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teststand.analysis._grouping import (
    batched_gls,
    batched_polyfit,
    batched_polyval,
    group_index,
    grouped_count,
    grouped_interp,
    grouped_stats,
    grouped_sum,
    pad_groups,
    quantile_bin_index,
    stats_from_sums,
)


def test_grouped_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    channel = rng.integers(0, 4, 5000)
    step = rng.integers(0, 7, 5000)
    g = group_index(channel, step, 7)
    x = 50.0 + rng.normal(0, 0.01, 5000)  # ps spread on a 50 ns offset: no cancellation allowed
    stats = grouped_stats(g, 28, x)
    assert stats.n.sum() == 5000
    np.testing.assert_array_equal(grouped_count(g, 28), stats.n)
    for i in range(28):
        sel = x[g == i]
        assert stats.mean[i] == pytest.approx(sel.mean(), abs=1e-12)
        assert stats.var[i] == pytest.approx(sel.var(ddof=1), rel=1e-9)
        assert grouped_sum(g, 28, x)[i] == pytest.approx(sel.sum())
    # running sums block by block give the same answer (the online path)
    half = 2500
    sums = [np.zeros(28), np.zeros(28), np.zeros(28)]
    for part in (slice(0, half), slice(half, None)):
        sums[0] += np.bincount(g[part], minlength=28)
        sums[1] += np.bincount(g[part], weights=x[part] - 50.0, minlength=28)
        sums[2] += np.bincount(g[part], weights=(x[part] - 50.0) ** 2, minlength=28)
    online = stats_from_sums(*sums, shift=50.0)
    np.testing.assert_allclose(online.mean, stats.mean, atol=1e-12)
    np.testing.assert_allclose(online.var, stats.var, rtol=1e-6)


def test_empty_groups_are_nan() -> None:
    stats = grouped_stats(np.array([0, 0, 2]), 4, np.array([1.0, 3.0, 5.0]))
    np.testing.assert_array_equal(stats.n, [2, 0, 1, 0])
    assert np.isnan(stats.mean[[1, 3]]).all()
    assert np.isnan(stats.var[[1, 2, 3]]).all()  # one entry has no variance


def test_batched_polyfit_matches_polyfit() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(3, 10, (50, 12))
    coef_true = rng.normal(0, 1, (50, 3))
    y = coef_true[:, :1] + coef_true[:, 1:2] * x + coef_true[:, 2:] * x**2
    y += rng.normal(0, 0.01, y.shape)
    w = np.full(x.shape, 1e4)
    w[0, 5:] = 0  # ragged: the first group has 5 points
    y[0, 5:] = np.nan
    fit = batched_polyfit(x, y, w, deg=2)
    assert fit.ok.all()
    assert fit.ndf[0] == 2 and fit.ndf[1] == 9
    for i in (0, 1, 17):
        use = w[i] > 0
        ref, cov = np.polyfit(x[i, use], y[i, use], 2, w=np.sqrt(w[i, use]), cov="unscaled")
        np.testing.assert_allclose(fit.coef[i], ref[::-1], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(fit.cov[i], cov[::-1, ::-1], rtol=1e-6, atol=1e-14)
    vals, vcov = batched_polyval(fit.coef, np.array([6.0, 10.0]), fit.cov)
    assert vcov is not None
    np.testing.assert_allclose(vals[1, 0], np.polyval(fit.coef[1, ::-1], 6.0))
    assert vcov[1, 0, 0] > 0 and vcov[1, 0, 1] != 0


def test_undetermined_fits_are_flagged_not_raised() -> None:
    x = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    y = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    w = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    fit = batched_polyfit(x, y, w, deg=1)
    np.testing.assert_array_equal(fit.ok, [True, False, False])
    assert np.isnan(fit.coef[1:]).all()
    np.testing.assert_allclose(fit.coef[0], [0.0, 1.0], atol=1e-12)


def test_gls_with_diagonal_covariance_is_weighted_least_squares() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (20, 6))
    y = 2 + 3 * x + rng.normal(0, 0.1, x.shape)
    var = rng.uniform(0.005, 0.02, x.shape)
    design = np.stack([np.ones_like(x), x], axis=2)
    cov = np.zeros((20, 6, 6))
    cov[:, np.arange(6), np.arange(6)] = var
    use = np.ones(x.shape, dtype=bool)
    use[0, :2] = False
    gls = batched_gls(design, y, cov, use)
    wls = batched_polyfit(x, np.where(use, y, np.nan), np.where(use, 1 / var, 0), deg=1)
    np.testing.assert_allclose(gls.coef, wls.coef, rtol=1e-9)
    np.testing.assert_allclose(gls.cov, wls.cov, rtol=1e-7)
    np.testing.assert_allclose(gls.chi2, wls.chi2, rtol=1e-7)
    # a fully correlated offset error moves the intercept's error, not the slope's
    cov_c = cov + 0.5
    corr = batched_gls(design, y, cov_c, use)
    assert np.all(corr.cov[:, 0, 0] > gls.cov[:, 0, 0])
    np.testing.assert_allclose(corr.coef[:, 1], gls.coef[:, 1], rtol=1e-6)


def test_pad_groups_keeps_order() -> None:
    counts, (a,) = pad_groups(np.array([2, 0, 2, 2]), 3, np.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(counts, [1, 0, 3])
    np.testing.assert_array_equal(a[2], [1.0, 3.0, 4.0])
    assert np.isnan(a[1]).all() and a[0, 0] == 2.0


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**31), st.sampled_from(["sort", "histogram"]))
def test_quantile_bins_are_even(n_bins: int, seed: int, method: str) -> None:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, 3000)
    values = np.round(rng.gamma(3, 50, 3000))  # QDC-like integer charges, many ties
    values[:5] = np.nan
    b = quantile_bin_index(group, values, 3, n_bins, method=method)
    assert (b[:5] == -1).all() and (b[5:] >= 0).all() and (b < n_bins).all()
    for gi in range(3):
        mine = (group == gi) & (b >= 0)
        counts = np.bincount(b[mine], minlength=n_bins)
        # bins are ordered in value and hold about the same number of entries
        edges = [values[mine][b[mine] == k] for k in range(n_bins) if counts[k]]
        assert all(lo.max() <= hi.min() for lo, hi in zip(edges[:-1], edges[1:], strict=True))
        ties = np.bincount(values[mine].astype(int)).max()
        assert counts.max() - counts.min() <= 2 * ties + 2


def test_grouped_interp_matches_interp_per_group() -> None:
    rng = np.random.default_rng(4)
    xp = np.sort(rng.uniform(0, 100, (3, 6)), axis=1)
    fp = rng.normal(size=(3, 6))
    xp[1, 4:] = np.nan  # a shorter table
    fp[2, :] = np.nan  # no table at all
    group = rng.integers(0, 4, 500)  # group 3 has no row
    x = rng.uniform(-10, 110, 500)
    out = grouped_interp(group, x, xp, fp)
    for gi in range(2):
        ok = np.isfinite(xp[gi])
        sel = group == gi
        np.testing.assert_allclose(out[sel], np.interp(x[sel], xp[gi, ok], fp[gi, ok]))
    assert np.isnan(out[group >= 2]).all()
