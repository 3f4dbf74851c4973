"""The HPTDC (diamond, PPS-style) physics model against its own truth."""

from __future__ import annotations

import numpy as np
import pytest

from teststand.core import HIT_DTYPE
from teststand.sim import (
    HPTDC_BIN_NS,
    AcquisitionState,
    HptdcModel,
    demo_hptdc_channels,
    hptdc_walk,
)

CHANNELS = demo_hptdc_channels(n_planes=4, n_pads=4)


def intensity_for(n_pe: float) -> float:
    return 100.0 * (n_pe / 600.0) ** (2.0 / 3.0)


def test_same_seed_same_truth_and_hits() -> None:
    a, b = HptdcModel(CHANNELS, 5), HptdcModel(CHANNELS, 5)
    assert a.truth().tobytes() == b.truth().tobytes()
    for fibre in (0, 2):
        st = AcquisitionState(True, 50.0, fibre)
        ha, hb = a.generate(300, st), b.generate(300, st)
        assert ha.dtype == HIT_DTYPE
        assert ha.tobytes() == hb.tobytes()
    c = HptdcModel(CHANNELS, 6)
    assert not np.array_equal(a.truth()["p1_ns"], c.truth()["p1_ns"])


def test_truth_fields_and_ranges() -> None:
    t = HptdcModel(CHANNELS, 1).truth()
    for name, lo, hi in (
        ("p0_ns", 0.4, 3.5),
        ("p1_ns", 9.0, 15.0),
        ("p2_ns", 0.2, 2.5),
        ("p3_ns", 5.0, 8.5),
        ("sigma_ns", 0.05, 0.10),
        ("t0_ns", 0.1, 1.0),
    ):
        assert np.all((t[name] >= lo) & (t[name] <= hi)), name
    assert np.all(t["p2_ns"] >= t["p0_ns"] / 4)  # walk slope at most 1 ns per ns of ToT
    np.testing.assert_allclose(t["offset_ns"], t["t0_ns"] + t["delay_ns"] + t["board_delay_ns"])
    np.testing.assert_allclose(t["t_inf_ns"], t["offset_ns"] + t["p3_ns"])
    np.testing.assert_array_equal(t["plane"], CHANNELS["plane"])
    np.testing.assert_array_equal(t["pad"], CHANNELS["bar"])


def test_tot_spans_8_to_20_ns_over_the_laser_range() -> None:
    model = HptdcModel(CHANNELS, 2, noise_prob=0.0)
    low = model.generate(2000, AcquisitionState(True, intensity_for(40.0)))
    high = model.generate(2000, AcquisitionState(True, 100.0))
    assert 6.5 < np.median(low["tot"]) < 9.5
    assert 18.5 < np.median(high["tot"]) < 21.5


def test_walk_follows_the_sigmoid() -> None:
    model = HptdcModel(CHANNELS, 3, noise_prob=0.0)
    runs = [
        model.generate(1500, AcquisitionState(True, i, 0))
        for i in np.linspace(intensity_for(40.0), 100.0, 8)
    ]
    hits = np.concatenate(runs)
    rows = model.index_of(hits["channel"])
    residual = hits["t1"] - model.offset_ns[rows] - model.walk(rows, hits["tot"])
    count = np.bincount(rows)
    mean = np.bincount(rows, residual) / count
    std = np.sqrt(np.bincount(rows, residual**2) / count - mean**2)
    # what is left: intrinsic resolution, laser jitter and the 24.4 ps binning of t1 and ToT
    expected = np.sqrt(model.sigma_ns**2 + model.laser.time_jitter_ns**2 + HPTDC_BIN_NS**2 / 12)
    assert np.all(np.abs(mean) < 5 * std / np.sqrt(count))
    np.testing.assert_allclose(std, expected, rtol=0.08)
    # and the walk itself is large compared with that: p0 between the two ends of the range
    span = hptdc_walk(8.0, model.p0, model.p1, model.p2, 0) - hptdc_walk(
        20.0, model.p0, model.p1, model.p2, 0
    )
    assert np.all(span > 0.3)


def test_times_and_tot_are_quantised_to_24_ps() -> None:
    model = HptdcModel(CHANNELS, 4, noise_prob=0.01)
    hits = model.generate(1000, AcquisitionState(True, 50.0, 0))
    assert HPTDC_BIN_NS == pytest.approx(0.024414, abs=1e-6)
    bins_t = hits["t1"] / HPTDC_BIN_NS
    bins_tot = hits["tot"].astype(np.float64) / HPTDC_BIN_NS
    np.testing.assert_allclose(bins_t, np.round(bins_t), atol=1e-6)
    np.testing.assert_allclose(bins_tot, np.round(bins_tot), atol=1e-3)
    assert np.all(np.isnan(hits["t2"])) and np.all(np.isnan(hits["q"]))


def test_fibre_channel_makes_a_track_through_all_planes() -> None:
    model = HptdcModel(CHANNELS, 5, noise_prob=0.0)
    hits = model.generate(400, AcquisitionState(True, 60.0, 3))
    t = model.truth()
    np.testing.assert_array_equal(np.unique(hits["channel"]), t["channel"][t["pad"] == 2])
    assert np.all(np.bincount(hits["event"].astype(np.int64)) == 4)  # one hit per plane


def test_noise_only_with_the_laser_off() -> None:
    model = HptdcModel(CHANNELS, 6, noise_prob=0.01)
    hits = model.generate(5000, AcquisitionState(False))
    expected = 0.01 * 5000 * CHANNELS.size
    assert abs(hits.size - expected) < 5 * np.sqrt(expected)
    assert np.all((hits["tot"] > 0.4) & (hits["tot"] < 3.1))
    quiet = HptdcModel(CHANNELS, 6, noise_prob=0.0)
    assert quiet.generate(20000, AcquisitionState(False)).size == 0


def test_laser_jitter_is_common_to_all_channels() -> None:
    model = HptdcModel(CHANNELS, 7, noise_prob=0.0)
    hits = model.generate(3000, AcquisitionState(True, 100.0, 1))
    t = hits["t1"].reshape(-1, 4)
    # the difference of two planes carries no laser jitter
    diff = np.std(t[:, 0] - t[:, 1])
    rows = model.index_of(hits["channel"][:4])
    assert diff < 1.1 * np.sqrt(np.sum(model.sigma_ns[rows[:2]] ** 2) + HPTDC_BIN_NS**2)
