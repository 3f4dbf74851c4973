"""Simulated hardware: the physics model with its ground truth and the readouts' data plane.

The control plane of every instrument is simulated by pyvisa-sim from ``instruments.yaml`` in
this package. The data plane (hits in binary blocks) comes from :class:`SimulatedReadoutLink`,
which reads the laser and DAC state through their drivers and asks a physics model
(:class:`TofhirModel`, :class:`HptdcModel`) for the hits.
"""

from ._link import FaultKind, HitModel, SimulatedReadoutLink
from .physics import (
    CHANNEL_DTYPE,
    HPTDC_BIN_NS,
    HPTDC_TRUTH_DTYPE,
    THR1_OP_UA,
    THR2_OP_UA,
    TOFHIR_TRUTH_DTYPE,
    AcquisitionState,
    HptdcModel,
    LaserTruth,
    TofhirModel,
    awc_truth,
    demo_hptdc_channels,
    demo_tofhir_channels,
    hptdc_walk,
    mean_photoelectrons,
)

__all__ = [
    "CHANNEL_DTYPE",
    "HPTDC_BIN_NS",
    "HPTDC_TRUTH_DTYPE",
    "THR1_OP_UA",
    "THR2_OP_UA",
    "TOFHIR_TRUTH_DTYPE",
    "AcquisitionState",
    "FaultKind",
    "HitModel",
    "HptdcModel",
    "LaserTruth",
    "SimulatedReadoutLink",
    "TofhirModel",
    "awc_truth",
    "demo_hptdc_channels",
    "demo_tofhir_channels",
    "hptdc_walk",
    "mean_photoelectrons",
]
