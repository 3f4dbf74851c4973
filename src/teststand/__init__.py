"""teststand: controller for laboratory test stands of precision-timing detectors.

A laser pulser lights scintillator bars or sensors, a DAC sets the discriminator thresholds and a
TOFHIR2 ASIC or an HPTDC timestamps every hit. Scan plans step the instruments, every hit is
recorded to HDF5, and the calibrations (S-curves, amplitude walk, time walk, offsets, resolution)
are fitted from the same data online and offline.

Importing ``teststand`` never imports Qt: the GUI lives behind the ``gui`` extra.
"""

from typing import Any

__all__ = ["__version__"]


def __getattr__(name: str) -> Any:
    # Looked up on first use: importlib.metadata scans site-packages, and the command line
    # takes over its signals before anything slow is imported (teststand._entry).
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("teststand")
        except PackageNotFoundError:  # running from a source tree that is not installed
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
