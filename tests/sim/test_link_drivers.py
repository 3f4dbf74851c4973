"""SimulatedReadoutLink behind the real drivers, on a fresh copy of the pyvisa-sim stand."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import pyvisa

from teststand.core import VisaTransport
from teststand.drivers import HptdcReadout, LaserPulser, ThresholdDac, TofhirReadout
from teststand.errors import InstrumentReplyError, InstrumentTimeout
from teststand.sim import (
    HptdcModel,
    SimulatedReadoutLink,
    TofhirModel,
    demo_hptdc_channels,
    demo_tofhir_channels,
)


@dataclass
class Bench:
    laser: LaserPulser
    dac: ThresholdDac
    tofhir: TofhirReadout
    hptdc: HptdcReadout
    tofhir_link: SimulatedReadoutLink
    hptdc_link: SimulatedReadoutLink
    model: TofhirModel


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    yaml = tmp_path / "instruments.yaml"
    yaml.write_bytes(files("teststand").joinpath("sim", "instruments.yaml").read_bytes())
    rm = pyvisa.ResourceManager(f"{yaml}@sim")

    def transport(resource: str, name: str) -> VisaTransport:
        return VisaTransport(rm.open_resource(resource), name=name, timeout_s=0.1)

    laser = LaserPulser(transport("ASRL1::INSTR", "laser"))
    dac = ThresholdDac(transport("TCPIP0::dac.sim::inst0::INSTR", "dac"))
    model = TofhirModel(demo_tofhir_channels(16), 5, lsb_uA=dac.lsb_uA)
    tofhir_link = SimulatedReadoutLink(
        transport("TCPIP0::tofhir.sim::inst0::INSTR", "tofhir"),
        model,
        laser=laser,
        dac=dac,
        max_block_hits=4096,
    )
    hptdc_link = SimulatedReadoutLink(
        transport("TCPIP0::hptdc.sim::inst0::INSTR", "hptdc"),
        HptdcModel(demo_hptdc_channels(4, 8), 5, noise_prob=0.0),
        laser=laser,
    )
    yield Bench(
        laser,
        dac,
        TofhirReadout(tofhir_link),
        HptdcReadout(hptdc_link),
        tofhir_link,
        hptdc_link,
        model,
    )
    rm.close()


def acquire(readout: TofhirReadout | HptdcReadout, n_triggers: int) -> np.ndarray:
    """The drivers' own acquisition loop (the engine's, without the document stream)."""
    return readout.acquire(n_triggers)


def operate(b: Bench, intensity: float = 50.0) -> None:
    b.laser.intensity = intensity
    b.laser.output_enabled = True
    b.dac.set_codes("t1", np.round(b.model.baseline + 6.0 / b.dac.lsb_uA).astype(int))
    b.dac.set_codes("t2", np.round(b.model.baseline + 10.0 / b.dac.lsb_uA).astype(int))


def test_a_laser_acquisition_through_the_drivers(bench: Bench) -> None:
    operate(bench)
    hits = acquire(bench.tofhir, 500)
    assert hits.size == 500 * 32
    assert np.array_equal(hits["event"], np.repeat(np.arange(500), 32))
    state = bench.tofhir_link.last_state
    assert state is not None and state.laser_on and state.intensity_pct == 50.0
    np.testing.assert_array_equal(state.t1_codes, bench.dac.codes("t1"))
    assert not bench.tofhir.acquiring


def test_the_safe_state_gives_no_hits(bench: Bench) -> None:
    operate(bench)
    bench.laser.safe_state()
    bench.dac.safe_state()
    assert acquire(bench.tofhir, 2000).size == 0


def test_a_forgotten_threshold_shows(bench: Bench) -> None:
    bench.laser.intensity = 17.0  # about 40 pe, 10 uA
    bench.laser.output_enabled = True
    bench.dac.set_codes("t1", np.round(bench.model.baseline + 6.0 / bench.dac.lsb_uA).astype(int))
    hits = acquire(bench.tofhir, 300)  # thr2 was left at code 63
    assert hits.size > 0 and np.isnan(hits["t2"]).mean() > 0.5


def test_the_channel_mask_is_obeyed(bench: Bench) -> None:
    operate(bench)
    bench.tofhir.set_enabled_channels([0, 5, 31])
    hits = acquire(bench.tofhir, 100)
    np.testing.assert_array_equal(np.unique(hits["channel"]), [0, 5, 31])


def test_hptdc_track_without_a_dac(bench: Bench) -> None:
    bench.laser.intensity = 60.0
    bench.laser.output_enabled = True
    bench.laser.fibre_channel = 3
    hits = acquire(bench.hptdc, 200)
    assert hits.size == 200 * 4  # pad 2 of each of the four planes
    assert np.all(np.isnan(hits["q"])) and np.all(hits["tot"] > 5)


def test_a_fetch_timeout_reaches_the_driver_and_the_link_recovers(bench: Bench) -> None:
    operate(bench)
    bench.tofhir.start_acquisition(100)
    bench.tofhir_link.inject_fault("timeout", "FETCH?")
    with pytest.raises(InstrumentTimeout):
        bench.tofhir.fetch_hits()
    assert not bench.tofhir.in_sync
    bench.tofhir.safe_state()  # clears the link first, then stops
    assert bench.tofhir.in_sync and bench.tofhir.is_safe()


def test_a_garbled_reply_reaches_the_driver(bench: Bench) -> None:
    operate(bench)
    bench.tofhir.start_acquisition(100)
    bench.tofhir_link.inject_fault("garbled", "ACQ:DONE?")
    with pytest.raises(InstrumentReplyError):
        _ = bench.tofhir.acquisition_done
    bench.tofhir_link.inject_fault("garbled", "FETCH?")
    with pytest.raises(InstrumentReplyError):
        bench.tofhir.fetch_hits()
    assert bench.tofhir.acquisition_done
    bench.tofhir.stop_acquisition()
