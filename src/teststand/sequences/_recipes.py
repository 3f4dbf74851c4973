"""Recipes: TOML files validated into typed models before any instrument is touched.

A recipe names a plan ``kind`` from the explicit :data:`REGISTRY` and gives that plan's
parameters. Ranges stay ranges (start/stop/step), never expanded lists in the file. Nothing in a
recipe is ever evaluated. Every error names the file, the key and what was expected, in one line.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..core.stand import StandInfo
from ..errors import RecipeError, describe_validation_error
from ._messages import Plan
from ._plans import (
    awc_calibration,
    hptdc_timewalk,
    operating_point_scan,
    threshold_scan,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FloatRange(_Strict):
    """An inclusive range ``start, start + step, ... <= stop`` (units as the key says)."""

    start: float = Field(description="first value")
    stop: float = Field(description="last value (included when on the grid)")
    step: float = Field(gt=0, description="increment, > 0")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop:g}) is below start ({self.start:g})")
        if (self.stop - self.start) / self.step > 100_000:
            raise ValueError("more than 100000 points")
        return self

    def values(self) -> list[float]:
        """The points of the range; ``stop`` is included when it lies on the grid."""
        n = int(math.floor((self.stop - self.start) / self.step + 1e-9)) + 1
        return [self.start + k * self.step for k in range(n)]


class IntRange(_Strict):
    """An inclusive integer range ``start, start + step, ... <= stop``."""

    start: int = Field(ge=0, description="first value")
    stop: int = Field(ge=0, description="last value (included when on the grid)")
    step: int = Field(default=1, gt=0, description="increment, > 0")

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop}) is below start ({self.start})")
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
        default=["off", "on"], min_length=1, description="laser off (noise), on (signal)"
    )
    laser_intensity_pct: Percent = Field(default=30.0, description="laser tune with laser on, %")
    fibre_channel: int = Field(
        default=0, ge=0, le=16, description="fibre switch position (0 = all bars)"
    )


class AwcCalibrationParams(_Strict):
    """Dual-threshold amplitude-walk calibration: thr2 scans at several laser intensities."""

    bars: list[Annotated[int, Field(ge=0)]] | Literal["all"] = Field(
        default="all", description="bars lit in turn through the fibre switch"
    )
    intensities_pct: list[Percent] = Field(
        min_length=2, description="laser intensities (tune, %), one scan of thr2 each"
    )
    thr1_uA: float = Field(
        default=6.0, gt=0, le=20, description="operating T1 threshold, uA above baseline"
    )
    thr2_uA: FloatRange = Field(description="T2 thresholds scanned, uA above baseline")
    n_pulses: int = Field(default=500, ge=10, le=1_000_000, description="laser pulses per step")
    baseline_codes: list[float] | None = Field(
        default=None, description="per-channel baselines in DAC codes; measured at start if absent"
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

    intensities_pct: list[Percent] = Field(min_length=1, description="laser intensities (tune, %)")
    thr1_uA: float = Field(default=6.0, gt=0, le=20, description="operating T1 threshold, uA")
    thr2_uA: float = Field(default=10.0, gt=0, le=20, description="operating T2 threshold, uA")
    n_pulses: int = Field(default=5000, ge=10, le=10_000_000, description="laser pulses per step")
    fibre_channel: int = Field(default=0, ge=0, le=16, description="fibre switch (0 = all bars)")
    baseline_codes: list[float] | None = Field(
        default=None, description="per-channel baselines in DAC codes; measured at start if absent"
    )
    baseline_scan: IntRange = Field(
        default=IntRange(start=0, stop=40), description="codes of the baseline noise scan"
    )
    baseline_triggers: int = Field(
        default=400, ge=50, le=100_000, description="triggers per code of the baseline scan"
    )


class AwcValidationParams(_OperatingPointParams):
    """Validation of AWC constants: operating thresholds, intensities spread over the range."""


class TimingAlignmentParams(_OperatingPointParams):
    """Channel offsets with the laser (TileCal method): operating thresholds, all bars lit."""


class TimingResolutionParams(_Strict):
    """Per-channel time resolution on the HPTDC bench: every pad column lit, fixed intensity."""

    intensities_pct: list[Percent] = Field(
        min_length=1, description="laser intensities (tune, %), one step each"
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


@dataclass(frozen=True)
class PlanEntry:
    """One registry row: the parameter model and the function that builds the plan."""

    params: type[_Strict]
    build: Callable[[StandInfo, Any], Plan]
    readout_kind: str
    analysis: str  # the default analysis method of runs of this kind
    summary: str


def _build_threshold_scan(stand: StandInfo, p: ThresholdScanParams) -> Plan:
    return threshold_scan(
        stand,
        codes=p.codes.values(),
        n_triggers=p.n_triggers,
        laser_modes=p.laser_modes,
        laser_intensity_pct=p.laser_intensity_pct,
        fibre_channel=p.fibre_channel,
    )


def _build_awc(stand: StandInfo, p: AwcCalibrationParams) -> Plan:
    bars = [int(b) for b in stand.bars] if p.bars == "all" else list(p.bars)
    missing = sorted(set(bars) - {int(b) for b in stand.bars})
    if missing:
        raise RecipeError(f"parameters.bars: bars {missing} are not in stand {stand.name!r}")
    if p.baseline_codes is not None and len(p.baseline_codes) != stand.n_channels:
        raise RecipeError(
            f"parameters.baseline_codes: expected {stand.n_channels} values (one per channel), "
            f"got {len(p.baseline_codes)}"
        )
    return awc_calibration(
        stand,
        bars=bars,
        intensities_pct=p.intensities_pct,
        thr1_uA=p.thr1_uA,
        thr2_uA=p.thr2_uA.values(),
        n_pulses=p.n_pulses,
        baseline_codes=p.baseline_codes,
        baseline_scan_codes=p.baseline_scan.values(),
        baseline_scan_triggers=p.baseline_triggers,
    )


def _build_operating_point(stand: StandInfo, p: _OperatingPointParams) -> Plan:
    if p.baseline_codes is not None and len(p.baseline_codes) != stand.n_channels:
        raise RecipeError(
            f"parameters.baseline_codes: expected {stand.n_channels} values (one per channel), "
            f"got {len(p.baseline_codes)}"
        )
    return operating_point_scan(
        stand,
        intensities_pct=p.intensities_pct,
        thr1_uA=p.thr1_uA,
        thr2_uA=p.thr2_uA,
        n_pulses=p.n_pulses,
        fibre_channel=p.fibre_channel,
        baseline_codes=p.baseline_codes,
        baseline_scan_codes=p.baseline_scan.values(),
        baseline_scan_triggers=p.baseline_triggers,
    )


def _build_timing_resolution(stand: StandInfo, p: TimingResolutionParams) -> Plan:
    return hptdc_timewalk(
        stand, intensities_pct=p.intensities_pct, n_pulses=p.n_pulses, fibre_channel=p.fibre_channel
    )


def _build_hptdc_timewalk(stand: StandInfo, p: HptdcTimewalkParams) -> Plan:
    return hptdc_timewalk(
        stand,
        intensities_pct=p.intensities_pct.values(),
        n_pulses=p.n_pulses,
        fibre_channel=p.fibre_channel,
    )


#: The explicit registry from a recipe's ``kind`` to its plan.
REGISTRY: dict[str, PlanEntry] = {
    "threshold_scan": PlanEntry(
        ThresholdScanParams, _build_threshold_scan, "tofhir", "scurve", "per-channel S-curves"
    ),
    "awc_calibration": PlanEntry(
        AwcCalibrationParams, _build_awc, "tofhir", "awc", "dual-threshold amplitude walk"
    ),
    "hptdc_timewalk": PlanEntry(
        HptdcTimewalkParams, _build_hptdc_timewalk, "hptdc", "timewalk", "HPTDC time walk vs ToT"
    ),
    "awc_validation": PlanEntry(
        AwcValidationParams,
        _build_operating_point,
        "tofhir",
        "awc_validation",
        "residual walk after the AWC correction",
    ),
    "timing_alignment": PlanEntry(
        TimingAlignmentParams, _build_operating_point, "tofhir", "offsets", "channel offsets"
    ),
    "timing_resolution": PlanEntry(
        TimingResolutionParams,
        _build_timing_resolution,
        "hptdc",
        "resolution",
        "per-channel time resolution",
    ),
}


class Recipe(BaseModel):
    """A validated recipe: its name, kind, parameters and the text it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    name: str
    kind: str
    description: str
    params: Any
    text: str
    path: str

    @property
    def entry(self) -> PlanEntry:
        """The registry row of this recipe's kind."""
        return REGISTRY[self.kind]

    def build_plan(self, stand: StandInfo) -> Plan:
        """The plan for ``stand``; raises :class:`RecipeError` if the stand cannot run it."""
        if stand.readout_kind != self.entry.readout_kind:
            raise RecipeError(
                f"{self.path}: kind {self.kind!r} needs a {self.entry.readout_kind.upper()} stand, "
                f"but stand {stand.name!r} reads out with {stand.readout_kind.upper()}"
            )
        try:
            return self.entry.build(stand, self.params)
        except RecipeError as exc:
            raise RecipeError(f"{self.path}: {exc}") from None

    def with_baselines(self, codes: list[float], source: str) -> Recipe:
        """A copy whose plan sets thresholds from ``codes`` (DAC codes per channel).

        Only for recipes that take ``baseline_codes`` and do not give them already; the others
        are returned unchanged. ``source`` says where the codes come from (recorded in the text).
        """
        fields = type(self.params).model_fields
        if "baseline_codes" not in fields or self.params.baseline_codes is not None:
            return self
        params = self.params.model_copy(update={"baseline_codes": [float(c) for c in codes]})
        text = self.text.rstrip("\n") + f"\n# baseline_codes taken from {source}\n"
        return self.model_copy(update={"params": params, "text": text})

    def settings(self) -> dict[str, Any]:
        """The validated parameters as plain data (for the settings checksum)."""
        return {"kind": self.kind, "params": self.params.model_dump(mode="json")}


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped with the package."""
    folder = resources.files("teststand.sequences") / "recipes"
    return {
        Path(str(entry)).stem: Path(str(entry))
        for entry in folder.iterdir()
        if str(entry).endswith(".toml")
    }


def resolve_recipe(spec: str) -> Path:
    """A shipped recipe's name or a path -> the path of the TOML file."""
    shipped = shipped_recipes()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if path.suffix != ".toml" and not path.exists():
        names = ", ".join(sorted(shipped))
        raise RecipeError(
            f"{spec}: no such recipe file and no shipped recipe of that name ({names})"
        )
    return path


def load_recipe(spec: str) -> Recipe:
    """Read and validate a recipe (a shipped name or a path). Raises :class:`RecipeError`."""
    path = resolve_recipe(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, str(path))


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Validate recipe TOML ``text``; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    allowed = {"name", "kind", "description", "parameters"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise RecipeError(
            f"{path}: {extra[0]}: unknown key (expected {', '.join(sorted(allowed))})"
        )
    kind = data.get("kind")
    if kind is None:
        raise RecipeError(f"{path}: kind: missing (required; one of {', '.join(REGISTRY)})")
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise RecipeError(f"{path}: kind: expected one of {', '.join(REGISTRY)}, got {kind!r}")
    name = data.get("name", Path(path).stem)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{path}: name: expected a non-empty string, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{path}: description: expected a string, got {description!r}")
    params_data = data.get("parameters", {})
    if not isinstance(params_data, dict):
        raise RecipeError(f"{path}: parameters: expected a table, got {params_data!r}")
    try:
        params = REGISTRY[kind].params.model_validate(params_data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecipeError(f"{path}: {describe_validation_error(first, 'parameters')}") from None
    return Recipe(
        name=name, kind=kind, description=description, params=params, text=text, path=path
    )
