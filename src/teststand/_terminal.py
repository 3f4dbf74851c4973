"""The command line's terminal: output that survives a closed pipe, signals that never raise.

Two promises of the CLI live here. Data taking never stops because the terminal went away: a
closed pipe (``teststand run ... | head``) or a hung-up terminal turns every later write into a
no-op instead of an exception in the middle of a scan. And a signal (SIGINT, SIGTERM, SIGHUP) is
recorded, never raised, while a command drives hardware: the run is aborted at its next
check, the stand goes to its safe state, and a second Ctrl-C cannot interrupt that. Commands
that only read files are interrupted at once, with one line.

Only the standard library is imported here, so the handlers are in place within milliseconds
of the process starting, before numpy, h5py or pyvisa are loaded.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

#: The signals a command handles: Ctrl-C, a kill, the terminal closing.
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class CommandInterrupted(Exception):
    """A signal stopped a command that drives no hardware (it stops at once)."""


class SafeStream:
    """A text stream whose writes never raise: after the first failure it writes nowhere.

    When the reader of a pipe has gone, the file descriptor is pointed at ``/dev/null`` as well,
    so that the interpreter's own flush at exit has nothing to complain about.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        """Write ``text``, or nothing once the stream is broken; never raises."""
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self) -> None:
        """Flush, or nothing once the stream is broken; never raises."""
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def isatty(self) -> bool:
        """Whether the stream is a terminal (False once broken)."""
        try:
            return not self.broken and self._stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _break(self) -> None:
        self.broken = True
        try:
            fd = self._stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # not a real file (a test's capture): dropping the output is enough


def notice(text: str) -> None:
    """Write one line to stderr from anywhere, a signal handler included (never raises)."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, RuntimeError):
        pass
    try:
        os.write(2, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class Signals:
    """The signal handling of one command.

    With ``hardware`` (``run``, ``selftest``) a signal is recorded and :attr:`on_signal` is
    called (the CLI aborts the engine with it); the handler never raises, so no cleanup can be
    cut short, whatever arrives and however often. Without ``hardware`` the first signal raises
    :class:`CommandInterrupted`.
    """

    def __init__(self, *, hardware: bool) -> None:
        self.hardware = hardware
        self.received: list[str] = []
        self.on_signal: Callable[[str], None] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def reason(self) -> str:
        """``"SIGTERM received"`` for the first signal, ``""`` when none came."""
        return f"{self.received[0]} received" if self.received else ""

    def install(self) -> None:
        """Take over the handled signals (only in the main thread; elsewhere a no-op)."""
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread: the caller handles signals
                pass

    def restore(self) -> None:
        """Give the signals back to their previous handlers."""
        for sig, old in self._previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        first = not self.received
        self.received.append(name)
        if not self.hardware:
            raise CommandInterrupted(f"{name} received")
        if first:
            notice(f"teststand: {name} received: stopping, the stand goes to its safe state")
        else:
            notice(f"teststand: {name} received again: already stopping (safe state first)")
        if self.on_signal is not None:
            self.on_signal(f"{name} received")
