"""Fixtures: the drivers' pyvisa-sim twins, each test on a fresh copy of the packaged YAML."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import pyvisa

from teststand.core import Instrument, VisaTransport

from ._sim import copy_sim_yaml

InstrumentT = TypeVar("InstrumentT", bound=Instrument)


@pytest.fixture
def sim_rm(tmp_path: Path) -> Iterator[pyvisa.ResourceManager]:
    """A ResourceManager on a fresh copy of the simulated stand; closed after the test."""
    manager = pyvisa.ResourceManager(f"{copy_sim_yaml(tmp_path)}@sim")
    yield manager
    manager.close()


@pytest.fixture
def open_sim(sim_rm: pyvisa.ResourceManager) -> Callable[..., Instrument]:
    """``open_sim(Driver, resource, name, **driver_kwargs)``: a driver on its simulated twin."""

    def open_driver(
        driver: type[InstrumentT], resource: str, name: str, **kwargs: object
    ) -> InstrumentT:
        transport = VisaTransport(sim_rm.open_resource(resource), name=name, timeout_s=0.1)
        return driver(transport, **kwargs)

    return open_driver
