"""SIGTERM and SIGINT to a running ``teststand run``: safe state, completed steps kept, exit 1."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from teststand.storage import RunFile


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_run_interrupted_with_steps_kept(tmp_path, sig):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teststand.cli",
            "run",
            "awc-calibration",
            "--out",
            str(tmp_path),
            "--seed",
            "2",
            "--no-progress",
            "--no-analysis",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        steps = 0
        while time.monotonic() < deadline and steps < 50:
            time.sleep(0.2)
            files = list(tmp_path.glob("*.h5"))
            if files:
                try:
                    with RunFile(files[0]) as run:
                        steps = run.steps.size
                except Exception:  # noqa: BLE001 - the file may be between creation and SWMR
                    steps = 0
        assert steps >= 50, "the run did not get going"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "interrupted" in out
    with RunFile(next(tmp_path.glob("*.h5"))) as run:
        assert run.status == "interrupted"
        assert run.steps.size >= steps
        assert run.steps.size < 2249
        assert int(run.steps["n_hits"].sum()) == run.n_hits
    log_text = next(tmp_path.glob("*.log")).read_text()
    assert signal.Signals(sig).name in log_text
    assert "safe state" in log_text
