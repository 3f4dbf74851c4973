"""Transports: lines, terminators, IEEE 488.2 blocks, timeouts and clearing, on VISA and RS232."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyvisa
import serial  # type: ignore[import-untyped, unused-ignore]
from hypothesis import given
from hypothesis import strategies as st

from teststand.core import (
    SerialTransport,
    Transport,
    VisaTransport,
    decode_block,
    encode_block,
)
from teststand.errors import (
    InstrumentIOError,
    InstrumentReplyError,
    InstrumentTimeout,
)

# -- blocks ----------------------------------------------------------------------------------


@given(st.binary(max_size=3000))
def test_block_round_trip(payload: bytes) -> None:
    block = encode_block(payload)
    assert block.startswith(b"#")
    assert decode_block(block) == payload


def test_encode_block_header() -> None:
    assert encode_block(b"hello") == b"#15hello"
    assert encode_block(b"") == b"#10"
    assert encode_block(b"x" * 1234) == b"#41234" + b"x" * 1234


def test_encode_block_refuses_what_the_header_cannot_announce() -> None:
    class Huge:
        def __len__(self) -> int:
            return 1_000_000_000

    with pytest.raises(ValueError):
        encode_block(Huge())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "block",
    [
        b"15hello",  # no '#'
        b"#x5hello",  # digit count not a digit
        b"#0hello",  # indefinite length
        b"#2 5hello",  # length not digits
        b"#19hello",  # short payload
        b"#15hello!",  # trailing byte
        b"#",  # truncated header
    ],
)
def test_decode_block_refuses_malformed(block: bytes) -> None:
    with pytest.raises(InstrumentReplyError) as info:
        decode_block(block, instrument="tofhir", command="FETCH?")
    assert info.value.instrument == "tofhir" and info.value.command == "FETCH?"


def test_decode_block_of_nothing_is_a_timeout() -> None:
    with pytest.raises(InstrumentTimeout):
        decode_block(b"")


# -- VISA (pyvisa-sim) -------------------------------------------------------------------------

TEST_YAML = r"""
spec: "1.1"
devices:
  dev:
    eom:
      TCPIP INSTR:
        q: "\n"
        r: "\n"
      ASRL INSTR:
        q: "\n"
        r: "\n"
    error: ERROR
    dialogues:
      - q: "*IDN?"
        r: "ACME,TEST,42,1.0"
      - q: "BLOCK?"
        r: "#15hello"
      - q: "EMPTY?"
        r: "#10"
      - q: "NEWLINE?"
        r: "#13a\nb"
      - q: "BADHEAD?"
        r: "X15hello"
      - q: "SHORT?"
        r: "#19hello"
      - q: "NOTERM?"
        r: "#15helloX"
      - q: "LATIN?"
        r: "café"
      - q: "SILENT"
resources:
  TCPIP0::dev.sim::inst0::INSTR:
    device: dev
  ASRL7::INSTR:
    device: dev
"""

TCPIP = "TCPIP0::dev.sim::inst0::INSTR"
ASRL = "ASRL7::INSTR"


@pytest.fixture
def rm(tmp_path: Path) -> Iterator[pyvisa.ResourceManager]:
    path = tmp_path / "test.yaml"
    path.write_text(TEST_YAML)
    manager = pyvisa.ResourceManager(f"{path}@sim")
    yield manager
    manager.close()


@pytest.fixture(params=[TCPIP, ASRL])
def visa(request: pytest.FixtureRequest, rm: pyvisa.ResourceManager) -> VisaTransport:
    return VisaTransport(rm.open_resource(request.param), name="dev", timeout_s=0.05)


def test_visa_transport_is_a_transport(visa: VisaTransport) -> None:
    assert isinstance(visa, Transport)
    assert visa.resource in (TCPIP, ASRL)
    assert visa.timeout_s == pytest.approx(0.05)
    visa.timeout_s = 0.2
    assert visa.visa_resource.timeout == pytest.approx(200)


def test_visa_query_strips_terminator(visa: VisaTransport) -> None:
    assert visa.query("*IDN?") == "ACME,TEST,42,1.0"


def test_visa_write_then_read(visa: VisaTransport) -> None:
    visa.write("*IDN?")
    assert visa.read() == "ACME,TEST,42,1.0"


def test_visa_timeout_names_instrument_and_command(visa: VisaTransport) -> None:
    with pytest.raises(InstrumentTimeout) as info:
        visa.query("SILENT")
    assert info.value.instrument == "dev" and info.value.command == "SILENT"
    assert "dev" in str(info.value) and "SILENT" in str(info.value)


def test_visa_clear_drops_stale_replies(visa: VisaTransport) -> None:
    visa.write("*IDN?")
    visa.write("BLOCK?")  # two replies nobody read
    visa.clear()
    with pytest.raises(InstrumentTimeout):
        visa.read()
    assert visa.query("*IDN?") == "ACME,TEST,42,1.0"
    assert visa.timeout_s == pytest.approx(0.05)  # restored after draining


def test_visa_query_block(visa: VisaTransport) -> None:
    assert visa.query_block("BLOCK?") == b"hello"
    assert visa.query_block("EMPTY?") == b""
    # A payload byte equal to the termination character must not end the block.
    assert visa.query_block("NEWLINE?") == b"a\nb"
    assert visa.query("*IDN?") == "ACME,TEST,42,1.0"  # nothing left over


@pytest.mark.parametrize("command", ["BADHEAD?", "SHORT?", "NOTERM?"])
def test_visa_malformed_block_raises_reply_error(visa: VisaTransport, command: str) -> None:
    with pytest.raises(InstrumentReplyError) as info:
        visa.query_block(command)
    assert info.value.command == command


def test_visa_block_that_never_comes_is_a_timeout(visa: VisaTransport) -> None:
    with pytest.raises(InstrumentTimeout):
        visa.query_block("SILENT")


def test_visa_closed_session_raises_io_error(rm: pyvisa.ResourceManager) -> None:
    visa = VisaTransport(rm.open_resource(TCPIP), name="dev", timeout_s=0.05)
    visa.close()
    with pytest.raises(InstrumentIOError):
        visa.query("*IDN?")


def test_visa_non_ascii_reply_is_a_reply_error(visa: VisaTransport) -> None:
    with pytest.raises(InstrumentReplyError) as info:
        visa.query("LATIN?")
    assert info.value.command == "LATIN?"


# -- serial: pyserial loop:// -------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[serial.SerialBase]:
    port = serial.serial_for_url("loop://", timeout=0.05)
    yield port
    port.close()


def test_serial_loop_query(loop: serial.SerialBase) -> None:
    link = SerialTransport(loop, name="laser")
    assert isinstance(link, Transport)
    assert link.resource == "loop://"
    assert link.query("TUNE?") == "TUNE?"  # loop:// echoes the line, terminator stripped


def test_serial_terminators(loop: serial.SerialBase) -> None:
    link = SerialTransport(loop, name="laser", read_termination="\r\n", write_termination="\r\n")
    link.write("OUTP 1")
    assert link.read() == "OUTP 1"


def test_serial_timeout_on_silence(loop: serial.SerialBase) -> None:
    link = SerialTransport(loop, name="laser")
    link.last_command = "INTLK?"
    start = time.monotonic()
    with pytest.raises(InstrumentTimeout) as info:
        link.read()
    assert time.monotonic() - start < 1.0
    assert info.value.instrument == "laser" and info.value.command == "INTLK?"


def test_serial_partial_line_is_a_timeout(loop: serial.SerialBase) -> None:
    link = SerialTransport(loop, name="laser")
    loop.write(b"12.")  # the rest of the line never comes
    with pytest.raises(InstrumentTimeout, match="partial"):
        link.read()


def test_serial_clear_drops_buffered_lines(loop: serial.SerialBase) -> None:
    link = SerialTransport(loop, name="laser")
    link.write("stale 1")
    link.write("stale 2")
    link.clear()
    assert loop.timeout == pytest.approx(0.05)
    assert link.query("fresh") == "fresh"


def test_serial_port_without_timeout_gets_one() -> None:
    port = serial.serial_for_url("loop://", timeout=None)
    try:
        link = SerialTransport(port, name="laser")
        assert link.timeout_s == pytest.approx(2.0)
        link.timeout_s = 0.3
        assert port.timeout == pytest.approx(0.3)
    finally:
        port.close()


# -- serial: scripted fake port ------------------------------------------------------------------


class FakeSerial:
    """A scripted RS232 port: each complete written line queues its reply bytes."""

    def __init__(self, replies: dict[bytes, bytes], in_flight: bytes = b"") -> None:
        self.port = "/dev/ttyFAKE0"
        self.timeout: float | None = 0.05
        self.replies = replies
        self.buffer = bytearray()
        self.written = bytearray()
        self.in_flight = in_flight  # arrives just after the next input-buffer reset
        self.fail: Exception | None = None
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.fail is not None:
            raise self.fail
        self.written += data
        self.buffer += self.replies.get(bytes(data), b"")
        return len(data)

    def read(self, size: int = 1) -> bytes:
        chunk = bytes(self.buffer[:size])
        del self.buffer[:size]
        return chunk

    def read_until(self, expected: bytes = b"\n", size: int | None = None) -> bytes:
        end = self.buffer.find(expected)
        cut = len(self.buffer) if end < 0 else end + len(expected)
        return self.read(cut)

    def reset_input_buffer(self) -> None:
        self.buffer.clear()
        self.buffer += self.in_flight
        self.in_flight = b""

    def close(self) -> None:
        self.closed = True


def test_fake_serial_block_and_lines() -> None:
    port = FakeSerial({b"FETCH?\n": encode_block(b"\x00\x01\n\x02") + b"\n", b"A?\n": b"1\n"})
    link = SerialTransport(port, name="tofhir")
    assert link.resource == "/dev/ttyFAKE0"
    assert link.query_block("FETCH?") == b"\x00\x01\n\x02"
    assert link.query("A?") == "1"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", InstrumentTimeout),
        (b"X15hello\n", InstrumentReplyError),
        (b"#19hello\n", InstrumentReplyError),  # short: 9 announced, 6 arrive
        (b"#15hello", InstrumentReplyError),  # no terminator after the block
    ],
)
def test_fake_serial_bad_blocks(reply: bytes, error: type[Exception]) -> None:
    link = SerialTransport(FakeSerial({b"FETCH?\n": reply}), name="tofhir")
    with pytest.raises(error) as info:
        link.query_block("FETCH?")
    assert getattr(info.value, "command", None) == "FETCH?"


def test_fake_serial_clear_also_drains_a_reply_in_flight() -> None:
    port = FakeSerial({b"A?\n": b"1\n"}, in_flight=b"late reply\n")
    link = SerialTransport(port, name="laser")
    port.buffer += b"stale\n"
    link.clear()
    assert port.buffer == b""
    assert port.timeout == pytest.approx(0.05)
    assert link.query("A?") == "1"


def test_fake_serial_port_error_is_an_io_error() -> None:
    port = FakeSerial({})
    port.fail = serial.SerialException("device reports readiness to read but returned no data")
    link = SerialTransport(port, name="laser")
    with pytest.raises(InstrumentIOError) as info:
        link.write("OUTP 0")
    assert info.value.command == "OUTP 0"
    port.fail = serial.SerialTimeoutException("Write timeout")
    with pytest.raises(InstrumentTimeout):
        link.write("OUTP 0")
    link.close()
    assert port.closed


def test_fake_serial_undecodable_reply_is_a_reply_error() -> None:
    link = SerialTransport(FakeSerial({b"A?\n": b"\xff\n"}), name="laser")
    with pytest.raises(InstrumentReplyError):
        link.query("A?")


def test_visa_transport_needs_a_message_based_resource() -> None:
    with pytest.raises(TypeError, match="message-based"):
        VisaTransport(object(), name="dev")  # type: ignore[arg-type]
