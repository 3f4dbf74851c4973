"""Every signal in every phase of ``teststand run`` and ``selftest``: safe, one line, right code.

The command runs in this process (``cli.main`` installs its handlers in the main thread) and a
real signal is sent to the process at a chosen moment: while the stand connects (start-up),
during the checks before the run, in the middle of an acquisition, while the engine puts the
stand in its safe state, while the online result is stored, and during the summary. Each is
tried with SIGINT, SIGTERM, SIGHUP and a double SIGINT. Whatever happens, the stand ends in its
safe state (confirmed by the instruments' own read-back just before the stand is closed),
nothing prints a traceback, and the exit code and the run file's status say what happened.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from teststand import cli, station
from teststand.app import runner
from teststand.sequences import _engine
from teststand.storage import RunFile

RECIPE = """
name = "sig"
kind = "threshold_scan"
[parameters]
codes = { start = 0, stop = 20, step = 1 }
n_triggers = 100
laser_modes = ["off", "on"]
"""

SIGNALS = {
    "INT": [signal.SIGINT],
    "TERM": [signal.SIGTERM],
    "HUP": [signal.SIGHUP],
    "INT-INT": [signal.SIGINT, signal.SIGINT],
}


def _send(names: list[signal.Signals]) -> None:
    for sig in names:
        os.kill(os.getpid(), sig)


class Watch:
    """Records the stand's safe state (by read-back) at the moment it is closed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.unsafe: list[dict[str, str]] = []
        original = station.Station.close

        def close(st: station.Station) -> None:
            if st._closers:
                self.unsafe.append(st.unsafe())
            original(st)

        monkeypatch.setattr(station.Station, "close", close)


def _phase(monkeypatch: pytest.MonkeyPatch, phase: str, sigs: list[signal.Signals]) -> None:
    """Arrange for ``sigs`` to be sent during ``phase``."""
    if phase == "start-up":
        original_connect = station.connect

        def connect(*a: Any, **k: Any) -> Any:
            result = original_connect(*a, **k)
            _send(sigs)  # the stand is connected, nothing has moved yet
            return result

        monkeypatch.setattr(runner, "connect", connect)
    elif phase == "checks":
        original_check = runner.check_stand_before_run

        def check(st: Any, **k: Any) -> None:
            _send(sigs)
            original_check(st, **k)

        monkeypatch.setattr(runner, "check_stand_before_run", check)
    elif phase == "acquisition":
        original_open_step = _engine.RunEngine._open_step

        def open_step(self: Any, run: Any, axes: Any) -> None:
            original_open_step(self, run, axes)
            if run.next_index == 5:
                _send(sigs)

        monkeypatch.setattr(_engine.RunEngine, "_open_step", open_step)
    elif phase == "safe state":
        original_all_safe = _engine.RunEngine._all_safe

        def all_safe(self: Any) -> list[str]:
            _send(sigs)
            return original_all_safe(self)

        monkeypatch.setattr(_engine.RunEngine, "_all_safe", all_safe)
    elif phase == "storing":
        original_store = runner.write_method_result

        def store(*a: Any, **k: Any) -> None:
            _send(sigs)
            original_store(*a, **k)

        monkeypatch.setattr(runner, "write_method_result", store)
    elif phase == "summary":
        original_summary = cli._print_summary

        def summary(*a: Any, **k: Any) -> None:
            _send(sigs)
            original_summary(*a, **k)

        monkeypatch.setattr(cli, "_print_summary", summary)
    else:  # pragma: no cover
        raise AssertionError(phase)


#: phase -> (the run file's status, or None for no run file; steps all recorded?)
EXPECTED = {
    "start-up": (None, False),
    "checks": (None, False),
    "acquisition": ("interrupted", False),
    "safe state": ("completed", True),
    "storing": ("completed", True),
    "summary": ("completed", True),
}


@pytest.mark.parametrize("sig", list(SIGNALS))
@pytest.mark.parametrize("phase", list(EXPECTED))
def test_signal_in_every_phase_of_a_run(
    phase: str, sig: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    recipe = tmp_path / "sig.toml"
    recipe.write_text(RECIPE)
    watch = Watch(monkeypatch)
    _phase(monkeypatch, phase, SIGNALS[sig])
    export = tmp_path / "scurve.json"
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = cli.main(
        [
            "run",
            str(recipe),
            "--out",
            str(tmp_path / "out"),
            "--seed",
            "3",
            "--no-progress",
            "--export-constants",
            str(export),
        ]
    )
    out, err = capfd.readouterr()
    # The handlers are given back: this process is the test runner, not a run.
    assert {s: signal.getsignal(s) for s in previous} == previous
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert code == 1, (code, err)
    assert watch.unsafe and watch.unsafe[-1] == {}, "the stand was not left safe"
    status, complete = EXPECTED[phase]
    files = list((tmp_path / "out").glob("*.h5"))
    if status is None:
        assert files == [], "no run file when the run did not start"
        assert "before the run started" in err
    else:
        with RunFile(files[0]) as run:
            assert run.status == status
            if complete:
                assert run.steps.size == 42
            else:
                assert 0 < run.steps.size < 42
                assert int(run.steps["n_hits"].sum()) == run.n_hits
    if status == "completed":
        assert export.exists(), "the constants were lost"
        assert "the run file is complete" in err
    first = SIGNALS[sig][0].name
    assert f"{first} received" in err
    if len(SIGNALS[sig]) > 1:
        assert "already stopping" in err


@pytest.mark.parametrize("sig", ["INT", "TERM", "HUP", "INT-INT"])
def test_signal_during_selftest(sig: str, monkeypatch: pytest.MonkeyPatch, capfd: Any) -> None:
    from teststand.drivers import _readout

    watch = Watch(monkeypatch)
    original = _readout.check_safe_by_measurement

    def check(readout: Any, ctx: Any) -> str:
        _send(SIGNALS[sig])
        return original(readout, ctx)

    checks = (_readout.SelfCheck("safe state by measurement", check), _readout.READOUT_CHECKS[1])
    spec = dataclasses.replace(station.DRIVERS["TofhirReadout"], checks=checks)
    monkeypatch.setitem(station.DRIVERS, "TofhirReadout", spec)
    code = cli.main(["selftest", "--seed", "1"])
    out, err = capfd.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "selftest interrupted" in err
    assert "responding acquisition: " + SIGNALS[sig][0].name in out, out
    assert watch.unsafe and watch.unsafe[-1] == {}


@pytest.mark.parametrize("sig", ["INT", "TERM", "HUP"])
def test_reading_commands_stop_at_once_in_one_line(
    sig: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: Any
) -> None:
    from teststand.storage import RunFile as Reader

    original = Reader.__init__

    def opening(self: Any, *a: Any, **k: Any) -> None:
        _send(SIGNALS[sig])
        original(self, *a, **k)

    monkeypatch.setattr(Reader, "__init__", opening)
    code = cli.main(["info", str(tmp_path / "x.h5")])
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"teststand: info interrupted: {SIGNALS[sig][0].name} received"
