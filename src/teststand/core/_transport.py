"""Transports: the byte links between a driver and its instrument (VISA or RS232).

A transport moves text lines and IEEE 488.2 binary blocks and turns every link failure into the
typed errors of :mod:`teststand.errors`, each naming the instrument and the command in flight.
It knows nothing about the instrument's command set; the :class:`~teststand.core.Instrument`
base class on top of it parses replies and resynchronises after a fault.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import pyvisa
import serial  # type: ignore[import-untyped, unused-ignore]
from pyvisa import constants as visa_constants

from ..errors import InstrumentIOError, InstrumentReplyError, InstrumentTimeout

log = logging.getLogger(__name__)

#: Largest payload an IEEE 488.2 definite-length block can announce (9 length digits).
MAX_BLOCK_BYTES = 999_999_999

#: Timeout used while draining stale input in ``clear()``: long enough for a reply that was
#: already on its way, short enough to keep a resynchronisation cheap.
CLEAR_SETTLE_S = 0.02


@runtime_checkable
class Transport(Protocol):
    """The link a driver talks through (ADR 0001).

    Attributes:
        name: the instrument's name in the stand, used in every error message.
        resource: the VISA resource string or the serial port the link is open on.
        timeout_s: how long every read waits for a complete reply, in seconds.
    """

    timeout_s: float

    @property
    def name(self) -> str:
        """The instrument's name in the stand."""
        ...

    @property
    def resource(self) -> str:
        """The VISA resource string or serial port."""
        ...

    def write(self, command: str) -> None:
        """Send one command; the write terminator is appended."""
        ...

    def read(self) -> str:
        """Read one terminated line and return it without its terminator."""
        ...

    def query(self, command: str) -> str:
        """Write ``command`` and read the one-line reply."""
        ...

    def query_block(self, command: str) -> bytes:
        """Write ``command`` and read an IEEE 488.2 definite-length block; return its payload."""
        ...

    def clear(self) -> None:
        """Drop whatever the instrument or the link still holds (resynchronise)."""
        ...

    def close(self) -> None:
        """Close the link."""
        ...


def encode_block(payload: bytes) -> bytes:
    """Wrap ``payload`` in an IEEE 488.2 definite-length block header: ``#<n><len><payload>``.

    No message terminator is appended. Raises ``ValueError`` for a payload longer than
    :data:`MAX_BLOCK_BYTES`, which the header cannot announce.
    """
    size = len(payload)
    if size > MAX_BLOCK_BYTES:
        raise ValueError(f"block payload of {size} bytes exceeds {MAX_BLOCK_BYTES} bytes")
    digits = str(size).encode("ascii")
    return b"#" + str(len(digits)).encode("ascii") + digits + bytes(payload)


def decode_block(block: bytes, *, instrument: str = "block", command: str | None = None) -> bytes:
    """Return the payload of one complete definite-length block (the inverse of `encode_block`).

    The block must be exactly header plus payload. A malformed header, a short payload or trailing
    bytes raise :class:`~teststand.errors.InstrumentReplyError` naming ``instrument`` and
    ``command``.
    """
    view = memoryview(block)
    position = 0

    def read_exact(count: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + count])
        position += len(chunk)
        return chunk

    payload = _read_block(read_exact, b"", instrument=instrument, command=command)
    if position != len(block):
        raise InstrumentReplyError(
            instrument, f"{len(block) - position} unexpected byte(s) after the block", command
        )
    return payload


def _read_block(
    read_exact: Callable[[int], bytes],
    terminator: bytes,
    *,
    instrument: str,
    command: str | None,
) -> bytes:
    """Read one definite-length block through ``read_exact`` and return its payload.

    ``read_exact(n)`` returns up to ``n`` bytes, fewer only when the link timed out. Nothing at
    all is a timeout; anything else that is not a well-formed block is a reply error.
    """
    head = read_exact(2)
    if not head:
        raise InstrumentTimeout(instrument, "no block arrived within the timeout", command)
    if len(head) < 2 or head[:1] != b"#" or not head[1:2].isdigit():
        raise InstrumentReplyError(instrument, f"malformed block header {head!r}", command)
    n_digits = int(head[1:2])
    if n_digits == 0:
        # The indefinite-length form (#0 ... NL^END) cannot be framed reliably on a byte stream.
        raise InstrumentReplyError(
            instrument, "indefinite-length block (#0) is not supported", command
        )
    digits = read_exact(n_digits)
    if len(digits) != n_digits or not digits.isdigit():
        raise InstrumentReplyError(instrument, f"malformed block length {head + digits!r}", command)
    size = int(digits)
    payload = read_exact(size)
    if len(payload) != size:
        raise InstrumentReplyError(
            instrument,
            f"short block: header announced {size} bytes, {len(payload)} arrived",
            command,
        )
    if terminator:
        tail = read_exact(len(terminator))
        if tail != terminator:
            raise InstrumentReplyError(
                instrument, f"block not followed by {terminator!r} but by {tail!r}", command
            )
    return payload


def _decode_line(
    raw: bytes, terminator: bytes, encoding: str, *, instrument: str, command: str | None
) -> str:
    """Strip one terminator from ``raw`` and decode it; undecodable bytes are a reply error."""
    if terminator and raw.endswith(terminator):
        raw = raw[: -len(terminator)]
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        raise InstrumentReplyError(
            instrument, f"reply is not {encoding} text: {raw[:80]!r}", command
        ) from None


class _Queries:
    """``query`` and ``query_block`` in terms of a transport's own write and reads."""

    name: str
    _read_terminator: bytes

    def write(self, command: str) -> None:
        raise NotImplementedError

    def read(self) -> str:
        raise NotImplementedError

    def _read_exact(self, count: int) -> bytes:
        raise NotImplementedError

    def query(self, command: str) -> str:
        """Write ``command`` and read one reply line."""
        self.write(command)
        return self.read()

    def query_block(self, command: str) -> bytes:
        """Write ``command`` and read a definite-length block followed by the read terminator."""
        self.write(command)
        payload = _read_block(
            self._read_exact, self._read_terminator, instrument=self.name, command=command
        )
        log.debug("%s -> block of %d bytes", self.name, len(payload))
        return payload


class VisaTransport(_Queries):
    """A :class:`Transport` over any pyvisa message-based resource (real or pyvisa-sim).

    The transport owns the resource's terminators: it sets ``read_termination`` and
    ``write_termination`` on it, so that the drivers' protocol does not depend on how the resource
    was opened. It never owns the ResourceManager; ``close()`` closes this resource only.

    Args:
        resource: an open pyvisa message-based resource (``rm.open_resource(...)``).
        name: the instrument's name in the stand.
        read_termination: end of every reply line.
        write_termination: appended to every command.
        timeout_s: read timeout in seconds; ``None`` keeps the resource's own.
    """

    def __init__(
        self,
        resource: pyvisa.resources.Resource,
        name: str,
        *,
        read_termination: str = "\n",
        write_termination: str = "\n",
        timeout_s: float | None = None,
    ) -> None:
        if not isinstance(resource, pyvisa.resources.MessageBasedResource):
            raise TypeError(f"{name}: {resource!r} is not a message-based VISA resource")
        self.name = name
        self._resource = resource
        self._read_termination = read_termination
        self._read_terminator = read_termination.encode("ascii")
        resource.read_termination = read_termination
        resource.write_termination = write_termination
        self.encoding = "ascii"
        self.last_command: str | None = None
        if timeout_s is not None:
            self.timeout_s = timeout_s

    @property
    def resource(self) -> str:
        """The VISA resource string."""
        return str(self._resource.resource_name)

    @property
    def visa_resource(self) -> pyvisa.resources.MessageBasedResource:
        """The wrapped pyvisa resource (for the station and diagnostics; drivers never use it)."""
        return self._resource

    @property
    def timeout_s(self) -> float:
        """Read timeout in seconds (pyvisa keeps it in ms)."""
        timeout_ms = self._resource.timeout
        return float("inf") if timeout_ms is None else float(timeout_ms) / 1000.0

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._resource.timeout = float(value) * 1000.0

    def write(self, command: str) -> None:
        """Send ``command`` followed by the write terminator."""
        self.last_command = command
        log.debug("%s <- %r", self.name, command)
        try:
            self._resource.write(command)
        except pyvisa.errors.VisaIOError as exc:
            raise self._io_error(exc, command) from exc
        except pyvisa.errors.InvalidSession as exc:
            raise InstrumentIOError(self.name, "session is closed", command) from exc

    def read(self) -> str:
        """Read one line; a timeout raises :class:`~teststand.errors.InstrumentTimeout`."""
        command = self.last_command
        try:
            raw = self._resource.read_raw()
        except pyvisa.errors.VisaIOError as exc:
            raise self._io_error(exc, command) from exc
        except pyvisa.errors.InvalidSession as exc:
            raise InstrumentIOError(self.name, "session is closed", command) from exc
        reply = _decode_line(
            raw, self._read_terminator, self.encoding, instrument=self.name, command=command
        )
        log.debug("%s -> %r", self.name, reply)
        return reply

    def clear(self) -> None:
        """Device-clear the instrument if the VISA layer supports it, then drain stale input."""
        log.info("%s: clearing the link to resynchronise", self.name)
        try:
            self._resource.clear()
        except NotImplementedError:
            pass  # pyvisa-sim has no device clear; draining below does the job
        except pyvisa.errors.VisaIOError as exc:
            if exc.error_code != visa_constants.StatusCode.error_nonsupported_operation:
                raise self._io_error(exc, None) from exc
        self._drain()

    def close(self) -> None:
        """Close this resource (not the ResourceManager)."""
        self._resource.close()

    # -- private -------------------------------------------------------------------------------

    def _drain(self) -> None:
        saved_ms = self._resource.timeout
        self._resource.timeout = CLEAR_SETTLE_S * 1000.0
        try:
            # Bounded: an instrument that streams forever must not hang the resynchronisation.
            for _ in range(1000):
                try:
                    self._resource.read_raw()
                except pyvisa.errors.VisaIOError as exc:
                    if exc.error_code == visa_constants.StatusCode.error_timeout:
                        break
                    raise self._io_error(exc, None) from exc
        finally:
            self._resource.timeout = saved_ms

    def _read_exact(self, count: int) -> bytes:
        """Read up to ``count`` bytes, ignoring termination characters; fewer only on timeout."""
        out = bytearray()
        resource = self._resource
        with resource.ignore_warning(
            visa_constants.StatusCode.success_device_not_present,
            visa_constants.StatusCode.success_max_count_read,
        ):
            try:
                while len(out) < count:
                    chunk, _status = resource.visalib.read(resource.session, count - len(out))
                    out += chunk
            except pyvisa.errors.VisaIOError as exc:
                if exc.error_code != visa_constants.StatusCode.error_timeout:
                    raise self._io_error(exc, self.last_command) from exc
        return bytes(out)

    def _io_error(self, exc: pyvisa.errors.VisaIOError, command: str | None) -> Exception:
        if exc.error_code == visa_constants.StatusCode.error_timeout:
            return InstrumentTimeout(
                self.name, f"no complete reply within {self.timeout_s:g} s", command
            )
        return InstrumentIOError(self.name, f"VISA error: {exc.description}", command)


class SerialPort(Protocol):
    """The part of ``serial.Serial`` a :class:`SerialTransport` uses (fakes implement this)."""

    timeout: float | None

    @property
    def port(self) -> str | None:
        """The device path or URL the port is open on."""
        ...

    def write(self, data: bytes) -> int | None:
        """Send bytes."""
        ...

    def read(self, size: int = 1) -> bytes:
        """Read up to ``size`` bytes, fewer on timeout."""
        ...

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        """Read up to and including ``expected``, or what arrived before the timeout."""
        ...

    def reset_input_buffer(self) -> None:
        """Discard received bytes not yet read."""
        ...

    def close(self) -> None:
        """Close the port."""
        ...


#: Read timeout a serial link gets when the port it is handed would block forever.
DEFAULT_SERIAL_TIMEOUT_S = 2.0


class SerialTransport(_Queries):
    """A :class:`Transport` over an RS232 port (pyserial), e.g. the laser pulser's link.

    Args:
        port: an open ``serial.Serial`` (or anything implementing :class:`SerialPort`).
        name: the instrument's name in the stand.
        read_termination: end of every reply line.
        write_termination: appended to every command.
        encoding: text encoding of commands and replies.
        timeout_s: read timeout in seconds; ``None`` keeps the port's own, or sets
            :data:`DEFAULT_SERIAL_TIMEOUT_S` if the port would block forever.
    """

    def __init__(
        self,
        port: SerialPort,
        name: str,
        *,
        read_termination: str = "\n",
        write_termination: str = "\n",
        encoding: str = "ascii",
        timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self._port = port
        self._read_terminator = read_termination.encode(encoding)
        self._write_terminator = write_termination.encode(encoding)
        self.encoding = encoding
        self.last_command: str | None = None
        if timeout_s is not None:
            self.timeout_s = timeout_s
        elif port.timeout is None:
            # A read without a timeout would hang the whole stand on a silent instrument.
            self.timeout_s = DEFAULT_SERIAL_TIMEOUT_S

    @property
    def resource(self) -> str:
        """The serial port (device path or pyserial URL)."""
        return str(self._port.port or "")

    @property
    def timeout_s(self) -> float:
        """Read timeout in seconds."""
        timeout = self._port.timeout
        return float("inf") if timeout is None else float(timeout)

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self._port.timeout = float(value)

    def write(self, command: str) -> None:
        """Send ``command`` followed by the write terminator."""
        self.last_command = command
        log.debug("%s <- %r", self.name, command)
        data = command.encode(self.encoding) + self._write_terminator
        with self._port_errors():
            self._port.write(data)

    def read(self) -> str:
        """Read one line; an empty or unterminated read raises `InstrumentTimeout`."""
        command = self.last_command
        with self._port_errors():
            raw = self._port.read_until(self._read_terminator)
        if not raw.endswith(self._read_terminator):
            partial = f" (partial reply {raw[:80]!r})" if raw else ""
            raise InstrumentTimeout(
                self.name, f"no terminated reply within {self.timeout_s:g} s{partial}", command
            )
        reply = _decode_line(
            raw, self._read_terminator, self.encoding, instrument=self.name, command=command
        )
        log.debug("%s -> %r", self.name, reply)
        return reply

    def clear(self) -> None:
        """Discard buffered input, then whatever still arrives within a short settling time."""
        log.info("%s: clearing the link to resynchronise", self.name)
        saved = self._port.timeout
        with self._port_errors():
            self._port.reset_input_buffer()
            self._port.timeout = CLEAR_SETTLE_S
            try:
                for _ in range(1000):  # bounded, as for VISA
                    if not self._port.read(4096):
                        break
            finally:
                self._port.timeout = saved

    def close(self) -> None:
        """Close the port."""
        self._port.close()

    # -- private -------------------------------------------------------------------------------

    def _read_exact(self, count: int) -> bytes:
        out = bytearray()
        with self._port_errors():
            while len(out) < count:
                chunk = self._port.read(count - len(out))
                if not chunk:
                    break  # timed out
                out += chunk
        return bytes(out)

    @contextmanager
    def _port_errors(self) -> Iterator[None]:
        """Turn pyserial and OS errors into the typed instrument errors."""
        try:
            yield
        except serial.SerialTimeoutException as exc:
            raise InstrumentTimeout(
                self.name, f"write did not complete: {exc}", self.last_command
            ) from exc
        except (serial.SerialException, OSError) as exc:
            raise InstrumentIOError(
                self.name, f"serial port error: {exc}", self.last_command
            ) from exc
