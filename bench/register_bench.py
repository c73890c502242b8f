"""Registration benchmark: accuracy against known displacements, time and peak memory per pair.

Cases (each pair runs in a fresh child process so its peak RSS is its own):

- ``phantom``: covidtrack.phantom series (demo grid 72x128x128 at 4.5x2.7x2.7 mm) with true
  displacements; baseline -> each follow-up. Error over all baseline lung voxels and over
  voxels infected in the follow-up (the hard part: intensities change there).
- ``cip``: the real COPDGene pair ct-64 / ct-64-transformed (same voxels, header rotated ~20
  degrees about z). Lung labels from the CIP label maps (lm-64*.nrrd, regions 9-14).
- ``chest4dct``: the real 512x512x141 series with simulated follow-ups (a rotation of a few
  degrees, an 8 mm shift and smooth bumps of up to 6 mm, see bench/register_sim.py). Lung masks:
  covidtrack.segment.lung_targets.extract_lungs (classical, threshold based).

Error = |T_hat(p) - T(p)| in mm at baseline lung voxels (up to 20,000 sampled). Time is wall
and CPU time of ``covidtrack.register.register`` alone (loading and lung masks excluded); the
machine is shared, so the 1-minute load average is recorded beside each timing.

Run: ``python bench/register_bench.py`` (about 10 min on 2 cores) -> bench/results/register.json.
Needs ../shared/data beside the repository for the real cases (skipped otherwise).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from covidtrack.config import REPO_ROOT  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "data"
OUT = HERE / "results" / "register.json"


def _stats(err: np.ndarray, voxel_mm: float | None = None) -> dict[str, float]:
    out = {
        "n_points": int(err.size),
        "mean_mm": round(float(err.mean()), 3),
        "median_mm": round(float(np.median(err)), 3),
        "p95_mm": round(float(np.percentile(err, 95)), 3),
        "max_mm": round(float(err.max()), 3),
    }
    if voxel_mm is not None:
        out["fraction_within_one_voxel"] = round(float((err <= voxel_mm).mean()), 4)
    return out


def _timed_register(fixed, fixed_seg, moving, moving_seg, work: Path):  # noqa: ANN001, ANN202
    from covidtrack.register import register

    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    reg = register(fixed, fixed_seg, moving, moving_seg, work)
    timing = {
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(time.process_time() - c0, 2),
        "load_avg_1min_before": round(load0, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
    }
    return reg, timing


def _qa(reg) -> dict[str, Any]:  # noqa: ANN001
    from dataclasses import asdict

    return {**{k: round(float(v), 4) for k, v in asdict(reg.qa).items()}, "ok": bool(reg.ok)}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: kB


# --- cases (each runs in a child process) ---------------------------------------------------------
def case_phantom(seed: int, follow: int) -> dict[str, Any]:
    from covidtrack.phantom import DEMO_SHAPE, DEMO_SPACING, make_series, warp_to_baseline
    from covidtrack.register import Grid
    from covidtrack.segment.types import Segmentation

    series = make_series(seed, n_timepoints=3, shape=DEMO_SHAPE, spacing=DEMO_SPACING)
    (v0, t0), (v1, t1) = series[0], series[follow]
    seg = lambda t: Segmentation(lungs=t.lungs, infection=t.infection, lobes=t.lobes)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        reg, timing = _timed_register(v0, seg(t0), v1, seg(t1), Path(tmp) / "reg")
        grid = Grid.of(v0)

        def errors(mask: np.ndarray) -> np.ndarray:
            idx = np.argwhere(mask)
            if len(idx) > 20000:
                idx = idx[np.random.default_rng(0).choice(len(idx), 20000, replace=False)]
            p = grid.physical_points(idx)
            truth = p + t1.displacement[tuple(idx.T)].astype(np.float64)[:, ::-1] @ grid.matrix.T
            return np.linalg.norm(reg.map_points(p) - truth, axis=1), np.linalg.norm(p - truth, axis=1)

        lung_err, before = errors(t0.lungs > 0)
        inf_truth = warp_to_baseline(t1.infection, t1.displacement, v0.spacing, order=0)
        inf_mask = (inf_truth > 0) & (t0.lungs > 0)
        inf_err = errors(inf_mask)[0] if inf_mask.any() else np.array([np.nan])
        warped = reg.warp_labels(t1.infection) > 0
        inf_dice = 2 * float((warped & (inf_truth > 0)).sum()) / max(1, int(warped.sum() + (inf_truth > 0).sum()))
    return {
        "case": "phantom", "pair": f"seed {seed}: t0 -> t{follow}", "shape": list(v0.shape), "spacing_mm": list(v0.spacing),
        "error_lungs": _stats(lung_err, max(v0.spacing)), "error_before_mm": round(float(before.mean()), 3),
        "error_infected_voxels": _stats(inf_err), "infection_dice_vs_true_warp": round(inf_dice, 4),
        "qa": _qa(reg), **timing, "peak_rss_mb": _peak_rss_mb(),
    }


def _cip_volume(name: str, label_name: str):  # noqa: ANN202
    import SimpleITK as sitk

    from covidtrack.io import load_ct

    folder = SHARED / "ct" / "cip_copdgene_ct64"
    vol = load_ct(folder / name)
    lm = sitk.ReadImage(str(folder / label_name))
    canon = sitk.Resample(lm, vol.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    region = sitk.GetArrayFromImage(canon) % 256  # value = region + 256 * type
    lungs = np.zeros(region.shape, np.uint8)
    lungs[(region >= 12) & (region <= 14)] = 1  # right upper/middle/lower thirds
    lungs[(region >= 9) & (region <= 11)] = 2  # left thirds
    return vol, lungs, lm


def case_cip() -> dict[str, Any]:
    import SimpleITK as sitk

    from covidtrack.segment.types import Segmentation

    fixed, fl, lm_f = _cip_volume("ct-64.nrrd", "lm-64.nrrd")
    moving, ml, lm_m = _cip_volume("ct-64-transformed.nrrd", "lm-64-transformed.nrrd")
    with tempfile.TemporaryDirectory() as tmp:
        reg, timing = _timed_register(fixed, Segmentation(fl, np.zeros_like(fl)), moving,
                                      Segmentation(ml, np.zeros_like(ml)), Path(tmp) / "reg")
        whole = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / "ct" / "cip_copdgene_ct64" / "wholeLung-64.nrrd")))
        idx = np.argwhere(whole > 0)  # source (k, j, i) voxels: the same tissue in both files
        p_f = np.array([lm_f.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx])
        p_t = np.array([lm_m.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx])
        err = np.linalg.norm(reg.map_points(p_f) - p_t, axis=1)
    voxel = float(max(fixed.spacing))
    return {
        "case": "cip", "pair": "ct-64 -> ct-64-transformed (header rotated ~20 deg about z)",
        "shape": list(fixed.shape), "spacing_mm": list(fixed.spacing), "voxel_mm": round(voxel, 3),
        "error_lungs": _stats(err, voxel), "error_before_mm": round(float(np.linalg.norm(p_f - p_t, axis=1).mean()), 3),
        "qa": _qa(reg), **timing, "peak_rss_mb": _peak_rss_mb(),
    }


def case_chest4dct(seed: int) -> dict[str, Any]:
    from register_sim import lung_errors_mm, random_map, warp_with_map

    from covidtrack.io import load_ct
    from covidtrack.register import Grid
    from covidtrack.segment.lung_targets import extract_lungs
    from covidtrack.segment.types import Segmentation

    vol = load_ct(SHARED / "ct" / "chest4dct_phase00" / "dicom")
    lungs, _ = extract_lungs(vol)
    grid = Grid.of(vol)
    known = random_map(grid, lungs, seed)
    moving, moving_lungs = warp_with_map(vol, lungs, known)
    zeros = np.zeros_like(lungs)
    with tempfile.TemporaryDirectory() as tmp:
        reg, timing = _timed_register(vol, Segmentation(lungs, zeros), moving, Segmentation(moving_lungs, zeros), Path(tmp) / "reg")
        err = lung_errors_mm(reg.map_points, grid, lungs, known)
        before = lung_errors_mm(lambda p: p, grid, lungs, known)
    return {
        "case": "chest4dct", "pair": f"512x512x141 series -> simulated follow-up seed {seed}",
        "shape": list(vol.shape), "spacing_mm": list(vol.spacing),
        "simulation": {"rotation_deg_about_z": 4.0, "tilt_deg_max": 1.5, "shift_mm": 8.0, "bump_amplitude_mm_max": 6.0,
                       "bump_sigma_mm": 40.0, "n_bumps": 6},
        "error_lungs": _stats(err, max(vol.spacing)), "error_before_mm": round(float(before.mean()), 3),
        "qa": _qa(reg), **timing, "peak_rss_mb": _peak_rss_mb(),
    }


def _run_child(fn_name: str, *args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_dispatch, fn_name, args).result()


def _dispatch(fn_name: str, args: tuple) -> dict[str, Any]:
    os.environ.setdefault("COVIDTRACK_THREADS", str(os.cpu_count() or 1))
    return globals()[fn_name](*args)


def _summary(rows: list[dict[str, Any]], case: str) -> dict[str, Any]:
    sel = [r for r in rows if r.get("case") == case and "error_lungs" in r]
    if not sel:
        return {}
    return {
        "pairs": len(sel),
        "mean_of_mean_error_mm": round(float(np.mean([r["error_lungs"]["mean_mm"] for r in sel])), 3),
        "worst_p95_error_mm": round(float(np.max([r["error_lungs"]["p95_mm"] for r in sel])), 3),
        "mean_wall_s": round(float(np.mean([r["wall_s"] for r in sel])), 2),
        "mean_cpu_s": round(float(np.mean([r["cpu_s"] for r in sel])), 2),
        "max_peak_rss_mb": float(np.max([r["peak_rss_mb"] for r in sel])),
        "all_qa_ok": all(r["qa"]["ok"] for r in sel),
    }


def main() -> None:
    quick = "--quick" in sys.argv
    # Most informative first, so an interrupted run still has the real cases.
    real = SHARED.is_dir()
    jobs: list[tuple[str, tuple]] = [("case_cip", ()), ("case_chest4dct", (1,))] if real else []
    jobs += [("case_phantom", (11, f)) for f in (1, 2)]
    if not quick:
        jobs += [("case_phantom", (12, f)) for f in (1, 2)]
        jobs += [("case_chest4dct", (2,))] if real else []
        jobs += [("case_phantom", (13, f)) for f in (1, 2)]
    rows: list[dict[str, Any]] = []
    for name, args in jobs:
        print(f"{name}{args} ...", flush=True)
        try:
            row = _run_child(name, *args)
        except Exception as err:  # noqa: BLE001 - a failed case is a result too
            row = {"case": name.removeprefix("case_"), "args": list(args), "error": f"{type(err).__name__}: {err}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(rows, complete=len(rows) == len(jobs))  # partial results survive an interrupted run
    print(f"wrote {OUT}")


def _write(rows: list[dict[str, Any]], complete: bool) -> None:
    from covidtrack import register as R

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    doc = {
        "benchmark": "register",
        "measured": ("accuracy of covidtrack.register.register (affine + SyN, lung-focused) against known "
                     "displacements: |T_hat(p) - T(p)| at baseline lung voxels; wall/CPU time of register() per pair; "
                     "peak RSS of the process doing one pair (includes loading the data)"),
        "data": {
            "phantom": "covidtrack.phantom.make_series(seed, 3, DEMO_SHAPE, DEMO_SPACING), baseline -> t1, t2",
            "cip": "../shared/data/ct/cip_copdgene_ct64 ct-64.nrrd vs ct-64-transformed.nrrd (real COPDGene CT, CIP licence)",
            "chest4dct": "../shared/data/ct/chest4dct_phase00/dicom (real, 512x512x141, Apache-2.0) + simulated deformation",
        },
        "model_version": "none: registration has no learned model; lung masks from phantom truth, CIP label maps, "
                         "or covidtrack.segment.lung_targets.extract_lungs (classical)",
        "settings": {"work_spacing_mm": R.WORK_SPACING_MM, "syn_iterations": "x".join(map(str, R.SYN_ITERATIONS)),
                     "fixed_margin_mm": R.FIXED_MARGIN_MM, "moving_margin_mm": R.MOVING_MARGIN_MM,
                     "qa_thresholds": {"min_lung_dice": R.QA_MIN_LUNG_DICE, "max_mean_surface_mm": R.QA_MAX_SURFACE_MM,
                                       "max_folding_fraction": R.QA_MAX_FOLDING}},
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores, shared with other jobs (see load averages per pair)",
                     "python": platform.python_version()},
        "code_commit": commit,
        "complete": complete,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "summary": {c: _summary(rows, c) for c in ("phantom", "cip", "chest4dct")},
        "pairs": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
