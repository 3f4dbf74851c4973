"""Synthetic runs for the storage tests: document streams whose every value is known."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from teststand.core.hits import HIT_DTYPE
from teststand.storage import CHANNEL_DTYPE

AXES = ["intensity", "thr2"]
TRUTH_DTYPE = np.dtype([("channel", "<u2"), ("awc", "<f8"), ("t0", "<f8"), ("model", "<U16")])


def channels(n: int = 4) -> np.ndarray:
    table = np.zeros(n, dtype=CHANNEL_DTYPE)
    table["channel"] = np.arange(n)
    table["plane"] = np.arange(n) % 2
    table["bar"] = np.arange(n) // 2
    table["board"] = np.arange(n) // 4 - 1
    table["delay_ns"] = 0.25 * np.arange(n)
    return table


def truth(n: int = 4) -> np.ndarray:
    table = np.zeros(n, dtype=TRUTH_DTYPE)
    table["channel"] = np.arange(n)
    table["awc"] = np.linspace(10.0, 13.0, n)
    table["t0"] = np.linspace(0.1, 0.9, n)
    table["model"] = ["power-law", "power-law", "µ-edge", ""][:n] + [""] * max(0, n - 4)
    return table


def start_doc(
    run_id: str = "r0001",
    *,
    axes: list[str] | None = None,
    n_channels: int = 4,
    with_truth: bool = True,
    seed: int | None = 1234,
    n_steps: int = 3,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "recipe_name": "awc-test",
        "kind": "awc_calibration",
        "recipe_text": 'name = "awc-test"\nkind = "awc_calibration"\n# µA\n',
        "stand_name": "bench-sim",
        "stand_text": '[stand]\nname = "bench-sim"\n',
        "simulated": True,
        "software_version": "0.1.0",
        "started_utc": "2026-01-02T03:04:05+00:00",
        "settings_sha256": "ab" * 32,
        "axes": list(AXES if axes is None else axes),
        "channels": channels(n_channels),
        "instruments": {
            "laser": {
                "idn": "SIM,LASER,123,1.0",
                "serial": "123",
                "firmware": "1.0",
                "resource": "ASRL1::INSTR",
                "settings": {
                    "intensity": 42.5,
                    "output_enabled": False,
                    "trigger_source": "internal",
                    "repetition_rate_hz": 1000,
                },
            },
            "dac": {
                "idn": "SIM,DAC,7,2.1",
                "serial": "7",
                "firmware": "2.1",
                "resource": "TCPIP::dac",
                "settings": {"t1_codes": [10, 11, 12, 13], "lsb_uA": 0.3125},
            },
        },
        "truth": truth(n_channels) if with_truth else None,
        "truth_attrs": {"seed": 1234.0, "laser_time_jitter_ns": 0.012} if with_truth else None,
        "n_steps": n_steps,
        "seed": seed,
    }


def make_hits(n: int, *, first_event: int, n_channels: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hits = np.zeros(n, dtype=HIT_DTYPE)
    hits["event"] = first_event + np.arange(n) // n_channels
    hits["channel"] = np.arange(n) % n_channels
    hits["t1"] = rng.normal(20.0, 0.5, n)
    hits["t2"] = hits["t1"] + rng.normal(0.2, 0.02, n)
    hits["q"] = rng.normal(300, 30, n).astype("f4")
    hits["tot"] = np.nan
    return hits


def step_docs(
    index: int,
    n_hits: int,
    *,
    block: int = 1000,
    axes: list[str] | None = None,
    event_base: int = 0,
    seed: int | None = None,
) -> tuple[list[tuple[str, dict[str, Any]]], np.ndarray]:
    """Documents of one complete step and the hits they carry."""
    axes = AXES if axes is None else axes
    values = {a: float(index + 1) * (k + 1) for k, a in enumerate(axes)}
    hits = make_hits(n_hits, first_event=event_base, seed=index if seed is None else seed)
    docs: list[tuple[str, dict[str, Any]]] = [("step_start", {"index": index, "axes": values})]
    for a in range(0, n_hits, block):
        docs.append(("hits", {"index": index, "hits": hits[a : a + block]}))
    docs.append(
        (
            "step",
            {
                "index": index,
                "axes": values,
                "n_hits": n_hits,
                "n_triggers": 100 * (index + 1),
                "t_start": 1000.0 + index,
                "t_stop": 1000.5 + index,
            },
        )
    )
    return docs, hits


def run_docs(
    hits_per_step: list[int], *, block: int = 1000, status: str = "completed", **start: Any
) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "start", start_doc(**start)
    base = 0
    for index, n in enumerate(hits_per_step):
        docs, _ = step_docs(index, n, block=block, event_base=base)
        base += n
        yield from docs
    yield "stop", {"status": status, "finished_utc": "2026-01-02T04:00:00+00:00", "reason": "done"}


def expected_hits(hits_per_step: list[int]) -> list[np.ndarray]:
    out, base = [], 0
    for index, n in enumerate(hits_per_step):
        out.append(step_docs(index, n, event_base=base)[1])
        base += n
    return out


def assert_same(actual: np.ndarray, desired: np.ndarray) -> None:
    """Structured arrays equal field by field, NaN equal to NaN, dtypes identical."""
    assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
    assert actual.shape == desired.shape
    for name in desired.dtype.names or ():
        np.testing.assert_array_equal(actual[name], desired[name], err_msg=name)
