"""Channel offsets (TileCal laser method) from real timing-alignment runs on the simulated TOFHIR2
bench, against the simulator's truth.

A ``timing_alignment`` run lights every bar at one intensity with every channel at the operating
thresholds; its times are walk-corrected with the AWC constants of an ``awc_calibration`` run of
the same stand and seed (the calibrations are shared with ``test_awc_truth``), and fed step by
step to the ``offsets`` accumulator as the offline analysis feeds them.

What is compared (see :class:`~teststand.analysis.offsets.OffsetsAccumulator`): ``offset_ns`` of
channel i is its walk-free time minus its fibre delay, relative to the reference channel 0, so the
truth is ``(t0_i + board_delay_i) - (t0_0 + board_delay_0)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from teststand.analysis.offsets import OFFSET_DTYPE, OffsetsAccumulator
from teststand.sim.physics import TofhirModel
from teststand.storage import RunFile

from .test_awc_truth import LSB_UA, PS, SEEDS, THR1_UA, AwcRuns, awc_runs, feed


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> AwcRuns:
    return awc_runs(tmp_path_factory)


def offsets(path, **params) -> OffsetsAccumulator:
    with RunFile(path) as run:
        acc = OffsetsAccumulator(run.channels, run.axes, **params, lsb_uA=LSB_UA)
    feed(acc, path)
    acc.fit()
    return acc


def true_offsets(truth: np.ndarray, reference: int = 0) -> np.ndarray:
    """What ``offset_ns`` measures: t0 + board delay, relative to the reference channel."""
    electronic = truth["t0_ns"] + truth["board_delay_ns"]
    np.testing.assert_allclose(electronic, truth["offset_ns"] - truth["delay_ns"], atol=1e-6)
    return electronic - electronic[reference]


@pytest.mark.parametrize("seed", SEEDS)
def test_offsets_match_truth(runs: AwcRuns, seed: int) -> None:
    """Walk removed with the calibration's constants, fibre delays subtracted: every calibrated
    channel's offset within 5 ps of the truth; the board line and the channel parts agree with
    the same line through the true offsets."""
    cal = runs.calibration(seed)
    acc = offsets(runs.operating("timing_alignment", seed), constants=cal.constants)
    out = acc.fit()
    on = cal.calibrated
    assert out.dtype == OFFSET_DTYPE
    assert out["flag"][0] == "reference" and out["offset_ns"][0] == 0.0
    assert (out["flag"][on][1:] == "").all(), out["flag"][on]
    assert (out["flag"][~on] == "no_constants").all() and np.isnan(out["offset_ns"][~on]).all()
    assert (out["n_events"][on] > 19_000).all() and (out["n_rejected"][on] < 10).all()
    truth = true_offsets(cal.truth)
    error = out["offset_ns"][on] - truth[on]
    assert np.all(np.abs(error) < 5 * PS), error / PS
    # the fibre delays really were taken out: the raw offsets differ by them
    np.testing.assert_allclose(
        (out["offset_raw_ns"] - out["offset_ns"])[on],
        (cal.channels["delay_ns"] - cal.channels["delay_ns"][0])[on],
        atol=1e-6,
    )
    # the clock propagation: four boards, two channels each. The split into a board line and
    # the channels' own t0 assumes the t0 do not trend with the board, so the slope agrees with
    # the truth's only within its error (the t0 scatter); fitted to the true offsets of the
    # same channels, the line is the same to a few ps.
    attrs = acc.attrs()
    assert attrs["walk_removed"] is True and attrs["reference"] == 0
    slope, slope_err = attrs["board_slope_ns"], attrs["board_slope_err_ns"]
    true_slope = float(cal.truth["board_slope_ns"][0])
    assert abs(slope - true_slope) < 4 * slope_err
    board = cal.channels["board"][on].astype(float)
    line = np.polyfit(board, truth[on], 1)
    assert abs(slope - line[0]) < 3 * PS
    channel_part = truth[on] - np.polyval(line, board)
    assert np.all(np.abs(out["residual_ns"][on] - channel_part) < 5 * PS)


def test_offsets_without_constants_keep_the_walk(runs: AwcRuns) -> None:
    """Raw t1: the offsets hold each channel's walk at the run's amplitude, which every channel
    and the attributes say; they match the truth plus the noiseless walk at the mean amplitude."""
    seed = SEEDS[0]
    cal = runs.calibration(seed)
    acc = offsets(runs.operating("timing_alignment", seed))
    out = acc.fit()
    assert acc.attrs()["walk_removed"] is False
    assert all("walk_not_removed" in f for f in out["flag"])
    assert np.isfinite(out["offset_ns"]).all()  # every channel: the run lit all 16 bars
    model = TofhirModel(cal.channels, seed, lsb_uA=0.3125)
    thr1, _ = cal.thresholds_set
    walk = (
        model.noiseless_crossing_time(
            np.arange(cal.channels.size), model.mean_amplitude_uA(60.0), thr1
        )
        - cal.truth["offset_ns"]
    )
    truth = true_offsets(cal.truth)
    expected = truth + walk - walk[0]
    assert np.abs(out["offset_ns"] - truth).max() > 50 * PS  # the walk is there ...
    assert np.all(np.abs(out["offset_ns"] - expected) < 15 * PS)  # ... and it is the walk


def test_alignment_bad_data(runs: AwcRuns) -> None:
    """Noise hits far from the pulse, a reference without hits, constants for other thresholds:
    flags and a robust window, never a crash or a silent number."""
    seed = SEEDS[0]
    cal = runs.calibration(seed)
    path = runs.operating("timing_alignment", seed)
    clean = offsets(path, constants=cal.constants).fit()

    rng = np.random.default_rng(7)

    def damaged(kind: str) -> np.ndarray:
        with RunFile(path) as run:
            acc = OffsetsAccumulator(run.channels, run.axes, constants=cal.constants, lsb_uA=LSB_UA)
            for i, (row, hits) in enumerate(run.iter_steps()):
                h = hits.copy()
                if kind == "noise" and row["laser"] > 0:
                    # one hit in twenty of channel 5 replaced by a noise hit anywhere in the gate
                    five = np.flatnonzero(h["channel"] == 5)[::20]
                    h["t1"][five] = rng.uniform(-10.0, 90.0, five.size)
                if kind == "no_reference":
                    h = h[h["channel"] != 0]
                if kind == "nan":
                    h["t1"][np.flatnonzero(h["channel"] == 10)[::3]] = np.nan
                acc.add_hits(i, h)
                acc.end_step(i, dict(zip(row.dtype.names, row.tolist(), strict=True)))
        return acc.fit()

    noisy = damaged("noise")
    five = int(np.flatnonzero(noisy["channel"] == 5)[0])
    assert noisy["n_rejected"][five] > 900  # the noise hits are outside the window ...
    assert abs(noisy["offset_ns"][five] - clean["offset_ns"][five]) < 0.5 * PS  # ... not in it
    no_ref = damaged("no_reference")
    assert all("no_reference" in f for f in no_ref["flag"]) and np.isnan(no_ref["offset_ns"]).all()
    nan = damaged("nan")
    ten = int(np.flatnonzero(nan["channel"] == 10)[0])
    assert nan["flag"][ten] == "nan_times" and np.isfinite(nan["offset_ns"][ten])
    # constants made for another threshold pair are not applied
    other = cal.constants.copy()
    other["thr1_op_uA"] = THR1_UA + 1.0
    differ = offsets(path, constants=other).fit()
    on = cal.calibrated
    assert all("thresholds_differ" in f for f in differ["flag"][on])
    assert np.isnan(differ["offset_ns"]).all()
