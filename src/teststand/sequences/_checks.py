"""A recipe's parameters against the stand it will run on, before anything is connected.

Each plan kind has a check that knows what its parameters mean: the codes of a threshold scan
against the DAC's range, the thresholds of an AWC scan against the DAC's step and range (given
where the baselines can lie), the intensities and fibre outputs against the laser's limits, the
trigger counts against the readout's. They name the recipe key and the stand option in one
line. Each returns the baseline (DAC code) the dry run of the plan assumes
(:func:`~._preflight.check_plan` then checks every message the plan would send).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.stand import StandInfo
from ._params import (
    AwcCalibrationParams,
    HptdcTimewalkParams,
    IntRange,
    ThresholdScanParams,
    TimingResolutionParams,
    _OperatingPointParams,
)
from ._preflight import PlanRejected, feasible_baselines

#: The fewest codes a baseline noise scan needs: the S-curve fit must see both sides.
MIN_BASELINE_CODES = 5


def _dac(stand: StandInfo) -> tuple[float, int]:
    assert stand.lsb_uA is not None and stand.max_code is not None
    return stand.lsb_uA, stand.max_code


def _intensities(values: Sequence[float], stand: StandInfo, key: str) -> None:
    top = stand.max_intensity_pct
    if top is not None and max(values) > top:
        raise PlanRejected(
            f"{key}: {max(values):g} % is above the {top:g} % this stand allows "
            "(instruments.laser.options.max_intensity_pct)"
        )


def _fibre(output: int, stand: StandInfo, key: str) -> None:
    if stand.fibre_outputs is not None and output > stand.fibre_outputs:
        raise PlanRejected(
            f"{key}: fibre output {output} does not exist, the laser's switch has "
            f"{stand.fibre_outputs} (instruments.laser.options.fibre_outputs)"
        )


def _triggers(n: int, stand: StandInfo, key: str) -> None:
    if stand.max_triggers is not None and n > stand.max_triggers:
        raise PlanRejected(
            f"{key}: {n} triggers in one step, the readout takes at most {stand.max_triggers} "
            "(instruments.readout.options.max_triggers)"
        )


def _codes(codes: IntRange, stand: StandInfo, key: str) -> None:
    _, max_code = _dac(stand)
    if codes.stop > max_code:
        raise PlanRejected(
            f"{key}.stop: code {codes.stop} is above the DAC's highest code {max_code} "
            "(instruments.dac.options.max_code)"
        )


def _baseline_range(
    p: AwcCalibrationParams | _OperatingPointParams, offsets_uA: Sequence[float], stand: StandInfo
) -> float:
    """Where the baselines must lie for ``offsets_uA`` to fit the DAC; the dry run's baseline."""
    low, high = feasible_baselines(offsets_uA, stand, key="parameters.thr1_uA, thr2_uA")
    lsb, _ = _dac(stand)
    if p.baseline_codes is not None:
        given = np.asarray(p.baseline_codes, dtype=float)
        bad = np.flatnonzero((given < low) | (given > high))
        if bad.size:
            raise PlanRejected(
                f"parameters.baseline_codes: channel {int(bad[0])}'s baseline "
                f"{given[bad[0]]:g} leaves no room for thresholds {min(offsets_uA):g}.."
                f"{max(offsets_uA):g} uA in the DAC (baselines must lie in {low:.1f}..{high:.1f})"
            )
        return float(np.median(given))
    scan = p.baseline_scan
    _codes(scan, stand, "parameters.baseline_scan")
    n_codes = len(scan.values())
    if n_codes < MIN_BASELINE_CODES:
        raise PlanRejected(
            f"parameters.baseline_scan: {n_codes} code(s); a baseline needs at least "
            f"{MIN_BASELINE_CODES} to fit its S-curve"
        )
    _triggers(p.baseline_triggers, stand, "parameters.baseline_triggers")
    lo, hi = max(low, scan.start), min(high, scan.stop)
    if lo > hi:
        raise PlanRejected(
            f"parameters.baseline_scan: thresholds {min(offsets_uA):g}..{max(offsets_uA):g} uA "
            f"fit the DAC only for baselines {low:.1f}..{high:.1f} (codes of {lsb:g} uA), which "
            f"the scan {scan.start}..{scan.stop} cannot measure"
        )
    return 0.5 * (lo + hi)


def _distinct_thresholds(thr1: float, thr2: Sequence[float], stand: StandInfo) -> None:
    """Every thr2 value of a scan must set its own DAC code (T2 is set relative to T1)."""
    lsb, _ = _dac(stand)
    gaps = np.rint((np.asarray(thr2, dtype=float) - thr1) / lsb)
    distinct = np.unique(gaps).size
    if distinct < len(thr2):
        raise PlanRejected(
            f"parameters.thr2_uA.step: {len(thr2)} values set only {distinct} distinct "
            f"thresholds: the DAC step is {lsb:g} uA (instruments.dac.options.lsb_uA); "
            "use a step of at least that"
        )


def check_threshold_scan(stand: StandInfo, p: ThresholdScanParams) -> float | None:
    """The codes within the DAC, the laser within its limits."""
    _codes(p.codes, stand, "parameters.codes")
    _triggers(p.n_triggers, stand, "parameters.n_triggers")
    if "on" in p.laser_modes:
        _intensities([p.laser_intensity_pct], stand, "parameters.laser_intensity_pct")
        _fibre(p.fibre_channel, stand, "parameters.fibre_channel")
    return None


def check_awc(stand: StandInfo, p: AwcCalibrationParams) -> float | None:
    """Distinct thr2 codes, thresholds that fit the DAC, bars the fibre switch reaches."""
    _intensities(p.intensities_pct, stand, "parameters.intensities_pct")
    _triggers(p.n_pulses, stand, "parameters.n_pulses")
    thr2 = p.thr2_uA.values()
    _distinct_thresholds(p.thr1_uA, thr2, stand)
    bars = [int(b) for b in stand.bars] if p.bars == "all" else list(p.bars)
    _fibre(max(bars) + 1, stand, "parameters.bars")
    return _baseline_range(p, [p.thr1_uA, min(thr2), max(thr2)], stand)


def check_operating_point(stand: StandInfo, p: _OperatingPointParams) -> float | None:
    """Operating thresholds that fit the DAC, the laser within its limits."""
    _intensities(p.intensities_pct, stand, "parameters.intensities_pct")
    _triggers(p.n_pulses, stand, "parameters.n_pulses")
    _fibre(p.fibre_channel, stand, "parameters.fibre_channel")
    lsb, _ = _dac(stand)
    if round((p.thr2_uA - p.thr1_uA) / lsb) < 1:
        raise PlanRejected(
            f"parameters.thr2_uA: {p.thr2_uA:g} uA is less than one DAC step "
            f"({lsb:g} uA) above thr1_uA = {p.thr1_uA:g}"
        )
    return _baseline_range(p, [p.thr1_uA, p.thr2_uA], stand)


def check_hptdc_timewalk(stand: StandInfo, p: HptdcTimewalkParams) -> float | None:
    """The laser within its limits."""
    _intensities(p.intensities_pct.values(), stand, "parameters.intensities_pct")
    _triggers(p.n_pulses, stand, "parameters.n_pulses")
    _fibre(p.fibre_channel, stand, "parameters.fibre_channel")
    return None


def check_timing_resolution(stand: StandInfo, p: TimingResolutionParams) -> float | None:
    """The laser within its limits."""
    _intensities(p.intensities_pct, stand, "parameters.intensities_pct")
    _triggers(p.n_pulses, stand, "parameters.n_pulses")
    _fibre(p.fibre_channel, stand, "parameters.fibre_channel")
    return None


#: kind -> its check (the registry in ._recipes refers to these).
Check = Callable[[StandInfo, Any], "float | None"]
