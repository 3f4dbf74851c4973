"""The simulated instruments end in their safe state on every way out of a run.

The state is read back from the simulated instruments themselves (through their drivers) when the
``stop`` document arrives, that is after the engine's safe state and before the stand is closed.
"""

from __future__ import annotations

import numpy as np
import pytest

from teststand.app.runner import run_recipe

RECIPE = """
kind = "threshold_scan"
[parameters]
codes = { start = 0, stop = 30, step = 1 }
n_triggers = 200
laser_modes = ["on"]
laser_intensity_pct = 40.0
"""


def _instrument_state(station):
    inst = station.instruments
    return {
        "laser_output": inst["laser"].output_enabled,
        "acquiring": inst["readout"].acquiring,
        "t1_codes": np.asarray(inst["dac"].codes("t1")),
        "t2_codes": np.asarray(inst["dac"].codes("t2")),
        "all_safe": all(i.is_safe() for i in inst.values()),
    }


def _run(tmp_path, inject=None):
    path = tmp_path / "scan.toml"
    path.write_text(RECIPE)
    seen: dict = {}
    during: dict = {}

    def on_engine(engine, station):
        def watch(name, doc):
            if name == "step" and doc["index"] == 2:
                during.update(_instrument_state(station))
                if inject is not None:
                    inject(engine, station)
            if name == "stop":
                seen.update(_instrument_state(station))
                seen["status"] = doc["status"]

        engine.subscribe(watch)

    outcome = run_recipe(str(path), "sim", tmp_path, seed=1, on_engine=on_engine)
    return outcome, during, seen


def _assert_safe(seen):
    assert seen["laser_output"] is False or seen["laser_output"] == 0
    assert not seen["acquiring"]
    assert np.all(seen["t1_codes"] == 63) and np.all(seen["t2_codes"] == 63)
    assert seen["all_safe"]


def test_safe_after_normal_end(tmp_path):
    outcome, during, seen = _run(tmp_path)
    assert outcome.result.status == "completed"
    assert during["laser_output"], "the laser was on during the scan"
    assert not np.all(during["t1_codes"] == 63)
    _assert_safe(seen)


def test_safe_after_instrument_fault_mid_scan(tmp_path):
    def fault(engine, station):
        station.instruments["readout"].transport.inject_fault("timeout", "FETCH?")

    outcome, _, seen = _run(tmp_path, fault)
    assert outcome.result.status == "failed"
    assert "readout" in outcome.result.reason
    assert outcome.result.n_steps == 3, "the completed steps are kept"
    _assert_safe(seen)


def test_safe_after_exception_mid_scan(tmp_path):
    def boom(engine, station):
        raise RuntimeError("subscriber crashed")

    outcome, _, seen = _run(tmp_path, boom)
    assert outcome.result.status == "failed" and "subscriber crashed" in outcome.result.reason
    _assert_safe(seen)


def test_safe_after_abort(tmp_path):
    outcome, _, seen = _run(
        tmp_path, lambda engine, station: engine.abort("operator pressed abort")
    )
    assert outcome.result.status == "aborted"
    assert seen["status"] == "aborted"
    _assert_safe(seen)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_safe_after_signal(tmp_path, signal_name):
    import os
    import signal

    from teststand._terminal import Signals

    signals = Signals(hardware=True)

    def send(engine, station):
        signals.on_signal = lambda reason: engine.abort(reason, signal=True)
        os.kill(os.getpid(), getattr(signal, signal_name))

    signals.install()
    try:
        outcome, _, seen = _run(tmp_path, send)
    finally:
        signals.restore()
    assert outcome.result.status == "interrupted"
    assert signals.received == [signal_name]
    _assert_safe(seen)
