"""Recipe parameters: one typed model per plan kind, strict, with units in every description.

Ranges stay ranges (``{start, stop, step}``), never expanded lists in the file; numbers are
finite (TOML's ``inf`` and ``nan`` are refused) and every list and range has a size cap, so a
typing mistake cannot make a run of a billion steps. Checks that need the stand (the DAC's code
range and step, the laser's limits) are in :mod:`._checks`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # inf and NaN are refused everywhere: TOML can write them, no scan parameter means them.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


#: The most points a range may have (each point is at least one step of the run).
MAX_RANGE_POINTS = 100_000

#: Deepest nesting of tables and arrays a recipe may have (the shipped ones need 3).
MAX_DEPTH = 16

#: What a recipe's name may look like: it becomes part of the run file's name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class FloatRange(_Strict):
    """An inclusive range ``start, start + step, ... <= stop`` (units as the key says)."""

    start: float = Field(description="first value")
    stop: float = Field(description="last value (included when on the grid)")
    step: float = Field(gt=0, description="increment, > 0")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop:g}) is below start ({self.start:g})")
        if (self.stop - self.start) / self.step > MAX_RANGE_POINTS:
            raise ValueError(f"more than {MAX_RANGE_POINTS} points")
        return self

    def values(self) -> list[float]:
        """The points of the range; ``stop`` is included when it lies on the grid."""
        n = int(math.floor((self.stop - self.start) / self.step + 1e-9)) + 1
        return [self.start + k * self.step for k in range(n)]


class IntRange(_Strict):
    """An inclusive integer range ``start, start + step, ... <= stop``."""

    start: int = Field(ge=0, le=2**31, description="first value")
    stop: int = Field(ge=0, le=2**31, description="last value (included when on the grid)")
    step: int = Field(default=1, gt=0, le=2**31, description="increment, > 0")

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) is below start ({self.start})")
        if (self.stop - self.start) // self.step >= MAX_RANGE_POINTS:
            raise ValueError(f"more than {MAX_RANGE_POINTS} points")
        return self

    def values(self) -> list[int]:
        """The points of the range, ``stop`` included when on the grid."""
        return list(range(self.start, self.stop + 1, self.step))


Percent = Annotated[float, Field(ge=0, le=100, json_schema_extra={"unit": "%"})]


class ThresholdScanParams(_Strict):
    """Per-channel S-curves of the T1 discriminator (laser off for noise, then laser on)."""

    codes: IntRange = Field(
        default=IntRange(start=0, stop=63), description="threshold codes scanned (DAC codes)"
    )
    n_triggers: int = Field(default=1000, ge=1, le=1_000_000, description="triggers per code")
    laser_modes: list[Literal["off", "on"]] = Field(
        default=["off", "on"],
        min_length=1,
        max_length=8,
        description="laser off (noise), on (signal)",
    )
    laser_intensity_pct: Percent = Field(default=30.0, description="laser tune with laser on, %")
    fibre_channel: int = Field(
        default=0, ge=0, le=16, description="fibre switch position (0 = all bars)"
    )


class AwcCalibrationParams(_Strict):
    """Dual-threshold amplitude-walk calibration: thr2 scans at several laser intensities."""

    bars: list[Annotated[int, Field(ge=0, le=32767)]] | Literal["all"] = Field(
        default="all",
        min_length=1,
        max_length=4096,
        description="bars lit in turn through the fibre switch",
    )
    intensities_pct: list[Percent] = Field(
        min_length=2,
        max_length=1000,
        description="laser intensities (tune, %), one scan of thr2 each",
    )
    thr1_uA: float = Field(
        default=6.0, gt=0, le=20, description="operating T1 threshold, uA above baseline"
    )
    thr2_uA: FloatRange = Field(description="T2 thresholds scanned, uA above baseline")
    n_pulses: int = Field(default=500, ge=10, le=1_000_000, description="laser pulses per step")
    baseline_codes: list[float] | None = Field(
        default=None,
        max_length=4096,
        description="per-channel baselines in DAC codes; measured at start if absent",
    )
    baseline_scan: IntRange = Field(
        default=IntRange(start=0, stop=63), description="codes of the baseline noise scan"
    )
    baseline_triggers: int = Field(
        default=400, ge=50, le=100_000, description="triggers per code of the baseline scan"
    )

    @model_validator(mode="after")
    def _thresholds(self) -> AwcCalibrationParams:
        if self.thr2_uA.start <= 0:
            raise ValueError("thr2_uA.start must be above the baseline (> 0 uA)")
        return self


class _OperatingPointParams(_Strict):
    """Every channel at the operating thresholds, all bars lit, a laser intensity scan."""

    intensities_pct: list[Percent] = Field(
        min_length=1, max_length=1000, description="laser intensities (tune, %)"
    )
    thr1_uA: float = Field(default=6.0, gt=0, le=20, description="operating T1 threshold, uA")
    thr2_uA: float = Field(default=10.0, gt=0, le=20, description="operating T2 threshold, uA")
    n_pulses: int = Field(default=5000, ge=10, le=10_000_000, description="laser pulses per step")
    fibre_channel: int = Field(default=0, ge=0, le=16, description="fibre switch (0 = all bars)")
    baseline_codes: list[float] | None = Field(
        default=None,
        max_length=4096,
        description="per-channel baselines in DAC codes; measured at start if absent",
    )
    baseline_scan: IntRange = Field(
        default=IntRange(start=0, stop=40), description="codes of the baseline noise scan"
    )
    baseline_triggers: int = Field(
        default=400, ge=50, le=100_000, description="triggers per code of the baseline scan"
    )

    @model_validator(mode="after")
    def _gap(self) -> _OperatingPointParams:
        if not self.thr2_uA > self.thr1_uA:
            raise ValueError(
                f"thr2_uA ({self.thr2_uA:g}) must be above thr1_uA ({self.thr1_uA:g}): the slope "
                "is taken between them"
            )
        return self


class AwcValidationParams(_OperatingPointParams):
    """Validation of AWC constants: operating thresholds, intensities spread over the range."""


class TimingAlignmentParams(_OperatingPointParams):
    """Channel offsets with the laser (TileCal method): operating thresholds, all bars lit."""


class TimingResolutionParams(_Strict):
    """Per-channel time resolution on the HPTDC bench: every pad column lit, fixed intensity."""

    intensities_pct: list[Percent] = Field(
        min_length=1, max_length=1000, description="laser intensities (tune, %), one step each"
    )
    n_pulses: int = Field(default=20000, ge=10, le=10_000_000, description="pulses per step")
    fibre_channel: int = Field(default=0, ge=0, le=16, description="fibre switch (0 = all pads)")


class HptdcTimewalkParams(_Strict):
    """Laser intensity scan on the HPTDC bench (time walk versus ToT)."""

    intensities_pct: FloatRange = Field(description="laser intensities scanned (tune, %)")
    n_pulses: int = Field(default=2000, ge=10, le=10_000_000, description="laser pulses per step")
    fibre_channel: int = Field(
        default=0, ge=0, le=16, description="fibre switch position (0 = all pads)"
    )

    @model_validator(mode="after")
    def _range(self) -> HptdcTimewalkParams:
        if self.intensities_pct.start < 0 or self.intensities_pct.stop > 100:
            raise ValueError("intensities_pct must lie within 0..100 %")
        return self
