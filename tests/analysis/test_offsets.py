"""Channel offsets (TileCal laser method) against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teststand.analysis.offsets import (
    BOARD_DTYPE,
    BOARD_FIT_DTYPE,
    OFFSET_DTYPE,
    OffsetsAccumulator,
    channel_offsets,
    clipped_mean,
)
from teststand.analysis.walk import AWC_DTYPE
from teststand.core.hits import HIT_DTYPE
from teststand.drivers import TOFHIR2_LSB_UA as LSB_UA
from teststand.sim.physics import (
    CHANNEL_DTYPE,
    THR1_OP_UA,
    THR2_OP_UA,
    AcquisitionState,
    HptdcModel,
    TofhirModel,
    awc_truth,
    demo_tofhir_channels,
)


def eight_board_table(n: int = 32, per_board: int = 4) -> np.ndarray:
    """HPTDC-style channel table: 4 planes of 8 pads, 4 channels per readout board."""
    table = np.zeros(n, dtype=CHANNEL_DTYPE)
    table["channel"] = np.arange(n)
    table["plane"] = np.arange(n) // 8
    table["bar"] = np.arange(n) % 8
    table["board"] = np.arange(n) // per_board
    table["delay_ns"] = np.random.default_rng(5).uniform(5.0, 7.25, n)  # 100-145 cm of fibre
    return table


@pytest.fixture(scope="module")
def hptdc_run() -> tuple[HptdcModel, np.ndarray, np.ndarray, np.ndarray]:
    """A laser run at one intensity with walk-corrected times that keep each channel's offset.

    The true walk is removed at the measured ToT except for its asymptote, so the walk-free time
    of channel i in the data is ``t_inf_i = offset_i + p3_i`` (the truth's ``t_inf_ns``).
    """
    table = eight_board_table()
    model = HptdcModel(table, seed=7)
    hits = model.generate(5000, AcquisitionState(True, 60.0))
    rows = model.index_of(hits["channel"])
    t = hits["t1"] - (model.walk(rows, hits["tot"]) - model.p3[rows])
    return model, table, hits, t


def test_offsets_match_truth(hptdc_run: tuple) -> None:
    model, table, hits, t = hptdc_run
    truth = model.truth()
    res = channel_offsets(hits["event"], hits["channel"], t, table, reference=0)
    c = res.channels
    assert c.dtype == OFFSET_DTYPE and res.boards.dtype == BOARD_DTYPE
    assert res.board_fit.dtype == BOARD_FIT_DTYPE
    assert c["flag"].tolist() == ["reference"] + [""] * 31
    assert c["offset_ns"][0] == 0.0 and c["offset_err_ns"][0] == 0.0
    # offset_ns = (walk-free time - table delay) relative to the reference.
    expected = truth["t_inf_ns"] - truth["delay_ns"]
    expected -= expected[0]
    pulls = (c["offset_ns"][1:] - expected[1:]) / c["offset_err_ns"][1:]
    assert np.all(np.abs(pulls) < 4.0), pulls
    assert np.max(np.abs(c["offset_ns"] - expected)) < 0.006
    # The raw offsets still hold the fibre delays.
    np.testing.assert_allclose(c["offset_raw_ns"] - c["offset_ns"],
                               table["delay_ns"] - table["delay_ns"][0], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(c["rms_ns"][1:], np.hypot(model.sigma_ns[1:], model.sigma_ns[0]),
                               rtol=0.1)  # fmt: skip


def test_board_line_recovers_the_clock_propagation(hptdc_run: tuple) -> None:
    model, table, hits, t = hptdc_run
    truth = model.truth()
    res = channel_offsets(hits["event"], hits["channel"], t, table, reference=0)
    fit = res.board_fit
    assert fit["flag"].tolist() == [""] and fit["n_boards"][0] == 8
    slope_true = truth["board_slope_ns"][0]
    assert abs(fit["slope_ns"][0] - slope_true) < 3 * fit["slope_err_ns"][0]
    # The scatter about the line is the channels' own walk-free offsets (t0 + p3 here).
    own = truth["t0_ns"] + truth["p3_ns"]
    assert fit["residual_rms_ns"][0] == pytest.approx(np.std(own, ddof=2), rel=0.1)
    assert fit["chi2ndf_stat"][0] > 100.0  # far beyond the statistical errors, as it should be
    c = res.channels
    dev = c["residual_ns"] - (own - own.mean())
    assert np.all(np.abs(dev) < 3 * c["board_term_err_ns"] + 0.01)
    assert res.boards["n_channels"].tolist() == [4] * 8
    np.testing.assert_allclose(res.boards["position"], np.arange(8))


def test_laser_jitter_cancels_exactly(hptdc_run: tuple) -> None:
    _, table, hits, t = hptdc_run
    jitter = np.random.default_rng(1).normal(0.0, 2.0, hits["event"].max() + 1)
    a = channel_offsets(hits["event"], hits["channel"], t, table, reference=3).channels
    b = channel_offsets(hits["event"], hits["channel"], t + jitter[hits["event"]], table,
                        reference=3).channels  # fmt: skip
    np.testing.assert_allclose(b["offset_ns"], a["offset_ns"], atol=1e-9)
    np.testing.assert_allclose(b["offset_err_ns"], a["offset_err_ns"], rtol=1e-6, atol=1e-12)


def test_reference_group(hptdc_run: tuple) -> None:
    _, table, hits, t = hptdc_run
    single = channel_offsets(hits["event"], hits["channel"], t, table, reference=0).channels
    group = channel_offsets(hits["event"], hits["channel"], t, table, reference=[4, 5, 6, 7])
    g = group.channels
    assert g["flag"][4:8].tolist() == ["reference"] * 4
    assert np.mean(g["offset_ns"][4:8]) == pytest.approx(0.0, abs=1e-9)
    # Same offsets up to one constant; the group's own noise averages down.
    shift = g["offset_ns"] - single["offset_ns"]
    np.testing.assert_allclose(shift, shift[0], atol=0.003)
    assert np.all(g["offset_err_ns"][8:] < single["offset_err_ns"][8:])


def test_tofhir_bench_at_one_intensity() -> None:
    # Raw t1 at one laser intensity: each channel's offset includes its walk at that amplitude.
    table = demo_tofhir_channels(16, bars_per_board=2)
    model = TofhirModel(table, seed=3)
    truth = model.truth()
    c1 = np.round(model.baseline + THR1_OP_UA / model.lsb_uA).astype(int)
    c2 = np.round(model.baseline + THR2_OP_UA / model.lsb_uA).astype(int)
    hits = model.generate(4000, AcquisitionState(True, 80.0, 0, c1, c2))
    res = channel_offsets(hits["event"], hits["channel"], hits["t1"], table, reference=0)
    walk_free = model.noiseless_crossing_time(
        np.arange(32), model.mean_amplitude_uA(80.0), model.threshold_uA(c1)
    )
    expected = walk_free - truth["delay_ns"]
    expected -= expected[0]
    c = res.channels
    assert np.max(np.abs(c["offset_ns"] - expected)) < 0.005
    fit = res.board_fit[0]
    assert abs(fit["slope_ns"] - truth["board_slope_ns"][0]) < 3 * fit["slope_err_ns"]


def test_segments_fit_separate_lines() -> None:
    # TileCal: the clock enters in the middle of the drawer and runs out both ways.
    rng = np.random.default_rng(3)
    n_boards, per_board, n_ev = 8, 6, 2000
    n = n_boards * per_board
    table = np.zeros(n, dtype=CHANNEL_DTYPE)
    table["channel"] = np.arange(n)
    table["board"] = np.arange(n) // per_board
    table["delay_ns"] = rng.uniform(0.0, 9.0, n)
    position = {b: abs(b - 3.5) for b in range(n_boards)}
    segment = {b: int(b >= 4) for b in range(n_boards)}
    slopes = {0: 2.2, 1: 2.8}
    t0 = rng.uniform(0.1, 1.0, n)
    clock = np.array([slopes[segment[b]] * position[b] for b in table["board"]])
    hits = np.zeros(n_ev * n, dtype=HIT_DTYPE)
    hits["event"] = np.repeat(np.arange(n_ev), n)
    hits["channel"] = np.tile(np.arange(n), n_ev)
    laser = rng.normal(0.0, 0.02, n_ev)
    hits["t1"] = (np.tile(t0 + table["delay_ns"] + clock, n_ev) + np.repeat(laser, n)
                  + rng.normal(0.0, 0.05, n * n_ev))  # fmt: skip
    res = channel_offsets(hits["event"], hits["channel"], hits["t1"], table, reference=0,
                          board_position=position, board_segment=segment)  # fmt: skip
    fit = res.board_fit
    assert fit["segment"].tolist() == [0, 1] and fit["flag"].tolist() == ["", ""]
    for k in (0, 1):
        assert abs(fit["slope_ns"][k] - slopes[k]) < 3 * fit["slope_err_ns"][k] + 0.02
    np.testing.assert_allclose(res.boards["position"], [3.5, 2.5, 1.5, 0.5, 0.5, 1.5, 2.5, 3.5])


def test_flags_and_event_selection() -> None:
    table = np.zeros(5, dtype=CHANNEL_DTYPE)
    table["channel"] = [0, 1, 2, 3, 4]
    table["board"] = [0, 0, 1, 1, 1]
    rng = np.random.default_rng(0)
    n_ev = 100
    rows = []
    for ch, n_hits in ((0, n_ev), (1, n_ev), (2, 10), (3, n_ev)):  # channel 4: no hits
        ev = np.arange(n_hits)
        rows.append((ev, np.full(n_hits, ch), ch + 0.05 * rng.standard_normal(n_hits)))
    # Event 7 has a second hit on channel 1 (ambiguous: channel 1 skips it); event 8 lacks the
    # reference (no channel uses it); a hit of channel 9 is not in the table.
    rows.append((np.array([7, 9]), np.array([1, 9]), np.array([50.0, 0.0])))
    ev = np.concatenate([r[0] for r in rows])
    ch = np.concatenate([r[1] for r in rows])
    t = np.concatenate([r[2] for r in rows])
    keep = ~((ev == 8) & (ch == 0))
    res = channel_offsets(ev[keep], ch[keep], t[keep], table, reference=0)
    c = res.channels
    assert c["flag"].tolist() == ["reference", "", "too_few_events", "", "no_events"]
    # Without event 8 (no reference); channel 1 also without event 7; channel 2: events 0-9.
    assert c["n_events"].tolist() == [99, 98, 9, 99, 0]
    assert np.isnan(c["offset_ns"][[2, 4]]).all()
    assert c["offset_ns"][1] == pytest.approx(1.0, abs=0.03)
    # Two boards: one with channels 0, 1; one with channel 3 only.
    assert res.board_fit["flag"][0] in ("", "too_few_channels")
    with pytest.raises(ValueError, match="reference"):
        channel_offsets(ev, ch, t, table, reference=42)
    with pytest.raises(ValueError, match="board_position"):
        channel_offsets(ev, ch, t, table, reference=0, board_position={0: 0.0})
    # Every channel on one board: the clock slope is not identifiable.
    one = table.copy()
    one["board"] = 0
    fit = channel_offsets(ev, ch, t, one, reference=0).board_fit
    assert fit["flag"].tolist() == ["one_board"] and np.isnan(fit["slope_ns"]).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(30, 400), outliers=st.integers(0, 5))
def test_clipped_mean_ignores_a_few_wild_values(seed: int, n: int, outliers: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 0.1, n)
    plain_mean = x.mean()
    x[:outliers] = rng.uniform(20.0, 80.0, outliers)
    mean, err, rms, count = clipped_mean(np.zeros(n, dtype=np.intp), x, 1)
    assert count[0] >= n - outliers - max(1, n // 50)
    assert abs(mean[0] - plain_mean) < 5 * err[0]
    assert 0.05 < rms[0] < 0.2


# ------------------------------------------------------------------------------------------------
# the accumulator (online and offline)


def feed_steps(acc: OffsetsAccumulator, hits: np.ndarray, n_steps: int = 3) -> OffsetsAccumulator:
    """Hits split into laser steps at event boundaries (a laser-off step first, ignored)."""
    events = np.unique(hits["event"])
    cuts = np.searchsorted(hits["event"], events[:: -(-events.size // n_steps)][1:])
    acc.add_hits(0, hits[:200])
    acc.end_step(0, {"index": 0, "laser": 0.0, "thr1": np.nan, "thr2": np.nan})
    for i, block in enumerate(np.split(hits, cuts), start=1):
        acc.add_hits(i, block)
        acc.end_step(i, {"index": i, "laser": 1.0, "thr1": 6.0, "thr2": 10.0625})
    return acc


def test_accumulator_matches_channel_offsets(hptdc_run: tuple) -> None:
    """Step by step with a fixed window, the accumulator gives the offsets of the one-pass
    clipped mean (on clean data the two robust schemes keep the same differences)."""
    model, table, hits, t = hptdc_run
    h = hits.copy()
    h["t1"] = t
    acc = feed_steps(OffsetsAccumulator(table, ["laser", "thr1", "thr2"], lsb_uA=LSB_UA), h)
    out = acc.fit()
    one_pass = channel_offsets(hits["event"], hits["channel"], t, table, reference=0)
    ref = one_pass.channels
    assert out.dtype == OFFSET_DTYPE
    np.testing.assert_allclose(out["offset_ns"], ref["offset_ns"], atol=2e-4)
    np.testing.assert_allclose(out["offset_err_ns"], ref["offset_err_ns"], rtol=0.05)
    assert out["flag"][0] == "reference|walk_not_removed"
    assert all(f == "walk_not_removed" for f in out["flag"][1:])
    attrs = acc.attrs()
    assert attrs["walk_removed"] is False and attrs["reference"] == 0
    assert attrs["board_slope_ns"] == pytest.approx(one_pass.board_fit["slope_ns"][0], abs=1e-4)
    np.testing.assert_allclose(out["residual_ns"], ref["residual_ns"], atol=2e-4)
    assert acc.json_rows(out)[1].keys() == {"channel", "offset_ns", "flag"}


def test_accumulator_applies_awc_constants() -> None:
    """With constants, the times are walk-corrected before the differences: at one intensity
    the offsets are then the walk-free ones (what the integration tests check against truth)."""
    table = demo_tofhir_channels(4, bars_per_board=2)
    model = TofhirModel(table, seed=5)
    c1 = np.round(model.baseline + THR1_OP_UA / model.lsb_uA).astype(int)
    hits = model.generate(4000, AcquisitionState(True, 60.0, 0, c1, c1 + 13))
    # constants that remove the true noiseless walk: S(Q) of the model, exact AWC
    const = np.zeros(8, dtype=AWC_DTYPE)
    const["channel"] = np.arange(8)
    thr1 = model.threshold_uA(c1)
    thr2 = thr1 + 13 * model.lsb_uA
    q_nodes = np.geomspace(100, 1000, 16)
    amp = q_nodes[None, :] / model.q_per_uA[:, None]
    rows = np.arange(8)[:, None]
    dt = (model.noiseless_crossing_time(rows, amp, thr2[:, None])
          - model.noiseless_crossing_time(rows, amp, thr1[:, None]))  # fmt: skip
    const["slope_lut_q"] = q_nodes
    const["slope_lut_s"] = (thr2 - thr1)[:, None] / dt
    const["awc_uA"] = awc_truth(model.n, thr1, thr2)
    const["thr1_op_uA"], const["thr2_op_uA"] = 6.0, 10.0625
    acc = feed_steps(
        OffsetsAccumulator(table, ["laser", "thr1", "thr2"], constants=const, lsb_uA=LSB_UA), hits
    )
    out = acc.fit()
    truth = model.truth()
    expected = truth["t0_ns"] + truth["board_delay_ns"]
    expected -= expected[0]
    assert out["flag"][0] == "reference" and (out["flag"][1:] == "").all()
    # Q resolution smears S(Q) per hit; on average the walk is gone to a few ps
    assert np.max(np.abs(out["offset_ns"] - expected)) < 0.006
    assert acc.attrs()["walk_removed"] is True


def test_accumulator_parameters() -> None:
    table = demo_tofhir_channels(2)
    with pytest.raises(ValueError, match="reference"):
        OffsetsAccumulator(table, ["laser"], reference=9.0, lsb_uA=LSB_UA)
    with pytest.raises(ValueError, match="reference"):
        OffsetsAccumulator(table, ["laser"], reference=1.5, lsb_uA=LSB_UA)
    # nothing fed: every channel says why, no exception
    out = OffsetsAccumulator(table, ["laser"], lsb_uA=LSB_UA).fit()
    assert all("no_reference" in f for f in out["flag"]) and np.isnan(out["offset_ns"]).all()
