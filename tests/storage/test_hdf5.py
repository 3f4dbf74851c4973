"""The superblock helpers behind RunWriter.reopen."""

from __future__ import annotations

import struct

import h5py
import pytest

from teststand.errors import RunFileError
from teststand.storage._hdf5 import clear_status_flags, lookup3


def test_lookup3_matches_hdf5_superblock_checksums(tmp_path):
    for libver in ("v110", "latest"):
        path = tmp_path / f"{libver}.h5"
        with h5py.File(path, "w", libver=libver) as f:
            f.attrs["x"] = 1
        head = path.read_bytes()[:64]
        n = 12 + 4 * head[9]
        assert lookup3(head[:n]) == struct.unpack("<I", head[n : n + 4])[0]
    # Published lookup3 hashlittle values.
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551


def test_clear_status_flags(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["x"] = 1
    assert clear_status_flags(path) is False  # closed cleanly: nothing to clear
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        clear_status_flags(text)
    old = tmp_path / "old.h5"
    with h5py.File(old, "w", libver="earliest") as f:
        f.attrs["x"] = 1
    with pytest.raises(RunFileError, match="superblock version 0"):
        clear_status_flags(old)
