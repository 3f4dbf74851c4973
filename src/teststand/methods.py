"""Analysis methods applied to run files: the glue between storage and the pure analysis.

Each method reads the columns it needs from a :class:`~teststand.storage.RunFile`, calls the pure
functions of :mod:`teststand.analysis` and returns a per-channel table, its attributes and the
JSON rows of design section 6. The CLI's ``analyze`` and the run summary use the same functions,
so what a technician sees at the end of a run is what ``teststand analyze`` writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import AnalysisError, RunFileError, UserInputError
from .storage import RunFile


@dataclass
class MethodResult:
    """What an analysis method produced for one run file."""

    method: str
    table: np.ndarray  # one row per channel, written to /analysis/<method>
    parameters: dict[str, Any]
    json_channels: list[dict[str, Any]]


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def _rows(table: np.ndarray, keys: Mapping[str, str]) -> list[dict[str, Any]]:
    """JSON rows: ``keys`` maps a JSON key to a table field."""
    rows = []
    for row in table:
        out: dict[str, Any] = {"channel": int(row["channel"])}
        for key, field in keys.items():
            out[key] = _json_value(row[field])
        if "flag" in (table.dtype.names or ()):
            out["flag"] = str(row["flag"])
        rows.append(out)
    return rows


def _require_axes(run: RunFile, axes: tuple[str, ...], method: str) -> None:
    missing = [a for a in axes if a not in run.axes]
    if missing:
        raise RunFileError(
            f"{run.path}: method {method!r} needs the scan axes {list(axes)} in /steps, "
            f"missing {missing} (run kind {run.kind!r})"
        )


def analyze_scurve(run: RunFile, params: Mapping[str, float]) -> MethodResult:
    """Baseline and noise per channel from the laser-off steps of a threshold scan."""
    from .analysis import fit_scurves, scurve_counts

    _require_axes(run, ("thr_code",), "scurve")
    steps = run.steps
    use = np.isfinite(steps["thr_code"])
    if "laser" in run.axes:
        use &= steps["laser"] == 0
    if not np.any(use):
        raise AnalysisError(f"{run.path}: no laser-off threshold steps to fit S-curves on")
    step_index = np.flatnonzero(use)
    n_channels = int(run.channels.size)
    cols = run.columns(("event", "channel"), steps=step_index)
    # Map every hit to its position among the selected steps.
    counts = scurve_counts(
        cols["channel"],
        cols["step"],
        n_channels,
        steps["thr_code"][step_index],
        steps["n_triggers"][step_index],
        hits_event=cols["event"],
    )
    table = fit_scurves(counts.codes, counts.n_triggers, counts.n_hits)
    return MethodResult(
        "scurve",
        table,
        dict(params),
        _rows(table, {"baseline_code": "baseline_code", "noise_code": "noise_code"}),
    )


#: method name -> (function, default parameters)
METHODS: dict[
    str, tuple[Callable[[RunFile, Mapping[str, float]], MethodResult], dict[str, float]]
] = {
    "scurve": (analyze_scurve, {}),
}

#: the default method for a run of each plan kind
DEFAULT_METHOD = {
    "threshold_scan": "scurve",
    "awc_calibration": "awc",
    "hptdc_timewalk": "timewalk",
}


def run_method(run: RunFile, method: str | None, params: Mapping[str, float]) -> MethodResult:
    """Apply ``method`` (or the default for the run's kind) to ``run``."""
    name = method or DEFAULT_METHOD.get(run.kind)
    if name is None:
        raise UserInputError(
            f"{run.path}: no default analysis for kind {run.kind!r}; pass --method"
        )
    if name not in METHODS:
        raise UserInputError(
            f"--method: expected one of {', '.join(sorted(METHODS))}, got {name!r}"
        )
    function, defaults = METHODS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UserInputError(
            f"--param: method {name!r} has no parameter {unknown[0]!r}"
            + (f" (it takes {', '.join(sorted(defaults))})" if defaults else " (it takes none)")
        )
    return function(run, {**defaults, **params})
