"""TofhirReadout and HptdcReadout: every exchange with the instrument, scripted."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from teststand.core import HIT_DTYPE, empty_hits
from teststand.core.testing import CLEAR, TIMEOUT, expected_protocol
from teststand.drivers import HptdcReadout, Readout, TofhirReadout
from teststand.errors import (
    InstrumentReplyError,
    InstrumentTimeout,
    RangeError,
    ReadbackMismatch,
)

READOUTS = [TofhirReadout, HptdcReadout]
NCH = ("CONF:NCH?", "32")


def make_hits(n: int, n_channels: int = 32) -> np.ndarray:
    hits = empty_hits(n)
    hits["event"] = np.arange(n) // 4
    hits["channel"] = np.arange(n) % n_channels
    hits["t1"] = np.linspace(10.0, 12.0, n)
    hits["q"] = 100.0
    return hits


# -- common acquisition API ------------------------------------------------------------------------


@pytest.mark.parametrize("driver", READOUTS)
def test_start_acquisition(driver: type[Readout]) -> None:
    with expected_protocol(
        driver,
        [
            ("ACQ:COUNT 500", None),
            ("ACQ:COUNT?", "500"),
            ("ACQ:START", None),
            ("ACQ:STATE?", "START"),
        ],
    ) as readout:
        readout.start_acquisition(500)


@pytest.mark.parametrize("driver", READOUTS)
@pytest.mark.parametrize("n_triggers", [0, -5, 10_000_001, 2.5, True])
def test_start_acquisition_refuses_bad_counts(driver: type[Readout], n_triggers: Any) -> None:
    with expected_protocol(driver, []) as readout:
        with pytest.raises(RangeError):
            readout.start_acquisition(n_triggers)


@pytest.mark.parametrize("driver", READOUTS)
def test_start_acquisition_that_does_not_start(driver: type[Readout]) -> None:
    with expected_protocol(
        driver,
        [("ACQ:COUNT 10", None), ("ACQ:COUNT?", "10"), ("ACQ:START", None), ("ACQ:STATE?", "STOP")],
    ) as readout:
        with pytest.raises(ReadbackMismatch, match="did not start"):
            readout.start_acquisition(10)


@pytest.mark.parametrize("driver", READOUTS)
def test_trigger_count_readback_mismatch(driver: type[Readout]) -> None:
    with expected_protocol(driver, [("ACQ:COUNT 10", None), ("ACQ:COUNT?", "1000")]) as readout:
        with pytest.raises(ReadbackMismatch):
            readout.start_acquisition(10)


@pytest.mark.parametrize("driver", READOUTS)
def test_stop_acquisition_and_safe_state(driver: type[Readout]) -> None:
    with expected_protocol(
        driver,
        [
            ("ACQ:STOP", None),
            ("ACQ:STATE?", "STOP"),
            ("ACQ:STOP", None),
            ("ACQ:STATE?", "STOP"),
            ("ACQ:STATE?", "STOP"),
            ("ACQ:STATE?", "START"),
        ],
    ) as readout:
        readout.stop_acquisition()
        readout.safe_state()
        assert readout.is_safe()
        assert not readout.is_safe()


@pytest.mark.parametrize("driver", READOUTS)
def test_stop_that_does_not_stop(driver: type[Readout]) -> None:
    with expected_protocol(driver, [("ACQ:STOP", None), ("ACQ:STATE?", "START")]) as readout:
        with pytest.raises(ReadbackMismatch, match="did not stop"):
            readout.safe_state()


@pytest.mark.parametrize("driver", READOUTS)
def test_state_queries(driver: type[Readout]) -> None:
    with expected_protocol(
        driver,
        [("ACQ:DONE?", "0"), ("ACQ:DONE?", "1"), ("ACQ:STATE?", "START"), ("ACQ:COUNT?", "7")],
    ) as readout:
        assert readout.acquisition_done is False
        assert readout.acquisition_done is True
        assert readout.acquiring is True
        assert readout.trigger_count == 7
        for attribute in ("acquiring", "acquisition_done", "n_channels"):
            with pytest.raises(AttributeError):
                setattr(readout, attribute, True)


@pytest.mark.parametrize("driver", READOUTS)
def test_fetch_hits_decodes_the_block(driver: type[Readout]) -> None:
    hits = make_hits(10)
    with expected_protocol(driver, [("FETCH?", hits.tobytes()), NCH, ("FETCH?", b"")]) as readout:
        got = readout.fetch_hits()
        none = readout.fetch_hits()
    assert got.dtype == HIT_DTYPE and got.size == 10
    assert got.tobytes() == hits.tobytes()  # field for field, NaN included
    got["event"] += np.uint64(100)  # writable: the engine offsets events in place
    assert none.dtype == HIT_DTYPE and none.size == 0


@pytest.mark.parametrize("driver", READOUTS)
def test_fetch_hits_refuses_partial_records(driver: type[Readout]) -> None:
    payload = make_hits(3).tobytes()[:-5]
    with expected_protocol(
        driver, [("FETCH?", payload), (CLEAR, None), ("FETCH?", b"")], name="readout"
    ) as readout:
        with pytest.raises(InstrumentReplyError, match="whole number") as info:
            readout.fetch_hits()
        assert info.value.instrument == "readout" and info.value.command == "FETCH?"
        assert readout.fetch_hits().size == 0


@pytest.mark.parametrize("driver", READOUTS)
def test_fetch_hits_refuses_unknown_channels(driver: type[Readout]) -> None:
    hits = make_hits(4)
    hits["channel"][2] = 32
    with expected_protocol(driver, [("FETCH?", hits.tobytes()), NCH]) as readout:
        with pytest.raises(InstrumentReplyError, match="channel 32"):
            readout.fetch_hits()


@pytest.mark.parametrize("driver", READOUTS)
@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (TIMEOUT, InstrumentTimeout),
        (
            InstrumentReplyError("readout", "malformed block header b'X1'", "FETCH?"),
            InstrumentReplyError,
        ),
    ],
)
def test_fetch_faults_resync(driver: type[Readout], reply: Any, error: type[Exception]) -> None:
    with expected_protocol(
        driver, [("FETCH?", reply), (CLEAR, None), ("ACQ:DONE?", "1")], name="readout"
    ) as readout:
        with pytest.raises(error):
            readout.fetch_hits()
        assert readout.acquisition_done


@pytest.mark.parametrize("driver", READOUTS)
@pytest.mark.parametrize(
    ("get_cmd", "reply", "attribute"),
    [
        ("ACQ:STATE?", "RUNNING", "acquiring"),
        ("ACQ:DONE?", "yes", "acquisition_done"),
        ("CONF:NCH?", "32.0", "n_channels"),
        ("CONF:MASK?", "0xFF", "channel_mask"),
        ("ACQ:COUNT?", "ERROR", "trigger_count"),
    ],
)
def test_garbled_replies(driver: type[Readout], get_cmd: str, reply: str, attribute: str) -> None:
    with expected_protocol(
        driver, [(get_cmd, reply), (CLEAR, None), ("ACQ:STATE?", "STOP")]
    ) as readout:
        with pytest.raises(InstrumentReplyError) as info:
            getattr(readout, attribute)
        assert info.value.command == get_cmd
        assert readout.is_safe()


# -- channel mask ----------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", READOUTS)
def test_channel_mask(driver: type[Readout]) -> None:
    with expected_protocol(
        driver,
        [
            NCH,
            ("CONF:MASK 4294967295", None),
            ("CONF:MASK?", "4294967295"),
            ("CONF:MASK 5", None),
            ("CONF:MASK?", "5"),
            ("CONF:MASK?", "5"),
            ("CONF:MASK 3", None),
            ("CONF:MASK?", "1"),
        ],
    ) as readout:
        readout.channel_mask = 2**32 - 1
        readout.set_enabled_channels([2, 0, 2])
        assert readout.enabled_channels().tolist() == [0, 2]
        with pytest.raises(ReadbackMismatch):
            readout.channel_mask = 3


@pytest.mark.parametrize("driver", READOUTS)
@pytest.mark.parametrize("mask", [2**32, -1, 1.0])
def test_channel_mask_out_of_range(driver: type[Readout], mask: Any) -> None:
    with expected_protocol(driver, [NCH]) as readout:
        with pytest.raises(RangeError):
            readout.channel_mask = mask


@pytest.mark.parametrize("driver", READOUTS)
@pytest.mark.parametrize("channels", [[32], [-1, 3], [0.5]])
def test_set_enabled_channels_out_of_range(driver: type[Readout], channels: list[Any]) -> None:
    with expected_protocol(driver, [NCH]) as readout:
        with pytest.raises(RangeError):
            readout.set_enabled_channels(channels)


# -- TOFHIR2 specifics -----------------------------------------------------------------------------


def test_tofhir_qdc_gate() -> None:
    with expected_protocol(
        TofhirReadout,
        [
            ("CONF:QDC:GATE 120.50", None),
            ("CONF:QDC:GATE?", "120.50"),
            ("CONF:QDC:GATE 5.00", None),
            ("CONF:QDC:GATE?", "5.01"),
            ("CONF:QDC:GATE?", "80.00"),
        ],
    ) as tofhir:
        tofhir.qdc_gate_ns = 120.5
        with pytest.raises(ReadbackMismatch):
            tofhir.qdc_gate_ns = 5.0
        assert tofhir.qdc_gate_ns == 80.0
        for bad in (4.99, 500.01, "100"):
            with pytest.raises(RangeError):
                tofhir.qdc_gate_ns = bad


def test_tofhir_identify_and_settings() -> None:
    with expected_protocol(
        TofhirReadout,
        [
            ("*IDN?", "CERN,TOFHIR2 FEB/D,FEB-17,2.4"),
            NCH,
            ("CONF:MASK?", "4294967295"),
            ("CONF:QDC:GATE?", "100.00"),
        ],
    ) as tofhir:
        assert tofhir.identify().model == "TOFHIR2 FEB/D"
        settings = tofhir.settings()
    assert settings == {"n_channels": 32, "channel_mask": 2**32 - 1, "qdc_gate_ns": 100.0}
    json.dumps(settings)


# -- HPTDC specifics -------------------------------------------------------------------------------


def test_hptdc_bin_is_25ns_over_1024() -> None:
    assert HptdcReadout.bin_ps == pytest.approx(24.414, abs=1e-3)
    assert HptdcReadout.bin_ps * 1024 == 25_000.0


@pytest.mark.parametrize(
    ("attribute", "mnemonic"),
    [("leading_edge_enabled", "EDGE:LEAD"), ("trailing_edge_enabled", "EDGE:TRAIL")],
)
def test_hptdc_edges(attribute: str, mnemonic: str) -> None:
    with expected_protocol(
        HptdcReadout,
        [
            (f"{mnemonic} 0", None),
            (f"{mnemonic}?", "0"),
            (f"{mnemonic} 1", None),
            (f"{mnemonic}?", "0"),
            (f"{mnemonic}?", "1"),
        ],
    ) as hptdc:
        setattr(hptdc, attribute, False)
        with pytest.raises(ReadbackMismatch):
            setattr(hptdc, attribute, True)
        assert getattr(hptdc, attribute) is True
        with pytest.raises(RangeError):
            setattr(hptdc, attribute, 1)


def test_hptdc_settings() -> None:
    with expected_protocol(
        HptdcReadout,
        [NCH, ("CONF:MASK?", "255"), ("EDGE:LEAD?", "1"), ("EDGE:TRAIL?", "1")],
    ) as hptdc:
        settings = hptdc.settings()
    assert settings == {
        "n_channels": 32,
        "channel_mask": 255,
        "leading_edge_enabled": True,
        "trailing_edge_enabled": True,
    }
