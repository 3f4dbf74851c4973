"""Differential timing algorithm: synthetic pulses of known shape and known peak times."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teststand.analysis.differential import (
    PEAK_FLAGS,
    PEAK_FLAT_TOP,
    PEAK_MAX_AT_EDGE,
    PEAK_NOT_FINITE,
    correct_peak_time,
    differential_peak_time,
    fit_phase_correction,
    phase_correction_from_shape,
    sampling_phase,
    shape_peak_time,
)

DT_NS = 25.0
N_SAMPLES = 9


def crrc(t: np.ndarray, tau_ns: float = 12.0, order: int = 3) -> np.ndarray:
    """A TileCal-like shaped pulse starting at t = 0: x**n exp(-x), peak at n * tau."""
    x = np.clip(np.asarray(t, dtype=float) / tau_ns, 0.0, None)
    return x**order * np.exp(-x) / (order**order * np.exp(-order))


def sample_pulses(
    rng: np.random.Generator,
    n: int,
    *,
    tau_ns: float = 12.0,
    order: int = 3,
    noise: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pulses with a random start and a random (asynchronous) trigger phase.

    Returns samples (n, 9), the time of sample 0 of each pulse and the true peak times, both on
    the same absolute time axis.
    """
    # Pulse start after sample 0 of the window: over exactly one sampling period, so that the
    # true phases are uniform (the 1-harmonic fit depends on how the phases are populated).
    t_start = rng.uniform(40.0, 40.0 + DT_NS, n)
    t_first = rng.uniform(-1000.0, 1000.0, n)  # sample 0 of each pulse, absolute
    t_samples = t_first[:, None] + DT_NS * np.arange(N_SAMPLES)[None, :]
    amp = rng.uniform(50.0, 500.0, n)
    pulses = amp[:, None] * crrc(t_samples - (t_first + t_start)[:, None], tau_ns, order)
    pulses += 30.0 + noise * rng.standard_normal(pulses.shape)  # pedestal and noise
    return pulses, t_first, t_first + t_start + order * tau_ns


def test_parabola_is_reconstructed_exactly() -> None:
    # For a parabola around the maximum the linear interpolation of the derivative is exact.
    tp = np.array([100.0, 112.5, 87.6, 99.99])
    t = DT_NS * np.arange(N_SAMPLES)
    samples = 1000.0 - 0.3 * (t[None, :] - tp[:, None]) ** 2
    out = differential_peak_time(samples, DT_NS)
    np.testing.assert_allclose(out["t_peak_ns"], tp, atol=1e-9)
    assert np.all(out["flag"] == 0)


@settings(max_examples=60, deadline=None)
@given(
    tp=st.floats(40.0, 160.0),
    dt=st.floats(1.0, 30.0),
    t_first=st.floats(-1e3, 1e3),
    scale=st.floats(1e-3, 1e4),
    pedestal=st.floats(-1e3, 1e3),
)
def test_parabola_exact_for_any_grid(
    tp: float, dt: float, t_first: float, scale: float, pedestal: float
) -> None:
    t = t_first + dt * np.arange(64)
    tp_abs = t_first + min(tp, 62 * dt)  # keep the peak inside the window
    samples = pedestal + scale * (1.0 - ((t - tp_abs) / (10 * dt)) ** 2)
    out = differential_peak_time(samples[None, :], dt, t_first)
    assert out["flag"][0] == 0
    assert out["t_peak_ns"][0] == pytest.approx(tp_abs, abs=1e-6 * dt + 1e-9 * abs(tp_abs))


@settings(max_examples=40, deadline=None)
@given(gain=st.floats(1e-3, 1e3), pedestal=st.floats(-1e4, 1e4), seed=st.integers(0, 2**16))
def test_peak_time_independent_of_amplitude_and_baseline(
    gain: float, pedestal: float, seed: int
) -> None:
    pulses, t_first, _ = sample_pulses(np.random.default_rng(seed), 20)
    ref = differential_peak_time(pulses, DT_NS, t_first)["t_peak_ns"]
    scaled = differential_peak_time(gain * pulses + pedestal, DT_NS, t_first)["t_peak_ns"]
    np.testing.assert_allclose(scaled, ref, atol=1e-6)


def test_sinusoid_correction_removes_the_binning_wiggle() -> None:
    rng = np.random.default_rng(11)
    calib, tf_c, true_c = sample_pulses(rng, 4000)
    test, tf_t, true_t = sample_pulses(rng, 4000)
    rec_c = differential_peak_time(calib, DT_NS, tf_c)["t_peak_ns"]
    corr = fit_phase_correction(rec_c, true_c, DT_NS, t_first_ns=tf_c)
    assert corr["flag"][0] == ""
    # TileCal: +-2 ns wiggles for 25 ns samples; the shape here has about the same.
    assert 1.0 < corr["amplitude_ns"][0] < 4.0

    rec_t = differential_peak_time(test, DT_NS, tf_t)["t_peak_ns"]
    before = true_t - rec_t
    after = true_t - correct_peak_time(rec_t, corr, t_first_ns=tf_t)
    rms_before = np.std(before)
    rms_after = np.sqrt(np.mean(after**2))  # the constant bias is removed too
    assert rms_before > 1.0
    assert rms_after < 0.2 * rms_before
    assert abs(np.mean(after)) < 0.02

    # More harmonics leave even less.
    corr3 = fit_phase_correction(rec_c, true_c, DT_NS, t_first_ns=tf_c, n_harmonics=3)
    after3 = true_t - correct_peak_time(rec_t, corr3, t_first_ns=tf_t)
    assert np.sqrt(np.mean(after3**2)) < 0.02 * rms_before


def test_correction_from_shape_equals_correction_from_pulses() -> None:
    rng = np.random.default_rng(3)
    pulses, t_first, true = sample_pulses(rng, 3000)
    rec = differential_peak_time(pulses, DT_NS, t_first)["t_peak_ns"]
    from_pulses = fit_phase_correction(rec, true, DT_NS, t_first_ns=t_first)
    from_shape = phase_correction_from_shape(
        lambda t: crrc(t - 50.0), DT_NS, N_SAMPLES, n_phases=2000
    )
    for key in ("constant_ns", "amplitude_ns", "phase_rad"):
        assert from_shape[key][0] == pytest.approx(from_pulses[key][0], abs=0.01)
    assert shape_peak_time(lambda t: crrc(t - 50.0), 0.0, 200.0) == pytest.approx(86.0, abs=1e-6)


def test_correction_with_noise_still_helps_and_errors_cover() -> None:
    rng = np.random.default_rng(5)
    pulses, t_first, true = sample_pulses(rng, 6000, noise=1.0)
    rec = differential_peak_time(pulses, DT_NS, t_first)["t_peak_ns"]
    noisy = fit_phase_correction(rec, true, DT_NS, t_first_ns=t_first)
    exact = phase_correction_from_shape(lambda t: crrc(t - 50.0), DT_NS, N_SAMPLES)
    after = true - correct_peak_time(rec, noisy, t_first_ns=t_first)
    assert np.sqrt(np.mean(after**2)) < 0.5 * np.std(true - rec)
    # The noise-free correction is the truth for the fitted coefficients.
    for key, err in (("constant_ns", "constant_err_ns"), ("amplitude_ns", "amplitude_err_ns")):
        assert abs(noisy[key][0] - exact[key][0]) < 4 * noisy[err][0]


def test_one_correction_per_channel() -> None:
    rng = np.random.default_rng(8)
    p_a, tf_a, true_a = sample_pulses(rng, 2000, tau_ns=12.0)
    p_b, tf_b, true_b = sample_pulses(rng, 2000, tau_ns=8.0, order=4)
    rec = np.concatenate(
        [differential_peak_time(p_a, DT_NS, tf_a)["t_peak_ns"],
         differential_peak_time(p_b, DT_NS, tf_b)["t_peak_ns"]]
    )  # fmt: skip
    true = np.concatenate([true_a, true_b])
    tf = np.concatenate([tf_a, tf_b])
    ch = np.repeat([7, 3], 2000)
    corr = fit_phase_correction(rec, true, DT_NS, t_first_ns=tf, channel=ch, n_harmonics=2)
    assert corr["channel"].tolist() == [3, 7]
    assert corr["amplitude_ns"][0] != pytest.approx(corr["amplitude_ns"][1], rel=0.05)
    after = true - correct_peak_time(rec, corr, t_first_ns=tf, channel=ch)
    assert np.sqrt(np.mean(after**2)) < 0.2 * np.std(true - rec)
    # A channel without constants gives NaN, not a silent number.
    assert np.isnan(correct_peak_time(rec[:3], corr, t_first_ns=tf[:3], channel=[1, 1, 1])).all()


def test_flags() -> None:
    t = DT_NS * np.arange(5)
    samples = np.array(
        [
            [9.0, 5.0, 3.0, 2.0, 1.0],  # maximum at the first sample
            [1.0, 2.0, 3.0, 5.0, 9.0],  # maximum at the last sample
            [1.0, 4.0, 4.0, 4.0, 1.0],  # flat top
            [1.0, np.nan, 6.0, 3.0, 1.0],  # NaN next to the maximum
            [1.0, 3.0, 6.0, 3.0, 1.0],  # fine, symmetric: peak at sample 2
        ]
    )
    out = differential_peak_time(samples, DT_NS)
    assert out["flag"].tolist() == [
        PEAK_MAX_AT_EDGE, PEAK_MAX_AT_EDGE, PEAK_FLAT_TOP, PEAK_NOT_FINITE, 0,
    ]  # fmt: skip
    assert np.isnan(out["t_peak_ns"][:4]).all()
    assert out["t_peak_ns"][4] == pytest.approx(t[2])
    assert PEAK_FLAGS[PEAK_FLAT_TOP] == "flat_top"
    with pytest.raises(ValueError, match="n_samples"):
        differential_peak_time(np.zeros((3, 2)), DT_NS)


def test_fit_flags_too_few_pulses() -> None:
    corr = fit_phase_correction([1.0, 2.0, 3.0], [1.1, 2.1, 3.1], DT_NS)
    assert corr["flag"][0] == "too_few_pulses"
    assert np.isnan(corr["amplitude_ns"][0])
    assert np.isnan(correct_peak_time([1.0], corr)).all()


def test_sampling_phase_is_in_unit_interval() -> None:
    phi = sampling_phase(np.array([-25.0, -0.1, 0.0, 12.5, 24.999, 25.0]), DT_NS)
    np.testing.assert_allclose(phi, [0.0, 0.996, 0.0, 0.5, 0.99996, 0.0], atol=1e-5)
