"""Threshold S-curves: baseline and noise of every discriminator from a threshold-code scan.

With the laser off, a discriminator set below its baseline fires on every trigger and one set well
above it never fires. Between the two, the noise makes the trigger efficiency a normal CDF of the
threshold code ``c`` (PETsys style)::

    eff(c) = Phi((x0 - c) / sigma)          (falling: the usual TOFHIR2 polarity)

``x0`` is the baseline and ``sigma`` the noise, both in DAC codes. The fit runs on counts (triggers
and hits per channel and code), so it works the same for a live scan and for a run file.

Two stages, both batched over channels:

1. moments of the derivative ``-d eff / dc`` (a fast first estimate, also reported);
2. the binomial maximum-likelihood fit of the probit model ``eff = Phi(a + b c)`` by Fisher scoring
   (iteratively reweighted least squares) with step halving, for all channels at once.

A channel that cannot be fitted gets NaN and a reason in ``flag``; it never raises.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import log_ndtr

from teststand.errors import AnalysisError

from .online import StepAccumulator

__all__ = [
    "SCURVE_DTYPE",
    "ScurveCounts",
    "fit_scurves",
    "scurve_counts",
    "scurve_moments",
]

#: One row per channel. Codes are DAC codes; errors are statistical (inverse Fisher information).
SCURVE_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("baseline_code", "<f8"),  # x0: threshold code at 50 % efficiency
        ("baseline_code_err", "<f8"),
        ("noise_code", "<f8"),  # sigma of the normal CDF, in codes
        ("noise_code_err", "<f8"),
        ("baseline_code_moments", "<f8"),  # first estimate from the derivative's moments
        ("noise_code_moments", "<f8"),
        ("chi2", "<f8"),  # binomial deviance over the codes on the edge (off both plateaus)
        ("ndf", "<i4"),
        ("n_triggers", "<u8"),  # summed over the used codes
        ("n_hits", "<u8"),
        ("flag", "<U64"),  # "" when fine, else reasons joined by "|"
    ]
)

# Flags. Those marked "no value" leave the fitted numbers NaN; the others keep the fit and warn.
NO_HITS = "no_hits"  # no value: the channel never fired
TOO_FEW_TRIGGERS = "too_few_triggers"  # no value: fewer than 3 codes with enough triggers
UNRESOLVED_WIDTH = "unresolved_width"  # noise NaN: the edge falls within one code step
NOT_CONVERGED = "not_converged"  # no value: the likelihood fit did not converge
WRONG_DIRECTION = "wrong_direction"  # no value: the efficiency rises where it should fall
NO_EDGE = "no_edge"  # no value: the efficiency does not change across the scan
NO_PLATEAU = "no_plateau"  # warning: efficiency never reaches ~1 or never ~0 in the scan
AT_SCAN_EDGE = "at_scan_edge"  # warning: x0 within edge_sigmas * sigma of the first/last code
EMPTY_STEP = "empty_step"  # warning: a step with no hit at all below the noise edge, left out
EXCESS_HITS = "excess_hits"  # warning: more hits than triggers at some code (clipped)

_LOG_SQRT_2PI = 0.5 * np.log(2.0 * np.pi)


class ScurveCounts(NamedTuple):
    """Counts for an S-curve fit.

    Attributes:
        codes: ``(n_codes,)`` threshold codes in ascending order, or ``(n_channels, n_codes)`` when
            every channel was scanned over its own codes.
        n_triggers: ``(n_channels, n_codes)`` triggers sent at each code.
        n_hits: ``(n_channels, n_codes)`` triggers on which the channel fired.
    """

    codes: NDArray[np.float64]
    n_triggers: NDArray[np.float64]
    n_hits: NDArray[np.float64]


def scurve_counts(
    hits_channel: ArrayLike,
    hits_step: ArrayLike,
    n_channels: int,
    step_codes: ArrayLike,
    n_triggers_per_step: ArrayLike,
    *,
    hits_event: ArrayLike | None = None,
) -> ScurveCounts:
    """Count triggers and hits per (channel, code) from the hit columns of a threshold scan.

    Args:
        hits_channel: channel of every hit.
        hits_step: scan step index of every hit (row of the step table); hits with a step outside
            ``0 .. n_steps - 1`` or a channel outside ``0 .. n_channels - 1`` are ignored.
        n_channels: number of channels (rows of the result).
        step_codes: threshold code of every step, ``(n_steps,)``, or ``(n_channels, n_steps)``
            when the channels were set to different codes. With one row of codes, steps that share
            a code are merged.
        n_triggers_per_step: triggers sent per step (scalar or ``(n_steps,)``).
        hits_event: event number of every hit. When given, a channel counts at most once per
            (step, event); without it every hit counts (the simulator gives at most one noise hit
            per trigger).
    """
    channel = np.asarray(hits_channel).astype(np.intp, copy=False)
    step = np.asarray(hits_step).astype(np.intp, copy=False)
    codes = np.asarray(step_codes, dtype=np.float64)
    n_steps = codes.shape[-1]
    keep = (channel >= 0) & (channel < n_channels) & (step >= 0) & (step < n_steps)
    if hits_event is not None:
        # one count per (step, event, channel): event numbers may restart with every acquisition
        event = np.asarray(hits_event).astype(np.int64, copy=False)
        order = np.lexsort((channel, event, step))
        s_, e_, c_ = step[order], event[order], channel[order]
        repeat = np.zeros(order.size, dtype=bool)
        repeat[1:] = (s_[1:] == s_[:-1]) & (e_[1:] == e_[:-1]) & (c_[1:] == c_[:-1])
        keep[order[repeat]] = False
    per_step = (
        np.bincount(channel[keep] * n_steps + step[keep], minlength=n_channels * n_steps)
        .reshape(n_channels, n_steps)
        .astype(np.float64)
    )
    trig_step = np.broadcast_to(np.asarray(n_triggers_per_step, dtype=np.float64), (n_steps,))
    if codes.ndim == 2:
        order = np.argsort(codes, axis=1, kind="stable")
        trig = np.broadcast_to(trig_step, (n_channels, n_steps))
        return ScurveCounts(
            np.take_along_axis(codes, order, axis=1),
            np.take_along_axis(trig, order, axis=1).copy(),
            np.take_along_axis(per_step, order, axis=1),
        )
    unique, inverse = np.unique(codes, return_inverse=True)
    trig_code = np.bincount(inverse, weights=trig_step, minlength=unique.size)
    hits_code = np.zeros((unique.size, n_channels))
    np.add.at(hits_code, inverse, per_step.T)
    return ScurveCounts(
        unique, np.tile(trig_code, (n_channels, 1)), np.ascontiguousarray(hits_code.T)
    )


def _sorted_inputs(
    codes: ArrayLike, n_triggers: ArrayLike, n_hits: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Broadcast to ``(n_channels, n_codes)`` and sort every row by code."""
    k = np.atleast_2d(np.asarray(n_hits, dtype=np.float64))
    n = np.broadcast_to(np.asarray(n_triggers, dtype=np.float64), k.shape)
    c = np.broadcast_to(np.asarray(codes, dtype=np.float64), k.shape)
    order = np.argsort(c, axis=1, kind="stable")
    return (
        np.take_along_axis(c, order, axis=1),
        np.take_along_axis(n, order, axis=1),
        np.take_along_axis(k, order, axis=1),
    )


def scurve_moments(
    codes: ArrayLike,
    n_triggers: ArrayLike,
    n_hits: ArrayLike,
    *,
    falling: bool = True,
    min_triggers: float = 1,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """First estimate of baseline and noise from the moments of ``-d eff / dc``.

    The efficiency difference between neighbouring codes is the integral of the noise density over
    that interval, so its mean is x0 and its variance sigma**2 plus the binning term ``dc**2 / 12``
    (Sheppard's correction, subtracted here). Codes with fewer than ``min_triggers`` are skipped.
    Returns ``(x0, sigma)`` per channel, NaN where the efficiency shows no transition.
    """
    c, n, k = _sorted_inputs(codes, n_triggers, n_hits)
    return _moments(c, n, k, n >= max(min_triggers, 1), falling)


def _moments(
    c: NDArray[np.float64],
    n: NDArray[np.float64],
    k: NDArray[np.float64],
    usable: NDArray[np.bool_],
    falling: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x0 = np.full(c.shape[0], np.nan)
    sigma = np.full(c.shape[0], np.nan)
    if c.shape[1] < 2:
        return x0, sigma
    # compress every row onto its usable codes (pushed to the end as NaN) so that differences
    # are taken between neighbouring *usable* codes
    order = np.argsort(~usable, axis=1, kind="stable")
    cu = np.where(np.take_along_axis(usable, order, 1), np.take_along_axis(c, order, 1), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.take_along_axis(np.minimum(k, n) / n, order, 1)
    eff = np.where(np.isnan(cu), np.nan, eff)
    drop = eff[:, :-1] - eff[:, 1:]
    if not falling:
        drop = -drop
    mid = 0.5 * (cu[:, :-1] + cu[:, 1:])
    width2 = (cu[:, 1:] - cu[:, :-1]) ** 2
    valid = np.isfinite(drop) & np.isfinite(mid)
    w = np.where(valid, drop, 0.0)
    mid0 = np.where(valid, mid, 0.0)
    sw = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (w * mid0).sum(axis=1) / sw
        var = (w * (mid0 - mean[:, None]) ** 2).sum(axis=1) / sw
        sheppard = (np.abs(w) * np.where(valid, width2, 0.0)).sum(axis=1) / np.abs(w).sum(axis=1)
    good = sw > 0
    x0[good] = mean[good]
    var_c = var - sheppard / 12.0
    sigma[good] = np.sqrt(np.where(var_c > 0, var_c, np.nan))[good]
    return x0, sigma


def fit_scurves(
    codes: ArrayLike,
    n_triggers: ArrayLike,
    n_hits: ArrayLike,
    *,
    channels: ArrayLike | None = None,
    falling: bool = True,
    min_triggers: float = 10,
    plateau: tuple[float, float] = (0.05, 0.95),
    edge_sigmas: float = 2.0,
    max_iter: int = 50,
    tol: float = 1e-9,
) -> NDArray[np.void]:
    """Fit ``eff = Phi((x0 - c) / sigma)`` to every channel's S-curve at once.

    Args:
        codes: threshold codes, ``(n_codes,)`` or ``(n_channels, n_codes)``, any order.
        n_triggers: triggers per (channel, code), or per code (broadcast over channels).
        n_hits: hits per (channel, code), ``(n_channels, n_codes)``.
        channels: channel numbers for the ``channel`` column (default ``0 .. n_channels - 1``).
        falling: the efficiency falls as the code rises (TOFHIR2); False fits
            ``Phi((c - x0) / sigma)``.
        min_triggers: codes with fewer triggers are left out of the fit.
        plateau: efficiencies the scan must reach at both ends, else the ``no_plateau`` warning.
        edge_sigmas: ``at_scan_edge`` when x0 lies within this many sigma of the first or last code.
        max_iter: Fisher-scoring iterations before ``not_converged``.
        tol: convergence on the Newton decrement (change of the log-likelihood).

    Returns:
        A :data:`SCURVE_DTYPE` array, one row per channel.
    """
    c, n, k = _sorted_inputs(codes, n_triggers, n_hits)
    n_ch, _ = c.shape
    out = np.zeros(n_ch, dtype=SCURVE_DTYPE)
    out["channel"] = np.arange(n_ch) if channels is None else np.asarray(channels)
    flags: list[list[str]] = [[] for _ in range(n_ch)]

    def flag(mask: NDArray[np.bool_], name: str) -> None:
        for i in np.flatnonzero(mask):
            flags[i].append(name)

    usable = (n >= max(min_triggers, 1)) & np.isfinite(n) & np.isfinite(k) & np.isfinite(c)
    flag(np.asarray((k > n).any(axis=1)), EXCESS_HITS)
    n = np.where(usable, n, 0.0)
    k = np.where(usable, np.clip(k, 0.0, n), 0.0)
    out["n_triggers"] = n.sum(axis=1)
    out["n_hits"] = k.sum(axis=1)

    no_hits = out["n_hits"] == 0
    too_few = usable.sum(axis=1) < 3
    flag(no_hits, NO_HITS)
    flag(too_few, TOO_FEW_TRIGGERS)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(usable, k / n, np.nan)
    eff_hi = np.where(usable, eff, -np.inf).max(axis=1, initial=-np.inf)
    eff_lo = np.where(usable, eff, np.inf).min(axis=1, initial=np.inf)
    flag(~too_few & ~no_hits & ((eff_hi < plateau[1]) | (eff_lo > plateau[0])), NO_PLATEAU)

    x0_m, sigma_m = _moments(c, n, k, usable, falling)
    out["baseline_code_moments"] = x0_m
    out["noise_code_moments"] = sigma_m

    # at least two codes strictly inside (0, 1) are needed for a finite width
    partial = usable & (k > 0) & (k < n)
    unresolved = ~no_hits & ~too_few & (partial.sum(axis=1) < 2) & np.isfinite(x0_m)
    fit_rows = ~no_hits & ~too_few & ~unresolved & np.isfinite(x0_m)
    flag(unresolved, UNRESOLVED_WIDTH)
    flag(~no_hits & ~too_few & ~np.isfinite(x0_m), NO_EDGE)

    x0 = np.full(n_ch, np.nan)
    sigma = np.full(n_ch, np.nan)
    x0_err = np.full(n_ch, np.nan)
    sigma_err = np.full(n_ch, np.nan)
    chi2 = np.full(n_ch, np.nan)
    ndf = usable.sum(axis=1) - 2

    if fit_rows.any():
        step = np.nanmedian(
            np.where(usable, np.diff(c, axis=1, prepend=np.nan), np.nan)[fit_rows], axis=1
        )
        # Far from the edge the scoring step can overflow before step halving pulls it back;
        # those iterations are rejected, so their floating-point warnings carry no information.
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            res = _probit_fit(
                c[fit_rows],
                n[fit_rows],
                k[fit_rows],
                x0_m[fit_rows],
                np.where(np.isfinite(sigma_m) & (sigma_m > 0), sigma_m, np.nan)[fit_rows],
                falling,
                max_iter,
                tol,
                fallback_sigma=np.abs(step),
            )
        rows = np.flatnonzero(fit_rows)
        bad_dir = res.bad_direction
        bad = ~res.converged | bad_dir
        flag(np.isin(np.arange(n_ch), rows[~res.converged]), NOT_CONVERGED)
        flag(np.isin(np.arange(n_ch), rows[bad_dir & res.converged]), WRONG_DIRECTION)
        x0[rows] = np.where(bad, np.nan, res.x0)
        sigma[rows] = np.where(bad, np.nan, res.sigma)
        x0_err[rows] = np.where(bad, np.nan, res.x0_err)
        sigma_err[rows] = np.where(bad, np.nan, res.sigma_err)
        chi2[rows] = np.where(bad, np.nan, res.chi2)
        ndf[rows] = res.ndf

    # a transition inside one code step: the baseline is known to that step, the width is not
    if unresolved.any():
        x0[unresolved] = x0_m[unresolved]
        gaps = np.where(usable, np.diff(c, axis=1, prepend=np.nan), np.nan)[unresolved]
        gaps = np.where(np.isfinite(gaps), gaps, -np.inf).max(axis=1, initial=-np.inf)
        x0_err[unresolved] = np.where(gaps > 0, gaps, np.nan) / np.sqrt(12.0)

    c_first = np.where(usable, c, np.inf).min(axis=1, initial=np.inf)
    c_last = np.where(usable, c, -np.inf).max(axis=1, initial=-np.inf)
    reach = edge_sigmas * np.where(np.isfinite(sigma), sigma, 0.0)
    flag(np.isfinite(x0) & ((x0 - reach <= c_first) | (x0 + reach >= c_last)), AT_SCAN_EDGE)

    out["baseline_code"] = x0
    out["baseline_code_err"] = x0_err
    out["noise_code"] = sigma
    out["noise_code_err"] = sigma_err
    out["chi2"] = chi2
    out["ndf"] = ndf
    out["flag"] = ["|".join(f) for f in flags]
    return out


class _ProbitResult(NamedTuple):
    x0: NDArray[np.float64]
    sigma: NDArray[np.float64]
    x0_err: NDArray[np.float64]
    sigma_err: NDArray[np.float64]
    chi2: NDArray[np.float64]
    ndf: NDArray[np.int64]
    converged: NDArray[np.bool_]
    bad_direction: NDArray[np.bool_]


def _probit_terms(
    a: NDArray[np.float64],
    b: NDArray[np.float64],
    u: NDArray[np.float64],
    n: NDArray[np.float64],
    k: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Log-likelihood, score and Fisher matrix of ``k ~ Binomial(n, Phi(a + b u))`` per row."""
    eta = a[:, None] + b[:, None] * u
    logp = log_ndtr(eta)
    logq = log_ndtr(-eta)
    logphi = -0.5 * eta * eta - _LOG_SQRT_2PI
    # phi/p and phi/(1-p) through logs: stable far out in the tails
    r1 = np.exp(logphi - logp)
    r0 = np.exp(logphi - logq)
    ll = (k * logp + (n - k) * logq).sum(axis=1)
    s = k * r1 - (n - k) * r0
    w = n * r1 * r0
    score = np.stack([s.sum(axis=1), (s * u).sum(axis=1)], axis=1)
    wu = w * u
    fisher = np.empty((u.shape[0], 2, 2))
    fisher[:, 0, 0] = w.sum(axis=1)
    fisher[:, 0, 1] = fisher[:, 1, 0] = wu.sum(axis=1)
    fisher[:, 1, 1] = (wu * u).sum(axis=1)
    return ll, score, fisher, eta


def _xlogx_ratio(
    x: NDArray[np.float64], n: NDArray[np.float64], log_prob: NDArray[np.float64]
) -> NDArray[np.float64]:
    """``x * (log(x / n) - log_prob)``, 0 where ``x == 0`` (one half of the binomial deviance)."""
    safe_x = np.where(x > 0, x, 1.0)
    safe_n = np.where(n > 0, n, 1.0)
    return np.where(x > 0, x * (np.log(safe_x / safe_n) - log_prob), 0.0)


def _solve2(
    m: NDArray[np.float64], v: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Solve batched 2x2 systems; returns the solution and the inverse (NaN where singular)."""
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.empty_like(m)
        inv[:, 0, 0] = m[:, 1, 1] / det
        inv[:, 1, 1] = m[:, 0, 0] / det
        inv[:, 0, 1] = -m[:, 0, 1] / det
        inv[:, 1, 0] = -m[:, 1, 0] / det
    inv[~(det > 0)] = np.nan
    return np.einsum("gij,gj->gi", inv, v), inv


def _probit_fit(
    c: NDArray[np.float64],
    n: NDArray[np.float64],
    k: NDArray[np.float64],
    x0_start: NDArray[np.float64],
    sigma_start: NDArray[np.float64],
    falling: bool,
    max_iter: int,
    tol: float,
    *,
    fallback_sigma: NDArray[np.float64],
) -> _ProbitResult:
    """Binomial ML fit of ``Phi(a + b (c - x0_start))`` by Fisher scoring with step halving."""
    sign = -1.0 if falling else 1.0
    u = np.where(n > 0, c - x0_start[:, None], 0.0)
    fallback = np.where(np.isfinite(fallback_sigma) & (fallback_sigma > 0), fallback_sigma, 1.0)
    sigma0 = np.where(np.isfinite(sigma_start) & (sigma_start > 0), sigma_start, fallback)
    a = np.zeros(c.shape[0])
    b = sign / sigma0
    ll, score, fisher, _ = _probit_terms(a, b, u, n, k)
    converged = np.zeros(c.shape[0], dtype=bool)
    for _ in range(max_iter):
        active = ~converged
        if not active.any():
            break
        delta, _inv = _solve2(fisher, score)
        decrement = np.einsum("gi,gi->g", score, delta)
        converged |= np.isfinite(decrement) & (decrement < tol)
        delta = np.where(np.isfinite(delta), delta, 0.0)
        lam = np.where(converged, 0.0, 1.0)
        # step halving: keep the longest step that does not lower the likelihood
        for _halve in range(30):
            ll_try, *_ = _probit_terms(a + lam * delta[:, 0], b + lam * delta[:, 1], u, n, k)
            worse = (lam > 0) & ~(ll_try >= ll - 1e-12 * np.abs(ll))
            if not worse.any():
                break
            lam = np.where(worse, lam * 0.5, lam)
        a = a + lam * delta[:, 0]
        b = b + lam * delta[:, 1]
        ll, score, fisher, _ = _probit_terms(a, b, u, n, k)
    _, cov = _solve2(fisher, score)
    with np.errstate(divide="ignore", invalid="ignore"):
        x0 = x0_start - a / b
        sigma = 1.0 / np.abs(b)
        # delta method: x0 = x_ref - a/b, sigma = 1/|b|
        ja = -1.0 / b
        jb = a / b**2
        var_x0 = ja**2 * cov[:, 0, 0] + 2 * ja * jb * cov[:, 0, 1] + jb**2 * cov[:, 1, 1]
        var_sigma = cov[:, 1, 1] / b**4
        eta = a[:, None] + b[:, None] * u
        logp = log_ndtr(eta)
        logq = log_ndtr(-eta)
        p = np.exp(logp)
        # binomial deviance (likelihood-ratio chi2): unlike Pearson's it stays sane where a
        # handful of hits sit in a tail with a tiny expectation
        dev = 2.0 * (_xlogx_ratio(k, n, logp) + _xlogx_ratio(n - k, n, logq))
        # only codes that carry information count: the model or the data is off its plateaus
        # there (flat plateau points would dilute chi2/ndf)
        informative = (n > 0) & ((np.minimum(p, 1 - p) > 1e-3) | ((k > 0) & (k < n)))
    chi2 = np.where(informative, dev, 0.0).sum(axis=1)
    ndf = informative.sum(axis=1) - 2
    bad_direction = np.sign(b) != sign
    converged &= np.isfinite(x0) & np.isfinite(sigma) & np.isfinite(var_x0)
    return _ProbitResult(
        x0, sigma, np.sqrt(var_x0), np.sqrt(var_sigma), chi2, ndf, converged, bad_direction
    )


class ScurveAccumulator(StepAccumulator):
    """Online/offline S-curves: hits per (channel, step) of the laser-off threshold steps.

    A step counts when its ``thr_code`` axis is finite and, if the scan has a ``laser`` axis, the
    laser was off. Per step only the number of triggers and, per channel, the number of triggers
    with a hit are kept.
    """

    method: ClassVar[str] = "scurve"
    json_keys: ClassVar[Mapping[str, str]] = {
        "baseline_code": "baseline_code",
        "noise_code": "noise_code",
    }
    defaults: ClassVar[Mapping[str, Any]] = {"min_triggers": 10.0}

    def __init__(self, channels: NDArray[Any], axes: Sequence[str], **params: Any) -> None:
        super().__init__(channels, axes, **params)
        if "thr_code" not in self.axes:
            raise AnalysisError("the S-curve method needs a scan over the thr_code axis")
        self._codes: list[float] = []
        self._triggers: list[float] = []
        self._hits: list[NDArray[np.float64]] = []

    @property
    def n_codes(self) -> int:
        """Number of laser-off threshold steps folded in so far."""
        return len(self._codes)

    def reduce_step(self, step: int, row: Mapping[str, Any], hits: NDArray[Any]) -> None:
        code = float(row["thr_code"])
        if not np.isfinite(code) or ("laser" in row and float(row["laser"]) != 0.0):
            return
        counts = scurve_counts(
            hits["channel"],
            np.zeros(hits.size, dtype=np.intp),
            self.n_channels,
            [code],
            [float(row["n_triggers"])],
            hits_event=hits["event"],
        )
        self._codes.append(code)
        self._triggers.append(float(row["n_triggers"]))
        self._hits.append(counts.n_hits[:, 0])

    def fit(self) -> NDArray[Any]:
        """Baseline and noise per channel from the laser-off steps so far."""
        channels = self.channels["channel"]
        if not self._codes:
            table = np.zeros(self.n_channels, dtype=SCURVE_DTYPE)
            table["channel"] = channels
            for name in (
                "baseline_code",
                "baseline_code_err",
                "noise_code",
                "noise_code_err",
                "baseline_code_moments",
                "noise_code_moments",
                "chi2",
            ):
                table[name] = np.nan
            table["flag"] = NO_HITS
            return table
        return self._fit()

    def _fit(self) -> NDArray[Any]:
        channels = self.channels["channel"]
        codes = np.asarray(self._codes)
        hits = np.stack(self._hits, axis=1)
        triggers = np.broadcast_to(np.asarray(self._triggers), hits.shape)
        # A step in which no channel fired although a higher threshold made some fire cannot be
        # noise: the acquisition delivered nothing (readout fault). Leave it out and say so.
        silent = hits.sum(axis=0) == 0
        fired_codes = codes[~silent]
        dead = silent & (codes < (fired_codes.max() if fired_codes.size else -np.inf))
        table = fit_scurves(
            codes[~dead],
            triggers[:, ~dead],
            hits[:, ~dead],
            channels=channels,
            min_triggers=float(self.params["min_triggers"]),
        )
        if dead.any():
            table["flag"] = [f"{f}|{EMPTY_STEP}" if f else EMPTY_STEP for f in table["flag"]]
        return table
