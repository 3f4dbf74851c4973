"""Checks before anything moves: a plan's messages listed without hardware, against the stand.

As bluesky's ``check_limits`` does, :func:`check_plan` runs a plan generator with no instrument
behind it and checks every message against the limits the stand file declares (the drivers'
options, carried by :class:`~teststand.core.StandInfo`): laser intensity, repetition rate and
fibre output, DAC code arrays (length, integers, code range), trigger counts, step axes. It
answers the messages a plan needs answers to (``acquire(..., return_hits=True)`` of a baseline
noise scan gets synthetic noise hits around an assumed baseline), so the plan runs its own
threshold arithmetic and raises where the real run would. It returns what the run will do:
steps and triggers, which the progress display counts.

A violation raises :class:`PlanRejected` with one line; the caller adds the recipe's path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtr

from ..core.hits import HIT_DTYPE
from ..core.stand import StandInfo
from ._messages import Msg, Plan

#: The most steps a recipe may have (the shipped AWC calibration has 2249); beyond this a scan
#: is a mistake, or a night's queue that should be split into runs.
MAX_STEPS = 200_000

#: The most messages a dry run lists before it gives up.
MAX_MESSAGES = 20 * MAX_STEPS

#: Width (codes) of the synthetic noise S-curves the dry run answers a baseline scan with.
_DRY_RUN_NOISE_CODES = 1.0


class PlanRejected(ValueError):
    """The plan would do something the stand does not allow (the message says what)."""


@dataclass(frozen=True)
class PlanSummary:
    """What a checked plan will do: its axes, steps and triggers."""

    axes: tuple[str, ...]
    step_triggers: tuple[int, ...]
    n_steps_announced: int

    @property
    def n_steps(self) -> int:
        """Steps the plan records."""
        return len(self.step_triggers)

    @property
    def n_triggers(self) -> int:
        """Triggers (laser pulses, random gates) over the whole run."""
        return int(sum(self.step_triggers))


class _DryRun:
    """Follows a plan's messages with the stand's limits and answers what needs an answer."""

    def __init__(self, stand: StandInfo, baseline_code: float | None) -> None:
        self.stand = stand
        self.baseline = baseline_code
        self.axes: tuple[str, ...] = ()
        self.announced = 0
        self.steps: list[int] = []
        self.step_open = False
        self.step_triggers = 0
        self.dac_codes: dict[str, np.ndarray] = {}

    def reply(self, msg: Msg) -> Any:
        handler: Callable[[Msg], Any] | None = getattr(self, f"_on_{msg.command}", None)
        return None if handler is None else handler(msg)

    # -- messages -------------------------------------------------------------------------------
    def _on_open_run(self, msg: Msg) -> None:
        self.axes = tuple(msg.kwargs["axes"])
        self.announced = int(msg.kwargs["n_steps"])
        if self.announced > MAX_STEPS:
            raise PlanRejected(
                f"the run would have {self.announced} steps, more than {MAX_STEPS}: split it"
            )

    def _on_open_step(self, msg: Msg) -> None:
        bad = {k: v for k, v in msg.kwargs["axes"].items() if math.isinf(float(v))}
        if bad:
            raise PlanRejected(f"step {len(self.steps)}: axis values {bad} are not finite")
        self.step_open, self.step_triggers = True, 0

    def _on_close_step(self, msg: Msg) -> None:
        self.steps.append(self.step_triggers)
        self.step_open = False
        if len(self.steps) > MAX_STEPS:
            raise PlanRejected(f"the run would have more than {MAX_STEPS} steps: split it")

    def _on_set(self, msg: Msg) -> None:
        self._instrument(msg.obj)
        attribute, value = msg.args
        if msg.obj == "laser":
            self._laser(attribute, value)

    def _on_call(self, msg: Msg) -> None:
        self._instrument(msg.obj)
        method, *arguments = msg.args
        if msg.obj == "dac" and method == "set_codes":
            self._dac_codes(*arguments)

    def _on_safe_state(self, msg: Msg) -> None:
        self._instrument(msg.obj)

    def _on_acquire(self, msg: Msg) -> np.ndarray | None:
        self._instrument(msg.obj)
        n = msg.kwargs["n_triggers"]
        limit = self.stand.max_triggers
        if not isinstance(n, int) or n < 1 or (limit is not None and n > limit):
            raise PlanRejected(
                f"an acquisition of {n!r} triggers is outside 1..{limit} "
                "(instruments.readout.options.max_triggers)"
            )
        if not self.step_open:
            raise PlanRejected("the plan acquires outside a step")
        self.step_triggers += n
        if not msg.kwargs.get("return_hits"):
            return None
        return self._noise_hits(n)

    # -- checks ---------------------------------------------------------------------------------
    def _instrument(self, name: str | None) -> None:
        if name not in self.stand.instruments:
            raise PlanRejected(
                f"the plan uses instrument {name!r}, which stand {self.stand.name!r} does not have"
            )

    def _laser(self, attribute: str, value: Any) -> None:
        s = self.stand
        limits: dict[str, tuple[float, float | None, str]] = {
            "intensity": (0.0, s.max_intensity_pct, "max_intensity_pct"),
            "repetition_rate_hz": (1.0, s.max_rate_hz, "max_rate_hz"),
            "fibre_channel": (0, s.fibre_outputs, "fibre_outputs"),
        }
        if attribute not in limits:
            return
        low, high, option = limits[attribute]
        number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
        if not number or not math.isfinite(float(value)):
            raise PlanRejected(f"laser {attribute} = {value!r} is not a finite number")
        if float(value) < low or (high is not None and float(value) > high):
            raise PlanRejected(
                f"laser {attribute} = {value!r} is outside {low:g}..{high:g} "
                f"(instruments.laser.options.{option})"
            )

    def _dac_codes(self, disc: Any, codes: Any) -> None:
        s = self.stand
        if disc not in ("t1", "t2", "e"):
            raise PlanRejected(f"dac discriminator {disc!r} is not t1, t2 or e")
        array = np.asarray(codes)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise PlanRejected(f"dac {disc} codes are not a 1-d array of integers")
        if array.size != s.n_dac:
            raise PlanRejected(
                f"dac {disc} codes have {array.size} values, the DAC has {s.n_dac} channels"
            )
        assert s.max_code is not None
        bad = np.flatnonzero((array < 0) | (array > s.max_code))
        if bad.size:
            raise PlanRejected(
                f"dac {disc} code {int(array[bad[0]])} (channel {int(bad[0])}) is outside the "
                f"DAC's 0..{s.max_code} (instruments.dac.options.max_code)"
            )
        self.dac_codes[disc] = array

    def _noise_hits(self, n: int) -> np.ndarray:
        """Hits of a noise acquisition at the current T1 codes, around the assumed baseline."""
        codes = self.dac_codes.get("t1")
        if codes is None or self.baseline is None:
            return np.zeros(0, dtype=HIT_DTYPE)
        fraction = ndtr((self.baseline - codes.astype(float)) / _DRY_RUN_NOISE_CODES)
        fires = np.rint(n * fraction).astype(np.int64)
        mapped = self.stand.channels["channel"].astype(np.int64)
        per_channel = fires[mapped]
        hits = np.zeros(int(per_channel.sum()), dtype=HIT_DTYPE)
        hits["channel"] = np.repeat(mapped, per_channel)
        starts = np.cumsum(per_channel) - per_channel
        hits["event"] = np.arange(hits.size) - np.repeat(starts, per_channel)
        return hits


def check_plan(plan: Plan, stand: StandInfo, *, baseline_code: float | None = None) -> PlanSummary:
    """List ``plan`` without hardware, checking every message against ``stand``'s limits.

    Args:
        plan: the plan generator (it is consumed).
        stand: the stand's declared limits.
        baseline_code: the channel baseline (DAC code) a baseline noise scan is answered with.

    Raises:
        PlanRejected: the plan would break a limit, or raised itself (its message is kept).
    """
    dry = _DryRun(stand, baseline_code)
    value: Any = None
    count = 0
    try:
        while True:
            try:
                msg = plan.send(value)
            except StopIteration:
                break
            count += 1
            if count > MAX_MESSAGES:
                raise PlanRejected(f"the plan sends more than {MAX_MESSAGES} messages")
            value = dry.reply(msg)
    except PlanRejected:
        plan.close()
        raise
    except (ValueError, RuntimeError, ArithmeticError) as exc:
        raise PlanRejected(" ".join(str(exc).split())) from None
    return PlanSummary(dry.axes, tuple(dry.steps), dry.announced)


def feasible_baselines(
    offsets_uA: Sequence[float],
    stand: StandInfo,
    *,
    key: str,
) -> tuple[float, float]:
    """The baselines (DAC codes) for which every threshold in ``offsets_uA`` can be set.

    A threshold ``x`` uA above a channel's baseline ``b`` is the code ``rint(b + x / lsb)``;
    the DAC holds ``0..max_code``. Returns the interval of ``b`` that keeps every offset inside.

    Raises:
        PlanRejected: no baseline would do (the thresholds span more than the DAC); ``key``
            names the recipe parameter in the message.
    """
    assert stand.lsb_uA is not None and stand.max_code is not None
    steps = np.asarray(offsets_uA, dtype=float) / stand.lsb_uA
    low, high = float(steps.min()), float(steps.max())
    if high - low > stand.max_code:
        raise PlanRejected(
            f"{key}: the thresholds span {(high - low) * stand.lsb_uA:g} uA ="
            f"{high - low:.0f} DAC codes ({stand.lsb_uA:g} uA a code), more than the DAC's "
            f"0..{stand.max_code} (instruments.dac.options)"
        )
    return -low - 0.5, stand.max_code - high + 0.5
