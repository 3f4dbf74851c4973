"""SimulatedReadoutLink with scripted stand-ins for the control plane, laser and DAC."""

from __future__ import annotations

import time

import numpy as np
import pytest

from teststand.core import HIT_DTYPE, Transport
from teststand.errors import InstrumentReplyError, InstrumentTimeout
from teststand.sim import SimulatedReadoutLink, TofhirModel, demo_tofhir_channels

CHANNELS = demo_tofhir_channels(n_bars=16)


class FakeControl:
    """A control-plane transport that records commands and answers a few queries."""

    def __init__(self) -> None:
        self.name = "tofhir"
        self.resource = "TCPIP0::tofhir.sim::inst0::INSTR"
        self.timeout_s = 1.0
        self.sent: list[str] = []
        self.answers = {"CONF:MASK?": "4294967295", "*IDN?": "SIM,TOFHIR,1,1"}
        self.pending: list[str] = []
        self.cleared = 0

    def write(self, command: str) -> None:
        self.sent.append(command)
        if command.endswith("?"):
            self.pending.append(self.answers[command])

    def read(self) -> str:
        if not self.pending:
            raise InstrumentTimeout(self.name, "nothing to read", self.sent[-1])
        return self.pending.pop(0)

    def query(self, command: str) -> str:
        self.write(command)
        return self.read()

    def query_block(self, command: str) -> bytes:
        raise AssertionError("the link answers blocks itself")

    def clear(self) -> None:
        self.pending.clear()
        self.cleared += 1

    def close(self) -> None:
        pass


class FakeLaser:
    """Stands in for the LaserPulser driver; counts how often its state is read."""

    def __init__(self) -> None:
        self._on, self.intensity_value, self.fibre = False, 0.0, 0
        self.reads = 0

    @property
    def output_enabled(self) -> bool:
        self.reads += 1
        return self._on

    @property
    def intensity(self) -> float:
        self.reads += 1
        return self.intensity_value

    @property
    def fibre_channel(self) -> int:
        self.reads += 1
        return self.fibre


class FakeDac:
    """Stands in for the ThresholdDac driver."""

    def __init__(self) -> None:
        self.t1 = np.full(32, 63)
        self.t2 = np.full(32, 63)

    def codes(self, disc: str) -> np.ndarray:
        return {"t1": self.t1, "t2": self.t2}[disc].copy()


def make(
    seed: int = 1, **kwargs: object
) -> tuple[SimulatedReadoutLink, FakeControl, FakeLaser, FakeDac, TofhirModel]:
    control, laser, dac = FakeControl(), FakeLaser(), FakeDac()
    model = TofhirModel(CHANNELS, seed)
    link = SimulatedReadoutLink(control, model, laser=laser, dac=dac, **kwargs)  # type: ignore[arg-type]
    return link, control, laser, dac, model


def operate(laser: FakeLaser, dac: FakeDac, model: TofhirModel, intensity: float = 50.0) -> None:
    laser._on, laser.intensity_value = True, intensity
    dac.t1 = np.round(model.baseline + 6.0 / model.lsb_uA).astype(int)
    dac.t2 = np.round(model.baseline + 10.0 / model.lsb_uA).astype(int)


def fetch_all(link: SimulatedReadoutLink) -> tuple[np.ndarray, int]:
    blocks = []
    while True:
        payload = link.query_block("FETCH?")
        if not payload:
            break
        blocks.append(np.frombuffer(payload, dtype=HIT_DTYPE))
    hits = np.concatenate(blocks) if blocks else np.zeros(0, HIT_DTYPE)
    return hits, len(blocks)


def test_is_a_transport_with_the_control_name() -> None:
    link, control, *_ = make()
    assert isinstance(link, Transport)
    assert link.name == "tofhir" and link.resource == control.resource
    link.timeout_s = 3.0
    assert control.timeout_s == 3.0


def test_acquisition_serves_the_model_hits_in_blocks() -> None:
    link, control, laser, dac, model = make(seed=4, max_block_hits=1000)
    operate(laser, dac, model)
    link.write("ACQ:COUNT 200")
    link.write("ACQ:START")
    assert link.query("ACQ:DONE?") == "1"
    hits, n_blocks = fetch_all(link)
    assert n_blocks == 7  # 6400 hits in blocks of at most 1000
    # the model, asked for the same chunks of triggers, gives the same hits
    assert link.events_per_chunk == 1000 // 32
    twin = TofhirModel(CHANNELS, 4)
    chunks = []
    for first in range(0, 200, 31):
        chunk = twin.generate(min(31, 200 - first), link.last_state)  # type: ignore[arg-type]
        chunk["event"] += first
        chunks.append(chunk)
    assert hits.tobytes() == np.concatenate(chunks).tobytes()
    link.write("ACQ:STOP")
    # every control-plane command went to the instrument, no data-plane query did
    assert control.sent == ["ACQ:COUNT 200", "ACQ:START", "CONF:MASK?", "ACQ:STOP"]


def test_state_is_read_through_the_drivers_at_start() -> None:
    link, _, laser, dac, model = make()
    operate(laser, dac, model, intensity=70.0)
    laser.fibre = 2
    link.write("ACQ:START 50")
    assert laser.reads == 3
    state = link.last_state
    assert state is not None and state.laser_on and state.intensity_pct == 70.0
    assert state.fibre_channel == 2
    np.testing.assert_array_equal(state.t1_codes, dac.t1)
    hits, _ = fetch_all(link)
    np.testing.assert_array_equal(np.unique(hits["channel"]), [2, 3])


def test_a_forgotten_threshold_shows_in_the_data() -> None:
    link, _, laser, dac, model = make()
    operate(laser, dac, model)
    dac.t2 = np.full(32, 63)  # the sequence never set thr2
    link.write("ACQ:START 300")
    hits, _ = fetch_all(link)
    assert hits.size > 0
    assert np.isnan(hits["t2"]).mean() < 0.5  # pulses of ~40 uA still cross 15 uA ...
    laser.intensity_value = 17.0  # ... but small ones do not
    link.write("ACQ:START 300")
    hits, _ = fetch_all(link)
    assert np.isnan(hits["t2"]).mean() > 0.5


def test_safe_state_gives_no_hits() -> None:
    link, *_ = make()
    link.write("ACQ:START 5000")
    assert link.query("ACQ:DONE?") == "1"
    hits, n_blocks = fetch_all(link)
    assert hits.size == 0 and n_blocks == 0


def test_done_is_0_before_any_start_and_events_restart_at_0() -> None:
    link, _, laser, dac, model = make()
    assert link.query("ACQ:DONE?") == "0"
    operate(laser, dac, model)
    for _ in range(2):
        link.write("ACQ:START 10")
        hits, _ = fetch_all(link)
        assert hits["event"].min() == 0 and hits["event"].max() == 9


def test_masked_channels_give_no_hits() -> None:
    link, control, laser, dac, model = make()
    operate(laser, dac, model)
    control.answers["CONF:MASK?"] = str(0b1010)
    link.write("ACQ:START 20")
    hits, _ = fetch_all(link)
    np.testing.assert_array_equal(np.unique(hits["channel"]), [1, 3])
    control.answers["CONF:MASK?"] = "ERROR"
    with pytest.raises(InstrumentReplyError, match="mask"):
        link.write("ACQ:START 20")


def test_other_queries_are_forwarded() -> None:
    link, control, *_ = make()
    assert link.query("*IDN?") == "SIM,TOFHIR,1,1"
    link.write("*IDN?")
    assert link.read() == "SIM,TOFHIR,1,1"
    assert control.sent == ["*IDN?", "*IDN?"]


def test_injected_timeout_on_fetch_loses_nothing() -> None:
    link, _, laser, dac, model = make(max_block_hits=100)
    operate(laser, dac, model)
    link.write("ACQ:START 10")
    link.inject_fault("timeout", "FETCH?")
    with pytest.raises(InstrumentTimeout) as err:
        link.query_block("FETCH?")
    assert err.value.instrument == "tofhir" and err.value.command == "FETCH?"
    hits, _ = fetch_all(link)  # the next ones work, and nothing was lost
    assert hits.size == 10 * 32
    assert np.array_equal(hits["event"], np.repeat(np.arange(10), 32))


def test_injected_garbled_block_raises_reply_error() -> None:
    link, control, laser, dac, model = make(max_block_hits=100)
    operate(laser, dac, model)
    link.write("ACQ:START 10")
    link.inject_fault("garbled", "fetch?")
    with pytest.raises(InstrumentReplyError, match="short block"):
        link.query_block("FETCH?")
    link.clear()  # what the Instrument base does before its next command
    assert control.cleared == 1
    hits, _ = fetch_all(link)
    assert hits.size == 10 * 32 - 96  # the garbled block (3 events of 32 hits) is lost


def test_injected_faults_on_text_replies() -> None:
    link, control, *_ = make()
    link.inject_fault("garbled", "ACQ:DONE?")
    reply = link.query("ACQ:DONE?")
    assert reply not in ("0", "1")
    link.inject_fault("garbled", "*IDN?")
    assert link.query("*IDN?") != "SIM,TOFHIR,1,1"
    assert not control.pending  # the real reply was swallowed, not left behind
    link.inject_fault("timeout", None, count=2)
    for command in ("ACQ:START 5", "*IDN?"):
        with pytest.raises(InstrumentTimeout):
            link.query(command) if command.endswith("?") else link.write(command)
    assert "ACQ:START 5" not in control.sent  # a timed-out command never arrived
    assert link.query("*IDN?") == "SIM,TOFHIR,1,1"
    link.inject_fault("timeout", "FETCH?")
    link.clear_faults()
    assert link.query_block("FETCH?") == b""
    with pytest.raises(ValueError):
        link.inject_fault("melted", "FETCH?")  # type: ignore[arg-type]


def test_text_read_of_a_block_is_a_reply_error() -> None:
    link, *_ = make()
    link.write("FETCH?")
    with pytest.raises(InstrumentReplyError, match="binary block"):
        link.read()


def test_trigger_rate_makes_the_acquisition_take_time() -> None:
    link, _, laser, dac, model = make(trigger_rate_hz=1000.0)
    operate(laser, dac, model)
    link.write("ACQ:START 100000")
    assert link.query("ACQ:DONE?") == "0"
    time.sleep(0.02)
    early, _ = fetch_all(link)
    assert 0 < early.size < 1000 * 32 and early["event"].max() < 1000
    link.write("ACQ:STOP")
    assert link.query("ACQ:DONE?") == "1"
    rest, _ = fetch_all(link)
    n_events = int(np.concatenate([early, rest])["event"].max()) + 1
    assert n_events < 1000  # stopped early: later triggers never happened


def test_blocks_end_on_event_boundaries() -> None:
    link, _, laser, dac, model = make(max_block_hits=100)
    codes = np.round(model.baseline).astype(int)  # noise: a varying number of hits per event
    laser._on, laser.intensity_value = True, 30.0
    dac.t1, dac.t2 = codes, codes
    link.write("ACQ:START 200")
    first_events, last_events = [], []
    while payload := link.query_block("FETCH?"):
        block = np.frombuffer(payload, dtype=HIT_DTYPE)
        assert 0 < block.size <= 100
        first_events.append(block["event"][0])
        last_events.append(block["event"][-1])
    assert all(a < b for a, b in zip(last_events[:-1], first_events[1:], strict=True))
    assert last_events[-1] == 199


def test_hits_do_not_depend_on_when_they_are_fetched() -> None:
    slow, _, laser_s, dac_s, model_s = make(seed=9, trigger_rate_hz=4000.0, max_block_hits=320)
    fast, _, laser_f, dac_f, model_f = make(seed=9, max_block_hits=320)
    operate(laser_s, dac_s, model_s)
    operate(laser_f, dac_f, model_f)
    slow.write("ACQ:START 200")  # 50 ms
    fast.write("ACQ:START 200")
    trickled = []
    while True:
        done = slow.query("ACQ:DONE?") == "1"
        payload = slow.query_block("FETCH?")
        if payload:
            trickled.append(np.frombuffer(payload, dtype=HIT_DTYPE))
        elif done:
            break
    assert len(trickled) > 2
    at_once, _ = fetch_all(fast)
    assert np.concatenate(trickled).tobytes() == at_once.tobytes()
