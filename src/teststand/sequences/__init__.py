"""Plans, the engine that runs them, and recipes.

Users import from here: ``from teststand.sequences import RunEngine, load_recipe``.
"""

from ..core.stand import StandInfo
from ._engine import RunEngine, RunMetadata, RunResult, Subscriber, utc_now
from ._messages import (
    Msg,
    Plan,
    acquire,
    call,
    checkpoint,
    close_step,
    log,
    open_run,
    open_step,
    safe_state,
    set_,
)
from ._params import (
    AwcCalibrationParams,
    FloatRange,
    HptdcTimewalkParams,
    IntRange,
    ThresholdScanParams,
)
from ._plans import (
    awc_calibration,
    finalize_wrapper,
    hptdc_timewalk,
    list_messages,
    noise_counts,
    threshold_scan,
)
from ._preflight import PlanRejected, PlanSummary, check_plan
from ._recipes import (
    REGISTRY,
    PlanEntry,
    Recipe,
    load_recipe,
    parse_recipe,
    resolve_recipe,
    shipped_recipes,
)

__all__ = [
    "REGISTRY",
    "AwcCalibrationParams",
    "FloatRange",
    "HptdcTimewalkParams",
    "IntRange",
    "Msg",
    "Plan",
    "PlanEntry",
    "PlanRejected",
    "PlanSummary",
    "Recipe",
    "RunEngine",
    "RunMetadata",
    "RunResult",
    "StandInfo",
    "Subscriber",
    "ThresholdScanParams",
    "acquire",
    "awc_calibration",
    "call",
    "check_plan",
    "checkpoint",
    "close_step",
    "finalize_wrapper",
    "hptdc_timewalk",
    "list_messages",
    "load_recipe",
    "log",
    "noise_counts",
    "open_run",
    "open_step",
    "parse_recipe",
    "resolve_recipe",
    "safe_state",
    "set_",
    "shipped_recipes",
    "threshold_scan",
    "utc_now",
]
