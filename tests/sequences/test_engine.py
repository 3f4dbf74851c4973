"""The engine with fake instruments: documents, safe state on every exit, pause and abort."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from teststand.sequences import (
    RunEngine,
    RunMetadata,
    acquire,
    checkpoint,
    close_step,
    finalize_wrapper,
    open_run,
    open_step,
    safe_state,
    set_,
)

from .fakes import FakeDac, FakeLaser, FakeReadout


def _stand(fail_after=None):
    return {"laser": FakeLaser(), "dac": FakeDac(), "readout": FakeReadout(fail_after)}


def _plan(n_steps=5, n_triggers=10, fail_in_plan_at=None):
    def body():
        yield open_run(["x"], n_steps)
        yield set_("laser", "output_enabled", True)
        for k in range(n_steps):
            if fail_in_plan_at == k:
                raise ValueError("plan bug")
            yield open_step(x=k)
            yield acquire("readout", n_triggers)
            yield close_step()
            yield checkpoint()

    def cleanup():
        yield safe_state("laser")

    return finalize_wrapper(body(), cleanup)


def _run(instruments, plan, **kw):
    engine = RunEngine(instruments, safe_order=["laser", "readout", "dac"], **kw)
    docs = []
    engine.subscribe(lambda name, doc: docs.append((name, doc)))
    result = engine.run(plan, RunMetadata(recipe_name="t", kind="test"))
    return engine, result, docs


def test_document_stream_of_a_normal_run():
    inst = _stand()
    _, result, docs = _run(inst, _plan(n_steps=3, n_triggers=7))
    names = [n for n, _ in docs]
    assert names == ["start"] + ["step_start", "hits", "step"] * 3 + ["stop"]
    assert result.status == "completed" and result.n_steps == 3
    steps = [d for n, d in docs if n == "step"]
    assert [s["index"] for s in steps] == [0, 1, 2]
    assert [s["axes"]["x"] for s in steps] == [0.0, 1.0, 2.0]
    assert all(s["n_hits"] == 7 and s["n_triggers"] == 7 for s in steps)
    events = np.concatenate([d["hits"]["event"] for n, d in docs if n == "hits"])
    assert np.array_equal(events, np.arange(21)), "event numbers are unique within the run"
    assert docs[-1][1]["status"] == "completed"
    assert all(i.is_safe() for i in inst.values())


def test_blocks_split_long_acquisitions():
    inst = _stand()
    _, result, docs = _run(inst, _plan(n_steps=1, n_triggers=25), block_triggers=10)
    assert [len(d["hits"]) for n, d in docs if n == "hits"] == [10, 10, 5]
    assert inst["readout"].n_acquisitions == 3


def test_exception_in_instrument_reaches_safe_state():
    inst = _stand(fail_after=2)
    _, result, docs = _run(inst, _plan(n_steps=5))
    assert result.status == "failed" and "readout fault" in result.reason
    assert result.n_steps == 2, "the completed steps are kept"
    assert docs[-1] == ("stop", docs[-1][1]) and docs[-1][1]["status"] == "failed"
    assert ("safe_state",) in inst["laser"].calls, "the plan's cleanup ran"
    assert all(i.is_safe() for i in inst.values())


def test_exception_in_plan_reaches_safe_state():
    inst = _stand()
    _, result, _ = _run(inst, _plan(n_steps=5, fail_in_plan_at=3))
    assert result.status == "failed" and "plan bug" in result.reason
    assert result.n_steps == 3
    assert all(i.is_safe() for i in inst.values())


def test_abort_from_another_thread():
    inst = _stand()
    engine = RunEngine(inst, safe_order=["laser", "readout", "dac"])
    steps = []

    def on_doc(name, doc):
        if name == "step":
            steps.append(doc["index"])
            if doc["index"] == 1:
                threading.Thread(target=engine.abort).start()
                threading.Event().wait(0.05)

    engine.subscribe(on_doc)
    result = engine.run(_plan(n_steps=50), RunMetadata(recipe_name="t", kind="test"))
    assert result.status == "aborted"
    assert 2 <= result.n_steps < 50
    assert all(i.is_safe() for i in inst.values())


def test_signal_abort_is_interrupted():
    inst = _stand()
    engine = RunEngine(inst, safe_order=["laser"])
    engine.subscribe(
        lambda n, d: engine.abort("SIGTERM received", signal=True) if n == "step" else None
    )
    result = engine.run(_plan(n_steps=5), RunMetadata(recipe_name="t", kind="test"))
    assert result.status == "interrupted" and result.n_steps == 1
    assert all(i.is_safe() for i in inst.values())


def test_keyboard_interrupt_is_reraised_after_safe_state():
    inst = _stand()
    engine = RunEngine(inst, safe_order=["laser", "readout", "dac"])
    docs = []

    def on_doc(name, doc):
        docs.append(name)
        if name == "step":
            raise KeyboardInterrupt

    engine.subscribe(on_doc)
    with pytest.raises(KeyboardInterrupt):
        engine.run(_plan(n_steps=5), RunMetadata(recipe_name="t", kind="test"))
    assert docs[-1] == "stop"
    assert all(i.is_safe() for i in inst.values())


def test_safe_state_goes_on_when_one_instrument_fails():
    inst = _stand()

    def broken():
        raise RuntimeError("no answer")

    inst["laser"].safe_state = broken
    _, result, _ = _run(inst, _plan(n_steps=2))
    assert result.status == "failed" and "no answer" in result.reason
    assert inst["readout"].is_safe() and inst["dac"].is_safe()


def test_pause_and_resume_at_checkpoint():
    inst = _stand()
    engine = RunEngine(inst, safe_order=["laser"])
    states = []

    def on_doc(name, doc):
        if name == "step" and doc["index"] == 0:
            engine.request_pause()

            def later():
                threading.Event().wait(0.1)
                states.append(engine.state)
                engine.resume()

            threading.Thread(target=later).start()

    engine.subscribe(on_doc)
    result = engine.run(_plan(n_steps=3), RunMetadata(recipe_name="t", kind="test"))
    assert states == ["paused"]
    assert result.status == "completed" and result.n_steps == 3


def test_unsubscribed_callback_receives_nothing_more():
    inst = _stand()
    engine = RunEngine(inst)
    seen = []
    token = engine.subscribe(lambda n, d: seen.append(n))
    engine.unsubscribe(token)
    engine.run(_plan(n_steps=1), RunMetadata(recipe_name="t", kind="test"))
    assert seen == []


def test_undeclared_axis_fails_the_run():
    def plan():
        yield open_run(["x"], 1)
        yield open_step(y=1)

    result = _run(_stand(), plan())[1]
    assert result.status == "failed" and "not declared" in result.reason
