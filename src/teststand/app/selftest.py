"""Functional self-test of a stand (design section 7).

Every instrument answers its identity (a model its driver speaks to, with the hardware facts the
stand file declares) and runs the self-checks its driver declares, in the stand's safe-state
order: the laser's interlock and a set-and-read-back, the DAC's code read-back, and the readout's
two acquisitions with a known response: nothing may fire with every instrument in its safe state
(the safe state is confirmed by measurement, not only by read-back), and every mapped channel
must fire when it should. The stand ends in its safe state, confirmed on every instrument.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..drivers import CheckContext
from ..errors import TeststandError
from ..station import StandFile, connect

log = logging.getLogger(__name__)


@dataclass
class Check:
    """One self-test check."""

    instrument: str
    name: str
    passed: bool
    detail: str


@dataclass
class SelftestReport:
    """All checks of one self-test."""

    stand: str
    simulated: bool
    checks: list[Check] = field(default_factory=list)
    #: instruments whose safe state could not be confirmed at the end (``{name: what}``)
    not_safe: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)


def run_selftest(
    stand: StandFile,
    *,
    seed: int | None = None,
    n_triggers: int = 200,
    should_stop: Callable[[], str] | None = None,
) -> SelftestReport:
    """Connect ``stand``, run every driver's checks and leave the stand safe (confirmed).

    ``should_stop()`` (asked before every check) returns why to stop early (a signal), or "".
    """
    report = SelftestReport(stand.config.name, stand.simulated)
    try:
        station = connect(stand, seed=seed)
    except TeststandError as exc:
        report.checks.append(Check("stand", "connect", False, str(exc)))
        return report
    report.simulated = station.simulated
    ctx = CheckContext(station.instruments, station.info.channels, n_triggers)
    with station:
        try:
            for name in station.safe_order:
                driver = station.instruments[name]
                ident = driver.identify()
                report.checks.append(Check(name, "identify", True, ident.idn))
                for check in stand.config.spec(name).checks:
                    if should_stop is not None and should_stop():
                        report.checks.append(Check(name, check.name, False, should_stop()))
                        continue
                    try:
                        detail = check.run(driver, ctx)
                        report.checks.append(Check(name, check.name, True, detail))
                    except Exception as exc:  # noqa: BLE001 - a failed check is a result
                        text = " ".join(str(exc).split())
                        report.checks.append(Check(name, check.name, False, text))
        except TeststandError as exc:
            report.checks.append(Check("stand", "identify", False, str(exc)))
        finally:
            station.safe_state()
            report.not_safe = station.unsafe()
            for name in station.safe_order:
                bad = report.not_safe.get(name, "")
                report.checks.append(Check(name, "safe state", not bad, bad or "confirmed"))
    return report
