"""The ``teststand`` command.

Exit codes: 0 done, 1 the run or analysis failed (or was interrupted), 2 bad input (one line
on stderr, no traceback, no instrument touched), 3 the stand could not be confirmed safe (a
``STAND NOT SAFE: <instrument>: <what>`` line per instrument).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from ._terminal import CommandInterrupted, SafeStream, Signals
from .errors import ConnectionFailed, StandNotSafe, TeststandError, UserInputError

log = logging.getLogger("teststand")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_SAFE = 0, 1, 2, 3

#: Commands that drive instruments: signals are recorded, never raised, while they run.
HARDWARE_COMMANDS = frozenset({"run", "selftest"})


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"teststand: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="teststand", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"teststand {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a recipe on a stand and record it to HDF5")
    run.add_argument("recipe", help="a shipped recipe's name or a recipe file")
    run.add_argument(
        "--stand", default="sim", help="a shipped stand's name or a stand file (default: sim)"
    )
    run.add_argument(
        "--out", default="runs", help="folder for the run file and its log (default: runs)"
    )
    run.add_argument("--seed", type=int, default=None, help="seed of the simulated stand")
    run.add_argument("--no-progress", action="store_true", help="no progress display")
    run.add_argument(
        "--no-analysis", action="store_true", help="no online analysis (the run is only recorded)"
    )
    run.add_argument(
        "--export-constants",
        default=None,
        metavar="FILE",
        help="write the online analysis of the run as a constants file (JSON, sha256)",
    )
    run.add_argument(
        "--constants",
        default=None,
        metavar="FILE",
        help="constants file the run's analysis applies (awc-validation, timing-*)",
    )

    analyze = sub.add_parser("analyze", help="analyse a run file and store the constants")
    analyze.add_argument("run_file", metavar="RUN.h5")
    analyze.add_argument(
        "--method", default=None, help="analysis method (default: from the run's kind)"
    )
    analyze.add_argument(
        "--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON"
    )
    analyze.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a method parameter",
    )
    analyze.add_argument(
        "--constants", default=None, metavar="FILE", help="constants file the method applies"
    )
    analyze.add_argument(
        "--export", default=None, metavar="FILE", help="write the constants file (JSON, sha256)"
    )
    analyze.add_argument(
        "--valid-until", default=None, metavar="ISO8601", help="end of the constants' validity"
    )

    selftest = sub.add_parser("selftest", help="check every instrument of a stand")
    selftest.add_argument("--stand", default="sim", help="a shipped stand's name or a stand file")
    selftest.add_argument("--seed", type=int, default=None, help="seed of the simulated stand")

    info = sub.add_parser("info", help="describe a run file")
    info.add_argument("run_file", metavar="RUN.h5")
    return parser


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """A progress bar with ETA on stderr, fed by the document stream."""

    def __init__(
        self, stream: TextIO = sys.stderr, *, label: str = "", min_interval_s: float = 0.2
    ) -> None:
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.min_interval_s = min_interval_s if self.tty else 5.0
        self.total = 0
        self.done = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._last_decile = -1
        self._shown = -1

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            self.total = int(doc["n_steps"])
            self.t0 = time.monotonic()
        elif name == "step":
            self.done += 1
            self._show()
        elif name == "stop":
            if self._shown != self.done:
                self._show(final=True)
            elif self.tty:
                self.stream.write("\n")

    def _show(self, *, final: bool = False) -> None:
        now = time.monotonic()
        total = max(self.total, 1)
        fraction = min(self.done / total, 1.0)
        decile = int(fraction * 10)
        if (
            not final
            and now - self._last < self.min_interval_s
            and (self.tty or decile == self._last_decile)
        ):
            return
        if not self.tty and not final and decile == self._last_decile:
            return
        self._last, self._last_decile, self._shown = now, decile, self.done
        elapsed = now - self.t0
        eta = elapsed / fraction - elapsed if fraction > 0 else float("nan")
        bar = "#" * int(30 * fraction) + "-" * (30 - int(30 * fraction))
        eta_text = (
            "--:--" if not math.isfinite(eta) else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        )
        text = (
            f"{self.label}[{bar}] {self.done}/{self.total} steps {100 * fraction:5.1f}%  "
            f"elapsed {elapsed:6.1f}s  ETA {eta_text}"
        )
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# -- helpers -----------------------------------------------------------------------------------
class _OneLine(logging.Formatter):
    """Console log lines: one line each, never a traceback (the log file keeps those)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"teststand: {record.levelname}: {record.getMessage()}".split())


def _console_handler(verbose: bool, command: str) -> logging.Handler:
    """The console's share of the log: everything with ``-v``; else little or nothing.

    While a command drives hardware the console gets no log lines at all: the command prints
    its own one-line outcome, and the run's log file has everything, tracebacks included.
    """
    console = logging.StreamHandler(sys.stderr)
    if verbose:
        console.setLevel(logging.DEBUG)
        console.setFormatter(logging.Formatter("teststand: %(levelname)s: %(message)s"))
    else:
        console.setLevel(logging.CRITICAL if command in HARDWARE_COMMANDS else logging.WARNING)
        console.setFormatter(_OneLine())
    return console


def _setup_logging(verbose: bool, logfile: Path | None = None) -> logging.Handler | None:
    """The log file of a run (everything, tracebacks included), if ``logfile`` is given."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if logfile is None:
        return None
    handler = logging.FileHandler(logfile, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler


def _parse_params(items: Sequence[str]) -> dict[str, float]:
    params: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserInputError(f"--param {item!r}: expected KEY=VALUE")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise UserInputError(f"--param {item!r}: expected a number after '='") from None
    return params


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)


def _fmt(value: Any) -> str:
    import numpy as np

    if isinstance(value, (float, np.floating)):
        return "nan" if not np.isfinite(value) else f"{value:.3f}"
    return str(value)


# -- commands ----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .app.methods import load_constants_for, method_for
    from .app.runner import prepare_run
    from .sequences import load_recipe

    constants = None
    if args.constants is not None:
        method = method_for(load_recipe(args.recipe).kind, None)
        constants = load_constants_for(method, args.constants)
    prepared = prepare_run(
        args.recipe,
        args.stand,
        args.out,
        seed=args.seed,
        constants=constants,
        analysis=not args.no_analysis,
    )
    handler = _setup_logging(args.verbose, prepared.log_path)
    try:
        return _run_prepared(prepared, args, constants)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _run_prepared(prepared: Any, args: argparse.Namespace, constants: Any) -> int:
    from .app.runner import execute

    signals: Signals = args.signals
    meta = prepared.metadata
    sim_tag = "SIMULATED " if prepared.stand.simulated else ""
    log.info(
        "%srun %s: recipe %s (%s) on stand %s, seed %s",
        sim_tag,
        meta.run_id,
        meta.recipe_name,
        meta.kind,
        meta.stand_name,
        meta.seed,
    )
    if prepared.stand.simulated:
        print(
            f"SIMULATED stand {meta.stand_name!r} (seed {meta.seed}): no real instrument is used",
            file=sys.stderr,
        )
    if args.export_constants and not Path(args.export_constants).resolve().parent.is_dir():
        raise UserInputError(f"--export-constants {args.export_constants}: no such folder")
    observers = [] if args.no_progress else [Progress(label=sim_tag)]
    online = None
    if not args.no_analysis:
        from .app.methods import OnlineAnalysis

        online = OnlineAnalysis(constants=constants)

    def on_engine(engine: Any, station: Any) -> None:
        def abort(reason: str) -> None:
            engine.abort(reason, signal=True)

        signals.on_signal = abort
        if signals.received:  # arrived between the checks and here: the run does not start
            abort(signals.reason)

    try:
        outcome = execute(
            prepared,
            observers=observers,
            on_engine=on_engine,
            online=online,
            interrupted=lambda: signals.reason,
        )
    finally:
        signals.on_signal = None
    result = outcome.result
    log.info(
        "run %s ended %s after %d steps%s",
        result.run_id,
        result.status,
        result.n_steps,
        f": {result.reason}" if result.reason else "",
    )
    if not prepared.run_path.exists():
        print(f"teststand: run {result.status}: {result.reason}; no run file", file=sys.stderr)
        print(f"log file: {prepared.log_path}")
        return _not_safe_exit(result.not_safe) or EXIT_FAILED
    print(f"{sim_tag}run {result.run_id} {result.status}: {result.n_steps} steps")
    print(f"run file: {prepared.run_path}")
    print(f"log file: {prepared.log_path}")
    if result.status != "completed":
        print(f"teststand: run {result.status}: {result.reason}", file=sys.stderr)
    # The constants first: they are the product, and a signal during the summary must not lose
    # them.
    if args.export_constants and outcome.analysis is not None:
        _export(args.export_constants, outcome.analysis, meta.run_id, prepared.run_path, None)
        print(f"constants file: {args.export_constants}")
    if online is not None and online.error:
        print(f"online analysis: not possible ({online.error})")
    code = _not_safe_exit(result.not_safe)
    if code:
        return code
    if result.n_steps and not signals.received:
        _print_summary(prepared.run_path, outcome.analysis)
    if signals.received and result.status == "completed":
        # Not swallowed: the command was asked to stop, though the run had finished.
        print(
            f"teststand: {signals.reason} after the run completed: the run file is complete",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK if result.status == "completed" else EXIT_FAILED


def _not_safe_exit(not_safe: dict[str, str]) -> int:
    """Print ``STAND NOT SAFE`` per instrument; the exit code 3, or 0 when all were confirmed."""
    for name, what in not_safe.items():
        print(f"STAND NOT SAFE: {name}: {what}", file=sys.stderr)
    return EXIT_NOT_SAFE if not_safe else EXIT_OK


def _print_summary(run_path: Path, analysis: Any = None) -> None:
    """Per-channel summary: hits per channel and step, and the online analysis if there is one."""
    from .storage import RunFile

    with RunFile(run_path) as run:
        steps = run.steps
        n_channels = int(run.channels.size)
        cols = run.columns(("channel",))
    import numpy as np

    per_channel = np.bincount(cols["channel"].astype(np.int64), minlength=n_channels)
    n_active = max(int((steps["n_hits"] > 0).sum()), 1)
    print(f"\nsummary: {steps.size} steps, {int(steps['n_hits'].sum())} hits")
    headers = ["channel", "hits", "hits/step"]
    rows: list[list[Any]] = [
        [c, int(per_channel[c]), per_channel[c] / n_active] for c in range(n_channels)
    ]
    if analysis is not None:
        keys = [
            k
            for k, v in (analysis.json_channels[0] if analysis.json_channels else {}).items()
            if k not in ("channel", "flag") and not isinstance(v, list)
        ]
        headers += keys + ["flag"]
        by_channel = {row["channel"]: row for row in analysis.json_channels}
        for r in rows:
            row = by_channel.get(r[0], {})
            r += [_none_nan(row.get(k)) for k in keys] + [row.get("flag") or "-"]
        print(f"analysis: {analysis.method} (online, stored as /analysis/{analysis.method})")
    print(_format_table(headers, rows))


def _none_nan(value: Any) -> Any:
    return float("nan") if value is None else value


def cmd_analyze(args: argparse.Namespace) -> int:
    from .app.methods import load_constants_for, method_for, run_method
    from .app.runner import write_method_result
    from .storage import RunFile

    params = _parse_params(args.param)
    path = Path(args.run_file)
    with RunFile(path) as run:
        method = method_for(run.kind, args.method)
        constants = load_constants_for(method, args.constants)
        result = run_method(run, method, params, constants)
        run_id, started = run.run_id, str(run.attrs.get("started_utc", ""))
    write_method_result(path, result)
    doc = {"method": result.method, "run_file": str(path), "channels": result.json_channels}
    if args.json_out:
        _write_text(args.json_out, json.dumps(doc, indent=2) + "\n", "--json")
    if args.export:
        _export(args.export, result, run_id, path, args.valid_until, valid_from=started)
    rows = result.json_channels
    keys = [k for k, v in (rows[0] if rows else {}).items() if not isinstance(v, list)]
    keys = [k for k in keys if k not in ("channel", "flag")] + ["flag"]
    print(f"{result.method} of {path} ({result.n_steps} steps)")
    print(
        _format_table(
            ["channel", *keys],
            [
                [
                    row["channel"],
                    *(_none_nan(row.get(k)) for k in keys[:-1]),
                    row.get("flag") or "-",
                ]
                for row in rows
            ],
        )
    )
    return EXIT_OK


def _export(
    target: str,
    result: Any,
    run_id: str,
    run_path: Path,
    valid_until: str | None,
    *,
    valid_from: str = "",
) -> None:
    from .app.constants import export_constants
    from .sequences import utc_now

    try:
        export_constants(
            target,
            method=result.method,
            table=result.table,
            run_id=run_id,
            run_file=str(run_path),
            parameters=result.parameters,
            attrs=result.attrs,
            valid_from=valid_from or utc_now(),
            valid_until=valid_until,
        )
    except OSError as exc:
        raise UserInputError(
            f"{target}: cannot write the constants file ({exc.strerror})"
        ) from None


def _write_text(path: str, text: str, option: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserInputError(f"{option} {path}: cannot write ({exc.strerror})") from None


def cmd_info(args: argparse.Namespace) -> int:
    from .storage import RunFile

    with RunFile(Path(args.run_file)) as run:
        attrs = run.attrs
        print(f"run file {args.run_file}")
        for key in (
            "format",
            "format_version",
            "run_id",
            "recipe",
            "kind",
            "status",
            "stand",
            "simulated",
            "started_utc",
            "finished_utc",
            "software_version",
            "settings_sha256",
        ):
            print(f"  {key:17s} {attrs.get(key, '')}")
        steps = run.steps
        print(f"  steps             {steps.size}   axes: {', '.join(run.axes)}")
        print(f"  hits              {run.n_hits}")
        print(f"  channels          {run.channels.size}")
        print(f"  truth             {'yes' if run.truth is not None else 'no'}")
        names = ", ".join(f"{n} ({i.get('idn', '')})" for n, i in run.instruments.items())
        print(f"  instruments       {names}")
        print(f"  analysis          {', '.join(run.analysis_methods()) or '-'}")
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    from .app.selftest import run_selftest
    from .station import load_stand

    signals: Signals = args.signals
    stand = load_stand(args.stand)
    _setup_logging(args.verbose)
    if stand.simulated:
        print(f"SIMULATED stand {stand.config.name!r}", file=sys.stderr)
    report = run_selftest(stand, seed=args.seed, should_stop=lambda: signals.reason)
    for check in report.checks:
        verdict = "PASS" if check.passed else "FAIL"
        print(f"{verdict}  {check.instrument:8s} {check.name}: {check.detail}")
    n_passed = sum(c.passed for c in report.checks)
    verdict = "passed" if report.passed else "FAILED"
    print(f"selftest {verdict}: {n_passed}/{len(report.checks)} checks")
    if signals.received:
        print(f"teststand: selftest interrupted: {signals.reason}", file=sys.stderr)
    code = _not_safe_exit(report.not_safe)
    if code:
        return code
    return EXIT_OK if report.passed and not signals.received else EXIT_FAILED


COMMANDS = {"run": cmd_run, "analyze": cmd_analyze, "info": cmd_info, "selftest": cmd_selftest}


def main(argv: Sequence[str] | None = None, *, signals: Signals | None = None) -> int:
    """Entry point of the ``teststand`` command; returns the exit code.

    Signals are taken over first of all (see :mod:`teststand._terminal`), and standard output
    and error become streams that survive a closed pipe: from here on a signal or a vanished
    terminal can neither leave a traceback nor stop a run halfway. ``signals`` (installed by the
    console script before anything was imported) stay installed after return; without them
    the handlers are installed here and given back at the end.
    """
    own_signals = signals is None
    if signals is None:
        signals = Signals(hardware=True)
        signals.install()
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SafeStream(sys.stdout), SafeStream(sys.stderr)
    console: logging.Handler | None = None
    command = "teststand"
    try:
        args = _build_parser().parse_args(argv)
        command = args.command
        signals.hardware = command in HARDWARE_COMMANDS
        if signals.received and not signals.hardware:
            raise CommandInterrupted(signals.reason)
        args.signals = signals
        console = _console_handler(args.verbose, command)
        logging.getLogger().addHandler(console)
        return COMMANDS[command](args)
    except StandNotSafe as exc:
        return _not_safe_exit(exc.failures)
    except UserInputError as exc:
        print(f"teststand: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConnectionFailed as exc:
        print(f"teststand: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except CommandInterrupted as exc:
        print(f"teststand: {command} interrupted: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TeststandError as exc:
        print(f"teststand: {command} failed: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, BrokenPipeError):  # pragma: no cover - the handlers prevent both
        print(f"teststand: {command} interrupted", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        # A bug, not a user mistake: one line here, the traceback in the log (or with -v).
        log.debug("internal error", exc_info=True)
        print(
            f"teststand: {command}: internal error: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]} (run with -v for the traceback)",
            file=sys.stderr,
        )
        if "-v" in (argv if argv is not None else sys.argv[1:]):
            raise
        return EXIT_FAILED
    finally:
        if console is not None:
            logging.getLogger().removeHandler(console)
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams
        if own_signals:
            signals.restore()


if __name__ == "__main__":  # pragma: no cover
    from ._entry import main as _entry_main

    _entry_main()
