"""Fissure-distance evaluation of a lobe partition, and the leave-one-out study of the prior.

``python -m covidtrack evaluate fissures --lungs FILE --fissures FILE [--ct FILE] [--json OUT]``
computes lobes from the lung mask (and the CT where given) and reports, per named fissure
(right oblique, right horizontal, left oblique), the mean and 95th-percentile distance in mm
from each hand-drawn fissure voxel to the nearest predicted border between the two lobes that
fissure separates (right oblique: RLL against RUL or RML; horizontal: RUL against RML; left
oblique: LLL against LUL). Which hand-drawn voxel belongs to which fissure is decided from the
drawing alone (:func:`covidtrack.segment.train_lobes.named_fissure_voxels`), never from the
prediction, so a bad partition cannot make itself look good.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from covidtrack.labels import LEFT_LUNG, LOBE_LABELS, RIGHT_LUNG

if TYPE_CHECKING:
    from covidtrack.segment.lobes import LobePrior
    from covidtrack.segment.train_lobes import CaseData, FissurePoints

# lobe pairs whose shared border each fissure is
FISSURE_BORDERS: dict[str, tuple[tuple[int, int], ...]] = {
    "right_oblique": ((3, 1), (3, 2)),
    "right_horizontal": ((1, 2),),
    "left_oblique": ((5, 4),),
}
# typical lobe shares of one lung for the naive height split (right: 20/9/25 %, left: 22/22 %)
NAIVE_SHARES = {RIGHT_LUNG: ((3, 25.0), (2, 9.0), (1, 20.0)), LEFT_LUNG: ((5, 22.0), (4, 22.0))}


def border_points(lobes: np.ndarray, pairs: tuple[tuple[int, int], ...], spacing: tuple[float, ...]) -> np.ndarray:
    """Mid-points (mm, z y x) of the voxel faces shared by lobes ``a`` and ``b`` of any pair."""
    pts = []
    sp = np.asarray(spacing, dtype=float)
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        a_, b_ = lobes[tuple(lo)], lobes[tuple(hi)]
        face = np.zeros(a_.shape, bool)
        for a, b in pairs:
            face |= ((a_ == a) & (b_ == b)) | ((a_ == b) & (b_ == a))
        idx = np.array(np.nonzero(face), dtype=float).T
        if idx.size:
            idx[:, axis] += 0.5
            pts.append(idx * sp)
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def fissure_distances(
    lobes: np.ndarray, named: dict[str, tuple[np.ndarray, ...]], spacing: tuple[float, float, float]
) -> dict[str, dict[str, float]]:
    """Per fissure: mean, 95th percentile and median distance (mm) and the voxel count.

    ``named[fissure]`` holds the (z, y, x) index arrays of its hand-drawn voxels. A fissure
    whose border is absent from the partition gets ``inf`` distances.
    """
    out: dict[str, dict[str, float]] = {}
    sp = np.asarray(spacing, dtype=float)
    for name, vox in named.items():
        if len(vox[0]) == 0:
            continue
        border = border_points(lobes, FISSURE_BORDERS[name], spacing)
        if len(border) == 0:
            out[name] = {"mean_mm": float("inf"), "p95_mm": float("inf"), "median_mm": float("inf"), "voxels": len(vox[0])}
            continue
        pts = np.stack(vox, axis=1).astype(float) * sp
        d, _ = cKDTree(border).query(pts, k=1)
        out[name] = {"mean_mm": float(d.mean()), "p95_mm": float(np.percentile(d, 95)),
                     "median_mm": float(np.median(d)), "voxels": int(len(d))}
    return out


def lobe_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice per lobe name (labels 1-5)."""
    out = {}
    for lab, name in LOBE_LABELS.items():
        a, b = pred == lab, ref == lab
        denom = a.sum() + b.sum()
        out[name] = float(2.0 * (a & b).sum() / denom) if denom else float("nan")
    return out


def lobe_shares(lobes: np.ndarray) -> dict[str, float]:
    """Each lobe's share of the total lung volume, in %."""
    total = max(int((lobes > 0).sum()), 1)
    return {name: 100.0 * float((lobes == lab).sum()) / total for lab, name in LOBE_LABELS.items()}


def naive_height_split(lungs: np.ndarray) -> np.ndarray:
    """Baseline: cut each lung by height at the typical lobe volume shares."""
    out = np.zeros(lungs.shape, np.uint8)
    for side, shares in NAIVE_SHARES.items():
        m = lungs == side
        if not m.any():
            continue
        per_z = m.sum(axis=(1, 2)).astype(float)
        cum = np.cumsum(per_z) / per_z.sum()
        total = sum(s for _, s in shares)
        z = np.arange(lungs.shape[0])[:, None, None]
        lo = 0.0
        for lab, s in shares:
            hi = lo + s / total
            sel = (cum > lo - 1e-9) & (cum <= hi + 1e-9) if hi < 0.999 else cum > lo - 1e-9
            zs = np.nonzero(sel)[0]
            if zs.size:
                out[m & (z >= zs.min()) & (z <= zs.max())] = lab
            lo = hi
        out[m & (out == 0)] = shares[-1][0]
    return out


def reference_partition(case: "CaseData", points: "dict[str, FissurePoints]") -> np.ndarray:
    """The case's own lobe map: its lung cut by its hand-drawn fissures, extended where partial."""
    from covidtrack.segment.lobes import lobes_from_lung_mask
    from covidtrack.segment.train_lobes import fit_prior

    own = fit_prior([points], version="reference")
    return lobes_from_lung_mask(case.lungs, case.spacing, prior=own, work_spacing_mm=min(case.spacing))


def evaluate_case(case: "CaseData", prior: "LobePrior", points: "dict[str, FissurePoints]") -> dict:
    """Distances, Dice against the reference partition and lobe shares for the prior and the naive split."""
    from covidtrack.segment.lobes import lobes_from_lung_mask
    from covidtrack.segment.train_lobes import named_fissure_voxels

    named = named_fissure_voxels(case.lungs, case.fissures)
    ref = reference_partition(case, points)
    pred = lobes_from_lung_mask(case.lungs, case.spacing, prior=prior, work_spacing_mm=min(case.spacing))
    naive = naive_height_split(case.lungs)
    result = {}
    for method, lobes in (("prior", pred), ("naive_height", naive), ("reference", ref)):
        d = fissure_distances(lobes, named, case.spacing)
        dice = lobe_dice(lobes, ref)
        result[method] = {
            "fissure_distance": d,
            "mean_distance_mm": _voxel_weighted_mean(d),
            "dice_vs_reference": dice,
            "mean_dice": float(np.nanmean(list(dice.values()))),
            "shares_pct": lobe_shares(lobes),
        }
    return result


def _voxel_weighted_mean(d: dict[str, dict[str, float]]) -> float:
    n = sum(v["voxels"] for v in d.values())
    return float(sum(v["mean_mm"] * v["voxels"] for v in d.values()) / n) if n else float("nan")


def leave_one_out(cases: "list[CaseData]", points: "list[dict[str, FissurePoints]]") -> dict:
    """Fit the prior on all cases but one, evaluate on that one, for each case in turn."""
    from covidtrack.segment.train_lobes import fit_prior

    per_case = {}
    for i, case in enumerate(cases):
        others = [p for j, p in enumerate(points) if j != i]
        prior = fit_prior(others, version=f"loo-without-{case.name}")
        per_case[case.name] = evaluate_case(case, prior, points[i])
    summary = {}
    for method in ("prior", "naive_height"):
        summary[method] = {
            "mean_distance_mm": float(np.mean([r[method]["mean_distance_mm"] for r in per_case.values()])),
            "mean_p95_mm": float(np.mean([np.mean([f["p95_mm"] for f in r[method]["fissure_distance"].values()])
                                          for r in per_case.values()])),
            "mean_dice_vs_reference": float(np.mean([r[method]["mean_dice"] for r in per_case.values()])),
        }
    return {"per_case": per_case, "summary": summary,
            "protocol": "leave-one-out over the LIDC cases; distances from hand-drawn fissure voxels to the "
                        "predicted border of the lobes they separate; Dice against the case's own fissures "
                        "extended by the same surface model (reference partition); ~2 mm working grid"}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lungs", type=Path, required=True,
                        help="lung mask (NIfTI/NRRD/MHA): 0/1 binary or 0/1 right/2 left")
    parser.add_argument("--fissures", type=Path, required=True, help="hand-drawn fissure mask on the same grid")
    parser.add_argument("--ct", type=Path, default=None, help="CT on the same grid (HU) to refine the borders")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument("--model", default=None, help="lobe prior version (default: the active one)")


def _read_ct(path: Path) -> np.ndarray:
    try:
        from covidtrack.io import load_ct  # type: ignore[attr-defined]
    except ImportError:
        load_ct = None
    if load_ct is not None:
        return np.asarray(load_ct(path).array)
    from covidtrack.segment.train_lobes import read_mask_canonical

    arr, _ = read_mask_canonical(path)
    return arr


def run(args: argparse.Namespace) -> int:
    from covidtrack.errors import InputError
    from covidtrack.segment.lobes import load_prior, lobes_from_lung_mask, split_lungs
    from covidtrack.segment.train_lobes import read_mask_canonical, named_fissure_voxels

    lungs, spacing = read_mask_canonical(args.lungs)
    fissures, fspacing = read_mask_canonical(args.fissures)
    if fissures.shape != lungs.shape or not np.allclose(fspacing, spacing, atol=1e-3):
        raise InputError(args.fissures, f"grid {fissures.shape} @ {fspacing} mm differs from the lung mask "
                         f"{lungs.shape} @ {spacing} mm", "resample the fissure mask onto the lung mask's grid")
    lungs = lungs.astype(np.uint8) if set(np.unique(lungs).tolist()) <= {0, 1, 2} else (lungs > 0).astype(np.uint8)
    if set(np.unique(lungs).tolist()) <= {0, 1}:
        lungs = split_lungs(lungs)
    ct = _read_ct(args.ct) if args.ct else None
    prior = load_prior(args.model)
    lobes = lobes_from_lung_mask(lungs, spacing, ct, prior=prior)
    named = named_fissure_voxels(lungs, fissures > 0)
    dist = fissure_distances(lobes, named, spacing)
    result = {"lungs": args.lungs.name, "fissures": args.fissures.name, "ct": args.ct.name if args.ct else None,
              "model": prior.version, "fissure_distance": dist, "mean_distance_mm": _voxel_weighted_mean(dist),
              "shares_pct": lobe_shares(lobes)}
    for name, d in dist.items():
        print(f"{name:17s} mean {d['mean_mm']:6.2f} mm   p95 {d['p95_mm']:6.2f} mm   ({d['voxels']} voxels)")
    print(f"all fissures      mean {result['mean_distance_mm']:6.2f} mm  (model {prior.version})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
