"""Suite-wide settings: reproducible property tests, no wall-clock deadlines.

Hypothesis draws its examples from a fixed seed (``derandomize``), so a run of the suite is the
same run everywhere, CI included; a failure found once is found again. Set
``HYPOTHESIS_PROFILE=explore`` to search with fresh random examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture
def instrument_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Everything any code sends to any instrument, recorded where it cannot be bypassed.

    The recording sits on the transport classes and on pyvisa's and pyserial's openers (class
    attributes, so a module that imported a function by name still goes through it): every
    VISA resource or serial port opened and every command written lands in the list as
    ``(who, what)``. A bad input must leave it empty.
    """
    import pyvisa
    import serial

    from teststand.core import _transport

    log: list[tuple[str, str]] = []

    def recording(cls: type, method: str, label: Callable[..., tuple[str, str]]) -> None:
        original = getattr(cls, method)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            log.append(label(self, *args, **kwargs))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    for cls in (_transport.VisaTransport, _transport.SerialTransport):
        recording(cls, "write", lambda self, command: (self.name, command))
    recording(
        pyvisa.ResourceManager,
        "open_resource",
        lambda self, name, *a, **k: ("open_resource", str(name)),
    )
    recording(serial.Serial, "open", lambda self: ("serial.open", str(self.port)))
    return log
