"""The application layer: what the CLI and the GUI do, as functions a script can call.

``run_recipe`` validates, checks, connects, runs and records a recipe; ``run_method`` analyses a
run file; ``run_selftest`` checks a stand; constants files are written and read with
``export_constants`` and ``load_constants``.
"""

from .constants import Constants, export_constants, load_constants
from .methods import DEFAULT_METHOD, METHODS, MethodResult, OnlineAnalysis, run_method
from .runner import PreparedRun, RunOutcome, execute, prepare_run, run_recipe
from .selftest import Check, SelftestReport, run_selftest

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Check",
    "Constants",
    "MethodResult",
    "OnlineAnalysis",
    "PreparedRun",
    "RunOutcome",
    "SelftestReport",
    "execute",
    "export_constants",
    "load_constants",
    "prepare_run",
    "run_method",
    "run_recipe",
    "run_selftest",
]
