"""What the TOFHIR2 and HPTDC readouts share: channel mask, acquisition control, hit blocks.

Acquisition protocol (both readouts):

* ``ACQ:COUNT n`` then ``ACQ:START`` arms an acquisition of ``n`` triggers; event numbers count
  from 0 at every start.
* ``ACQ:STATE?`` answers ``START`` while armed and ``STOP`` after ``ACQ:STOP``; it does not drop
  back by itself when the ``n`` triggers are in.
* ``ACQ:DONE?`` answers 1 once the ``n`` triggers have been taken.
* ``FETCH?`` answers a definite-length block with the hits collected since the previous fetch
  (possibly none), as packed ``HIT_DTYPE`` records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field

from ..core import (
    HIT_DTYPE,
    Instrument,
    Transport,
    parse_bool01,
    parse_int,
    strict_int_range,
)
from ..errors import AcquisitionTimeout, InstrumentError, RangeError, ReadbackMismatch
from ._spec import CheckContext, DriverOptions, SelfCheck

log = logging.getLogger(__name__)

#: Most triggers one acquisition may ask for.
MAX_TRIGGERS = 10_000_000

#: Channels of the simulated readouts and of one TOFHIR2 ASIC (the default ``n_channels``).
DEFAULT_CHANNELS = 32

#: An acquisition may take this many times its expected duration before it is given up.
DEADLINE_MARGIN = 2.0


class ReadoutOptions(DriverOptions):
    """``[instruments.readout] options``: the readout's facts and its acquisition deadline."""

    n_channels: int = Field(
        default=DEFAULT_CHANNELS, ge=1, le=64, description="readout channels (checked at connect)"
    )
    max_triggers: int = Field(
        default=MAX_TRIGGERS, ge=1, le=MAX_TRIGGERS, description="most triggers in one step"
    )
    min_trigger_rate_hz: float = Field(
        default=100.0, gt=0, le=1e9, description="slowest rate the triggers come at, Hz"
    )
    deadline_floor_s: float = Field(
        default=10.0, gt=0, le=86400, description="least time any acquisition is given, s"
    )


def _mask_range(readout: Readout) -> tuple[int, int]:
    return 0, (1 << readout.n_channels) - 1


class Readout(Instrument):
    """Base of the readout drivers: configuration common to both and the acquisition API.

    Safe state: acquisition stopped.

    Every acquisition has a deadline: ``deadline_floor_s + 2 x n_triggers /
    min_trigger_rate_hz``. A readout that does not report the triggers done by then fails the
    acquisition with :class:`~teststand.errors.AcquisitionTimeout`.

    Args:
        transport: the link to the readout.
        n_channels: the channel count the stand declares (:meth:`check_facts` compares).
        max_triggers: most triggers one acquisition may ask for on this stand.
        min_trigger_rate_hz: the slowest the triggers (laser pulses, random gates) come, Hz.
        deadline_floor_s: the least time any acquisition is given, s.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        n_channels: int = DEFAULT_CHANNELS,
        max_triggers: int = MAX_TRIGGERS,
        min_trigger_rate_hz: float = 100.0,
        deadline_floor_s: float = 10.0,
    ) -> None:
        super().__init__(transport)
        self.declared_channels = int(n_channels)
        self.max_triggers = int(max_triggers)
        self.min_trigger_rate_hz = float(min_trigger_rate_hz)
        self.deadline_floor_s = float(deadline_floor_s)

    def check_facts(self) -> None:
        """Refuse a readout whose channel count is not what the stand file declares."""
        n = int(self.n_channels)
        if n != self.declared_channels:
            raise InstrumentError(
                self.name,
                f"the readout has {n} channels, the stand file declares n_channels = "
                f"{self.declared_channels}",
                "CONF:NCH?",
            )

    def deadline_s(self, n_triggers: int) -> float:
        """How long an acquisition of ``n_triggers`` may take before it is given up, s."""
        return self.deadline_floor_s + DEADLINE_MARGIN * n_triggers / self.min_trigger_rate_hz

    n_channels = Instrument.measurement(
        "CONF:NCH?",
        """Number of readout channels (int, read once from the instrument).""",
        get_process=parse_int,
        cached=True,
    )

    channel_mask = Instrument.control(
        "CONF:MASK?",
        "CONF:MASK %d",
        """Enabled channels as a bit mask, bit k = channel k: int strictly in the range
        0..2**n_channels - 1 (unitless; all ones enables every channel).""",
        validator=strict_int_range,
        values=_mask_range,
        get_process=parse_int,
    )

    trigger_count = Instrument.control(
        "ACQ:COUNT?",
        "ACQ:COUNT %d",
        """Triggers in the next acquisition, int strictly in the range 1 to max_triggers
        (10000000 unless the stand allows fewer), triggers. Usually set through
        start_acquisition().""",
        validator=strict_int_range,
        values=lambda readout: (1, readout.max_triggers),
        units="triggers",
        get_process=parse_int,
        setting=False,
    )

    acquiring = Instrument.measurement(
        "ACQ:STATE?",
        """Whether an acquisition is armed (True from ACQ:START until ACQ:STOP); bool, read
        only.""",
        values={True: "START", False: "STOP"},
        map_values=True,
        setting=False,
    )

    acquisition_done = Instrument.measurement(
        "ACQ:DONE?",
        """Whether the triggers asked at start_acquisition() have all been taken; bool, read
        only.""",
        get_process=parse_bool01,
        setting=False,
    )

    def enabled_channels(self) -> np.ndarray:
        """The channel numbers enabled in `channel_mask`, ascending."""
        mask = self.channel_mask
        return np.array([k for k in range(self.n_channels) if mask >> k & 1], dtype=np.int64)

    def set_enabled_channels(self, channels: ArrayLike) -> None:
        """Enable exactly ``channels`` (channel numbers) and disable every other channel."""
        wanted = np.unique(np.asarray(channels))
        if wanted.size and (
            not np.issubdtype(wanted.dtype, np.integer)
            or wanted[0] < 0
            or wanted[-1] >= self.n_channels
        ):
            raise RangeError(
                self.name,
                f"channels {channels!r} must be integers in 0..{self.n_channels - 1}; "
                "nothing was sent",
            )
        self.channel_mask = sum(1 << int(k) for k in wanted)

    def start_acquisition(self, n_triggers: int) -> None:
        """Arm an acquisition of ``n_triggers`` triggers (``ACQ:COUNT n``, then ``ACQ:START``)."""
        with self._lock:
            self.trigger_count = n_triggers
            self.write("ACQ:START")
            if not self.acquiring:
                raise ReadbackMismatch(self.name, "acquisition did not start", "ACQ:START")
        log.debug("%s: acquisition of %d triggers started", self.name, n_triggers)

    def stop_acquisition(self) -> None:
        """Stop the acquisition (``ACQ:STOP``); hits not yet fetched may be lost."""
        with self._lock:
            self.write("ACQ:STOP")
            if self.acquiring:
                raise ReadbackMismatch(self.name, "acquisition did not stop", "ACQ:STOP")

    def fetch_hits(self) -> np.ndarray:
        """The hits collected since the previous fetch, as a writable ``HIT_DTYPE`` array."""
        command = "FETCH?"
        with self._lock:
            payload = self.query_block(command)
            if len(payload) % HIT_DTYPE.itemsize:
                raise self.reply_error(
                    f"hit block of {len(payload)} bytes is not a whole number of "
                    f"{HIT_DTYPE.itemsize}-byte hits",
                    command,
                )
            # bytearray: one copy that makes the array writable (the engine offsets events).
            hits = np.frombuffer(bytearray(payload), dtype=HIT_DTYPE)
            if hits.size and int(hits["channel"].max()) >= self.n_channels:
                raise self.reply_error(
                    f"hit block names channel {int(hits['channel'].max())} of a "
                    f"{self.n_channels}-channel readout",
                    command,
                )
        return hits

    def iter_blocks(
        self,
        n_triggers: int,
        *,
        check: Callable[[], None] | None = None,
        poll_s: float = 0.001,
    ) -> Iterator[np.ndarray]:
        """Take ``n_triggers`` triggers and yield the hits block by block as they arrive.

        ``check`` is called before every poll (the engine raises from it to abort). The
        acquisition is left armed; :meth:`stop_acquisition` or :meth:`safe_state` stops it.

        Raises:
            AcquisitionTimeout: the triggers were not all taken within :meth:`deadline_s`.
        """
        deadline = time.monotonic() + self.deadline_s(n_triggers)
        self.start_acquisition(n_triggers)
        while True:
            if check is not None:
                check()
            done = self.acquisition_done
            block = self.fetch_hits()
            if block.size:
                yield block
            elif done:
                return
            elif time.monotonic() > deadline:
                raise AcquisitionTimeout(
                    self.name,
                    f"{n_triggers} triggers not done after {self.deadline_s(n_triggers):.1f} s "
                    f"(deadline_floor_s {self.deadline_floor_s:g} + 2 x triggers / "
                    f"min_trigger_rate_hz {self.min_trigger_rate_hz:g})",
                    "ACQ:DONE?",
                )
            else:
                time.sleep(poll_s)

    def acquire(self, n_triggers: int) -> np.ndarray:
        """Take ``n_triggers`` triggers and return all their hits; the acquisition is stopped."""
        blocks = list(self.iter_blocks(n_triggers))
        self.stop_acquisition()
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=HIT_DTYPE)

    def safe_state(self) -> None:
        """Stop the acquisition (read back)."""
        log.info("%s: acquisition stopped (safe state)", self.name)
        self.stop_acquisition()

    def is_safe(self) -> bool:
        """True when the instrument reports no acquisition armed."""
        return not self.acquiring

    def unsafe_detail(self) -> str:
        """What is not safe (empty when safe)."""
        return "" if self.is_safe() else "the acquisition is still armed"


def _mapped_counts(hits: np.ndarray, ctx: CheckContext) -> np.ndarray:
    counts = np.bincount(
        hits["channel"].astype(np.int64), minlength=1 + int(ctx.channels["channel"].max())
    )
    return np.asarray(counts[ctx.channels["channel"].astype(np.int64)])


def check_safe_by_measurement(readout: Readout, ctx: CheckContext) -> str:
    """Every instrument in its safe state, then an acquisition: nothing may fire.

    The safe state is confirmed by read-back first; then the measurement shows it is also safe
    in fact (a "safe" threshold code below a channel's baseline still triggers on noise). With
    threshold DACs nothing may fire at all; a bench with fixed thresholds (HPTDC) keeps a small
    noise rate, at most 1 % of the gates per channel.
    """
    ctx.safe_all()
    unsafe = [role for role, inst in ctx.instruments.items() if not inst.is_safe()]
    if unsafe:
        raise AssertionError(f"not in the safe state after safe_state(): {', '.join(unsafe)}")
    n = ctx.n_triggers
    hits = readout.acquire(n)
    allowed = 0 if "dac" in ctx.instruments else int(0.01 * n)
    counts = _mapped_counts(hits, ctx)
    noisy = np.flatnonzero(counts > allowed)
    if noisy.size:
        channels = ctx.channels["channel"][noisy]
        raise AssertionError(
            f"channels {channels[:8].tolist()} fired {int(counts[noisy].max())} times in {n} "
            f"triggers in the safe state (at most {allowed} allowed): the safe state triggers"
        )
    return f"{hits.size} hits in {n} triggers in the safe state (at most {allowed} a channel)"


def _check_responding(readout: Readout, ctx: CheckContext) -> str:
    # The other roles' drivers, duck-typed: this module cannot import theirs.
    dac: Any = ctx.instruments.get("dac")
    laser: Any = ctx.instruments.get("laser")
    try:
        if dac is not None:
            # Code 0 is far below every baseline: every channel fires on noise at every trigger.
            dac.set_codes("t1", np.zeros(int(dac.n_channels), dtype=np.int64))
        elif laser is not None:
            laser.fibre_channel = 0
            laser.intensity = round(min(60.0, laser.max_intensity_pct), 1)
            laser.output_enabled = True
        hits = readout.acquire(ctx.n_triggers)
    finally:
        ctx.safe_all()
    counts = _mapped_counts(hits, ctx)
    silent = ctx.channels["channel"][counts == 0]
    if silent.size:
        raise AssertionError(f"channels {silent.tolist()} gave no hits")
    return f"every channel fired ({int(counts.min())}..{int(counts.max())} hits)"


#: The self-checks both readouts declare.
READOUT_CHECKS = (
    SelfCheck("safe state by measurement", check_safe_by_measurement),
    SelfCheck("responding acquisition", _check_responding),
)
