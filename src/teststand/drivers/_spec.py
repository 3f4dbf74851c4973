"""What a driver module declares about itself, so that the station and the self-test need not.

Every driver module ends with one :class:`DriverSpec`: the role its instrument plays in a stand
(``laser``, ``dac``, ``readout``), the instrument models it speaks to, the options a stand file
may give it (a pydantic model, validated when the stand file is read, long before connecting),
its simulated twin (a device of a pyvisa-sim YAML in ``teststand.sim``) and its self-checks. The
station and the self-test iterate over :data:`teststand.drivers.DRIVERS`; a new instrument is one
driver module, its twin and its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..core import Identity, Instrument
from ..errors import InstrumentError


class DriverOptions(BaseModel):
    """Base of the options a stand file gives a driver (``options = {...}``).

    The fields are the driver's keyword arguments and the hardware facts the checks before a run
    rely on (code range, DAC step, channel count, ...). Unknown keys and wrong types are refused.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def facts(self) -> dict[str, Any]:
        """The hardware facts as plain values (recorded with the run, read by the analysis)."""
        return self.model_dump()


@dataclass(frozen=True)
class SimTwin:
    """A driver's simulated twin: one device of a pyvisa-sim YAML shipped in ``teststand.sim``.

    Attributes:
        yaml: the YAML file in ``teststand.sim``.
        device: the device's name in that file.
        resource: the resource that serves the device there (the shipped stands use it).
        data_plane: the simulator must serve this instrument's data plane (binary hit blocks,
            which pyvisa-sim cannot produce): the station puts the physics model behind it.
    """

    yaml: str
    device: str
    resource: str
    data_plane: bool = False


@dataclass
class CheckContext:
    """What a self-check may use: the stand's drivers by role and its channel map."""

    instruments: Mapping[str, Instrument]
    channels: np.ndarray
    n_triggers: int = 200

    @property
    def n_channels(self) -> int:
        """Mapped readout channels."""
        return int(self.channels.size)

    def safe_all(self) -> None:
        """Every instrument in its safe state (laser first)."""
        for role in ("laser", "readout", "dac"):
            if role in self.instruments:
                self.instruments[role].safe_state()
        for role, inst in self.instruments.items():
            if role not in ("laser", "readout", "dac"):
                inst.safe_state()


@dataclass(frozen=True)
class SelfCheck:
    """One functional check of an instrument: returns what it saw, raises when it fails."""

    name: str
    run: Callable[[Any, CheckContext], str]


@dataclass(frozen=True)
class DriverSpec:
    """Everything the station and the self-test need to know about one driver class.

    Attributes:
        cls: the driver class.
        role: the instrument name the plans address it by (``laser``, ``dac``, ``readout``).
        models: the ``*IDN?`` model fields this driver speaks to; any other is refused at connect.
        options: the stand file's options model; its fields are the driver's keyword arguments.
        twin: the simulated twin.
        checks: the functional self-checks, run in order by ``teststand selftest``.
        readout_kind: for readouts, the kind a stand names in ``readout = ...``.
    """

    cls: type[Instrument]
    role: str
    models: tuple[str, ...]
    options: type[DriverOptions]
    twin: SimTwin
    checks: tuple[SelfCheck, ...] = ()
    readout_kind: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The driver's class name, as a stand file names it (``driver = "LaserPulser"``)."""
        return self.cls.__name__

    def check_identity(self, instrument: str, identity: Identity) -> None:
        """Refuse an instrument whose model this driver does not speak to."""
        if identity.model not in self.models:
            raise InstrumentError(
                instrument,
                f"identifies as model {identity.model!r} ({identity.idn!r}); driver {self.name} "
                f"speaks to {', '.join(repr(m) for m in self.models)} only",
                "*IDN?",
            )
