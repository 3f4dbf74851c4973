"""Threshold DAC: per-channel discriminator threshold codes (TOFHIR2 T1, T2 and E)."""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args, overload

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field, model_validator

from ..core import (
    Instrument,
    Transport,
    format_int_list,
    parse_float,
    parse_int,
    parse_int_list,
    strict_int_array,
    strict_int_range,
)
from ..errors import InstrumentError, RangeError
from ._spec import CheckContext, DriverOptions, DriverSpec, SelfCheck, SimTwin

log = logging.getLogger(__name__)

#: The discriminators whose thresholds the DAC sets: time T1, time T2, energy E.
Discriminator = Literal["t1", "t2", "e"]
DISCRIMINATORS: tuple[Discriminator, ...] = get_args(Discriminator)

#: Highest code of the TOFHIR2 6-bit threshold DACs (the default ``max_code``).
TOFHIR2_MAX_CODE = 63

#: Threshold step of the TOFHIR2 DACs in uA (the default ``lsb_uA``).
TOFHIR2_LSB_UA = 0.3125

#: Channels of one TOFHIR2 ASIC (the default ``n_channels``).
TOFHIR2_CHANNELS = 32


class DacOptions(DriverOptions):
    """``[instruments.dac] options``: the DAC's hardware facts, checked against it at connect."""

    max_code: int = Field(
        default=TOFHIR2_MAX_CODE, ge=1, le=65535, description="highest code (63: 6-bit TOFHIR2)"
    )
    safe_code: int | None = Field(
        default=None, ge=0, le=65535, description="code that stops triggering (default max_code)"
    )
    lsb_uA: float = Field(
        default=TOFHIR2_LSB_UA, gt=0, le=1000, description="threshold step per code, uA"
    )
    n_channels: int = Field(
        default=TOFHIR2_CHANNELS, ge=1, le=4096, description="channels per discriminator"
    )

    def facts(self) -> dict[str, Any]:
        """The facts, with the safe code resolved (``max_code`` unless given)."""
        facts = self.model_dump()
        if facts["safe_code"] is None:
            facts["safe_code"] = self.max_code
        return facts

    @model_validator(mode="after")
    def _safe_in_range(self) -> DacOptions:
        if self.safe_code is not None and self.safe_code > self.max_code:
            raise ValueError(f"safe_code {self.safe_code} is above max_code {self.max_code}")
        return self


def _code_array_spec(dac: ThresholdDac) -> tuple[int, int, int]:
    """Strict range of a code array: 0..max_code, one code per channel."""
    return 0, dac.max_code, dac.n_channels


def _parse_lsb(reply: str) -> float:
    lsb = parse_float(reply)
    if lsb <= 0:
        raise ValueError(f"LSB must be positive, got {lsb}")
    return lsb


def _codes_control(disc: str, what: str) -> Any:
    """The code array of one discriminator: one command carries every channel."""
    return Instrument.control(
        f"THR:{disc}?",
        f"THR:{disc} %s",
        f"""{disc} ({what}) codes of every channel: int array of length n_channels, each code
        strictly in the range 0..max_code (DAC codes; 63 by default).""",
        validator=strict_int_array,
        values=_code_array_spec,
        units="DAC codes",
        get_process=parse_int_list,
        set_process=format_int_list,
    )


class ThresholdDac(Instrument):
    """Discriminator thresholds as DAC codes, all channels of one discriminator per command.

    A threshold in uA above the channel's baseline is ``(code - baseline_code) * lsb_uA``; the
    baseline (in codes, not necessarily integer) comes from a threshold S-curve. A higher code is
    a higher threshold.

    Safe state: every code of every discriminator at ``safe_code`` (``max_code`` unless the
    stand says otherwise), so that nothing triggers. The self-test and the check at the start of
    every run confirm by measurement that it does.

    Args:
        transport: the link to the DAC.
        max_code: highest valid code (63 for the TOFHIR2 6-bit DACs; wider for an external DAC).
        safe_code: the code that stops triggering; ``None``: ``max_code``.
        lsb_uA: the threshold step the stand declares; :meth:`check_facts` compares it with the
            instrument's.
        n_channels: the channel count the stand declares; compared likewise.
    """

    n_channels = Instrument.measurement(
        "CONF:NCH?",
        """Number of channels per discriminator (int, read once from the instrument).""",
        get_process=parse_int,
        cached=True,
    )

    lsb_uA = Instrument.measurement(
        "THR:LSB?",
        """Threshold step per DAC code in uA (float > 0, read once from the instrument).""",
        units="uA",
        get_process=_parse_lsb,
        cached=True,
    )

    t1_codes = _codes_control("T1", "first timing threshold")
    t2_codes = _codes_control("T2", "second timing threshold")
    e_codes = _codes_control("E", "energy/QDC trigger threshold")

    def __init__(
        self,
        transport: Transport,
        *,
        max_code: int = TOFHIR2_MAX_CODE,
        safe_code: int | None = None,
        lsb_uA: float = TOFHIR2_LSB_UA,
        n_channels: int = TOFHIR2_CHANNELS,
    ) -> None:
        super().__init__(transport)
        if isinstance(max_code, bool) or not isinstance(max_code, int) or max_code < 1:
            raise ValueError(f"max_code must be a positive int, got {max_code!r}")
        safe = max_code if safe_code is None else safe_code
        if isinstance(safe, bool) or not isinstance(safe, int) or not 0 <= safe <= max_code:
            raise ValueError(f"safe_code must be an int in 0..{max_code}, got {safe_code!r}")
        self.max_code = max_code
        self.safe_code = safe
        self.declared_lsb_uA = float(lsb_uA)
        self.declared_channels = int(n_channels)

    def check_facts(self) -> None:
        """Refuse a DAC whose step or channel count is not what the stand file declares."""
        lsb, n = float(self.lsb_uA), int(self.n_channels)
        if not np.isclose(lsb, self.declared_lsb_uA, rtol=1e-9, atol=0.0):
            raise InstrumentError(
                self.name,
                f"the DAC's threshold step is {lsb:g} uA, the stand file declares "
                f"lsb_uA = {self.declared_lsb_uA:g}",
                "THR:LSB?",
            )
        if n != self.declared_channels:
            raise InstrumentError(
                self.name,
                f"the DAC has {n} channels, the stand file declares n_channels = "
                f"{self.declared_channels}",
                "CONF:NCH?",
            )

    # -- code arrays -----------------------------------------------------------------------------

    def codes(self, disc: Discriminator) -> np.ndarray:
        """Read back the codes of every channel of discriminator ``disc`` ('t1', 't2', 'e')."""
        return np.asarray(getattr(self, self._attribute(disc)))

    def set_codes(self, disc: Discriminator, codes: ArrayLike) -> None:
        """Set the codes of every channel of ``disc`` in one command (validated, read back)."""
        setattr(self, self._attribute(disc), codes)

    def set_code(self, disc: Discriminator, channel: int, code: int) -> None:
        """Set one channel's code of ``disc``, leaving the others as the instrument holds them."""
        attribute = self._attribute(disc)
        with self._lock:  # read-modify-write must not interleave with another writer
            channel = strict_int_range(
                channel, (0, self.n_channels - 1), instrument=self.name, what="channel"
            )
            code = strict_int_range(
                code, (0, self.max_code), instrument=self.name, what=f"{attribute}[{channel}]"
            )
            codes = self.codes(disc).copy()
            codes[channel] = code
            setattr(self, attribute, codes)

    # -- conversions -----------------------------------------------------------------------------

    @overload
    def code_to_uA(self, code: float, baseline_code: float) -> float: ...

    @overload
    def code_to_uA(self, code: ArrayLike, baseline_code: ArrayLike) -> np.ndarray: ...

    def code_to_uA(self, code: ArrayLike, baseline_code: ArrayLike) -> float | np.ndarray:
        """Threshold in uA above baseline: ``(code - baseline_code) * lsb_uA`` (element-wise)."""
        result = (np.asarray(code, dtype=float) - np.asarray(baseline_code, dtype=float)) * (
            self.lsb_uA
        )
        return float(result) if result.ndim == 0 else result

    @overload
    def uA_to_code(self, uA: float, baseline_code: float) -> int: ...

    @overload
    def uA_to_code(self, uA: ArrayLike, baseline_code: ArrayLike) -> np.ndarray: ...

    def uA_to_code(self, uA: ArrayLike, baseline_code: ArrayLike) -> int | np.ndarray:
        """Nearest code for a threshold ``uA`` above baseline (element-wise).

        Raises `RangeError` if a code falls outside 0..max_code: a threshold the DAC cannot
        set is refused rather than clipped.
        """
        exact = np.asarray(uA, dtype=float) / self.lsb_uA + np.asarray(baseline_code, dtype=float)
        if not np.all(np.isfinite(exact)):
            raise RangeError(self.name, f"threshold {uA!r} uA is not a finite number")
        code = np.rint(exact).astype(np.int64)
        bad = (code < 0) | (code > self.max_code)
        if np.any(bad):
            raise RangeError(
                self.name,
                f"threshold {uA!r} uA above baseline {baseline_code!r} needs code(s) "
                f"{code[bad] if code.ndim else code}, outside 0..{self.max_code}",
            )
        return int(code) if code.ndim == 0 else code

    # -- safety ----------------------------------------------------------------------------------

    def safe_state(self) -> None:
        """Every code of every discriminator at ``safe_code`` (read back): no channel triggers."""
        log.info("%s: every threshold at code %d (safe state)", self.name, self.safe_code)
        full = np.full(self.n_channels, self.safe_code, dtype=np.int64)
        with self._lock:
            for disc in DISCRIMINATORS:
                self.set_codes(disc, full)

    def is_safe(self) -> bool:
        """True when the instrument holds ``safe_code`` on every channel of every discriminator."""
        with self._lock:
            return all(bool(np.all(self.codes(disc) == self.safe_code)) for disc in DISCRIMINATORS)

    def unsafe_detail(self) -> str:
        """What is not safe, for the ``STAND NOT SAFE`` line (empty when safe)."""
        with self._lock:
            for disc in DISCRIMINATORS:
                codes = self.codes(disc)
                bad = np.flatnonzero(codes != self.safe_code)
                if bad.size:
                    return (
                        f"{disc} codes of channels {bad[:8].tolist()} are not the safe code "
                        f"{self.safe_code}"
                    )
        return ""

    def _attribute(self, disc: str) -> str:
        if disc not in DISCRIMINATORS:
            raise RangeError(
                self.name, f"discriminator {disc!r} is not one of {list(DISCRIMINATORS)}"
            )
        return f"{disc}_codes"


def _check_setting(dac: ThresholdDac, ctx: CheckContext) -> str:
    code = min(20, dac.max_code - 1)
    dac.set_code("t1", 0, code)
    if int(dac.codes("t1")[0]) != code:
        raise AssertionError(f"code {code} not read back")
    dac.safe_state()
    if not dac.is_safe():
        raise AssertionError(f"the safe code {dac.safe_code} was not read back")
    return f"code {code} set and read back on channel 0, every code back at {dac.safe_code}"


DRIVER = DriverSpec(
    cls=ThresholdDac,
    role="dac",
    models=("THRESHOLD-DAC",),
    options=DacOptions,
    twin=SimTwin("instruments.yaml", "dac", "TCPIP0::dac.sim::inst0::INSTR"),
    checks=(SelfCheck("set and read back", _check_setting),),
)
