"""The shipped plans: generators of messages named after the experiment.

Every plan takes a :class:`StandInfo` (what the stand has, no connection) and keyword-only
options, declares its scan axes with ``open_run``, and wraps its body in :func:`finalize_wrapper`
so that the laser goes off and triggering stops on every way out, abort and exceptions included.
The engine puts every instrument in its safe state afterwards as well: the plan's cleanup is the
orderly one, the engine's the last line of defence.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np

from ..core.stand import StandInfo
from ._messages import (
    Msg,
    Plan,
    acquire,
    call,
    checkpoint,
    close_step,
    log,
    open_run,
    open_step,
    safe_state,
    set_,
)

LASER = "laser"
DAC = "dac"
READOUT = "readout"


def finalize_wrapper(plan: Plan, cleanup: Callable[[], Iterator[Msg]]) -> Plan:
    """Run ``plan``, then the messages of ``cleanup()``, however the plan ends.

    The engine throws exceptions (errors, abort, Ctrl-C) into the plan, so the ``finally`` block
    below still yields its messages to the engine, as in bluesky.
    """
    try:
        result = yield from plan
    finally:
        yield from cleanup()
    return result


def _stand_cleanup(stand: StandInfo) -> Callable[[], Iterator[Msg]]:
    def cleanup() -> Iterator[Msg]:
        # Laser first: light with no acquisition running is harmless to data but not to people.
        for name in (LASER, READOUT, DAC):
            if name in stand.instruments:
                yield safe_state(name)

    return cleanup


def _require(stand: StandInfo, kind: str, plan_name: str) -> None:
    if stand.readout_kind != kind:
        raise ValueError(
            f"{plan_name} needs a {kind.upper()} stand, but stand {stand.name!r} reads out with "
            f"{stand.readout_kind.upper()}"
        )


def threshold_scan(
    stand: StandInfo,
    *,
    codes: Sequence[int],
    n_triggers: int,
    laser_modes: Sequence[str] = ("off", "on"),
    laser_intensity_pct: float = 30.0,
    fibre_channel: int = 0,
) -> Plan:
    """Per-channel S-curves: the T1 threshold code of every channel stepped over ``codes``.

    With the laser off the hit rate versus code is the noise S-curve (baseline and noise); with
    the laser on (all bars lit through the splitter unless ``fibre_channel`` says otherwise) it
    adds the signal plateau. The T2 and E discriminators stay at the code that stops triggering.

    Axes: ``laser`` (0 off, 1 on) and ``thr_code``.
    """
    _require(stand, "tofhir", "threshold_scan")
    n = stand.n_dac
    off_codes = stand.off_codes()

    def body() -> Plan:
        yield open_run(["laser", "thr_code"], len(laser_modes) * len(codes))
        yield call(DAC, "set_codes", "t2", off_codes)
        yield call(DAC, "set_codes", "e", off_codes)
        for mode in laser_modes:
            laser_on = mode == "on"
            if laser_on:
                yield set_(LASER, "fibre_channel", fibre_channel)
                yield set_(LASER, "intensity", laser_intensity_pct)
            yield set_(LASER, "output_enabled", laser_on)
            for code in codes:
                yield call(DAC, "set_codes", "t1", np.full(n, int(code), dtype=np.int64))
                yield open_step(laser=float(laser_on), thr_code=float(code))
                yield acquire(READOUT, n_triggers)
                yield close_step()
                yield checkpoint()
            yield set_(LASER, "output_enabled", False)

    return finalize_wrapper(body(), _stand_cleanup(stand))


def noise_counts(hits: np.ndarray, n_channels: int) -> np.ndarray:
    """Number of triggers with at least one hit, per channel (no loop per hit)."""
    if hits.size == 0:
        return np.zeros(n_channels, dtype=np.int64)
    key = hits["event"].astype(np.int64) * n_channels + hits["channel"].astype(np.int64)
    channels = np.unique(key) % n_channels
    return np.bincount(channels, minlength=n_channels)


def _codes_for(
    stand: StandInfo, baselines: np.ndarray, channels: np.ndarray, thr_uA: float
) -> np.ndarray:
    """T1/T2 codes putting ``channels`` at ``thr_uA`` above baseline; the others stop triggering."""
    assert stand.max_code is not None and stand.lsb_uA is not None
    codes = stand.off_codes()
    wanted = np.rint(baselines[channels] + thr_uA / stand.lsb_uA).astype(np.int64)
    outside = (wanted < 0) | (wanted > stand.max_code)
    if np.any(outside):
        raise ValueError(
            f"threshold {thr_uA:g} uA is outside the DAC range for channels "
            f"{channels[outside].tolist()}"
        )
    codes[channels] = wanted
    return codes


def _codes_at_gap(
    stand: StandInfo, t1_codes: np.ndarray, channels: np.ndarray, gap_uA: float
) -> tuple[np.ndarray, float]:
    """T2 codes a whole number of DAC steps from the T1 codes of ``channels``.

    Setting T2 relative to T1 makes the gap thr2 - thr1 the same on every channel, exactly
    ``round(gap / lsb) * lsb``, whatever each channel's baseline: the slope S = gap / (t2 - t1)
    then means the same thing in the calibration and in operation. Returns the codes and the gap
    actually set (uA), which the plan records as ``thr2 - thr1``.
    """
    assert stand.max_code is not None and stand.lsb_uA is not None
    steps = int(np.rint(gap_uA / stand.lsb_uA))
    codes = stand.off_codes()
    wanted = t1_codes[channels] + steps
    outside = (wanted < 0) | (wanted > stand.max_code)
    if np.any(outside):
        raise ValueError(
            f"threshold gap {gap_uA:g} uA is outside the DAC range for channels "
            f"{channels[outside].tolist()}"
        )
    codes[channels] = wanted
    return codes, steps * stand.lsb_uA


def _baselines(
    stand: StandInfo,
    baseline_codes: Sequence[float] | None,
    scan_codes: Sequence[int],
    n_triggers: int,
    extra_axes: dict[str, float],
) -> Generator[Msg, Any, np.ndarray]:
    """Every channel's baseline in DAC codes: given, or measured by a noise scan (laser off).

    The noise-scan steps are recorded with ``laser = 0`` and ``thr_code``; ``extra_axes`` gives
    the values (NaN) of the plan's other axes. Leaves T2 and E at the code that stops triggering.
    """
    from ..analysis.scurve import fit_scurves

    n = stand.n_dac
    off_codes = stand.off_codes()
    yield call(DAC, "set_codes", "t2", off_codes)
    yield call(DAC, "set_codes", "e", off_codes)
    if baseline_codes is not None:
        baselines = np.full(n, np.nan)
        baselines[stand.channels["channel"]] = np.asarray(baseline_codes, dtype=float)
    else:
        scan = np.asarray(scan_codes, dtype=np.int64)
        counts = np.zeros((n, scan.size), dtype=np.int64)
        yield set_(LASER, "output_enabled", False)
        for k, code in enumerate(scan):
            yield call(DAC, "set_codes", "t1", np.full(n, int(code), dtype=np.int64))
            yield open_step(laser=0.0, thr_code=float(code), **extra_axes)
            hits = yield acquire(READOUT, n_triggers, return_hits=True)
            counts[:, k] = noise_counts(hits if hits is not None else np.empty(0), n)
            yield close_step()
            yield checkpoint()
        yield call(DAC, "set_codes", "t1", off_codes)
        result = fit_scurves(scan.astype(float), np.full_like(counts, n_triggers), counts)
        baselines = np.asarray(result["baseline_code"], dtype=float)
        mapped = stand.channels["channel"].astype(np.int64)
        if np.any(~np.isfinite(baselines[mapped])):
            bad = mapped[~np.isfinite(baselines[mapped])].tolist()
            raise RuntimeError(f"no baseline could be measured for channels {bad}")
    yield log(
        "baselines (DAC codes): "
        + ", ".join(f"{c}: {baselines[c]:.2f}" for c in stand.channels["channel"])
    )
    return baselines


def awc_calibration(
    stand: StandInfo,
    *,
    bars: Sequence[int],
    intensities_pct: Sequence[float],
    thr1_uA: float,
    thr2_uA: Sequence[float],
    n_pulses: int,
    baseline_codes: Sequence[float] | None = None,
    baseline_scan_codes: Sequence[int] = tuple(range(64)),
    baseline_scan_triggers: int = 400,
) -> Plan:
    """The dual-threshold amplitude-walk calibration (design section 4.2).

    For each bar, lit in turn through the laser's fibre switch: for each laser intensity, thr2 is
    stepped over ``thr2_uA`` with thr1 fixed at ``thr1_uA``, ``n_pulses`` pulses a step. Channels
    not being calibrated sit at the code that stops triggering.

    Thresholds are given in uA above each channel's baseline, so the baselines (in DAC codes) must
    be known: either given (from an earlier threshold scan) or measured at the start of the run
    with a short noise scan (laser off), which is recorded as steps with ``laser = 0``.

    Axes: ``laser``, ``thr_code`` (the noise scan), ``bar``, ``intensity`` (tune, %), ``thr1`` and
    ``thr2`` (uA above baseline, nominal). Axes that do not apply to a step are NaN.
    """
    _require(stand, "tofhir", "awc_calibration")
    assert stand.max_code is not None and stand.lsb_uA is not None
    off_codes = stand.off_codes()
    n_main = len(bars) * len(intensities_pct) * len(thr2_uA)
    n_noise = 0 if baseline_codes is not None else len(baseline_scan_codes)
    nan = float("nan")
    extra_axes = {"bar": nan, "intensity": nan, "thr1": nan, "thr2": nan}

    def body() -> Plan:
        yield open_run(["laser", "thr_code", "bar", "intensity", "thr1", "thr2"], n_noise + n_main)
        baselines = yield from _baselines(
            stand, baseline_codes, baseline_scan_codes, baseline_scan_triggers, extra_axes
        )
        # Every threshold of every bar must fit the DAC with the baselines just measured: find
        # out now, before the laser is switched on, not at bar 11.
        gaps = [min(thr2_uA) - thr1_uA, max(thr2_uA) - thr1_uA]
        for bar in bars:
            lit = stand.channels_of_bar(int(bar))
            t1 = _codes_for(stand, baselines, lit, thr1_uA)
            for gap in gaps:
                _codes_at_gap(stand, t1, lit, gap)
        for bar in bars:
            lit = stand.channels_of_bar(int(bar))
            t1_codes = _codes_for(stand, baselines, lit, thr1_uA)
            yield call(DAC, "set_codes", "t1", t1_codes)
            yield set_(LASER, "fibre_channel", int(bar) + 1)
            for intensity in intensities_pct:
                yield set_(LASER, "intensity", float(intensity))
                yield set_(LASER, "output_enabled", True)
                for thr2 in thr2_uA:
                    t2_codes, thr2_set = _codes_at_gap(stand, t1_codes, lit, thr2 - thr1_uA)
                    yield call(DAC, "set_codes", "t2", t2_codes)
                    yield open_step(
                        laser=1.0,
                        thr_code=nan,
                        bar=float(bar),
                        intensity=float(intensity),
                        thr1=float(thr1_uA),
                        thr2=float(thr1_uA + thr2_set),
                    )
                    yield acquire(READOUT, n_pulses)
                    yield close_step()
                    yield checkpoint()
            yield set_(LASER, "output_enabled", False)
            yield call(DAC, "set_codes", "t1", off_codes)
            yield call(DAC, "set_codes", "t2", off_codes)

    return finalize_wrapper(body(), _stand_cleanup(stand))


def operating_point_scan(
    stand: StandInfo,
    *,
    intensities_pct: Sequence[float],
    thr1_uA: float,
    thr2_uA: float,
    n_pulses: int,
    fibre_channel: int = 0,
    baseline_codes: Sequence[float] | None = None,
    baseline_scan_codes: Sequence[int] = tuple(range(64)),
    baseline_scan_triggers: int = 400,
) -> Plan:
    """Every channel at the operating thresholds, a laser intensity scan (all bars lit).

    The data of ``awc-validation`` (the walk left after correction, judged over spread
    amplitudes) and of ``timing-alignment`` (channel offsets against a reference channel).
    Baselines as in :func:`awc_calibration`.

    Axes: ``laser``, ``thr_code`` (the noise scan), ``intensity`` (tune, %), ``thr1``, ``thr2``.
    """
    _require(stand, "tofhir", "operating_point_scan")
    n_noise = 0 if baseline_codes is not None else len(baseline_scan_codes)
    nan = float("nan")
    every = np.asarray(stand.channels["channel"], dtype=np.int64)

    def body() -> Plan:
        yield open_run(
            ["laser", "thr_code", "intensity", "thr1", "thr2"], n_noise + len(intensities_pct)
        )
        baselines = yield from _baselines(
            stand,
            baseline_codes,
            baseline_scan_codes,
            baseline_scan_triggers,
            {"intensity": nan, "thr1": nan, "thr2": nan},
        )
        t1_codes = _codes_for(stand, baselines, every, thr1_uA)
        t2_codes, gap = _codes_at_gap(stand, t1_codes, every, thr2_uA - thr1_uA)
        yield call(DAC, "set_codes", "t1", t1_codes)
        yield call(DAC, "set_codes", "t2", t2_codes)
        yield set_(LASER, "fibre_channel", fibre_channel)
        for intensity in intensities_pct:
            yield set_(LASER, "intensity", float(intensity))
            yield set_(LASER, "output_enabled", True)
            yield open_step(
                laser=1.0,
                thr_code=nan,
                intensity=float(intensity),
                thr1=float(thr1_uA),
                thr2=float(thr1_uA + gap),
            )
            yield acquire(READOUT, n_pulses)
            yield close_step()
            yield checkpoint()
        yield set_(LASER, "output_enabled", False)

    return finalize_wrapper(body(), _stand_cleanup(stand))


def hptdc_timewalk(
    stand: StandInfo,
    *,
    intensities_pct: Sequence[float],
    n_pulses: int,
    fibre_channel: int = 0,
) -> Plan:
    """Laser intensity scan on the HPTDC bench: leading time and ToT at each intensity.

    Axes: ``intensity`` (tune, %).
    """
    _require(stand, "hptdc", "hptdc_timewalk")

    def body() -> Plan:
        yield open_run(["intensity"], len(intensities_pct))
        yield set_(LASER, "fibre_channel", fibre_channel)
        for intensity in intensities_pct:
            yield set_(LASER, "intensity", float(intensity))
            yield set_(LASER, "output_enabled", True)
            yield open_step(intensity=float(intensity))
            yield acquire(READOUT, n_pulses)
            yield close_step()
            yield checkpoint()
        yield set_(LASER, "output_enabled", False)

    return finalize_wrapper(body(), _stand_cleanup(stand))


def list_messages(plan: Plan, reply: Callable[[Msg], Any] | None = None) -> list[Msg]:
    """Run ``plan`` without hardware and return its messages.

    ``reply(msg)`` gives the value sent back for each message (``None`` by default), so a test
    can feed an ``acquire`` with synthetic hits.
    """
    messages: list[Msg] = []
    value: Any = None
    while True:
        try:
            msg = plan.send(value)
        except StopIteration:
            return messages
        messages.append(msg)
        value = reply(msg) if reply is not None else None
