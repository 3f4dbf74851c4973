"""Bad recipes and stand files: one line, exit code 2, no traceback, no instrument touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from teststand import cli
from teststand.station import resolve_stand

GOOD_RECIPE = """
name = "t"
kind = "threshold_scan"
[parameters]
codes = { start = 0, stop = 63, step = 1 }
n_triggers = 100
"""

AWC = """
name = "a"
kind = "awc_calibration"
[parameters]
intensities_pct = [20.0, 50.0]
thr2_uA = { start = 3.0, stop = 10.0, step = 0.3125 }
"""

BAD_RECIPES = {
    "not TOML at all": ("this is not = = toml [", "not valid TOML"),
    "binary garbage": ("\x00\x01\x02", "not valid TOML"),
    "missing kind": ('name = "x"\n[parameters]\n', "kind: missing"),
    "unknown kind": ('kind = "make_coffee"\n', "kind: expected one of"),
    "kind of wrong type": ("kind = 3\n", "kind: expected one of"),
    "unknown top-level key": (GOOD_RECIPE + 'colour = "red"\n', "colour: unknown key"),
    "wrong type": (
        GOOD_RECIPE.replace("n_triggers = 100", 'n_triggers = "many"'),
        "parameters.n_triggers",
    ),
    "float for int": (
        GOOD_RECIPE.replace("n_triggers = 100", "n_triggers = 1.5"),
        "parameters.n_triggers",
    ),
    "out of range": (
        GOOD_RECIPE.replace("n_triggers = 100", "n_triggers = 0"),
        "parameters.n_triggers",
    ),
    "negative code": (GOOD_RECIPE.replace("start = 0", "start = -4"), "parameters.codes.start"),
    "stop below start": (
        GOOD_RECIPE.replace("stop = 63", "stop = -1").replace("start = 0,", "start = 5,"),
        "parameters.codes",
    ),
    "unknown parameter": (GOOD_RECIPE + "speed = 3\n", "parameters.speed: unknown key"),
    "missing required parameter": (
        AWC.replace("intensities_pct = [20.0, 50.0]\n", ""),
        "parameters.intensities_pct: missing",
    ),
    "intensity above 100 %": (AWC.replace("50.0]", "150.0]"), "parameters.intensities_pct.1"),
    "zero step": (AWC.replace("step = 0.3125", "step = 0.0"), "parameters.thr2_uA.step"),
    "parameters not a table": (
        'kind = "threshold_scan"\nparameters = 3\n',
        "parameters: expected a table",
    ),
    "bar not in stand": (AWC + "bars = [0, 99]\n", "bars [99] are not in stand"),
    "hptdc recipe on tofhir stand": (
        'kind = "hptdc_timewalk"\n[parameters]\n'
        "intensities_pct = {start=10.0, stop=20.0, step=5.0}\n",
        "needs a HPTDC stand",
    ),
}

SIM = resolve_stand("sim").read_text()

BAD_STANDS = {
    "stand not TOML": ("[[[", "not valid TOML"),
    "stand missing readout": (SIM.replace('readout = "tofhir"\n', ""), "readout: missing"),
    "stand unknown driver": (
        SIM.replace('driver = "LaserPulser"', 'driver = "Toaster"'),
        "instruments.laser.driver",
    ),
    "stand bad timeout": (SIM.replace("timeout_s = 2.0", "timeout_s = -1.0", 1), "timeout_s"),
    "stand duplicate channel": (
        SIM.replace("channel =  1,", "channel =  0,"),
        "channel numbers must be unique",
    ),
    "stand safe_order unknown": (
        SIM.replace('safe_order = ["laser", "readout", "dac"]', 'safe_order = ["laser", "pump"]'),
        "safe_order",
    ),
    "stand channel of wrong type": (SIM.replace("bar =  0,", 'bar = "zero",', 1), "channels.0.bar"),
    "stand no dac on tofhir": (SIM.replace("[instruments.dac]", "[unused]"), "unused: unknown key"),
}


@pytest.fixture
def no_instruments(instrument_log):
    """The test's bad input must not reach any instrument (recorded at the transports)."""
    yield
    assert instrument_log == [], f"an instrument was touched: {instrument_log[:5]}"


def _run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_exit_2(case, tmp_path, capsys, no_instruments):
    text, expected = BAD_RECIPES[case]
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    code, out, err = _run_cli(
        ["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("case", sorted(BAD_STANDS))
def test_bad_stand_is_one_line_exit_2(case, tmp_path, capsys, no_instruments):
    text, expected = BAD_STANDS[case]
    path = tmp_path / "stand.toml"
    path.write_text(text)
    code, out, err = _run_cli(
        ["run", "threshold-scan", "--stand", str(path), "--out", str(tmp_path)], capsys
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(path) in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "no-such-recipe"], "no such recipe file and no shipped recipe"),
        (["run", "missing.toml"], "missing.toml: no such recipe file"),
        (["run", "threshold-scan", "--stand", "no-such-stand"], "no shipped stand of that name"),
        (["run", "threshold-scan", "--seed", "abc"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
        (["analyze", "missing.h5"], "missing.h5"),
        (["info", "missing.h5"], "missing.h5"),
    ],
)
def test_bad_command_line(argv, expected, capsys, no_instruments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_bad_recipe_through_the_installed_command(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("kind = 'threshold_scan'\n[parameters]\nn_triggers = -5\n")
    proc = subprocess.run(
        [sys.executable, "-m", "teststand.cli", "run", str(path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "parameters.n_triggers" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*.h5")), "no run file for a bad recipe"


def test_every_shipped_recipe_and_stand_validates():
    from teststand.sequences import load_recipe, shipped_recipes
    from teststand.station import load_stand, shipped_stands

    for name in shipped_recipes():
        load_recipe(name)
    for name in shipped_stands():
        load_stand(name)
    assert {"threshold-scan", "awc-calibration", "hptdc-timewalk"} <= set(shipped_recipes())
    assert {"sim", "sim-hptdc"} <= set(shipped_stands())


def test_example_lab_stand_validates():
    from teststand.station import load_stand

    example = Path(__file__).resolve().parents[2] / "docs" / "example-lab.toml"
    stand = load_stand(str(example))
    assert not stand.simulated
