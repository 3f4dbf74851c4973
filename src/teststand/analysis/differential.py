"""Differential timing algorithm for sampled pulses (ATLAS TileCal laser timing).

A pulse sampled every ``dT`` has its largest sample ``S_i`` at time ``t_i``. The discrete derivative
is ``a = S_i - S_{i-1} >= 0`` half a sample before ``t_i`` and ``-b = S_{i+1} - S_i <= 0`` half a
sample after it; its zero crossing, by linear interpolation, is the peak time

    t_peak = t_i - dT/2 + dT * R / (1 + R),    R = a / b = (S_i - S_{i-1}) / (S_i - S_{i+1}).

The estimate is linear in the samples, insensitive to the baseline and to the amplitude, and
little sensitive to noise, but for a real pulse shape it is off by a periodic function of the
true phase between the pulse and the sampling clock (about +-2 ns for 25 ns samples in TileCal).
That wiggle is fitted as a sinusoid (optionally with harmonics and a constant, the bias of the
estimator for an asymmetric pulse) of the reconstructed phase ``phi = frac((t_peak - t_0) / dT)``
and added back. The correction depends only on the pulse shape, so it is calibrated once per
shape, either on pulses of known peak time (:func:`fit_phase_correction`) or directly from the
shape (:func:`phase_correction_from_shape`, the procedure of the TileCal note: vary the phase of
the shape against the sampling).

Everything is vectorised over pulses; the per-channel fit is one batched linear least-squares
solve.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from scipy import optimize

FloatArray = npt.NDArray[np.float64]

#: Per-pulse flags of :data:`PEAK_DTYPE` (the ``flag`` field is an index into this tuple).
PEAK_FLAGS: tuple[str, ...] = ("ok", "max_at_edge", "flat_top", "not_finite")
PEAK_OK, PEAK_MAX_AT_EDGE, PEAK_FLAT_TOP, PEAK_NOT_FINITE = range(4)

#: One row per pulse: the reconstructed peak time (ns, on the time axis of the sample times;
#: NaN when ``flag != 0``), the index and value of the largest sample, and the flag (index into
#: :data:`PEAK_FLAGS`).
PEAK_DTYPE = np.dtype(
    [("t_peak_ns", "<f8"), ("i_max", "<i4"), ("amplitude", "<f8"), ("flag", "u1")]
)

#: Largest harmonic the phase correction supports (columns of the coefficient fields).
MAX_HARMONICS = 4

#: One row per channel: the phase correction ``r(phi) = constant + sum_k a_k sin(2 pi k phi) +
#: b_k cos(2 pi k phi)`` (ns), ``phi`` the reconstructed phase in sampling periods; unused
#: harmonics are zero. ``amplitude_ns`` and ``phase_rad`` give the first harmonic as
#: ``K sin(2 pi phi + b)``. ``rms_before_ns`` and ``rms_after_ns`` are the RMS of the residual
#: ``t_true - t_peak`` about its mean before the correction and of the corrected residual.
#: ``flag`` is ``""`` when fine, else ``too_few_pulses`` or ``phases_not_covered`` (numbers NaN).
PHASE_CORRECTION_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("dt_ns", "<f8"),
        ("n_harmonics", "<i2"),
        ("n_pulses", "<i8"),
        ("constant_ns", "<f8"),
        ("constant_err_ns", "<f8"),
        ("sin_ns", "<f8", (MAX_HARMONICS,)),
        ("sin_err_ns", "<f8", (MAX_HARMONICS,)),
        ("cos_ns", "<f8", (MAX_HARMONICS,)),
        ("cos_err_ns", "<f8", (MAX_HARMONICS,)),
        ("amplitude_ns", "<f8"),
        ("amplitude_err_ns", "<f8"),
        ("phase_rad", "<f8"),
        ("phase_err_rad", "<f8"),
        ("mean_residual_ns", "<f8"),
        ("rms_before_ns", "<f8"),
        ("rms_after_ns", "<f8"),
        ("flag", "<U24"),
    ]
)


def differential_peak_time(
    samples: npt.ArrayLike,
    dt_ns: float,
    t_first_ns: float | npt.ArrayLike = 0.0,
) -> np.ndarray:
    """Reconstruct the peak time of every pulse with the differential algorithm.

    Args:
        samples: ``(n_pulses, n_samples)`` sampled pulses (any baseline, positive polarity).
        dt_ns: sampling period ``dT`` in ns.
        t_first_ns: time of sample 0 in ns, a scalar or one value per pulse (the phase between
            an asynchronous trigger and the sampling clock).

    Returns:
        A :data:`PEAK_DTYPE` array, one row per pulse. The time is NaN and the flag set when the
        largest sample is the first or last one (``max_at_edge``), when three or more samples
        share the maximum (``flat_top``: saturation) or when the samples around it are not
        finite (``not_finite``). Two equal largest samples are fine: the peak is between them.
    """
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 3:
        raise ValueError(f"samples must be (n_pulses, n_samples >= 3), got shape {s.shape}")
    if not dt_ns > 0:
        raise ValueError(f"dt_ns must be positive, got {dt_ns}")
    n_pulses, n_samples = s.shape
    t_first = np.broadcast_to(np.asarray(t_first_ns, dtype=np.float64), (n_pulses,))
    rows = np.arange(n_pulses)
    # NaN samples must not win the argmax silently: they are flagged below.
    i_max = np.argmax(np.where(np.isnan(s), -np.inf, s), axis=1)
    inner = np.clip(i_max, 1, n_samples - 2)
    s_prev, s_max, s_next = s[rows, inner - 1], s[rows, inner], s[rows, inner + 1]
    rise = s_max - s_prev  # a >= 0
    fall = s_max - s_next  # b >= 0
    denom = rise + fall
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = rise / denom  # R / (1 + R)
    t_peak = t_first + (inner - 0.5 + frac) * dt_ns

    flag = np.zeros(n_pulses, dtype=np.uint8)
    # Three or more samples at the maximum: a saturated or clipped pulse, no peak to find.
    n_at_max = np.count_nonzero(s == s[rows, i_max][:, None], axis=1)
    flag[(denom == 0) | (n_at_max >= 3)] = PEAK_FLAT_TOP
    flag[(i_max == 0) | (i_max == n_samples - 1)] = PEAK_MAX_AT_EDGE
    flag[~np.isfinite(s_prev + s_max + s_next + t_first)] = PEAK_NOT_FINITE
    out = np.empty(n_pulses, dtype=PEAK_DTYPE)
    out["t_peak_ns"] = np.where(flag == PEAK_OK, t_peak, np.nan)
    out["i_max"] = i_max
    out["amplitude"] = s[rows, i_max]
    out["flag"] = flag
    return out


def sampling_phase(
    t_ns: npt.ArrayLike, dt_ns: float, t_first_ns: float | npt.ArrayLike = 0.0
) -> FloatArray:
    """Return the phase of a time within its sampling period, in [0, 1) periods."""
    x = (np.asarray(t_ns, dtype=np.float64) - np.asarray(t_first_ns, dtype=np.float64)) / dt_ns
    return np.asarray(x - np.floor(x), dtype=np.float64)


def _design(phi: FloatArray, n_harmonics: int, constant: bool) -> FloatArray:
    cols = [np.ones_like(phi)] if constant else []
    for k in range(1, n_harmonics + 1):
        cols += [np.sin(2 * np.pi * k * phi), np.cos(2 * np.pi * k * phi)]
    return np.stack(cols, axis=-1)


def fit_phase_correction(
    t_peak_ns: npt.ArrayLike,
    t_true_ns: npt.ArrayLike,
    dt_ns: float,
    *,
    t_first_ns: float | npt.ArrayLike = 0.0,
    channel: npt.ArrayLike | None = None,
    n_harmonics: int = 1,
    fit_constant: bool = True,
    min_pulses: int = 20,
) -> np.ndarray:
    """Fit the residual ``t_true - t_peak`` versus the reconstructed phase with a sinusoid.

    The model is ``r(phi) = c + sum_{k<=n_harmonics} a_k sin(2 pi k phi) + b_k cos(2 pi k phi)``
    with ``phi = frac((t_peak - t_first) / dT)``: a linear least-squares problem, solved for all
    channels at once from per-channel normal equations. ``n_harmonics=1`` is the TileCal form
    ``K sin(2 pi phi + b)``; with ``fit_constant`` the mean bias of the estimator is removed too.

    Args:
        t_peak_ns: reconstructed peak times (NaN entries are ignored).
        t_true_ns: the known peak times of the same pulses.
        dt_ns: sampling period in ns.
        t_first_ns: time of sample 0 of each pulse (scalar or per pulse).
        channel: channel number of each pulse (one correction per channel); ``None`` fits one
            correction, returned as channel 0.
        n_harmonics: harmonics of the sinusoid, 1..:data:`MAX_HARMONICS`.
        fit_constant: fit a constant term too.
        min_pulses: channels with fewer valid pulses are flagged ``too_few_pulses``.

    Returns:
        A :data:`PHASE_CORRECTION_DTYPE` array, one row per channel, sorted by channel. Errors are
        from the residual scatter about the fit (the pulses' noise and anything the harmonics do
        not describe).
    """
    if not 1 <= n_harmonics <= MAX_HARMONICS:
        raise ValueError(f"n_harmonics must be 1..{MAX_HARMONICS}, got {n_harmonics}")
    t_peak = np.asarray(t_peak_ns, dtype=np.float64).ravel()
    t_true = np.asarray(t_true_ns, dtype=np.float64).ravel()
    if t_peak.shape != t_true.shape:
        raise ValueError("t_peak_ns and t_true_ns must have the same length")
    ch = (
        np.zeros(t_peak.size, dtype=np.int64)
        if channel is None
        else np.asarray(channel, dtype=np.int64).ravel()
    )
    phi = sampling_phase(t_peak, dt_ns, np.broadcast_to(t_first_ns, t_peak.shape))
    resid = t_true - t_peak
    ok = np.isfinite(phi) & np.isfinite(resid)
    channels, g = np.unique(ch, return_inverse=True)
    n_ch = channels.size
    out = np.zeros(n_ch, dtype=PHASE_CORRECTION_DTYPE)
    out["channel"] = channels
    out["dt_ns"] = dt_ns
    out["n_harmonics"] = n_harmonics
    out["flag"] = ""

    x = _design(phi[ok], n_harmonics, fit_constant)
    y = resid[ok]
    gi = g[ok]
    n_par = x.shape[1]
    n = np.bincount(gi, minlength=n_ch)
    out["n_pulses"] = n
    # Grouped normal equations: (X^T X)_jk and (X^T y)_j per channel via bincount.
    xtx = np.empty((n_ch, n_par, n_par))
    for j in range(n_par):
        for k in range(j, n_par):
            xtx[:, j, k] = xtx[:, k, j] = np.bincount(gi, x[:, j] * x[:, k], minlength=n_ch)
    xty = np.stack([np.bincount(gi, x[:, j] * y, minlength=n_ch) for j in range(n_par)], -1)
    yy = np.bincount(gi, y * y, minlength=n_ch)
    sy = np.bincount(gi, y, minlength=n_ch)

    cond = np.linalg.cond(xtx) if n_ch else np.zeros(0)
    good = (n >= max(min_pulses, n_par + 1)) & (cond < 1e10)
    out["flag"][n < max(min_pulses, n_par + 1)] = "too_few_pulses"
    out["flag"][(n >= max(min_pulses, n_par + 1)) & ~good] = "phases_not_covered"
    nan_fields = [
        "constant_ns", "constant_err_ns", "sin_ns", "sin_err_ns", "cos_ns", "cos_err_ns",
        "amplitude_ns", "amplitude_err_ns", "phase_rad", "phase_err_rad", "rms_after_ns",
    ]  # fmt: skip
    for name in nan_fields:
        out[name] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_y = sy / n
        out["mean_residual_ns"] = mean_y
        out["rms_before_ns"] = np.sqrt(np.maximum(yy / n - mean_y**2, 0.0))
    if not good.any():
        return out

    a = xtx[good]
    beta = np.linalg.solve(a, xty[good][..., None])[..., 0]
    # chi2 = y.y - 2 beta.X^T y + beta.X^T X beta = y.y - beta.X^T y at the solution.
    chi2 = np.maximum(yy[good] - np.einsum("ij,ij->i", beta, xty[good]), 0.0)
    ndf = n[good] - n_par
    s2 = np.where(ndf > 0, chi2 / np.maximum(ndf, 1), np.nan)
    cov = np.linalg.inv(a) * s2[:, None, None]
    err = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    out["rms_after_ns"][good] = np.sqrt(chi2 / n[good])

    col = 0
    if fit_constant:
        out["constant_ns"][good] = beta[:, 0]
        out["constant_err_ns"][good] = err[:, 0]
        col = 1
    else:
        out["constant_ns"][good] = 0.0
        out["constant_err_ns"][good] = 0.0
    sin = np.zeros((good.sum(), MAX_HARMONICS))
    cos = np.zeros_like(sin)
    sin_err = np.zeros_like(sin)
    cos_err = np.zeros_like(sin)
    sin[:, :n_harmonics] = beta[:, col::2]
    cos[:, :n_harmonics] = beta[:, col + 1 :: 2]
    sin_err[:, :n_harmonics] = err[:, col::2]
    cos_err[:, :n_harmonics] = err[:, col + 1 :: 2]
    out["sin_ns"][good] = sin
    out["cos_ns"][good] = cos
    out["sin_err_ns"][good] = sin_err
    out["cos_err_ns"][good] = cos_err
    # First harmonic as K sin(2 pi phi + b): a1 = K cos b, b1 = K sin b.
    a1, b1 = beta[:, col], beta[:, col + 1]
    var_a, var_b = cov[:, col, col], cov[:, col + 1, col + 1]
    cov_ab = cov[:, col, col + 1]
    k_amp = np.hypot(a1, b1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["amplitude_ns"][good] = k_amp
        out["amplitude_err_ns"][good] = np.sqrt(
            (a1**2 * var_a + b1**2 * var_b + 2 * a1 * b1 * cov_ab) / k_amp**2
        )
        out["phase_rad"][good] = np.arctan2(b1, a1)
        out["phase_err_rad"][good] = np.sqrt(
            (b1**2 * var_a + a1**2 * var_b - 2 * a1 * b1 * cov_ab) / k_amp**4
        )
    return out


def phase_residual(phi: npt.ArrayLike, constants: np.ndarray) -> FloatArray:
    """Evaluate the fitted residual ``r(phi)`` (ns) of one correction row at phases ``phi``."""
    p = np.asarray(phi, dtype=np.float64)
    r = np.full(p.shape, float(constants["constant_ns"]))
    for k in range(1, int(constants["n_harmonics"]) + 1):
        r += constants["sin_ns"][k - 1] * np.sin(2 * np.pi * k * p)
        r += constants["cos_ns"][k - 1] * np.cos(2 * np.pi * k * p)
    return r


def correct_peak_time(
    t_peak_ns: npt.ArrayLike,
    constants: np.ndarray,
    *,
    t_first_ns: float | npt.ArrayLike = 0.0,
    channel: npt.ArrayLike | None = None,
) -> FloatArray:
    """Apply the phase correction: ``t = t_peak + r(phi)``.

    Args:
        t_peak_ns: reconstructed peak times (from :func:`differential_peak_time`).
        constants: a :data:`PHASE_CORRECTION_DTYPE` array.
        t_first_ns: time of sample 0 of each pulse, as in the reconstruction.
        channel: channel of each pulse; ``None`` uses the first row of ``constants``.

    Returns:
        Corrected times; NaN for pulses of a channel without a usable correction.
    """
    t = np.asarray(t_peak_ns, dtype=np.float64)
    constants = np.atleast_1d(constants)
    if channel is None:
        row = np.zeros(t.shape, dtype=np.intp)
        known = np.ones(t.shape, dtype=bool)
    else:
        ch = np.asarray(channel, dtype=np.int64)
        order = np.argsort(constants["channel"])
        sorted_ch = constants["channel"][order].astype(np.int64)
        pos = np.clip(np.searchsorted(sorted_ch, ch), 0, max(sorted_ch.size - 1, 0))
        known = sorted_ch[pos] == ch if sorted_ch.size else np.zeros(ch.shape, dtype=bool)
        row = order[pos]
    c = constants[row]
    dt = c["dt_ns"]
    phi = sampling_phase(t / dt, 1.0, np.asarray(t_first_ns, dtype=np.float64) / dt)
    r = c["constant_ns"].astype(np.float64).copy()
    for k in range(1, MAX_HARMONICS + 1):
        # Unused harmonics have zero coefficients.
        r += c["sin_ns"][..., k - 1] * np.sin(2 * np.pi * k * phi)
        r += c["cos_ns"][..., k - 1] * np.cos(2 * np.pi * k * phi)
    ok = known & (c["flag"] == "")
    return np.where(ok, t + r, np.nan)


def shape_peak_time(
    shape: Callable[[FloatArray], FloatArray], t_lo_ns: float, t_hi_ns: float
) -> float:
    """Locate the maximum of a pulse shape on ``[t_lo, t_hi]`` (dense scan, then Brent)."""
    grid = np.linspace(t_lo_ns, t_hi_ns, 4001)
    values = np.asarray(shape(grid), dtype=np.float64)
    i = int(np.argmax(values))
    step = grid[1] - grid[0]
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if hi - lo < step:
        return float(grid[i])
    res = optimize.minimize_scalar(
        lambda x: -float(np.asarray(shape(np.array([x])))[0]),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-9 * max(1.0, abs(hi))},
    )
    return float(res.x)


def phase_correction_from_shape(
    shape: Callable[[FloatArray], FloatArray],
    dt_ns: float,
    n_samples: int,
    *,
    peak_time_ns: float | None = None,
    n_phases: int = 1000,
    n_harmonics: int = 1,
    fit_constant: bool = True,
) -> np.ndarray:
    """Calibrate the phase correction for a known pulse shape (no noise).

    The shape (a vectorised function of time in ns, peak inside the sampling window
    ``[0, n_samples * dT)``) is sampled at ``n_phases`` phases spread uniformly over one period,
    each pulse is reconstructed with :func:`differential_peak_time` and the residual is fitted
    with :func:`fit_phase_correction`.

    Args:
        shape: pulse shape ``shape(t_ns) -> amplitude``.
        dt_ns: sampling period in ns.
        n_samples: samples per pulse.
        peak_time_ns: the shape's peak time; found numerically when ``None``.
        n_phases: number of sampling phases.
        n_harmonics, fit_constant: as in :func:`fit_phase_correction`.

    Returns:
        A one-row :data:`PHASE_CORRECTION_DTYPE` array (channel 0).
    """
    t_max = (n_samples - 1) * dt_ns
    t0 = shape_peak_time(shape, 0.0, t_max) if peak_time_ns is None else float(peak_time_ns)
    # Shifting the sampling grid by -delta is the same as delaying the pulse by +delta.
    delta = (np.arange(n_phases) + 0.5) / n_phases * dt_ns
    t_samples = np.arange(n_samples) * dt_ns
    pulses = np.asarray(shape((t_samples[None, :] - delta[:, None]).ravel()), dtype=np.float64)
    peaks = differential_peak_time(pulses.reshape(n_phases, n_samples), dt_ns)
    return fit_phase_correction(
        peaks["t_peak_ns"],
        t0 + delta,
        dt_ns,
        n_harmonics=n_harmonics,
        fit_constant=fit_constant,
    )
