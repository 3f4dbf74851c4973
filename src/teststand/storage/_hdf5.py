"""Low-level helpers around h5py: opening run files and the superblock's consistency flags.

Two facts of HDF5 (checked with HDF5 2.0 through h5py 3.16) shape this module:

* A reader holds HDF5's shared file lock for as long as it has the file open, SWMR readers
  included. A writer that reopens a finished run in ``r+`` mode to set its status would then fail
  with "unable to lock file" whenever the GUI follows the run. The superblock's consistency flags
  still keep a second *writer* out, so :func:`open_for_update` falls back to opening without the
  lock when only readers hold it.
* A writer that dies leaves the superblock flagged "open for (SWMR) write". SWMR readers can still
  open the file, but a plain ``h5py.File(path, "r")`` and every ``r+`` open are refused until the
  flags are cleared (the ``h5clear -s`` tool does this). :func:`clear_status_flags` does the same
  in pure Python for ``RunWriter.reopen``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import RunFileError

log = logging.getLogger(__name__)

_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Resolved paths of the run files a RunWriter of this process is recording.
ACTIVE_WRITERS: set[Path] = set()

#: How long an open waits for another process to finish a short exclusive update (the writer
#: setting the final status takes milliseconds).
OPEN_RETRY_S = 2.0


def one_line(text: object) -> str:
    """Collapse an exception text to one line."""
    return " ".join(str(text).split())


def superblock_offset(path: str | os.PathLike[str]) -> int | None:
    """Offset of the HDF5 superblock in the file, or ``None`` when it is not an HDF5 file.

    HDF5 looks for its signature at 0, 512, 1024, 2048, ... (after an optional user block).
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = 0
        while offset + len(_SIGNATURE) <= size:
            fh.seek(offset)
            if fh.read(len(_SIGNATURE)) == _SIGNATURE:
                return offset
            offset = 512 if offset == 0 else offset * 2
    return None


def is_lock_error(exc: BaseException) -> bool:
    """Whether an h5py open failed on HDF5's file lock (another process has the file open)."""
    return isinstance(exc, BlockingIOError) or "lock" in str(exc).lower()


def is_open_for_write_error(exc: BaseException) -> bool:
    """Whether an h5py open failed because the superblock says a writer has the file open."""
    return "already open for write" in str(exc) or "not already open for SWMR" in str(exc)


def open_for_update(path: Path) -> h5py.File:
    """Open an existing run file in ``r+`` mode (not SWMR).

    Uses HDF5's file lock when it can be had; when readers hold it (a GUI following the run),
    opens without the lock: the superblock's flags still refuse a concurrent writer.

    Raises:
        RunFileError: the file is missing, not HDF5, or open for writing elsewhere.
    """
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    try:
        return h5py.File(path, "r+", libver="latest")
    except OSError as exc:
        if not is_lock_error(exc):
            raise _open_error(path, exc, "for update") from None
    log.debug("%s: readers hold the file lock; updating without it", path)
    try:
        return h5py.File(path, "r+", libver="latest", locking=False)
    except OSError as exc:
        raise _open_error(path, exc, "for update") from None


def open_for_reading(path: Path) -> h5py.File:
    """Open a run file for reading with SWMR, which works while a writer appends.

    Retries for up to :data:`OPEN_RETRY_S` while another process holds the file for a short
    exclusive update (the writer setting the final status).

    Raises:
        RunFileError: missing, not HDF5, or still open for writing (without SWMR) after the wait.
    """
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileError(f"{path}: is a folder, not a run file")
    deadline = time.monotonic() + OPEN_RETRY_S
    while True:
        try:
            return h5py.File(path, "r", swmr=True)
        except OSError as exc:
            error = exc
        try:
            if superblock_offset(path) is None:
                raise RunFileError(f"{path}: not an HDF5 file") from None
        except OSError as exc:
            raise RunFileError(f"{path}: cannot read ({one_line(exc.strerror)})") from None
        busy = is_lock_error(error) or is_open_for_write_error(error)
        if not busy:
            try:  # an HDF5 file of another origin that SWMR cannot open
                return h5py.File(path, "r")
            except OSError:
                raise _open_error(path, error, "for reading") from None
        if time.monotonic() > deadline:
            raise _open_error(path, error, "for reading") from None
        time.sleep(0.02)


def _open_error(path: Path, exc: OSError, purpose: str) -> RunFileError:
    if isinstance(exc, FileNotFoundError):
        return RunFileError(f"{path}: no such file")
    if is_lock_error(exc) or is_open_for_write_error(exc):
        return RunFileError(
            f"{path}: cannot open {purpose}: another program is writing it, or its writer died "
            "before closing it (RunWriter.reopen or 'h5clear -s' clears that mark)"
        )
    try:
        if superblock_offset(path) is None:
            return RunFileError(f"{path}: not an HDF5 file")
    except OSError:
        pass
    return RunFileError(f"{path}: cannot open {purpose} ({one_line(exc)})")


# -- superblock consistency flags --------------------------------------------------------------
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    a = ((a - c) & _MASK) ^ _rot(c, 4)
    c = (c + b) & _MASK
    b = ((b - a) & _MASK) ^ _rot(a, 6)
    a = (a + c) & _MASK
    c = ((c - b) & _MASK) ^ _rot(b, 8)
    b = (b + a) & _MASK
    a = ((a - c) & _MASK) ^ _rot(c, 16)
    c = (c + b) & _MASK
    b = ((b - a) & _MASK) ^ _rot(a, 19)
    a = (a + c) & _MASK
    c = ((c - b) & _MASK) ^ _rot(b, 4)
    b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rot(b, 14)) & _MASK
    a = ((a ^ c) - _rot(c, 11)) & _MASK
    b = ((b ^ a) - _rot(a, 25)) & _MASK
    c = ((c ^ b) - _rot(b, 16)) & _MASK
    a = ((a ^ c) - _rot(c, 4)) & _MASK
    b = ((b ^ a) - _rot(a, 14)) & _MASK
    c = ((c ^ b) - _rot(b, 24)) & _MASK
    return c


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5 metadata (H5_checksum_lookup3)."""
    a = b = c = (0xDEADBEEF + len(data) + initval) & _MASK
    if not data:
        return c
    # The tail is zero-padded to a whole 12-byte block: adding zero bytes is what C does.
    padded = data + b"\0" * (-len(data) % 12)
    words = struct.unpack(f"<{len(padded) // 4}I", padded)
    for i in range(0, len(words), 3):
        a = (a + words[i]) & _MASK
        b = (b + words[i + 1]) & _MASK
        c = (c + words[i + 2]) & _MASK
        if i + 3 < len(words):
            a, b, c = _mix(a, b, c)
    return _final(a, b, c)


def clear_status_flags(path: Path) -> bool:
    """Clear the superblock's "open for write / SWMR write" flags left by a writer that died.

    This is what ``h5clear -s`` does. It must only be called when no process is writing the
    file: the flags are what keeps a second writer out. Returns whether anything was changed.

    Raises:
        RunFileError: not an HDF5 file, a superblock version without flags (0 or 1, never written
            by teststand), or a superblock whose checksum does not verify.
    """
    base = superblock_offset(path)
    if base is None:
        raise RunFileError(f"{path}: not an HDF5 file")
    with open(path, "r+b") as fh:
        fh.seek(base)
        head = fh.read(12)
        version, size_of_offsets, flags = head[8], head[9], head[11]
        if version < 2:
            raise RunFileError(f"{path}: superblock version {version} has no consistency flags")
        # signature(8) version(1) offsets(1) lengths(1) flags(1), 4 addresses, checksum(4)
        n = 12 + 4 * size_of_offsets
        fh.seek(base)
        block = bytearray(fh.read(n + 4))
        (stored,) = struct.unpack("<I", block[n : n + 4])
        if lookup3(bytes(block[:n])) != stored:
            raise RunFileError(f"{path}: the superblock checksum does not verify; not touching it")
        if flags == 0:
            return False
        block[11] = 0
        block[n : n + 4] = struct.pack("<I", lookup3(bytes(block[:n])))
        fh.seek(base)
        fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    log.info("%s: cleared the superblock's open-for-write flags (0x%02x)", path, flags)
    return True


# -- tables with text fields -------------------------------------------------------------------
def storable_table(table: object, what: str) -> np.ndarray:
    """Return ``table`` as a 1-D structured array HDF5 can store.

    numpy text fields (``U``, UCS-4) have no HDF5 type; they become fixed-length UTF-8 fields
    (h5py reads them back as bytes, :func:`readable_table` turns them into text again).

    Raises:
        ValueError: not a 1-D structured array, or a field of Python objects.
    """
    array = np.asarray(table)
    if array.dtype.names is None or array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D structured array, got {array.dtype} {array.shape}")
    fields: list[tuple[Any, ...]] = []
    converted = False
    for name in array.dtype.names:
        dt = array.dtype[name]
        if dt.hasobject:
            raise ValueError(f"{what}: field {name!r} holds Python objects; HDF5 cannot store it")
        if dt.kind == "U" and dt.shape == ():
            encoded = np.char.encode(array[name], "utf-8")
            length = max(dt.itemsize // 4, encoded.dtype.itemsize, 1)
            fields.append((name, h5py.string_dtype("utf-8", length)))
            converted = True
        elif dt.kind == "U":
            raise ValueError(f"{what}: field {name!r} is an array of text; HDF5 cannot store it")
        else:
            fields.append((name, dt))
    if not converted:
        return array
    out = np.empty(array.shape, dtype=np.dtype(fields))
    for name in array.dtype.names:
        value = array[name]
        out[name] = np.char.encode(value, "utf-8") if value.dtype.kind == "U" else value
    return out


def readable_table(array: np.ndarray) -> np.ndarray:
    """Turn the fixed-length UTF-8 fields of a table read from a file back into numpy text."""
    names = array.dtype.names
    if names is None:
        return array
    text = [
        n
        for n in names
        if array.dtype[n].kind == "S"
        and (info := h5py.check_string_dtype(array.dtype[n])) is not None
        and info.encoding == "utf-8"
    ]
    if not text:
        return array
    fields = [(n, f"<U{array.dtype[n].itemsize}" if n in text else array.dtype[n]) for n in names]
    out = np.empty(array.shape, dtype=np.dtype(fields))
    for n in names:
        out[n] = np.char.decode(array[n], "utf-8") if n in text else array[n]
    return out


def attr_value(value: Any) -> Any:
    """An HDF5-storable form of a setting.

    Numbers, booleans, text and arrays of them are stored as they are; ``None`` becomes an empty
    string; mappings and mixed sequences become JSON text.
    """
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, bytes, np.integer, np.floating)):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return str(value)
    if array.dtype.kind in "biuf":
        return array
    if array.dtype.kind == "U":
        return np.array([str(v) for v in array.ravel()], dtype=h5py.string_dtype("utf-8"))
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)
