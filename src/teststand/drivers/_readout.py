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

import numpy as np
from numpy.typing import ArrayLike

from ..core import (
    HIT_DTYPE,
    Instrument,
    parse_bool01,
    parse_int,
    strict_int_range,
)
from ..errors import RangeError, ReadbackMismatch

log = logging.getLogger(__name__)

#: Most triggers one acquisition may ask for.
MAX_TRIGGERS = 10_000_000


def _mask_range(readout: Readout) -> tuple[int, int]:
    return 0, (1 << readout.n_channels) - 1


class Readout(Instrument):
    """Base of the readout drivers: configuration common to both and the acquisition API.

    Safe state: acquisition stopped.
    """

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
        """Triggers in the next acquisition, int strictly from 1 to 10000000 (triggers).
        Usually set through start_acquisition().""",
        validator=strict_int_range,
        values=(1, MAX_TRIGGERS),
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
        """
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
