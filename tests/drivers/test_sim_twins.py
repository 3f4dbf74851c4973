"""Every driver against its pyvisa-sim twin (the packaged YAML, a fresh copy per test)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvisa

from teststand.core import VisaTransport
from teststand.drivers import HptdcReadout, LaserPulser, Readout, ThresholdDac, TofhirReadout
from teststand.errors import InstrumentReplyError, InstrumentTimeout, RangeError

from ._sim import DAC, HPTDC, LASER, TOFHIR, copy_sim_yaml

OpenSim = Callable[..., Any]


def test_yaml_describes_the_documented_resources(sim_rm: pyvisa.ResourceManager) -> None:
    assert set(sim_rm.list_resources()) == {LASER, DAC, TOFHIR, HPTDC}


# -- laser ---------------------------------------------------------------------------------------


@pytest.fixture
def laser(open_sim: OpenSim) -> LaserPulser:
    return open_sim(LaserPulser, LASER, "laser")


def test_laser_identify(laser: LaserPulser) -> None:
    ident = laser.identify()
    assert (ident.manufacturer, ident.model, ident.serial) == (
        "SIMULATED",
        "LASER-PULSER",
        "LP-SIM-0001",
    )


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("output_enabled", True),
        ("output_enabled", False),
        ("intensity", 55.5),
        ("intensity", 100.0),
        ("repetition_rate_hz", 2500.0),
        ("repetition_rate_hz", 1e6),
        ("trigger_source", "external"),
        ("trigger_source", "internal"),
        ("fibre_channel", 7),
        ("fibre_channel", 16),
    ],
)
def test_laser_set_and_read_back(laser: LaserPulser, attribute: str, value: Any) -> None:
    setattr(laser, attribute, value)
    assert getattr(laser, attribute) == value


def test_laser_defaults_settings_and_safe_state(laser: LaserPulser) -> None:
    assert laser.interlock_ok is True
    settings = laser.settings()
    assert settings["output_enabled"] is False and settings["trigger_source"] == "internal"
    json.dumps(settings)
    laser.output_enabled = True
    assert not laser.is_safe()
    laser.safe_state()
    assert laser.is_safe()


def test_laser_rejected_command_resyncs(laser: LaserPulser) -> None:
    laser.intensity = 20.0
    laser.write("TUNE 150.0")  # bypasses validation; the instrument queues ERROR
    with pytest.raises(InstrumentReplyError, match="ERROR"):
        _ = laser.intensity
    assert not laser.in_sync
    assert laser.intensity == 20.0  # the stale reply was cleared first
    assert laser.in_sync


def test_laser_timeout_resyncs(laser: LaserPulser) -> None:
    with pytest.raises(InstrumentTimeout) as info:
        laser.query("OUTP 0")  # a set command answers nothing
    assert info.value.instrument == "laser" and info.value.command == "OUTP 0"
    assert laser.output_enabled is False


def test_state_does_not_leak_between_copies(tmp_path: Path) -> None:
    values = []
    for k in range(2):
        folder = tmp_path / str(k)
        folder.mkdir()
        rm = pyvisa.ResourceManager(f"{copy_sim_yaml(folder)}@sim")
        try:
            laser = LaserPulser(VisaTransport(rm.open_resource(LASER), name="laser"))
            values.append(laser.intensity)
            laser.intensity = 42.0
        finally:
            rm.close()
    assert values == [0.0, 0.0]


# -- threshold DAC ---------------------------------------------------------------------------------


@pytest.fixture
def dac(open_sim: OpenSim) -> ThresholdDac:
    return open_sim(ThresholdDac, DAC, "dac")


def test_dac_identify_and_constants(dac: ThresholdDac) -> None:
    assert dac.identify().model == "THRESHOLD-DAC"
    assert dac.n_channels == 32
    assert dac.lsb_uA == 0.3125
    assert dac.is_safe()  # every code starts at 63


@pytest.mark.parametrize("disc", ["t1", "t2", "e"])
def test_dac_set_and_read_back_codes(dac: ThresholdDac, disc: Any) -> None:
    codes = np.random.default_rng(7).integers(0, 64, 32)
    dac.set_codes(disc, codes)
    np.testing.assert_array_equal(dac.codes(disc), codes)
    dac.set_code(disc, 5, 0)
    codes[5] = 0
    np.testing.assert_array_equal(getattr(dac, f"{disc}_codes"), codes)


def test_dac_refuses_before_the_instrument_sees_it(dac: ThresholdDac) -> None:
    with pytest.raises(RangeError):
        dac.t1_codes = np.full(32, 64)
    assert dac.is_safe()


def test_dac_settings_and_safe_state(dac: ThresholdDac) -> None:
    dac.set_codes("t1", np.arange(32))
    assert not dac.is_safe()
    settings = dac.settings()
    assert settings["t1_codes"] == list(range(32)) and settings["e_codes"] == [63] * 32
    json.dumps(settings)
    dac.safe_state()
    assert dac.is_safe()


def test_dac_conversion_round_trip(dac: ThresholdDac) -> None:
    code = dac.uA_to_code(6.0, 10.2)
    assert abs(dac.code_to_uA(code, 10.2) - 6.0) <= dac.lsb_uA / 2


# -- readouts --------------------------------------------------------------------------------------


@pytest.fixture(params=[(TofhirReadout, TOFHIR, "tofhir"), (HptdcReadout, HPTDC, "hptdc")])
def readout(request: pytest.FixtureRequest, open_sim: OpenSim) -> Readout:
    driver, resource, name = request.param
    return open_sim(driver, resource, name)


def test_readout_identify_and_channels(readout: Readout) -> None:
    assert readout.identify().manufacturer == "SIMULATED"
    assert readout.n_channels == 32
    assert readout.channel_mask == 2**32 - 1
    assert readout.enabled_channels().tolist() == list(range(32))


def test_readout_channel_mask(readout: Readout) -> None:
    readout.set_enabled_channels([0, 3, 31])
    assert readout.channel_mask == (1 | 8 | 2**31)
    readout.channel_mask = 0
    assert readout.enabled_channels().size == 0


def test_readout_acquisition_control_plane(readout: Readout) -> None:
    assert readout.is_safe()
    readout.start_acquisition(250)
    assert readout.acquiring and readout.trigger_count == 250
    assert readout.acquisition_done is False  # no data plane behind the control plane alone
    assert not readout.is_safe()
    readout.start_acquisition(10)  # re-arming while armed is allowed
    readout.safe_state()
    assert readout.is_safe() and not readout.acquiring


def test_readout_without_data_plane_cannot_fetch(readout: Readout) -> None:
    with pytest.raises(InstrumentReplyError):
        readout.fetch_hits()  # pyvisa-sim answers FETCH? with ERROR
    assert readout.acquisition_done is False  # resynchronised


def test_readout_settings_are_json(readout: Readout) -> None:
    settings = readout.settings()
    assert settings["n_channels"] == 32
    json.dumps(settings)


def test_tofhir_qdc_gate(open_sim: OpenSim) -> None:
    tofhir = open_sim(TofhirReadout, TOFHIR, "tofhir")
    assert tofhir.qdc_gate_ns == 100.0
    tofhir.qdc_gate_ns = 37.25
    assert tofhir.qdc_gate_ns == 37.25


@pytest.mark.parametrize("attribute", ["leading_edge_enabled", "trailing_edge_enabled"])
def test_hptdc_edges(open_sim: OpenSim, attribute: str) -> None:
    hptdc = open_sim(HptdcReadout, HPTDC, "hptdc")
    assert getattr(hptdc, attribute) is True
    setattr(hptdc, attribute, False)
    assert getattr(hptdc, attribute) is False
