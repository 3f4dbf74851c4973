"""Run a synthetic run through RunWriter in its own process (for the SWMR and crash tests).

usage: python writer_process.py PATH N_STEPS HITS_PER_STEP DELAY_S [crash]

With ``crash`` the process writes N_STEPS complete steps, then half of one more step, and dies
with ``os._exit`` (no cleanup, no stop document) as on a power cut of the process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.storage._runs import start_doc, step_docs  # noqa: E402
from teststand.storage import RunWriter  # noqa: E402


def main() -> None:
    path, n_steps, n_hits, delay = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    crash = len(sys.argv) > 5 and sys.argv[5] == "crash"
    writer = RunWriter(path, flush_interval_s=0.0 if crash else 1.0)
    writer("start", start_doc(n_steps=n_steps + crash))
    for index in range(n_steps):
        docs, _ = step_docs(index, n_hits, event_base=index * n_hits)
        for name, doc in docs:
            writer(name, doc)
        print(f"step {index}", flush=True)
        time.sleep(delay)
    if crash:
        docs, _ = step_docs(n_steps, n_hits, event_base=n_steps * n_hits)
        for name, doc in docs[: len(docs) // 2]:
            writer(name, doc)
        print("crash", flush=True)
        os._exit(0)
    writer(
        "stop", {"status": "completed", "finished_utc": "2026-01-02T04:00:00+00:00", "reason": ""}
    )
    print("done", flush=True)


if __name__ == "__main__":
    main()
