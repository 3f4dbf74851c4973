"""Messages: what a plan asks the engine to do.

A plan is a generator of :class:`Msg`. It does no I/O itself, so a test can list a plan's
messages without any hardware (``[m.command for m in plan]``). The engine answers some messages
by sending a value back into the generator (``acquire`` can return the hits it recorded).
"""

from __future__ import annotations

from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The commands the engine understands.
COMMANDS = frozenset(
    {
        "open_run",  # kwargs: axes (list of axis names), n_steps (planned)
        "set",  # obj, args=(attribute, value): set one instrument parameter (validated, read back)
        "call",  # obj, args=(method, *arguments): call a driver method
        "open_step",  # kwargs: axes ({axis: value}); a step groups the acquisitions of one point
        "acquire",  # obj (a readout), kwargs: n_triggers, return_hits
        "close_step",  # the step is complete: it is recorded and flushed
        "checkpoint",  # a place where the run may pause or stop cleanly
        "safe_state",  # obj: put one instrument in its safe state now
        "log",  # kwargs: message
    }
)


@dataclass(frozen=True)
class Msg:
    """One request from a plan to the engine."""

    command: str
    obj: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"unknown plan message {self.command!r}")


#: A plan: yields messages, receives the engine's replies; a sub-plan may return a value.
Plan = Generator[Msg, Any, Any]


def open_run(axes: Sequence[str], n_steps: int) -> Msg:
    """Declare the scan axes (the ``/steps`` columns) and how many steps are planned."""
    return Msg("open_run", kwargs={"axes": list(axes), "n_steps": int(n_steps)})


def set_(obj: str, attribute: str, value: Any) -> Msg:
    """Set ``obj.attribute = value``; the driver validates it and reads it back."""
    return Msg("set", obj, (attribute, value))


def call(obj: str, method: str, *arguments: Any) -> Msg:
    """Call ``obj.method(*arguments)``."""
    return Msg("call", obj, (method, *arguments))


def open_step(**axes: float) -> Msg:
    """Open a step at the given scan-axis values."""
    return Msg("open_step", kwargs={"axes": {k: float(v) for k, v in axes.items()}})


def acquire(readout: str, n_triggers: int, *, return_hits: bool = False) -> Msg:
    """Take ``n_triggers`` triggers (laser pulses or random gates) with ``readout``."""
    return Msg(
        "acquire", readout, kwargs={"n_triggers": int(n_triggers), "return_hits": return_hits}
    )


def close_step() -> Msg:
    """Close the open step: the engine records it."""
    return Msg("close_step")


def checkpoint() -> Msg:
    """Mark a point where pausing or stopping leaves the run consistent."""
    return Msg("checkpoint")


def safe_state(obj: str) -> Msg:
    """Put ``obj`` in its safe state."""
    return Msg("safe_state", obj)


def log(message: str) -> Msg:
    """Write a line to the run log."""
    return Msg("log", kwargs={"message": message})
