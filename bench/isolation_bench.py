"""What running a registration's ANTs part in a child process costs and buys (the dashboard's
background jobs, Import page and demo alignment do; the command line does not).

For one synthetic follow-up pair, registered with ``force=True`` in a worker thread, in-process and
then inside ``covidtrack.longitudinal.isolated_registration``: the wall time of the registration
and the longest stall of the main thread meanwhile (it sleeps 10 ms in a loop, as a page's thread
would wait for its turn). ANTsPy holds Python's interpreter lock, so in-process the main thread
stalls for about the whole SyN call.

Run: ``nice -n 5 python bench/isolation_bench.py [--shape 64 160 160]``; writes
``bench/results/isolation_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "isolation_bench.json"


def one_run(key: str, isolated: bool) -> dict[str, float]:
    from covidtrack import longitudinal as L
    from covidtrack.store import Store

    out: dict[str, float] = {}

    def job() -> None:
        t0 = time.perf_counter()
        with Store.open() as store:
            if isolated:
                with L.isolated_registration():
                    done = L.register_patient(store, key, force=True)
            else:
                done = L.register_patient(store, key, force=True)
        out["registration_wall_s"] = round(time.perf_counter() - t0, 2)
        out["pairs"] = len(done)

    worker = threading.Thread(target=job)
    worker.start()
    gap, last = 0.0, time.perf_counter()
    while worker.is_alive():
        time.sleep(0.01)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    worker.join()
    out["main_thread_longest_stall_s"] = round(gap, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 160, 160))
    args = ap.parse_args()
    os.environ["COVIDTRACK_HOME"] = tempfile.mkdtemp(prefix="covidtrack-isolation-")
    from covidtrack.report import synthetic
    from covidtrack.store import Store

    with Store.open() as store:
        key = synthetic.populate_store(store, n_patients=1, n_scans=2, shape=tuple(args.shape))[0]
    rows = {"in_process": one_run(key, False), "child_process": one_run(key, True),
            "in_process_again": one_run(key, False), "child_process_again": one_run(key, True)}
    result = {
        "what": "one follow-up registration (force) in a worker thread, in-process vs in a child process: its wall time and the "
                "main thread's longest stall meanwhile",
        "data": f"covidtrack.report.synthetic.populate_store: 1 patient, 2 scans of {list(args.shape)} voxels (synthetic masks)",
        "model": "none (registration only: covidtrack.register, ANTsPy affine + SyN)",
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "load_average_at_end": [round(x, 1) for x in os.getloadavg()]},
        "runs": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
