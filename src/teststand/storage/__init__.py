"""HDF5 run files, format version 1: the writer, the reader and the analysis results.

``docs/data-format.md`` is the reference of the format. Readers outside teststand need only
h5py; :class:`RunFile` adds validation, step bookkeeping and column-wise reads on top.
"""

from ..core.hits import CHANNEL_DTYPE
from ._reader import RunFile, write_analysis
from ._schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HITS_CHUNK_ROWS,
    RUN_STATUSES,
    steps_dtype,
)
from ._writer import RunWriter

__all__ = [
    "CHANNEL_DTYPE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HITS_CHUNK_ROWS",
    "RUN_STATUSES",
    "RunFile",
    "RunWriter",
    "steps_dtype",
    "write_analysis",
]
