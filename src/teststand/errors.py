"""One exception tree for the whole package.

Every error a user can cause (a bad recipe, stand file or run file) derives from
:class:`UserInputError`; the CLI turns it into one line on stderr and exit code 2 without a
traceback. Instrument faults derive from :class:`InstrumentError` and always name the instrument
and the command that failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TeststandError(Exception):
    """Base of every error raised on purpose by teststand."""


class UserInputError(TeststandError):
    """A mistake in something the user handed us (file, option, name): exit code 2."""


class RecipeError(UserInputError):
    """A recipe file is missing, not TOML, or does not validate.

    The message names the file, the key and what was expected.
    """


class StandError(UserInputError):
    """A stand file is missing, not TOML, or does not validate."""


class RunFileError(UserInputError):
    """A run file is missing, unreadable, of another format or format version, or incomplete."""


class ConstantsError(UserInputError):
    """A calibration constants file is unreadable or fails its checksum."""


class AnalysisError(TeststandError):
    """An analysis cannot be carried out on the data given (not a user mistake in itself)."""


class InstrumentError(TeststandError):
    """An instrument did something unexpected.

    Attributes:
        instrument: the instrument's name in the stand (``laser``, ``dac``, ...).
        command: the command in flight when the fault happened, or ``None``.
    """

    def __init__(self, instrument: str, message: str, command: str | None = None) -> None:
        self.instrument = instrument
        self.command = command
        where = f"{instrument}" + (f" (command {command!r})" if command is not None else "")
        super().__init__(f"{where}: {message}")


class InstrumentTimeout(InstrumentError):
    """No (complete) reply arrived within the transport timeout."""


class InstrumentReplyError(InstrumentError):
    """The reply could not be parsed (garbled, wrong type, wrong length, error string)."""


class InstrumentIOError(InstrumentError):
    """The link to the instrument failed (session closed, port gone, any other I/O error)."""


class AcquisitionTimeout(InstrumentTimeout):
    """An acquisition did not complete within its deadline (trigger count / rate + margin)."""


class ReadbackMismatch(InstrumentError):
    """A setter read back a value other than the one that was sent."""


class RangeError(InstrumentError, ValueError):
    """A value was outside the parameter's strict range; nothing was sent."""


class ConnectionFailed(TeststandError):
    """One or more instruments of a stand could not be connected.

    ``failures`` maps each instrument name to the reason; the message lists all of them.
    """

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        listing = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
        super().__init__(f"could not connect {len(self.failures)} instrument(s): {listing}")


class InterlockTripped(InstrumentError):
    """An interlock is open: the laser may not emit. The run stops, safe state first."""


class StandNotSafe(TeststandError):
    """The safe state of one or more instruments could not be confirmed by read-back.

    ``failures`` maps each instrument to what is wrong; the CLI prints ``STAND NOT SAFE: ...``
    and exits with code 3.
    """

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        listing = "; ".join(f"{name}: {why}" for name, why in self.failures.items())
        super().__init__(listing)


class RunAborted(TeststandError):
    """The run was aborted on request (GUI, signal or API)."""


def describe_validation_error(err: Mapping[str, Any], prefix: str = "") -> str:
    """One pydantic error (``ValidationError.errors()[i]``) as ``key: what was expected, got X``.

    ``prefix`` is put before the key (``parameters`` for a recipe's plan parameters).
    """
    # Union members and validators appear in the location as tags ("list[constrained-int]",
    # "literal['all']", "function-after[...]"): they are pydantic's, not the file's keys.
    parts = [
        str(p)
        for p in err["loc"]
        if not str(p).startswith("function-") and "[" not in str(p) and "constrained-" not in str(p)
    ]
    loc = ".".join(([prefix] if prefix else []) + parts)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{loc}: missing (required)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if not loc:
        return msg
    given = err.get("input")
    if isinstance(given, (dict, list)) or given is None:
        return f"{loc}: {msg}"
    return f"{loc}: {msg}, got {given!r}"
