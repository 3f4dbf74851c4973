"""The instrument base class: declarative parameters, strict replies, read-back and resync.

A driver subclasses :class:`Instrument` and declares one :class:`Parameter` per instrument
parameter with :meth:`Instrument.control` (read/write) or :meth:`Instrument.measurement` (read
only), in the PyMeasure style::

    intensity = Instrument.control(
        "TUNE?", "TUNE %.1f",
        \"\"\"Laser intensity (tune) in % (float, strictly 0 to 100).\"\"\",
        validator=strict_range, values=(0.0, 100.0), units="%", get_process=parse_float,
    )

The base class guarantees, for every driver:

* values are validated before anything is sent (a :class:`~teststand.errors.RangeError`);
* every set is read back and compared (a :class:`~teststand.errors.ReadbackMismatch`);
* every reply that cannot be interpreted, or that equals the instrument's error string, raises
  :class:`~teststand.errors.InstrumentReplyError`;
* after a timeout, an I/O error or a garbled reply the instrument is out of sync, and the link is
  cleared (``transport.clear()``) before the next command is sent.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, overload

import numpy as np

from ..errors import InstrumentError, InstrumentReplyError, ReadbackMismatch
from ._transport import Transport
from ._validators import Validator

log = logging.getLogger(__name__)


# -- reply parsers ----------------------------------------------------------------------------
# Each raises ValueError on a reply it cannot interpret; the base class turns that into an
# InstrumentReplyError naming the instrument and the command.


def parse_int(reply: str) -> int:
    """Parse a decimal integer reply (``"12"``); ``"12.0"`` is refused."""
    return int(reply)


def parse_float(reply: str) -> float:
    """Parse a finite floating-point reply (``"12.5"``, ``"1.25E+01"``)."""
    value = float(reply)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {reply!r}")
    return value


def parse_bool01(reply: str) -> bool:
    """Parse a ``"0"``/``"1"`` reply; anything else is refused."""
    if reply == "1":
        return True
    if reply == "0":
        return False
    raise ValueError(f"expected 0 or 1, got {reply!r}")


def parse_int_list(reply: str) -> np.ndarray:
    """Parse a comma-separated list of integers (``"63,63,12"``) into an ``int64`` array."""
    if not reply:
        return np.zeros(0, dtype=np.int64)
    return np.array([int(item) for item in reply.split(",")], dtype=np.int64)


def format_bool01(value: bool) -> int:
    """Format a bool as the ``0``/``1`` most instruments expect."""
    return int(bool(value))


def format_int_list(values: np.ndarray) -> str:
    """Format integers as a comma-separated list without spaces (``"63,63,12"``)."""
    return ",".join(str(int(v)) for v in values)


def _identity(value: Any) -> Any:
    return value


_FIXED = re.compile(r"%[-+ 0#]*\d*\.(\d+)[fF]")
_SIGNIFICANT = re.compile(r"%[-+ 0#]*\d*(?:\.(\d+))?[eEgG]")


def _format_tolerance(set_command: str) -> tuple[float, float]:
    """Return (absolute, relative) read-back tolerance implied by the set command's format.

    ``%.1f`` can only carry the value to 0.05; ``%g`` to half of its 6th significant digit.
    Integer and string formats carry the value exactly.
    """
    fixed = _FIXED.search(set_command)
    if fixed:
        return 0.5 * 10.0 ** -int(fixed.group(1)), 0.0
    significant = _SIGNIFICANT.search(set_command)
    if significant:
        digits = int(significant.group(1)) if significant.group(1) is not None else 6
        return 0.0, 0.5 * 10.0 ** -max(digits - 1, 0)
    return 0.0, 0.0


# -- identity ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What an instrument says it is (from ``*IDN?``: manufacturer, model, serial, firmware)."""

    idn: str
    manufacturer: str
    model: str
    serial: str
    firmware: str

    def as_dict(self) -> dict[str, str]:
        """The identity as a plain dict (for run-file attributes and reports)."""
        return asdict(self)


# -- declarative parameters --------------------------------------------------------------------


class Parameter:
    """One instrument parameter, declared on a driver class with `Instrument.control` or
    `Instrument.measurement`. Reading the attribute queries the instrument; assigning validates,
    sends and reads back.

    Attributes:
        name: the attribute name (set when the class is created).
        get_command: the query, e.g. ``"TUNE?"``.
        set_command: ``%``-format of the set command, or ``None`` for a read-only parameter.
        units: physical units (``"Hz"``, ``"uA"``, ``"%"``), ``""`` for dimensionless values.
        values: the validator's argument, or a callable ``(instrument) -> values`` when the range
            depends on the instrument (channel count, configured maximum code).
        cached: read once per driver instance (hardware constants such as the channel count).
        setting: included in `Instrument.settings`.
        guard: called as ``guard(instrument, value)`` after validation and before anything is
            sent; raises to refuse (the laser refuses to emit with its interlock open).
    """

    def __init__(
        self,
        get_command: str,
        set_command: str | None,
        docstring: str,
        *,
        validator: Validator | None = None,
        values: Any = None,
        units: str = "",
        get_process: Callable[[str], Any] = str,
        set_process: Callable[[Any], Any] = _identity,
        check_set: bool = True,
        map_values: bool = False,
        tolerance: float | None = None,
        cached: bool = False,
        setting: bool = True,
        guard: Callable[[Any, Any], None] | None = None,
    ) -> None:
        if map_values and not (isinstance(values, dict) or callable(values)):
            raise TypeError("map_values needs values to be a dict {python value: reply text}")
        self.name = "<unbound>"
        self.get_command = get_command
        self.set_command = set_command
        self.__doc__ = docstring
        self.validator = validator
        self.values = values
        self.units = units
        self.get_process = get_process
        self.set_process = set_process
        self.check_set = check_set
        self.map_values = map_values
        self.cached = cached
        self.setting = setting
        self.guard = guard
        if tolerance is not None:
            self.abs_tol, self.rel_tol = float(tolerance), 0.0
        else:
            self.abs_tol, self.rel_tol = _format_tolerance(set_command or "")

    @property
    def read_only(self) -> bool:
        """True for a measurement (no set command)."""
        return self.set_command is None

    @property
    def doc(self) -> str:
        """The docstring (units and range)."""
        return self.__doc__ or ""

    def resolve_values(self, instrument: Instrument) -> Any:
        """The validator's argument for this instrument (calls ``values`` if it is callable)."""
        if callable(self.values) and not isinstance(self.values, dict):
            return self.values(instrument)
        return self.values

    def matches(self, expected: Any, got: Any) -> bool:
        """Whether a read-back value equals the value set, within the format's tolerance."""
        if isinstance(expected, np.ndarray) or isinstance(got, np.ndarray):
            want, have = np.asarray(expected), np.asarray(got)
            if want.shape != have.shape:
                return False
            if np.issubdtype(want.dtype, np.floating) or np.issubdtype(have.dtype, np.floating):
                bound = self._bound(np.abs(want.astype(float)))
                return bool(np.all(np.abs(have - want) <= bound))
            return bool(np.array_equal(want, have))
        if isinstance(expected, float) and _is_number(got):
            return bool(abs(float(got) - expected) <= self._bound(abs(expected)))
        if isinstance(expected, bool | np.bool_) != isinstance(got, bool | np.bool_):
            return False  # True == 1 in Python, but a flag is not a number
        return bool(expected == got)

    def _bound(self, magnitude: Any) -> Any:
        # The tiny extra term absorbs binary rounding of the decimal text at the bound itself.
        return (self.abs_tol + self.rel_tol * magnitude) * (1 + 1e-9) + 1e-12 * magnitude

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Parameter: ...

    @overload
    def __get__(self, instance: Instrument, owner: type | None = None) -> Any: ...

    def __get__(self, instance: Instrument | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return instance._get_parameter(self)

    def __set__(self, instance: Instrument, value: Any) -> None:
        if self.read_only:
            raise AttributeError(f"{instance.name}: {self.name} is read-only")
        instance._set_parameter(self, value)

    def __repr__(self) -> str:
        kind = "measurement" if self.read_only else "control"
        return f"<{kind} {self.name} ({self.get_command!r}, {self.set_command!r})>"


# -- the base class ----------------------------------------------------------------------------


class Instrument:
    """Base of every driver: talks through a `Transport` handed to it, never opens one.

    Subclasses declare parameters and implement `safe_state` and `is_safe`.

    Attributes:
        transport: the link to the instrument.
        error_reply: the reply text with which the instrument signals an error (``None``: none).
    """

    error_reply: ClassVar[str | None] = "ERROR"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._in_sync = True
        self._cache: dict[str, Any] = {}
        # One exchange (a set and its read-back, a query and its reply) must not interleave with
        # another thread's, e.g. a GUI poll while the engine runs a scan.
        self._lock = threading.RLock()

    @property
    def name(self) -> str:
        """The instrument's name in the stand (from the transport)."""
        return self.transport.name

    @property
    def in_sync(self) -> bool:
        """False after a timeout or garbled reply, until the next command resynchronises."""
        return self._in_sync

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} at {self.transport.resource!r}>"

    # -- raw exchanges ---------------------------------------------------------------------------

    def write(self, command: str) -> None:
        """Send a command (after resynchronising if needed)."""
        with self._lock:
            self._resync()
            try:
                self.transport.write(command)
            except InstrumentError:
                self._mark_out_of_sync()
                raise

    def query(self, command: str) -> str:
        """Send a query and return its reply, stripped of surrounding whitespace.

        A reply equal to `error_reply` raises `InstrumentReplyError`.
        """
        with self._lock:
            self._resync()
            try:
                reply = self.transport.query(command).strip()
            except InstrumentError:
                self._mark_out_of_sync()
                raise
            if self.error_reply is not None and reply == self.error_reply:
                # The instrument rejected this query or an earlier command whose error reply
                # is only now being read; either way the reply stream may be shifted.
                self._mark_out_of_sync()
                raise InstrumentReplyError(
                    self.name,
                    f"instrument answered {reply!r} (it rejected this or the previous command)",
                    command,
                )
            return reply

    def query_block(self, command: str) -> bytes:
        """Send a query answered by a definite-length binary block; return its payload."""
        with self._lock:
            self._resync()
            try:
                return self.transport.query_block(command)
            except InstrumentError:
                self._mark_out_of_sync()
                raise

    def reply_error(self, message: str, command: str | None) -> InstrumentReplyError:
        """Mark the instrument out of sync and return the error for a reply it cannot use."""
        self._mark_out_of_sync()
        return InstrumentReplyError(self.name, message, command)

    # -- common driver API -----------------------------------------------------------------------

    def identify(self) -> Identity:
        """Ask ``*IDN?`` and parse ``manufacturer,model,serial,firmware``."""
        command = "*IDN?"
        reply = self.query(command)
        parts = [part.strip() for part in reply.split(",")]
        if len(parts) != 4 or not all(parts):
            raise self.reply_error(
                f"*IDN? reply {reply!r} is not 'manufacturer,model,serial,firmware'", command
            )
        manufacturer, model, serial, firmware = parts
        return Identity(reply, manufacturer, model, serial, firmware)

    def safe_state(self) -> None:
        """Put the instrument in its fail-safe state (laser off, no triggering, ...)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its safe state")

    def is_safe(self) -> bool:
        """Ask the instrument whether it is in its safe state."""
        raise NotImplementedError(f"{type(self).__name__} does not define its safe state")

    def unsafe_detail(self) -> str:
        """What is not safe, in a few words for the ``STAND NOT SAFE`` line; empty when safe."""
        return "" if self.is_safe() else "not in its safe state"

    def check_facts(self) -> None:
        """Refuse an instrument whose hardware facts differ from what the stand file declares.

        Called once at connect, after the identity; drivers with declared facts override it.
        """

    def interlocks(self) -> dict[str, bool]:
        """Interlock conditions this instrument reports, ``{what: closed}``; empty if none."""
        return {}

    @classmethod
    def parameters(cls) -> dict[str, Parameter]:
        """Every declared parameter of this driver class, base classes first, in order."""
        found: dict[str, Parameter] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if isinstance(value, Parameter):
                    found[attr] = value
        return found

    def settings(self) -> dict[str, Any]:
        """Every setting read back from the instrument, as JSON-able values."""
        with self._lock:
            return {
                name: _jsonable(getattr(self, name))
                for name, parameter in self.parameters().items()
                if parameter.setting
            }

    # -- declarations ----------------------------------------------------------------------------

    @staticmethod
    def control(
        get_command: str,
        set_command: str,
        docstring: str,
        *,
        validator: Validator | None = None,
        values: Any = None,
        units: str = "",
        get_process: Callable[[str], Any] = str,
        set_process: Callable[[Any], Any] = _identity,
        check_set: bool = True,
        map_values: bool = False,
        tolerance: float | None = None,
        cached: bool = False,
        setting: bool = True,
        guard: Callable[[Any, Any], None] | None = None,
    ) -> Any:
        """Declare a read/write parameter.

        Args:
            get_command: the query that reads the value.
            set_command: ``%``-format of the set command, e.g. ``"TUNE %.1f"``.
            docstring: what it is, its units and its range.
            validator: a strict validator, called as ``validator(value, values)`` before sending.
            values: the validator's argument (range, set, mapping), or ``(instrument) -> values``.
            units: physical units, ``""`` for dimensionless.
            get_process: reply text -> value; a ``ValueError`` there is a reply error.
            set_process: validated value -> what is formatted into ``set_command``.
            check_set: read the value back after setting and compare.
            map_values: ``values`` is a dict {Python value: instrument text}.
            tolerance: absolute read-back tolerance; by default derived from the set format.
            cached: read once per driver instance.
            setting: include in `Instrument.settings`.
            guard: ``guard(instrument, value)`` refuses a validated value before it is sent.
        """
        return Parameter(
            get_command,
            set_command,
            docstring,
            validator=validator,
            values=values,
            units=units,
            get_process=get_process,
            set_process=set_process,
            check_set=check_set,
            map_values=map_values,
            tolerance=tolerance,
            cached=cached,
            setting=setting,
            guard=guard,
        )

    @staticmethod
    def measurement(
        get_command: str,
        docstring: str,
        *,
        values: Any = None,
        units: str = "",
        get_process: Callable[[str], Any] = str,
        map_values: bool = False,
        cached: bool = False,
        setting: bool = True,
    ) -> Any:
        """Declare a read-only parameter (see `control` for the arguments)."""
        return Parameter(
            get_command,
            None,
            docstring,
            values=values,
            units=units,
            get_process=get_process,
            map_values=map_values,
            cached=cached,
            setting=setting,
        )

    # -- parameter machinery ---------------------------------------------------------------------

    def _get_parameter(self, parameter: Parameter) -> Any:
        if parameter.cached and parameter.name in self._cache:
            return self._cache[parameter.name]
        command = parameter.get_command
        with self._lock:
            reply = self.query(command)
            try:
                if parameter.map_values:
                    value = _unmap(parameter.resolve_values(self), reply)
                else:
                    value = parameter.get_process(reply)
            except (ValueError, TypeError, KeyError) as exc:
                raise self.reply_error(
                    f"{parameter.name}: cannot interpret reply {reply!r} ({exc})", command
                ) from None
        if parameter.cached:
            self._cache[parameter.name] = value
        return value

    def _set_parameter(self, parameter: Parameter, value: Any) -> None:
        assert parameter.set_command is not None
        values = parameter.resolve_values(self)
        if parameter.validator is not None:
            value = parameter.validator(value, values, instrument=self.name, what=parameter.name)
        if parameter.guard is not None:
            parameter.guard(self, value)
        sent = values[value] if parameter.map_values else value
        command = parameter.set_command % (parameter.set_process(sent),)
        with self._lock:
            self.write(command)
            if parameter.check_set:
                got = self._get_parameter(parameter)
                if not parameter.matches(value, got):
                    raise ReadbackMismatch(
                        self.name,
                        f"{parameter.name} set to {_show(value)} "
                        f"but the instrument holds {_show(got)}",
                        command,
                    )
        if parameter.cached:
            self._cache[parameter.name] = value

    def _mark_out_of_sync(self) -> None:
        if self._in_sync:
            log.warning("%s: out of sync; the link is cleared before the next command", self.name)
        self._in_sync = False

    def _resync(self) -> None:
        if self._in_sync:
            return
        self.transport.clear()
        self._in_sync = True
        log.info("%s: link cleared, back in sync", self.name)


def _unmap(mapping: dict[Any, Any], reply: str) -> Any:
    """The Python value whose instrument text is ``reply``."""
    for python_value, text in mapping.items():
        if str(text) == reply:
            return python_value
    raise ValueError(f"not one of {[str(t) for t in mapping.values()]}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_)


def _show(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return format_int_list(value) if np.issubdtype(value.dtype, np.integer) else repr(value)
    return repr(value)


def _jsonable(value: Any) -> Any:
    """Convert numpy values to plain Python so that settings survive ``json.dumps``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
