"""teststand: controller for laboratory test stands of precision-timing detectors.

A laser pulser lights scintillator bars or sensors, a DAC sets the discriminator thresholds and a
TOFHIR2 ASIC or an HPTDC timestamps every hit. Scan plans step the instruments, every hit is
recorded to HDF5, and the calibrations (S-curves, amplitude walk, time walk, offsets, resolution)
are fitted from the same data online and offline.

Importing ``teststand`` never imports Qt: the GUI lives behind the ``gui`` extra.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("teststand")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
