"""write_analysis -> RunFile.analysis, and replacing an older result."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from teststand.errors import RunFileError
from teststand.storage import RunFile, RunWriter, write_analysis

from ._runs import run_docs, start_doc

AWC_DTYPE = np.dtype(
    [("channel", "<u2"), ("awc_uA", "<f8"), ("slope_lut_s", "<f8", (3,)), ("flag", "<U64")]
)


@pytest.fixture
def run_path(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    for name, doc in run_docs([100]):
        writer(name, doc)
    return path


def _table(n, offset=0.0):
    table = np.zeros(n, dtype=AWC_DTYPE)
    table["channel"] = np.arange(n)
    table["awc_uA"] = 11.5 + offset + np.arange(n)
    table["slope_lut_s"] = np.arange(3 * n).reshape(n, 3) / 7
    table["flag"] = ["", "no_plateau|too_few_triggers", "", "ünïcode"][:n]
    return table


def test_round_trip(run_path):
    table = _table(4)
    write_analysis(
        run_path,
        "awc",
        table,
        {"parameters": {"thr1_op": 6.0, "thr2_op": 10.0}, "run_id": "r0001", "n_intensities": 6},
    )
    with RunFile(run_path) as run:
        assert run.analysis_methods() == ["awc"]
        got, attrs = run.analysis("awc")
        assert run.analysis("scurve") is None
    assert got.dtype == AWC_DTYPE
    np.testing.assert_array_equal(got, table)
    assert attrs["method"] == "awc"
    assert attrs["parameters"] == {"thr1_op": 6.0, "thr2_op": 10.0}
    assert attrs["software_version"] and attrs["created_utc"].startswith("20")
    assert (attrs["run_id"], attrs["n_intensities"]) == ("r0001", 6)
    with h5py.File(run_path, "r") as f:  # plain h5py sees JSON text
        assert json.loads(f["analysis/awc"].attrs["parameters"]) == {
            "thr1_op": 6.0,
            "thr2_op": 10.0,
        }


def test_replacement(run_path):
    write_analysis(run_path, "awc", _table(4), {"parameters": {"thr2_op": 10.0}})
    write_analysis(run_path, "scurve", _table(2), {})
    newer = _table(3, offset=1.0)
    write_analysis(
        run_path,
        "awc",
        newer,
        {"parameters": '{"thr2_op": 9.0}', "software_version": "9.9", "method": "ignored"},
    )
    with RunFile(run_path) as run:
        assert run.analysis_methods() == ["awc", "scurve"]
        got, attrs = run.analysis("awc")
        assert run.analysis("scurve")[1]["parameters"] == {}
    np.testing.assert_array_equal(got, newer)
    assert attrs["parameters"] == {"thr2_op": 9.0}
    assert (attrs["method"], attrs["software_version"]) == ("awc", "9.9")


def test_refused_while_the_run_is_written(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    writer("start", start_doc())
    with pytest.raises(RunFileError, match="still being written"):
        write_analysis(path, "awc", _table(2), {})
    writer("stop", {"status": "completed", "finished_utc": "x"})
    write_analysis(path, "awc", _table(2), {})


def test_bad_input(run_path, tmp_path):
    with pytest.raises(ValueError, match="not JSON"):
        write_analysis(run_path, "awc", _table(2), {"parameters": "{oops"})
    with pytest.raises(ValueError, match="structured"):
        write_analysis(run_path, "awc", np.arange(3.0), {})
    with pytest.raises(ValueError, match="cannot name"):
        write_analysis(run_path, "a/b", _table(2), {})
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        write_analysis(text, "awc", _table(2), {})


def test_written_while_a_reader_of_this_process_has_the_file_open(run_path):
    with RunFile(run_path) as run:
        assert run.analysis_methods() == []
        write_analysis(run_path, "awc", _table(2), {})
        assert run.analysis_methods() == ["awc"]  # the reader reopened on its next use
