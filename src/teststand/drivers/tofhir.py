"""TOFHIR2 readout (CMS Barrel Timing Layer ASIC): two timing thresholds and a QDC per channel.

Each hit carries ``t1`` and ``t2`` (the crossings of the T1 and T2 thresholds, set by the
`~teststand.drivers.ThresholdDac`) and the charge ``q``; ``tot`` is NaN.
"""

from __future__ import annotations

from ..core import Instrument, parse_float, strict_range
from ._readout import READOUT_CHECKS, Readout, ReadoutOptions
from ._spec import DriverSpec, SimTwin


class TofhirReadout(Readout):
    """TOFHIR2 readout: channel mask, QDC gate and the common acquisition API.

    Safe state: acquisition stopped.
    """

    qdc_gate_ns = Instrument.control(
        "CONF:QDC:GATE?",
        "CONF:QDC:GATE %.2f",
        """QDC integration gate in ns, float strictly from 5 to 500, set to 0.01 ns.""",
        validator=strict_range,
        values=(5.0, 500.0),
        units="ns",
        get_process=parse_float,
    )


DRIVER = DriverSpec(
    cls=TofhirReadout,
    role="readout",
    models=("TOFHIR2-READOUT",),
    options=ReadoutOptions,
    twin=SimTwin("instruments.yaml", "tofhir", "TCPIP0::tofhir.sim::inst0::INSTR", data_plane=True),
    checks=READOUT_CHECKS,
    readout_kind="tofhir",
)
