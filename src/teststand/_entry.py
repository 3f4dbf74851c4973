"""The ``teststand`` console script: signals first, then everything else.

The handlers are installed before :mod:`teststand.cli` (and with it numpy, h5py, pyvisa) is
imported, and they stay until the process exits: a Ctrl-C in the first milliseconds, or one
that arrives while the interpreter shuts down, is recorded like any other and never turns into
a ``KeyboardInterrupt`` traceback or a death by signal.
"""

from __future__ import annotations

import signal
import sys

from ._terminal import HANDLED, Signals


def main() -> None:
    """Run the command line and exit with its code."""
    signals = Signals(hardware=True)
    signals.install()
    from .cli import main as cli_main

    code = cli_main(sys.argv[1:], signals=signals)
    # Everything is done and safe: a signal from here on (the interpreter shutting down
    # restores the default handlers) must not turn the exit code into a death by signal.
    for sig in HANDLED:
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(code)
