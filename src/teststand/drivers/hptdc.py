"""HPTDC readout (CMS PPS diamond timing): leading and trailing edges in 24.414 ps bins.

Each hit carries ``t1`` (leading edge) and ``tot`` (time over threshold, trailing minus leading
edge, when both edges are enabled); ``t2`` and ``q`` are NaN.
"""

from __future__ import annotations

from typing import ClassVar

from ..core import Instrument, format_bool01, parse_bool01, strict_bool
from ._readout import READOUT_CHECKS, Readout, ReadoutOptions
from ._spec import DriverSpec, SimTwin

#: HPTDC time bin in ps: the 25 ns clock period divided in 1024 (very high resolution mode).
HPTDC_BIN_PS = 25_000.0 / 1024


class HptdcReadout(Readout):
    """HPTDC readout: channel mask, edge selection and the common acquisition API.

    Safe state: acquisition stopped.
    """

    #: Time bin in ps (25 ns / 1024 = 24.414 ps), a property of the chip.
    bin_ps: ClassVar[float] = HPTDC_BIN_PS

    leading_edge_enabled = Instrument.control(
        "EDGE:LEAD?",
        "EDGE:LEAD %d",
        """Record leading edges (True) or not (False); bool, sent as 0/1 (unitless).""",
        validator=strict_bool,
        get_process=parse_bool01,
        set_process=format_bool01,
    )

    trailing_edge_enabled = Instrument.control(
        "EDGE:TRAIL?",
        "EDGE:TRAIL %d",
        """Record trailing edges (True; needed for time over threshold) or not (False); bool,
        sent as 0/1 (unitless).""",
        validator=strict_bool,
        get_process=parse_bool01,
        set_process=format_bool01,
    )


DRIVER = DriverSpec(
    cls=HptdcReadout,
    role="readout",
    models=("HPTDC-READOUT",),
    options=ReadoutOptions,
    twin=SimTwin("instruments.yaml", "hptdc", "TCPIP0::hptdc.sim::inst0::INSTR", data_plane=True),
    checks=READOUT_CHECKS,
    readout_kind="hptdc",
)
