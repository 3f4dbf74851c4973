"""Minimal fake instruments for engine tests: they record calls and hold state, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teststand.core.hits import empty_hits


@dataclass
class Identity:
    idn: str = "FAKE,0,0,0"
    manufacturer: str = "FAKE"
    model: str = "0"
    serial: str = "0"
    firmware: str = "0"


class FakeInstrument:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.safe = True

    def identify(self) -> Identity:
        return Identity()

    def settings(self) -> dict:
        return {}

    def safe_state(self) -> None:
        self.calls.append(("safe_state",))
        self.safe = True

    def is_safe(self) -> bool:
        return self.safe


class FakeLaser(FakeInstrument):
    def __init__(self) -> None:
        super().__init__()
        self._on = False
        self.intensity = 0.0
        self.fibre_channel = 0

    @property
    def output_enabled(self) -> bool:
        return self._on

    @output_enabled.setter
    def output_enabled(self, value: bool) -> None:
        self.calls.append(("output_enabled", value))
        self._on = bool(value)
        self.safe = not self._on

    def safe_state(self) -> None:
        super().safe_state()
        self._on = False


class FakeDac(FakeInstrument):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.codes_ = {"t1": np.full(n, 63), "t2": np.full(n, 63), "e": np.full(n, 63)}

    def set_codes(self, disc: str, codes: np.ndarray) -> None:
        self.calls.append(("set_codes", disc))
        self.codes_[disc] = np.asarray(codes).copy()
        self.safe = False

    def safe_state(self) -> None:
        super().safe_state()
        for v in self.codes_.values():
            v[:] = 63


class FakeReadout(FakeInstrument):
    """Gives one hit per trigger on channel 0; can fail after a number of acquisitions."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.n_acquisitions = 0
        self.fail_after = fail_after
        self._pending = empty_hits(0)
        self.acquiring = False

    def start_acquisition(self, n: int) -> None:
        if self.fail_after is not None and self.n_acquisitions >= self.fail_after:
            raise RuntimeError("readout fault")
        self.n_acquisitions += 1
        self.acquiring = True
        self.safe = False
        hits = empty_hits(n)
        hits["event"] = np.arange(n)
        hits["t1"] = 1.0
        self._pending = hits

    @property
    def acquisition_done(self) -> bool:
        return True

    def fetch_hits(self) -> np.ndarray:
        out, self._pending = self._pending, empty_hits(0)
        return out

    def iter_blocks(self, n, *, check=None):
        self.start_acquisition(n)
        if check is not None:
            check()
        block = self.fetch_hits()
        if block.size:
            yield block

    def stop_acquisition(self) -> None:
        self.acquiring = False

    def safe_state(self) -> None:
        super().safe_state()
        self.acquiring = False
