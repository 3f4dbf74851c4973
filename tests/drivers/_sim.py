"""The simulated stand's resources and a helper to copy its pyvisa-sim description."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The packaged description of the simulated stand.
SIM_YAML = files("teststand").joinpath("sim", "instruments.yaml")

LASER = "ASRL1::INSTR"
DAC = "TCPIP0::dac.sim::inst0::INSTR"
TOFHIR = "TCPIP0::tofhir.sim::inst0::INSTR"
HPTDC = "TCPIP0::hptdc.sim::inst0::INSTR"


def copy_sim_yaml(folder: Path) -> Path:
    """A private copy: pyvisa-sim keeps device state per definition file for the whole process."""
    path = folder / "instruments.yaml"
    path.write_bytes(SIM_YAML.read_bytes())
    return path
