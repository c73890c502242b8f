"""Benchmark of ``covidtrack.segment.segment`` on the real chest CTs beside the repository.

Writes ``bench/results/segment_bench.json`` and overlays in ``bench/figures/``:

1. speed and memory on the 512x512x141 series (``chest4dct_phase00``): a fresh Python process
   loads the series, then calls ``segment()`` twice (cold: includes model loading; warm); wall
   time per stage from the progress events and the process's peak resident memory (ru_maxrss,
   the whole process: Python, torch, the CT and every intermediate);
2. for the three real CTs (none is a COVID-19 case): lung volumes and the infection volume in mL,
   which is false-positive volume here, plus axial and coronal overlays of lungs and infection.

Run: ``python bench/segment_bench.py`` (needs ../shared/data; about a minute on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import REPO_ROOT  # noqa: E402

CT_ROOT = REPO_ROOT.parent / "shared" / "data" / "ct"
CASES = ("chest4dct_phase00", "lung-pet-ct-dx_A0001", "cip_copdgene_ct64")
OUT_JSON = REPO / "bench" / "results" / "segment_bench.json"
FIG_DIR = REPO / "bench" / "figures"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from covidtrack.io import load_ct
from covidtrack.segment import segment
vol = load_ct(Path(sys.argv[1]))
t_load = time.perf_counter() - t0
runs = []
for _ in range(2):
    marks = []
    t = time.perf_counter()
    seg = segment(vol, progress=lambda e: marks.append((e.stage, time.perf_counter() - t)))
    wall = time.perf_counter() - t
    stages = {}
    for stage, at in marks:
        stages.setdefault(stage, [at, at])[1] = at
    runs.append({"wall_s": round(wall, 2), "stage_end_s": {k: round(v[1], 2) for k, v in stages.items()}})
print(json.dumps({"shape": list(vol.shape), "spacing_mm": list(vol.spacing), "load_s": round(t_load, 2),
                  "cold": runs[0], "warm": runs[1], "model_versions": seg.model_versions,
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def speed_and_memory() -> dict:
    folder = CT_ROOT / "chest4dct_phase00" / "dicom"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def overlay(name: str, volume, seg) -> list[str]:
    """Axial (3 levels) and coronal (2 levels) overlays: lungs red/cyan contours, infection filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu = volume.array
    zs = np.nonzero((seg.lungs > 0).any(axis=(1, 2)))[0]
    ys = np.nonzero((seg.lungs > 0).any(axis=(0, 2)))[0]
    aspect = volume.spacing[0] / volume.spacing[2]
    fig, axes = plt.subplots(1, 5, figsize=(25, 5.5))
    views = []
    for f in (0.25, 0.5, 0.75):
        k = int(zs.min() + f * (zs.max() - zs.min()))
        views.append(("axial", k, hu[k], seg.lungs[k], seg.infection[k], 1.0))
    for f in (0.4, 0.6):
        j = int(ys.min() + f * (ys.max() - ys.min()))
        views.append(("coronal", j, hu[::-1, j], seg.lungs[::-1, j], seg.infection[::-1, j], aspect))
    for ax, (kind, idx, img, lung, inf, asp) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=-1350, vmax=150, aspect=asp)
        ax.contour(lung == 1, levels=[0.5], colors="red", linewidths=0.8)
        ax.contour(lung == 2, levels=[0.5], colors="cyan", linewidths=0.8)
        rgba = np.zeros((*inf.shape, 4))
        rgba[inf == 1] = (1.0, 0.85, 0.0, 0.6)  # GGO yellow
        rgba[inf == 2] = (1.0, 0.2, 0.6, 0.7)  # consolidation magenta
        ax.imshow(rgba, aspect=asp, interpolation="nearest")
        ax.set_title(f"{kind} {'z' if kind == 'axial' else 'y'}={idx}")
        ax.axis("off")
    fig.suptitle(f"{name}: lungs (red = right, cyan = left), infection (yellow GGO, magenta consolidation); "
                 f"models {seg.model_versions}", fontsize=10)
    FIG_DIR.mkdir(parents=True, exist_ok=True)
    path = FIG_DIR / f"segment_{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return [str(path.relative_to(REPO))]


def real_cases() -> dict:
    from covidtrack.io import load_ct
    from covidtrack.segment import segment

    out = {}
    for name in CASES:
        vol = load_ct(CT_ROOT / name / "dicom")
        t = time.perf_counter()
        seg = segment(vol)
        wall = time.perf_counter() - t
        ml = vol.voxel_volume_ml
        out[name] = {
            "shape": list(vol.shape),
            "spacing_mm": [round(s, 3) for s in vol.spacing],
            "segment_wall_s": round(wall, 2),
            "right_lung_ml": round(float((seg.lungs == 1).sum() * ml), 1),
            "left_lung_ml": round(float((seg.lungs == 2).sum() * ml), 1),
            "infection_false_positive_ml": round(float((seg.infection > 0).sum() * ml), 2),
            "ggo_false_positive_ml": round(float((seg.infection == 1).sum() * ml), 2),
            "consolidation_false_positive_ml": round(float((seg.infection == 2).sum() * ml), 2),
            "infection_false_positive_pct_of_lung": round(100.0 * float((seg.infection > 0).sum()) / max(1, int((seg.lungs > 0).sum())), 3),
            "figures": overlay(name, vol, seg),
            "model_versions": seg.model_versions,
        }
        print(name, {k: v for k, v in out[name].items() if k != "figures"}, flush=True)
    return out


def main() -> None:
    if not CT_ROOT.is_dir():
        raise SystemExit(f"{CT_ROOT} missing: this benchmark needs the shared real CTs")
    speed = speed_and_memory()
    print("speed", speed, flush=True)
    result = {
        "what": "covidtrack.segment.segment() (lungs -> infection -> lobes) on real chest CTs; infection volume on these "
                "non-COVID scans is false-positive volume",
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores, shared with other jobs during the run (timings are upper bounds)",
                     "threads": int(os.environ.get("COVIDTRACK_THREADS", os.cpu_count() or 1))},
        "targets": {"wall_s": 20.0, "peak_memory_mb": 4096},
        "speed_512x512x141": {"data": "chest4dct_phase00/dicom (512x512x141, 0.98x0.98x2 mm)", **speed},
        "real_ct": real_cases(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
    OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT_JSON.relative_to(REPO)}")


if __name__ == "__main__":
    main()
