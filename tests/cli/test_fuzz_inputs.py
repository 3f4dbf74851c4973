"""Fuzzed recipes and stand files: every bad one is one line, exit 2, and touches nothing.

Hypothesis (derandomized, see ``tests/conftest.py``) builds recipes and stand files from the
shipped ones with one change each that makes them wrong: a value of the wrong type, out of the
schema's range, beyond what the stand declares (DAC codes, DAC step, laser limits, trigger
counts, fibre outputs), a broken range, a hostile name, deep nesting, an unknown or missing
key; and for stand files bad driver options, channel maps and VISA backends. Every case is
wrong by construction, so the oracle is exact: ``teststand run`` must exit 2 with one line on
stderr that names the file, print no traceback, write no run file, and send nothing to any
instrument (recorded at the transports by the ``instrument_log`` fixture).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from teststand import cli
from teststand.sequences import shipped_recipes
from teststand.station import resolve_stand

FUZZ = settings(
    max_examples=400,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_STANDS = settings(FUZZ, max_examples=200)


# -- a small TOML writer (tomllib only reads) --------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(doc: dict[str, Any]) -> str:
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in doc.items() if k != "parameters"]
    if "parameters" in doc:
        params = doc["parameters"]
        if isinstance(params, dict):
            lines.append("[parameters]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in params.items()]
        else:
            lines.append(f"parameters = {_toml_value(params)}")
    return "\n".join(lines) + "\n"


# -- recipes -----------------------------------------------------------------------------------
SHIPPED = {
    name: tomllib.loads(path.read_text())
    for name, path in shipped_recipes().items()
    if name in ("threshold-scan", "awc-calibration", "awc-validation", "timing-alignment")
}

#: Values that are wrong for any parameter of the given kind.
WRONG_TYPE = st.sampled_from(["many", True, [1, 2], {"a": 1}, "2024-01-01"])
HUGE = st.sampled_from([2**40, 2**62, 9 * 10**18, -(2**40)])
NON_FINITE = st.sampled_from([math.inf, -math.inf, math.nan])


def _bad_count() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(max_value=0), HUGE, st.floats(0.5, 99.5), WRONG_TYPE, NON_FINITE)


def _bad_percent() -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(100.01, 1e9), st.floats(-1e9, -0.01), NON_FINITE, WRONG_TYPE)


def _bad_uA() -> st.SearchStrategy[Any]:
    return st.one_of(st.floats(-100, 0), st.floats(20.01, 1e6), NON_FINITE, WRONG_TYPE)


def _bad_int_range(max_code: int = 63) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(lambda a: {"start": a + 5, "stop": a, "step": 1}, st.integers(0, 50)),
        st.builds(lambda s: {"start": 0, "stop": 40, "step": s}, st.integers(-5, 0)),
        st.builds(lambda s: {"start": 0, "stop": s, "step": 1}, st.integers(max_code + 1, 10**6)),
        st.builds(lambda s: {"start": 0, "stop": s, "step": 1}, HUGE),
        st.builds(lambda s: {"start": 0, "stop": 40, "step": s}, NON_FINITE | WRONG_TYPE),
        st.just({"start": 0, "stop": 40, "step": 1, "extra": 1}),
        st.just({"start": 0}),
        WRONG_TYPE,
    )


def _bad_float_range() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(lambda s: {"start": 3.0, "stop": 10.0, "step": s}, st.floats(0.001, 0.15)),
        st.builds(lambda s: {"start": 3.0, "stop": 10.0, "step": s}, NON_FINITE),
        st.builds(lambda a: {"start": a, "stop": 10.0, "step": 0.3125}, NON_FINITE),
        st.builds(lambda a: {"start": 10.0, "stop": a, "step": 0.3125}, st.floats(-5, 9.9)),
        st.just({"start": 31.25, "stop": 100.0, "step": 0.3125}),  # typed in mV
        st.just({"start": 3.0, "stop": 1e9, "step": 0.3125}),
        st.just({"start": -5.0, "stop": 10.0, "step": 0.3125}),
        st.just({"start": 3.0, "stop": 10.0, "step": 0.0}),
        WRONG_TYPE,
    )


#: parameter -> a strategy of values that must be refused for it (on the sim stand)
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "n_triggers": _bad_count(),
    "n_pulses": _bad_count(),
    "baseline_triggers": st.one_of(st.integers(max_value=49), HUGE, WRONG_TYPE),
    "fibre_channel": st.one_of(st.integers(17, 10**6), st.integers(max_value=-1), WRONG_TYPE),
    "laser_intensity_pct": _bad_percent(),
    "intensities_pct": st.one_of(
        st.just([]),
        st.lists(_bad_percent(), min_size=1, max_size=3),
        st.just([20.0] * 1001),
        st.sampled_from(["many", True, {"a": 1}, [[20.0]]]),
        _bad_float_range(),
    ),
    "thr1_uA": _bad_uA(),
    "thr2_uA": st.one_of(_bad_float_range(), _bad_uA()),
    "codes": _bad_int_range(),
    "baseline_scan": st.one_of(
        _bad_int_range(), st.builds(lambda a: {"start": a, "stop": a + 2}, st.integers(0, 30))
    ),
    "laser_modes": st.one_of(st.just([]), st.just(["dim"]), st.just(["on"] * 9), WRONG_TYPE),
    "bars": st.one_of(st.just([0, 99]), st.just([-1]), st.just("some"), st.just([])),
    "baseline_codes": st.one_of(st.just([10.0] * 3), st.just([70.0] * 32), WRONG_TYPE),
}

# `[]` for bars is accepted by the schema but has no bar to light: it must be refused too.
# `[]` for baseline_codes lengths etc. are covered by the values above.


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def bad_recipes(draw: st.DrawFn) -> tuple[str, str]:
    """A shipped recipe with one change that makes it wrong; returns (TOML, what changed)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    doc = json.loads(json.dumps(SHIPPED[name]))
    params = doc.setdefault("parameters", {})
    choice = draw(st.sampled_from(["value", "value", "value", "structure", "name"]))
    if choice == "value":
        keys = sorted(k for k in BAD_VALUES if k in params or _accepts(doc["kind"], k))
        key = draw(st.sampled_from(keys))
        params[key] = draw(BAD_VALUES[key])
        return to_toml(doc), f"parameters.{key}"
    if choice == "name":
        doc["name"] = draw(
            st.sampled_from(["../evil", "a/b", "", "x" * 5000, "nul\x00", " lead", "é" * 3])
            | st.integers()
        )
        return to_toml(doc), "name"
    what = draw(
        st.sampled_from(["unknown top", "unknown param", "kind", "params type", "deep", "missing"])
    )
    if what == "unknown top":
        doc["colour"] = "red"
    elif what == "unknown param":
        params["speed"] = 3
    elif what == "kind":
        doc["kind"] = draw(st.sampled_from(["make_coffee", "", 3, ["threshold_scan"]]))
    elif what == "params type":
        doc["parameters"] = draw(st.sampled_from([3, "x", [1]]))
    elif what == "deep":
        params["intensities_pct"] = _nested(draw(st.integers(20, 400)))
    else:
        required = {"awc_calibration": "thr2_uA"}.get(doc["kind"], "intensities_pct")
        if required not in params:
            doc["kind"] = "make_coffee"
        params.pop(required, None)
    return to_toml(doc), what


def _accepts(kind: str, key: str) -> bool:
    from teststand.sequences import REGISTRY

    return key in REGISTRY[kind].params.model_fields


def _assert_refused(code: int, err: str, path: Path, out: Path, log: list[Any], what: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (what, code, err)
    assert len(lines) == 1, (what, err)
    assert str(path) in lines[0] or path.name in lines[0], (what, lines[0])
    assert "Traceback" not in err
    assert not list(out.glob("*.h5")), f"{what}: a run file was written"
    assert log == [], f"{what}: an instrument was touched: {log[:3]}"


@FUZZ
@given(case=bad_recipes())
def test_fuzzed_recipes_are_refused_in_one_line(case, tmp_path, capsys, instrument_log):
    text, what = case
    event(what)
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    out = tmp_path / "out"
    instrument_log.clear()
    code = cli.main(["run", str(path), "--out", str(out), "--no-progress", "--seed", "1"])
    err = capsys.readouterr().err
    _assert_refused(code, err, path, out, instrument_log, what)


# -- stand files -------------------------------------------------------------------------------
SIM = tomllib.loads(resolve_stand("sim").read_text())


def _stand_doc() -> dict[str, Any]:
    return json.loads(json.dumps(SIM))


def _stand_toml(doc: dict[str, Any]) -> str:
    lines = []
    tables = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key in ("simulation", "instruments"):
            tables[key] = value
        else:
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    if "simulation" in tables:
        lines.append("[simulation]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in tables["simulation"].items()]
    for name, inst in tables.get("instruments", {}).items():
        lines.append(f"[instruments.{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in inst.items()]
    return "\n".join(lines) + "\n"


BAD_OPTIONS = {
    "dac": st.one_of(
        st.fixed_dictionaries({"max_code": st.integers(max_value=0) | HUGE | WRONG_TYPE}),
        st.fixed_dictionaries({"max_code": st.just(63), "safe_code": st.integers(64, 10**5)}),
        st.fixed_dictionaries({"lsb_uA": st.floats(-10, 0) | NON_FINITE | WRONG_TYPE}),
        st.fixed_dictionaries({"n_channels": st.integers(1, 31)}),  # fewer than mapped
        st.fixed_dictionaries({"bits": st.just(6)}),
    ),
    "readout": st.one_of(
        st.fixed_dictionaries({"n_channels": st.integers(1, 31) | st.integers(65, 10**6)}),
        st.fixed_dictionaries({"max_triggers": st.integers(max_value=0) | HUGE}),
        st.fixed_dictionaries({"min_trigger_rate_hz": st.floats(-5, 0) | NON_FINITE}),
        st.fixed_dictionaries({"deadline_floor_s": st.floats(-5, 0) | st.just(1e9)}),
        st.fixed_dictionaries({"colour": st.just("red")}),
    ),
    "laser": st.one_of(
        st.fixed_dictionaries({"max_intensity_pct": st.floats(100.5, 1e6) | st.floats(-5, 0)}),
        st.fixed_dictionaries({"fibre_outputs": st.integers(17, 1000) | st.integers(-9, -1)}),
        st.fixed_dictionaries({"max_rate_hz": NON_FINITE | st.floats(2e6, 1e12)}),
    ),
}


@st.composite
def bad_stands(draw: st.DrawFn, tmp: Path) -> tuple[str, str]:
    doc = _stand_doc()
    what = draw(
        st.sampled_from(
            ["options", "options", "options", "visa", "visa", "channels", "instrument", "sim"]
        )
    )
    if what == "options":
        role = draw(st.sampled_from(sorted(BAD_OPTIONS)))
        doc["instruments"][role]["options"] = draw(BAD_OPTIONS[role])
    elif what == "visa":
        kind = draw(st.sampled_from(["missing", "folder", "not yaml", "not sim", "nul", "@foo"]))
        target = tmp / "twin.yaml"
        if kind == "folder":
            target = tmp
        elif kind == "not yaml":
            target.write_text("devices: [unclosed\n  - :\n")
        elif kind == "not sim":
            target.write_text("devices: {}\nresources: {A: {device: nothing}}\n")
        doc["visa_library"] = {
            "missing": f"{tmp / 'absent.yaml'}@sim",
            "folder": f"{target}@sim",
            "not yaml": f"{target}@sim",
            "not sim": f"{target}@sim",
            "nul": "twin\x00.yaml@sim",
            "@foo": "@foo",
        }[kind]
    elif what == "channels":
        channels = doc["channels"]
        change = draw(st.sampled_from(["duplicate", "gap", "too many", "type", "empty"]))
        if change == "duplicate":
            channels[1]["channel"] = 0
        elif change == "gap":
            channels[-1]["channel"] = 40
        elif change == "too many":
            doc["channels"] = channels + [
                {"channel": 32 + k, "bar": k, "board": 4} for k in range(draw(st.integers(1, 40)))
            ]
        elif change == "type":
            channels[0]["delay_ns"] = draw(WRONG_TYPE | st.floats(-9, -0.1) | NON_FINITE)
        else:
            doc["channels"] = []
    elif what == "instrument":
        change = draw(st.sampled_from(["role", "driver", "timeout", "resource", "transport"]))
        inst = doc["instruments"]
        if change == "role":
            inst["pump"] = {"driver": "LaserPulser", "resource": "ASRL2::INSTR"}
        elif change == "driver":
            inst["dac"]["driver"] = draw(st.sampled_from(["Toaster", "LaserPulser", ""]))
        elif change == "timeout":
            inst["laser"]["timeout_s"] = draw(st.floats(-5, 0) | st.just(1e6) | NON_FINITE)
        elif change == "resource":
            inst["laser"]["resource"] = draw(st.sampled_from(["", "ASRL1\x00::INSTR", "x" * 600]))
        else:
            inst["laser"]["transport"] = "carrier pigeon"
    else:
        doc["simulation"]["yaml"] = draw(st.sampled_from(["instruments.yaml", "", "\x00"]))
    return _stand_toml(doc), what


@FUZZ_STANDS
@given(data=st.data())
def test_fuzzed_stand_files_are_refused_in_one_line(
    data, tmp_path_factory, capsys, instrument_log
):
    tmp = tmp_path_factory.mktemp("stand")
    text, what = data.draw(bad_stands(tmp))
    event(what)
    path = tmp / "stand.toml"
    path.write_text(text)
    out = tmp / "out"
    instrument_log.clear()
    code = cli.main(["run", "threshold-scan", "--stand", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    _assert_refused(code, err, path, out, instrument_log, what)
    instrument_log.clear()
    code = cli.main(["selftest", "--stand", str(path)])
    err = capsys.readouterr().err
    _assert_refused(code, err, path, out, instrument_log, f"selftest: {what}")


def test_the_toml_writer_round_trips():
    for doc in SHIPPED.values():
        assert tomllib.loads(to_toml(doc)) == doc
    assert tomllib.loads(_stand_toml(_stand_doc())) == SIM


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_unchanged_shipped_recipes_pass_the_checks(name):
    from teststand.sequences import load_recipe
    from teststand.station import load_stand

    load_recipe(name).preflight(load_stand("sim").info())
