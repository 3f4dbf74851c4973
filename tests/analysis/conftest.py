"""Calibration scans and validation runs drawn from the simulator's physics model.

The scans are made the way the AWC recipe makes them: thr1 fixed at 6 uA, thr2 stepped in DAC
codes from about 3 to 10 uA, six laser intensities from 40 to 600 photoelectrons. DAC codes are
whole numbers, so every channel's realised thresholds, ``(code - baseline) * lsb``, differ a little
from the nominal ones; the scan records the realised ones per channel, as a run file would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from teststand.sim.physics import AcquisitionState, TofhirModel, demo_tofhir_channels

LSB_UA = 0.3125
PHOTOELECTRONS = (40, 68, 117, 200, 345, 600)
THR2_STEPS = range(-9, 14)  # codes relative to thr1's code: thr2 from thr1 - 2.8 to thr1 + 4.06 uA


def intensity_pct(n_pe: float) -> float:
    """Laser tune that gives ``n_pe`` photoelectrons (inverse of ``mean_photoelectrons``)."""
    return float(100.0 * (n_pe / 600.0) ** (2.0 / 3.0))


@dataclass
class Scan:
    """A thr2 scan: hit columns, the step of every hit, and the step table."""

    model: TofhirModel
    hits: np.ndarray
    step: np.ndarray
    intensity: np.ndarray
    bar: np.ndarray  # lit bar of every step (-1: all bars through the splitter)
    thr1_uA: np.ndarray  # (n_steps, n_channels), realised
    thr2_uA: np.ndarray
    code1: np.ndarray  # thr1 code of every channel

    def fit_args(self) -> tuple[Any, ...]:
        h = self.hits
        return (
            h["channel"],
            h["t1"],
            h["t2"],
            h["q"],
            self.step,
            self.intensity,
            self.thr1_uA,
            self.thr2_uA,
        )


def make_scan(
    n_bars: int = 8,
    n_pulses: int = 500,
    seed: int = 1,
    *,
    non_scaling: bool = False,
    bar_by_bar: bool = False,
    photoelectrons: tuple[float, ...] = PHOTOELECTRONS,
) -> Scan:
    """An AWC calibration scan on the simulated TOFHIR bench."""
    model = TofhirModel(demo_tofhir_channels(n_bars), seed, non_scaling=non_scaling)
    base = model.baseline
    code1 = np.round(base + 6.0 / LSB_UA)
    thr1 = (code1 - base) * LSB_UA
    blocks, steps = [], []
    fibres = range(1, n_bars + 1) if bar_by_bar else [0]
    for fibre in fibres:
        for n_pe in photoelectrons:
            for j in THR2_STEPS:
                code2 = code1 + j
                state = AcquisitionState(True, intensity_pct(n_pe), fibre, code1, code2)
                blocks.append(model.generate(n_pulses, state))
                steps.append((intensity_pct(n_pe), fibre - 1, (code2 - base) * LSB_UA))
    hits = np.concatenate(blocks)
    step = np.repeat(np.arange(len(blocks)), [b.size for b in blocks])
    return Scan(
        model,
        hits,
        step,
        np.array([s[0] for s in steps]),
        np.array([s[1] for s in steps]),
        np.tile(thr1, (len(steps), 1)),
        np.stack([s[2] for s in steps]),
        code1,
    )


def make_validation(scan: Scan, n_pulses: int = 4000, n_levels: int = 30) -> np.ndarray:
    """Hits at the operating pair (thr2 code = thr1 code + 13, about +4 uA) with amplitudes spread
    evenly in log from 50 to 900 photoelectrons: wider than the range judged, so that the ends of
    the amplitude distribution do not bias the charge bins."""
    model = scan.model
    out = []
    for n_pe in np.geomspace(50, 900, n_levels):
        state = AcquisitionState(True, intensity_pct(n_pe), 0, scan.code1, scan.code1 + 13)
        out.append(model.generate(n_pulses, state))
    hits = np.concatenate(out)
    return hits[np.isfinite(hits["t2"])]


@pytest.fixture(scope="session")
def awc_scan() -> Scan:
    """16 channels, 3000 pulses per step: enough statistics to judge a few ps of walk."""
    return make_scan(n_bars=8, n_pulses=3000, seed=3)


@pytest.fixture(scope="session")
def awc_validation(awc_scan: Scan) -> np.ndarray:
    return make_validation(awc_scan)


@pytest.fixture(scope="session")
def small_scan() -> Scan:
    """8 channels, 400 pulses per step: for flags and bookkeeping."""
    return make_scan(n_bars=4, n_pulses=400, seed=11)


@pytest.fixture(scope="session")
def scan_factory() -> Any:
    """:func:`make_scan`, for tests that need a scan of their own (tests never import conftest)."""
    return make_scan


@pytest.fixture(scope="session")
def validation_factory() -> Any:
    """:func:`make_validation`."""
    return make_validation
