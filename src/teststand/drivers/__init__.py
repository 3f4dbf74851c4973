"""Drivers: one module per instrument, each declaring one property per instrument parameter.

Every driver is handed its transport, never asks whether it is simulated, and has
``identify()``, ``safe_state()``, ``is_safe()`` and ``settings()``. Every driver module also
declares a :class:`DriverSpec` (its role in a stand, the models it speaks to, its stand-file
options, its simulated twin and its self-checks); :data:`DRIVERS` collects them, and the station
and the self-test iterate over it.
"""

from . import hptdc, laser_pulser, threshold_dac, tofhir
from ._readout import MAX_TRIGGERS, Readout, ReadoutOptions, check_safe_by_measurement
from ._spec import CheckContext, DriverOptions, DriverSpec, SelfCheck, SimTwin
from .hptdc import HPTDC_BIN_PS, HptdcReadout
from .laser_pulser import MAX_FIBRE_CHANNEL, LaserOptions, LaserPulser
from .threshold_dac import (
    DISCRIMINATORS,
    TOFHIR2_LSB_UA,
    TOFHIR2_MAX_CODE,
    DacOptions,
    Discriminator,
    ThresholdDac,
)
from .tofhir import TofhirReadout

#: Every driver, by class name (as a stand file names it).
DRIVERS: dict[str, DriverSpec] = {
    spec.name: spec
    for spec in (laser_pulser.DRIVER, threshold_dac.DRIVER, tofhir.DRIVER, hptdc.DRIVER)
}

#: The roles a stand's instruments may play: instrument name -> the drivers that can fill it.
ROLES: dict[str, tuple[str, ...]] = {}
for _spec in DRIVERS.values():
    ROLES.setdefault(_spec.role, ())
    ROLES[_spec.role] += (_spec.name,)
del _spec

__all__ = [
    "DISCRIMINATORS",
    "DRIVERS",
    "HPTDC_BIN_PS",
    "MAX_FIBRE_CHANNEL",
    "MAX_TRIGGERS",
    "ROLES",
    "TOFHIR2_LSB_UA",
    "TOFHIR2_MAX_CODE",
    "CheckContext",
    "DacOptions",
    "Discriminator",
    "DriverOptions",
    "DriverSpec",
    "HptdcReadout",
    "LaserOptions",
    "LaserPulser",
    "Readout",
    "ReadoutOptions",
    "SelfCheck",
    "SimTwin",
    "ThresholdDac",
    "TofhirReadout",
    "check_safe_by_measurement",
]
