"""The progress display: steps, percentage and ETA from the document stream."""

from __future__ import annotations

import io

from teststand.cli import Progress


def test_progress_prints_each_tenth_and_the_end_once():
    stream = io.StringIO()
    progress = Progress(stream, label="SIMULATED ")
    progress("start", {"n_steps": 20})
    for k in range(20):
        progress("step", {"index": k})
    progress("stop", {"status": "completed"})
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("SIMULATED [") for line in lines)
    assert "20/20 steps 100.0%" in lines[-1] and "ETA" in lines[-1]
    assert sum("20/20" in line for line in lines) == 1
    assert 10 <= len(lines) <= 11


def test_progress_of_an_aborted_run_ends_with_its_last_step():
    stream = io.StringIO()
    progress = Progress(stream)
    progress("start", {"n_steps": 100})
    for k in range(7):
        progress("step", {"index": k})
    progress("stop", {"status": "aborted"})
    assert "7/100 steps" in stream.getvalue().splitlines()[-1]
