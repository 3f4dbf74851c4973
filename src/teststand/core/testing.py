"""Scripted-exchange testing of drivers (PyMeasure's ``expected_protocol``).

A test lists every exchange a driver must have with its instrument, in order::

    with expected_protocol(
        LaserPulser,
        [("TUNE 12.5", None), ("TUNE?", "12.5")],
    ) as laser:
        laser.intensity = 12.5

Each exchange is ``(command, reply)``: ``command`` is what the driver must write (``None`` for a
read without a write), ``reply`` is the line it then reads (``None`` for no read; ``bytes`` for the
payload of a binary block; :data:`TIMEOUT` to make the read time out; an exception instance to
raise it). ``(CLEAR, None)`` scripts a resynchronisation (``transport.clear()``). An unexpected
command, a read nobody scripted and any exchange left over at the end fail the test.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

from ..errors import InstrumentTimeout
from ._instrument import Instrument


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Scripted as a command: the driver must call ``transport.clear()`` at this point.
CLEAR = _Sentinel("CLEAR")

#: Scripted as a reply: the read times out (``InstrumentTimeout``).
TIMEOUT = _Sentinel("TIMEOUT")

Exchange = tuple[Any, Any]


class ProtocolError(AssertionError):
    """The driver did not follow the scripted protocol."""


class ProtocolTransport:
    """A `~teststand.core.Transport` that plays a scripted list of exchanges.

    Attributes:
        log: everything the driver did, in order: ``("write", cmd)``, ``("read", reply)``,
            ``("clear", None)``, ``("close", None)``.
    """

    def __init__(
        self,
        exchanges: Sequence[Exchange],
        name: str = "fake",
        resource: str = "FAKE::INSTR",
        timeout_s: float = 1.0,
    ) -> None:
        self.name = name
        self.resource = resource
        self.timeout_s = timeout_s
        self._script: list[Exchange] = list(exchanges)
        self._pending: Any = None
        self._last_command: str | None = None
        self.log: list[tuple[str, Any]] = []
        self.closed = False
        self.failure: ProtocolError | None = None

    # -- Transport -------------------------------------------------------------------------------

    def write(self, command: str) -> None:
        """Check ``command`` against the script and queue its scripted reply."""
        self.log.append(("write", command))
        if self._pending is not None:
            self._fail(f"wrote {command!r} while the reply {self._pending!r} was still unread")
        expected, reply = self._next(f"write {command!r}")
        if expected != command:
            self._fail(f"wrote {command!r}, script expected {expected!r}")
        self._last_command = command
        self._pending = reply

    def read(self) -> str:
        """Return the scripted reply line (or raise the scripted error)."""
        reply = self._take_reply()
        if not isinstance(reply, str):
            self._fail(f"read a line, script has {reply!r}")
        self.log.append(("read", reply))
        return reply

    def query(self, command: str) -> str:
        """Write then read."""
        self.write(command)
        return self.read()

    def query_block(self, command: str) -> bytes:
        """Write, then return the scripted block payload (or raise the scripted error)."""
        self.write(command)
        reply = self._take_reply()
        if not isinstance(reply, bytes | bytearray):
            self._fail(f"read a block, script has {reply!r}")
        self.log.append(("read", reply))
        return bytes(reply)

    def clear(self) -> None:
        """Check that a resynchronisation is scripted here and drop any unread reply."""
        self.log.append(("clear", None))
        self._pending = None
        expected, _ = self._next("clear()")
        if expected is not CLEAR:
            self._fail(f"clear() called, script expected {expected!r}")

    def close(self) -> None:
        """Mark the transport closed."""
        self.log.append(("close", None))
        self.closed = True

    # -- checks ----------------------------------------------------------------------------------

    @property
    def remaining(self) -> list[Exchange]:
        """Exchanges not played yet."""
        return list(self._script)

    def assert_done(self) -> None:
        """Fail if the script has exchanges left or a reply was never read."""
        if self.failure is not None:
            raise self.failure
        if self._script:
            raise ProtocolError(f"{self.name}: scripted exchanges never played: {self._script!r}")
        if self._pending is not None:
            raise ProtocolError(f"{self.name}: reply {self._pending!r} was never read")

    # -- private ---------------------------------------------------------------------------------

    def _next(self, what: str) -> Exchange:
        if not self._script:
            self._fail(f"{what} after the end of the script")
        return self._script.pop(0)

    def _take_reply(self) -> Any:
        reply = self._pending
        self._pending = None
        if reply is None:
            # A read with no preceding write: the script must have a (None, reply) exchange.
            expected, reply = self._next("read")
            if expected is not None:
                self._fail(f"read without writing, script expected the command {expected!r}")
        if reply is TIMEOUT:
            raise InstrumentTimeout(self.name, "scripted timeout", self._last_command)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _fail(self, message: str) -> NoReturn:
        error = ProtocolError(f"{self.name}: {message}")
        if self.failure is None:
            self.failure = error
        raise error


InstrumentT = TypeVar("InstrumentT", bound=Instrument)


@contextmanager
def expected_protocol(
    driver: type[InstrumentT],
    exchanges: Sequence[Exchange],
    *,
    name: str = "fake",
    **driver_kwargs: Any,
) -> Iterator[InstrumentT]:
    """Yield ``driver`` on a `ProtocolTransport` playing ``exchanges``; fail on any leftover.

    The check runs when the block exits normally, and also when it exits on an exception if the
    driver broke the script (a `ProtocolError` must not be hidden by ``pytest.raises``).
    """
    transport = ProtocolTransport(exchanges, name=name)
    instrument = driver(transport, **driver_kwargs)
    try:
        yield instrument
    except BaseException:
        if transport.failure is not None:
            raise transport.failure from None
        raise
    transport.assert_done()
