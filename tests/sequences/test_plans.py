"""Plans listed without hardware: their messages are the experiment."""

from __future__ import annotations

import numpy as np
import pytest

from teststand.core.hits import empty_hits
from teststand.sequences import (
    StandInfo,
    awc_calibration,
    hptdc_timewalk,
    list_messages,
    load_recipe,
    threshold_scan,
)
from teststand.station import load_stand


@pytest.fixture
def tofhir() -> StandInfo:
    return load_stand("sim").info()


@pytest.fixture
def hptdc() -> StandInfo:
    return load_stand("sim-hptdc").info()


def _steps(messages):
    return [m.kwargs["axes"] for m in messages if m.command == "open_step"]


def test_threshold_scan_messages(tofhir):
    msgs = list_messages(threshold_scan(tofhir, codes=range(64), n_triggers=100))
    assert msgs[0].command == "open_run"
    assert msgs[0].kwargs == {"axes": ["laser", "thr_code"], "n_steps": 128}
    steps = _steps(msgs)
    assert len(steps) == 128
    assert [s["thr_code"] for s in steps[:64]] == list(range(64))
    assert {s["laser"] for s in steps[:64]} == {0.0} and {s["laser"] for s in steps[64:]} == {1.0}
    # every step sets the T1 code of all 32 channels before acquiring
    t1_sets = [m for m in msgs if m.command == "call" and m.args[:2] == ("set_codes", "t1")]
    assert len(t1_sets) == 128 and all(len(m.args[2]) == 32 for m in t1_sets)
    # the laser is switched on only for the second half, and the plan ends in the safe state
    on = [
        k for k, m in enumerate(msgs) if m.command == "set" and m.args == ("output_enabled", True)
    ]
    assert len(on) == 1
    assert [m.obj for m in msgs[-3:]] == ["laser", "readout", "dac"]
    assert all(m.command == "safe_state" for m in msgs[-3:])
    acquires = [m for m in msgs if m.command == "acquire"]
    assert all(m.obj == "readout" and m.kwargs["n_triggers"] == 100 for m in acquires)


def test_threshold_scan_refuses_hptdc_stand(hptdc):
    with pytest.raises(ValueError, match="TOFHIR"):
        list_messages(threshold_scan(hptdc, codes=range(4), n_triggers=1))


def test_awc_plan_with_given_baselines(tofhir):
    baselines = np.linspace(10.2, 14.8, 32)
    thr2 = [3.0 + 0.3125 * k for k in range(23)]
    msgs = list_messages(
        awc_calibration(
            tofhir,
            bars=[0, 5],
            intensities_pct=[20, 50, 100],
            thr1_uA=6.0,
            thr2_uA=thr2,
            n_pulses=500,
            baseline_codes=baselines,
        )
    )
    steps = _steps(msgs)
    assert len(steps) == 2 * 3 * 23
    assert msgs[0].kwargs["n_steps"] == 2 * 3 * 23
    assert {s["bar"] for s in steps} == {0.0, 5.0}
    # T2 sits a whole number of DAC steps from T1: /steps records the gap actually set
    realised = [6.0 + round((t - 6.0) / 0.3125) * 0.3125 for t in thr2]
    assert sorted({s["thr2"] for s in steps}) == pytest.approx(sorted(set(realised)))
    assert {s["thr1"] for s in steps} == {6.0}
    # bar 5 is lit through fibre 6 and only its two channels (5 and 21) get thresholds
    assert any(m.command == "set" and m.args == ("fibre_channel", 6) for m in msgs)
    t2 = [m.args[2] for m in msgs if m.command == "call" and m.args[:2] == ("set_codes", "t2")]
    lit = [c for c in t2 if np.any(c < 63)]
    assert all(set(np.flatnonzero(c < 63)) in ({0, 16}, {5, 21}) for c in lit)
    # thr1 in uA above baseline: code = baseline + thr / lsb, rounded; T2 relative to T1
    t1 = next(m.args[2] for m in msgs if m.command == "call" and m.args[:2] == ("set_codes", "t1"))
    assert t1[0] == round(baselines[0] + 6.0 / 0.3125)
    assert t1[16] == round(baselines[16] + 6.0 / 0.3125)
    first = lit[0]
    assert first[0] - t1[0] == first[16] - t1[16] == round((3.0 - 6.0) / 0.3125)


def test_awc_plan_measures_baselines_first(tofhir):
    rng = np.random.default_rng(3)
    true_baseline = rng.uniform(10, 16, 32)

    def reply(msg):
        if msg.command != "acquire" or not msg.kwargs["return_hits"]:
            return None
        code = reply.code
        p = 1 - 0.5 * (1 + np.tanh((code - true_baseline) / 0.8))  # falls through the baseline
        fired = rng.random((msg.kwargs["n_triggers"], 32)) < p
        ev, ch = np.nonzero(fired)
        hits = empty_hits(ev.size)
        hits["event"], hits["channel"] = ev, ch
        return hits

    def reply_tracking(msg):
        if msg.command == "call" and msg.args[:2] == ("set_codes", "t1"):
            reply.code = float(msg.args[2][0])
        return reply(msg)

    msgs = list_messages(
        awc_calibration(
            tofhir,
            bars=[0],
            intensities_pct=[20, 50],
            thr1_uA=6.0,
            thr2_uA=[3.0, 10.0],
            n_pulses=100,
            baseline_scan_codes=range(40),
            baseline_scan_triggers=400,
        ),
        reply_tracking,
    )
    steps = _steps(msgs)
    assert len(steps) == 40 + 2 * 2
    assert all(s["laser"] == 0 for s in steps[:40]) and all(s["laser"] == 1 for s in steps[40:])
    t1 = [m.args[2] for m in msgs if m.command == "call" and m.args[:2] == ("set_codes", "t1")]
    lit_t1 = next(c for c in t1[40:] if np.any(c < 63))
    expected = np.rint(true_baseline[[0, 16]] + 6.0 / 0.3125)
    assert np.all(np.abs(lit_t1[[0, 16]] - expected) <= 1)


def test_hptdc_timewalk_messages(hptdc):
    msgs = list_messages(hptdc_timewalk(hptdc, intensities_pct=[10, 20, 30], n_pulses=50))
    assert [s["intensity"] for s in _steps(msgs)] == [10.0, 20.0, 30.0]
    assert [m.obj for m in msgs if m.command == "safe_state"] == ["laser", "readout"]


def test_shipped_awc_recipe_matches_the_issue():
    p = load_recipe("awc-calibration").params
    assert len(p.intensities_pct) == 6
    thr2 = p.thr2_uA.values()
    assert len(thr2) == 23 and thr2[0] == 3.125 and thr2[-1] == 10.0
    assert p.n_pulses == 500 and p.thr1_uA == 6.0 and p.bars == "all"
