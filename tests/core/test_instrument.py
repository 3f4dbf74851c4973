"""The Instrument base class: validation, read-back, typed reply errors and resynchronisation."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from teststand.core import (
    Identity,
    Instrument,
    Parameter,
    Transport,
    format_bool01,
    format_int_list,
    parse_bool01,
    parse_float,
    parse_int,
    parse_int_list,
    strict_bool,
    strict_discrete_set,
    strict_int_range,
    strict_range,
)
from teststand.core.testing import CLEAR, TIMEOUT, ProtocolError, expected_protocol
from teststand.errors import (
    InstrumentReplyError,
    InstrumentTimeout,
    RangeError,
    ReadbackMismatch,
)


class Toy(Instrument):
    """A made-up instrument exercising every kind of parameter."""

    level = Instrument.control(
        "LEV?",
        "LEV %.2f",
        """Level in V, float strictly from 0 to 10.""",
        validator=strict_range,
        values=(0.0, 10.0),
        units="V",
        get_process=parse_float,
    )
    rate = Instrument.control(
        "RATE?",
        "RATE %g",
        """Rate in Hz, float strictly from 1 to 1e6.""",
        validator=strict_range,
        values=(1.0, 1e6),
        units="Hz",
        get_process=parse_float,
    )
    mode = Instrument.control(
        "MODE?",
        "MODE %s",
        """Mode, 'fast' or 'slow'.""",
        validator=strict_discrete_set,
        values={"fast": "F", "slow": "S"},
        map_values=True,
    )
    count = Instrument.control(
        "CNT?",
        "CNT %d",
        """Count, int strictly from 0 to limit.""",
        validator=strict_int_range,
        values=lambda toy: (0, toy.limit),
        get_process=parse_int,
    )
    flag = Instrument.control(
        "FLAG?",
        "FLAG %d",
        """Flag, bool.""",
        validator=strict_bool,
        get_process=parse_bool01,
        set_process=format_bool01,
    )
    blind = Instrument.control(
        "BLIND?",
        "BLIND %d",
        """A value the instrument cannot read back reliably, int 0 to 9.""",
        validator=strict_int_range,
        values=(0, 9),
        get_process=parse_int,
        check_set=False,
    )
    size = Instrument.measurement(
        "SIZE?", """Number of channels, read once.""", get_process=parse_int, cached=True
    )
    temperature = Instrument.measurement(
        "TEMP?", """Temperature in degC, read only.""", units="degC", get_process=parse_float
    )
    busy = Instrument.measurement(
        "BUSY?", """Busy flag.""", get_process=parse_bool01, setting=False
    )

    def __init__(self, transport: Transport, *, limit: int = 5) -> None:
        super().__init__(transport)
        self.limit = limit

    def safe_state(self) -> None:
        self.level = 0.0

    def is_safe(self) -> bool:
        return bool(self.level == 0.0)


def test_get_converts_reply() -> None:
    with expected_protocol(Toy, [("LEV?", " 2.50 "), ("MODE?", "S"), ("FLAG?", "1")]) as toy:
        assert toy.level == 2.5
        assert toy.mode == "slow"
        assert toy.flag is True


def test_set_sends_formatted_and_reads_back() -> None:
    with expected_protocol(
        Toy,
        [("LEV 1.23", None), ("LEV?", "1.23"), ("MODE F", None), ("MODE?", "F")],
    ) as toy:
        toy.level = 1.234  # 1.23 carries 1.234 within the format's 0.005
        toy.mode = "fast"


def test_readback_tolerance_follows_the_format() -> None:
    with expected_protocol(Toy, [("LEV 1.23", None), ("LEV?", "1.24")]) as toy:
        with pytest.raises(ReadbackMismatch):
            toy.level = 1.234
    with expected_protocol(Toy, [("RATE 123457", None), ("RATE?", "123457")]) as toy:
        toy.rate = 123456.7  # %g: 6 significant digits
    with expected_protocol(Toy, [("RATE 123457", None), ("RATE?", "123500")]) as toy:
        with pytest.raises(ReadbackMismatch):
            toy.rate = 123456.7


def test_readback_mismatch_names_everything_and_keeps_sync() -> None:
    with expected_protocol(Toy, [("CNT 3", None), ("CNT?", "2"), ("CNT?", "2")], name="toy") as toy:
        with pytest.raises(ReadbackMismatch) as info:
            toy.count = 3
        assert info.value.instrument == "toy" and info.value.command == "CNT 3"
        assert "count" in str(info.value) and "3" in str(info.value)
        assert toy.in_sync
        assert toy.count == 2  # no clear before this: the exchange itself was fine


def test_bool_readback_is_not_an_int() -> None:
    with expected_protocol(Toy, [("FLAG 0", None), ("FLAG?", "1")]) as toy:
        with pytest.raises(ReadbackMismatch):
            toy.flag = False


@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("level", 10.01),
        ("level", -0.1),
        ("level", "5"),
        ("mode", "F"),
        ("count", 6),  # beyond this instance's limit
        ("count", 2.0),
        ("flag", 1),
        ("rate", 0.5),
    ],
)
def test_out_of_range_is_refused_with_nothing_sent(attribute: str, value: object) -> None:
    with expected_protocol(Toy, [], name="toy") as toy:
        with pytest.raises(RangeError) as info:
            setattr(toy, attribute, value)
        assert info.value.instrument == "toy"
        assert attribute in str(info.value)


def test_dynamic_range_per_instance() -> None:
    with expected_protocol(Toy, [("CNT 7", None), ("CNT?", "7")], limit=9) as toy:
        toy.count = 7


def test_check_set_false_does_not_read_back() -> None:
    with expected_protocol(Toy, [("BLIND 4", None)]) as toy:
        toy.blind = 4


def test_measurement_is_read_only() -> None:
    with expected_protocol(Toy, []) as toy:
        with pytest.raises(AttributeError):
            toy.temperature = 20.0


def test_cached_measurement_asks_once() -> None:
    with expected_protocol(Toy, [("SIZE?", "32")]) as toy:
        assert toy.size == 32
        assert toy.size == 32


@pytest.mark.parametrize(
    ("command", "reply", "attribute"),
    [
        ("LEV?", "abc", "level"),
        ("LEV?", "nan", "level"),
        ("LEV?", "", "level"),
        ("CNT?", "2.5", "count"),
        ("MODE?", "X", "mode"),
        ("FLAG?", "2", "flag"),
        ("LEV?", "ERROR", "level"),
    ],
)
def test_garbled_reply_raises_and_resyncs(command: str, reply: str, attribute: str) -> None:
    with expected_protocol(
        Toy, [(command, reply), (CLEAR, None), ("TEMP?", "21.5")], name="toy"
    ) as toy:
        with pytest.raises(InstrumentReplyError) as info:
            getattr(toy, attribute)
        assert info.value.instrument == "toy" and info.value.command == command
        assert not toy.in_sync
        assert toy.temperature == 21.5  # CLEAR scripted before it: the base resynchronised
        assert toy.in_sync


def test_timeout_raises_and_resyncs() -> None:
    with expected_protocol(
        Toy, [("LEV?", TIMEOUT), (CLEAR, None), ("LEV?", "1.00")], name="toy"
    ) as toy:
        with pytest.raises(InstrumentTimeout) as info:
            _ = toy.level
        assert info.value.instrument == "toy" and info.value.command == "LEV?"
        assert toy.level == 1.0


def test_timeout_during_readback_resyncs_before_the_next_set() -> None:
    with expected_protocol(
        Toy,
        [("LEV 2.00", None), ("LEV?", TIMEOUT), (CLEAR, None), ("LEV 2.00", None), ("LEV?", "2")],
    ) as toy:
        with pytest.raises(InstrumentTimeout):
            toy.level = 2.0
        toy.level = 2.0


def test_error_reply_after_a_rejected_set() -> None:
    # The instrument rejects the set and queues ERROR; the read-back reads it.
    with expected_protocol(
        Toy, [("LEV 9.00", None), ("LEV?", "ERROR"), (CLEAR, None), ("LEV?", "1.00")]
    ) as toy:
        with pytest.raises(InstrumentReplyError, match="ERROR"):
            toy.level = 9.0
        assert toy.level == 1.0


def test_identify() -> None:
    with expected_protocol(Toy, [("*IDN?", "ACME, Toy 3000 ,SN123,2.1.0")]) as toy:
        ident = toy.identify()
    assert ident == Identity("ACME, Toy 3000 ,SN123,2.1.0", "ACME", "Toy 3000", "SN123", "2.1.0")
    assert ident.as_dict()["serial"] == "SN123"


@pytest.mark.parametrize("reply", ["ACME,Toy", "ACME,Toy,SN1,1.0,extra", "ACME,,SN1,1.0"])
def test_identify_refuses_malformed_idn(reply: str) -> None:
    with expected_protocol(Toy, [("*IDN?", reply), (CLEAR, None), ("*IDN?", "A,B,C,D")]) as toy:
        with pytest.raises(InstrumentReplyError):
            toy.identify()
        assert toy.identify().model == "B"


def test_settings_reads_every_setting_and_is_json_able() -> None:
    with expected_protocol(
        Toy,
        [
            ("LEV?", "1.00"),
            ("RATE?", "1000"),
            ("MODE?", "F"),
            ("CNT?", "3"),
            ("FLAG?", "0"),
            ("BLIND?", "4"),
            ("SIZE?", "32"),
            ("TEMP?", "21.5"),
        ],
    ) as toy:
        settings = toy.settings()
    assert settings == {
        "level": 1.0,
        "rate": 1000.0,
        "mode": "fast",
        "count": 3,
        "flag": False,
        "blind": 4,
        "size": 32,
        "temperature": 21.5,
    }
    json.dumps(settings)


def test_parameters_are_introspectable() -> None:
    parameters = Toy.parameters()
    assert list(parameters)[:3] == ["level", "rate", "mode"]
    level = Toy.level
    assert isinstance(level, Parameter)
    assert level.name == "level" and level.units == "V" and not level.read_only
    assert "0 to 10" in level.doc
    assert Toy.temperature.read_only
    assert "LEV?" in repr(level)


def test_safe_state_is_abstract_in_the_base() -> None:
    with expected_protocol(Instrument, []) as plain:
        with pytest.raises(NotImplementedError):
            plain.safe_state()
        with pytest.raises(NotImplementedError):
            plain.is_safe()


def test_protocol_helper_catches_unexpected_and_leftover_exchanges() -> None:
    with pytest.raises(ProtocolError, match="expected 'LEV\\?'"):
        with expected_protocol(Toy, [("LEV?", "1")]) as toy:
            _ = toy.rate
    with pytest.raises(ProtocolError, match="never played"):
        with expected_protocol(Toy, [("LEV?", "1"), ("LEV?", "1")]) as toy:
            _ = toy.level
    with pytest.raises(ProtocolError, match="clear"):
        with expected_protocol(Toy, [("LEV?", "1")]) as toy:
            toy.transport.clear()


def test_reply_parsers() -> None:
    assert parse_int_list("1,2,63").tolist() == [1, 2, 63]
    assert parse_int_list("").size == 0
    assert format_int_list(np.array([1, 2, 63])) == "1,2,63"
    for bad in ("1,,2", "1, x", "1.5"):
        with pytest.raises(ValueError):
            parse_int_list(bad)
    with pytest.raises(ValueError):
        parse_float("inf")


class SlowEcho:
    """A transport that takes time between write and read and records interleaving."""

    name = "echo"
    resource = "ECHO"
    timeout_s = 1.0

    def __init__(self) -> None:
        self.pending: str | None = None
        self.interleaved = False

    def write(self, command: str) -> None:
        if self.pending is not None:
            self.interleaved = True  # another thread wrote before this reply was read
        self.pending = command

    def read(self) -> str:
        time.sleep(0.0005)
        reply, self.pending = self.pending, None
        return (reply or "").rstrip("?")

    def query(self, command: str) -> str:
        self.write(command)
        return self.read()

    def query_block(self, command: str) -> bytes:
        raise NotImplementedError

    def clear(self) -> None:
        self.pending = None

    def close(self) -> None:
        pass


def test_exchanges_do_not_interleave_between_threads() -> None:
    transport = SlowEcho()
    toy = Toy(transport)  # type: ignore[arg-type]
    wrong: list[str] = []

    def worker(value: int) -> None:
        for _ in range(20):
            reply = toy.query(f"{value}?")
            if reply != str(value):
                wrong.append(reply)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not transport.interleaved and not wrong
