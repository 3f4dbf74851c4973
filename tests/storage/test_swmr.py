"""Following a run while it is written, in this process and from another one; crash safety."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from teststand.storage import RunFile, RunWriter

from ._runs import assert_same, make_hits, run_docs, step_docs

WRITER = Path(__file__).with_name("writer_process.py")


def _spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_follower_in_the_same_process(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    docs = list(run_docs([2000, 70000, 300]))
    writer(*docs[0])
    follower = RunFile(path)  # stays open across the stop, as a GUI's would
    seen = []
    for name, doc in docs[1:]:
        writer(name, doc)
        if name == "step":
            follower.refresh()
            recorded = follower.step_hits(doc["index"]).size
            seen.append((follower.steps.size, follower.status, recorded))
    follower.refresh()
    assert seen == [(1, "running", 2000), (2, "running", 70000), (3, "running", 300)]
    assert (follower.status, follower.n_hits) == ("completed", 72300)
    follower.close()
    # The file is sound for a reader in a fresh process, without SWMR.
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import h5py; f = h5py.File({str(path)!r}, 'r'); "
            "print(f.attrs['status'], f['hits'].shape[0], f['steps'].shape[0])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.split() == ["completed", "72300", "3"]


def test_follower_in_another_process(tmp_path):
    """The writer sets the final status while this process still has the file open."""
    path = tmp_path / "run.h5"
    n_steps, n_hits = 6, 20000
    counts = []
    with _spawn(path, n_steps, n_hits, 0.15) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().strip() == "step 0"
        with RunFile(path) as run:
            deadline = time.monotonic() + 20
            while run.status == "running" and time.monotonic() < deadline:
                counts.append(run.steps.size)
                if run.steps.size:  # the hits of every recorded step are readable
                    last = run.steps[-1]
                    assert run.step_hits(int(last["index"])).size == int(last["n_hits"])
                time.sleep(0.05)
                run.refresh()
            assert proc.wait(timeout=20) == 0, proc.stderr.read()
            assert run.status == "completed"
            assert run.steps.size == n_steps and run.n_hits == n_steps * n_hits
    assert any(0 < c < n_steps for c in counts), counts
    assert counts == sorted(counts)


def test_crash_keeps_completed_steps_and_reopen_resumes(tmp_path):
    path = tmp_path / "run.h5"
    n_steps, n_hits = 3, 9000
    proc = _spawn(path, n_steps, n_hits, 0.0, "crash")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.split()[-1] == "crash", err

    # A dead writer leaves its mark: plain readers are refused, SWMR readers are not.
    with pytest.raises(OSError):
        h5py.File(path, "r")
    with RunFile(path) as run:
        assert run.status == "running" and run.attrs["finished_utc"] == ""
        assert run.steps.size == n_steps
        np.testing.assert_array_equal(run.steps["n_hits"], [n_hits] * n_steps)
        assert run.file["hits"].shape[0] > n_steps * n_hits  # half a step in flight
        for index in range(n_steps):
            hits = run.step_hits(index)
            assert_same(hits, step_docs(index, n_hits, event_base=index * n_hits)[1])

    writer = RunWriter.reopen(path)
    assert (writer.n_steps, writer.n_hits) == (n_steps, n_steps * n_hits)
    writer("start", {"run_id": "r0001"})  # a resumed run's start document is accepted
    docs, last = step_docs(n_steps, 500, event_base=n_steps * n_hits)
    for name, doc in docs:
        writer(name, doc)
    writer("stop", {"status": "completed", "finished_utc": "later", "reason": "resumed"})

    with h5py.File(path, "r") as f:  # the mark is gone
        assert f.attrs["status"] == "completed"
    with RunFile(path) as run:
        np.testing.assert_array_equal(run.steps["index"], np.arange(n_steps + 1))
        np.testing.assert_array_equal(run.steps["first_hit"], n_hits * np.arange(n_steps + 1))
        assert run.n_hits == run.file["hits"].shape[0] == n_steps * n_hits + 500
        assert_same(run.step_hits(n_steps), last)


def test_reopen_refuses_a_completed_run(tmp_path):
    path = tmp_path / "run.h5"
    writer = RunWriter(path)
    for name, doc in run_docs([10]):
        writer(name, doc)
    from teststand.errors import RunFileError

    with pytest.raises(RunFileError, match="completed"):
        RunWriter.reopen(path)


def test_flushes_while_hits_stream(tmp_path):
    """A follower sees the hits of the step in flight within flush_interval_s."""
    path = tmp_path / "run.h5"
    writer = RunWriter(path, flush_interval_s=0.05)
    for name, doc in run_docs([]):
        if name == "stop":
            break
        writer(name, doc)
    writer("hits", {"index": 0, "hits": make_hits(100, first_event=0)})
    time.sleep(0.06)
    writer("hits", {"index": 0, "hits": make_hits(100, first_event=25)})
    with RunFile(path) as run:
        assert run.file["hits"].shape[0] == 200 and run.steps.size == 0 and run.n_hits == 0
    writer.close()
