"""Instrument faults during ``teststand run``: a typed one-line error within the deadline.

Each fault is put into the simulated stand as the command connects (through a wrapper around
the runner's ``connect``), then the whole command runs in this process. Whatever the fault, the
command ends within its deadline with one line naming the instrument, and the stand ends in its
safe state, confirmed by read-back; where it cannot be confirmed (a laser stuck on), the command
says ``STAND NOT SAFE: laser: ...`` and exits with code 3.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from teststand import cli, station
from teststand.app import runner
from teststand.storage import RunFile

RECIPE = """
name = "faults"
kind = "threshold_scan"
[parameters]
codes = { start = 0, stop = 30, step = 1 }
n_triggers = 200
laser_modes = ["off", "on"]
"""

SIM_TEXT = station.resolve_stand("sim").read_text()


class Dropping:
    """A transport wrapper: swallows the writes ``drop`` matches, rewrites replies with ``edit``."""

    def __init__(
        self,
        inner: Any,
        drop: Callable[[str], bool] = lambda c: False,
        edit: Callable[[str, str], str] = lambda c, r: r,
    ) -> None:
        self._inner, self._drop, self._edit = inner, drop, edit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write(self, command: str) -> None:
        if not self._drop(command):
            self._inner.write(command)

    def query(self, command: str) -> str:
        if self._drop(command):
            return self._inner.query(command.split(" ")[0] + "?")
        return self._edit(command, self._inner.query(command))


def _stand(tmp_path: Path, *, readout_options: str = "", laser_yaml_edit: Any = None) -> str:
    text = SIM_TEXT
    if readout_options:
        text = text.replace(
            'resource = "TCPIP0::tofhir.sim::inst0::INSTR"',
            f'resource = "TCPIP0::tofhir.sim::inst0::INSTR"\noptions = {{ {readout_options} }}',
        )
    if laser_yaml_edit is not None:
        from importlib import resources

        yaml = (resources.files("teststand.sim") / "instruments.yaml").read_text()
        path = tmp_path / "twin.yaml"
        path.write_text(laser_yaml_edit(yaml))
        text = f'visa_library = "{path}@sim"\n' + text
    path = tmp_path / "stand.toml"
    path.write_text(text)
    return str(path)


def _run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: Any,
    fault: Callable[[Any], None] | None,
    stand: str = "sim",
) -> tuple[int, str, float, list[dict[str, str]]]:
    recipe = tmp_path / "faults.toml"
    recipe.write_text(RECIPE)
    original_connect = station.connect
    unsafe: list[dict[str, str]] = []
    original_close = station.Station.close

    def close(st: station.Station) -> None:
        if st._closers:
            unsafe.append(st.unsafe())
        original_close(st)

    def connect(*a: Any, **k: Any) -> Any:
        st = original_connect(*a, **k)
        if fault is not None:
            fault(st)
        return st

    monkeypatch.setattr(runner, "connect", connect)
    monkeypatch.setattr(station.Station, "close", close)
    t0 = time.monotonic()
    code = cli.main(
        ["run", str(recipe), "--stand", stand, "--out", str(tmp_path / "o"), "--seed", "4",
         "--no-progress"]
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err, elapsed, unsafe


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("SIMULATED stand")]


def _at_step(index: int, action: Callable[[Any], None]) -> Callable[[Any], None]:
    """A fault that strikes as acquisition ``index`` starts: 0 is the measurement before the run
    (the safe state must not fire), 1 the run's first step, and so on."""

    def fault(st: Any) -> None:
        readout = st.instruments["readout"]
        original = readout.start_acquisition
        count = {"n": 0}

        def start(n: int) -> None:
            count["n"] += 1
            if count["n"] == index + 1:
                action(st)
            original(n)

        readout.start_acquisition = start

    return fault


def test_readout_that_never_reports_done_fails_within_its_deadline(tmp_path, monkeypatch, capsys):
    stand = _stand(tmp_path, readout_options="deadline_floor_s = 0.5, min_trigger_rate_hz = 1e6")
    fault = _at_step(3, lambda st: st.instruments["readout"].transport.stall())
    code, err, elapsed, unsafe = _run(tmp_path, monkeypatch, capsys, fault, stand)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "readout" in lines[0] and "not done after 0.5 s" in lines[0], err
    assert elapsed < 10
    assert unsafe[-1] == {}
    with RunFile(next((tmp_path / "o").glob("*.h5"))) as run:
        assert run.status == "failed" and run.steps.size == 2  # the third step was in flight


@pytest.mark.parametrize("kind", ["timeout", "garbled"])
def test_readout_timeout_or_garbage_is_one_line(kind, tmp_path, monkeypatch, capsys):
    fault = _at_step(2, lambda st: st.instruments["readout"].transport.inject_fault(kind, "FETCH?"))
    code, err, _, unsafe = _run(tmp_path, monkeypatch, capsys, fault)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "readout (command 'FETCH?')" in lines[0], err
    assert unsafe[-1] == {}


def test_wrong_instrument_model_is_refused_at_connect(tmp_path, monkeypatch, capsys):
    stand = _stand(
        tmp_path,
        laser_yaml_edit=lambda y: y.replace("SIMULATED,LASER-PULSER,", "SIMULATED,TOASTER-9000,"),
    )
    code, err, _, _ = _run(tmp_path, monkeypatch, capsys, None, stand)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "TOASTER-9000" in lines[0] and "LASER-PULSER" in lines[0], err
    assert not list((tmp_path / "o").glob("*.h5"))


def test_open_interlock_refuses_the_run(tmp_path, monkeypatch, capsys):
    stand = _stand(
        tmp_path,
        laser_yaml_edit=lambda y: y.replace(
            "interlock_ok:\n        default: 1", "interlock_ok:\n        default: 0"
        ),
    )
    code, err, _, unsafe = _run(tmp_path, monkeypatch, capsys, None, stand)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "laser interlock is open" in lines[0], err
    assert not list((tmp_path / "o").glob("*.h5")), "refused before the run started"
    assert unsafe[-1] == {}


def test_interlock_opened_mid_run_stops_it_safe(tmp_path, monkeypatch, capsys):
    fault = _at_step(25, lambda st: st.instruments["laser"].write("SIM:INTLK 0"))
    code, err, _, unsafe = _run(tmp_path, monkeypatch, capsys, fault)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "interlock is open" in lines[0], err
    assert unsafe[-1] == {}
    with RunFile(next((tmp_path / "o").glob("*.h5"))) as run:
        assert run.status == "failed" and 20 <= run.steps.size <= 27


def test_laser_stuck_on_is_stand_not_safe_exit_3(tmp_path, monkeypatch, capsys):
    def stuck(st: Any) -> None:
        laser = st.instruments["laser"]
        # After the first step of the laser-on half, OUTP 0 no longer reaches the laser.
        laser.transport = Dropping(laser.transport, drop=lambda c: c == "OUTP 0" and stuck.on)

    stuck.on = False  # type: ignore[attr-defined]

    def arm(st: Any) -> None:
        stuck.on = True  # type: ignore[attr-defined]

    def fault(st: Any) -> None:
        stuck(st)
        _at_step(35, arm)(st)

    code, err, _, unsafe = _run(tmp_path, monkeypatch, capsys, fault)
    assert code == 3, err
    assert "STAND NOT SAFE: laser: the optical output is still on" in err.splitlines()
    assert unsafe[-1] == {"laser": "the optical output is still on"}
    with RunFile(next((tmp_path / "o").glob("*.h5"))) as run:
        assert run.status == "failed" and "STAND NOT SAFE" in run.attrs["stop_reason"]
        assert run.steps.size == 62  # every step was recorded; the end could not be made safe


def test_readback_mismatch_is_one_line_and_safe(tmp_path, monkeypatch, capsys):
    def fault(st: Any) -> None:
        laser = st.instruments["laser"]
        laser.transport = Dropping(laser.transport, edit=lambda c, r: "12.3" if c == "TUNE?" else r)

    code, err, _, unsafe = _run(tmp_path, monkeypatch, capsys, fault)
    assert code == 1
    lines = _error_lines(err)
    assert len(lines) == 1 and "laser" in lines[0] and "holds 12.3" in lines[0], err
    assert unsafe[-1] == {}
