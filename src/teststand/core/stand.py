"""What a plan needs to know about a stand, without connecting to it.

It sits in ``core`` because the station builds it from a stand file (and completes it from the
connected drivers) and the plans read it: both depend on it, it depends on neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StandInfo:
    """What a plan needs to know about a stand, without connecting to it.

    Attributes:
        name: the stand's name.
        readout_kind: ``"tofhir"`` or ``"hptdc"``.
        channels: the ``/channels`` table (structured array: channel, plane, bar, board, delay_ns).
        instruments: the instrument names present (``laser``, ``dac``, ``readout``).
        lsb_uA: the threshold DAC's step in uA, or ``None`` without a DAC.
        max_code: the threshold DAC's largest code, or ``None`` without a DAC.
        safe_code: the DAC code that stops triggering, or ``None`` without a DAC.
        dac_channels: the DAC's channel count (its code arrays' length), or ``None``.
        max_intensity_pct: the highest laser intensity the stand allows, %.
        max_rate_hz: the highest laser repetition rate the stand allows, Hz.
        fibre_outputs: the outputs of the laser's fibre switch.
        readout_channels: the readout's channel count.
        max_triggers: the most triggers one acquisition may ask for.

    The limits come from the stand file (each driver's options), so they are known before
    anything is connected; at connect the drivers confirm them against the instruments.
    """

    name: str
    readout_kind: str
    channels: np.ndarray
    instruments: tuple[str, ...]
    lsb_uA: float | None = None
    max_code: int | None = None
    safe_code: int | None = None
    dac_channels: int | None = None
    max_intensity_pct: float | None = None
    max_rate_hz: float | None = None
    fibre_outputs: int | None = None
    readout_channels: int | None = None
    max_triggers: int | None = None

    @property
    def n_channels(self) -> int:
        """Number of readout channels in the channel map."""
        return int(self.channels.size)

    @property
    def n_dac(self) -> int:
        """Length of the DAC's code arrays (the DAC may have more channels than are mapped)."""
        return int(self.dac_channels) if self.dac_channels else self.n_channels

    @property
    def bars(self) -> np.ndarray:
        """The distinct bar (TOFHIR) or pad (HPTDC) numbers, sorted."""
        return np.unique(self.channels["bar"])

    def off_codes(self) -> np.ndarray:
        """A DAC code array with every channel at the code that stops triggering."""
        if self.safe_code is None:
            raise ValueError(f"stand {self.name!r} has no threshold DAC")
        return np.full(self.n_dac, self.safe_code, dtype=np.int64)

    def channels_of_bar(self, bar: int) -> np.ndarray:
        """Channel numbers reading out ``bar`` (both ends of a TOFHIR bar; one pad per plane)."""
        return np.asarray(self.channels["channel"][self.channels["bar"] == bar], dtype=np.int64)
