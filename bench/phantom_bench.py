"""Phantom generation: time, peak memory and truth quality, written to bench/results/phantom_bench.json.

Measures, on this machine (2 CPU cores shared with other jobs, so the load average is recorded):

- ``make_series`` at the default grid (5 scans of 160 x 256 x 256 at 2.0 x 1.4 x 1.4 mm):
  wall and CPU seconds per volume (the patient's anatomy is rendered once per series);
- ``make_phantom`` for a single scan at the default grid;
- the demo grid (72 x 128 x 128 at 4.5 x 2.7 x 2.7 mm) and a full ``write_demo_cohort``;
- truth quality: Dice of the follow-up lungs pulled back with the true displacement against
  the baseline lungs, and how far the true displacement moves tissue (mm).

    nice -n 5 python bench/phantom_bench.py            # measurements -> JSON
    nice -n 5 python bench/phantom_bench.py --figure   # views -> bench/figures/phantom_views.png
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.phantom import DEMO_SHAPE, DEMO_SPACING, make_phantom, make_series, warp_to_baseline, write_demo_cohort  # noqa: E402
from covidtrack.phantom.series import DEFAULT_SHAPE, DEFAULT_SPACING  # noqa: E402

OUT = REPO / "bench" / "results" / "phantom_bench.json"
FIGURE = REPO / "bench" / "figures" / "phantom_views.png"


def _timed(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _arm_summary(truth_csv: Path) -> dict:
    """Per arm: how much of each patient's peak infection is left at the last scan (truth)."""
    import csv

    by_patient: dict[str, list[dict[str, str]]] = {}
    with truth_csv.open() as fh:
        for row in csv.DictReader(fh):
            by_patient.setdefault(row["patient"], []).append(row)
    out: dict = {}
    for rows in by_patient.values():
        ml = [float(r["infection_ml"]) for r in rows]
        arm = out.setdefault(rows[0]["arm"], {"patients": 0, "last_over_peak": [], "peak_ml": [], "last_day": []})
        arm["patients"] += 1
        arm["last_over_peak"].append(round(ml[-1] / max(max(ml), 1e-9), 2))
        arm["peak_ml"].append(round(max(ml), 0))
        arm["last_day"].append(float(rows[-1]["day"]))
    for arm in out.values():
        arm["mean_last_over_peak"] = round(float(np.mean(arm["last_over_peak"])), 3)
    return out


def disease_distribution(n_seeds: int = 12) -> dict:
    """Where the infection sits at each patient's peak (demo grid): lobes and distance to pleura."""
    from scipy import ndimage as ndi

    lower_inf, lower_lung, sub_inf, sub_lung, cons_share = [], [], [], [], []
    for seed in range(100, 100 + n_seeds):
        _, t = make_phantom(seed, DEMO_SHAPE, DEMO_SPACING, severity=0.6)
        inf = t.infection > 0
        lung = t.lungs > 0
        lower = (t.lobes == 3) | (t.lobes == 5)
        depth = ndi.distance_transform_edt(lung, sampling=DEMO_SPACING)
        sub = lung & (depth <= 15.0)
        lower_inf.append(float((inf & lower).sum() / max(inf.sum(), 1)))
        lower_lung.append(float(lower.sum() / lung.sum()))
        sub_inf.append(float((inf & sub).sum() / max(inf.sum(), 1)))
        sub_lung.append(float(sub.sum() / lung.sum()))
        cons_share.append(float((t.infection == 2).sum() / max(inf.sum(), 1)))
    return {
        "seeds": [100, 100 + n_seeds - 1],
        "severity": 0.6,
        "day": "each patient's peak",
        "lower_lobes_share_of_infection": round(float(np.mean(lower_inf)), 3),
        "lower_lobes_share_of_lung": round(float(np.mean(lower_lung)), 3),
        "within_15mm_of_pleura_share_of_infection": round(float(np.mean(sub_inf)), 3),
        "within_15mm_of_pleura_share_of_lung": round(float(np.mean(sub_lung)), 3),
        "consolidation_share_of_infection": round(float(np.mean(cons_share)), 3),
    }


def _shape_stats(mask: np.ndarray, spacing: tuple[float, float, float]) -> dict:
    """Volume (mL), bounding-box extents (mm) and the axial area profile from base to apex."""
    zz, yy, xx = np.nonzero(mask)
    ext = [float((c.max() - c.min() + 1) * s) for c, s in zip((zz, yy, xx), spacing)]
    area = mask.sum(axis=(1, 2)).astype(float)[zz.min() : zz.max() + 1]
    pos = np.linspace(0, len(area) - 1, 10)
    profile = np.interp(pos, np.arange(len(area)), area) / area.max()
    vol = float(mask.sum()) * float(np.prod(spacing)) / 1000.0
    return {
        "volume_ml": round(vol, 0),
        "height_mm": round(ext[0], 0),
        "depth_mm": round(ext[1], 0),
        "width_mm": round(ext[2], 0),
        "fill_ratio": round(vol * 1000.0 / float(np.prod(ext)), 3),
        "area_profile_base_to_apex": [round(float(v), 2) for v in profile],
    }


def shape_reference() -> dict:
    """Phantom lungs vs real lung masks in ../shared/data/masks (skipped when absent).

    The real masks are only a shape reference; the phantom never reads them. Real masks are
    brought to (z up, y, x) by their header direction; extents are per axis, both lungs together.
    """
    import SimpleITK as sitk

    from covidtrack.config import REPO_ROOT

    shared = REPO_ROOT.parent / "shared" / "data" / "masks"
    out: dict = {"phantom": [], "dirlab_copd_inspiration": [], "lidc_pleural_boundary": []}
    for seed in range(5):
        _, truth = make_phantom(seed, DEFAULT_SHAPE, DEFAULT_SPACING, healthy=True)
        out["phantom"].append(_shape_stats(truth.lungs > 0, DEFAULT_SPACING))
    if not shared.is_dir():
        out["note"] = "../shared/data/masks not present: real references skipped"
        return out
    files = {
        "dirlab_copd_inspiration": sorted((shared / "dirlab_copd_lung_masks").glob("case_*_insp_mask.nii.gz")),
        "lidc_pleural_boundary": sorted((shared / "lidc_lung_fissure_masks").glob("Patient*/pleuralBoundary.nii.gz")),
    }
    for key, paths in files.items():
        for path in paths:
            img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")  # canonical: x->L, y->P, z->S
            arr = sitk.GetArrayFromImage(img) > 0
            out[key].append(_shape_stats(arr, tuple(img.GetSpacing()[::-1])) | {"file": path.parent.name + "/" + path.name})
    summary = {}
    for key in ("phantom", "dirlab_copd_inspiration", "lidc_pleural_boundary"):
        rows = out[key]
        if rows:
            summary[key] = {
                m: round(float(np.mean([r[m] for r in rows])), 3)
                for m in ("volume_ml", "height_mm", "depth_mm", "width_mm", "fill_ratio")
            } | {"area_profile_base_to_apex": [round(float(v), 2) for v in np.mean([r["area_profile_base_to_apex"] for r in rows], axis=0)]}
    out["mean"] = summary
    return out


def main() -> None:
    load_before = os.getloadavg()
    results: dict = {
        "what": "synthetic chest CT phantom generation (covidtrack.phantom): speed, memory, truth quality",
        "data": "procedural phantoms only (no real data); seeds listed per measurement",
        "model_version": None,
        "hardware": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "note": "2 CPU cores, shared with other jobs; see load_average",
            "python": platform.python_version(),
        },
        "threads": os.environ.get("COVIDTRACK_THREADS", str(os.cpu_count())),
        "load_average_1_5_15_before": [round(v, 2) for v in load_before],
    }
    # warm-up: imports (torch, SimpleITK) are not part of generation time
    make_phantom(99, DEMO_SHAPE, DEMO_SPACING)

    series_runs = []
    for seed in (0, 1):
        series, wall, cpu = _timed(make_series, seed, 5, DEFAULT_SHAPE, DEFAULT_SPACING)
        base = series[0][1]
        dice, moved, dice_before = [], [], []
        for _, truth in series[1:]:
            warped = warp_to_baseline(truth.lungs, truth.displacement, truth.spacing, order=0)
            dice.append(min(_dice(warped == s, base.lungs == s) for s in (1, 2)))
            dice_before.append(min(_dice(truth.lungs == s, base.lungs == s) for s in (1, 2)))
            mag = np.linalg.norm(truth.displacement[base.lungs > 0], axis=-1)
            moved.append([round(float(np.mean(mag)), 2), round(float(np.max(mag)), 2)])
        series_runs.append(
            {
                "seed": seed,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "wall_s_per_volume": round(wall / 5, 2),
                "cpu_s_per_volume": round(cpu / 5, 2),
                "days": [t.day for _, t in series],
                "infection_ml": [round(t.infection_ml(), 1) for _, t in series],
                "lung_ml": [round(t.lung_ml(), 1) for _, t in series],
                "lung_dice_after_true_warp_min_side": [round(d, 4) for d in dice],
                "lung_dice_without_warp_min_side": [round(d, 4) for d in dice_before],
                "lung_displacement_mm_mean_max": moved,
            }
        )
        del series
    results["make_series_default_grid"] = {
        "shape": list(DEFAULT_SHAPE),
        "spacing_mm": list(DEFAULT_SPACING),
        "n_timepoints": 5,
        "runs": series_runs,
    }
    single = []
    for seed in (2, 3):
        _, wall, cpu = _timed(make_phantom, seed, DEFAULT_SHAPE, DEFAULT_SPACING)
        single.append({"seed": seed, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)})
    results["make_phantom_default_grid"] = {"shape": list(DEFAULT_SHAPE), "spacing_mm": list(DEFAULT_SPACING), "runs": single}

    demo_series, wall, cpu = _timed(make_series, 4, 5, DEMO_SHAPE, DEMO_SPACING)
    results["make_series_demo_grid"] = {
        "shape": list(DEMO_SHAPE),
        "spacing_mm": list(DEMO_SPACING),
        "seed": 4,
        "wall_s_per_volume": round(wall / 5, 3),
        "cpu_s_per_volume": round(cpu / 5, 3),
    }
    with tempfile.TemporaryDirectory() as tmp:
        manifest, wall, cpu = _timed(write_demo_cohort, Path(tmp) / "demo", 8, 0)
        n_scans = sum(1 for _ in manifest.open()) - 1
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
        arms = _arm_summary(manifest.parent / "truth.csv")
    results["write_demo_cohort"] = {
        "n_patients": 8,
        "seed": 0,
        "n_scans": n_scans,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "disk_mb_with_truth": round(size_mb, 1),
        "per_arm_true_course": arms,
    }
    results["lung_shape_vs_real_masks"] = shape_reference()
    results["disease_distribution_at_peak"] = disease_distribution()
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["load_average_1_5_15_after"] = [round(v, 2) for v in os.getloadavg()]
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def figure(seed: int = 0) -> Path:
    """Axial, coronal and sagittal views of a baseline and a later scan, with truth outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = make_series(seed, 5, DEFAULT_SHAPE, DEFAULT_SPACING)
    peak = max(range(len(series)), key=lambda i: series[i][1].infection_ml())
    sz, sy, sx = DEFAULT_SPACING
    fig, axes = plt.subplots(2, 3, figsize=(15, 10.5), facecolor="black")
    for row, i in enumerate((0, peak)):
        vol, truth = series[i]
        a = vol.array
        inf = truth.infection
        z = int(np.argmax((inf > 0).sum(axis=(1, 2)))) if inf.any() else int(np.mean(np.nonzero(truth.lungs)[0]))
        y = int(np.mean(np.nonzero(truth.lungs)[1])) + 10
        x = int(np.mean(np.nonzero(truth.lungs == 1)[2]))
        views = [
            (a[z], truth.lobes[z], inf[z], 1.0, f"axial z={z}"),
            (a[:, y][::-1], truth.lobes[:, y][::-1], inf[:, y][::-1], sz / sx, f"coronal y={y}"),
            (a[:, :, x][::-1], truth.lobes[:, :, x][::-1], inf[:, :, x][::-1], sz / sy, f"sagittal x={x} (right lung)"),
        ]
        for col, (img, lob, infs, aspect, title) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=-1150, vmax=250, aspect=aspect, interpolation="bilinear")
            for lab in range(1, 6):  # lobe borders (thin), infection outline (red)
                ax.contour(lob == lab, [0.5], colors=["#4fc3f7"], linewidths=0.4)
            ax.contour(infs > 0, [0.5], colors=["#ff5252"], linewidths=0.7)
            ax.contour(infs == 2, [0.5], colors=["#ffd740"], linewidths=0.7)
            ax.set_title(f"day {truth.day:g}: {title}", color="white", fontsize=10)
            ax.axis("off")
    fig.suptitle(
        f"covidtrack phantom seed {seed}, 160x256x256 at 2.0x1.4x1.4 mm (W1400/L-450); "
        "blue: lobe borders, red: infection, yellow: consolidation; right lung on the viewer's left",
        color="white",
        fontsize=10,
    )
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=80, facecolor="black")
    return FIGURE


if __name__ == "__main__":
    if "--figure" in sys.argv[1:]:
        print(figure())
    elif "--disease" in sys.argv[1:]:
        print(json.dumps(disease_distribution(), indent=1))
    elif "--shape" in sys.argv[1:]:
        print(json.dumps(shape_reference()["mean"], indent=1))
    else:
        main()
