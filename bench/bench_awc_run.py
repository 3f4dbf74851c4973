"""The full awc-calibration recipe on the simulated stand, timed end to end.

16 bars x 6 intensities x 23 thr2 steps x 500 pulses (plus the baseline noise scan), every hit
recorded to HDF5: the figure the foundation issue asks for, printed as a ratio against the
one-minute limit, with the share of time spent in the engine, the simulator and the writer.

    .venv/bin/python bench/bench_awc_run.py [--seed N]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time

from teststand.app.runner import run_recipe
from teststand.storage import RunFile

LIMIT_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--profile", action="store_true", help="print the 15 most expensive functions"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        profiler = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        outcome = run_recipe("awc-calibration", "sim", tmp, seed=args.seed)
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - t0
        with RunFile(outcome.run_path) as run:
            n_steps, n_hits = run.steps.size, run.n_hits
        size_mb = outcome.run_path.stat().st_size / 1e6
    print(
        f"awc-calibration (simulated): {outcome.result.status}, {n_steps} steps, "
        f"{n_hits} hits, {size_mb:.0f} MB"
    )
    ratio = elapsed / LIMIT_S
    print(f"  wall time {elapsed:.1f} s = {ratio:.2f} x the {LIMIT_S:.0f} s limit")
    print(
        f"  {1e3 * elapsed / n_steps:.2f} ms per step, "
        f"{1e9 * elapsed / max(n_hits, 1):.0f} ns per hit"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(15)


if __name__ == "__main__":
    main()
