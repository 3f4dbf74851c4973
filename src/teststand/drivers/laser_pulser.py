"""Picosecond diode laser pulser (PiLas-type) with a fibre switch and a hardware interlock."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from ..core import (
    Instrument,
    format_bool01,
    parse_bool01,
    parse_float,
    parse_int,
    strict_bool,
    strict_discrete_set,
    strict_int_range,
    strict_range,
)
from ..errors import InterlockTripped
from ._spec import CheckContext, DriverOptions, DriverSpec, SelfCheck, SimTwin

log = logging.getLogger(__name__)

#: Highest fibre switch position: 16 outputs, one per bar or column.
MAX_FIBRE_CHANNEL = 16


def _intensity_range(laser: LaserPulser) -> tuple[float, float]:
    return 0.0, laser.max_intensity_pct


def _rate_range(laser: LaserPulser) -> tuple[float, float]:
    return 1.0, laser.max_rate_hz


def _fibre_range(laser: LaserPulser) -> tuple[int, int]:
    return 0, laser.fibre_outputs


def _interlock_guard(laser: LaserPulser, value: bool) -> None:
    """The laser is never switched on with its interlock open (checked before sending)."""
    if value and not laser.interlock_ok:
        raise InterlockTripped(
            laser.name, "the interlock is open (enclosure open?): output not switched on", "OUTP 1"
        )


class LaserOptions(DriverOptions):
    """``[instruments.laser] options``: the limits this stand allows the laser."""

    max_intensity_pct: float = Field(
        default=100.0, gt=0, le=100, description="highest intensity (tune, %) the stand allows"
    )
    max_rate_hz: float = Field(
        default=1e6, ge=1, le=1e6, description="highest repetition rate (Hz) the stand allows"
    )
    fibre_outputs: int = Field(
        default=MAX_FIBRE_CHANNEL, ge=0, le=MAX_FIBRE_CHANNEL, description="fibre switch outputs"
    )


class LaserPulser(Instrument):
    """The laser that lights the bars or sensors; RS232 in the lab, any transport works.

    Safe state: optical output off.

    Args:
        transport: the link to the laser.
        max_intensity_pct: highest intensity the stand allows (the strict range of
            ``intensity`` is 0 to this), %.
        max_rate_hz: highest repetition rate the stand allows, Hz.
        fibre_outputs: outputs of the fibre switch (``fibre_channel`` runs 0 to this).
    """

    def __init__(
        self,
        transport: Any,
        *,
        max_intensity_pct: float = 100.0,
        max_rate_hz: float = 1e6,
        fibre_outputs: int = MAX_FIBRE_CHANNEL,
    ) -> None:
        super().__init__(transport)
        self.max_intensity_pct = float(max_intensity_pct)
        self.max_rate_hz = float(max_rate_hz)
        self.fibre_outputs = int(fibre_outputs)

    output_enabled = Instrument.control(
        "OUTP?",
        "OUTP %d",
        """Optical output on (True) or off (False); bool, sent as 0/1 (unitless). Switching
        it on with the interlock open is refused before anything is sent.""",
        validator=strict_bool,
        get_process=parse_bool01,
        set_process=format_bool01,
        guard=_interlock_guard,
    )

    intensity = Instrument.control(
        "TUNE?",
        "TUNE %.1f",
        """Pulse intensity (tune) in %, float strictly in the range 0 to max_intensity_pct (100
        unless the stand allows less), set to 0.1 %.""",
        validator=strict_range,
        values=_intensity_range,
        units="%",
        get_process=parse_float,
    )

    repetition_rate_hz = Instrument.control(
        "FREQ?",
        "FREQ %.1f",
        """Pulse repetition rate in Hz with the internal trigger, float strictly in the range 1
        to max_rate_hz (1000000, 1 MHz, unless the stand allows less), set to 0.1 Hz.""",
        validator=strict_range,
        values=_rate_range,
        units="Hz",
        get_process=parse_float,
    )

    trigger_source = Instrument.control(
        "TRIG:SOUR?",
        "TRIG:SOUR %s",
        """Trigger source, one of 'internal' (the pulser's own oscillator at
        repetition_rate_hz) or 'external' (the stand's trigger input); unitless.""",
        validator=strict_discrete_set,
        values={"internal": "INT", "external": "EXT"},
        map_values=True,
    )

    fibre_channel = Instrument.control(
        "FIB:CHAN?",
        "FIB:CHAN %d",
        """Fibre switch position, int strictly in the range 0 to fibre_outputs (16 unless the
        stand has fewer), unitless: 0 lights every output through the splitter, k lights output
        k only (one bar or column).""",
        validator=strict_int_range,
        values=_fibre_range,
        get_process=parse_int,
    )

    interlock_ok = Instrument.measurement(
        "INTLK?",
        """Whether the laser interlock is closed (True: the laser may emit); bool, read only.""",
        get_process=parse_bool01,
    )

    def safe_state(self) -> None:
        """Switch the optical output off (read back)."""
        log.info("%s: output off (safe state)", self.name)
        self.output_enabled = False

    def is_safe(self) -> bool:
        """True when the instrument reports its optical output off."""
        return not self.output_enabled

    def unsafe_detail(self) -> str:
        """What is not safe (empty when safe)."""
        return "" if self.is_safe() else "the optical output is still on"

    def interlocks(self) -> dict[str, bool]:
        """The laser interlock: closed (True) or open."""
        return {"laser interlock": bool(self.interlock_ok)}


def _check_setting(laser: LaserPulser, ctx: CheckContext) -> str:
    laser.output_enabled = False
    low, high = 0.25 * laser.max_intensity_pct, 0.5 * laser.max_intensity_pct
    laser.intensity = round(low, 1)
    laser.intensity = round(high, 1)
    return f"intensity set and read back ({round(low, 1):g} %, {round(high, 1):g} %), output off"


def _check_interlock(laser: LaserPulser, ctx: CheckContext) -> str:
    if not laser.interlock_ok:
        raise AssertionError("the laser interlock is open: close the enclosure")
    return "interlock closed"


DRIVER = DriverSpec(
    cls=LaserPulser,
    role="laser",
    models=("LASER-PULSER",),
    options=LaserOptions,
    twin=SimTwin("instruments.yaml", "laser", "ASRL1::INSTR"),
    checks=(
        SelfCheck("interlock", _check_interlock),
        SelfCheck("set and read back", _check_setting),
    ),
)
