"""The simulated data plane of a readout: a Transport that serves hits from the physics model.

pyvisa-sim answers the readout's control plane (configuration, identity, acquisition state) but
cannot produce binary blocks. :class:`SimulatedReadoutLink` sits between the readout driver and
its pyvisa-sim transport: it forwards every command, watches the acquisition commands, and at
``ACQ:START`` reads the laser and the threshold DAC **through their drivers**, exactly as the
light and the thresholds would reach a real detector. It answers ``ACQ:DONE?`` and ``FETCH?``
itself, asking the model for the hits of the acquisition chunk by chunk as they are fetched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from ..core import HIT_DTYPE, Transport, decode_block, encode_block
from ..errors import InstrumentReplyError, InstrumentTimeout
from .physics import AcquisitionState

log = logging.getLogger(__name__)

__all__ = ["FaultKind", "HitModel", "SimulatedReadoutLink"]

FaultKind = Literal["timeout", "garbled"]


class HitModel(Protocol):
    """What the link needs from a physics model (:class:`~teststand.sim.physics.TofhirModel`,
    :class:`~teststand.sim.physics.HptdcModel`)."""

    @property
    def n_channels(self) -> int:
        """Number of channels (at most one hit per channel and trigger)."""
        ...

    def generate(self, n_triggers: int, state: AcquisitionState) -> NDArray[Any]:
        """One acquisition of ``n_triggers`` triggers as HIT_DTYPE, events from 0."""
        ...


@dataclass
class _Fault:
    kind: FaultKind
    command: str | None  # keyword to match (upper case), None = the next command of any kind
    remaining: int


class SimulatedReadoutLink:
    """A :class:`~teststand.core.Transport` for a simulated readout (TOFHIR2 or HPTDC).

    Control-plane commands go to ``control`` (the readout's pyvisa-sim transport). The link also
    acts on:

    * ``ACQ:COUNT <n>``: remembers the number of triggers of the next acquisition (forwarded);
    * ``ACQ:START [<n>]``: forwarded, then reads the instrument state through ``laser`` (output
      enabled, intensity, fibre channel) and ``dac`` (``codes('t1')``, ``codes('t2')``; ``None``
      for the HPTDC bench), and the channel mask (``mask_query``); this snapshot is the
      acquisition's state;
    * ``ACQ:STOP``: forwarded; the triggers that happened stay fetchable until the next start
      (with ``trigger_rate_hz``, the ones that had not happened yet never will);
    * ``ACQ:DONE?``: answered here, ``1`` once every trigger happened, else ``0`` (also before
      the first start);
    * ``FETCH?``: answered here with a definite-length block of at most ``max_block_hits``
      hits (HIT_DTYPE bytes, event numbers from 0 at the start), ending on an event boundary
      (when ``max_block_hits`` is at least the channel count); an empty block (``#10``) once
      every hit of the triggers so far was fetched. The model generates the hits in chunks of
      :attr:`events_per_chunk` triggers as they are fetched, so the same seed and the same
      commands give the same hits, however the fetches are spread in time.

    Args:
        control: the readout's control-plane transport.
        model: the physics model.
        laser: the laser driver (``output_enabled``, ``intensity``, ``fibre_channel``).
        dac: the threshold DAC driver (``codes(disc)``), or ``None`` for fixed thresholds.
        max_block_hits: largest number of hits in one ``FETCH?`` block.
        trigger_rate_hz: if given, an acquisition takes ``n / rate`` seconds of wall time:
            ``ACQ:DONE?`` answers ``0`` until then, and ``FETCH?`` serves only the events
            triggered so far. ``None``: complete at once.
        mask_query: the control-plane query of the readout's channel-enable mask (bit ``k`` =
            channel ``k``, channels from 32 up are always on), asked at every start: a masked
            channel gives no hits. ``None``: no mask.

    Faults for tests of the engine's safe state: :meth:`inject_fault`.
    """

    def __init__(
        self,
        control: Transport,
        model: HitModel,
        *,
        laser: Any,
        dac: Any = None,
        max_block_hits: int = 65536,
        trigger_rate_hz: float | None = None,
        mask_query: str | None = "CONF:MASK?",
    ) -> None:
        if max_block_hits < 1:
            raise ValueError(f"max_block_hits must be >= 1, got {max_block_hits}")
        if trigger_rate_hz is not None and not trigger_rate_hz > 0:
            raise ValueError(f"trigger_rate_hz must be positive, got {trigger_rate_hz}")
        self.control = control
        self.model = model
        self.laser = laser
        self.dac = dac
        self.max_block_hits = int(max_block_hits)
        self.trigger_rate_hz = trigger_rate_hz
        self.mask_query = mask_query
        self.last_command: str | None = None
        #: The state the last acquisition was generated from (for tests and diagnostics).
        self.last_state: AcquisitionState | None = None
        self._count = 0
        self._buffer = np.zeros(0, dtype=HIT_DTYPE)  # generated, not yet fetched
        self._generated = 0  # triggers generated so far
        self._enabled_channels: int | None = None
        self._n_triggers = 0
        self._started_at: float | None = None
        self._replies: deque[str | bytes] = deque()
        self._faults: list[_Fault] = []
        self._stalled = False
        self._lock = threading.RLock()

    # -- Transport attributes ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The readout's name in the stand (the control transport's)."""
        return self.control.name

    @property
    def resource(self) -> str:
        """The control transport's resource string."""
        return self.control.resource

    @property
    def timeout_s(self) -> float:
        """The control transport's read timeout, in seconds."""
        return self.control.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self.control.timeout_s = value

    # -- Transport methods ---------------------------------------------------------------------

    def write(self, command: str) -> None:
        """Send ``command``: data-plane queries are answered here, everything else forwarded."""
        with self._lock:
            self.last_command = command
            keyword, arg = _split(command)
            fault = self._take_fault(keyword)
            if fault == "timeout":
                raise InstrumentTimeout(self.name, "no reply (simulated timeout)", command)
            if keyword == "ACQ:DONE?":
                self._replies.append("1" if self._done() else "0")
            elif keyword == "FETCH?":
                self._replies.append(self._next_block())
            else:
                self.control.write(command)
                if keyword == "ACQ:COUNT":
                    self._count = self._parse_count(arg, command)
                elif keyword == "ACQ:START":
                    self._start(self._parse_count(arg, command) if arg else self._count)
                elif keyword == "ACQ:STOP":
                    self._stop()
            if fault == "garbled":
                self._garble(command)

    def read(self) -> str:
        """Read one reply line (a local reply first, else from the control transport)."""
        with self._lock:
            if not self._replies:
                return self.control.read()
            reply = self._replies.popleft()
            if isinstance(reply, bytes):
                raise InstrumentReplyError(
                    self.name,
                    "a binary block arrived where a text line was expected",
                    self.last_command,
                )
            return reply

    def query(self, command: str) -> str:
        """Write ``command`` and read one reply line."""
        with self._lock:
            keyword, _ = _split(command)
            if keyword in _LOCAL_QUERIES or self._faults:
                self.write(command)
                return self.read()
            self.last_command = command
            return self.control.query(command)

    def query_block(self, command: str) -> bytes:
        """Write ``command`` and read a definite-length block; return its payload."""
        with self._lock:
            if _split(command)[0] not in _LOCAL_QUERIES and not self._faults:
                self.last_command = command
                return self.control.query_block(command)
            self.write(command)
            if not self._replies:
                raise InstrumentTimeout(self.name, "no block arrived within the timeout", command)
            reply = self._replies.popleft()
            raw = reply.encode("ascii") if isinstance(reply, str) else reply
            return decode_block(raw, instrument=self.name, command=command)

    def clear(self) -> None:
        """Drop pending replies here and clear the control transport."""
        with self._lock:
            self._replies.clear()
            self.control.clear()

    def close(self) -> None:
        """Close the control transport."""
        self.control.close()

    # -- faults --------------------------------------------------------------------------------

    def inject_fault(
        self, kind: FaultKind, command: str | None = "FETCH?", *, count: int = 1
    ) -> None:
        """Make the next ``count`` matching commands fail.

        Args:
            kind: ``"timeout"``: the command raises
                :class:`~teststand.errors.InstrumentTimeout` and is not executed (it never
                reached the instrument). ``"garbled"``: the command is executed but its reply is
                corrupted: a text reply becomes unparseable, a ``FETCH?`` block announces more
                bytes than it carries (its hits are lost, as on a real link).
            command: the command keyword to match (``"FETCH?"``, ``"ACQ:DONE?"``,
                ``"ACQ:START"``...), case-insensitive; ``None`` matches any command.
            count: how many matching commands fail.
        """
        if kind not in ("timeout", "garbled"):
            raise ValueError(f"unknown fault kind {kind!r}; expected 'timeout' or 'garbled'")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        keyword = None if command is None else _split(command)[0]
        with self._lock:
            self._faults.append(_Fault(kind, keyword, int(count)))

    def clear_faults(self) -> None:
        """Forget every fault not yet triggered (and end a stall)."""
        with self._lock:
            self._faults.clear()
            self._stalled = False

    def stall(self) -> None:
        """From the next acquisition on, no trigger ever arrives: never done, nothing to fetch.

        What a readout that lost its trigger (or its clock) looks like to the driver.
        """
        with self._lock:
            self._stalled = True

    # -- private -------------------------------------------------------------------------------

    def _take_fault(self, keyword: str) -> FaultKind | None:
        for fault in self._faults:
            if fault.command is None or fault.command == keyword:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                log.info("%s: injecting a %s fault on %s", self.name, fault.kind, keyword)
                return fault.kind
        return None

    def _garble(self, command: str) -> None:
        if self._replies:
            reply = self._replies.pop()
            if isinstance(reply, bytes):
                # The header announces the payload plus 7 bytes that never arrive.
                payload = decode_block(reply, instrument=self.name, command=command)
                size = str(len(payload) + 7).encode("ascii")
                self._replies.append(b"#" + str(len(size)).encode("ascii") + size + payload)
            else:
                self._replies.append("\x15" + reply[::-1] + "?#")
        else:
            # A command with a control-plane reply: swallow the real one and queue junk.
            keyword, _ = _split(command)
            if keyword.endswith("?"):
                self.control.read()
                self._replies.append("\x15#garbled?")

    def _parse_count(self, arg: str, command: str) -> int:
        try:
            count = int(arg)
        except ValueError:
            raise InstrumentReplyError(
                self.name, f"trigger count {arg!r} is not an integer", command
            ) from None
        if count < 0:
            raise InstrumentReplyError(self.name, f"negative trigger count {count}", command)
        return count

    def _instrument_state(self) -> AcquisitionState:
        """What the laser and the DAC hold now, asked through their drivers."""
        laser_on = bool(self.laser.output_enabled)
        intensity = float(self.laser.intensity)
        fibre = int(self.laser.fibre_channel)
        t1 = t2 = None
        if self.dac is not None:
            t1 = np.asarray(self.dac.codes("t1"))
            t2 = np.asarray(self.dac.codes("t2"))
        return AcquisitionState(
            laser_on=laser_on,
            intensity_pct=intensity,
            fibre_channel=fibre,
            t1_codes=t1,
            t2_codes=t2,
        )

    def _start(self, n_triggers: int) -> None:
        self.last_state = self._instrument_state()
        self._enabled_channels = self._channel_mask()
        self._buffer = np.zeros(0, dtype=HIT_DTYPE)
        self._generated = 0
        self._n_triggers = n_triggers
        self._started_at = time.monotonic()

    def _channel_mask(self) -> int | None:
        if self.mask_query is None:
            return None
        reply = self.control.query(self.mask_query).strip()
        try:
            return int(reply)
        except ValueError:
            raise InstrumentReplyError(
                self.name, f"channel mask reply {reply!r} is not an integer", self.mask_query
            ) from None

    def _masked(self, hits: NDArray[Any]) -> NDArray[Any]:
        if self._enabled_channels is None:
            return hits
        channel = hits["channel"]
        bit = (
            np.uint64(self._enabled_channels) >> np.minimum(channel, 63).astype(np.uint64)
        ) & np.uint64(1)
        kept: NDArray[Any] = hits[(channel >= 32) | (bit == 1)]
        return kept

    def _stop(self) -> None:
        if self._started_at is not None and not self._done():
            # Stopped early: the events not yet triggered never happen.
            self._n_triggers = self._events_so_far()

    def _events_so_far(self) -> int:
        if self._stalled:
            return 0
        if self._started_at is None or self.trigger_rate_hz is None:
            return self._n_triggers
        elapsed = time.monotonic() - self._started_at
        return min(self._n_triggers, int(elapsed * self.trigger_rate_hz))

    def _done(self) -> bool:
        return self._started_at is not None and self._events_so_far() >= self._n_triggers

    @property
    def events_per_chunk(self) -> int:
        """Triggers the model generates at a time: a chunk never exceeds one block."""
        return max(1, self.max_block_hits // max(1, int(self.model.n_channels)))

    def _next_block(self) -> bytes:
        """The next hits of the events triggered so far, at most ``max_block_hits``.

        Hits are generated lazily in chunks of :attr:`events_per_chunk` triggers, so that a long
        acquisition never sits in memory and the hits do not depend on when FETCH? is asked.
        """
        happened = self._events_so_far()
        parts: list[NDArray[Any]] = []
        budget = self.max_block_hits
        while True:
            buffer = self._buffer
            ready = int(np.searchsorted(buffer["event"], happened)) if buffer.size else 0
            take = min(ready, budget)
            full = take < ready
            if full:
                # End the block on an event boundary, unless one event alone is too big.
                cut = int(np.searchsorted(buffer["event"], buffer["event"][take]))
                if cut > 0 or parts:
                    take = cut
            if take:
                parts.append(buffer[:take])
                self._buffer = buffer[take:]
                budget -= take
            if full or budget == 0 or self._generated >= happened:
                break
            self._buffer = np.concatenate([self._buffer, self._generate_chunk()])
        block = np.concatenate(parts) if parts else np.zeros(0, dtype=HIT_DTYPE)
        return encode_block(np.ascontiguousarray(block).tobytes())

    def _generate_chunk(self) -> NDArray[Any]:
        assert self.last_state is not None
        n = min(self.events_per_chunk, self._n_triggers - self._generated)
        t = time.perf_counter()
        hits = self._masked(self.model.generate(n, self.last_state))
        hits["event"] += np.uint64(self._generated)
        log.debug(
            "%s: %d triggers -> %d hits in %.2f ms",
            self.name,
            n,
            hits.size,
            1e3 * (time.perf_counter() - t),
        )
        self._generated += n
        return hits


#: Data-plane queries the link answers itself.
_LOCAL_QUERIES = frozenset({"ACQ:DONE?", "FETCH?"})


def _split(command: str) -> tuple[str, str]:
    """``"acq:count 500"`` -> ``("ACQ:COUNT", "500")``."""
    keyword, _, arg = command.strip().partition(" ")
    return keyword.upper(), arg.strip()
