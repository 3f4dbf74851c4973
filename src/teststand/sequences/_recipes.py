"""Recipes: TOML files validated into typed models before any instrument is touched.

A recipe names a plan ``kind`` from the explicit :data:`REGISTRY` and gives that plan's
parameters. Ranges stay ranges (start/stop/step), never expanded lists in the file. Nothing in a
recipe is ever evaluated. Every error names the file, the key and what was expected, in one line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.stand import StandInfo
from ..errors import RecipeError, describe_validation_error
from . import _checks as checks
from ._messages import Plan
from ._params import (
    MAX_DEPTH,
    NAME_PATTERN,
    AwcCalibrationParams,
    AwcValidationParams,
    HptdcTimewalkParams,
    ThresholdScanParams,
    TimingAlignmentParams,
    TimingResolutionParams,
    _OperatingPointParams,
    _Strict,
)
from ._plans import (
    awc_calibration,
    hptdc_timewalk,
    operating_point_scan,
    threshold_scan,
)
from ._preflight import PlanRejected, PlanSummary, check_plan


@dataclass(frozen=True)
class PlanEntry:
    """One registry row: the parameter model and the function that builds the plan."""

    params: type[_Strict]
    build: Callable[[StandInfo, Any], Plan]
    readout_kind: str
    analysis: str  # the default analysis method of runs of this kind
    summary: str
    # the parameters against the stand; returns the baseline code the dry run assumes
    check: Callable[[StandInfo, Any], float | None]


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
        ThresholdScanParams,
        _build_threshold_scan,
        "tofhir",
        "scurve",
        "per-channel S-curves",
        checks.check_threshold_scan,
    ),
    "awc_calibration": PlanEntry(
        AwcCalibrationParams,
        _build_awc,
        "tofhir",
        "awc",
        "dual-threshold amplitude walk",
        checks.check_awc,
    ),
    "hptdc_timewalk": PlanEntry(
        HptdcTimewalkParams,
        _build_hptdc_timewalk,
        "hptdc",
        "timewalk",
        "HPTDC time walk vs ToT",
        checks.check_hptdc_timewalk,
    ),
    "awc_validation": PlanEntry(
        AwcValidationParams,
        _build_operating_point,
        "tofhir",
        "awc_validation",
        "residual walk after the AWC correction",
        checks.check_operating_point,
    ),
    "timing_alignment": PlanEntry(
        TimingAlignmentParams,
        _build_operating_point,
        "tofhir",
        "offsets",
        "channel offsets",
        checks.check_operating_point,
    ),
    "timing_resolution": PlanEntry(
        TimingResolutionParams,
        _build_timing_resolution,
        "hptdc",
        "resolution",
        "per-channel time resolution",
        checks.check_timing_resolution,
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

    def preflight(self, stand: StandInfo) -> PlanSummary:
        """Check the recipe against ``stand``'s declared limits, with no instrument touched.

        The parameters are checked by the kind's own check (which can name the key), then the
        plan's messages are listed and checked one by one (:func:`~._preflight.check_plan`).

        Raises:
            RecipeError: one line naming this recipe's file, the key and the limit.
        """
        plan = self.build_plan(stand)
        try:
            baseline = self.entry.check(stand, self.params)
            return check_plan(plan, stand, baseline_code=baseline)
        except PlanRejected as exc:
            raise RecipeError(f"{self.path}: {exc}") from None
        finally:
            plan.close()

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
    if "\x00" in spec or len(spec) > 4096:
        raise RecipeError(f"{spec[:80]!r}: not a usable recipe file name")
    path = Path(spec)
    try:
        exists = path.exists()
    except OSError as exc:
        raise RecipeError(f"{spec[:200]}: cannot use as a recipe file ({exc.strerror})") from None
    if path.suffix != ".toml" and not exists:
        names = ", ".join(sorted(shipped))
        raise RecipeError(
            f"{spec}: no such recipe file and no shipped recipe of that name ({names})"
        )
    return path


#: Largest recipe file read (the shipped ones are about 1 kB).
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(spec: str) -> Recipe:
    """Read and validate a recipe (a shipped name or a path). Raises :class:`RecipeError`."""
    path = resolve_recipe(spec)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise RecipeError(f"{path}: is a folder, not a recipe file") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_RECIPE_BYTES} bytes; not a recipe")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_recipe(text, str(path))


def _too_deep(value: Any, depth: int, where: str = "") -> str | None:
    """The key path of the first value nested deeper than ``depth``, or ``None``."""
    if depth < 0:
        return where or "(top)"
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{where}.{i}", v) for i, v in enumerate(value))
    for key, item in items:
        found = _too_deep(item, depth - 1, key)
        if found is not None:
            return found
    return None


def parse_recipe(text: str, path: str = "<recipe>") -> Recipe:
    """Validate recipe TOML ``text``; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    key = _too_deep(data, MAX_DEPTH)
    if key is not None:
        raise RecipeError(f"{path}: {key}: nested more than {MAX_DEPTH} levels deep")
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
    if "name" in data:
        name = data["name"]
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
            raise RecipeError(
                f"{path}: name: expected 1 to 64 letters, digits, '.', '_' or '-' (it names the "
                f"run file), got {shown}"
            )
    else:
        # The file's name, made safe for a run file name.
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(path).stem).strip(".-_")[:64] or "recipe"
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 2000:
        raise RecipeError(f"{path}: description: expected a string of at most 2000 characters")
    params_data = data.get("parameters", {})
    if not isinstance(params_data, dict):
        raise RecipeError(f"{path}: parameters: expected a table, got {params_data!r}")
    try:
        params = REGISTRY[kind].params.model_validate(params_data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RecipeError(f"{path}: {describe_validation_error(first, 'parameters')}") from None
    except RecursionError:
        raise RecipeError(f"{path}: parameters: nested too deeply") from None
    return Recipe(
        name=name, kind=kind, description=description, params=params, text=text, path=path
    )
