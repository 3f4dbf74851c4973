"""Core: transports (VISA, serial), the declarative Instrument base class, validators, hits.

Drivers build on these; nothing here knows about a particular instrument or about simulation.
"""

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
from .hits import CHANNEL_DTYPE, HIT_DTYPE, empty_hits

__all__ = [
    "CHANNEL_DTYPE",
    "HIT_DTYPE",
    "MAX_BLOCK_BYTES",
    "Identity",
    "Instrument",
    "Parameter",
    "SerialPort",
    "SerialTransport",
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
