"""The AWC reduction from hits to constants: its rate against one plain read of the same columns,
and its cost per hit at 32 and at 100,000 channels.

    .venv/bin/python bench/bench_awc_reduction.py [--seed 1] [--repeat 5] [--channels 100000]

(a) A full-size simulated awc-calibration run (the shipped recipe: 16 bars x 6 intensities x 23
thr2 steps x 500 pulses, plus the baseline noise scan; 2.4 M hits) is recorded once. Then, in
the same process and alternately, best of ``--repeat``:

* the plain pass: h5py reads ``/hits`` in blocks of 1 M rows (whole rows, the fastest way to
  read a compound) and sums the columns ``t1``, ``t2``, ``q`` and ``channel``;
* the reduction as ``teststand analyze`` runs it: ``RunFile.iter_steps``, every step fed to
  ``AwcAccumulator`` (``add_hits``, ``end_step``), then ``fit()``.

The figure is the reduction's rate over the plain pass's rate (the issue asks for >= 0.25).

(b) Synthetic steps with the same number of hits per (channel, step) - 100 - at 32 channels and
at ``--channels``: every channel gets 3 intensities x 4 thr2 steps, 32 channels lit per step (one
ASIC; the stand lights one bar at a time), fed to ``AwcSums`` (the accumulator's core: a run
file's channel numbers stop at 65535) and fitted. Printed: ns per hit of the step reduction and
of the fit (and the fit per channel), and the ratios between the two channel counts (about 1 or
below: the cost grows linearly with hits and channels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from teststand.analysis.walk import AwcAccumulator, AwcSums, is_charge_step
from teststand.app.runner import run_recipe
from teststand.storage import RunFile

READ_ROWS = 1 << 20


def plain_pass(path: Path) -> tuple[float, int]:
    """Read t1, t2, q and channel of every hit with h5py and sum them: (seconds, hits)."""
    t0 = time.perf_counter()
    total = 0.0
    with h5py.File(path, "r") as f:
        hits = f["hits"]
        n = int(hits.shape[0])
        for start in range(0, n, READ_ROWS):
            block = hits[start : start + READ_ROWS]
            total += float(block["t1"].sum()) + float(np.nansum(block["t2"]))
            total += float(block["q"].sum()) + float(block["channel"].sum())
    return time.perf_counter() - t0, n


def reduction(path: Path) -> tuple[float, np.ndarray]:
    """The awc method as the offline analysis runs it: (seconds, constants)."""
    t0 = time.perf_counter()
    with RunFile(path) as run:
        acc = AwcAccumulator(run.channels, run.axes)
        for i, (row, hits) in enumerate(run.iter_steps()):
            acc.add_hits(i, hits)
            acc.end_step(i, dict(zip(row.dtype.names, row.tolist(), strict=True)))
        constants = acc.fit()
    return time.perf_counter() - t0, constants


def rate_against_read(seed: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        outcome = run_recipe("awc-calibration", "sim", tmp, seed=seed)
        taken = time.perf_counter() - t0
        path = outcome.run_path
        plain_pass(path)  # warm the page cache for both
        plain, reduce = [], []
        constants = None
        for _ in range(repeat):
            seconds, n_hits = plain_pass(path)
            plain.append(seconds)
            seconds, constants = reduction(path)
            reduce.append(seconds)
        assert constants is not None
    t_plain, t_reduce = min(plain), min(reduce)
    ok = int(np.sum(constants["flag"] == ""))
    print(f"(a) shipped awc-calibration, simulated in {taken:.1f} s: {n_hits / 1e6:.2f} M hits")
    figures = (("plain read of t1, t2, q, channel", t_plain), ("AWC reduction", t_reduce))
    for label, seconds in figures:
        print(f"    {label:33s} {seconds * 1e3:6.1f} ms = {n_hits / seconds / 1e6:5.1f} M hits/s")
    print(f"    ({ok}/{constants.size} channels calibrated)")
    ratio = t_plain / t_reduce
    print(f"    ratio of rates, reduction / plain read = {ratio:.2f} (target >= 0.25)")


THR2_CODES = (0, 4, 8, 13)  # thr2 steps, DAC codes above thr1: covers thr1 .. the operating thr2
INTENSITY_PE = (90.0, 220.0, 550.0)
GROUP = 32  # channels lit together in a step: one ASIC (the stand lights one bar at a time)


class Synthetic:
    """Hits of a power-law edge, ``per_step`` per (channel, step), for groups of channels."""

    def __init__(self, n_channels: int, per_step: int, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.n_channels = n_channels
        self.local = np.tile(np.arange(GROUP), per_step)  # event-major, as a readout sends them
        self.z = rng.standard_normal((4, self.local.size))
        self.n_exp = rng.uniform(1.3, 2.0, n_channels)
        self.tau = rng.uniform(2.0, 4.0, n_channels)
        self.t0 = rng.uniform(5.0, 15.0, n_channels)
        self.gain = rng.uniform(0.22, 0.28, n_channels)

    def step(
        self, group: int, n_pe: float, thr2: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Rows, t1, t2 and q of one step lighting channel group ``group``."""
        r = group * GROUP + self.local
        z = self.z
        amp = n_pe * self.gain[r] * (1.0 + z[0] / np.sqrt(n_pe))
        inv_n = 1.0 / self.n_exp[r]
        t1 = self.t0[r] + self.tau[r] * (6.0 / amp) ** inv_n + 0.02 * z[1]
        t2 = self.t0[r] + self.tau[r] * (thr2 / amp) ** inv_n + 0.02 * z[2]
        q = (4.5 * amp * (1.0 + 0.03 * z[3])).astype(np.float32)
        return r, t1, t2, q


def cost_per_hit(n_channels: int, per_step: int, repeat: int) -> tuple[float, float, int, float]:
    """Best of ``repeat``: ns per hit of the step reduction and of the fit, hits, fit seconds."""
    data = Synthetic(n_channels, per_step)
    best_reduce = best_fit = np.inf
    n_hits = 0
    for _ in range(repeat):
        sums = AwcSums(n_channels)
        reduce_s = 0.0
        n_hits = 0
        for group in range(n_channels // GROUP):
            for n_pe in INTENSITY_PE:
                for code in THR2_CODES:
                    thr2 = 6.0 + code * 0.3125
                    rows, t1, t2, q = data.step(group, n_pe, thr2)  # not timed: the data
                    t0 = time.perf_counter()
                    charge = is_charge_step(6.0, thr2)
                    sums.add_step(n_pe, 6.0, thr2, rows, t1, t2, q, charge_sums=charge)
                    reduce_s += time.perf_counter() - t0
                    n_hits += rows.size
        t0 = time.perf_counter()
        fit = sums.fit()
        fit_s = time.perf_counter() - t0
        ok = np.isfinite(fit.constants["awc_uA"]).mean()
        assert ok > 0.99, f"only {ok:.1%} of the synthetic channels calibrated"
        best_reduce = min(best_reduce, reduce_s)
        best_fit = min(best_fit, fit_s)
    return best_reduce / n_hits * 1e9, best_fit / n_hits * 1e9, n_hits, best_fit


def scaling(n_large: int, repeat: int) -> None:
    per_step = 100
    n_large -= n_large % GROUP
    print(f"(b) {per_step} hits per (channel, step), {len(INTENSITY_PE)} intensities x "
          f"{len(THR2_CODES)} thr2 steps per channel, {GROUP} channels lit per step")  # fmt: skip
    small = cost_per_hit(GROUP, per_step, max(repeat, 5))
    large = cost_per_hit(n_large, per_step, 1)
    for n, (red, fit, hits, fit_s) in ((GROUP, small), (n_large, large)):
        print(f"    {n:>7d} channels, {hits / 1e6:7.2f} M hits: reduction {red:5.1f} ns/hit, "
              f"fit {fit:6.1f} ns/hit ({fit_s / n * 1e6:5.0f} us/channel), "
              f"together {red + fit:6.1f} ns/hit")  # fmt: skip
    print(f"    ratio {n_large} / {GROUP} channels: reduction {large[0] / small[0]:.2f} per hit, "
          f"fit {large[3] / n_large / (small[3] / GROUP):.2f} per channel, "
          f"together {(large[0] + large[1]) / (small[0] + small[1]):.2f} per hit")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--channels", type=int, default=100_000)
    args = parser.parse_args()
    rate_against_read(args.seed, args.repeat)
    scaling(args.channels, args.repeat)


if __name__ == "__main__":
    main()
