"""Analysis methods applied to runs: one registry, fed offline from a file or online from a run.

Each method is a :class:`~teststand.analysis.online.StepAccumulator`. Offline (``teststand
analyze``), :func:`run_method` feeds it the completed steps of a run file in order; online,
:class:`OnlineAnalysis` subscribes to the document stream and feeds it the same steps as they
complete. Both reduce a step as a whole at its end, so the online result at the end of a run is
the offline result on the finished file.

Methods that apply constants from an earlier run (``awc_validation``, ``offsets``,
``resolution``) take them as a ``constants`` table, read from a verified constants file.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..analysis.online import StepAccumulator
from ..errors import AnalysisError, UserInputError
from ..storage import RunFile
from .constants import Constants, load_constants

log = logging.getLogger(__name__)

#: method -> (module, accumulator class, method of the constants it applies or None)
METHODS: dict[str, tuple[str, str, str | None]] = {
    "scurve": ("teststand.analysis.scurve", "ScurveAccumulator", None),
    "awc": ("teststand.analysis.walk", "AwcAccumulator", None),
    "awc_validation": ("teststand.analysis.walk", "AwcValidationAccumulator", "awc"),
    "offsets": ("teststand.analysis.offsets", "OffsetsAccumulator", "awc"),
    "timewalk": ("teststand.analysis.timewalk", "TimewalkAccumulator", None),
    "resolution": ("teststand.analysis.resolution", "ResolutionAccumulator", "timewalk"),
}

#: the default method for a run of each plan kind
DEFAULT_METHOD: dict[str, str] = {
    "threshold_scan": "scurve",
    "awc_calibration": "awc",
    "awc_validation": "awc_validation",
    "timing_alignment": "offsets",
    "hptdc_timewalk": "timewalk",
    "timing_resolution": "resolution",
}


@dataclass
class MethodResult:
    """What an analysis method produced."""

    method: str
    table: np.ndarray  # one row per channel: /analysis/<method>
    parameters: dict[str, Any]
    attrs: dict[str, Any]
    json_channels: list[dict[str, Any]]
    n_steps: int = 0
    constants: Constants | None = None

    def analysis_attrs(self) -> dict[str, Any]:
        """Attributes for ``/analysis/<method>``: the method's and where its inputs came from."""
        attrs = {f"result_{k}": v for k, v in self.attrs.items()}
        if self.constants is not None:
            attrs["constants_run_id"] = self.constants.run_id
            attrs["constants_sha256"] = str(self.constants.meta.get("sha256", ""))
        return attrs


def method_for(kind: str, method: str | None) -> str:
    """The method to apply: ``method`` if given, else the default for the run's ``kind``."""
    name = method or DEFAULT_METHOD.get(kind)
    if name is None:
        raise UserInputError(f"no default analysis for runs of kind {kind!r}; pass --method")
    if name not in METHODS:
        raise UserInputError(
            f"--method: expected one of {', '.join(sorted(METHODS))}, got {name!r}"
        )
    return name


def accumulator_class(method: str) -> type[StepAccumulator]:
    """The accumulator class of ``method``."""
    module, name, _ = METHODS[method]
    cls: type[StepAccumulator] = getattr(importlib.import_module(module), name)
    return cls


def stand_facts(instruments: Mapping[str, Any]) -> dict[str, Any]:
    """The hardware facts an analysis needs, from a run's instruments (start document or file).

    The DAC's step (``lsb_uA``) is what the run's DAC reported and the stand file declared; a
    run without a DAC has none. Nothing here is a literal: on a DAC with another step the
    analysis follows it.
    """
    facts: dict[str, Any] = {}
    dac = instruments.get("dac")
    if dac:
        settings = dict(dac.get("settings") or {})
        lsb = settings.get("lsb_uA", dict(dac.get("facts") or {}).get("lsb_uA"))
        if lsb is not None:
            facts["lsb_uA"] = float(lsb)
    return facts


def make_accumulator(
    method: str,
    channels: np.ndarray,
    axes: list[str],
    params: Mapping[str, Any],
    constants: Constants | None = None,
    facts: Mapping[str, Any] | None = None,
) -> StepAccumulator:
    """Build the accumulator of ``method``; bad parameters are a user error (exit code 2).

    ``facts`` (from :func:`stand_facts`) fill the parameters the method takes from the stand
    (``lsb_uA``) unless ``params`` gives them.
    """
    cls = accumulator_class(method)
    needs = METHODS[method][2]
    kwargs = dict(params)
    for key, value in (facts or {}).items():
        if key in cls.defaults and key not in kwargs:
            kwargs[key] = value
    if needs is not None:
        if constants is not None and constants.method != needs:
            raise UserInputError(
                f"--constants {constants.path}: method {method!r} applies {needs!r} constants, "
                f"the file holds {constants.method!r}"
            )
        kwargs["constants"] = None if constants is None else constants.table
    elif constants is not None:
        raise UserInputError(f"--constants: method {method!r} applies no constants")
    try:
        return cls(channels, axes, **kwargs)
    except ValueError as exc:
        raise UserInputError(f"--param: {exc}") from None


def _finish(acc: StepAccumulator, method: str, constants: Constants | None) -> MethodResult:
    table = acc.fit()
    return MethodResult(
        method,
        table,
        {k: v for k, v in acc.params.items() if k != "constants"},
        acc.attrs(),
        acc.json_rows(table),
        acc.n_steps,
        constants,
    )


def step_row(row: np.void) -> dict[str, Any]:
    """A ``/steps`` row as the dict an accumulator receives (the same keys online and offline)."""
    names = row.dtype.names or ()
    return {name: row[name].item() for name in names if name != "first_hit"}


def run_method(
    run: RunFile,
    method: str | None,
    params: Mapping[str, Any],
    constants: Constants | None = None,
) -> MethodResult:
    """Apply ``method`` (or the default for the run's kind) to the completed steps of ``run``."""
    name = method_for(run.kind, method)
    acc = make_accumulator(
        name, run.channels, run.axes, params, constants, stand_facts(run.instruments)
    )
    for index, (row, hits) in enumerate(run.iter_steps()):
        acc.add_hits(index, hits)
        acc.end_step(index, step_row(row))
    if acc.n_steps == 0:
        raise AnalysisError(f"{run.path}: the run has no completed step to analyse")
    return _finish(acc, name, constants)


def load_constants_for(method: str, path: str | None) -> Constants | None:
    """Load the constants ``method`` applies from ``path`` (None when no file is given)."""
    if path is None:
        return None
    needs = METHODS[method][2]
    if needs is None:
        raise UserInputError(f"--constants {path}: method {method!r} applies no constants")
    return load_constants(path, needs)


@dataclass
class OnlineAnalysis:
    """A document-stream subscriber running one method as the run goes.

    The fit is refreshed after a step when the last refresh is older than ``min_refresh_s`` and
    always at the end of the run; ``listeners`` are called with every refreshed result (the GUI
    redraws from them). A method that cannot run on this run (wrong axes, ...) is reported once in
    the log and then stays silent: online analysis never stops a run.
    """

    method: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    constants: Constants | None = None
    min_refresh_s: float = 0.5
    listeners: list[Callable[[MethodResult], None]] = field(default_factory=list)
    result: MethodResult | None = None
    error: str = ""
    _acc: StepAccumulator | None = None
    _name: str = ""
    _last_refresh: float = 0.0
    _dirty: bool = False

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        try:
            if name == "start":
                self._start(doc)
            elif self._acc is None:
                return
            elif name == "hits":
                self._acc.add_hits(int(doc["index"]), doc["hits"])
            elif name == "step":
                row = {"index": int(doc["index"]), **doc["axes"]}
                for key in ("n_hits", "n_triggers", "t_start", "t_stop"):
                    row[key] = doc[key]
                self._acc.end_step(int(doc["index"]), row)
                self._dirty = True
                if time.monotonic() - self._last_refresh >= self.min_refresh_s:
                    self.refresh()
            elif name == "stop" and self._dirty:
                self.refresh()
        except Exception as exc:  # noqa: BLE001 - analysis must never stop the run
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("online analysis %s stopped: %s", self._name or self.method, self.error)
            self._acc = None

    def _start(self, doc: Mapping[str, Any]) -> None:
        self._name = method_for(str(doc["kind"]), self.method)
        self._acc = make_accumulator(
            self._name,
            np.asarray(doc["channels"]),
            list(doc["axes"]),
            self.params,
            self.constants,
            stand_facts(doc.get("instruments") or {}),
        )

    def refresh(self) -> MethodResult | None:
        """Fit the sums so far and tell the listeners."""
        if self._acc is None or self._acc.n_steps == 0:
            return None
        self.result = _finish(self._acc, self._name, self.constants)
        self._last_refresh = time.monotonic()
        self._dirty = False
        for listener in self.listeners:
            listener(self.result)
        return self.result
