"""ThresholdDac: every exchange with the instrument, scripted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from teststand.core.testing import CLEAR, TIMEOUT, expected_protocol
from teststand.drivers import ThresholdDac
from teststand.errors import (
    InstrumentReplyError,
    InstrumentTimeout,
    RangeError,
    ReadbackMismatch,
)

N = 4  # a small DAC keeps the scripts readable
NCH = ("CONF:NCH?", str(N))
LSB = ("THR:LSB?", "0.3125")


def csv(codes: list[int]) -> str:
    return ",".join(str(c) for c in codes)


@pytest.mark.parametrize(("disc", "mnemonic"), [("t1", "T1"), ("t2", "T2"), ("e", "E")])
def test_set_codes_one_command_for_all_channels(disc: str, mnemonic: str) -> None:
    codes = [0, 12, 63, 7]
    with expected_protocol(
        ThresholdDac,
        [NCH, (f"THR:{mnemonic} 0,12,63,7", None), (f"THR:{mnemonic}?", csv(codes))],
    ) as dac:
        dac.set_codes(disc, np.array(codes))  # type: ignore[arg-type]
        assert dac.n_channels == N  # cached: asked once


@pytest.mark.parametrize(("disc", "mnemonic"), [("t1", "T1"), ("t2", "T2"), ("e", "E")])
def test_codes_property_and_helper(disc: str, mnemonic: str) -> None:
    with expected_protocol(
        ThresholdDac, [(f"THR:{mnemonic}?", "1,2,3,4"), (f"THR:{mnemonic}?", "1,2,3,4")]
    ) as dac:
        assert getattr(dac, f"{disc}_codes").tolist() == [1, 2, 3, 4]
        codes = dac.codes(disc)  # type: ignore[arg-type]
    assert codes.dtype == np.int64 and codes.tolist() == [1, 2, 3, 4]


def test_read_only_constants_are_asked_once() -> None:
    with expected_protocol(ThresholdDac, [NCH, LSB]) as dac:
        assert dac.n_channels == N
        assert dac.lsb_uA == 0.3125
        assert dac.n_channels == N and dac.lsb_uA == 0.3125
        with pytest.raises(AttributeError):
            dac.lsb_uA = 1.0


def test_readback_mismatch() -> None:
    with expected_protocol(
        ThresholdDac, [NCH, ("THR:T1 1,2,3,4", None), ("THR:T1?", "1,2,3,5")], name="dac"
    ) as dac:
        with pytest.raises(ReadbackMismatch, match="t1_codes") as info:
            dac.t1_codes = [1, 2, 3, 4]
        assert info.value.instrument == "dac"


def test_readback_of_wrong_length_is_a_mismatch() -> None:
    with expected_protocol(
        ThresholdDac, [NCH, ("THR:T2 1,2,3,4", None), ("THR:T2?", "1,2,3")]
    ) as dac:
        with pytest.raises(ReadbackMismatch):
            dac.t2_codes = [1, 2, 3, 4]


@pytest.mark.parametrize(
    "codes",
    [
        [0, 1, 2, 64],  # above max_code
        [-1, 1, 2, 3],
        [1, 2, 3],  # one per channel
        [1, 2, 3, 4, 5],
        [1.0, 2.0, 3.0, 4.0],  # floats
    ],
)
def test_out_of_range_codes_send_nothing(codes: list[float]) -> None:
    with expected_protocol(ThresholdDac, [NCH]) as dac:
        with pytest.raises(RangeError):
            dac.e_codes = codes


def test_max_code_is_per_instance() -> None:
    with expected_protocol(
        ThresholdDac, [NCH, ("THR:T1 0,255,100,7", None), ("THR:T1?", "0,255,100,7")], max_code=255
    ) as dac:
        dac.t1_codes = [0, 255, 100, 7]
    with expected_protocol(ThresholdDac, [NCH], max_code=31) as dac:
        with pytest.raises(RangeError):
            dac.t1_codes = [0, 32, 0, 0]
    for bad in (0, -1, 63.0, True):
        with pytest.raises(ValueError):
            ThresholdDac(None, max_code=bad)  # type: ignore[arg-type]


def test_set_code_is_read_modify_write() -> None:
    with expected_protocol(
        ThresholdDac,
        [NCH, ("THR:T2?", "63,63,63,63"), ("THR:T2 63,63,20,63", None), ("THR:T2?", "63,63,20,63")],
    ) as dac:
        dac.set_code("t2", 2, 20)


@pytest.mark.parametrize(("channel", "code"), [(4, 10), (-1, 10), (0, 64), (0, 1.5)])
def test_set_code_refuses_bad_channel_or_code(channel: int, code: int) -> None:
    with expected_protocol(ThresholdDac, [NCH]) as dac:
        with pytest.raises(RangeError):
            dac.set_code("t1", channel, code)


def test_unknown_discriminator() -> None:
    with expected_protocol(ThresholdDac, []) as dac:
        with pytest.raises(RangeError, match="discriminator"):
            dac.codes("t3")  # type: ignore[arg-type]


def test_conversions() -> None:
    with expected_protocol(ThresholdDac, [LSB, NCH]) as dac:
        assert dac.code_to_uA(30, 10.0) == pytest.approx(6.25)
        assert dac.uA_to_code(6.25, 10.0) == 30
        assert isinstance(dac.uA_to_code(6.0, 10.4), int)
        assert dac.uA_to_code(6.0, 10.4) == 30  # 10.4 + 19.2 = 29.6 -> nearest code 30
        baselines = np.array([8.0, 12.5, 15.9, 10.0])
        codes = dac.uA_to_code(np.full(N, 4.0), baselines)
        assert codes.tolist() == [21, 25, 29, 23]
        back = dac.code_to_uA(codes, baselines)
        assert np.all(np.abs(back - 4.0) <= 0.5 * 0.3125 + 1e-12)
        assert dac.n_channels == N


@pytest.mark.parametrize(("uA", "baseline"), [(20.0, 10.0), (-4.0, 2.0), (float("nan"), 10.0)])
def test_uA_to_code_refuses_what_the_dac_cannot_set(uA: float, baseline: float) -> None:
    with expected_protocol(ThresholdDac, [LSB]) as dac:
        with pytest.raises(RangeError):
            dac.uA_to_code(uA, baseline)


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ([("THR:T1?", "1,2,x,4")], InstrumentReplyError),
        ([("THR:T1?", "1;2;3;4")], InstrumentReplyError),
        ([("THR:T1?", "ERROR")], InstrumentReplyError),
        ([("THR:T1?", TIMEOUT)], InstrumentTimeout),
    ],
)
def test_faulty_replies_raise_then_resync(script: list, error: type[Exception]) -> None:
    with expected_protocol(
        ThresholdDac, [*script, (CLEAR, None), ("THR:T1?", "1,2,3,4")], name="dac"
    ) as dac:
        with pytest.raises(error) as info:
            dac.codes("t1")
        assert info.value.command == "THR:T1?"  # type: ignore[attr-defined]
        assert dac.codes("t1").tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("reply", ["0", "-0.3", "abc"])
def test_bad_lsb_is_a_reply_error(reply: str) -> None:
    with expected_protocol(ThresholdDac, [("THR:LSB?", reply), (CLEAR, None), LSB]) as dac:
        with pytest.raises(InstrumentReplyError):
            _ = dac.lsb_uA
        assert dac.lsb_uA == 0.3125


def test_identify() -> None:
    with expected_protocol(ThresholdDac, [("*IDN?", "CERN,TOFHIR2 DAC,0042,v7")]) as dac:
        assert dac.identify().serial == "0042"


def test_safe_state_sets_every_code_to_max() -> None:
    full = csv([63] * N)
    with expected_protocol(
        ThresholdDac,
        [
            NCH,
            (f"THR:T1 {full}", None),
            ("THR:T1?", full),
            (f"THR:T2 {full}", None),
            ("THR:T2?", full),
            (f"THR:E {full}", None),
            ("THR:E?", full),
            ("THR:T1?", full),
            ("THR:T2?", full),
            ("THR:E?", full),
        ],
    ) as dac:
        dac.safe_state()
        assert dac.is_safe()


def test_is_safe_false_if_any_code_below_max() -> None:
    with expected_protocol(
        ThresholdDac, [("THR:T1?", "63,63,63,63"), ("THR:T2?", "63,62,63,63")]
    ) as dac:
        assert not dac.is_safe()


def test_settings() -> None:
    with expected_protocol(
        ThresholdDac,
        [NCH, LSB, ("THR:T1?", "1,2,3,4"), ("THR:T2?", "5,6,7,8"), ("THR:E?", "63,63,63,63")],
    ) as dac:
        settings = dac.settings()
    assert settings == {
        "n_channels": N,
        "lsb_uA": 0.3125,
        "t1_codes": [1, 2, 3, 4],
        "t2_codes": [5, 6, 7, 8],
        "e_codes": [63, 63, 63, 63],
    }
    json.dumps(settings)
