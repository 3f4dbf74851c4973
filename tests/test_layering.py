"""The layering of design section 1, checked on what each layer actually imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = {
    # analysis is pure: arrays in, arrays out
    "teststand.analysis": (
        "h5py",
        "pyvisa",
        "serial",
        "PyQt6",
        "pyqtgraph",
        "teststand.drivers",
        "teststand.storage",
        "teststand.sim",
        "teststand.station",
    ),
    # drivers never ask whether they are simulated, and know no files
    "teststand.drivers": ("teststand.sim", "teststand.station", "h5py", "PyQt6"),
    # a headless DAQ computer imports teststand without Qt
    "teststand.cli": ("PyQt6", "pyqtgraph"),
    "teststand.runner": ("PyQt6", "pyqtgraph"),
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_layer_imports(module):
    code = (
        f"import sys, {module}\n"
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') "
        f"for f in {FORBIDDEN[module]!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
