"""Whole recipes on the simulated stands, checked against the simulator's truth."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from teststand import cli
from teststand.app.methods import run_method
from teststand.app.runner import run_recipe
from teststand.sequences import load_recipe
from teststand.storage import RunFile


def _small_recipe(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("seed", [1, 2])
def test_threshold_scan_recovers_baseline_and_noise(tmp_path, seed):
    outcome = run_recipe("threshold-scan", "sim", tmp_path, seed=seed)
    assert outcome.result.status == "completed"
    with RunFile(outcome.run_path) as run:
        assert run.status == "completed" and run.simulated
        assert run.steps.size == 128
        truth = run.truth
        result = run_method(run, "scurve", {})
    table = result.table
    assert np.array_equal(table["channel"], truth["channel"])
    baseline_error = table["baseline_code"] - truth["baseline"]
    noise_error = table["noise_code"] / truth["noise"] - 1
    assert np.all(np.abs(baseline_error) < 0.2), baseline_error
    assert np.all(np.abs(noise_error) < 0.10), noise_error


def test_same_seed_same_hits(tmp_path):
    recipe = _small_recipe(
        tmp_path,
        "tiny",
        'kind = "threshold_scan"\n[parameters]\ncodes = {start = 8, stop = 20, step = 4}\n'
        "n_triggers = 50\n",
    )
    a = run_recipe(recipe, "sim", tmp_path / "a", seed=5).run_path
    b = run_recipe(recipe, "sim", tmp_path / "b", seed=5).run_path
    c = run_recipe(recipe, "sim", tmp_path / "c", seed=6).run_path
    with RunFile(a) as ra, RunFile(b) as rb, RunFile(c) as rc:
        assert ra.n_hits > 0 and ra.hits().tobytes() == rb.hits().tobytes()
        assert not np.array_equal(ra.truth, rc.truth)


def test_awc_calibration_file_is_valid_v1(tmp_path):
    """The shipped recipe, shortened to two bars: the step table matches the recipe."""
    text = load_recipe("awc-calibration").text.replace('bars = "all"', "bars = [3, 11]")
    recipe = _small_recipe(tmp_path, "awc-two-bars", text)
    outcome = run_recipe(recipe, "sim", tmp_path, seed=3)
    assert outcome.result.status == "completed"
    params = load_recipe(recipe).params
    # T2 is set a whole number of DAC steps (0.3125 uA) from T1: /steps holds the gap set
    thr2 = [6.0 + round((t - 6.0) / 0.3125) * 0.3125 for t in params.thr2_uA.values()]
    n_noise = len(params.baseline_scan.values())
    with h5py.File(outcome.run_path, "r") as f:
        attrs = dict(f.attrs)
        assert attrs["format"] == "teststand.run" and attrs["format_version"] == 1
        assert attrs["kind"] == "awc_calibration" and attrs["status"] == "completed"
        assert attrs["simulated"] and attrs["recipe"] == "awc-calibration"
        for key in (
            "run_id",
            "started_utc",
            "finished_utc",
            "software_version",
            "stand",
            "settings_sha256",
        ):
            assert attrs[key], key
        steps = f["/steps"][()]
        hits = f["/hits"]
        assert set(f["/channels"].dtype.names) == {"channel", "plane", "bar", "board", "delay_ns"}
        assert f["/truth"].shape == (32,)
        assert set(f["/instruments"]) == {"laser", "dac", "readout"}
        assert steps.size == n_noise + 2 * 6 * 23
        main = steps[steps["laser"] == 1]
        assert main.size == 2 * 6 * 23
        # bar-major, then intensity, then thr2, exactly as the recipe lists them
        expected = [(b, i, t) for b in (3, 11) for i in params.intensities_pct for t in thr2]
        got = list(zip(main["bar"], main["intensity"], main["thr2"], strict=True))
        assert np.allclose(np.array(got), np.array(expected))
        assert np.all(main["thr1"] == 6.0)
        assert np.array_equal(steps["index"], np.arange(steps.size))
        # the hits of each step are the rows first_hit .. first_hit + n_hits, back to back
        assert np.array_equal(steps["first_hit"][1:], (steps["first_hit"] + steps["n_hits"])[:-1])
        assert int(steps["n_hits"].sum()) == hits.shape[0]
        sample = hits[int(main["first_hit"][0]) : int(main["first_hit"][0] + main["n_hits"][0])]
        assert set(np.unique(sample["channel"])) <= {3, 19}, "only bar 3's two ends fire"


def test_hptdc_timewalk_runs(tmp_path):
    recipe = _small_recipe(
        tmp_path,
        "tw",
        'kind = "hptdc_timewalk"\n[parameters]\n'
        "intensities_pct = {start = 20.0, stop = 80.0, step = 20.0}\n"
        "n_pulses = 200\n",
    )
    outcome = run_recipe(recipe, "sim-hptdc", tmp_path, seed=4)
    assert outcome.result.status == "completed"
    with RunFile(outcome.run_path) as run:
        assert run.steps.size == 4
        hits = run.hits()
        assert np.all(np.isfinite(hits["tot"])) and np.all(np.isnan(hits["t2"]))
        # leading times are HPTDC bins of 25 ns / 1024
        bins = hits["t1"] / (25.0 / 1024)
        assert np.allclose(bins, np.round(bins), atol=1e-6)


def test_cli_run_analyze_info(tmp_path, capsys):
    recipe = _small_recipe(
        tmp_path,
        "scan",
        'kind = "threshold_scan"\n[parameters]\ncodes = {start = 0, stop = 40, step = 1}\n'
        'n_triggers = 300\nlaser_modes = ["off"]\n',
    )
    assert cli.main(["run", recipe, "--out", str(tmp_path), "--seed", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    run_file = next(tmp_path.glob("*.h5"))
    assert f"run file: {run_file}" in out and "baseline_code" in out
    assert (run_file.with_suffix(".log")).read_text().count("SIMULATED") >= 1
    json_out = tmp_path / "scurve.json"
    assert cli.main(["analyze", str(run_file), "--json", str(json_out)]) == 0
    doc = json.loads(json_out.read_text())
    assert doc["method"] == "scurve" and len(doc["channels"]) == 32
    assert {"channel", "baseline_code", "noise_code"} <= set(doc["channels"][0])
    with RunFile(run_file) as run:
        table, attrs = run.analysis("scurve")
        assert attrs["method"] == "scurve" and table.size == 32
    assert cli.main(["info", str(run_file)]) == 0
    assert "threshold_scan" in capsys.readouterr().out


def test_selftest_passes_on_both_simulated_stands(capsys):
    assert cli.main(["selftest", "--stand", "sim", "--seed", "1"]) == 0
    assert cli.main(["selftest", "--stand", "sim-hptdc", "--seed", "1"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_stand_mapping_fewer_channels_than_the_dac(tmp_path):
    """A stand that maps 8 of the DAC's 32 channels: codes are still sent for all 32."""
    from teststand.station import resolve_stand

    text = resolve_stand("sim").read_text()
    head, rest = text.split("channels = [\n", 1)
    rows, tail = rest.split("\n]\n", 1)
    kept = [
        r
        for r in rows.splitlines()
        if "channel =  " in r and int(r.split("channel =")[1].split(",")[0]) < 8
    ]
    stand = tmp_path / "small.toml"
    stand.write_text(head + "channels = [\n" + "\n".join(kept) + "\n]\n" + tail)
    recipe = _small_recipe(
        tmp_path,
        "awc-small",
        'kind = "awc_calibration"\n[parameters]\nbars = [2]\nintensities_pct = [30.0, 100.0]\n'
        "thr2_uA = {start = 9.0, stop = 10.0, step = 0.3125}\nn_pulses = 50\n"
        "baseline_scan = {start = 0, stop = 30, step = 1}\n",
    )
    outcome = run_recipe(recipe, str(stand), tmp_path, seed=2)
    assert outcome.result.status == "completed", outcome.result.reason
    with RunFile(outcome.run_path) as run:
        assert run.channels.size == 8
        lit = run.hits()[run.steps["first_hit"][-1] :]
        assert set(np.unique(lit["channel"])) <= {2}


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_scurve_method_meets_the_calibration_tolerances(tmp_path, seed):
    """Issue 3: baseline within 0.1 code and noise within 5 % of /truth on every channel.

    3000 triggers per code: with the shipped 1000 the noise is known to about 2.5 % per channel,
    so the worst of 32 channels sits near 5 % by statistics alone.
    """
    recipe = _small_recipe(
        tmp_path,
        "noise",
        'kind = "threshold_scan"\n[parameters]\ncodes = {start = 0, stop = 40, step = 1}\n'
        'n_triggers = 3000\nlaser_modes = ["off"]\n',
    )
    outcome = run_recipe(recipe, "sim", tmp_path, seed=seed)
    with RunFile(outcome.run_path) as run:
        table = run_method(run, "scurve", {}).table
        truth = run.truth
    assert np.all(table["flag"] == "")
    assert np.all(np.abs(table["baseline_code"] - truth["baseline"]) < 0.1)
    assert np.all(np.abs(table["noise_code"] / truth["noise"] - 1) < 0.05)
    # the quoted errors describe the scatter: pulls of order one
    pulls = (table["baseline_code"] - truth["baseline"]) / table["baseline_code_err"]
    assert 0.5 < np.std(pulls) < 1.6
