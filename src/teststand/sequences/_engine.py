"""The run engine: executes a plan's messages and emits the document stream.

Documents (``name, doc``) go to every subscriber in order: ``start``, then per step
``step_start``, ``hits`` (one or more blocks) and ``step``, and finally ``stop``. The HDF5 writer,
the online analysis, the progress display and the GUI are all subscribers. A step counts as
recorded once its ``step`` document has been delivered; the writer flushes it to disk then.

Safety: on every way out (normal end, exception, abort, SIGINT, SIGTERM) the plan's own cleanup
runs first (it is thrown the exception, as in bluesky) and then the engine puts every instrument
in its safe state in the stand's safe-state order, even when one of them fails to answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from .. import __version__
from ..core.hits import HIT_DTYPE
from ..errors import InterlockTripped, RunAborted, TeststandError
from ._messages import Msg, Plan

log = logging.getLogger(__name__)

Subscriber = Callable[[str, dict[str, Any]], None]


class Readout(Protocol):
    """What the engine needs of a readout driver."""

    def iter_blocks(
        self, n_triggers: int, *, check: Callable[[], None] | None = None
    ) -> Iterator[np.ndarray]: ...


@dataclass
class RunMetadata:
    """What the ``start`` document says about the run besides the plan's axes."""

    recipe_name: str
    kind: str
    recipe_text: str = ""
    stand_name: str = ""
    stand_text: str = ""
    simulated: bool = False
    channels: np.ndarray | None = None
    truth: np.ndarray | None = None
    truth_attrs: Mapping[str, Any] = field(default_factory=dict)
    seed: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: per instrument, the hardware facts the stand declares (DAC step, code range, safe code,
    #: channel counts, ...): recorded beside the read-back settings in ``/instruments/<name>``
    facts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def settings_sha256(self) -> str:
        """Checksum of the settings the run was asked to use (recipe model and stand text)."""
        canonical = json.dumps(
            {"settings": self.settings, "stand": self.stand_text}, sort_keys=True, default=str
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class RunResult:
    """How a run ended."""

    run_id: str
    status: str  # completed | aborted | failed | interrupted
    n_steps: int
    reason: str = ""
    error: BaseException | None = None
    #: instruments whose safe state the read-back did not confirm at the end: ``{name: what}``
    not_safe: dict[str, str] = field(default_factory=dict)


class _Interrupted(RunAborted):
    """Abort caused by a signal (SIGINT, SIGTERM): status ``interrupted``."""


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class RunEngine:
    """Runs plans against connected instruments.

    Args:
        instruments: name -> driver object.
        safe_order: the order in which instruments are put in their safe state.
        block_triggers: the largest number of triggers asked of a readout at once; between blocks
            the engine checks for abort, so this bounds how long an abort takes.
    """

    def __init__(
        self,
        instruments: Mapping[str, Any],
        *,
        safe_order: Sequence[str] = (),
        block_triggers: int = 20_000,
    ) -> None:
        self.instruments = dict(instruments)
        order = [name for name in safe_order if name in self.instruments]
        self.safe_order = order + [n for n in self.instruments if n not in order]
        self.block_triggers = int(block_triggers)
        self._subscribers: dict[int, Subscriber] = {}
        self._optional: set[int] = set()
        self._next_token = 0
        self._abort = threading.Event()
        self._abort_reason = ""
        self._abort_is_signal = False
        self._resume = threading.Event()
        self._resume.set()
        self._pause_requested = threading.Event()
        self.state = "idle"  # idle | running | paused
        self.completed_steps: list[int] = []

    # -- subscribers -------------------------------------------------------------------------
    def subscribe(self, callback: Subscriber, *, critical: bool = True) -> int:
        """Attach a document subscriber; returns a token for :meth:`unsubscribe`.

        A critical subscriber (the run-file writer) that raises fails the run: what it cannot
        record must not be taken. A non-critical one (a progress display, a window) that raises
        is logged and detached: a closed terminal never stops data taking.
        """
        token = self._next_token
        self._next_token += 1
        self._subscribers[token] = callback
        if not critical:
            self._optional.add(token)
        return token

    def unsubscribe(self, token: int) -> None:
        """Detach a subscriber (it receives nothing more)."""
        self._subscribers.pop(token, None)
        self._optional.discard(token)

    def _emit(self, name: str, doc: dict[str, Any]) -> None:
        for token, callback in list(self._subscribers.items()):
            if token not in self._optional:
                callback(name, doc)
                continue
            try:
                callback(name, doc)
            except Exception as exc:  # noqa: BLE001 - an optional subscriber never stops a run
                log.warning("subscriber %r detached after an error: %s", callback, exc)
                self.unsubscribe(token)

    # -- control from other threads ----------------------------------------------------------
    def request_pause(self) -> None:
        """Pause at the next checkpoint (the step in flight completes first)."""
        self._pause_requested.set()
        self._resume.clear()

    def resume(self) -> None:
        """Resume a paused run."""
        self._pause_requested.clear()
        self._resume.set()

    def abort(self, reason: str = "aborted by the user", *, signal: bool = False) -> None:
        """Stop the run as soon as possible: the step in flight is dropped, the rest is kept."""
        self._abort_reason = reason
        self._abort_is_signal = signal
        self._abort.set()
        self._resume.set()

    def _check_abort(self) -> None:
        if self._abort.is_set():
            cls = _Interrupted if self._abort_is_signal else RunAborted
            raise cls(self._abort_reason)

    # -- running -----------------------------------------------------------------------------
    def run(self, plan: Plan, metadata: RunMetadata) -> RunResult:
        """Run ``plan`` to its end and return how it ended.

        Exceptions from instruments or the plan end the run with status ``failed`` (the result
        carries the exception); ``KeyboardInterrupt`` ends it ``interrupted`` and is re-raised
        after the safe state. An abort requested before this call (a signal during start-up) is
        kept: the run stops before its first message. The abort is cleared when the run ends.
        """
        self._resume.set()
        self._pause_requested.clear()
        self.completed_steps = []
        self.state = "running"
        run = _RunState(metadata)
        status, reason = "completed", ""
        error: BaseException | None = None
        reraise: BaseException | None = None
        try:
            self._drive(plan, run)
        except _Interrupted as exc:
            status, reason, error = "interrupted", str(exc), exc
        except RunAborted as exc:
            status, reason, error = "aborted", str(exc), exc
        except KeyboardInterrupt as exc:
            status, reason, error, reraise = "interrupted", "keyboard interrupt", exc, exc
        except Exception as exc:  # noqa: BLE001 - every failure must still reach the safe state
            status, reason, error = "failed", f"{type(exc).__name__}: {exc}", exc
            log.exception("run %s failed", metadata.run_id)
        finally:
            safe_errors = self._all_safe()
            not_safe = self._unconfirmed()
            if not_safe:
                listing = "; ".join(f"{name}: {why}" for name, why in not_safe.items())
                status = "failed" if status == "completed" else status
                reason = f"{reason}; " if reason else ""
                reason += f"STAND NOT SAFE: {listing}"
            elif safe_errors and status == "completed":
                status, reason = "failed", "safe state failed: " + "; ".join(safe_errors)
            self.state = "idle"
            self._abort.clear()
            if run.started:
                self._emit("stop", {"status": status, "finished_utc": utc_now(), "reason": reason})
        if reraise is not None:
            raise reraise
        return RunResult(
            metadata.run_id, status, len(self.completed_steps), reason, error, not_safe
        )

    def _unconfirmed(self) -> dict[str, str]:
        """Instruments whose safe state their own read-back does not confirm."""
        failures: dict[str, str] = {}
        for name in self.safe_order:
            inst = self.instruments[name]
            try:
                detail = (
                    inst.unsafe_detail()
                    if hasattr(inst, "unsafe_detail")
                    else ("" if inst.is_safe() else "not in its safe state")
                )
            except Exception as exc:  # noqa: BLE001 - no answer is no confirmation
                detail = "safe state not confirmed (" + " ".join(str(exc).split()) + ")"
            if detail:
                log.error("%s: STAND NOT SAFE: %s", name, detail)
                failures[name] = str(detail)
        return failures

    def _check_interlocks(self) -> None:
        """Every interlock an instrument reports must be closed; else the run stops."""
        for name, inst in self.instruments.items():
            if not hasattr(inst, "interlocks"):
                continue
            for what, closed in inst.interlocks().items():
                if not closed:
                    raise InterlockTripped(name, f"{what} is open: the run stops, stand safe")

    def _all_safe(self) -> list[str]:
        errors: list[str] = []
        for name in self.safe_order:
            try:
                self.instruments[name].safe_state()
            except Exception as exc:  # noqa: BLE001 - go on with the other instruments
                log.error("could not put %s in its safe state: %s", name, exc)
                errors.append(f"{name}: {exc}")
        return errors

    def _drive(self, plan: Plan, run: _RunState) -> None:
        value: Any = None
        pending: BaseException | None = None
        while True:
            try:
                if pending is not None:
                    exc, pending = pending, None
                    msg = plan.throw(exc)
                else:
                    msg = plan.send(value)
            except StopIteration:
                return
            try:
                value = self._dispatch(msg, run)
            except BaseException as exc:  # noqa: BLE001 - thrown into the plan for its cleanup
                if run.cleaning:
                    # An error during cleanup: note it, keep cleaning, end with the first error.
                    log.error("error during cleanup (%s): %s", msg.command, exc)
                    value = None
                    continue
                run.cleaning = True
                run.step_open = False
                pending = exc

    def _dispatch(self, msg: Msg, run: _RunState) -> Any:
        if not run.cleaning:
            self._check_abort()
        command = msg.command
        if command == "open_run":
            self._open_run(run, list(msg.kwargs["axes"]), int(msg.kwargs["n_steps"]))
            return None
        if command == "set":
            attribute, value = msg.args
            setattr(self._instrument(msg.obj), attribute, value)
            return None
        if command == "call":
            method, *arguments = msg.args
            return getattr(self._instrument(msg.obj), method)(*arguments)
        if command == "safe_state":
            self._instrument(msg.obj).safe_state()
            return None
        if command == "log":
            log.info("%s", msg.kwargs["message"])
            return None
        if command == "checkpoint":
            self._checkpoint()
            return None
        if not run.started:
            raise RuntimeError(f"plan sent {command!r} before open_run")
        if command == "open_step":
            return self._open_step(run, dict(msg.kwargs["axes"]))
        if command == "acquire":
            return self._acquire(run, msg)
        if command == "close_step":
            return self._close_step(run)
        raise RuntimeError(f"unhandled plan message {command!r}")

    def _instrument(self, name: str | None) -> Any:
        if name not in self.instruments:
            raise RuntimeError(f"the plan uses instrument {name!r}, which the stand does not have")
        return self.instruments[name]

    def _checkpoint(self) -> None:
        if self._pause_requested.is_set():
            self.state = "paused"
            log.info("paused")
            self._resume.wait()
            self.state = "running"
            self._check_abort()
            log.info("resumed")

    def _open_run(self, run: _RunState, axes: list[str], n_steps: int) -> None:
        if run.started:
            raise RuntimeError("a plan may open its run only once")
        meta = run.metadata
        self._check_interlocks()
        instruments: dict[str, Any] = {}
        for name in self.safe_order:
            inst = self.instruments[name]
            ident = inst.identify()
            instruments[name] = {
                "idn": ident.idn,
                "serial": ident.serial,
                "firmware": ident.firmware,
                "resource": getattr(getattr(inst, "transport", None), "resource", ""),
                # What the instrument reads back wins over what the stand declares (they agree:
                # the drivers checked the facts at connect).
                "settings": {**dict(meta.facts.get(name, {})), **inst.settings()},
            }
        run.axes = axes
        run.started = True
        self._emit(
            "start",
            {
                "run_id": meta.run_id,
                "recipe_name": meta.recipe_name,
                "kind": meta.kind,
                "recipe_text": meta.recipe_text,
                "stand_name": meta.stand_name,
                "stand_text": meta.stand_text,
                "simulated": meta.simulated,
                "software_version": __version__,
                "started_utc": utc_now(),
                "settings_sha256": meta.settings_sha256(),
                "axes": axes,
                "channels": meta.channels,
                "instruments": instruments,
                "truth": meta.truth,
                "truth_attrs": dict(meta.truth_attrs),
                "n_steps": n_steps,
                "seed": meta.seed,
            },
        )

    def _open_step(self, run: _RunState, axes: dict[str, float]) -> None:
        if run.step_open:
            raise RuntimeError("open_step while a step is open")
        self._check_interlocks()
        unknown = set(axes) - set(run.axes)
        if unknown:
            raise RuntimeError(f"step axes {sorted(unknown)} were not declared in open_run")
        run.step_axes = {name: float(axes.get(name, float("nan"))) for name in run.axes}
        run.step_open = True
        run.step_hits = 0
        run.step_triggers = 0
        run.step_t_start = time.time()
        self._emit("step_start", {"index": run.next_index, "axes": dict(run.step_axes)})

    def _acquire(self, run: _RunState, msg: Msg) -> np.ndarray | None:
        if not run.step_open:
            raise RuntimeError("acquire outside a step")
        readout = self._instrument(msg.obj)
        remaining = int(msg.kwargs["n_triggers"])
        keep = bool(msg.kwargs.get("return_hits", False))
        kept: list[np.ndarray] = []
        while remaining > 0:
            n = min(remaining, self.block_triggers)
            for block in readout.iter_blocks(n, check=self._check_abort):
                block["event"] += np.uint64(run.event_base)
                run.step_hits += int(block.size)
                self._emit("hits", {"index": run.next_index, "hits": block})
                if keep:
                    kept.append(block)
            run.event_base += n
            run.step_triggers += n
            remaining -= n
        if not keep:
            return None
        return np.concatenate(kept) if kept else np.zeros(0, dtype=HIT_DTYPE)

    def _close_step(self, run: _RunState) -> None:
        if not run.step_open:
            raise RuntimeError("close_step without an open step")
        index = run.next_index
        self._emit(
            "step",
            {
                "index": index,
                "axes": dict(run.step_axes),
                "n_hits": run.step_hits,
                "n_triggers": run.step_triggers,
                "t_start": run.step_t_start,
                "t_stop": time.time(),
            },
        )
        self.completed_steps.append(index)
        run.next_index += 1
        run.step_open = False


class _RunState:
    """Book-keeping of one run inside the engine."""

    def __init__(self, metadata: RunMetadata) -> None:
        self.metadata = metadata
        self.started = False
        self.cleaning = False
        self.axes: list[str] = []
        self.step_axes: dict[str, float] = {}
        self.step_open = False
        self.step_hits = 0
        self.step_triggers = 0
        self.step_t_start = 0.0
        self.next_index = 0
        self.event_base = 0


__all__ = ["RunEngine", "RunMetadata", "RunResult", "Subscriber", "TeststandError", "utc_now"]
