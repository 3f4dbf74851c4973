"""Stand files (TOML) -> connected instruments, real or simulated.

This is one of the few places that decide between real and simulated hardware (with the CLI, the
GUI and the tests). A stand file names each instrument's driver, resource and options, the VISA
backend, the channel map (the run file's ``/channels``) and the order of the safe state.

Everything a stand file says is checked when it is read, before anything is connected: the
drivers and their options (against each driver's declared options model), the channel map
against the readout's and the DAC's declared channel counts, and the VISA backend (a pyvisa-sim
YAML is parsed). At connect, every instrument must identify as a model its driver speaks to and
show the hardware facts the stand file declares (DAC step, channel counts).

A stand is simulated when it has a ``[simulation]`` table or its ``visa_library`` is a pyvisa-sim
YAML (``"file.yaml@sim"``). Its instruments then answer from pyvisa-sim: from that YAML, or from
the twins the drivers declare (composed into a fresh YAML per connection, serving the stand's own
resource names), and its readout's data plane is the physics model of :mod:`teststand.sim`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .core.hits import CHANNEL_DTYPE
from .core.stand import StandInfo
from .drivers import DRIVERS, ROLES, DriverOptions, DriverSpec
from .errors import (
    ConnectionFailed,
    StandError,
    StandNotSafe,
    describe_validation_error,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHANNEL_DTYPE",
    "ROLES",
    "StandConfig",
    "StandFile",
    "Station",
    "connect",
    "load_stand",
    "parse_stand",
    "resolve_stand",
    "shipped_stands",
]

#: Longest stand file read (a stand file is a few kB; this keeps a wrong file from filling memory).
MAX_STAND_BYTES = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _no_nul(value: str, what: str) -> str:
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character")
    return value


class SerialSettings(_Strict):
    """RS232 settings of an instrument behind ``transport = "serial"``."""

    baudrate: int = Field(default=19200, gt=0, le=10_000_000)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1


class InstrumentConfig(_Strict):
    """One ``[instruments.<name>]`` table."""

    driver: str = Field(description="driver class name")
    resource: str = Field(
        min_length=1, max_length=512, description="VISA resource string or serial port"
    )
    transport: Literal["visa", "serial"] = "visa"
    timeout_s: float = Field(default=2.0, gt=0, le=600)
    read_termination: str = Field(default="\n", min_length=1, max_length=4)
    write_termination: str = Field(default="\n", min_length=1, max_length=4)
    serial: SerialSettings = SerialSettings()
    options: dict[str, Any] = Field(default_factory=dict, description="driver keyword options")

    @model_validator(mode="after")
    def _clean(self) -> InstrumentConfig:
        _no_nul(self.resource, "resource")
        return self


class ChannelConfig(_Strict):
    """One row of the channel map."""

    channel: int = Field(ge=0, le=65535)
    plane: int = Field(default=0, ge=-32768, le=32767)
    bar: int = Field(ge=-32768, le=32767)
    board: int = Field(default=0, ge=-32768, le=32767)
    delay_ns: float = Field(default=0.0, ge=0, le=1000)


class SimulationConfig(_Strict):
    """``[simulation]``: the stand is simulated; its data plane is the physics model."""

    model: Literal["tofhir", "hptdc"] | None = Field(
        default=None, description="physics model (default: the stand's readout)"
    )
    non_scaling: bool = False

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "yaml" in data:
            raise ValueError(
                'simulation.yaml: moved to the top-level key visa_library = "FILE.yaml@sim"'
            )
        return data


class StandConfig(_Strict):
    """A validated stand file."""

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=10_000)
    readout: Literal["tofhir", "hptdc"]
    visa_library: str = Field(
        default="",
        max_length=4096,
        description='VISA backend: "" pyvisa\'s default, "@py" pyvisa-py, a vendor library '
        'path, or "FILE.yaml@sim" (pyvisa-sim)',
    )
    safe_order: list[str] = Field(default_factory=lambda: ["laser", "readout", "dac"])
    channels: list[ChannelConfig] = Field(min_length=1, max_length=4096)
    simulation: SimulationConfig | None = None
    instruments: dict[str, InstrumentConfig]

    @model_validator(mode="after")
    def _consistent(self) -> StandConfig:
        _no_nul(self.name, "name")
        _no_nul(self.visa_library, "visa_library")
        for name, inst in self.instruments.items():
            if name not in ROLES:
                raise ValueError(
                    f"instruments.{name}: unknown instrument (expected one of {', '.join(ROLES)})"
                )
            if inst.driver not in ROLES[name]:
                expected = " or ".join(ROLES[name])
                raise ValueError(
                    f"instruments.{name}.driver: expected {expected}, got {inst.driver!r}"
                )
            _options(name, inst)  # raises naming the key
        if "readout" not in self.instruments:
            raise ValueError("instruments.readout: missing (required)")
        readout_spec = DRIVERS[self.instruments["readout"].driver]
        if readout_spec.readout_kind != self.readout:
            kinds = [s.name for s in DRIVERS.values() if s.readout_kind == self.readout]
            raise ValueError(
                f"instruments.readout.driver: readout = {self.readout!r} needs {' or '.join(kinds)}"
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
        for role in ("readout", "dac"):
            if role in self.instruments:
                declared = int(_options(role, self.instruments[role]).facts()["n_channels"])
                if len(numbers) > declared:
                    raise ValueError(
                        f"channels: {len(numbers)} channels mapped but the {role} has "
                        f"{declared} (instruments.{role}.options.n_channels)"
                    )
        if (
            self.simulation is not None
            and self.simulation.model is not None
            and self.simulation.model != self.readout
        ):
            raise ValueError(f"simulation.model: expected {self.readout!r} (the stand's readout)")
        return self

    @property
    def simulated(self) -> bool:
        """A ``[simulation]`` table or a pyvisa-sim backend."""
        return self.simulation is not None or self.visa_library.endswith("@sim")

    def options(self, name: str) -> DriverOptions:
        """The validated options of instrument ``name``."""
        return _options(name, self.instruments[name])

    def spec(self, name: str) -> DriverSpec:
        """The driver declaration of instrument ``name``."""
        return DRIVERS[self.instruments[name].driver]

    def channel_table(self) -> np.ndarray:
        """The channel map as the ``/channels`` structured array, sorted by channel."""
        rows = sorted(self.channels, key=lambda c: c.channel)
        table = np.zeros(len(rows), dtype=CHANNEL_DTYPE)
        for field_name in CHANNEL_DTYPE.names or ():
            table[field_name] = [getattr(c, field_name) for c in rows]
        return table


def _options(name: str, inst: InstrumentConfig) -> DriverOptions:
    spec = DRIVERS[inst.driver]
    try:
        return spec.options.model_validate(inst.options)
    except ValidationError as exc:
        raise ValueError(
            describe_validation_error(exc.errors()[0], f"instruments.{name}.options")
        ) from None


def shipped_stands() -> dict[str, Path]:
    """Name -> path of the stand files shipped with the package."""
    folder = resources.files("teststand") / "stands"
    return {Path(str(e)).stem: Path(str(e)) for e in folder.iterdir() if str(e).endswith(".toml")}


def resolve_stand(spec: str) -> Path:
    """A shipped stand's name or a path -> the stand file's path."""
    shipped = shipped_stands()
    if spec in shipped:
        return shipped[spec]
    if "\x00" in spec or len(spec) > 4096:
        raise StandError(f"{spec[:80]!r}: not a usable stand file name")
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as exc:
        raise StandError(f"{spec[:200]}: cannot use as a stand file ({exc.strerror})") from None
    if not exists:
        names = ", ".join(sorted(shipped))
        raise StandError(f"{spec}: no such stand file and no shipped stand of that name ({names})")
    if path.is_dir():
        raise StandError(f"{spec}: is a folder, not a stand file")
    return path


def parse_stand(text: str, path: str = "<stand>") -> StandConfig:
    """Validate stand-file TOML ``text``; errors name ``path``, the key and what was expected."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StandError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise StandError(f"{path}: not valid TOML (nested too deeply)") from None
    try:
        return StandConfig.model_validate(data)
    except ValidationError as exc:
        raise StandError(f"{path}: {describe_validation_error(exc.errors()[0])}") from None
    except RecursionError:
        raise StandError(f"{path}: nested too deeply") from None


@dataclass
class StandFile:
    """A stand file as read: its path, text and validated configuration."""

    path: Path
    text: str
    config: StandConfig

    @property
    def simulated(self) -> bool:
        """True for a simulated stand (``[simulation]`` or a pyvisa-sim backend)."""
        return self.config.simulated

    @property
    def sim_yaml(self) -> Path | None:
        """The pyvisa-sim YAML named by ``visa_library = "FILE@sim"`` (resolved), or ``None``."""
        lib = self.config.visa_library
        if not lib.endswith("@sim") or lib == "@sim":
            return None
        file = Path(lib[: -len("@sim")])
        return file if file.is_absolute() else (self.path.parent / file)

    def info(self) -> StandInfo:
        """What the plans need to know about the stand: its map and its declared limits."""
        cfg = self.config
        facts: dict[str, Any] = {}
        for name in cfg.instruments:
            facts[name] = cfg.options(name).facts()
        dac, laser, readout = facts.get("dac"), facts.get("laser"), facts["readout"]
        return StandInfo(
            name=cfg.name,
            readout_kind=cfg.readout,
            channels=cfg.channel_table(),
            instruments=tuple(cfg.instruments),
            lsb_uA=None if dac is None else float(dac["lsb_uA"]),
            max_code=None if dac is None else int(dac["max_code"]),
            safe_code=(
                None
                if dac is None
                else int(dac["max_code"] if dac["safe_code"] is None else dac["safe_code"])
            ),
            dac_channels=None if dac is None else int(dac["n_channels"]),
            max_intensity_pct=None if laser is None else float(laser["max_intensity_pct"]),
            max_rate_hz=None if laser is None else float(laser["max_rate_hz"]),
            fibre_outputs=None if laser is None else int(laser["fibre_outputs"]),
            readout_channels=int(readout["n_channels"]),
            max_triggers=int(readout["max_triggers"]),
        )


def load_stand(spec: str) -> StandFile:
    """Read and validate a stand file (a shipped name or a path). Raises :class:`StandError`."""
    path = resolve_stand(spec)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_STAND_BYTES + 1)
    except OSError as exc:
        raise StandError(f"{path}: cannot read the stand file ({exc.strerror})") from None
    if len(raw) > MAX_STAND_BYTES:
        raise StandError(f"{path}: larger than {MAX_STAND_BYTES} bytes; not a stand file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StandError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    stand = StandFile(path, text, parse_stand(text, str(path)))
    _check_visa_library(stand)
    return stand


def _check_visa_library(stand: StandFile) -> None:
    """The VISA backend a stand file names must exist and, for pyvisa-sim, parse."""
    lib = stand.config.visa_library
    where = f"{stand.path}: visa_library {lib!r}"
    if lib in ("", "@ivi", "@sim"):
        return
    if lib == "@py":
        if importlib.util.find_spec("pyvisa_py") is None:
            raise StandError(f"{where}: pyvisa-py is not installed (pip install 'teststand[lab]')")
        return
    if lib.startswith("@"):
        raise StandError(f"{where}: unknown backend (expected '', '@py', '@ivi' or FILE@sim)")
    sim_yaml = stand.sim_yaml
    file = sim_yaml if sim_yaml is not None else Path(lib)
    try:
        if not file.exists():
            raise StandError(f"{where}: no such file {file}")
        if not file.is_file():
            raise StandError(f"{where}: {file} is not a file")
    except OSError as exc:
        raise StandError(f"{where}: cannot use {file} ({exc.strerror})") from None
    if sim_yaml is not None:
        _check_sim_yaml(sim_yaml, where)


def _check_sim_yaml(file: Path, where: str) -> None:
    from pyvisa_sim.parser import get_devices

    import yaml

    try:
        if file.stat().st_size > MAX_STAND_BYTES:
            raise StandError(f"{where}: {file} is larger than {MAX_STAND_BYTES} bytes")
        try:
            # Parsed here first: pyvisa-sim's own message for bad YAML is a whole traceback.
            yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise StandError(f"{where}: {file} is not valid YAML ({at}{problem})") from None
        get_devices(file, False)
    except StandError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyvisa-sim raises anything from YAML to KeyError
        # pyvisa-sim puts a whole traceback into some of its messages: keep the last line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = " ".join((lines[-1] if lines else type(exc).__name__).split())[:200]
        raise StandError(f"{where}: not a pyvisa-sim description ({text})") from None


@dataclass
class Station:
    """A connected stand: instruments by name, the channel map and, if simulated, the model."""

    stand: StandFile
    instruments: dict[str, Any]
    info: StandInfo
    model: Any = None
    seed: int | None = None
    simulated: bool = False
    _closers: list[Any] = field(default_factory=list)

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

    def facts(self) -> dict[str, dict[str, Any]]:
        """The hardware facts of every instrument, as the stand file declared them."""
        return {name: self.stand.config.options(name).facts() for name in self.instruments}

    def safe_state(self) -> list[str]:
        """Put every instrument in its safe state; returns the errors (empty when all went)."""
        errors = []
        for name in self.safe_order:
            try:
                self.instruments[name].safe_state()
            except Exception as exc:  # noqa: BLE001 - carry on with the others
                errors.append(f"{name}: {exc}")
        return errors

    def unsafe(self) -> dict[str, str]:
        """Instruments whose safe state the read-back does not confirm: ``{name: what}``."""
        failures: dict[str, str] = {}
        for name in self.safe_order:
            try:
                detail = self.instruments[name].unsafe_detail()
            except Exception as exc:  # noqa: BLE001 - not answering is not confirmed safe
                detail = f"safe state not confirmed ({' '.join(str(exc).split())})"
            if detail:
                failures[name] = detail
        return failures

    def confirm_safe(self) -> None:
        """Put every instrument in its safe state and confirm it by read-back.

        Raises:
            StandNotSafe: naming every instrument that is not confirmed safe.
        """
        self.safe_state()
        failures = self.unsafe()
        if failures:
            raise StandNotSafe(failures)

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


def _visa_name(inst: InstrumentConfig) -> str:
    """The VISA resource an instrument is opened at on a VISA backend (a port as ASRL)."""
    if inst.transport == "serial" and "::" not in inst.resource:
        return f"ASRL{inst.resource}::INSTR"
    return inst.resource


def _compose_twins(stand: StandFile, folder: Path) -> Path:
    """A pyvisa-sim YAML serving each instrument's stand resource with its driver's twin."""
    import yaml  # pyvisa-sim's own YAML library
    from pyvisa import rname

    cfg = stand.config
    devices: dict[str, Any] = {}
    served: dict[str, Any] = {}
    loaded: dict[str, Any] = {}
    for name, inst in cfg.instruments.items():
        twin = DRIVERS[inst.driver].twin
        if twin.yaml not in loaded:
            text = (resources.files("teststand.sim") / twin.yaml).read_text(encoding="utf-8")
            loaded[twin.yaml] = yaml.safe_load(text)
        device = dict(loaded[twin.yaml]["devices"][twin.device])
        resource = _visa_name(inst)
        parsed = rname.parse_resource_name(resource)
        interface = f"{parsed.interface_type} {parsed.resource_class}"
        eom = dict(device.get("eom") or {})
        if interface not in eom and eom:
            eom[interface] = next(iter(eom.values()))
        device["eom"] = eom
        devices[name] = device
        served[resource] = {"device": name}
    path = folder / "twins.yaml"
    path.write_text(
        yaml.safe_dump({"spec": "1.1", "devices": devices, "resources": served}), encoding="utf-8"
    )
    return path


def _resource_manager(stand: StandFile, closers: list[Any]) -> Any:
    import pyvisa

    lib = stand.config.visa_library
    if not stand.simulated:
        rm = pyvisa.ResourceManager(lib) if lib else pyvisa.ResourceManager()
        closers.append(rm.close)
        return rm
    # A fresh copy per connection: pyvisa-sim keeps instrument state per file.
    tmp = Path(tempfile.mkdtemp(prefix="teststand-sim-"))
    closers.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    source = stand.sim_yaml
    if source is not None:
        yaml_copy = tmp / source.name
        shutil.copyfile(source, yaml_copy)
    else:
        yaml_copy = _compose_twins(stand, tmp)
    rm = pyvisa.ResourceManager(f"{yaml_copy}@sim")
    closers.append(rm.close)
    return rm


def connect(stand: StandFile, *, seed: int | None = None) -> Station:
    """Connect every instrument of ``stand``; report every one that failed in one error.

    Each instrument must identify as a model its driver speaks to and show the facts the stand
    file declares (:meth:`~teststand.core.Instrument.check_facts`).
    """
    from .core import SerialTransport, VisaTransport

    cfg = stand.config
    if stand.simulated and seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])  # recorded in the run file
    closers: list[Any] = []
    failures: dict[str, str] = {}
    transports: dict[str, Any] = {}
    try:
        rm = _resource_manager(stand, closers)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot load is a failed connection
        for closer in reversed(closers):
            closer()
        raise ConnectionFailed({"visa": f"{cfg.visa_library or 'default'}: {exc}"}) from None

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
                resource = rm.open_resource(
                    _visa_name(inst),
                    read_termination=inst.read_termination,
                    write_termination=inst.write_termination,
                    timeout=int(inst.timeout_s * 1000),
                )
                transports[name] = VisaTransport(
                    resource,
                    name=name,
                    read_termination=inst.read_termination,
                    write_termination=inst.write_termination,
                )
            closers.append(transports[name].close)
        except Exception as exc:  # noqa: BLE001 - collect every failure, report them together
            failures[name] = f"{inst.resource}: {' '.join(str(exc).split())}"

    instruments: dict[str, Any] = {}
    model: Any = None
    simulated = stand.simulated
    if not failures:
        # Instruments with a simulated data plane come last: the model reads the others.
        order = sorted(
            cfg.instruments, key=lambda n: stand.simulated and cfg.spec(n).twin.data_plane
        )
        for name in order:
            spec = cfg.spec(name)
            transport = transports[name]
            if stand.simulated and spec.twin.data_plane and failures:
                break  # its data plane reads instruments that failed: those are the news
            try:
                if stand.simulated and spec.twin.data_plane:
                    model = _physics_model(stand, instruments, int(seed or 0))
                    transport = _data_plane(transport, model, instruments)
                driver = spec.cls(transport, **cfg.options(name).model_dump())
                identity = driver.identify()
                spec.check_identity(name, identity)
                driver.check_facts()
                if identity.manufacturer.upper() == "SIMULATED" and not simulated:
                    log.warning("%s identifies as simulated: the run is recorded simulated", name)
                    simulated = True
                instruments[name] = driver
            except Exception as exc:  # noqa: BLE001
                failures[name] = f"{cfg.instruments[name].resource}: {' '.join(str(exc).split())}"
                if stand.simulated and spec.twin.data_plane:
                    break

    if failures:
        # What did connect may have been left unsafe by an earlier session: safe before closing.
        for driver in instruments.values():
            try:
                driver.safe_state()
            except Exception as exc:  # noqa: BLE001 - already failing; report the connection
                log.warning("%s: safe state while giving up the connection: %s", driver.name, exc)
        for closer in reversed(closers):
            try:
                closer()
            except Exception:  # noqa: BLE001, S110 - already failing; report the connection errors
                pass
        raise ConnectionFailed(failures)

    log.info("connected stand %s (%s)", cfg.name, "SIMULATED" if simulated else "real")
    return Station(
        stand,
        instruments,
        stand.info(),
        model=model,
        seed=seed,
        simulated=simulated,
        _closers=closers,
    )


def _physics_model(stand: StandFile, instruments: Mapping[str, Any], seed: int) -> Any:
    from .sim import HptdcModel, TofhirModel

    cfg = stand.config
    channels = cfg.channel_table()
    kind = (cfg.simulation.model if cfg.simulation else None) or cfg.readout
    if kind == "tofhir":
        non_scaling = cfg.simulation.non_scaling if cfg.simulation else False
        return TofhirModel(
            channels, seed, non_scaling=non_scaling, lsb_uA=float(instruments["dac"].lsb_uA)
        )
    return HptdcModel(channels, seed)


def _data_plane(transport: Any, model: Any, instruments: Mapping[str, Any]) -> Any:
    from .sim import SimulatedReadoutLink

    return SimulatedReadoutLink(
        transport, model, laser=instruments["laser"], dac=instruments.get("dac")
    )
