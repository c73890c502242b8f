"""Lobe benchmark: accuracy of the fissure prior (LIDC leave-one-out), phantom Dice, lobe shares
and time on the real CTs, lobe shares on 20 real lung masks; figures for visual inspection.

Run: ``nice -n 5 python bench/lobes_bench.py`` (needs ../shared/data beside the repo).
Writes ``bench/results/lobes_bench.json`` and ``bench/figures/lobes_*.png``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from covidtrack.config import settings  # noqa: E402
from covidtrack.labels import LOBE_LABELS  # noqa: E402
from covidtrack.segment.eval_fissures import leave_one_out, lobe_dice, lobe_shares  # noqa: E402
from covidtrack.segment.lobes import fissure_heights, load_prior, lobes_from_heights, lobes_from_lung_mask, split_lungs  # noqa: E402
from covidtrack.segment.train_lobes import case_points, load_case, read_mask_canonical  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
FIGS = REPO / "bench" / "figures"
RESULTS = REPO / "bench" / "results" / "lobes_bench.json"
COLORS = {1: (0.95, 0.75, 0.1), 2: (0.2, 0.8, 0.3), 3: (0.2, 0.5, 1.0), 4: (0.9, 0.3, 0.8), 5: (0.1, 0.85, 0.85)}


def lidc_loo() -> dict:
    cases = [load_case(p) for p in sorted((SHARED / "masks" / "lidc_lung_fissure_masks").iterdir())]
    points = [case_points(c) for c in cases]
    return leave_one_out(cases, points)


def _true_fissure_distances(pred: np.ndarray, truth_lobes: np.ndarray, spacing) -> dict[str, float]:
    """Mean distance (mm) from the true fissures (faces between true lobes) to the nearest
    predicted border of the same lobes: the issue's fissure metric, with the phantom's whole
    fissure surfaces as the drawing."""
    from scipy.spatial import cKDTree

    from covidtrack.segment.eval_fissures import FISSURE_BORDERS, border_points

    out = {}
    for name, pairs in FISSURE_BORDERS.items():
        true_pts = border_points(truth_lobes, pairs, spacing)
        pred_pts = border_points(pred, pairs, spacing)
        if len(true_pts) and len(pred_pts):
            out[name] = float(cKDTree(pred_pts).query(true_pts, k=1)[0].mean())
    return out


class record_planes:
    """Collect every :func:`covidtrack.segment.fissures.plane_start` decision made inside the
    ``with`` block: per lung (right first), its contrast, support against the prior's, angles
    and whether the plane start was used."""

    def __enter__(self) -> list[dict]:
        from covidtrack.segment import fissures as F

        self._orig, self.rows = F.plane_start, []

        def wrapped(*args, **kwargs):
            fit = self._orig(*args, **kwargs)
            if fit is not None:
                self.rows.append({"contrast": round(fit.contrast, 2), "support": round(fit.support, 2),
                                  "prior_support": round(fit.prior_support, 2), "rise_deg": round(fit.rise_deg, 1),
                                  "lateral_deg": round(fit.lateral_deg, 1), "used": bool(fit.clear)})
            return fit

        F.plane_start = wrapped
        return self.rows

    def __exit__(self, *exc) -> None:
        from covidtrack.segment import fissures as F

        F.plane_start = self._orig


def hide_fissures(hu: np.ndarray, truth_lobes: np.ndarray, seed: int = 0) -> np.ndarray:
    """The phantom CT with its fissures painted over: voxels within one voxel of a border between
    two lobes get the local (in-slice 5x5) median plus noise. A null case for the plane start's
    threshold (imperfect: remnants of a fissure can survive)."""
    from scipy import ndimage as ndi

    border = np.zeros(truth_lobes.shape, bool)
    lab = truth_lobes.astype(np.int16)
    for ax in range(3):
        a = np.take(lab, range(lab.shape[ax] - 1), axis=ax)
        b = np.take(lab, range(1, lab.shape[ax]), axis=ax)
        diff = (a != b) & (a > 0) & (b > 0)
        lo = [slice(None)] * 3
        lo[ax] = slice(0, -1)
        hi = [slice(None)] * 3
        hi[ax] = slice(1, None)
        border[tuple(lo)] |= diff
        border[tuple(hi)] |= diff
    border = ndi.binary_dilation(border)
    out = hu.astype(np.float32).copy()
    med = ndi.median_filter(out, size=(1, 5, 5))
    out[border] = med[border] + np.random.default_rng(seed).normal(0.0, 15.0, int(border.sum()))
    return out


def timed_partition(lungs: np.ndarray, spacing, ct: np.ndarray | None) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
    """Fissure heights and lobes of a right/left lung mask (what ``lobes_from_lung_mask`` does,
    keeping the heights for the other measures) and the seconds it took."""
    t0 = time.perf_counter()
    heights = fissure_heights(lungs, spacing, ct)
    lobes = lobes_from_heights(lungs, heights)
    return heights, lobes, time.perf_counter() - t0


def _prior_normal_angles(truth, spacing, prior_h: dict[str, np.ndarray]) -> dict[str, float]:
    """Median angle (degrees) between the shape prior's surface normal and the true fissure's
    normal, over the columns the true fissure crosses: how far off the prior's local
    orientation is (the reason the CT search does not score sheets across it)."""
    from covidtrack.segment.fissures import _surface_normal

    true_h = _truth_heights(truth.lobes)
    out = {}
    for name, th in true_h.items():
        cols = np.isfinite(th)
        n_true = _surface_normal(np.where(cols, th, np.nanmean(th)), spacing)
        ph = prior_h[name]
        n_prior = _surface_normal(np.where(np.isfinite(ph), ph, np.nanmean(ph)), spacing)
        cos = np.clip(np.abs((n_true * n_prior).sum(axis=0)), 0.0, 1.0)
        out[name] = float(np.median(np.degrees(np.arccos(cos[cols]))))
    return out


def oblique_rise_deg(heights: dict[str, np.ndarray], lungs: np.ndarray, spacing) -> dict[str, float]:
    """How steeply each oblique fissure rises towards the back: per sagittal slice a line z(y)
    fitted to the fissure where it lies inside the lung, its angle (degrees, + = higher
    posteriorly), median over the slices. A real oblique fissure rises steeply (it runs from about
    T4 at the back to the diaphragm at the front); a value near 0 means a flat, implausible cut."""
    out = {}
    for name, side in (("right_oblique", 1), ("left_oblique", 2)):
        m = lungs == side
        z_lo = np.argmax(m, axis=0)
        z_hi = m.shape[0] - 1 - np.argmax(m[::-1], axis=0)
        h = heights[name]
        inside = m.any(axis=0) & np.isfinite(h) & (h > z_lo + 1) & (h < z_hi - 1)
        angles = []
        for x in range(m.shape[2]):
            ys = np.nonzero(inside[:, x])[0]
            if len(ys) >= 20:
                slope = np.polyfit(ys * float(spacing[1]), h[ys, x] * float(spacing[0]), 1)[0]
                angles.append(float(np.degrees(np.arctan(slope))))
        out[name] = float(np.median(angles)) if angles else float("nan")
    return out


def phantoms(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict:
    from covidtrack.phantom.series import make_phantom

    out: dict = {}
    for seed in seeds:
        vol, truth = make_phantom(seed)  # default 160 x 256 x 256 at 2.0 x 1.4 x 1.4 mm, disease at peak
        row = {"shape": list(vol.shape), "spacing_mm": list(vol.spacing)}
        heights = {}
        row["oblique_rise_deg"] = {"truth": oblique_rise_deg(_truth_heights(truth.lobes), truth.lungs, vol.spacing)}
        for mode, ct in (("mask_only", None), ("with_ct", vol.array)):
            with record_planes() as planes:
                heights[mode], lobes, secs = timed_partition(truth.lungs, vol.spacing, ct)
            row[mode] = {"dice": lobe_dice(lobes, truth.lobes), "seconds": round(secs, 2),
                         "fissure_distance_mm": _true_fissure_distances(lobes, truth.lobes, vol.spacing)}
            if ct is not None:
                row["plane_start"] = dict(zip(("right_oblique", "left_oblique"), planes))
            row["oblique_rise_deg"][mode] = oblique_rise_deg(heights[mode], truth.lungs, vol.spacing)
        with record_planes() as planes:
            fissure_heights(truth.lungs, vol.spacing, hide_fissures(vol.array, truth.lobes, seed))
        row["plane_start_fissures_hidden"] = dict(zip(("right_oblique", "left_oblique"), planes))
        row["truth_shares_pct"] = lobe_shares(truth.lobes)
        row["prior_normal_angle_deg_median"] = _prior_normal_angles(truth, vol.spacing, heights["mask_only"])
        out[f"seed{seed}"] = row
    summary = {}
    for mode in ("mask_only", "with_ct"):
        rows = [out[f"seed{s}"][mode] for s in seeds]
        summary[mode] = {
            "dice_mean": {k: float(np.mean([r["dice"][k] for r in rows])) for k in rows[0]["dice"]},
            "dice_min": {k: float(np.min([r["dice"][k] for r in rows])) for k in rows[0]["dice"]},
            "fissure_distance_mm_mean": {k: float(np.mean([r["fissure_distance_mm"][k] for r in rows]))
                                         for k in rows[0]["fissure_distance_mm"]},
        }
    summary["oblique_rise_deg"] = {m: {k: [round(out[f"seed{s}"]["oblique_rise_deg"][m][k], 1) for s in seeds]
                                       for k in ("right_oblique", "left_oblique")} for m in ("truth", "mask_only", "with_ct")}
    for key in ("plane_start", "plane_start_fissures_hidden"):
        rows = [out[f"seed{s}"][key] for s in seeds]
        summary[key] = {name: {"contrast": [r[name]["contrast"] for r in rows if name in r],
                               "used": [r[name]["used"] for r in rows if name in r]}
                        for name in ("right_oblique", "left_oblique")}
    angles = [out[f"seed{s}"]["prior_normal_angle_deg_median"] for s in seeds]
    summary["prior_normal_angle_deg_median"] = {k: [round(a[k], 1) for a in angles] for k in angles[0]}
    out["summary"] = {"seeds": list(seeds), **summary,
                      "plane_start_note": "plane_start: the plane start's decision per oblique fissure with CT (used when contrast "
                                          ">= 4 and support > prior_support); plane_start_fissures_hidden: the same with the "
                                          "fissures painted over (hide_fissures), a null case",
                      "note": "phantoms at peak disease; fissure distance = mean distance from every true fissure face "
                              "to the nearest predicted border of the same two lobes (goal with CT: 3 mm; Dice goal 0.90)"}
    return out


def _truth_heights(lobes: np.ndarray) -> dict[str, np.ndarray]:
    """Per column, the z index (float) of each true fissure: mean z of the lobe transitions."""
    pairs = {"right_oblique": (3, (1, 2)), "right_horizontal": (2, (1,)), "left_oblique": (5, (4,))}
    z = np.arange(lobes.shape[0], dtype=float)[:, None, None]
    out = {}
    for name, (lower, uppers) in pairs.items():
        b = np.zeros(lobes.shape, bool)
        b[:-1] = (lobes[:-1] == lower) & np.isin(lobes[1:], uppers)
        n = b.sum(axis=0)
        out[name] = np.where(n > 0, (b * z).sum(axis=0) / np.maximum(n, 1) + 0.5, np.nan)
    return out


def refinement_capture(seeds: tuple[int, ...] = (0, 1, 2), shifts_mm: tuple[float, ...] = (-20.0, -12.0, -6.0, 6.0, 12.0, 20.0)) -> dict:
    """How precisely the CT evidence places a fissure when the starting surface is the true one
    moved by a known distance (the capture range of :func:`covidtrack.segment.fissures.refine`,
    independent of the shape prior). Healthy phantoms (visible fissures, 2 x 1.4 x 1.4 mm);
    errors are vertical (z) distances in mm over the columns where the true fissure exists."""
    from scipy import ndimage as ndi

    from covidtrack.phantom.series import make_phantom
    from covidtrack.segment import fissures as F
    from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG

    rows = []
    for seed in seeds:
        vol, truth = make_phantom(seed, healthy=True)
        sp = tuple(float(x) for x in vol.spacing)
        true_h = _truth_heights(truth.lobes)
        for side, names in ((RIGHT_LUNG, ("right_oblique", "right_horizontal")), (LEFT_LUNG, ("left_oblique",))):
            lung = truth.lungs == side
            eroded = ndi.binary_erosion(lung, iterations=1)
            evidence = F.fissure_evidence(vol.array, lung, sp, eroded)
            for name in names:
                th = true_h[name]
                cols = np.isfinite(th)
                smooth = np.where(cols, ndi.gaussian_filter(np.where(cols, th, np.nanmean(th)), 3.0), np.nan)
                for shift in shifts_mm:
                    start = smooth + shift / sp[0]
                    floor = None
                    if name == "right_horizontal":
                        floor = true_h["right_oblique"]
                    if name == "left_oblique":  # the product's step for this fissure
                        got = F.follow_prior(evidence, eroded, start, sp)
                    else:
                        kind = "horizontal" if name == "right_horizontal" else "oblique"
                        got = F.refine_passes(evidence, kind, eroded, start, sp, floor=floor)
                    err = np.abs(got - th)[cols] * sp[0]
                    rows.append({"seed": seed, "fissure": name, "shift_mm": shift, "mean_mm": float(np.nanmean(err)),
                                 "median_mm": float(np.nanmedian(err)), "start_mean_mm": float(np.nanmean(np.abs(start - th)[cols]) * sp[0])})
    by_shift = {str(sh): {"mean_mm": float(np.mean([r["mean_mm"] for r in rows if r["shift_mm"] == sh])),
                          "median_mm": float(np.mean([r["median_mm"] for r in rows if r["shift_mm"] == sh]))} for sh in shifts_mm}
    return {"what": "fissure refinement started from the true surface (smoothed) moved by shift_mm along z; "
                    "error = |refined - true| height in mm per column", "rows": rows, "by_shift": by_shift,
            "mean_mm": float(np.mean([r["mean_mm"] for r in rows])), "median_mm": float(np.mean([r["median_mm"] for r in rows]))}


def lung_mask_for(volume) -> tuple[np.ndarray, str]:
    """The product's lung model where it is shipped, else the classical extraction."""
    try:
        from covidtrack.segment.lungs import LungModel

        model = LungModel.load()
        return model.predict(volume), f"covidtrack.segment.lungs.LungModel {model.version}"
    except Exception as err:  # no shipped lung model yet: use the classical one, and say so
        from covidtrack.segment.lung_targets import extract_lungs

        mask, _ = extract_lungs(volume)
        return mask.astype(np.uint8), f"classical threshold lungs (lung_targets; LungModel unavailable: {type(err).__name__})"


def overlay_figure(name: str, hu: np.ndarray, spacing, lungs: np.ndarray, results: dict[str, np.ndarray]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zz, yy, xx = np.nonzero(lungs)
    y_c = int(np.percentile(yy, 55))
    x_r = int(np.percentile(xx[lungs[zz, yy, xx] == 1], 50))
    x_l = int(np.percentile(xx[lungs[zz, yy, xx] == 2], 50))
    sz, sy, sx = spacing
    views = [("coronal", lambda a: a[:, y_c, :], sz / sx), ("sagittal right", lambda a: a[:, :, x_r], sz / sy),
             ("sagittal left", lambda a: a[:, :, x_l], sz / sy)]
    fig, axes = plt.subplots(len(results), 3, figsize=(15, 5 * len(results)), squeeze=False)
    for r, (title, lobes) in enumerate(results.items()):
        for c, (vname, cut, aspect) in enumerate(views):
            ax = axes[r, c]
            img = np.clip((cut(hu).astype(float) + 1000) / 900, 0, 1)
            rgb = np.repeat(img[..., None], 3, axis=-1)
            lab = cut(lobes)
            for k, col in COLORS.items():
                m = lab == k
                rgb[m] = 0.6 * rgb[m] + 0.4 * np.array(col)
            ax.imshow(rgb, origin="lower", aspect=aspect)
            ax.set_title(f"{name}: {vname} ({title})", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path = FIGS / f"lobes_{name}.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def fissure_figure(name: str, hu: np.ndarray, spacing, lungs: np.ndarray, prior_lobes: np.ndarray, ct_lobes: np.ndarray) -> Path:
    """Sagittal slices of each lung: CT, plate measure, and the lobe borders (prior vs with CT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage as ndi

    from covidtrack.segment.fissures import plate_measure

    fig, axes = plt.subplots(2, 2, figsize=(14, 11))
    for row, side in enumerate((1, 2)):
        xs = np.nonzero((lungs == side).any(axis=(0, 1)))[0]
        x = int(np.percentile(xs, 40 if side == 1 else 60))
        sl = (slice(None), slice(None), slice(max(x - 8, 0), x + 9))  # a slab: the Hessian needs x too
        region = ndi.binary_erosion(lungs[sl] == side, iterations=1)
        pm = plate_measure(hu[sl].astype(np.float32), spacing, region).measure[:, :, x - sl[2].start]
        aspect = spacing[0] / spacing[1]
        axes[row, 0].imshow(hu[:, :, x], cmap="gray", vmin=-1000, vmax=-300, origin="lower", aspect=aspect)
        for lobes, colour in ((prior_lobes, "deepskyblue"), (ct_lobes, "red")):
            cut = lobes[:, :, x].astype(float)
            edges = (ndi.grey_dilation(cut, size=3) != ndi.grey_erosion(cut, size=3)) & (lungs[:, :, x] > 0)
            edges &= ndi.binary_erosion(lungs[:, :, x] > 0, iterations=2)
            yy, zz = np.nonzero(edges.T)
            axes[row, 0].scatter(yy, zz, s=0.3, c=colour)
        axes[row, 0].set_title(f"{name} x={x}: lobe borders, blue = mask only, red = with CT", fontsize=9)
        axes[row, 1].imshow(pm, cmap="hot", origin="lower", aspect=aspect, vmax=1.0)
        axes[row, 1].set_title("Hessian plate measure (fissure enhancement)", fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    path = FIGS / f"lobes_fissures_{name}.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def start_consistency(vol, lungs: np.ndarray, shifts_mm: tuple[float, ...] = (-12.0, 12.0)) -> dict:
    """Where the CT decides, the result must not depend on where the search starts: the prior
    surfaces are moved by ``shifts_mm`` before refinement, and the mean distance (mm, along z,
    over the lung's columns) between each result and the unshifted one is reported per fissure.
    Equal to the shift: the CT moved nothing; near 0: every start ends on the same sheet."""
    from covidtrack.segment import fissures as F

    refine = F.refine
    results = {}
    try:
        for shift in (0.0,) + tuple(shifts_mm):
            def shifted(ct, lung, frame, heights, spacing, shift=shift, **kw):
                return refine(ct, lung, frame, {k: h + shift / spacing[0] for k, h in heights.items()}, spacing, **kw)

            F.refine = shifted
            results[shift] = fissure_heights(lungs, vol.spacing, vol.array)
    finally:
        F.refine = refine
    out = {}
    for name, base in results[0.0].items():
        cols = np.isfinite(base) & (lungs > 0).any(axis=0)
        out[name] = {f"{s:+.0f}mm": float(np.mean(np.abs(results[s][name] - base)[cols]) * vol.spacing[0]) for s in shifts_mm}
    return out


def real_cts() -> dict:
    from covidtrack.io import load_ct

    scans = {
        "chest4dct_phase00": SHARED / "ct" / "chest4dct_phase00" / "dicom",
        "lung-pet-ct-dx_A0001": SHARED / "ct" / "lung-pet-ct-dx_A0001" / "dicom",
        "cip_copdgene_ct64": SHARED / "ct" / "cip_copdgene_ct64" / "ct-64.nrrd",
    }
    out = {}
    for name, path in scans.items():
        vol = load_ct(path)
        lungs, lung_source = lung_mask_for(vol)
        row = {"shape": list(vol.shape), "spacing_mm": list(vol.spacing), "lung_mask": lung_source}
        res = {}
        row["oblique_rise_deg"] = {}
        for mode, ct in (("mask only", None), ("with CT", vol.array)):
            with record_planes() as planes:
                heights, lobes, secs = timed_partition(lungs, vol.spacing, ct)
            if planes:
                row["plane_start"] = dict(zip(("right_oblique", "left_oblique"), planes))
            res[mode] = lobes
            row[mode.replace(" ", "_")] = {"seconds": round(secs, 2), "shares_pct": lobe_shares(lobes)}
            row["oblique_rise_deg"][mode.replace(" ", "_").replace("CT", "ct")] = oblique_rise_deg(heights, lungs, vol.spacing)
        if min(vol.spacing) <= 2.0 and max(vol.spacing) <= 2.0:  # thin slices: fissures can be seen
            row["start_shift_spread_mm"] = start_consistency(vol, lungs)
        changed = (res["mask only"] != res["with CT"]) & (lungs > 0)
        row["voxels_moved_by_ct_pct"] = 100.0 * float(changed.sum()) / max(int((lungs > 0).sum()), 1)
        row["figure"] = str(overlay_figure(name, vol.array, vol.spacing, lungs, res).relative_to(REPO))
        row["fissure_figure"] = str(fissure_figure(name, vol.array, vol.spacing, lungs, res["mask only"],
                                                   res["with CT"]).relative_to(REPO))
        out[name] = row
    return out


def posterior_is_lowest(mask: np.ndarray) -> bool:
    """Anatomical check of the AP axis: the lowest lung voxels (posterior costophrenic recess)
    lie behind the lung's centre. The DIR-Lab mask headers fail it (y runs posterior -> anterior)."""
    zz, yy, _ = np.nonzero(mask)
    low = zz <= np.percentile(zz, 3)
    return bool(yy[low].mean() > yy.mean())


def dirlab_shares() -> dict:
    rows = {}
    flipped = []
    for path in sorted((SHARED / "masks" / "dirlab_copd_lung_masks").glob("*.nii.gz")):
        mask, spacing = read_mask_canonical(path)
        mask = mask > 0
        if not posterior_is_lowest(mask):  # header orientation is wrong: fix AP before partitioning
            mask = mask[:, ::-1, :]
            flipped.append(path.name)
        lungs = split_lungs(mask.astype(np.uint8))
        rows[path.name.replace("_mask.nii.gz", "")] = lobe_shares(lobes_from_lung_mask(lungs, spacing))
    names = list(LOBE_LABELS.values())
    mean = {n: float(np.mean([r[n] for r in rows.values()])) for n in names}
    std = {n: float(np.std([r[n] for r in rows.values()])) for n in names}
    right = [r["RUL"] + r["RML"] + r["RLL"] for r in rows.values()]
    return {"per_mask": rows, "mean_pct": mean, "std_pct": std, "ap_axis_flipped_by_anatomical_check": flipped,
            "right_lung_share_pct_mean": float(np.mean(right)),
            "caveat": "mask headers carry no trustworthy orientation (AP fixed by an anatomical check; the right lung "
                      "coming out smaller than the left in most masks suggests right/left are swapped too), so these "
                      "shares are a plausibility check of the prior on 20 real lung shapes, not a measurement"}


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    import torch

    torch.set_num_threads(settings().threads)
    FIGS.mkdir(parents=True, exist_ok=True)
    prior = load_prior()
    t0 = time.time()
    result = {
        "what": "five-lobe partition (covidtrack.segment.lobes): fissure distance + Dice of the shape prior "
                "(LIDC leave-one-out), phantom Dice, lobe shares and time on real CT, shares on real masks",
        "model": prior.version,
        "code_commit": _git_commit(),
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores shared with other jobs", "threads": settings().threads},
        "lidc_leave_one_out": lidc_loo(),
        "phantoms": phantoms(),
        "refinement_capture": refinement_capture(),
        "real_ct": real_cts(),
        "dirlab_masks_mask_only": dirlab_shares(),
        "expected_shares_pct": {"RUL": 20, "RML": "8-10", "RLL": 25, "LUL": 22, "LLL": 22},
    }
    result["wall_s"] = round(time.time() - t0, 1)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    s = result["lidc_leave_one_out"]["summary"]
    print(json.dumps(s, indent=1))
    for k, v in result["phantoms"].items():
        if k != "summary":
            print(k, {m: {n: round(d, 3) for n, d in v[m]["dice"].items()} for m in ("mask_only", "with_ct")})
    print("phantom summary", json.dumps(result["phantoms"]["summary"], indent=1))
    print("refinement capture", json.dumps(result["refinement_capture"]["by_shift"]))
    for k, v in result["real_ct"].items():
        print(k, v["with_CT"], v["mask_only"]["seconds"], round(v["voxels_moved_by_ct_pct"], 1))
    print("dirlab", {n: round(x, 1) for n, x in result["dirlab_masks_mask_only"]["mean_pct"].items()})


if __name__ == "__main__":
    main()
