"""Core: transports (VISA, serial), the declarative Instrument base class, validators, hits.

Drivers build on these; nothing here knows about a particular instrument or about simulation.
The hit and channel records are imported at once; the rest on first use, so that the pure
analysis (which needs only the records) does not pull in pyvisa and pyserial.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hits import CHANNEL_DTYPE, HIT_DTYPE, empty_hits
from .stand import StandInfo

if TYPE_CHECKING:
    from ._instrument import (
        Identity,
        Instrument,
        Parameter,
        format_bool01,
        format_int_list,
        parse_bool01,
        parse_float,
        parse_int,
        parse_int_list,
    )
    from ._transport import (
        MAX_BLOCK_BYTES,
        SerialPort,
        SerialTransport,
        Transport,
        VisaTransport,
        decode_block,
        encode_block,
    )
    from ._validators import (
        Validator,
        strict_bool,
        strict_discrete_set,
        strict_int_array,
        strict_int_range,
        strict_range,
    )

_LAZY = {
    "Identity": "._instrument",
    "Instrument": "._instrument",
    "Parameter": "._instrument",
    "format_bool01": "._instrument",
    "format_int_list": "._instrument",
    "parse_bool01": "._instrument",
    "parse_float": "._instrument",
    "parse_int": "._instrument",
    "parse_int_list": "._instrument",
    "MAX_BLOCK_BYTES": "._transport",
    "SerialPort": "._transport",
    "SerialTransport": "._transport",
    "Transport": "._transport",
    "VisaTransport": "._transport",
    "decode_block": "._transport",
    "encode_block": "._transport",
    "Validator": "._validators",
    "strict_bool": "._validators",
    "strict_discrete_set": "._validators",
    "strict_int_array": "._validators",
    "strict_int_range": "._validators",
    "strict_range": "._validators",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHANNEL_DTYPE",
    "HIT_DTYPE",
    "MAX_BLOCK_BYTES",
    "Identity",
    "Instrument",
    "Parameter",
    "SerialPort",
    "SerialTransport",
    "StandInfo",
    "Transport",
    "Validator",
    "VisaTransport",
    "decode_block",
    "empty_hits",
    "encode_block",
    "format_bool01",
    "format_int_list",
    "parse_bool01",
    "parse_float",
    "parse_int",
    "parse_int_list",
    "strict_bool",
    "strict_discrete_set",
    "strict_int_array",
    "strict_int_range",
    "strict_range",
]
