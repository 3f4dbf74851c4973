"""S-curve fits against binomial data drawn from known baselines and noises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from teststand.analysis import SCURVE_DTYPE, fit_scurves, scurve_counts, scurve_moments

CODES = np.arange(64, dtype=float)


def draw(x0, sigma, n_triggers, seed, codes=CODES, falling=True):
    """Hit counts per (channel, code) for efficiencies Phi((x0 - c) / sigma)."""
    rng = np.random.default_rng(seed)
    x0 = np.atleast_1d(x0)[:, None]
    sigma = np.atleast_1d(sigma)[:, None]
    z = (x0 - codes) / sigma
    p = norm.cdf(z if falling else -z)
    n = np.broadcast_to(np.asarray(n_triggers, dtype=float), p.shape)
    return rng.binomial(n.astype(np.int64), p).astype(float)


@pytest.mark.parametrize("seed", range(6))
def test_recovers_baseline_and_noise(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    x0 = rng.uniform(12, 50, 32)
    sigma = rng.uniform(0.8, 2.5, 32)
    k = draw(x0, sigma, 2000, seed)
    res = fit_scurves(CODES, 2000, k)
    assert res.dtype == SCURVE_DTYPE
    assert (res["flag"] == "").all()
    np.testing.assert_array_less(np.abs(res["baseline_code"] - x0), 0.1)
    np.testing.assert_array_less(np.abs(res["noise_code"] / sigma - 1), 0.05)
    # the first estimate is already close; the errors are honest
    np.testing.assert_array_less(np.abs(res["baseline_code_moments"] - x0), 0.3)
    pull = (res["baseline_code"] - x0) / res["baseline_code_err"]
    assert 0.6 < pull.std() < 1.5
    assert 0.5 < np.median(res["chi2"] / res["ndf"]) < 1.6


@settings(max_examples=25, deadline=None)
@given(
    x0=st.floats(10, 50),
    sigma=st.floats(0.7, 2.5),
    seed=st.integers(0, 2**31),
)
def test_recovery_any_curve(x0: float, sigma: float, seed: int) -> None:
    k = draw(x0, sigma, 3000, seed)
    res = fit_scurves(CODES, 3000, k)[0]
    assert res["flag"] == ""
    # 5 standard errors and the spec tolerances, whichever is looser
    assert abs(res["baseline_code"] - x0) < max(0.1, 5 * res["baseline_code_err"])
    assert abs(res["noise_code"] / sigma - 1) < max(0.05, 5 * res["noise_code_err"] / sigma)


def test_rising_curves_and_unsorted_codes() -> None:
    order = np.random.default_rng(3).permutation(CODES.size)
    k = draw([30.0], [1.5], 2000, 7, falling=False)
    res = fit_scurves(CODES[order], 2000, k[:, order], falling=False)[0]
    assert res["flag"] == ""
    assert abs(res["baseline_code"] - 30) < 0.1
    assert abs(res["noise_code"] / 1.5 - 1) < 0.05


def test_moments_estimate_alone() -> None:
    k = draw([25.0, 40.0], [1.0, 2.0], 5000, 1)
    x0, sigma = scurve_moments(CODES, 5000, k)
    np.testing.assert_allclose(x0, [25, 40], atol=0.1)
    np.testing.assert_allclose(sigma, [1, 2], rtol=0.05)


def test_flags_for_bad_channels() -> None:
    n = np.full((8, CODES.size), 1000.0)
    k = draw(np.full(8, 30.0), np.full(8, 1.5), n, 5)
    k[1] = 0  # dead channel
    k[2] = draw([80.0], [1.5], 1000, 6)  # baseline above the scan: always fires
    k[3] = draw([1.0], [1.5], 1000, 6)  # baseline on the first code
    n[4, :] = 0
    n[4, 28:30] = 1000  # only two codes had triggers
    k[4] = np.minimum(k[4], n[4])
    k[5] = np.where(CODES < 30, 1000.0, 0.0)  # a step: no width to fit
    k[6] = np.where(CODES < 30, 1000.0, 0.0)
    k[6, 30] = 1003  # more hits than triggers: clipped, warned
    k[7] = draw([62.5], [1.5], 1000, 8)  # edge at the end of the scan: fitted, warned
    res = fit_scurves(CODES, n, k)

    def flags(i):
        return set(res["flag"][i].split("|")) - {""}

    assert flags(0) == set()
    assert flags(1) == {"no_hits"}
    assert np.isnan(res["baseline_code"][1]) and np.isnan(res["noise_code"][1])
    assert flags(2) == {"no_plateau", "no_edge"}
    assert np.isnan(res["baseline_code"][2])
    assert "at_scan_edge" in flags(3)
    assert flags(4) == {"too_few_triggers"}
    assert np.isnan(res["baseline_code"][4])
    assert flags(5) == {"unresolved_width"}
    assert res["baseline_code"][5] == pytest.approx(29.5, abs=0.01)
    assert np.isnan(res["noise_code"][5])
    assert "excess_hits" in flags(6)
    # flagged rows never hide a number: either NaN or a warning that keeps the fit
    assert flags(7) == {"no_plateau", "at_scan_edge"}
    assert abs(res["baseline_code"][7] - 62.5) < 0.3
    assert np.isfinite(res["baseline_code"][[0, 3, 6, 7]]).all()


def test_never_raises_on_empty_or_tiny_input() -> None:
    assert fit_scurves(CODES, 1000, np.zeros((0, CODES.size))).size == 0
    res = fit_scurves(CODES[:2], 100, np.array([[100.0, 0.0]]))
    assert res["flag"][0] == "too_few_triggers"
    res = fit_scurves(CODES, 0, np.zeros((1, CODES.size)))
    assert "too_few_triggers" in res["flag"][0] and "no_hits" in res["flag"][0]


def test_counts_from_hit_columns() -> None:
    # two scan steps per code (code 5 twice), 3 channels, 200 triggers per step
    step_codes = np.array([4.0, 5.0, 5.0, 6.0])
    rng = np.random.default_rng(0)
    n_hits = 500
    channel = rng.integers(0, 3, n_hits)
    step = rng.integers(0, 4, n_hits)
    event = np.arange(n_hits)
    counts = scurve_counts(channel, step, 3, step_codes, 200, hits_event=event)
    np.testing.assert_array_equal(counts.codes, [4, 5, 6])
    np.testing.assert_array_equal(counts.n_triggers, np.tile([200, 400, 200], (3, 1)))
    expected = np.zeros((3, 3))
    np.add.at(expected, (channel, np.array([0, 1, 1, 2])[step]), 1)
    np.testing.assert_array_equal(counts.n_hits, expected)
    # a repeated (event, channel) pair counts once; out-of-range hits are ignored
    channel2 = np.concatenate([channel, channel[:10], [7]])
    step2 = np.concatenate([step, step[:10], [0]])
    event2 = np.concatenate([event, event[:10], [999]])
    again = scurve_counts(channel2, step2, 3, step_codes, 200, hits_event=event2)
    np.testing.assert_array_equal(again.n_hits, expected)
    # per-channel code tables are kept as they are, sorted by code
    per_ch = scurve_counts(channel, step, 3, np.tile(step_codes[::-1], (3, 1)), 200)
    assert per_ch.codes.shape == (3, 4)
    assert (np.diff(per_ch.codes, axis=1) >= 0).all()
    assert per_ch.n_hits.sum() == n_hits


def test_end_to_end_from_hits() -> None:
    """Hits drawn per trigger, counted with scurve_counts and fitted."""
    rng = np.random.default_rng(11)
    n_ch, n_trig = 4, 1000
    x0 = np.array([20.3, 25.7, 31.1, 40.9])
    sigma = np.array([1.0, 1.3, 1.6, 2.0])
    codes = np.arange(10, 56, dtype=float)
    fired = rng.random((codes.size, n_trig, n_ch)) < norm.cdf((x0 - codes[:, None, None]) / sigma)
    step, _, channel = np.nonzero(fired)
    counts = scurve_counts(channel, step, n_ch, codes, n_trig)
    res = fit_scurves(*counts)
    assert (res["flag"] == "").all()
    np.testing.assert_allclose(res["baseline_code"], x0, atol=0.1)
    np.testing.assert_allclose(res["noise_code"], sigma, rtol=0.06)


def test_simulated_threshold_scan() -> None:
    """Laser off, T1 codes stepped: the simulator's noise hits give back its baselines and noise."""
    from teststand.sim.physics import AcquisitionState, TofhirModel, demo_tofhir_channels

    model = TofhirModel(demo_tofhir_channels(8), seed=4)
    codes = np.arange(0, 30)
    n_trig = 2000
    blocks = []
    for code in codes:
        c = np.full(16, code)
        blocks.append(model.generate(n_trig, AcquisitionState(False, t1_codes=c, t2_codes=c)))
    step = np.repeat(np.arange(codes.size), [b.size for b in blocks])
    hits = np.concatenate(blocks)
    counts = scurve_counts(hits["channel"], step, 16, codes, n_trig, hits_event=hits["event"])
    res = fit_scurves(*counts)
    truth = model.truth()
    assert (res["flag"] == "").all()
    np.testing.assert_allclose(res["baseline_code"], truth["baseline"], atol=0.1)
    np.testing.assert_allclose(res["noise_code"], truth["noise"], rtol=0.05)
