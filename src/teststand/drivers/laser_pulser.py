"""Picosecond diode laser pulser (PiLas-type) with a fibre switch and a hardware interlock."""

from __future__ import annotations

import logging

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

log = logging.getLogger(__name__)

#: Highest fibre switch position: 16 outputs, one per bar or column.
MAX_FIBRE_CHANNEL = 16


class LaserPulser(Instrument):
    """The laser that lights the bars or sensors; RS232 in the lab, any transport works.

    Safe state: optical output off.
    """

    output_enabled = Instrument.control(
        "OUTP?",
        "OUTP %d",
        """Optical output on (True) or off (False); bool, sent as 0/1 (unitless).""",
        validator=strict_bool,
        get_process=parse_bool01,
        set_process=format_bool01,
    )

    intensity = Instrument.control(
        "TUNE?",
        "TUNE %.1f",
        """Pulse intensity (tune) in %, float strictly from 0 to 100, set to 0.1 %.""",
        validator=strict_range,
        values=(0.0, 100.0),
        units="%",
        get_process=parse_float,
    )

    repetition_rate_hz = Instrument.control(
        "FREQ?",
        "FREQ %.1f",
        """Pulse repetition rate in Hz with the internal trigger, float strictly from 1 to
        1000000 (1 MHz), set to 0.1 Hz.""",
        validator=strict_range,
        values=(1.0, 1e6),
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
        """Fibre switch position, int strictly from 0 to 16 (unitless): 0 lights every output
        through the splitter, k lights output k only (one bar or column).""",
        validator=strict_int_range,
        values=(0, MAX_FIBRE_CHANNEL),
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
