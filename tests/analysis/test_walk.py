"""Dual-threshold amplitude walk correction against the simulator's truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from teststand.analysis import (
    AWC_DTYPE,
    AWC_LUT_SIZE,
    AWC_POINT_DTYPE,
    correct_times,
    fit_awc,
    residual_walk,
)
from teststand.errors import AnalysisError
from teststand.sim.physics import awc_truth

PS = 1e-3  # ns


def judged_range(constants: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The charge range the table covers, trimmed by 10 % at both ends."""
    q = np.where(np.isfinite(constants["slope_lut_s"]), constants["slope_lut_q"], np.nan)
    return np.nanmin(q, axis=1) * 1.1, np.nanmax(q, axis=1) / 1.1


def walk_after(constants: np.ndarray, hits: np.ndarray, n_bins: int = 8, **kw: Any) -> np.ndarray:
    t_corr = correct_times(hits["channel"], hits["t1"], hits["q"], constants, **kw)
    return residual_walk(
        hits["channel"], t_corr, hits["q"], n_bins, q_range=judged_range(constants)
    )


@pytest.fixture(scope="module")
def awc(awc_scan: Any) -> Any:
    return fit_awc(*awc_scan.fit_args())


def test_result_layout(awc: Any, awc_scan: Any) -> None:
    c = awc.constants
    assert c.dtype == AWC_DTYPE
    assert awc.points.dtype == AWC_POINT_DTYPE
    assert c["slope_lut_q"].shape == (16, AWC_LUT_SIZE)
    assert (c["flag"] == "").all()
    assert (c["awc_slope_source"] == "edge").all()
    # the operating pair is the realised one of every channel: thr1 of the scan and the thr2 step
    # nearest to thr1 + 4 uA
    np.testing.assert_allclose(c["thr1_op_uA"], awc_scan.thr1_uA[0])
    assert np.all(np.abs(c["thr2_op_uA"] - c["thr1_op_uA"] - 4.0) <= 0.3125 / 2)
    # one point per intensity; the lowest (40 pe, about 10 uA) never reaches thr2 reliably
    assert set(np.unique(awc.points["flag"])) == {"", "not_covered"}
    assert (c["n_intensities"] == 5).all()
    attrs = awc.attrs()
    assert attrs["param_thr_gap_uA"] == 4.0 and "trim_intercept" in attrs
    table = c["slope_lut_s"]
    assert np.all(np.diff(table, axis=1) > 0)  # slope grows with charge


def test_walk_corrected_to_a_few_ps(awc: Any, awc_validation: np.ndarray) -> None:
    """The issue's acceptance: the mean corrected time is flat in Q to 5 ps, on a validation run
    with spread amplitudes (not the calibration points), where the raw walk is about 1 ns."""
    c = awc.constants
    raw = residual_walk(
        awc_validation["channel"],
        awc_validation["t1"],
        awc_validation["q"],
        8,
        q_range=judged_range(c),
    )
    assert np.all(raw["spread_ns"] > 0.6) and np.all(raw["spread_ns"] < 4.0)
    walk = walk_after(c, awc_validation)
    assert (walk["flag"] == "").all()
    # max - min of 8 bin means carries their noise (spread_err ~ 1 ps): allow 2 of it
    assert np.all(walk["spread_ns"] <= 5 * PS + 2 * walk["spread_err_ns"])
    assert np.median(walk["spread_ns"]) < 3 * PS


def test_walk_free_time_matches_truth(awc: Any, awc_scan: Any) -> None:
    c = awc.constants
    offset = awc_scan.model.truth()["offset_ns"]
    diff = (c["t0_ns"] - c["t0_ns"][0]) - (offset - offset[0])
    err = np.hypot(c["t0_ns_err"], c["t0_ns_err"][0])
    assert np.all(np.abs(diff) < np.maximum(5 * PS, 3 * err))
    assert np.sqrt(np.mean(diff**2)) < 4 * PS
    # and the AWC itself, to a few per mil of the true one at the realised thresholds
    truth = awc_truth(awc_scan.model.n, c["thr1_op_uA"], c["thr2_op_uA"])
    assert np.all(np.abs(c["awc_uA"] / truth - 1) < 0.012)


def test_derivative_slope_leaves_walk(awc: Any, awc_validation: np.ndarray) -> None:
    """Mixing slope definitions fails: an AWC fitted on the derivative 1 / t'(thr1) of the edge,
    applied with the dual-threshold secant slope, leaves of order 100 ps of walk."""
    c = awc.constants.copy()
    pts = awc.points[awc.points["used"]]
    thr1 = c["thr1_op_uA"][pts["channel"]]
    deriv_slope = 1.0 / (pts["edge_c"][:, 1] + 2 * pts["edge_c"][:, 2] * thr1)
    for ch in range(c.size):
        mine = pts["channel"] == ch
        c["awc_uA"][ch] = np.polyfit(1.0 / deriv_slope[mine], pts["t_thr1_ns"][mine], 1)[0]
    # the derivative AWC tends to n * thr1, the secant one is larger
    assert np.all(c["awc_uA"] < awc.constants["awc_uA"] - 0.3)
    wrong = walk_after(c, awc_validation)
    right = walk_after(awc.constants, awc_validation)
    assert np.all(wrong["spread_ns"] > 50 * PS)
    assert np.all(wrong["spread_ns"] > 10 * right["spread_ns"])


def test_edge_and_table_slopes_agree(awc: Any) -> None:
    """Both measurements of each intensity's secant slope (edge fit, hits at the operating pair)
    agree, and so do the AWCs on the edge slopes and on the table."""
    pts = awc.points[awc.points["used"]]
    pull = (pts["slope_edge"] - pts["slope_op"]) / np.hypot(
        pts["slope_edge_err"], pts["slope_op_err"]
    )
    assert np.abs(pull).max() < 5
    c = awc.constants
    assert np.all(np.abs(c["awc_edge_uA"] / c["awc_lut_uA"] - 1) < 0.02)


def test_trim_reduces_awc_spread(awc: Any, awc_scan: Any) -> None:
    c = awc.constants
    truth = awc_truth(awc_scan.model.n, c["thr1_op_uA"], c["thr2_op_uA"])
    assert awc.trim.n_channels == c.size
    assert awc.trim.awc_spread_after_uA < awc.trim.awc_spread_before_uA
    # the trimmed AWC predicts the truth better than one AWC for every channel would
    assert np.std(c["awc_trimmed_uA"] - truth) < np.std(truth)
    # the gain- and QDC-scale-free predictor does much better on this bench
    scale_free = fit_awc(*awc_scan.fit_args(), trim_predictor="elasticity")
    assert np.std(scale_free.constants["awc_trimmed_uA"] - truth) < 0.5 * np.std(truth)


def test_bar_by_bar_scan_and_flags(scan_factory: Any) -> None:
    scan = scan_factory(n_bars=4, n_pulses=300, seed=5, bar_by_bar=True)
    h = scan.hits
    op_code_step = np.abs(scan.thr2_uA - scan.thr1_uA - 4.0).argmin(axis=0)[0]
    n_j = len(range(-9, 14))
    is_op = (scan.step % n_j) == op_code_step
    keep = h["channel"] != 7  # channel 7: dead
    keep &= ~((h["channel"] == 6) & is_op)  # channel 6: operating pair never recorded
    k_of_hit = (scan.step // n_j) % 6
    keep &= ~((h["channel"] == 5) & (k_of_hit < 4))  # channel 5: two intensities only
    h, step = h[keep], scan.step[keep]
    fit = fit_awc(
        h["channel"],
        h["t1"],
        h["t2"],
        h["q"],
        step,
        scan.intensity,
        scan.thr1_uA,
        scan.thr2_uA,
        n_channels=8,
        step_bar=scan.bar,
        channel_bar=np.arange(8) // 2,
    )
    c = fit.constants
    flags = [set(f.split("|")) - {""} for f in c["flag"]]
    assert all(f == set() for f in flags[:5])
    assert "no_operating_step" in flags[6] and np.isnan(c["awc_uA"][6])
    assert "too_few_intensities" in flags[5] and np.isnan(c["awc_uA"][5])
    assert flags[7] == {"no_hits"}
    assert c["n_hits"][7] == 0 and np.isnan(c["slope_lut_s"][7]).all()
    # the trim leaves out the channels without an AWC
    assert fit.trim.n_channels == 5
    assert np.isfinite(c["awc_uA"][:5]).all()


def test_correct_times_interpolates_the_table() -> None:
    const = np.zeros(2, dtype=AWC_DTYPE)
    const["channel"] = [3, 8]
    const["awc_uA"] = [10.0, 20.0]
    const["slope_lut_q"] = np.nan
    const["slope_lut_s"] = np.nan
    const["slope_lut_q"][0, :2] = [100.0, 200.0]
    const["slope_lut_s"][0, :2] = [5.0, 10.0]
    const["slope_lut_q"][1, :3] = [50.0, 60.0, 70.0]
    const["slope_lut_s"][1, :3] = [2.0, 4.0, 4.0]
    const["thr1_op_uA"], const["thr2_op_uA"] = 6.0, 10.0
    channel = np.array([3, 3, 3, 8, 8, 5, 3])
    t1 = np.full(7, 1.0)
    q = np.array([150.0, 50.0, 900.0, 55.0, 65.0, 100.0, np.nan])
    t = correct_times(channel, t1, q, const)
    expected = 1.0 - np.array([10 / 7.5, 10 / 5.0, 10 / 10.0, 20 / 3.0, 20 / 4.0, np.nan, np.nan])
    np.testing.assert_allclose(t, expected)
    trimmed = correct_times(channel, t1, q, const, awc_field="awc_trimmed_uA")
    np.testing.assert_allclose(trimmed[:5], 1.0)
    with pytest.raises(AnalysisError, match="recalibrate"):
        correct_times(channel, t1, q, const, operating_thr_uA=(6.0, 8.0))
    correct_times(channel, t1, q, const, operating_thr_uA=(6.1, 9.9))


def test_residual_walk_measures_a_slope() -> None:
    rng = np.random.default_rng(2)
    n = 40_000
    channel = np.repeat([0, 1], n)
    q = rng.uniform(100, 500, 2 * n)
    t = np.where(channel == 0, 5.0, 5.0 + 1e-4 * q) + rng.normal(0, 0.001, 2 * n)
    res = residual_walk(channel, t, q, 4)
    assert res["spread_ns"][0] < 0.1 * PS
    # four equal-count bins of a uniform 100..500: means at 150 and 450, 0.03 ns apart
    assert res["spread_ns"][1] == pytest.approx(0.03, rel=0.03)
    assert res["chi2_flat"][1] > 1000
    assert np.isnan(res["q_bin"][:, 4:]).all()
    empty = residual_walk(channel[:10], t[:10], q[:10], 4, n_channels=3)
    assert (empty["flag"] == "too_few_hits").all()


def test_bad_input_raises() -> None:
    args = (np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="step indices"):
        fit_awc(*args, np.array([0, 1, 5]), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="channel numbers"):
        ch = np.array([0, 1, 4])
        fit_awc(
            ch,
            *args[1:],
            np.zeros(3, dtype=int),
            np.zeros(1),
            np.zeros(1),
            np.zeros(1),
            n_channels=2,
        )
    with pytest.raises(ValueError, match="one entry per hit"):
        fit_awc(*args, np.zeros(2, dtype=int), np.zeros(2), np.zeros(2), np.zeros(2))


def test_empty_scan_gives_flags_not_errors() -> None:
    empty = np.zeros(0)
    fit = fit_awc(
        empty,
        empty,
        empty,
        empty,
        np.zeros(0, dtype=int),
        np.array([1.0]),
        np.array([6.0]),
        np.array([10.0]),
        n_channels=2,
    )
    assert (fit.constants["flag"] == "no_hits").all()
    assert np.isnan(fit.constants["awc_uA"]).all()
    assert fit.points.size == 0


@pytest.mark.slow
def test_truth_with_high_statistics(scan_factory: Any, validation_factory: Any) -> None:
    """With 10000 pulses a step the calibration's own statistics no longer matter: every channel
    is flat to 5 ps and its walk-free time right to 5 ps, as the issue asks."""
    scan = scan_factory(n_bars=4, n_pulses=10_000, seed=21)
    fit = fit_awc(*scan.fit_args())
    c = fit.constants
    walk = walk_after(c, validation_factory(scan, n_pulses=12_000))
    assert np.all(walk["spread_ns"] < 5 * PS)
    offset = scan.model.truth()["offset_ns"]
    diff = (c["t0_ns"] - c["t0_ns"][0]) - (offset - offset[0])
    assert np.all(np.abs(diff) < 5 * PS)


@pytest.mark.slow
def test_non_scaling_edges_close_to_the_best_single_awc(
    scan_factory: Any, validation_factory: Any
) -> None:
    """TOFHIR2 edges do not scale with amplitude; judge the residual against what one AWC per
    channel does on noiseless pulses of the same model over the same charges (design 4.2)."""
    scan = scan_factory(n_bars=4, n_pulses=3000, seed=4, non_scaling=True)
    fit = fit_awc(*scan.fit_args())
    c = fit.constants
    walk = walk_after(c, validation_factory(scan))
    lo, hi = judged_range(c)
    model = scan.model
    best = np.empty(c.size)
    for ch in range(c.size):
        amp = np.geomspace(lo[ch], hi[ch], 200) / model.q_per_uA[ch]
        t1 = model.noiseless_crossing_time(ch, amp, c["thr1_op_uA"][ch])
        t2 = model.noiseless_crossing_time(ch, amp, c["thr2_op_uA"][ch])
        x = (t2 - t1) / (c["thr2_op_uA"][ch] - c["thr1_op_uA"][ch])
        resid = t1 - np.polyval(np.polyfit(x, t1, 1), x)
        best[ch] = np.ptp(resid)
    # one AWC cannot follow these edges (best: 10-30 ps); the fit's AWC is tuned on the five
    # calibration intensities rather than on the judged range, and costs a few ps more
    excess = walk["spread_ns"] - best
    assert np.median(excess) < 8 * PS
    assert np.all(excess < 15 * PS)
