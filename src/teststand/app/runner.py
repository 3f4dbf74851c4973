"""Run a recipe on a stand, end to end: the one path the CLI, the GUI and the tests share.

``run_recipe`` validates the recipe and the stand file before anything is connected, connects the
stand, records the run with :class:`~teststand.storage.RunWriter` and returns how the run ended.
Extra subscribers (progress display, GUI, online analysis) and a hook to reach the engine (for
pause and abort from another thread or a signal handler) can be passed in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .. import __version__
from ..drivers import CheckContext, check_safe_by_measurement
from ..errors import (
    InstrumentError,
    InterlockTripped,
    RecipeError,
    StandNotSafe,
    UserInputError,
)
from ..sequences import (
    Plan,
    PlanSummary,
    Recipe,
    RunEngine,
    RunMetadata,
    RunResult,
    Subscriber,
    load_recipe,
)
from ..station import StandFile, Station, connect, load_stand
from ..storage import RunWriter, write_analysis
from .constants import Constants, plain_json
from .methods import METHODS, MethodResult, OnlineAnalysis, method_for

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """A validated recipe and stand, and where the run will be recorded."""

    recipe: Recipe
    stand: StandFile
    run_path: Path
    metadata: RunMetadata
    #: what the checked plan will do (steps, triggers), from the dry run before connecting
    summary: PlanSummary | None = None

    @property
    def log_path(self) -> Path:
        """The run's log file, next to the run file."""
        return self.run_path.with_suffix(".log")


@dataclass
class RunOutcome:
    """How a run ended, where it is, and the online analysis at its end (if any)."""

    result: RunResult
    run_path: Path
    simulated: bool
    analysis: MethodResult | None = None


def prepare_run(
    recipe_spec: str,
    stand_spec: str,
    out_dir: str | Path,
    *,
    seed: int | None = None,
    constants: Constants | None = None,
    analysis: bool = True,
) -> PreparedRun:
    """Check everything that can be checked without instruments, and name the run file.

    The recipe and the stand file are validated, the recipe is checked against the stand's
    declared limits (its plan listed without hardware, every message checked), a run whose
    analysis applies constants is refused without them (unless ``analysis`` is off), and the
    output folder must be writable. Nothing is connected.

    Raises:
        RecipeError, StandError, UserInputError: a bad recipe, stand file, option or output
            folder (one line naming the file and the key).
    """
    if seed is not None and not 0 <= seed < 2**63:
        raise UserInputError(f"--seed {seed}: expected an integer from 0 to 2**63 - 1")
    recipe = load_recipe(recipe_spec)
    stand = load_stand(stand_spec)
    if constants is not None:
        recipe = _baselines_from(recipe, stand, constants)
    summary = recipe.preflight(stand.info())
    if analysis and constants is None:
        _require_constants(recipe)
    out = _output_folder(Path(out_dir))
    if stand.simulated and seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    metadata = RunMetadata(
        recipe_name=recipe.name,
        kind=recipe.kind,
        recipe_text=recipe.text,
        stand_name=stand.config.name,
        stand_text=stand.text,
        simulated=stand.simulated,
        seed=seed,
        settings=recipe.settings(),
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_path = out / f"{stamp}_{recipe.name}_{metadata.run_id}.h5"
    return PreparedRun(recipe, stand, run_path, metadata, summary)


def _require_constants(recipe: Recipe) -> None:
    """A run whose analysis applies constants does not start without them."""
    method = method_for(recipe.kind, None)
    needs = METHODS[method][2]
    if needs is not None:
        made_by = {"awc": "awc-calibration", "timewalk": "hptdc-timewalk"}.get(needs, needs)
        raise RecipeError(
            f"{recipe.path}: kind {recipe.kind!r} is analysed with {needs} constants: give "
            f"--constants FILE (exported by an {made_by} run with --export-constants), or --no-analysis to "
            "only record it"
        )


def _output_folder(out: Path) -> Path:
    """``--out`` created if needed and proved writable, before anything is connected."""
    where = f"--out {out}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir():
            raise UserInputError(f"{where}: not a folder")
        probe = out / f".teststand-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except UserInputError:
        raise
    except OSError as exc:
        raise UserInputError(f"{where}: cannot write there ({exc.strerror})") from None
    return out


def _baselines_from(recipe: Recipe, stand: StandFile, constants: Constants) -> Recipe:
    """Set the thresholds from the baselines the constants were made with.

    AWC constants hold for the codes the calibration set; a later run that measured its own
    baselines could round a channel to the neighbouring code. So a run that applies constants
    and gives no baselines of its own takes theirs.
    """
    table = constants.table
    if "baseline_code" not in (table.dtype.names or ()):
        return recipe
    by_channel = {
        int(c): float(b) for c, b in zip(table["channel"], table["baseline_code"], strict=True)
    }
    channels = [int(c) for c in stand.config.channel_table()["channel"]]
    codes = [by_channel.get(c, float("nan")) for c in channels]
    if not all(np.isfinite(codes)):
        return recipe
    log.info("thresholds set from the baselines of constants %s", constants.path)
    return recipe.with_baselines(codes, f"constants {constants.path} (run {constants.run_id})")


#: Triggers of the measurement that confirms the safe state before every run.
PRE_RUN_TRIGGERS = 100


def check_stand_before_run(station: Station, *, n_triggers: int = PRE_RUN_TRIGGERS) -> None:
    """Before anything moves: the stand safe by read-back and by measurement, interlocks closed.

    The measurement (an acquisition in the safe state: nothing may fire) is made on stands with
    a threshold DAC, whose safe code is a stand option that a wrong value makes trigger.

    Raises:
        StandNotSafe: an instrument does not confirm its safe state (exit code 3).
        InterlockTripped: an interlock is open.
        InstrumentError: the safe state triggers (a safe code below a channel's baseline).
    """
    station.confirm_safe()
    for name, inst in station.instruments.items():
        for what, closed in inst.interlocks().items():
            if not closed:
                raise InterlockTripped(name, f"{what} is open: close it before the run")
    if "dac" not in station.instruments:
        # Fixed thresholds (HPTDC): no safe code that could trigger; the self-test measures the
        # quiet rate of such a bench.
        return
    ctx = CheckContext(station.instruments, station.info.channels, n_triggers)
    try:
        check_safe_by_measurement(station.instruments["readout"], ctx)
    except AssertionError as exc:
        raise InstrumentError("readout", f"{exc} (instruments.dac.options.safe_code)") from None


def execute(
    prepared: PreparedRun,
    *,
    subscribers: Sequence[Subscriber] = (),
    observers: Sequence[Subscriber] = (),
    on_engine: Callable[[RunEngine, Station], None] | None = None,
    block_triggers: int = 20_000,
    online: OnlineAnalysis | None = None,
    interrupted: Callable[[], str] | None = None,
) -> RunOutcome:
    """Connect the stand, check it, run the plan and record it; safe and closed on every way out.

    ``subscribers`` are critical (one that raises fails the run, as the writer does);
    ``observers`` (a progress display) are detached when they raise. ``online`` (an
    :class:`~teststand.app.methods.OnlineAnalysis`) follows the run; its result at the end is
    written to the run file's ``/analysis/<method>``. ``interrupted()`` returns why the run must
    not start (a signal during start-up), or ``""``; it is asked after connecting.

    Before the engine runs, :func:`check_stand_before_run` confirms the stand safe. After it,
    the engine has put every instrument in its safe state and confirmed it by read-back; what it
    could not confirm is in ``outcome.result.not_safe``.

    Raises:
        ConnectionFailed: one or more instruments could not be connected (nothing was run).
        StandNotSafe: before the run, or after a failure outside the engine, an instrument did
            not confirm its safe state.
        InterlockTripped, InstrumentError: the checks before the run refused it (no run file).
    """
    meta = prepared.metadata
    station = connect(prepared.stand, seed=meta.seed)
    result: RunResult | None = None
    try:
        try:
            plan = prepared.recipe.build_plan(station.info)
            meta.channels = station.info.channels
            meta.simulated = station.simulated
            meta.facts = station.facts()
            meta.truth = station.truth()
            meta.truth_attrs = station.truth_attrs()
            why = interrupted() if interrupted is not None else ""
            if not why:
                check_stand_before_run(station)
                why = interrupted() if interrupted is not None else ""
            if why:
                plan.close()
                result = RunResult(meta.run_id, "interrupted", 0, f"{why} before the run started")
            else:
                result = _run_engine(
                    prepared, station, plan, subscribers, observers, on_engine, block_triggers,
                    online,
                )  # fmt: skip
        finally:
            if result is None or result.n_steps == 0 and not prepared.run_path.exists():
                # Out of the engine's hands (start-up, checks): safe, and confirmed, here.
                station.safe_state()
                not_safe = station.unsafe()
                if not_safe:
                    if result is None:
                        raise StandNotSafe(not_safe)
                    result.not_safe = not_safe
    finally:
        station.close()
    analysis = online.result if online is not None else None
    if analysis is not None:
        write_method_result(prepared.run_path, analysis, online=True)
    elif online is not None and online.error:
        log.warning("no online analysis stored: %s", online.error)
    return RunOutcome(result, prepared.run_path, meta.simulated, analysis)


def _run_engine(
    prepared: PreparedRun,
    station: Station,
    plan: Plan,
    subscribers: Sequence[Subscriber],
    observers: Sequence[Subscriber],
    on_engine: Callable[[RunEngine, Station], None] | None,
    block_triggers: int,
    online: OnlineAnalysis | None,
) -> RunResult:
    engine = RunEngine(
        station.instruments, safe_order=station.safe_order, block_triggers=block_triggers
    )
    writer = RunWriter(prepared.run_path)
    engine.subscribe(writer)
    if online is not None:
        engine.subscribe(online)
    for subscriber in subscribers:
        engine.subscribe(subscriber)
    for observer in observers:
        engine.subscribe(observer, critical=False)
    if on_engine is not None:
        on_engine(engine, station)
    try:
        return engine.run(plan, prepared.metadata)
    finally:
        writer.close()


def write_method_result(path: Path, result: MethodResult, *, online: bool = False) -> None:
    """Store ``result`` as ``/analysis/<method>`` of the run file at ``path``."""
    write_analysis(
        path,
        result.method,
        result.table,
        {
            "method": result.method,
            "parameters": json.dumps(plain_json(result.parameters), allow_nan=False),
            "software_version": __version__,
            "online": online,
            "n_steps": result.n_steps,
            **result.analysis_attrs(),
        },
    )


def run_recipe(
    recipe_spec: str,
    stand_spec: str = "sim",
    out_dir: str | Path = "runs",
    *,
    seed: int | None = None,
    subscribers: Sequence[Subscriber] = (),
    observers: Sequence[Subscriber] = (),
    on_engine: Callable[[RunEngine, Station], None] | None = None,
    online: OnlineAnalysis | None = None,
) -> RunOutcome:
    """Validate, connect, run and record ``recipe_spec`` on ``stand_spec`` (see :func:`execute`).

    The constants ``online`` applies (if any) also set the thresholds' baselines (see
    :func:`prepare_run`).
    """
    constants = online.constants if online is not None else None
    prepared = prepare_run(
        recipe_spec,
        stand_spec,
        out_dir,
        seed=seed,
        constants=constants,
        analysis=online is not None,
    )
    return execute(
        prepared, subscribers=subscribers, observers=observers, on_engine=on_engine, online=online
    )
