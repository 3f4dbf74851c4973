"""Physics model of the simulated stands, with its ground truth (design section 3).

Two models share one structure. Each is built from the run file's channel table (``/channels``)
and a seed; it draws the true per-channel parameters once, from ``default_rng([seed, 0])``, and
the hits of every acquisition from one stream ``default_rng([seed, 1])`` that advances from
acquisition to acquisition. The same seed and the same sequence of acquisitions therefore give
the same truth and the same hits.

* :class:`TofhirModel`: LYSO bars read at both ends by SiPMs and a TOFHIR2 ASIC (current-mode
  discriminators T1 and T2, a 10-bit QDC, thresholds set by 6-bit DAC codes).
* :class:`HptdcModel`: diamond pads in planes read by an HPTDC (leading edge and time over
  threshold in 25 ns / 1024 bins, fixed thresholds).

Every acquisition is computed on ``(n_channels, n_triggers)`` arrays at once; there is no Python
loop per trigger or per hit.

Laser
-----
The mean number of photoelectrons per lit channel at tune ``I`` (percent) is
``N(I) = 600 * (I / 100) ** 1.5`` (:func:`mean_photoelectrons`): 40 pe at 16.4 %, 600 pe at 100 %.
Every pulse carries a common relative intensity jitter (1-5 %, truth) and a common time jitter
(5-20 ps, truth) shared by all channels; the photoelectron count of each channel is Poisson. A
selected fibre output (``fibre_channel = k >= 1``) lights bar/pad ``k - 1`` with the same mean
light as the splitter gives each bar (each output is calibrated on its own).

Times are in ns relative to the laser reference; noise hits fall anywhere in the trigger gate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import ndtr

from teststand.core.hits import CHANNEL_DTYPE, HIT_DTYPE

__all__ = [
    "CHANNEL_DTYPE",
    "HPTDC_BIN_NS",
    "HPTDC_TRUTH_DTYPE",
    "THR1_OP_UA",
    "THR2_OP_UA",
    "TOFHIR_TRUTH_DTYPE",
    "AcquisitionState",
    "HptdcModel",
    "LaserTruth",
    "TofhirModel",
    "awc_truth",
    "demo_hptdc_channels",
    "demo_tofhir_channels",
    "hptdc_walk",
    "mean_photoelectrons",
]

#: HPTDC time bin: 25 ns / 1024 = 24.414 ps.
HPTDC_BIN_NS = 25.0 / 1024.0

#: Nominal operating thresholds of the dual-threshold AWC, uA above baseline.
THR1_OP_UA = 6.0
THR2_OP_UA = 10.0

#: QDC full scale (10 bit).
QDC_MAX = 1023.0

#: Amplitude (uA) at which the non-scaling TOFHIR edge has its nominal exponent ``n``.
NON_SCALING_REF_UA = 40.0

TOFHIR_TRUTH_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("gain_uA_per_pe", "<f8"),  # amplitude per photoelectron, uA
        ("tau_ns", "<f8"),  # time from edge start to the peak, ns
        ("n", "<f8"),  # power-law exponent of the leading edge (at 40 uA if non-scaling)
        ("n_slope", "<f8"),  # non-scaling: n(A) = n * (1 + n_slope * ln(A / 40 uA)); 0 otherwise
        ("t0_ns", "<f8"),  # walk-free intrinsic time of the channel, ns
        ("delay_ns", "<f8"),  # cable or fibre delay (the channel table's), ns
        ("board_delay_ns", "<f8"),  # clock propagation: board_slope_ns * board, ns
        ("board_slope_ns", "<f8"),  # clock propagation per board position (same on every row), ns
        ("offset_ns", "<f8"),  # t0 + delay + board delay: the walk-free time seen in the data, ns
        ("baseline", "<f8"),  # discriminator baseline x0, DAC codes (T1 and T2 alike)
        ("noise", "<f8"),  # noise sigma, DAC codes (= noise_uA / lsb)
        ("noise_uA", "<f8"),  # electronic noise sigma_I, uA
        ("noise_corr", "<f8"),  # correlation of the T1 and T2 noise
        ("q_per_uA", "<f8"),  # QDC counts per uA of amplitude
        ("q_resolution", "<f8"),  # relative charge resolution (rms)
        ("awc", "<f8"),  # dual-threshold AWC at thr1 = 6, thr2 = 10 uA (see awc_truth), uA
        ("sigma_ns", "<f8"),  # NaN: the TOFHIR resolution follows from noise and slope
    ]
)

HPTDC_TRUTH_DTYPE = np.dtype(
    [
        ("channel", "<u2"),
        ("plane", "<i2"),
        ("pad", "<i2"),
        ("gain_rel", "<f8"),  # amplitude per photoelectron, relative to the nominal
        ("tot_slope_ns", "<f8"),  # ToT = tot_slope_ns * ln(A / amp_thr_pe), ns per e-fold
        ("amp_thr_pe", "<f8"),  # discriminator threshold in photoelectron-equivalent amplitude
        ("p0_ns", "<f8"),  # walk f(ToT) = p0 / (exp((ToT - p1) / p2) + 1) + p3
        ("p1_ns", "<f8"),
        ("p2_ns", "<f8"),
        ("p3_ns", "<f8"),
        ("t_inf_ns", "<f8"),  # offset_ns + p3_ns: what a sigmoid fit to the raw t1 calls p3
        ("sigma_ns", "<f8"),  # intrinsic time resolution, ns (before the 24.4 ps binning)
        ("t0_ns", "<f8"),
        ("delay_ns", "<f8"),
        ("board_delay_ns", "<f8"),
        ("board_slope_ns", "<f8"),
        ("offset_ns", "<f8"),  # t0 + delay + board delay, ns
        ("noise_prob", "<f8"),  # noise hits per trigger (per gate) of the channel
    ]
)


def mean_photoelectrons(intensity_pct: float) -> float:
    """Mean photoelectrons per lit channel at laser tune ``intensity_pct`` (0..100 %).

    ``N = 600 * (I / 100) ** 1.5``: monotonic, 40 pe at 16.4 % and 600 pe at 100 %.
    """
    intensity = min(max(float(intensity_pct), 0.0), 100.0)
    return float(600.0 * (intensity / 100.0) ** 1.5)


def awc_truth(n: ArrayLike, thr1: ArrayLike, thr2: ArrayLike) -> NDArray[np.float64]:
    """True dual-threshold AWC (uA) of a power-law edge ``I = A ((t - t0) / tau) ** n``.

    ``AWC = thr1**(1/n) (thr2 - thr1) / (thr2**(1/n) - thr1**(1/n))``, so that for every amplitude
    ``t1 - t0 = AWC / S`` with the dual-threshold slope ``S = (thr2 - thr1) / (t2 - t1)``. When
    ``thr2 -> thr1`` it tends to ``n * thr1`` (the slope becomes the derivative at thr1).
    """
    n_, t1, t2 = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (n, thr1, thr2)))
    k = 1.0 / n_
    close = np.abs(t2 - t1) <= 1e-9 * np.maximum(np.abs(t1), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        awc = t1**k * (t2 - t1) / (t2**k - t1**k)
    return np.asarray(np.where(close, n_ * t1, awc), dtype=float)


def hptdc_walk(
    tot_ns: ArrayLike, p0: ArrayLike, p1: ArrayLike, p2: ArrayLike, p3: ArrayLike
) -> NDArray[np.float64]:
    """PPS walk function ``f(ToT) = p0 / (exp((ToT - p1) / p2) + 1) + p3`` (all in ns)."""
    tot, a0, a1, a2, a3 = (np.asarray(v, dtype=float) for v in (tot_ns, p0, p1, p2, p3))
    arg = (tot - a1) / a2
    with np.errstate(over="ignore"):
        return np.asarray(a0 / (np.exp(arg) + 1.0) + a3, dtype=float)


@dataclass(frozen=True, eq=False)
class AcquisitionState:
    """What the instruments hold when an acquisition starts.

    Attributes:
        laser_on: laser output enabled.
        intensity_pct: laser tune, percent (0..100).
        fibre_channel: fibre switch position: 0 lights every bar through the splitter; ``k >= 1``
            lights bar (TOFHIR: both ends) or pad (HPTDC: in every plane, a 'track') ``k - 1``.
        t1_codes, t2_codes: threshold DAC codes indexed by channel number (TOFHIR); ``None`` for
            the HPTDC bench, whose thresholds are fixed.
    """

    laser_on: bool
    intensity_pct: float = 0.0
    fibre_channel: int = 0
    t1_codes: NDArray[Any] | None = None
    t2_codes: NDArray[Any] | None = None


@dataclass(frozen=True)
class LaserTruth:
    """Stand-wide true laser parameters."""

    intensity_jitter: float  # relative pulse-to-pulse intensity jitter (rms), common to channels
    time_jitter_ns: float  # pulse-to-pulse time jitter (rms), ns, common to channels


def demo_tofhir_channels(n_bars: int = 16, bars_per_board: int = 8) -> NDArray[Any]:
    """A TOFHIR bench channel table: bar ``b`` read by channels ``2b`` and ``2b + 1``.

    Fibre delays are those of 100-145 cm of clear fibre at 20 cm/ns (5-7.25 ns), fixed per bar.
    """
    channels = np.zeros(2 * n_bars, dtype=CHANNEL_DTYPE)
    bar = np.arange(2 * n_bars) // 2
    channels["channel"] = np.arange(2 * n_bars)
    channels["plane"] = 0
    channels["bar"] = bar
    channels["board"] = bar // bars_per_board
    channels["delay_ns"] = (100.0 + 3.0 * bar) / 20.0
    return channels


def demo_hptdc_channels(
    n_planes: int = 4, n_pads: int = 4, planes_per_board: int = 2
) -> NDArray[Any]:
    """A PPS-style bench channel table: ``n_planes`` planes of ``n_pads`` diamond pads each."""
    n = n_planes * n_pads
    channels = np.zeros(n, dtype=CHANNEL_DTYPE)
    plane = np.arange(n) // n_pads
    channels["channel"] = np.arange(n)
    channels["plane"] = plane
    channels["bar"] = np.arange(n) % n_pads
    channels["board"] = plane // planes_per_board
    channels["delay_ns"] = (120.0 + 5.0 * plane + np.arange(n) % n_pads) / 20.0
    return channels


class _LaserModel:
    """Shared parts: channel table, laser, offsets, lit channels, hit assembly."""

    def __init__(self, channels: NDArray[Any], seed: int, gate_ns: tuple[float, float]) -> None:
        table = np.asarray(channels)
        missing = {"channel", "bar", "board", "delay_ns"} - set(table.dtype.names or ())
        if missing:
            raise ValueError(f"channel table lacks field(s) {sorted(missing)}")
        if table.ndim != 1 or table.size == 0:
            raise ValueError("channel table must be a non-empty 1-d structured array")
        if np.unique(table["channel"]).size != table.size:
            raise ValueError("channel table has duplicate channel numbers")
        if not gate_ns[1] > gate_ns[0]:
            raise ValueError(f"gate_ns must be (start, stop) with stop > start, got {gate_ns}")
        # Rows sorted by channel number, so that hits come out sorted by (event, channel).
        order = np.argsort(table["channel"], kind="stable")
        self.channels: NDArray[Any] = table[order].copy()
        self.seed = int(seed)
        self.gate_ns = (float(gate_ns[0]), float(gate_ns[1]))
        self._number = self.channels["channel"].astype(np.uint16)
        self._bar = self.channels["bar"].astype(np.int64)
        self._truth_rng = np.random.default_rng([self.seed, 0])
        self._hit_rng = np.random.default_rng([self.seed, 1])

    @property
    def n_channels(self) -> int:
        """Number of channels (rows of the channel table)."""
        return int(self._number.size)

    def index_of(self, channel: ArrayLike) -> NDArray[np.intp]:
        """Row index (in :attr:`channels` and :meth:`truth`) of channel number(s) ``channel``."""
        channel = np.asarray(channel)
        idx = np.searchsorted(self._number, channel)
        idx = np.minimum(idx, self._number.size - 1)
        if np.any(self._number[idx] != channel):
            raise KeyError(f"unknown channel number(s) in {channel!r}")
        return idx

    def _draw_offsets(self, rng: np.random.Generator) -> None:
        c = self.n_channels
        self.board_slope_ns = float(rng.uniform(2.0, 3.0))
        self.t0_ns = rng.uniform(0.1, 1.0, c)
        self.delay_ns = self.channels["delay_ns"].astype(float)
        self.board_delay_ns = self.board_slope_ns * self.channels["board"].astype(float)
        self.offset_ns = self.t0_ns + self.delay_ns + self.board_delay_ns
        self.laser = LaserTruth(
            intensity_jitter=float(rng.uniform(0.01, 0.05)),
            time_jitter_ns=float(rng.uniform(0.005, 0.020)),
        )

    def truth_attrs(self) -> dict[str, float]:
        """Stand-wide truth (for attributes of the run file's ``/truth``)."""
        return {
            "seed": float(self.seed),
            "laser_intensity_jitter": self.laser.intensity_jitter,
            "laser_time_jitter_ns": self.laser.time_jitter_ns,
            "board_slope_ns": self.board_slope_ns,
            "gate_start_ns": self.gate_ns[0],
            "gate_stop_ns": self.gate_ns[1],
        }

    def lit_mask(self, state: AcquisitionState) -> NDArray[np.bool_]:
        """Which channels the laser lights in ``state`` (all False when it is off or at 0 %)."""
        if not state.laser_on or mean_photoelectrons(state.intensity_pct) <= 0.0:
            return np.zeros(self.n_channels, dtype=bool)
        k = int(state.fibre_channel)
        if k < 0:
            raise ValueError(f"fibre_channel must be >= 0, got {k}")
        if k == 0:
            return np.ones(self.n_channels, dtype=bool)
        return np.asarray(self._bar == k - 1)

    def _pulses(
        self, rng: np.random.Generator, n: int, state: AcquisitionState, n_lit: int
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Common laser time jitter per pulse (n,) and photoelectrons (n_lit, n)."""
        scale = 1.0 + self.laser.intensity_jitter * rng.standard_normal(n)
        dt = self.laser.time_jitter_ns * rng.standard_normal(n)
        lam = mean_photoelectrons(state.intensity_pct) * np.maximum(scale, 0.0)
        npe = rng.poisson(lam, size=(n_lit, n))
        return dt, npe

    def _noise_times(self, u: NDArray[np.float64], p: NDArray[np.float64]) -> NDArray[np.float64]:
        # Given u < p, u / p is uniform in [0, 1): the same draw decides and places a noise hit.
        g0, g1 = self.gate_ns
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return g0 + (g1 - g0) * (u / p)

    def _assemble(
        self,
        hit: NDArray[np.bool_],
        t1: NDArray[np.float64],
        t2: NDArray[np.float64] | None,
        q: NDArray[np.float64] | None,
        tot: NDArray[np.float64] | None,
    ) -> tuple[NDArray[Any], NDArray[np.intp]]:
        """Hits of the (C, n) arrays, sorted by event then channel; also their channel rows."""
        # Arrays are (channel, trigger) so that the per-channel parameters broadcast over long
        # contiguous rows; nonzero on the transposed view walks events first.
        ev, rows = np.nonzero(hit.T)
        out = np.empty(ev.size, dtype=HIT_DTYPE)
        out["event"] = ev
        out["channel"] = self._number[rows]
        out["t1"] = t1[rows, ev]
        out["t2"] = np.nan if t2 is None else t2[rows, ev]
        out["q"] = np.nan if q is None else q[rows, ev]
        out["tot"] = np.nan if tot is None else tot[rows, ev]
        return out, rows


class TofhirModel(_LaserModel):
    """TOFHIR2 bench: LYSO bars with SiPMs at both ends, laser-lit; see the module docstring.

    Per channel (truth in :meth:`truth`): amplitude ``A = N_pe * gain`` (uA), leading edge
    ``I(t) = A ((t - t0) / tau) ** n`` up to its peak ``A`` at ``t0 + tau``. A discriminator at
    ``thr`` (uA above baseline; ``thr = (code - baseline) * lsb_uA``) crosses at

        t(thr) = offset + tau (thr / A) ** (1/n) - sigma_I z / slope(thr) + laser jitter,

    with ``slope = dI/dt`` at the crossing and ``z`` standard normal, correlated between T1 and T2
    (``noise_corr``). T1 fires when ``A + sigma_I z1 > thr1``; t2 is NaN when
    ``A + sigma_I z2 <= thr2``. ``thr2`` may lie below ``thr1``. Charge ``Q = q_per_uA * A``
    with ``q_resolution`` (rms, relative), rounded to counts and saturating at 1023.

    Noise: per trigger and channel the T1 discriminator fires on noise with probability
    ``Phi((baseline - code1) / noise)`` (the S-curve), at a time uniform in the gate. A noise
    hit on a channel without light has t2 = NaN and a small charge ``round(q_per_uA * noise_uA *
    |z|)`` counts (the QDC integrating baseline noise). On a lit channel a noise crossing earlier
    than the pulse's T1 crossing takes t1 (the discriminator is then busy, so a later one is
    lost); t2 and q stay those of the pulse.

    ``non_scaling=True``: ``n`` grows with amplitude, ``n(A) = n (1 + n_slope ln(A / 40 uA))``
    with ``n_slope`` 0.03-0.06 (the TOFHIR2 edges do not scale with amplitude). The truth ``awc``
    then uses ``n`` at 40 uA; use :meth:`noiseless_crossing_time` for what one AWC can achieve.

    Parameter ranges: gain 0.25 uA/pe with a 5-10 % spread, tau 2-4 ns (the lower part of the
    design's 1-4 ns would give less than 1 ns of walk across 40-600 pe at thr1 = 6 uA), n 1.3-2,
    t0 0.1-1 ns, noise 0.3-0.5 uA, noise correlation 0.3-0.7, baseline 8-16 codes, 4-5 QDC
    counts/uA (600 pe stays below 1023), charge resolution 2-4 %.
    """

    def __init__(
        self,
        channels: NDArray[Any],
        seed: int,
        *,
        non_scaling: bool = False,
        lsb_uA: float = 0.3125,
        gate_ns: tuple[float, float] = (-10.0, 90.0),
    ) -> None:
        super().__init__(channels, seed, gate_ns)
        if not lsb_uA > 0:
            raise ValueError(f"lsb_uA must be positive, got {lsb_uA}")
        self.non_scaling = bool(non_scaling)
        self.lsb_uA = float(lsb_uA)
        rng, c = self._truth_rng, self.n_channels
        self._draw_offsets(rng)
        gain_spread = rng.uniform(0.05, 0.10)
        self.gain = 0.25 * np.clip(1.0 + gain_spread * rng.standard_normal(c), 0.6, 1.4)
        self.tau = rng.uniform(2.0, 4.0, c)
        self.n = rng.uniform(1.3, 2.0, c)
        # Drawn whether or not it is used, so that non_scaling changes nothing else.
        n_slope = rng.uniform(0.03, 0.06, c)
        self.n_slope = n_slope if self.non_scaling else np.zeros(c)
        self.noise_uA = rng.uniform(0.3, 0.5, c)
        self.noise_corr = rng.uniform(0.3, 0.7, c)
        self.baseline = rng.uniform(8.0, 16.0, c)
        self.q_per_uA = rng.uniform(4.0, 5.0, c)
        self.q_resolution = rng.uniform(0.02, 0.04, c)

    @property
    def noise_codes(self) -> NDArray[np.float64]:
        """Noise sigma of every channel in DAC codes."""
        return np.asarray(self.noise_uA / self.lsb_uA)

    def truth(
        self, thr1_uA: ArrayLike = THR1_OP_UA, thr2_uA: ArrayLike = THR2_OP_UA
    ) -> NDArray[Any]:
        """True parameters, one row per channel (sorted by channel).

        ``awc`` is the AWC at the operating thresholds ``thr1_uA``, ``thr2_uA`` (uA above
        baseline; floats, or one value per row, e.g. the realised thresholds of integer codes:
        :meth:`threshold_uA`). The field names and units are those of
        :data:`TOFHIR_TRUTH_DTYPE`.
        """
        t = np.zeros(self.n_channels, dtype=TOFHIR_TRUTH_DTYPE)
        t["channel"] = self._number
        t["gain_uA_per_pe"] = self.gain
        t["tau_ns"] = self.tau
        t["n"] = self.n
        t["n_slope"] = self.n_slope
        t["t0_ns"] = self.t0_ns
        t["delay_ns"] = self.delay_ns
        t["board_delay_ns"] = self.board_delay_ns
        t["board_slope_ns"] = self.board_slope_ns
        t["offset_ns"] = self.offset_ns
        t["baseline"] = self.baseline
        t["noise"] = self.noise_codes
        t["noise_uA"] = self.noise_uA
        t["noise_corr"] = self.noise_corr
        t["q_per_uA"] = self.q_per_uA
        t["q_resolution"] = self.q_resolution
        t["awc"] = awc_truth(self.n, thr1_uA, thr2_uA)
        t["sigma_ns"] = np.nan
        return t

    def threshold_uA(self, codes: ArrayLike) -> NDArray[np.float64]:
        """Threshold above baseline (uA) of DAC ``codes`` (one per row): (code - x0) * lsb."""
        return np.asarray((np.asarray(codes, dtype=float) - self.baseline) * self.lsb_uA)

    def noise_probability(self, codes: ArrayLike) -> NDArray[np.float64]:
        """Probability per trigger of a T1 noise hit at DAC ``codes`` (one per row): the S-curve."""
        codes = np.asarray(codes, dtype=float)
        return np.asarray(ndtr((self.baseline - codes) / self.noise_codes))

    def mean_amplitude_uA(self, intensity_pct: float) -> NDArray[np.float64]:
        """Mean pulse amplitude of every channel (uA) at laser tune ``intensity_pct``."""
        return np.asarray(mean_photoelectrons(intensity_pct) * self.gain)

    def exponent(self, rows: ArrayLike, amplitude_uA: ArrayLike) -> NDArray[np.float64]:
        """Edge exponent n of channel rows ``rows`` at amplitude(s) ``amplitude_uA``."""
        rows = np.asarray(rows)
        if not self.non_scaling:
            return np.broadcast_to(self.n[rows], np.broadcast(rows, amplitude_uA).shape).copy()
        a = np.maximum(np.asarray(amplitude_uA, dtype=float), 1e-3)
        n = self.n[rows] * (1.0 + self.n_slope[rows] * np.log(a / NON_SCALING_REF_UA))
        return np.asarray(np.maximum(n, 1.05))

    def noiseless_crossing_time(
        self, rows: ArrayLike, amplitude_uA: ArrayLike, thr_uA: ArrayLike
    ) -> NDArray[np.float64]:
        """Crossing time (ns) of a noiseless, jitter-free pulse: offset + tau (thr/A)**(1/n(A)).

        ``rows`` are channel row indices (see :meth:`index_of`); arguments broadcast. NaN where
        the pulse does not reach the threshold (``thr > A``) or the threshold is not positive.
        """
        rows = np.asarray(rows)
        a = np.asarray(amplitude_uA, dtype=float)
        thr = np.asarray(thr_uA, dtype=float)
        n = self.exponent(rows, a)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = self.offset_ns[rows] + self.tau[rows] * (thr / a) ** (1.0 / n)
        return np.asarray(np.where((thr > 0) & (thr <= a), t, np.nan))

    @staticmethod
    def _edge(
        inv_a: NDArray[np.float64],
        thr: NDArray[np.float64],
        n: NDArray[np.float64],
        tau: NDArray[np.float64],
        sig: NDArray[np.float64],
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Noiseless crossing delay after t0 and the jitter per unit z (sigma_I / slope).

        ``inv_a`` is 1/A, (L, n); ``thr``, ``tau`` and ``sig`` are (L, 1) columns; ``n`` is (L, 1)
        or (L, n). Above the peak (a pulse that fires on a noise excursion) the crossing is at
        the peak. The slope is taken at no less than the noise level: below it a slope at
        threshold means nothing and the jitter would diverge.
        """
        inv_n = 1.0 / n
        xs = np.minimum(np.maximum(thr, sig) * inv_a, 1.0)
        ps = xs**inv_n
        # sigma / slope with slope = n A / tau * xs**(1 - 1/n)
        jitter = (sig * tau) * inv_n * inv_a * ps / xs
        if np.all(thr >= sig):
            delay = tau * ps
        else:
            delay = tau * np.minimum(np.maximum(thr, 0.0) * inv_a, 1.0) ** inv_n
        return delay, jitter

    def generate(
        self, n_triggers: int, state: AcquisitionState, rng: np.random.Generator | None = None
    ) -> NDArray[Any]:
        """One acquisition of ``n_triggers`` laser pulses or random gates (HIT_DTYPE).

        Event numbers run 0..n_triggers-1; hits are sorted by event, then channel. ``rng``
        defaults to the model's own hit stream.
        """
        rng = self._hit_rng if rng is None else rng
        n = int(n_triggers)
        if n < 0:
            raise ValueError(f"n_triggers must be >= 0, got {n_triggers}")
        c1 = self._codes(state.t1_codes, "t1")
        c2 = self._codes(state.t2_codes, "t2")
        thr1, thr2 = self.threshold_uA(c1), self.threshold_uA(c2)
        p_noise = self.noise_probability(c1)[:, None]
        lit = np.flatnonzero(self.lit_mask(state))

        u = rng.random((self.n_channels, n))
        hit = u < p_noise
        t1 = self._noise_times(u, p_noise)
        t2: NDArray[np.float64] | None = None
        q: NDArray[np.float64] | None = None
        if lit.size:
            t2 = np.full(hit.shape, np.nan)
            q = np.full(hit.shape, np.nan)
            self._pulse_hits(rng, n, state, lit, thr1[lit], thr2[lit], hit, t1, t2, q)
        hits, rows = self._assemble(hit, t1, t2, q, None)
        noise_q = np.isnan(hits["q"])
        if noise_q.any():
            r = rows[noise_q]
            z = np.abs(rng.standard_normal(r.size))
            hits["q"][noise_q] = np.round(self.q_per_uA[r] * self.noise_uA[r] * z)
        return hits

    def _pulse_hits(
        self,
        rng: np.random.Generator,
        n: int,
        state: AcquisitionState,
        lit: NDArray[np.intp],
        thr1: NDArray[np.float64],
        thr2: NDArray[np.float64],
        hit: NDArray[np.bool_],
        t1: NDArray[np.float64],
        t2: NDArray[np.float64],
        q: NDArray[np.float64],
    ) -> None:
        """Fill the lit rows of the (C, n) hit, t1, t2 and q arrays in place."""
        dt, npe = self._pulses(rng, n, state, lit.size)
        col = (slice(None), None)
        a = npe * self.gain[lit][col]
        inv_a = 1.0 / np.maximum(a, 1e-9)
        z = rng.standard_normal((3, lit.size, n))
        rho = self.noise_corr[lit][col]
        z1 = z[0]
        z2 = z[1]
        z2 *= np.sqrt(1.0 - rho**2)
        z2 += rho * z1
        sig, tau = self.noise_uA[lit][col], self.tau[lit][col]
        nexp = self.exponent(lit[col], a) if self.non_scaling else self.n[lit][col]
        t_ref = self.offset_ns[lit][col] + dt

        delay1, jit1 = self._edge(inv_a, thr1[col], nexp, tau, sig)
        delay2, jit2 = self._edge(inv_a, thr2[col], nexp, tau, sig)
        sig_t1 = t_ref + delay1 - jit1 * z1
        noisy = sig * z1
        noisy += a
        fires = (noisy > thr1[col]) & (npe > 0)
        noisy = sig * z2
        noisy += a
        reaches2 = noisy > thr2[col]

        noise = hit[lit]
        t_noise = t1[lit]
        noise_first = noise & ((t_noise < sig_t1) | ~fires)
        any_hit = fires | noise
        t1[lit] = np.where(noise_first, t_noise, sig_t1)
        t2[lit] = np.where(any_hit & reaches2, t_ref + delay2 - jit2 * z2, np.nan)
        charge = z[2]
        charge *= self.q_resolution[lit][col]
        charge += 1.0
        charge *= a
        charge *= self.q_per_uA[lit][col]
        q[lit] = np.minimum(np.maximum(np.round(charge), 0.0), QDC_MAX)
        hit[lit] = any_hit

    def _codes(self, codes: ArrayLike | None, disc: str) -> NDArray[np.float64]:
        if codes is None:
            raise ValueError(f"the TOFHIR model needs {disc}_codes (DAC codes per channel number)")
        arr = np.asarray(codes, dtype=float).ravel()
        top = int(self._number.max())
        if arr.size <= top:
            raise ValueError(f"{disc}_codes has {arr.size} codes, channel {top} needs {top + 1}")
        return np.asarray(arr[self._number])


class HptdcModel(_LaserModel):
    """HPTDC bench: diamond pads in planes (the channel table's ``plane``; ``bar`` = pad).

    Per channel: amplitude ``A = N_pe * gain_rel`` (photoelectron-equivalent); the true time over
    threshold is ``ToT = tot_slope_ns * ln(A / amp_thr_pe)`` (an exponential tail above a fixed
    threshold; about 8 ns at 40 pe and 20 ns at 600 pe); no hit when ``A <= amp_thr_pe``. The
    leading edge is

        t1 = offset + f(ToT_true) + laser jitter + N(0, sigma),  f = :func:`hptdc_walk`,

    quantised to 25/1024 ns. The measured ToT is the true ToT quantised to the same bins, with no
    further noise: noise on the measured ToT would smear the profile of t1 versus ToT so that it
    no longer equals f, and the fitted sigmoid could not be compared with the truth. With the
    steepest walk limited to ``p0 / (4 p2) <= 1 ns/ns`` (``p2 >= p0 / 4``), the ToT binning adds
    at most 7 ps to a walk-corrected time. The binning of t1 adds 24.4 ps / sqrt(12) = 7 ps rms.

    Noise: each channel fires on noise with probability ``noise_prob`` per trigger (fixed
    thresholds), uniform in the gate, with a ToT of 0.5-3 ns. Noise on a lit channel is not
    modelled (at ~1e-4 per gate it is negligible next to the pulse).
    """

    def __init__(
        self,
        channels: NDArray[Any],
        seed: int,
        *,
        noise_prob: float = 2e-4,
        gate_ns: tuple[float, float] = (-10.0, 90.0),
    ) -> None:
        super().__init__(channels, seed, gate_ns)
        if not 0.0 <= noise_prob <= 1.0:
            raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
        rng, c = self._truth_rng, self.n_channels
        self._draw_offsets(rng)
        self.gain = np.clip(1.0 + 0.07 * rng.standard_normal(c), 0.7, 1.3)
        self.tot_slope_ns = rng.uniform(4.0, 4.8, c)
        self.amp_thr_pe = rng.uniform(5.5, 7.5, c)
        self.p0 = rng.uniform(0.4, 3.5, c)
        self.p1 = rng.uniform(9.0, 15.0, c)
        self.p2 = rng.uniform(np.maximum(0.2, self.p0 / 4.0), 2.5)
        self.p3 = rng.uniform(5.0, 8.5, c)
        self.sigma_ns = rng.uniform(0.050, 0.100, c)
        self.noise_prob = np.full(c, float(noise_prob))

    def truth(self) -> NDArray[Any]:
        """True parameters, one row per channel (sorted by channel)."""
        t = np.zeros(self.n_channels, dtype=HPTDC_TRUTH_DTYPE)
        t["channel"] = self._number
        t["plane"] = self.channels["plane"] if "plane" in (self.channels.dtype.names or ()) else 0
        t["pad"] = self._bar
        t["gain_rel"] = self.gain
        t["tot_slope_ns"] = self.tot_slope_ns
        t["amp_thr_pe"] = self.amp_thr_pe
        t["p0_ns"], t["p1_ns"], t["p2_ns"], t["p3_ns"] = self.p0, self.p1, self.p2, self.p3
        t["t_inf_ns"] = self.offset_ns + self.p3
        t["sigma_ns"] = self.sigma_ns
        t["t0_ns"] = self.t0_ns
        t["delay_ns"] = self.delay_ns
        t["board_delay_ns"] = self.board_delay_ns
        t["board_slope_ns"] = self.board_slope_ns
        t["offset_ns"] = self.offset_ns
        t["noise_prob"] = self.noise_prob
        return t

    def true_tot(self, rows: ArrayLike, npe: ArrayLike) -> NDArray[np.float64]:
        """True ToT (ns) of channel rows ``rows`` at ``npe`` photoelectrons; NaN below threshold."""
        rows = np.asarray(rows)
        a = np.asarray(npe, dtype=float) * self.gain[rows]
        with np.errstate(divide="ignore"):
            tot = self.tot_slope_ns[rows] * np.log(a / self.amp_thr_pe[rows])
        return np.asarray(np.where(a > self.amp_thr_pe[rows], tot, np.nan))

    def walk(self, rows: ArrayLike, tot_ns: ArrayLike) -> NDArray[np.float64]:
        """True walk f(ToT) (ns) of channel rows ``rows``, without the channel offset."""
        rows = np.asarray(rows)
        return hptdc_walk(tot_ns, self.p0[rows], self.p1[rows], self.p2[rows], self.p3[rows])

    def generate(
        self, n_triggers: int, state: AcquisitionState, rng: np.random.Generator | None = None
    ) -> NDArray[Any]:
        """One acquisition of ``n_triggers`` laser pulses or random gates (HIT_DTYPE).

        Event numbers run 0..n_triggers-1; hits are sorted by event, then channel. The state's
        threshold codes are ignored (the HPTDC bench has fixed thresholds).
        """
        rng = self._hit_rng if rng is None else rng
        n = int(n_triggers)
        if n < 0:
            raise ValueError(f"n_triggers must be >= 0, got {n_triggers}")
        lit = np.flatnonzero(self.lit_mask(state))
        p_noise = self.noise_prob[:, None]
        u = rng.random((self.n_channels, n))
        hit = u < p_noise
        t1 = self._noise_times(u, p_noise)
        tot = None
        if lit.size:
            col = (slice(None), None)
            dt, npe = self._pulses(rng, n, state, lit.size)
            tot_true = self.true_tot(lit[col], npe)
            z = rng.standard_normal((lit.size, n))
            z *= self.sigma_ns[lit][col]
            z += self.offset_ns[lit][col] + dt
            z += self.walk(lit[col], tot_true)
            hit[lit] = ~np.isnan(tot_true)
            t1[lit] = z
            tot = np.full(hit.shape, np.nan)
            tot[lit] = tot_true
        hits, rows = self._assemble(hit, t1, None, None, tot)
        noise_tot = np.isnan(hits["tot"])
        if noise_tot.any():
            hits["tot"][noise_tot] = rng.uniform(0.5, 3.0, int(noise_tot.sum()))
        hits["t1"] = np.round(hits["t1"] / HPTDC_BIN_NS) * HPTDC_BIN_NS
        hits["tot"] = np.round(hits["tot"] / HPTDC_BIN_NS) * HPTDC_BIN_NS
        return hits
