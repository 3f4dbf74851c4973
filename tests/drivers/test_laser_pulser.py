"""LaserPulser: every exchange with the instrument, scripted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from teststand.core.testing import CLEAR, TIMEOUT, expected_protocol
from teststand.drivers import LaserPulser
from teststand.errors import (
    InstrumentReplyError,
    InstrumentTimeout,
    InterlockTripped,
    RangeError,
    ReadbackMismatch,
)

SETS = [
    ("output_enabled", True, "OUTP 1", "OUTP?", "1"),
    ("output_enabled", False, "OUTP 0", "OUTP?", "0"),
    ("intensity", 0.0, "TUNE 0.0", "TUNE?", "0.0"),
    ("intensity", 37.25, "TUNE 37.2", "TUNE?", "37.2"),
    ("intensity", 100, "TUNE 100.0", "TUNE?", "100.0"),
    ("repetition_rate_hz", 1.0, "FREQ 1.0", "FREQ?", "1.0"),
    ("repetition_rate_hz", 1e6, "FREQ 1000000.0", "FREQ?", "1000000.0"),
    ("trigger_source", "internal", "TRIG:SOUR INT", "TRIG:SOUR?", "INT"),
    ("trigger_source", "external", "TRIG:SOUR EXT", "TRIG:SOUR?", "EXT"),
    ("fibre_channel", 0, "FIB:CHAN 0", "FIB:CHAN?", "0"),
    ("fibre_channel", 16, "FIB:CHAN 16", "FIB:CHAN?", "16"),
]


@pytest.mark.parametrize(("attribute", "value", "set_cmd", "get_cmd", "reply"), SETS)
def test_set_and_read_back(
    attribute: str, value: Any, set_cmd: str, get_cmd: str, reply: str
) -> None:
    # Switching the output on asks the interlock first (the guard), then sends.
    guard = [("INTLK?", "1")] if set_cmd == "OUTP 1" else []
    with expected_protocol(LaserPulser, [*guard, (set_cmd, None), (get_cmd, reply)]) as laser:
        setattr(laser, attribute, value)


def test_output_is_not_switched_on_with_the_interlock_open() -> None:
    with expected_protocol(LaserPulser, [("INTLK?", "0")], name="laser") as laser:
        with pytest.raises(InterlockTripped, match="laser.*interlock is open"):
            laser.output_enabled = True


def test_output_goes_off_whatever_the_interlock() -> None:
    with expected_protocol(LaserPulser, [("OUTP 0", None), ("OUTP?", "0")]) as laser:
        laser.output_enabled = False


def test_stand_limits_narrow_the_strict_ranges() -> None:
    with expected_protocol(LaserPulser, [], max_intensity_pct=40.0, fibre_outputs=4) as laser:
        with pytest.raises(RangeError, match=r"outside the strict range \[0, 40\]"):
            laser.intensity = 50.0
        with pytest.raises(RangeError, match=r"\[0, 4\]"):
            laser.fibre_channel = 5


GETS = [
    ("output_enabled", "OUTP?", "1", True),
    ("intensity", "TUNE?", "12.5", 12.5),
    ("repetition_rate_hz", "FREQ?", "1000.0", 1000.0),
    ("trigger_source", "TRIG:SOUR?", "EXT", "external"),
    ("fibre_channel", "FIB:CHAN?", "3", 3),
    ("interlock_ok", "INTLK?", "1", True),
    ("interlock_ok", "INTLK?", "0", False),
]


@pytest.mark.parametrize(("attribute", "get_cmd", "reply", "expected"), GETS)
def test_get(attribute: str, get_cmd: str, reply: str, expected: Any) -> None:
    with expected_protocol(LaserPulser, [(get_cmd, reply)]) as laser:
        assert getattr(laser, attribute) == expected


@pytest.mark.parametrize(
    ("attribute", "value", "set_cmd", "get_cmd", "reply"),
    [
        ("output_enabled", True, "OUTP 1", "OUTP?", "0"),  # e.g. interlock open
        ("intensity", 50.0, "TUNE 50.0", "TUNE?", "49.9"),
        ("repetition_rate_hz", 1000.0, "FREQ 1000.0", "FREQ?", "1000.2"),
        ("trigger_source", "external", "TRIG:SOUR EXT", "TRIG:SOUR?", "INT"),
        ("fibre_channel", 4, "FIB:CHAN 4", "FIB:CHAN?", "0"),
    ],
)
def test_readback_mismatch(
    attribute: str, value: Any, set_cmd: str, get_cmd: str, reply: str
) -> None:
    guard = [("INTLK?", "1")] if set_cmd == "OUTP 1" else []
    script = [*guard, (set_cmd, None), (get_cmd, reply)]
    with expected_protocol(LaserPulser, script, name="laser") as laser:
        with pytest.raises(ReadbackMismatch) as info:
            setattr(laser, attribute, value)
        assert info.value.instrument == "laser" and attribute in str(info.value)


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("output_enabled", 1),
        ("output_enabled", "on"),
        ("intensity", 100.1),
        ("intensity", -1.0),
        ("intensity", float("nan")),
        ("repetition_rate_hz", 0.5),
        ("repetition_rate_hz", 1.1e6),
        ("trigger_source", "INT"),
        ("trigger_source", "bus"),
        ("fibre_channel", 17),
        ("fibre_channel", -1),
        ("fibre_channel", 1.0),
    ],
)
def test_out_of_range_sends_nothing(attribute: str, value: Any) -> None:
    with expected_protocol(LaserPulser, []) as laser:
        with pytest.raises(RangeError):
            setattr(laser, attribute, value)


def test_interlock_is_read_only() -> None:
    with expected_protocol(LaserPulser, []) as laser:
        with pytest.raises(AttributeError):
            laser.interlock_ok = True


@pytest.mark.parametrize(
    ("get_cmd", "reply", "attribute"),
    [
        ("OUTP?", "yes", "output_enabled"),
        ("TUNE?", "12,5", "intensity"),
        ("FREQ?", "", "repetition_rate_hz"),
        ("TRIG:SOUR?", "BUS", "trigger_source"),
        ("FIB:CHAN?", "3.0", "fibre_channel"),
        ("INTLK?", "ERROR", "interlock_ok"),
    ],
)
def test_garbled_reply_raises_then_resyncs(get_cmd: str, reply: str, attribute: str) -> None:
    with expected_protocol(
        LaserPulser, [(get_cmd, reply), (CLEAR, None), ("OUTP?", "0")], name="laser"
    ) as laser:
        with pytest.raises(InstrumentReplyError) as info:
            getattr(laser, attribute)
        assert info.value.instrument == "laser" and info.value.command == get_cmd
        assert laser.output_enabled is False


def test_timeout_raises_then_resyncs() -> None:
    with expected_protocol(
        LaserPulser, [("INTLK?", TIMEOUT), (CLEAR, None), ("INTLK?", "1")], name="laser"
    ) as laser:
        with pytest.raises(InstrumentTimeout) as info:
            _ = laser.interlock_ok
        assert info.value.command == "INTLK?"
        assert laser.interlock_ok is True


def test_identify() -> None:
    with expected_protocol(LaserPulser, [("*IDN?", "ALS,PiLas EIG1000D,SN4711,FW 3.2")]) as laser:
        ident = laser.identify()
    assert (ident.manufacturer, ident.model, ident.serial, ident.firmware) == (
        "ALS",
        "PiLas EIG1000D",
        "SN4711",
        "FW 3.2",
    )


def test_safe_state_switches_output_off() -> None:
    with expected_protocol(
        LaserPulser, [("OUTP 0", None), ("OUTP?", "0"), ("OUTP?", "0"), ("OUTP?", "1")]
    ) as laser:
        laser.safe_state()
        assert laser.is_safe()
        assert not laser.is_safe()


def test_safe_state_after_a_fault_resyncs_first() -> None:
    with expected_protocol(
        LaserPulser, [("TUNE?", TIMEOUT), (CLEAR, None), ("OUTP 0", None), ("OUTP?", "0")]
    ) as laser:
        with pytest.raises(InstrumentTimeout):
            _ = laser.intensity
        laser.safe_state()


def test_settings() -> None:
    with expected_protocol(
        LaserPulser,
        [
            ("OUTP?", "0"),
            ("TUNE?", "20.0"),
            ("FREQ?", "1000.0"),
            ("TRIG:SOUR?", "INT"),
            ("FIB:CHAN?", "0"),
            ("INTLK?", "1"),
        ],
    ) as laser:
        settings = laser.settings()
    assert settings == {
        "output_enabled": False,
        "intensity": 20.0,
        "repetition_rate_hz": 1000.0,
        "trigger_source": "internal",
        "fibre_channel": 0,
        "interlock_ok": True,
    }
    json.dumps(settings)
