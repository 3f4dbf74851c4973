"""The TOFHIR2 physics model against its own truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from teststand.core import HIT_DTYPE
from teststand.sim import (
    THR1_OP_UA,
    THR2_OP_UA,
    AcquisitionState,
    TofhirModel,
    awc_truth,
    demo_tofhir_channels,
    mean_photoelectrons,
)

CHANNELS = demo_tofhir_channels(n_bars=16)


def codes_for(model: TofhirModel, thr_uA: float) -> np.ndarray:
    """Integer DAC codes (indexed by channel number) closest to ``thr_uA`` above baseline."""
    return np.round(model.baseline + thr_uA / model.lsb_uA).astype(int)


def state(
    model: TofhirModel,
    intensity: float,
    thr1: float = THR1_OP_UA,
    thr2: float = THR2_OP_UA,
    *,
    laser_on: bool = True,
    fibre: int = 0,
) -> AcquisitionState:
    return AcquisitionState(
        laser_on, intensity, fibre, codes_for(model, thr1), codes_for(model, thr2)
    )


def intensity_for(n_pe: float) -> float:
    return 100.0 * (n_pe / 600.0) ** (2.0 / 3.0)


def test_laser_map_spans_40_to_600_pe() -> None:
    assert mean_photoelectrons(100.0) == pytest.approx(600.0)
    assert mean_photoelectrons(intensity_for(40.0)) == pytest.approx(40.0)
    assert mean_photoelectrons(0.0) == 0.0
    steps = [mean_photoelectrons(i) for i in np.linspace(0, 100, 21)]
    assert np.all(np.diff(steps) > 0)


def test_same_seed_same_truth_and_hits() -> None:
    a, b = TofhirModel(CHANNELS, 7), TofhirModel(CHANNELS, 7)
    assert a.truth().tobytes() == b.truth().tobytes()
    for intensity in (30.0, 80.0):  # a sequence of acquisitions
        ha, hb = a.generate(200, state(a, intensity)), b.generate(200, state(b, intensity))
        assert ha.dtype == HIT_DTYPE
        assert ha.tobytes() == hb.tobytes()


def test_different_seeds_differ() -> None:
    a, b = TofhirModel(CHANNELS, 7), TofhirModel(CHANNELS, 8)
    assert not np.array_equal(a.truth()["awc"], b.truth()["awc"])
    ha, hb = a.generate(100, state(a, 50.0)), b.generate(100, state(b, 50.0))
    assert not np.array_equal(ha["t1"], hb["t1"])


def test_non_scaling_changes_only_the_exponent_slope() -> None:
    plain, bent = (
        TofhirModel(CHANNELS, 3).truth(),
        TofhirModel(CHANNELS, 3, non_scaling=True).truth(),
    )
    assert np.all(plain["n_slope"] == 0) and np.all(bent["n_slope"] > 0)
    for name in plain.dtype.names:
        if name != "n_slope":
            np.testing.assert_array_equal(plain[name], bent[name], err_msg=name)


def test_truth_fields_and_ranges() -> None:
    model = TofhirModel(CHANNELS, 11)
    t = model.truth()
    assert t.size == CHANNELS.size
    np.testing.assert_array_equal(t["channel"], CHANNELS["channel"])
    np.testing.assert_allclose(t["offset_ns"], t["t0_ns"] + t["delay_ns"] + t["board_delay_ns"])
    np.testing.assert_allclose(t["board_delay_ns"], t["board_slope_ns"] * CHANNELS["board"])
    np.testing.assert_allclose(t["delay_ns"], CHANNELS["delay_ns"], rtol=1e-6)
    np.testing.assert_allclose(t["noise"], t["noise_uA"] / model.lsb_uA)
    np.testing.assert_allclose(t["awc"], awc_truth(t["n"], THR1_OP_UA, THR2_OP_UA))
    assert np.all(np.isnan(t["sigma_ns"]))
    assert np.all((t["t0_ns"] >= 0.1) & (t["t0_ns"] <= 1.0))
    assert np.all((t["n"] >= 1.3) & (t["n"] <= 2.0))
    assert np.all((t["noise_uA"] >= 0.3) & (t["noise_uA"] <= 0.5))
    assert 2.0 <= t["board_slope_ns"][0] <= 3.0
    assert 0.01 <= model.laser.intensity_jitter <= 0.05
    assert 0.005 <= model.laser.time_jitter_ns <= 0.020


def test_channel_table_order_does_not_matter() -> None:
    shuffled = CHANNELS[np.random.default_rng(0).permutation(CHANNELS.size)]
    a, b = TofhirModel(CHANNELS, 5), TofhirModel(shuffled, 5)
    np.testing.assert_array_equal(b.truth()["channel"], np.sort(CHANNELS["channel"]))
    hits = b.generate(50, state(b, 60.0))
    order = np.lexsort((hits["channel"], hits["event"]))
    np.testing.assert_array_equal(order, np.arange(hits.size))
    assert a.truth().tobytes() == b.truth().tobytes()


def test_hits_sorted_by_event_then_channel() -> None:
    model = TofhirModel(CHANNELS, 2)
    codes = codes_for(model, 0.5)  # near baseline: noise and pulses mixed
    hits = model.generate(300, AcquisitionState(True, 40.0, 0, codes, codes))
    assert hits["event"].min() >= 0 and hits["event"].max() < 300
    key = hits["event"].astype(np.int64) * 1000 + hits["channel"]
    assert np.all(np.diff(key) > 0)  # sorted, at most one hit per channel and event


def test_scurve_noise_probability_matches_phi() -> None:
    model = TofhirModel(CHANNELS, 21)
    t = model.truth()
    n_trig = 4000
    # Each channel at its own offset from the baseline, from -2 to +2.5 sigma.
    offsets = np.linspace(-2.0, 2.5, CHANNELS.size) * t["noise"]
    codes = np.round(t["baseline"] + offsets).astype(int)
    hits = model.generate(n_trig, AcquisitionState(False, 0.0, 0, codes, np.full(32, 63)))
    counts = np.bincount(hits["channel"], minlength=CHANNELS.size)
    p = ndtr((t["baseline"] - codes) / t["noise"])
    np.testing.assert_allclose(model.noise_probability(codes), p)
    err = np.sqrt(n_trig * p * (1 - p)) + 1.0
    assert np.all(np.abs(counts - n_trig * p) < 5 * err)
    # Noise hits: t1 uniform in the gate, no t2, a small charge.
    g0, g1 = model.gate_ns
    assert np.all((hits["t1"] >= g0) & (hits["t1"] < g1))
    assert abs(np.mean(hits["t1"]) - 0.5 * (g0 + g1)) < 0.05 * (g1 - g0)
    assert np.all(np.isnan(hits["t2"]))
    assert np.all((hits["q"] >= 0) & (hits["q"] < 30))


@pytest.mark.parametrize("laser_on", [False, True])
def test_no_noise_hits_at_safe_codes(laser_on: bool) -> None:
    model = TofhirModel(CHANNELS, 4)
    top = np.full(32, 63)
    hits = model.generate(20000, AcquisitionState(laser_on, 0.0, 0, top, top))
    assert hits.size == 0


def test_walk_is_1_to_4_ns_over_the_laser_range() -> None:
    for seed in range(5):
        model = TofhirModel(CHANNELS, seed)
        rows = np.arange(model.n_channels)
        a_small = model.mean_amplitude_uA(intensity_for(40.0))
        a_large = model.mean_amplitude_uA(100.0)
        walk = model.noiseless_crossing_time(
            rows, a_small, THR1_OP_UA
        ) - model.noiseless_crossing_time(rows, a_large, THR1_OP_UA)
        assert np.all((walk > 1.0) & (walk < 4.0)), walk
    # and in the data: smaller pulses cross later
    model = TofhirModel(CHANNELS, 0)
    low = model.generate(300, state(model, intensity_for(60.0)))
    high = model.generate(300, state(model, 100.0))
    late = np.bincount(low["channel"], low["t1"]) / np.bincount(low["channel"]) - np.bincount(
        high["channel"], high["t1"]
    ) / np.bincount(high["channel"])
    assert np.all((late > 0.5) & (late < 4.0))


def _expected_mean_time(
    model: TofhirModel, rows: np.ndarray, intensity: float, thr: np.ndarray, n_mc: int = 200_000
) -> np.ndarray:
    """E[offset + tau (thr/A)^(1/n)] over the photostatistics and laser jitter (Monte Carlo)."""
    rng = np.random.default_rng(99)
    lam = mean_photoelectrons(intensity) * (
        1 + model.laser.intensity_jitter * rng.standard_normal(n_mc)
    )
    npe = rng.poisson(lam)
    a = npe[:, None] * model.gain[rows]
    t = model.noiseless_crossing_time(rows, a, thr)
    return np.asarray(np.nanmean(t, axis=0))


@pytest.mark.parametrize("thr2", [3.0, 6.0, 10.0])
def test_crossing_time_means_follow_the_power_law(thr2: float) -> None:
    model = TofhirModel(CHANNELS[:8], 31)
    intensity = 45.0
    st = state(model, intensity, THR1_OP_UA, thr2)
    hits = model.generate(6000, st)
    rows = model.index_of(hits["channel"])
    thr1_uA = model.threshold_uA(st.t1_codes[model.channels["channel"]])
    thr2_uA = model.threshold_uA(st.t2_codes[model.channels["channel"]])
    all_rows = np.arange(model.n_channels)
    for field, thr in (("t1", thr1_uA), ("t2", thr2_uA)):
        ok = ~np.isnan(hits[field])
        count = np.bincount(rows[ok], minlength=model.n_channels)
        mean = np.bincount(rows[ok], hits[field][ok], minlength=model.n_channels) / count
        sq = np.bincount(rows[ok], hits[field][ok] ** 2, minlength=model.n_channels) / count
        sem = np.sqrt((sq - mean**2) / count)
        expected = _expected_mean_time(model, all_rows, intensity, thr)
        assert np.all(np.abs(mean - expected) < 5 * sem + 0.003), (field, mean - expected, sem)


def test_awc_truth_is_t1_minus_offset_times_slope_on_noiseless_pulses() -> None:
    model = TofhirModel(CHANNELS, 17)
    rows = np.arange(model.n_channels)[:, None]
    amplitude = np.geomspace(11.0, 180.0, 25)[None, :]
    for thr1, thr2 in ((6.0, 10.0), (6.0, 3.0), (6.0, 6.5), (4.0, 9.0)):
        t1 = model.noiseless_crossing_time(rows, amplitude, thr1)
        t2 = model.noiseless_crossing_time(rows, amplitude, thr2)
        slope = (thr2 - thr1) / (t2 - t1)
        awc = (t1 - model.offset_ns[rows]) * slope
        np.testing.assert_allclose(
            awc, np.broadcast_to(awc_truth(model.n, thr1, thr2)[:, None], awc.shape), rtol=1e-9
        )
    # the limit thr2 -> thr1 is n * thr1
    np.testing.assert_allclose(awc_truth(model.n, 6.0, 6.0), model.n * 6.0)
    np.testing.assert_allclose(awc_truth(1.5, 6.0, 6.0 + 1e-6), 9.0, rtol=1e-5)


def test_non_scaling_edges_break_the_single_awc() -> None:
    model = TofhirModel(CHANNELS[:4], 17, non_scaling=True)
    rows = np.arange(4)[:, None]
    amplitude = np.geomspace(11.0, 180.0, 25)[None, :]
    t1 = model.noiseless_crossing_time(rows, amplitude, 6.0)
    t2 = model.noiseless_crossing_time(rows, amplitude, 10.0)
    awc = (t1 - model.offset_ns[rows]) * 4.0 / (t2 - t1)
    spread = awc.max(axis=1) - awc.min(axis=1)
    assert np.all(spread > 0.05)  # uA: no single AWC is exact any more
    n_small, n_large = model.exponent(0, 10.0), model.exponent(0, 150.0)
    assert n_large > model.n[0] > n_small


def test_t2_missing_when_the_pulse_does_not_reach_thr2() -> None:
    model = TofhirModel(CHANNELS, 8)
    intensity = intensity_for(40.0)  # about 10 uA
    hits = model.generate(2000, state(model, intensity, 6.0, 14.0))
    assert hits.size > 0.9 * 2000 * CHANNELS.size
    frac_missing = np.mean(np.isnan(hits["t2"]))
    assert frac_missing > 0.8
    assert not np.any(np.isnan(hits["t1"]))


def test_thr2_below_thr1_crosses_first() -> None:
    model = TofhirModel(CHANNELS, 8)
    hits = model.generate(500, state(model, 50.0, 6.0, 3.0))
    ok = ~np.isnan(hits["t2"])
    assert ok.mean() > 0.99
    assert np.mean(hits["t2"][ok] < hits["t1"][ok]) > 0.95


def test_noise_before_the_pulse_at_low_threshold() -> None:
    model = TofhirModel(CHANNELS, 12)
    t = model.truth()
    codes = np.round(t["baseline"]).astype(int)  # noise fires on about half of the gates
    n_trig = 4000
    hits = model.generate(n_trig, AcquisitionState(True, 50.0, 0, codes, codes_for(model, 10)))
    rows = model.index_of(hits["channel"])
    early = hits["t1"] < t["offset_ns"][rows] - 0.5
    p = model.noise_probability(codes)
    g0, g1 = model.gate_ns
    # about p * (time of the pulse - gate start) / gate width of the gates fire early
    expect = n_trig * p * (t["offset_ns"] - 0.5 - g0) / (g1 - g0)
    got = np.bincount(rows[early], minlength=model.n_channels)
    assert np.all(np.abs(got - expect) < 5 * np.sqrt(expect) + 5)
    # every lit channel still has one hit per pulse, and the pulse's charge
    assert hits.size == n_trig * CHANNELS.size
    assert np.all(hits["q"] > 50)


def test_fibre_channel_lights_one_bar() -> None:
    model = TofhirModel(CHANNELS, 9)
    hits = model.generate(500, state(model, 60.0, fibre=4))
    np.testing.assert_array_equal(np.unique(hits["channel"]), [6, 7])  # bar 3, both ends
    assert hits.size == 1000
    assert model.generate(100, state(model, 60.0, fibre=17)).size == 0  # no such bar


def test_charge_scale_and_rare_saturation() -> None:
    model = TofhirModel(CHANNELS, 13)
    hits = model.generate(3000, state(model, 100.0))
    rows = model.index_of(hits["channel"])
    assert np.mean(hits["q"] >= 1023) < 0.01
    assert np.all(hits["q"] <= 1023) and np.all(hits["q"] == np.round(hits["q"]))
    ratio = hits["q"] / (model.q_per_uA[rows] * model.gain[rows] * mean_photoelectrons(100.0))
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.01)


def test_codes_are_required_and_checked() -> None:
    model = TofhirModel(CHANNELS, 1)
    with pytest.raises(ValueError, match="t1_codes"):
        model.generate(10, AcquisitionState(True, 50.0))
    with pytest.raises(ValueError, match="needs 32"):
        model.generate(10, AcquisitionState(True, 50.0, 0, np.full(8, 63), np.full(8, 63)))


def test_bad_channel_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        TofhirModel(np.concatenate([CHANNELS, CHANNELS[:1]]), 1)
    with pytest.raises(ValueError, match="lacks"):
        TofhirModel(np.zeros(3, dtype=[("channel", "u2")]), 1)


def test_speed_sanity_shapes() -> None:
    model = TofhirModel(CHANNELS[:2], 1)
    hits = model.generate(500, state(model, 50.0))
    assert hits.size == 1000
    noise_model = TofhirModel(CHANNELS, 1)
    codes = np.round(noise_model.baseline).astype(int)
    hits = noise_model.generate(1000, AcquisitionState(False, 0.0, 0, codes, codes))
    assert 0.4 * 32000 < hits.size < 0.6 * 32000
    assert model.generate(0, state(model, 50.0)).size == 0


def test_truth_awc_at_realised_thresholds() -> None:
    model = TofhirModel(CHANNELS, 6)
    thr1 = model.threshold_uA(codes_for(model, 6.0))
    thr2 = model.threshold_uA(codes_for(model, 10.0))
    assert np.all(np.abs(thr1 - 6.0) <= model.lsb_uA / 2 + 1e-12)
    np.testing.assert_allclose(model.truth(thr1, thr2)["awc"], awc_truth(model.n, thr1, thr2))
