"""Drivers: one module per instrument, each declaring one property per instrument parameter.

Every driver is handed its transport, never asks whether it is simulated, and has
``identify()``, ``safe_state()``, ``is_safe()`` and ``settings()``.
"""

from ._readout import MAX_TRIGGERS, Readout
from .hptdc import HPTDC_BIN_PS, HptdcReadout
from .laser_pulser import MAX_FIBRE_CHANNEL, LaserPulser
from .threshold_dac import DISCRIMINATORS, TOFHIR2_MAX_CODE, Discriminator, ThresholdDac
from .tofhir import TofhirReadout

__all__ = [
    "DISCRIMINATORS",
    "HPTDC_BIN_PS",
    "MAX_FIBRE_CHANNEL",
    "MAX_TRIGGERS",
    "TOFHIR2_MAX_CODE",
    "Discriminator",
    "HptdcReadout",
    "LaserPulser",
    "Readout",
    "ThresholdDac",
    "TofhirReadout",
]
