"""Stand files and connecting: every failing instrument reported in one error."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from teststand.errors import ConnectionFailed, StandError
from teststand.station import CHANNEL_DTYPE, connect, load_stand, parse_stand, resolve_stand


def test_shipped_stands_describe_their_channels():
    sim = load_stand("sim")
    table = sim.config.channel_table()
    assert table.dtype == CHANNEL_DTYPE and table.size == 32
    assert np.array_equal(table["channel"], np.arange(32))
    assert np.array_equal(np.bincount(table["bar"]), np.full(16, 2)), "16 bars read at both ends"
    hptdc = load_stand("sim-hptdc").config.channel_table()
    assert sorted(set(hptdc["plane"].tolist())) == [0, 1, 2, 3]
    assert sim.simulated


def test_every_failed_instrument_is_reported_at_once(tmp_path):
    # A pyvisa-sim YAML that serves the shipped resources only, and a stand asking for others.
    yaml = tmp_path / "served.yaml"
    yaml.write_bytes((resources.files("teststand.sim") / "instruments.yaml").read_bytes())
    text = f'visa_library = "{yaml}@sim"\n' + resolve_stand("sim").read_text()
    text = text.replace("ASRL1::INSTR", "ASRL9::INSTR").replace("dac.sim", "nowhere.sim")
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConnectionFailed) as info:
        connect(load_stand(str(path)), seed=1)
    assert set(info.value.failures) == {"laser", "dac"}
    message = str(info.value)
    assert "ASRL9::INSTR" in message and "nowhere.sim" in message


def test_connected_simulated_stand(tmp_path):
    with connect(load_stand("sim"), seed=3) as station:
        assert station.simulated and station.seed == 3
        assert station.info.lsb_uA == pytest.approx(0.3125) and station.info.max_code == 63
        assert station.truth().size == 32
        assert station.safe_order == ["laser", "readout", "dac"]
        assert station.safe_state() == []
        assert all(i.is_safe() for i in station.instruments.values())


def test_each_connection_starts_from_a_fresh_simulated_state():
    with connect(load_stand("sim"), seed=1) as station:
        station.instruments["laser"].intensity = 77.0
    with connect(load_stand("sim"), seed=1) as station:
        assert station.instruments["laser"].intensity == 0.0


def test_channel_numbers_must_be_contiguous():
    text = resolve_stand("sim").read_text().replace("channel = 31,", "channel = 40,")
    with pytest.raises(StandError, match="run from 0 to N-1"):
        parse_stand(text, "x.toml")
