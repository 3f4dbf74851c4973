"""Files that are not valid run files are refused in one line that names the file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from teststand.errors import RunFileError, UserInputError
from teststand.storage import RunFile, RunWriter

from ._runs import run_docs


def _valid(path):
    writer = RunWriter(path)
    for name, doc in run_docs([100, 200]):
        writer(name, doc)
    return path


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(1).bytes(4096))


def _text(path):
    path.write_text("run_id,channel,t1\nr1,0,12.5\n")


def _empty(path):
    path.write_bytes(b"")


def _other_format(path):
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "someone.else"
        f.create_dataset("data", data=np.arange(3))


def _no_format(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("hits", data=np.arange(3))


def _version(value):
    def make(path):
        _valid(path)
        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = value

    return make


def _without(name):
    def make(path):
        _valid(path)
        with h5py.File(path, "r+") as f:
            del f[name]

    return make


def _without_attr(name):
    def make(path):
        _valid(path)
        with h5py.File(path, "r+") as f:
            del f.attrs[name]

    return make


def _wrong_hits(path):
    _valid(path)
    with h5py.File(path, "r+") as f:
        del f["hits"]
        f.create_dataset("hits", data=np.zeros(3, dtype=[("event", "<u8"), ("t", "<f4")]))


CASES = {
    "missing": (None, "no such file"),
    "random bytes": (_random_bytes, "not an HDF5 file"),
    "text": (_text, "not an HDF5 file"),
    "empty": (_empty, "not an HDF5 file"),
    "other format": (_other_format, "not a teststand run file (format 'someone.else'"),
    "no format": (_no_format, "not a teststand run file (no 'format' attribute)"),
    "version 2": (_version(2), "format version 2 is not supported"),
    "version 0": (_version(0), "format version 0 is not supported"),
    "version text": (_version("1"), "format_version '1' is not an integer"),
    "no steps": (_without("steps"), "no /steps dataset"),
    "no hits": (_without("hits"), "no /hits dataset"),
    "no status": (_without_attr("status"), "no root attribute status"),
    "wrong hits": (_wrong_hits, "/hits is"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_refused_in_one_line(tmp_path, case):
    make, reason = CASES[case]
    path = tmp_path / "run.h5"
    if make is not None:
        make(path)
    with pytest.raises(RunFileError) as info:
        RunFile(path)
    message = str(info.value)
    assert isinstance(info.value, UserInputError)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert reason in message


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(RunFileError, match="is a folder"):
        RunFile(tmp_path)


def test_newer_version_says_to_update(tmp_path):
    path = _version(2)(tmp_path / "run.h5") or tmp_path / "run.h5"
    with pytest.raises(RunFileError, match="update teststand"):
        RunFile(path)
