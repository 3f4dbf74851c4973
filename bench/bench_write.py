"""Throughput of RunWriter against raw h5py appending the same hits to the same layout.

    python bench/bench_write.py [--hits 4000000] [--step-hits 200000] [--dir /tmp] [--repeat 3]

The peer is the limit of the layout itself: one SWMR file, ``/hits`` with the same chunks,
appended with one ``resize`` + slice write per chunk and flushed as often as the writer flushes
(once per step). The writer gets the same hits as a document stream (``hits`` blocks of a given
size, a ``step`` document per step), so the ratio is the cost of the subscriber: buffering,
concatenation, the step table and its flushes. Each figure is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from teststand.core.hits import HIT_DTYPE
from teststand.storage import CHANNEL_DTYPE, HITS_CHUNK_ROWS, RunWriter


def make_hits(n: int, n_channels: int = 32) -> np.ndarray:
    rng = np.random.default_rng(7)
    hits = np.zeros(n, dtype=HIT_DTYPE)
    hits["event"] = np.arange(n) // n_channels
    hits["channel"] = np.arange(n) % n_channels
    hits["t1"] = rng.normal(20.0, 0.5, n)
    hits["t2"] = hits["t1"] + rng.normal(0.2, 0.02, n)
    hits["q"] = rng.normal(300.0, 40.0, n).astype(np.float32)
    hits["tot"] = np.nan
    return hits


def start_doc(run_id: str) -> dict[str, object]:
    return {
        "run_id": run_id,
        "recipe_name": "bench",
        "kind": "bench",
        "recipe_text": "",
        "stand_name": "bench",
        "stand_text": "",
        "simulated": True,
        "software_version": "bench",
        "started_utc": "",
        "settings_sha256": "",
        "axes": ["thr2"],
        "channels": np.zeros(32, dtype=CHANNEL_DTYPE),
        "instruments": {},
        "truth": None,
        "n_steps": None,
        "seed": None,
    }


def run_writer(path: Path, hits: np.ndarray, step_hits: int, block: int) -> float:
    t0 = time.perf_counter()
    writer = RunWriter(path)
    writer("start", start_doc(path.stem))
    for index, first in enumerate(range(0, hits.size, step_hits)):
        step = hits[first : first + step_hits]
        writer("step_start", {"index": index, "axes": {"thr2": float(index)}})
        for a in range(0, step.size, block):
            writer("hits", {"index": index, "hits": step[a : a + block]})
        writer(
            "step",
            {
                "index": index,
                "axes": {"thr2": float(index)},
                "n_hits": step.size,
                "n_triggers": step.size // 32,
                "t_start": 0.0,
                "t_stop": 0.0,
            },
        )
    writer("stop", {"status": "completed", "finished_utc": "", "reason": ""})
    return time.perf_counter() - t0


def run_raw(path: Path, hits: np.ndarray, step_hits: int) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset(
            "hits", shape=(0,), maxshape=(None,), chunks=(HITS_CHUNK_ROWS,), dtype=HIT_DTYPE
        )
        f.swmr_mode = True
        n = 0
        for first in range(0, hits.size, step_hits):
            step = hits[first : first + step_hits]
            for a in range(0, step.size, HITS_CHUNK_ROWS):
                part = step[a : a + HITS_CHUNK_ROWS]
                ds.resize((n + part.size,))
                ds[n : n + part.size] = part
                n += part.size
            f.flush()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=4_000_000)
    parser.add_argument("--step-hits", type=int, default=200_000)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    hits = make_hits(args.hits)
    mb = hits.nbytes / 1e6
    blocks = (100_000, 20_000, 1_000)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        # Interleaved repetitions, best of each: the page cache and other load affect all alike.
        for i in range(args.repeat):
            runs = {"raw": lambda p: run_raw(p, hits, args.step_hits)}
            for block in blocks:
                runs[f"writer{block}"] = lambda p, b=block: run_writer(p, hits, args.step_hits, b)
            for label, func in runs.items():
                path = folder / f"{label}-{i}.h5"
                elapsed = func(path)
                path.unlink()
                best[label] = min(best.get(label, float("inf")), elapsed)
        print(
            f"{args.hits} hits ({mb:.0f} MB), steps of {args.step_hits} hits, files in {folder}, "
            f"best of {args.repeat}"
        )
    raw = best["raw"]
    print(
        f"raw h5py append (chunk slices)   {args.hits / raw / 1e6:7.2f} Mhits/s "
        f"{mb / raw:7.0f} MB/s   ratio 1.00"
    )
    for block in blocks:
        t = best[f"writer{block}"]
        print(
            f"RunWriter, hits blocks of {block:>7} {args.hits / t / 1e6:7.2f} Mhits/s "
            f"{mb / t:7.0f} MB/s   ratio {raw / t:.2f}"
        )


if __name__ == "__main__":
    main()
