"""Benchmark: CT loading and phantom generation, time and peak memory.

Each case runs in its own subprocess so that peak resident memory (VmHWM) belongs to
that case alone; the subprocess also reports the tracemalloc peak (Python + numpy allocations)
of one run and its resident memory right after the imports, so the increase is visible.

Run from the repository root:  ``nice -n 5 python bench/io_bench.py``
Writes ``bench/results/io_bench.json``. Needs ../shared/data for the real 141-slice series.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import REPO_ROOT, SAMPLES  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
OUT = REPO / "bench" / "results" / "io_bench.json"
REPEATS = 3


def _rss_mb() -> float:
    """Peak resident memory of this process (MiB).

    VmHWM belongs to this process image only; ru_maxrss would also carry the parent's peak
    over fork/exec on Linux, so it is only the fallback.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _case_fn(case: str, arg: str):  # noqa: ANN202 - returns a zero-argument callable
    if case == "load_ct":
        from covidtrack.io import load_ct

        return lambda: load_ct(arg)
    if case == "list_series":
        from covidtrack.io import list_series

        return lambda: list_series(arg)
    if case == "phantom":
        from covidtrack.phantom import make_series

        shape_text, spacing_text = arg.split("@")
        shape = tuple(int(v) for v in shape_text.split("x"))
        spacing = tuple(float(v) for v in spacing_text.split("x"))
        return lambda: make_series(seed=0, n_timepoints=5, shape=shape, spacing=spacing)
    raise ValueError(case)


def child(case: str, arg: str) -> None:
    """Run one case REPEATS times and print a JSON line with timings and memory."""
    import numpy as np  # noqa: F401 - import cost outside the timed region

    t0 = time.perf_counter()
    fn = _case_fn(case, arg)
    import_s = time.perf_counter() - t0
    rss_after_import = _rss_mb()
    times = []
    result = None
    for _ in range(REPEATS):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
        del result
    peak_rss = _rss_mb()
    tracemalloc.start()
    result = fn()
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    info: dict[str, object] = {}
    if case == "load_ct":
        info = {"shape_zyx": list(result.shape), "spacing_zyx_mm": [round(s, 4) for s in result.spacing],
                "array_mb": round(result.array.nbytes / 2**20, 1), "notes": list(result.meta.notes)}
    elif case == "list_series":
        info = {"n_series": len(result), "n_files": sum(s.n_slices for s in result)}
    elif case == "phantom":
        info = {"n_timepoints": len(result), "shape_zyx": list(result[0][0].shape),
                "spacing_zyx_mm": [round(s, 3) for s in result[0][0].spacing]}
    print(json.dumps({
        "seconds_runs": [round(t, 3) for t in times],
        "seconds_median": round(statistics.median(times), 3),
        "import_seconds": round(import_s, 3),
        "rss_after_import_mb": round(rss_after_import, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "tracemalloc_peak_mb": round(traced_peak, 1),
        **info,
    }))


def run_case(case: str, arg: str) -> dict[str, object]:
    env = dict(os.environ, COVIDTRACK_THREADS=os.environ.get("COVIDTRACK_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", case, arg], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "ARG"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-phantom", action="store_true", help="only the loading cases")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import numpy
    import pydicom
    import SimpleITK

    series = SHARED / "ct" / "chest4dct_phase00" / "dicom"
    cases: list[tuple[str, str, str, str]] = [
        ("dicom_141_slices", "load_ct", str(series),
         "load_ct on the real 141-file DICOM series (512x512x141, 0.977x0.977x2.0 mm, uncompressed), "
         "../shared/data/ct/chest4dct_phase00/dicom"),
        ("dicom_141_slices_list_series", "list_series", str(series),
         "list_series (header scan only) on the same folder"),
        ("nifti_4mm", "load_ct", str(SHARED / "ct" / "chest4dct_phase00" / "ct_4mm.nii.gz"),
         "load_ct on the derived 128x128x70 NIfTI (.nii.gz) of the same scan"),
        ("dicom_cip_sample", "load_ct", str(SAMPLES / "cip_copdgene_ct64" / "dicom"),
         "load_ct on the 79-slice 64x64 CIP sample series in data/samples"),
    ]
    if not args.skip_phantom:
        for shape, spacing in (("160x256x256", "2.0x1.4x1.4"), ("72x128x128", "4.5x2.7x2.7")):
            cases.append((f"phantom_{shape}", "phantom", f"{shape}@{spacing}",
                          f"covidtrack.phantom.make_series(seed=0, n_timepoints=5, shape={shape}, spacing={spacing} "
                          "(z, y, x) mm): 5 volumes with truth (lungs, lobes, infection) and displacement fields"))
    results: dict[str, object] = {}
    for name, case, arg, what in cases:
        if case != "phantom" and not Path(arg).exists():
            results[name] = {"what": what, "skipped": f"{arg} not present"}
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = {"what": what, **run_case(case, arg)}
    for name, res in results.items():
        if name.startswith("phantom") and isinstance(res, dict) and "seconds_median" in res:
            res["seconds_per_volume"] = round(float(res["seconds_median"]) / max(1, int(res.get("n_timepoints", 5))), 3)
    report = {
        "benchmark": "io_bench",
        "measured": "wall time (median of 3 runs in one warm process, OS file cache warm) and peak memory "
                    "(VmHWM peak resident memory of a dedicated subprocess; tracemalloc peak of one extra run) for CT loading "
                    "and phantom generation",
        "model_version": "none (no model is involved in loading or phantom generation)",
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code_commit": _git_commit(),
        "hardware": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "note": "2 CPU cores shared with other jobs; timings are indicative",
            "platform": platform.platform(),
        },
        "software": {"python": platform.python_version(), "numpy": numpy.__version__,
                     "SimpleITK": SimpleITK.Version_VersionString(), "pydicom": pydicom.__version__},
        "threads": os.environ.get("COVIDTRACK_THREADS", "2"),
        "results": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
