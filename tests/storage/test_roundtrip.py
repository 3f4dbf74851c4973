"""RunWriter -> RunFile: every field comes back exactly; the file reads with plain h5py."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from teststand.core.hits import HIT_DTYPE
from teststand.errors import RunFileError
from teststand.storage import CHANNEL_DTYPE, HITS_CHUNK_ROWS, RunFile, RunWriter, steps_dtype

from ._runs import (
    AXES,
    assert_same,
    channels,
    expected_hits,
    make_hits,
    run_docs,
    start_doc,
    step_docs,
    truth,
)

HITS_PER_STEP = [5000, 0, 3 * HITS_CHUNK_ROWS + 17, 250]


@pytest.fixture
def run_path(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    for name, doc in run_docs(HITS_PER_STEP, block=7000):
        writer(name, doc)
    assert not writer.recording and writer.n_steps == len(HITS_PER_STEP)
    return path


def test_metadata_round_trip(run_path):
    start = start_doc()
    with RunFile(run_path) as run:
        attrs = run.attrs
        assert attrs == {
            "format": "teststand.run",
            "format_version": 1,
            "run_id": "r0001",
            "recipe": "awc-test",
            "kind": "awc_calibration",
            "status": "completed",
            "started_utc": "2026-01-02T03:04:05+00:00",
            "finished_utc": "2026-01-02T04:00:00+00:00",
            "stop_reason": "done",
            "software_version": "0.1.0",
            "stand": "bench-sim",
            "simulated": True,
            "settings_sha256": "ab" * 32,
            "seed": 1234,
            "n_steps_planned": 3,
        }
        assert (run.run_id, run.kind, run.status, run.simulated) == (
            "r0001",
            "awc_calibration",
            "completed",
            True,
        )
        assert run.recipe_text == start["recipe_text"]
        assert run.stand_text == start["stand_text"]
        assert run.instruments == start["instruments"]
        assert run.channels.dtype == CHANNEL_DTYPE
        np.testing.assert_array_equal(run.channels, channels())
        assert run.truth.dtype == truth().dtype
        np.testing.assert_array_equal(run.truth, truth())
        assert run.truth_attrs == start["truth_attrs"]


def test_steps_and_hits_round_trip(run_path):
    expected = expected_hits(HITS_PER_STEP)
    with RunFile(run_path) as run:
        assert run.axes == AXES
        steps = run.steps
        assert steps.dtype == steps_dtype(AXES)
        np.testing.assert_array_equal(steps["index"], np.arange(len(HITS_PER_STEP)))
        np.testing.assert_array_equal(steps["n_hits"], HITS_PER_STEP)
        np.testing.assert_array_equal(steps["first_hit"], np.cumsum([0, *HITS_PER_STEP[:-1]]))
        np.testing.assert_array_equal(steps["intensity"], np.arange(1, 5.0))
        np.testing.assert_array_equal(steps["thr2"], 2 * np.arange(1, 5.0))
        np.testing.assert_array_equal(steps["n_triggers"], 100 * np.arange(1, 5))
        np.testing.assert_array_equal(steps["t_start"], 1000.0 + np.arange(4))
        np.testing.assert_array_equal(steps["t_stop"], 1000.5 + np.arange(4))
        assert run.n_hits == sum(HITS_PER_STEP)
        for index, hits in enumerate(expected):
            got = run.step_hits(index)
            assert got.dtype == HIT_DTYPE
            assert_same(got, hits)
        assert_same(run.hits(), np.concatenate(expected))
        assert_same(run.hits(4990, 5010), np.concatenate(expected)[4990:5010])
        iterated = list(run.iter_steps())
        assert [int(s["index"]) for s, _ in iterated] == [0, 1, 2, 3]
        for (_, hits), want in zip(iterated, expected, strict=True):
            assert_same(hits, want)
        with pytest.raises(IndexError):
            run.step_hits(99)


def test_columns(run_path):
    expected = expected_hits(HITS_PER_STEP)
    with RunFile(run_path) as run:
        every = run.columns(["t1", "channel"])
        assert set(every) == {"t1", "channel", "step"}
        np.testing.assert_array_equal(every["t1"], np.concatenate(expected)["t1"])
        np.testing.assert_array_equal(every["step"], np.repeat(np.arange(4), HITS_PER_STEP))
        # A selection in any order: hits come in that order, "step" is the position in it.
        picked = run.columns(("q", "thr2"), steps=np.array([3, 0]))
        np.testing.assert_array_equal(
            picked["q"], np.concatenate([expected[3]["q"], expected[0]["q"]])
        )
        np.testing.assert_array_equal(picked["step"], np.repeat([0, 1], [250, 5000]))
        np.testing.assert_array_equal(picked["thr2"], np.repeat([8.0, 2.0], [250, 5000]))
        masked = run.columns("event", steps=run.steps["n_hits"] > 1000)
        np.testing.assert_array_equal(
            masked["event"], np.concatenate([expected[0], expected[2]])["event"]
        )
        assert run.columns("t2", steps=[1])["t2"].size == 0
        with pytest.raises(ValueError, match="no column 'volts'"):
            run.columns(["volts"])
        with pytest.raises(IndexError):
            run.columns(["t1"], steps=[7])


def test_plain_h5py_reads_the_layout(run_path):
    """What docs/data-format.md promises to readers without teststand."""
    with h5py.File(run_path, "r") as f:
        assert f.attrs["format"] == "teststand.run" and f.attrs["format_version"] == 1
        assert isinstance(f.attrs["status"], str) and f.attrs["simulated"] is np.True_
        assert f["hits"].dtype == HIT_DTYPE and f["hits"].chunks == (HITS_CHUNK_ROWS,)
        assert f["hits"].maxshape == (None,) and f["hits"].compression is None
        assert f["steps"].dtype == np.dtype(
            [
                ("index", "<u4"),
                ("intensity", "<f8"),
                ("thr2", "<f8"),
                ("first_hit", "<u8"),
                ("n_hits", "<u8"),
                ("n_triggers", "<u8"),
                ("t_start", "<f8"),
                ("t_stop", "<f8"),
            ]
        )
        assert f["channels"].dtype == CHANNEL_DTYPE
        assert f["recipe"].asstr()[()].startswith('name = "awc-test"')
        assert f["instruments/laser"].attrs["idn"] == "SIM,LASER,123,1.0"
        step = f["steps"][2]
        hits = f["hits"][step["first_hit"] : step["first_hit"] + step["n_hits"]]
        assert_same(hits, expected_hits(HITS_PER_STEP)[2])


def test_incomplete_step_is_cut_at_stop(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, flush_interval_s=0.0)  # every hits block reaches the file at once
    writer("start", start_doc())
    docs, first = step_docs(0, 3000)
    for name, doc in docs:
        writer(name, doc)
    docs, _ = step_docs(1, HITS_CHUNK_ROWS + 500, block=20000, event_base=3000)
    for name, doc in docs[:-1]:  # no "step" document: the step never completed
        writer(name, doc)
    with h5py.File(path, "r", swmr=True) as f:
        assert f["hits"].shape[0] == 3000 + HITS_CHUNK_ROWS + 500  # streamed, not yet recorded
    writer(
        "stop",
        {
            "status": "aborted",
            "finished_utc": "2026-01-02T05:00:00+00:00",
            "reason": "aborted by the user",
        },
    )
    with RunFile(path) as run:
        assert (run.status, run.attrs["stop_reason"]) == ("aborted", "aborted by the user")
        assert run.steps.size == 1 and run.n_hits == 3000
        assert run.file["hits"].shape == (3000,)
        assert_same(run.hits(), first)


def test_retried_step_keeps_only_the_last_attempt(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path, flush_interval_s=0.0)
    writer("start", start_doc())
    docs, _ = step_docs(0, 4000, seed=1)
    for name, doc in docs[:-1]:
        writer(name, doc)
    docs, second = step_docs(0, 2500, seed=2)
    for name, doc in docs:
        writer(name, doc)
    writer("stop", {"status": "completed", "finished_utc": "x", "reason": ""})
    with RunFile(path) as run:
        np.testing.assert_array_equal(run.steps["n_hits"], [2500])
        assert_same(run.hits(), second)


def test_close_without_stop_leaves_a_resumable_file(tmp_path):
    path = tmp_path / "run.h5"
    with RunWriter(path, flush_interval_s=0.0) as writer:
        writer("start", start_doc())
        docs, hits = step_docs(0, 1500)
        for name, doc in docs:
            writer(name, doc)
        writer("hits", {"index": 1, "hits": make_hits(700, first_event=1500)})
    with RunFile(path) as run:
        assert run.status == "running" and run.attrs["finished_utc"] == ""
        assert run.file["hits"].shape == (1500,)
        assert_same(run.hits(), hits)


def test_stop_without_start_is_ignored(tmp_path, caplog):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    with caplog.at_level(logging.WARNING):
        writer("stop", {"status": "failed", "finished_utc": "", "reason": "no instruments"})
        writer("hits", {"index": 0, "hits": make_hits(3, first_event=0)})
    assert not path.exists()
    assert "without an open run" in caplog.text
    writer("event", {})  # unknown documents are ignored


def test_never_overwrites_and_checks_documents(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious")
    with pytest.raises(RunFileError, match="already exists"):
        RunWriter(path)("start", start_doc())
    assert path.read_bytes() == b"precious"

    other = tmp_path / "other.h5"
    with pytest.raises(ValueError, match="lacks recipe_text"):
        RunWriter(other)("start", {k: v for k, v in start_doc().items() if k != "recipe_text"})
    with pytest.raises(ValueError, match="n_hits"):
        RunWriter(other)("start", start_doc(axes=["thr1", "n_hits"]))
    assert not other.exists()

    writer = RunWriter(other)
    writer("start", start_doc(with_truth=False, seed=None))
    bad = np.zeros(3, dtype=[("event", "<u8"), ("t1", "<f8")])
    with pytest.raises(ValueError, match="fields"):
        writer("hits", {"index": 0, "hits": bad})
    with pytest.raises(ValueError, match="stop status"):
        writer("stop", {"status": "done"})
    writer("stop", {"status": "failed", "reason": "test"})
    with RunFile(other) as run:
        assert run.truth is None and run.truth_attrs == {} and "seed" not in run.attrs
        assert run.status == "failed" and run.attrs["finished_utc"]
        assert run.steps.size == 0 and run.n_hits == 0
        assert run.columns(["t1"])["t1"].size == 0
