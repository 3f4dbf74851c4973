"""The layering of design section 1, checked on what each layer actually imports.

Two checks: import-linter's contracts (``pyproject.toml``) on every import statement, and what
importing a layer really loads at run time (lazy imports included).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

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
    "teststand.app": ("PyQt6", "pyqtgraph"),
    # storage reads and writes files; it knows no instruments
    "teststand.storage": ("pyvisa", "serial", "teststand.drivers", "teststand.station"),
}

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    command = str(exe) if exe.exists() else shutil.which("lint-imports")
    assert command, "import-linter is not installed (it is in the dev extra)"
    out = subprocess.run(
        [command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


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
