"""Every driver parameter documents what it is, its units and its range (PyMeasure's check)."""

from __future__ import annotations

import inspect

import pytest

import teststand.drivers
from teststand.core import (
    Instrument,
    Parameter,
    strict_bool,
    strict_discrete_set,
    strict_int_array,
    strict_int_range,
    strict_range,
)

DRIVERS = [
    obj
    for name in teststand.drivers.__all__
    if inspect.isclass(obj := getattr(teststand.drivers, name)) and issubclass(obj, Instrument)
]
PARAMETERS = [
    pytest.param(driver, name, parameter, id=f"{driver.__name__}.{name}")
    for driver in DRIVERS
    for name, parameter in driver.parameters().items()
]


#: Instance attributes a parameter's range may depend on (stand options or instrument facts).
INSTANCE_LIMITS = (
    "n_channels",
    "max_code",
    "max_triggers",
    "max_intensity_pct",
    "max_rate_hz",
    "fibre_outputs",
)


def number_forms(x: float) -> set[str]:
    """Ways a bound may be written in a docstring."""
    forms = {f"{x:g}", repr(x), str(x)}
    if float(x).is_integer():
        forms |= {str(int(x)), f"{int(x):_}", f"{int(x):,}"}
    return forms


def test_every_driver_is_walked() -> None:
    names = {driver.__name__ for driver in DRIVERS}
    assert {"LaserPulser", "ThresholdDac", "TofhirReadout", "HptdcReadout"} <= names
    assert len(PARAMETERS) >= 25


@pytest.mark.parametrize(("driver", "name", "parameter"), PARAMETERS)
def test_parameter_docstring(driver: type[Instrument], name: str, parameter: Parameter) -> None:
    doc = " ".join(parameter.doc.split())
    assert len(doc) >= 30, f"{driver.__name__}.{name}: docstring too short: {doc!r}"
    assert parameter.name == name
    if parameter.units:
        assert parameter.units in doc, f"{name}: units {parameter.units!r} not in {doc!r}"
    validator = parameter.validator
    if validator is None:
        assert parameter.read_only, f"{name}: a control without a strict validator"
        assert "read" in doc, f"{name}: a measurement should say it is read only / read once"
        return
    if validator is strict_bool:
        assert "bool" in doc
        return
    if callable(parameter.values):
        # The range depends on the instance; the docstring must say on what.
        assert "range" in doc and any(limit in doc for limit in INSTANCE_LIMITS), doc
    elif validator in (strict_range, strict_int_range):
        low, high = parameter.values
        assert "strictly" in doc, f"{name}: say the range is strict"
        for bound in (low, high):
            assert any(form in doc for form in number_forms(bound)), f"{name}: {bound} not in doc"
    elif validator is strict_discrete_set:
        for choice in parameter.values:
            assert repr(choice) in doc or str(choice) in doc, f"{name}: {choice!r} not in doc"
    else:
        assert validator is strict_int_array, f"{name}: unknown validator {validator!r}"
    numeric = validator in (strict_range, strict_int_range, strict_int_array)
    if numeric and not parameter.units:
        assert "unitless" in doc, f"{name}: give units or say unitless"


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_public_api_is_documented(driver: type[Instrument]) -> None:
    assert driver.__doc__ and "Safe state" in (driver.__doc__ or "")
    for name, member in inspect.getmembers(driver, inspect.isfunction):
        if not name.startswith("_"):
            assert member.__doc__, f"{driver.__name__}.{name} has no docstring"
