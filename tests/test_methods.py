"""Online and offline analysis are the same; constants files; bad run files and bad data."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from teststand import cli
from teststand.app.constants import export_constants, load_constants
from teststand.app.methods import OnlineAnalysis, run_method
from teststand.app.runner import run_recipe
from teststand.errors import ConstantsError
from teststand.storage import RunFile

SCAN = """
kind = "threshold_scan"
[parameters]
codes = { start = 0, stop = 40, step = 1 }
n_triggers = 300
laser_modes = ["off", "on"]
"""


def assert_tables_equal(a: np.ndarray, b: np.ndarray, rtol: float = 1e-9) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    for name in a.dtype.names or ():
        x, y = a[name], b[name]
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=0, equal_nan=True, err_msg=name)
        else:
            assert np.array_equal(x, y), name


@pytest.fixture(scope="module")
def scan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan")
    recipe = out / "scan.toml"
    recipe.write_text(SCAN)
    refreshed = []
    online = OnlineAnalysis(min_refresh_s=0.0, listeners=[refreshed.append])
    outcome = run_recipe(str(recipe), "sim", out, seed=11, online=online)
    assert outcome.result.status == "completed"
    return outcome, refreshed


def test_online_result_equals_offline(scan_run):
    outcome, refreshed = scan_run
    assert outcome.analysis is not None and outcome.analysis.method == "scurve"
    with RunFile(outcome.run_path) as run:
        offline = run_method(run, None, {})
        stored, attrs = run.analysis("scurve")
    assert_tables_equal(outcome.analysis.table, offline.table)
    assert_tables_equal(stored, offline.table)
    assert attrs["online"] and attrs["method"] == "scurve"


def test_online_fit_refreshes_after_every_step(scan_run):
    _, refreshed = scan_run
    assert len(refreshed) == 82  # 41 laser-off + 41 laser-on steps, refresh interval 0
    assert [r.n_steps for r in refreshed] == list(range(1, 83))
    early = refreshed[5].table
    assert np.all(early["flag"] != ""), "six codes are not enough for an S-curve yet"


def test_constants_round_trip_and_checksum(tmp_path, scan_run):
    outcome, _ = scan_run
    table = outcome.analysis.table
    path = tmp_path / "scurve.json"
    export_constants(path, method="scurve", table=table, run_id="abc", valid_from="2026-11-22")
    loaded = load_constants(path, "scurve")
    assert loaded.run_id == "abc" and loaded.meta["software_version"]
    assert_tables_equal(loaded.table, table, rtol=0)
    data = json.loads(path.read_text())
    data["table"]["rows"][0][1] += 0.5  # someone "fixes" a baseline by hand
    path.write_text(json.dumps(data))
    with pytest.raises(ConstantsError, match="checksum mismatch"):
        load_constants(path)
    with pytest.raises(ConstantsError, match="expected 'awc'"):
        export_constants(path, method="scurve", table=table, run_id="x")
        load_constants(path, "awc")


def test_analyze_exports_constants_and_refuses_tampered_ones(tmp_path, scan_run, capsys):
    outcome, _ = scan_run
    out = tmp_path / "c.json"
    assert cli.main(["analyze", str(outcome.run_path), "--export", str(out)]) == 0
    meta = json.loads(out.read_text())
    assert meta["method"] == "scurve" and meta["run_id"] and len(meta["sha256"]) == 64
    assert meta["valid_from"] and meta["valid_until"] is None
    text = out.read_text().replace('"method": "scurve"', '"method": "awc"')
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    capsys.readouterr()
    code = cli.main(
        ["analyze", str(outcome.run_path), "--method", "awc_validation", "--constants", str(bad)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "checksum mismatch" in err and len(err.strip().splitlines()) == 1


def _copy_without(src, dst, drop=None, attrs=None):
    with h5py.File(src, "r", swmr=True) as f, h5py.File(dst, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for key in f:
            if key != drop:
                f.copy(key, g)
        for key, value in (attrs or {}).items():
            g.attrs[key] = value


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"drop": "steps"}, "steps"),
        ({"attrs": {"format_version": 2}}, "format version"),
        ({"attrs": {"format": "someone.else"}}, "format"),
    ],
)
def test_bad_run_files_are_one_line_exit_2(tmp_path, scan_run, capsys, change, expected):
    outcome, _ = scan_run
    bad = tmp_path / "bad.h5"
    _copy_without(outcome.run_path, bad, **change)
    capsys.readouterr()
    code = cli.main(["analyze", str(bad)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err


def test_not_hdf5_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "notes.h5"
    path.write_text("not a run file")
    assert cli.main(["analyze", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_unknown_method_and_parameter_are_exit_2(scan_run, capsys):
    outcome, _ = scan_run
    assert cli.main(["analyze", str(outcome.run_path), "--method", "astrology"]) == 2
    assert cli.main(["analyze", str(outcome.run_path), "--param", "speed=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "expected one of" in err[0] and "no parameter 'speed'" in err[1]


def test_scurve_flags_bad_data_instead_of_numbers():
    from teststand.analysis import ScurveAccumulator
    from teststand.core.hits import CHANNEL_DTYPE, empty_hits

    channels = np.zeros(4, dtype=CHANNEL_DTYPE)
    channels["channel"] = np.arange(4)
    acc = ScurveAccumulator(channels, ["laser", "thr_code"])
    rng = np.random.default_rng(1)
    for step, code in enumerate(range(0, 30)):
        n = 200
        p = np.array([1 - 0.5 * (1 + np.tanh((code - 12) / 1.2)), 0.0, 0.0, 0.0])
        p[1] = 1.0  # channel 1 fires at every code: no edge in the scan
        fired = rng.random((n, 4)) < p
        fired[:, 2] = False  # channel 2 never fires: no hits
        ev, ch = np.nonzero(fired)
        hits = empty_hits(ev.size)
        hits["event"], hits["channel"] = ev, ch
        hits["t1"][::7] = np.nan  # NaN times do not matter to a count
        if step == 3:
            hits = hits[:0]  # an empty step
        acc.add_hits(step, hits)
        acc.end_step(step, {"laser": 0.0, "thr_code": float(code), "n_triggers": n, "n_hits": 0})
    table = acc.fit()
    # the empty step is left out and said so; the good channel keeps its fit
    assert table["flag"][0] == "empty_step" and abs(table["baseline_code"][0] - 12) < 0.3
    for ch in (1, 2, 3):
        assert table["flag"][ch] != "", ch
        assert np.isnan(table["baseline_code"][ch]) or "no_plateau" in table["flag"][ch]
    assert "no_hits" in table["flag"][2]


def _online_vs_offline(tmp_path, recipe_text, stand, seed, constants=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(recipe_text)
    online = OnlineAnalysis(constants=constants)
    outcome = run_recipe(str(recipe), stand, tmp_path, seed=seed, online=online)
    assert outcome.result.status == "completed" and online.error == ""
    with RunFile(outcome.run_path) as run:
        offline = run_method(run, None, {}, constants)
    assert_tables_equal(outcome.analysis.table, offline.table)
    return outcome


def test_online_equals_offline_for_timewalk_and_resolution(tmp_path):
    tw = _online_vs_offline(
        tmp_path / "tw",
        'kind = "hptdc_timewalk"\n[parameters]\n'
        "intensities_pct = {start = 20.0, stop = 100.0, step = 10.0}\nn_pulses = 1500\n",
        "sim-hptdc",
        seed=21,
    )
    assert tw.analysis.method == "timewalk"
    export_constants(tmp_path / "tw.json", method="timewalk", table=tw.analysis.table, run_id="tw")
    constants = load_constants(tmp_path / "tw.json", "timewalk")
    res = _online_vs_offline(
        tmp_path / "res",
        'kind = "timing_resolution"\n[parameters]\nintensities_pct = [60.0]\nn_pulses = 3000\n',
        "sim-hptdc",
        seed=21,
        constants=constants,
    )
    assert res.analysis.method == "resolution"
    assert np.all(np.isfinite(res.analysis.table["sigma_ps"]))


def test_calibration_chain_through_the_command_line(tmp_path, capsys):
    """awc-calibration -> constants file -> awc-validation and timing-alignment with them."""
    cal = tmp_path / "cal.toml"
    cal.write_text(
        'kind = "awc_calibration"\n[parameters]\nbars = [1, 6]\n'
        "intensities_pct = [30.0, 45.0, 60.0, 80.0, 100.0]\n"
        "thr2_uA = {start = 5.0, stop = 10.5, step = 0.3125}\nn_pulses = 300\n"
        "baseline_scan = {start = 0, stop = 35, step = 1}\n"
    )
    constants = tmp_path / "awc.json"
    args = ["--out", str(tmp_path), "--seed", "9", "--no-progress"]
    assert cli.main(["run", str(cal), *args, "--export-constants", str(constants)]) == 0
    table = load_constants(constants, "awc").table
    lit = np.isin(table["channel"], [1, 6, 17, 22])
    assert np.all(np.isfinite(table["awc_uA"][lit])) and np.all(np.isfinite(table["baseline_code"]))
    val = tmp_path / "val.toml"
    val.write_text(
        'kind = "awc_validation"\n[parameters]\nintensities_pct = [25.0, 50.0, 100.0]\n'
        "n_pulses = 300\n"
    )
    capsys.readouterr()
    assert cli.main(["run", str(val), *args, "--constants", str(constants)]) == 0
    out = capsys.readouterr().out
    assert "analysis: awc_validation" in out and "residual_walk_ns" in out
    run_file = out.split("run file: ")[1].split()[0]
    with RunFile(run_file) as run:
        assert "baseline_codes taken from constants" in run.recipe_text
        assert run.steps.size == 3, "no noise scan: the baselines came with the constants"
        table, attrs = run.analysis("awc_validation")
        assert attrs["constants_run_id"] and attrs["online"]
    align = tmp_path / "align.toml"
    align.write_text(
        'kind = "timing_alignment"\n[parameters]\nintensities_pct = [60.0]\nn_pulses = 500\n'
    )
    assert cli.main(["run", str(align), *args, "--constants", str(constants)]) == 0
    out = capsys.readouterr().out
    assert "analysis: offsets" in out and "offset_ns" in out
    # a method that applies no constants refuses them before touching an instrument
    assert cli.main(["run", str(cal), *args, "--constants", str(constants)]) == 2
