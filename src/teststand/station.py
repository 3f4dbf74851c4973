"""Stand files (TOML) -> connected instruments, real or simulated.

This is one of the few places that decide between real and simulated hardware (with the CLI, the
GUI and the tests). A stand file names each instrument's driver, resource and options, the channel
map (the run file's ``/channels``) and the order of the safe state. A stand with a
``[simulation]`` table is simulated: its instruments are pyvisa-sim twins opened from a fresh copy
of the shipped YAML, and its readout's data plane is the physics model of :mod:`teststand.sim`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .core.hits import CHANNEL_DTYPE
from .errors import ConnectionFailed, StandError, describe_validation_error
from .sequences import StandInfo

log = logging.getLogger(__name__)


#: Instrument names a stand may define, and the drivers that may fill them.
ROLES: dict[str, tuple[str, ...]] = {
    "laser": ("LaserPulser",),
    "dac": ("ThresholdDac",),
    "readout": ("TofhirReadout", "HptdcReadout"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SerialSettings(_Strict):
    """RS232 settings of an instrument behind ``transport = "serial"``."""

    baudrate: int = Field(default=19200, gt=0)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1


class InstrumentConfig(_Strict):
    """One ``[instruments.<name>]`` table."""

    driver: str = Field(description="driver class name")
    resource: str = Field(min_length=1, description="VISA resource string or serial port")
    transport: Literal["visa", "serial"] = "visa"
    timeout_s: float = Field(default=2.0, gt=0, le=600)
    read_termination: str = "\n"
    write_termination: str = "\n"
    serial: SerialSettings = SerialSettings()
    options: dict[str, Any] = Field(default_factory=dict, description="driver keyword options")


class ChannelConfig(_Strict):
    """One row of the channel map."""

    channel: int = Field(ge=0, le=65535)
    plane: int = Field(default=0, ge=-32768, le=32767)
    bar: int = Field(ge=-32768, le=32767)
    board: int = Field(default=0, ge=-32768, le=32767)
    delay_ns: float = Field(default=0.0, ge=0, le=1000)


class SimulationConfig(_Strict):
    """``[simulation]``: the stand is simulated."""

    model: Literal["tofhir", "hptdc"]
    non_scaling: bool = False
    yaml: str = Field(default="instruments.yaml", description="pyvisa-sim file in teststand.sim")


class StandConfig(_Strict):
    """A validated stand file."""

    name: str = Field(min_length=1)
    description: str = ""
    readout: Literal["tofhir", "hptdc"]
    safe_order: list[str] = Field(default_factory=lambda: ["laser", "readout", "dac"])
    channels: list[ChannelConfig] = Field(min_length=1)
    simulation: SimulationConfig | None = None
    instruments: dict[str, InstrumentConfig]

    @model_validator(mode="after")
    def _consistent(self) -> StandConfig:
        for name, inst in self.instruments.items():
            if name not in ROLES:
                raise ValueError(
                    f"instruments.{name}: unknown instrument (expected one of laser, dac, readout)"
                )
            if inst.driver not in ROLES[name]:
                expected = " or ".join(ROLES[name])
                raise ValueError(
                    f"instruments.{name}.driver: expected {expected}, got {inst.driver!r}"
                )
        if "readout" not in self.instruments:
            raise ValueError("instruments.readout: missing (required)")
        expected = "TofhirReadout" if self.readout == "tofhir" else "HptdcReadout"
        if self.instruments["readout"].driver != expected:
            raise ValueError(
                f"instruments.readout.driver: readout = {self.readout!r} needs {expected}"
            )
        if self.readout == "tofhir" and "dac" not in self.instruments:
            raise ValueError("instruments.dac: missing (a TOFHIR2 stand needs its threshold DAC)")
        unknown = [n for n in self.safe_order if n not in self.instruments]
        if unknown:
            raise ValueError(f"safe_order: names {unknown} are not instruments of this stand")
        numbers = [c.channel for c in self.channels]
        if len(set(numbers)) != len(numbers):
            raise ValueError("channels: channel numbers must be unique")
        if sorted(numbers) != list(range(len(numbers))):
            raise ValueError("channels: channel numbers must run from 0 to N-1")
        if self.simulation is not None and self.simulation.model != self.readout:
            raise ValueError(f"simulation.model: expected {self.readout!r} (the stand's readout)")
        return self

    def channel_table(self) -> np.ndarray:
        """The channel map as the ``/channels`` structured array, sorted by channel."""
        rows = sorted(self.channels, key=lambda c: c.channel)
        table = np.zeros(len(rows), dtype=CHANNEL_DTYPE)
        for field_name in CHANNEL_DTYPE.names or ():
            table[field_name] = [getattr(c, field_name) for c in rows]
        return table


def shipped_stands() -> dict[str, Path]:
    """Name -> path of the stand files shipped with the package."""
    folder = resources.files("teststand") / "stands"
    return {Path(str(e)).stem: Path(str(e)) for e in folder.iterdir() if str(e).endswith(".toml")}


def resolve_stand(spec: str) -> Path:
    """A shipped stand's name or a path -> the stand file's path."""
    shipped = shipped_stands()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if not path.exists():
        names = ", ".join(sorted(shipped))
        raise StandError(f"{spec}: no such stand file and no shipped stand of that name ({names})")
    return path


def parse_stand(text: str, path: str = "<stand>") -> StandConfig:
    """Validate stand-file TOML ``text``; errors name ``path``, the key and what was expected."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StandError(f"{path}: not valid TOML ({exc})") from None
    try:
        return StandConfig.model_validate(data)
    except ValidationError as exc:
        raise StandError(f"{path}: {describe_validation_error(exc.errors()[0])}") from None


@dataclass
class StandFile:
    """A stand file as read: its path, text and validated configuration."""

    path: Path
    text: str
    config: StandConfig

    @property
    def simulated(self) -> bool:
        """True for a simulated stand."""
        return self.config.simulation is not None

    def info(
        self,
        *,
        lsb_uA: float | None = None,
        max_code: int | None = None,
        dac_channels: int | None = None,
    ) -> StandInfo:
        """What the plans need to know about the stand."""
        return StandInfo(
            name=self.config.name,
            readout_kind=self.config.readout,
            channels=self.config.channel_table(),
            instruments=tuple(self.config.instruments),
            lsb_uA=lsb_uA,
            max_code=max_code,
            dac_channels=dac_channels,
        )


def load_stand(spec: str) -> StandFile:
    """Read and validate a stand file (a shipped name or a path). Raises :class:`StandError`."""
    path = resolve_stand(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StandError(f"{path}: cannot read the stand file ({exc})") from None
    return StandFile(path, text, parse_stand(text, str(path)))


@dataclass
class Station:
    """A connected stand: instruments by name, the channel map and, if simulated, the model."""

    stand: StandFile
    instruments: dict[str, Any]
    info: StandInfo
    model: Any = None
    seed: int | None = None
    _closers: list[Any] = field(default_factory=list)

    @property
    def simulated(self) -> bool:
        """True when the instruments are simulated twins."""
        return self.stand.simulated

    @property
    def safe_order(self) -> list[str]:
        """Instrument names in safe-state order (the rest after)."""
        order = list(self.stand.config.safe_order)
        return order + [n for n in self.instruments if n not in order]

    def truth(self) -> np.ndarray | None:
        """The simulator's per-channel truth (``None`` on a real stand)."""
        return None if self.model is None else self.model.truth()

    def truth_attrs(self) -> dict[str, float]:
        """Stand-wide true parameters of the simulator (laser jitter, ...); empty when real."""
        return {} if self.model is None else dict(self.model.truth_attrs())

    def safe_state(self) -> list[str]:
        """Put every instrument in its safe state; returns the errors (empty when all went)."""
        errors = []
        for name in self.safe_order:
            try:
                self.instruments[name].safe_state()
            except Exception as exc:  # noqa: BLE001 - carry on with the others
                errors.append(f"{name}: {exc}")
        return errors

    def close(self) -> None:
        """Close every transport and resource manager."""
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - closing must not mask the run's outcome
                log.warning("while closing the stand: %s", exc)
        self._closers.clear()

    def __enter__(self) -> Station:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _driver_class(name: str) -> type:
    from . import drivers

    cls: type = getattr(drivers, name)  # names are checked against ROLES at validation
    return cls


def connect(stand: StandFile, *, seed: int | None = None) -> Station:
    """Connect every instrument of ``stand``; report every one that failed in one error."""
    import pyvisa

    from .core import SerialTransport, VisaTransport

    cfg = stand.config
    if stand.simulated and seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])  # recorded in the run file
    closers: list[Any] = []
    failures: dict[str, str] = {}
    transports: dict[str, Any] = {}

    if stand.simulated:
        assert cfg.simulation is not None
        # A fresh copy per connection: pyvisa-sim keeps instrument state per file.
        tmp = Path(tempfile.mkdtemp(prefix="teststand-sim-"))
        yaml_src = resources.files("teststand.sim") / cfg.simulation.yaml
        yaml_copy = tmp / "instruments.yaml"
        with resources.as_file(yaml_src) as src:
            shutil.copyfile(src, yaml_copy)
        rm = pyvisa.ResourceManager(f"{yaml_copy}@sim")
        closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
        closers.append(rm.close)
    else:
        rm = None

    for name, inst in cfg.instruments.items():
        try:
            if inst.transport == "serial" and not stand.simulated:
                import serial

                port = serial.Serial(
                    inst.resource,
                    baudrate=inst.serial.baudrate,
                    bytesize=inst.serial.bytesize,
                    parity=inst.serial.parity,
                    stopbits=inst.serial.stopbits,
                    timeout=inst.timeout_s,
                )
                transports[name] = SerialTransport(
                    port,
                    name=name,
                    read_termination=inst.read_termination,
                    write_termination=inst.write_termination,
                )
            else:
                if rm is None:
                    rm = pyvisa.ResourceManager()
                    closers.append(rm.close)
                resource = rm.open_resource(
                    inst.resource,
                    read_termination=inst.read_termination,
                    write_termination=inst.write_termination,
                    timeout=int(inst.timeout_s * 1000),
                )
                transports[name] = VisaTransport(resource, name=name)
            closers.append(transports[name].close)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures[name] = f"{inst.resource}: {exc}"

    instruments: dict[str, Any] = {}
    model: Any = None
    if not failures:
        for name, inst in cfg.instruments.items():
            if name == "readout" and stand.simulated:
                continue
            try:
                instruments[name] = _driver_class(inst.driver)(transports[name], **inst.options)
                instruments[name].identify()
            except Exception as exc:  # noqa: BLE001
                failures[name] = f"{inst.resource}: {exc}"
        if stand.simulated and not failures:
            from .sim import HptdcModel, SimulatedReadoutLink, TofhirModel

            assert cfg.simulation is not None
            channels = cfg.channel_table()
            if cfg.simulation.model == "tofhir":
                dac = instruments["dac"]
                model = TofhirModel(
                    channels,
                    int(seed or 0),
                    non_scaling=cfg.simulation.non_scaling,
                    lsb_uA=dac.lsb_uA,
                )
            else:
                model = HptdcModel(channels, int(seed or 0))
            link = SimulatedReadoutLink(
                transports["readout"], model, laser=instruments["laser"], dac=instruments.get("dac")
            )
            inst = cfg.instruments["readout"]
            try:
                instruments["readout"] = _driver_class(inst.driver)(link, **inst.options)
                instruments["readout"].identify()
            except Exception as exc:  # noqa: BLE001
                failures["readout"] = f"{inst.resource}: {exc}"

    if failures:
        for closer in reversed(closers):
            try:
                closer()
            except Exception:  # noqa: BLE001, S110 - already failing; report the connection errors
                pass
        raise ConnectionFailed(failures)

    n_readout = int(instruments["readout"].n_channels)
    if cfg.channel_table().size > n_readout:
        raise StandError(
            f"{stand.path}: channels: {cfg.channel_table().size} channels mapped but the readout "
            f"has {n_readout}"
        )
    dac = instruments.get("dac")
    info = stand.info(
        lsb_uA=None if dac is None else float(dac.lsb_uA),
        max_code=None if dac is None else int(dac.max_code),
        dac_channels=None if dac is None else int(dac.n_channels),
    )
    log.info("connected stand %s (%s)", cfg.name, "SIMULATED" if stand.simulated else "real")
    return Station(stand, instruments, info, model=model, seed=seed, _closers=closers)
