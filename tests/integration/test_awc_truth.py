"""Dual-threshold amplitude walk (AWC) from real runs on the simulated TOFHIR2 bench, against the
simulator's truth.

Every number comes the way a technician gets it: ``run_recipe`` records an ``awc_calibration``
run, then ``awc_validation`` and ``timing_alignment`` runs at the operating thresholds, and each
run file's steps are fed to the method's accumulator exactly as the offline analysis (and, step by
step, the online one) feeds them. The later runs take the baselines the calibration measured
(``baseline_codes``), as a queue would hand them on, so that every channel sits at the same DAC
codes in all three runs.

The calibration lights four bars (eight channels, on four readout boards) with 10,000 pulses a
step over the thr2 steps the fit uses: that is the statistics a 5 ps judgement needs (the shipped
recipe's 500 pulses give t0 to 7-19 ps, see ``test_shipped_recipe``). The validation spreads the
amplitudes over 30 laser intensities from 16 to 100 %, wider than the calibrated range, so that
the charge bins see a smooth amplitude distribution (a bin that cuts through the tail of a single
intensity's charge cluster sees amplitudes pulled towards the cluster's centre by the QDC
resolution, and walk that is not there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from teststand.analysis import fit_scurves
from teststand.analysis.online import StepAccumulator
from teststand.analysis.walk import (
    AWC_DTYPE,
    AWC_VALIDATION_DTYPE,
    AwcAccumulator,
    AwcFit,
    AwcValidationAccumulator,
    fit_awc,
)
from teststand.app.runner import run_recipe
from teststand.sequences import noise_counts
from teststand.sim.physics import TofhirModel, awc_truth
from teststand.storage import RunFile

PS = 1e-3  # ns
LSB_UA = 0.3125
THR1_UA = 6.0
GAP_CODES = 13  # thr2 = thr1 + 13 DAC steps = 10.0625 uA: the default operating pair
BARS = (0, 5, 10, 15)  # channels b (boards 0, 1) and b + 16 (boards 2, 3)
SEEDS = (1, 2)
SIM_STAND = Path(__file__).parents[2] / "src" / "teststand" / "stands" / "sim.toml"

CALIBRATION_RECIPE = f"""
name = "awc-cal"
kind = "awc_calibration"
[parameters]
bars = {list(BARS)}
intensities_pct = [20.0, 28.0, 38.0, 52.0, 72.0, 100.0]
thr1_uA = {THR1_UA}
thr2_uA = {{ start = 4.75, stop = 10.0625, step = 0.3125 }}   # the edge fit's window, in DAC steps
n_pulses = 10000
baseline_scan = {{ start = 0, stop = 40, step = 1 }}
"""

VALIDATION_INTENSITIES = [round(float(x), 2) for x in np.geomspace(16.0, 100.0, 30)]


def operating_recipe(
    kind: str, baselines: np.ndarray, intensities: list[float], pulses: int
) -> str:
    """An awc_validation or timing_alignment recipe at 6 / 10 uA on the given baselines."""
    return f"""
name = "{kind.replace("_", "-")}"
kind = "{kind}"
[parameters]
intensities_pct = {intensities}
thr1_uA = {THR1_UA}
thr2_uA = 10.0
n_pulses = {pulses}
baseline_codes = {[round(float(b), 6) for b in baselines]}
"""


def assert_same_table(a: np.ndarray, b: np.ndarray) -> None:
    """Two result tables are identical, field by field (NaN equal to NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    for name in a.dtype.names or ():
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def feed(acc: StepAccumulator, path: Path) -> StepAccumulator:
    """Feed a run file's steps to an accumulator, exactly as the offline analysis does."""
    with RunFile(path) as run:
        for i, (row, hits) in enumerate(run.iter_steps()):
            acc.add_hits(i, hits)
            acc.end_step(i, dict(zip(row.dtype.names, row.tolist(), strict=True)))
    return acc


class Online:
    """A document-stream subscriber that feeds an accumulator while the run is taken."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.acc: StepAccumulator | None = None

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            # The DAC step travels in the start document, as the online analysis takes it.
            lsb = doc["instruments"]["dac"]["settings"]["lsb_uA"]
            self.acc = self.make(doc["channels"], doc["axes"], lsb_uA=lsb)
        elif name == "hits" and self.acc is not None:
            self.acc.add_hits(doc["index"], doc["hits"])
        elif name == "step" and self.acc is not None:
            row = {**doc["axes"], "index": doc["index"]}
            row.update({k: doc[k] for k in ("n_hits", "n_triggers", "t_start", "t_stop")})
            self.acc.end_step(doc["index"], row)


def measured_baselines(path: Path) -> np.ndarray:
    """The baselines (DAC codes) the plan measured with its noise scan, fitted as it fits them."""
    with RunFile(path) as run:
        steps = run.steps
        n = run.channels.size
        noise = np.flatnonzero(steps["laser"] == 0)
        counts = np.stack(
            [noise_counts(run.step_hits(int(steps["index"][i])), n) for i in noise], axis=1
        )
        codes = steps["thr_code"][noise]
        triggers = steps["n_triggers"][noise]
    result = fit_scurves(codes, np.broadcast_to(triggers, counts.shape), counts)
    return np.asarray(result["baseline_code"], dtype=float)


@dataclass
class Calibration:
    """An awc_calibration run and what the tests need to judge it."""

    path: Path
    stand: str
    seed: int
    fit: AwcFit
    online: np.ndarray  # the constants of an accumulator fed from the document stream
    baselines: np.ndarray  # measured by the run, DAC codes
    channels: np.ndarray
    truth: np.ndarray
    calibrated: np.ndarray  # bool per channel: its bar was lit

    @property
    def constants(self) -> np.ndarray:
        return self.fit.constants

    @property
    def thresholds_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The thresholds every channel really had (uA above its true baseline)."""
        code1 = np.rint(self.baselines + THR1_UA / LSB_UA)
        thr1 = (code1 - self.truth["baseline"]) * LSB_UA
        return thr1, thr1 + GAP_CODES * LSB_UA

    @property
    def awc_true(self) -> np.ndarray:
        """The true AWC at the thresholds set (the truth table's is at exactly 6 / 10 uA)."""
        return awc_truth(self.truth["n"], *self.thresholds_set)


class AwcRuns:
    """Run files recorded once per test session and shared by the AWC and alignment tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._calibrations: dict[tuple[int, bool], Calibration] = {}
        self._runs: dict[tuple[str, int, bool], Path] = {}

    def stand(self, non_scaling: bool) -> str:
        if not non_scaling:
            return "sim"
        path = self.root / "sim-non-scaling.toml"
        if not path.exists():
            text = SIM_STAND.read_text()
            assert "non_scaling = false" in text
            path.write_text(text.replace("non_scaling = false", "non_scaling = true"))
        return str(path)

    def _record(self, text: str, seed: int, non_scaling: bool, **kw: Any) -> Path:
        name = text.split('name = "')[1].split('"')[0]
        folder = self.root / f"{name}-{seed}-{'ns' if non_scaling else 'sc'}"
        folder.mkdir(parents=True, exist_ok=True)
        recipe = folder / f"{name}.toml"
        recipe.write_text(text)
        outcome = run_recipe(str(recipe), self.stand(non_scaling), folder, seed=seed, **kw)
        assert outcome.result.status == "completed", outcome.result.reason
        return outcome.run_path

    def calibration(self, seed: int, non_scaling: bool = False) -> Calibration:
        key = (seed, non_scaling)
        if key not in self._calibrations:
            online = Online(AwcAccumulator)
            path = self._record(CALIBRATION_RECIPE, seed, non_scaling, subscribers=[online])
            with RunFile(path) as run:
                channels, axes, truth = run.channels, run.axes, run.truth
            acc = feed(AwcAccumulator(channels, axes, lsb_uA=LSB_UA), path)
            acc.fit()
            assert acc.last_fit is not None and online.acc is not None
            self._calibrations[key] = Calibration(
                path,
                self.stand(non_scaling),
                seed,
                acc.last_fit,
                online.acc.fit(),
                measured_baselines(path),
                channels,
                truth,
                np.isin(channels["bar"], BARS),
            )
        return self._calibrations[key]

    def operating(self, kind: str, seed: int, non_scaling: bool = False) -> Path:
        """A validation or alignment run on the calibration's baselines."""
        key = (kind, seed, non_scaling)
        if key not in self._runs:
            cal = self.calibration(seed, non_scaling)
            if kind == "awc_validation":
                text = operating_recipe(kind, cal.baselines, VALIDATION_INTENSITIES, 4000)
            else:
                text = operating_recipe(kind, cal.baselines, [60.0], 20000)
            self._runs[key] = self._record(text, seed, non_scaling)
        return self._runs[key]


_RUNS: AwcRuns | None = None


def awc_runs(factory: pytest.TempPathFactory) -> AwcRuns:
    """The session's shared runs (the alignment tests use the same calibrations)."""
    global _RUNS
    if _RUNS is None:
        _RUNS = AwcRuns(factory.mktemp("awc-runs"))
    return _RUNS


def validate(cal: Calibration, path: Path, constants: np.ndarray | None = None) -> np.ndarray:
    with RunFile(path) as run:
        acc = AwcValidationAccumulator(
            run.channels,
            run.axes,
            constants=cal.constants if constants is None else constants,
            lsb_uA=LSB_UA,
        )
    return feed(acc, path).fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> AwcRuns:
    return awc_runs(tmp_path_factory)


# ------------------------------------------------------------------------------------------------
# the calibration


@pytest.mark.parametrize("seed", [*SEEDS, pytest.param(3, marks=pytest.mark.slow)])
def test_calibration_matches_truth(runs: AwcRuns, seed: int) -> None:
    """AWC and walk-free time t0 of every lit channel against the truth; the others flagged."""
    cal = runs.calibration(seed)
    c, on = cal.constants, cal.calibrated
    assert c.dtype == AWC_DTYPE
    assert (c["flag"][on] == "").all(), c["flag"][on]
    assert (c["flag"][~on] == "no_hits").all() and np.isnan(c["awc_uA"][~on]).all()
    assert (c["awc_slope_source"][on] == "edge").all()
    # the operating pair as /steps records it: thr1 and the thr2 step 13 DAC codes above it
    np.testing.assert_array_equal(c["thr1_op_uA"][on], THR1_UA)
    np.testing.assert_array_equal(c["thr2_op_uA"][on], THR1_UA + GAP_CODES * LSB_UA)
    # t0 relative to channel 0 against the truth's walk-free offsets: the 5 ps
    offset = cal.truth["offset_ns"]
    t0_error = (c["t0_ns"] - c["t0_ns"][0]) - (offset - offset[0])
    assert np.all(np.abs(t0_error[on]) < 5 * PS), t0_error[on] / PS
    # the AWC at the thresholds really set, to half a per cent (seen: < 3 per mil)
    assert np.all(np.abs(c["awc_uA"][on] / cal.awc_true[on] - 1) < 0.005)
    # the online result, fed from the document stream while the run was taken, is the offline one
    assert_same_table(cal.online, c)


@pytest.mark.parametrize("seed", SEEDS)
def test_trim_reduces_the_awc_error_spread(runs: AwcRuns, seed: int) -> None:
    """The paper's trim: without it every channel would get one common AWC (the Day-1 setting),
    and its error is the channels' spread; the AWC predicted from the slope-versus-charge
    relation has a much smaller error. (The fitted per-channel AWC is better still, to 3 per mil:
    the trim serves channels calibrated without a thr2 scan.)"""
    cal = runs.calibration(seed)
    on = cal.calibrated
    truth = cal.awc_true[on]
    common = np.mean(cal.constants["awc_uA"][on])
    error_before = np.std(common - truth)
    error_after = np.std(cal.constants["awc_trimmed_uA"][on] - truth)
    assert error_after < 0.3 * error_before, (error_before, error_after)
    trim = cal.fit.trim
    assert trim.predictor == "slope_loglog" and trim.n_channels == on.sum()
    assert trim.awc_spread_after_uA < 0.3 * trim.awc_spread_before_uA


def test_accumulator_is_fit_awc_on_the_file_columns(runs: AwcRuns) -> None:
    """fit_awc on the hit columns and the accumulator fed step by step are the same reduction."""
    cal = runs.calibration(SEEDS[0])
    with RunFile(cal.path) as run:
        steps = run.steps
        laser = np.flatnonzero(steps["laser"] > 0)
        cols = run.columns(("channel", "t1", "t2", "q"), steps=laser)
        s = steps[laser]
    fit = fit_awc(
        cols["channel"],
        cols["t1"],
        cols["t2"],
        cols["q"],
        cols["step"],
        s["intensity"],
        s["thr1"],
        s["thr2"],
        n_channels=cal.channels.size,
        step_bar=s["bar"],
        channel_bar=cal.channels["bar"],
        lsb_uA=LSB_UA,
    )
    # fit_awc sees only the laser steps; the accumulator also fits the noise-scan steps and keeps
    # the baselines with the constants. Everything else is the same to the bit.
    from_file = cal.constants.copy()
    assert np.all(np.isfinite(from_file["baseline_code"]))
    assert np.all(np.isnan(fit.constants["baseline_code"]))
    from_file["baseline_code"] = np.nan
    assert_same_table(fit.constants, from_file)
    assert_same_table(fit.points, cal.fit.points)


# ------------------------------------------------------------------------------------------------
# the validation


@pytest.mark.parametrize("seed", [*SEEDS, pytest.param(3, marks=pytest.mark.slow)])
def test_walk_left_after_correction(runs: AwcRuns, seed: int) -> None:
    """The issue's acceptance: on a separate validation run with spread amplitudes, the mean
    corrected time is flat in charge to 5 ps over the useful range, where the raw walk is about
    a nanosecond (1-2.5 ns across the whole run)."""
    cal = runs.calibration(seed)
    v = validate(cal, runs.operating("awc_validation", seed))
    on = cal.calibrated
    assert v.dtype == AWC_VALIDATION_DTYPE
    assert (v["flag"][on] == "").all(), v["flag"][on]
    assert (v["flag"][~on] == "no_constants").all() and np.isnan(v["residual_walk_ns"][~on]).all()
    assert (v["n_bins_used"][on] == 10).all()
    residual = v["residual_walk_ns"][on]
    assert np.all(residual <= 5 * PS), residual / PS
    assert np.median(residual) < 3 * PS
    # the walk the correction removed: over the same charge bins, and across the whole run
    assert np.all((v["walk_ns"][on] > 0.5) & (v["walk_ns"][on] < 4.0)), v["walk_ns"][on]
    assert np.all((v["walk_range_ns"][on] > 1.0) & (v["walk_range_ns"][on] < 4.0))
    assert np.all(residual < 0.01 * v["walk_ns"][on])


def test_derivative_slope_leaves_walk(runs: AwcRuns) -> None:
    """Mixing slope definitions fails: an AWC fitted against the derivative 1 / t'(thr1) of the
    mean edges, applied with the dual-threshold (secant) slope table, leaves of order 100 ps."""
    seed = SEEDS[0]
    cal = runs.calibration(seed)
    c = cal.constants.copy()
    pts = cal.fit.points[cal.fit.points["used"]]
    for row in np.flatnonzero(cal.calibrated):
        mine = pts["channel"] == c["channel"][row]
        edge = pts["edge_c"][mine]
        derivative_slope = 1.0 / (edge[:, 1] + 2 * edge[:, 2] * c["thr1_op_uA"][row])
        c["awc_uA"][row] = np.polyfit(1.0 / derivative_slope, pts["t_thr1_ns"][mine], 1)[0]
    on = cal.calibrated
    assert np.all(c["awc_uA"][on] < cal.constants["awc_uA"][on] - 0.3)
    path = runs.operating("awc_validation", seed)
    wrong = validate(cal, path, c)["residual_walk_ns"][on]
    right = validate(cal, path)["residual_walk_ns"][on]
    assert np.all(wrong > 30 * PS) and np.median(wrong) > 60 * PS, wrong / PS
    assert np.all(wrong > 10 * right)


def best_single_awc(cal: Calibration, q_lo: np.ndarray, q_hi: np.ndarray) -> np.ndarray:
    """Per calibrated channel: the smallest max - min of ``t1 - AWC (t2 - t1) / gap`` that any
    one AWC reaches on noiseless pulses of the simulator's model, over the charges judged."""
    model = TofhirModel(cal.channels, cal.seed, non_scaling=True, lsb_uA=LSB_UA)
    np.testing.assert_array_equal(model.truth()["n_slope"], cal.truth["n_slope"])
    thr1, thr2 = cal.thresholds_set
    best = np.full(cal.channels.size, np.nan)
    for i in np.flatnonzero(cal.calibrated):
        amplitude = np.geomspace(q_lo[i], q_hi[i], 400) / cal.truth["q_per_uA"][i]
        t1 = model.noiseless_crossing_time(i, amplitude, thr1[i])
        x = (model.noiseless_crossing_time(i, amplitude, thr2[i]) - t1) / (thr2[i] - thr1[i])
        fit = minimize_scalar(
            lambda awc, t1=t1, x=x: float(np.ptp(t1 - awc * x)),
            bounds=(0.0, 50.0),
            method="bounded",
            options={"xatol": 1e-7},
        )
        best[i] = fit.fun
    return best


def test_non_scaling_edges_near_the_best_single_awc(runs: AwcRuns) -> None:
    """TOFHIR2 edges do not scale with amplitude (the simulator's non_scaling option): then no
    single AWC makes the time flat. The residual is judged against the best one AWC per channel
    can do on noiseless pulses of the same model over the same charges (design 4.2). The fitted
    AWC is tuned on the calibration's intensities, weighted by their errors, not on the judged
    range: it stays within 10 ps of that best (seen over seeds 1-5: -1.4 to +8.3 ps, median
    1.8 ps, with the best itself 5-18 ps)."""
    seed = SEEDS[0]
    cal = runs.calibration(seed, non_scaling=True)
    on = cal.calibrated
    assert (cal.constants["flag"][on] == "").all()
    assert (cal.truth["n_slope"][on] > 0).all()
    v = validate(cal, runs.operating("awc_validation", seed, non_scaling=True))
    assert (v["flag"][on] == "").all()
    best = best_single_awc(cal, v["q_lo"], v["q_hi"])[on]
    residual = v["residual_walk_ns"][on]
    excess = residual - best
    assert np.median(best) > 5 * PS  # the edges really do not scale
    assert np.all(excess < 10 * PS), (residual / PS, best / PS)
    assert np.median(excess) < 4 * PS


@pytest.mark.slow
def test_shipped_recipe(runs: AwcRuns) -> None:
    """What the shipped awc-calibration (16 bars, 500 pulses a step) reaches, judged on a
    validation with spread amplitudes: the median channel is flat to a few ps, the worst to about
    10 ps, and t0 is right to 7-19 ps (seeds 1-3). 500 pulses are too few for the 5 ps the issue
    asks of every channel; the tests above use 10,000."""
    seed = 1
    folder = runs.root / "shipped"
    outcome = run_recipe("awc-calibration", "sim", folder, seed=seed)
    with RunFile(outcome.run_path) as run:
        c = feed(AwcAccumulator(run.channels, run.axes, lsb_uA=LSB_UA), outcome.run_path).fit()
        truth = run.truth
    assert (c["flag"] == "").all()
    offset = truth["offset_ns"]
    t0_error = (c["t0_ns"] - c["t0_ns"][0]) - (offset - offset[0])
    assert np.all(np.abs(t0_error) < 30 * PS)
    text = operating_recipe(
        "awc_validation", measured_baselines(outcome.run_path), VALIDATION_INTENSITIES, 4000
    )
    recipe = folder / "validation.toml"
    recipe.write_text(text)
    validation = run_recipe(str(recipe), "sim", folder, seed=seed)
    with RunFile(validation.run_path) as run:
        v = feed(
            AwcValidationAccumulator(run.channels, run.axes, constants=c, lsb_uA=LSB_UA),
            validation.run_path,
        ).fit()
    residual = v["residual_walk_ns"]
    assert (v["flag"] == "").all()
    assert np.median(residual) < 4 * PS and np.all(residual < 20 * PS)


# ------------------------------------------------------------------------------------------------
# bad data


def test_bad_data_gives_flags_not_numbers(runs: AwcRuns) -> None:
    """A real calibration file fed with damaged hits: every damaged channel says why, the others
    are untouched, nothing raises. Damage: channel 0 empty in every step (and some whole steps
    empty), channel 16 saturated (Q = 1023), channel 5 with NaN times in half its hits, channel
    21 with 30 hits a step."""
    cal = runs.calibration(SEEDS[0])
    with RunFile(cal.path) as run:
        acc = AwcAccumulator(run.channels, run.axes, lsb_uA=LSB_UA)
        for i, (row, hits) in enumerate(run.iter_steps()):
            h = hits[hits["channel"] != 0].copy()
            h["q"][h["channel"] == 16] = 1023.0
            five = np.flatnonzero(h["channel"] == 5)
            h["t1"][five[::2]] = np.nan
            few = np.flatnonzero(h["channel"] == 21)
            h = np.delete(h, few[30:])
            if i % 7 == 3:
                h = h[:0]  # an empty step
            acc.add_hits(i, h)
            acc.end_step(i, dict(zip(row.dtype.names, row.tolist(), strict=True)))
    c = acc.fit()
    flags = {
        int(ch): set(f.split("|")) - {""} for ch, f in zip(c["channel"], c["flag"], strict=True)
    }
    assert flags[0] == {"no_hits"} and np.isnan(c["awc_uA"][0])
    assert {"saturated_charge", "no_slope_table"} <= flags[16]
    assert np.isnan(c["slope_lut_s"][16]).all() and np.isnan(c["awc_trimmed_uA"][16])
    assert "nan_times" in flags[5] and np.isfinite(c["awc_uA"][5])
    assert "too_few_hits" in flags[21] and np.isnan(c["awc_uA"][21])
    for ch in (10, 15, 26, 31):  # undamaged: calibrated despite the empty steps
        assert flags[ch] == set() and np.isfinite(c["awc_uA"][ch]), (ch, flags[ch])
    # the validation without constants, and with constants of another threshold pair
    path = runs.operating("awc_validation", SEEDS[0])
    with RunFile(path) as run:
        none = feed(AwcValidationAccumulator(run.channels, run.axes, lsb_uA=LSB_UA), path).fit()
    assert (none["flag"] == "no_constants").all() and np.isnan(none["residual_walk_ns"]).all()
    other = cal.constants.copy()
    other["thr2_op_uA"] = 9.0
    differ = validate(cal, path, other)
    on = cal.calibrated
    assert (differ["flag"][on] == "thresholds_differ|too_few_hits").all()
    assert np.isnan(differ["residual_walk_ns"][on]).all()
    assert (differ["n_other_thresholds"][on] > 0).all()
