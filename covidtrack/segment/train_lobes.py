"""``python -m covidtrack train lobes``: learn the fissure shape prior from real fissure masks.

Input: folders holding a filled lung mask and a hand-drawn fissure mask of the same grid
(the LIDC layout: ``<case>/pleuralBoundary.nii.gz`` + ``<case>/fissures.nii.gz``; fissures are
partial surfaces, all fissures share one label).

For each case, on a ~2 mm grid:

1. split the lung mask into right and left, build each lung's column frame
   (:func:`covidtrack.segment.lobes.lung_frame`);
2. cut the fissure voxels of every column into runs along z; each run is one crossing of a
   fissure at height fraction ``t``, placed at ``(v, w)``;
3. name the crossings: left lung -> left oblique; right lung: where a column crosses two
   fissures the lower is the oblique and the upper the horizontal fissure; single crossings
   posterior to the fissure junction of their sagittal slice are oblique; the rest go to the
   surface (fitted from the named ones) they lie closer to;
4. behind the junction there is no middle lobe: the horizontal surface gets pseudo-points on
   the oblique one there, so the learned prior merges the two instead of inventing a middle
   lobe in the back of the lung.

The prior is a kernel regression of ``t`` over ``(v, w)`` per fissure, pooling the cases with
equal weight per case; a wide kernel fills what no case has drawn (fissures are partial).

From lobes/v2 on the prior also holds each oblique fissure's angles as a plane (mean and
spread over the cases, :func:`plane_statistics`), the range in which a CT's plane start looks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidtrack.config import REPO_ROOT
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG
from covidtrack.segment.lobes import (
    SURFACES,
    LobePrior,
    LungFrame,
    central_airway,
    downsample_labels,
    lung_frame,
    split_lungs,
)

GRID_V, GRID_W = 21, 11
FINE_BW = (0.05, 0.08)  # kernel widths in (v, w) fractions where fissures are drawn
COARSE_BW = (0.20, 0.30)  # fallback where they are not
FILL_WEIGHT = 2.0  # per-case point mass below which the wide kernel takes over
TRAIN_SPACING_MM = 2.0
PLANE_SPREAD_FLOOR_DEG = {"rise_deg": 10.0, "lateral_deg": 20.0}  # three cases cannot estimate a spread


@dataclass(frozen=True)
class FissurePoints:
    """Crossings of one fissure: fractions ``v``, ``w``, ``t`` and a weight each (unitless)."""

    v: np.ndarray
    w: np.ndarray
    t: np.ndarray
    weight: np.ndarray

    @staticmethod
    def empty() -> "FissurePoints":
        z = np.zeros(0)
        return FissurePoints(z, z, z, z)

    def __len__(self) -> int:
        return int(self.t.size)

    def concat(self, other: "FissurePoints") -> "FissurePoints":
        return FissurePoints(*(np.concatenate([getattr(self, k), getattr(other, k)]) for k in ("v", "w", "t", "weight")))


@dataclass(frozen=True)
class CaseData:
    """One training case on the working grid."""

    name: str
    lungs: np.ndarray  # uint8 0/1/2
    fissures: np.ndarray  # bool
    spacing: tuple[float, float, float]  # (z, y, x) mm of the working grid


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_mask_canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A mask file as a canonical ``(z, y, x)`` array and its ``(z, y, x)`` spacing (mm).

    Uses covidtrack.io's lossless axis permutation / flip, so the mask lands on the same
    canonical grid as a CT loaded from the same geometry by :func:`covidtrack.io.load_ct`.
    """
    import SimpleITK as sitk

    from covidtrack.errors import UnreadableFileError
    from covidtrack.io import orient
    from covidtrack.io.files import source_grid

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise UnreadableFileError(path, f"SimpleITK cannot read it ({err})", "pass a NIfTI, NRRD or MHA mask") from err
    grid = source_grid(img)
    arr = np.ascontiguousarray(orient.to_canonical(sitk.GetArrayFromImage(img), grid))
    spacing = orient.canonical_geometry(grid).spacing[::-1]
    return arr, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def max_pool(arr: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Block maximum aligned with :func:`downsample_labels` (thin fissures must survive)."""
    from scipy import ndimage as ndi

    pooled = ndi.maximum_filter(arr.astype(np.uint8), size=f, mode="constant")
    return downsample_labels(pooled, f) > 0


def load_case(folder: Path, spacing_mm: float = TRAIN_SPACING_MM) -> CaseData:
    """Read an LIDC-layout case and bring it to a ~``spacing_mm`` grid."""
    lung, sp = read_mask_canonical(folder / "pleuralBoundary.nii.gz")
    fis, _ = read_mask_canonical(folder / "fissures.nii.gz")
    f = tuple(max(1, int(round(spacing_mm / s))) for s in sp)
    small = downsample_labels(lung > 0, f).astype(np.uint8)  # type: ignore[arg-type]
    work = tuple(s * k for s, k in zip(sp, f))
    # trachea (included in some masks) would stretch the column frame: drop it for training
    small[central_airway(small, work)] = 0  # type: ignore[arg-type]
    lungs = split_lungs(small)
    fissures = max_pool(fis > 0, f)  # type: ignore[arg-type]
    return CaseData(folder.name, lungs, fissures & (ndi.binary_dilation(lungs > 0)), work)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Fissure crossings per column
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crossings:
    """Runs of fissure voxels along z, per column of one lung.

    Per run: ``y``, ``x`` (column), ``z`` (centre, voxel index), ``rank`` (0 = lowest run of its
    column) and ``count`` (runs in that column). ``voxels`` (z, y, x index arrays) and
    ``run_of_voxel`` say which run each fissure voxel belongs to.
    """

    y: np.ndarray
    x: np.ndarray
    z: np.ndarray
    rank: np.ndarray
    count: np.ndarray
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray]
    run_of_voxel: np.ndarray


def column_crossings(fissures: np.ndarray, frame: LungFrame, lung: np.ndarray, gap: int = 2) -> Crossings:
    """Cut the fissure voxels of one lung into runs along z (``gap`` in voxels).

    Fissure voxels count when they lie in the lung or touch it (drawn fissures often sit on
    the pleura), never when they belong to the other lung sharing a column.
    """
    from scipy import ndimage as ndi

    near = ndi.binary_dilation(lung) & frame.columns[None]
    zz, yy, xx = np.nonzero(fissures & near)
    if zz.size == 0:
        e = np.zeros(0, int)
        return Crossings(e, e, e.astype(float), e, e, (e, e, e), e)
    order = np.lexsort((zz, xx, yy))
    zz, yy, xx = zz[order], yy[order], xx[order]
    new_col = np.r_[True, (yy[1:] != yy[:-1]) | (xx[1:] != xx[:-1])]
    new_run = new_col | np.r_[True, (zz[1:] - zz[:-1]) > gap]
    run = np.cumsum(new_run) - 1
    col = np.cumsum(new_col) - 1
    n = int(run[-1]) + 1
    z_c = np.bincount(run, weights=zz) / np.bincount(run)
    first = np.nonzero(new_run)[0]
    r_y, r_x, r_col = yy[first], xx[first], col[first]
    col_first_run = np.nonzero(np.r_[True, r_col[1:] != r_col[:-1]])[0]
    rank = np.arange(n) - np.repeat(col_first_run, np.diff(np.r_[col_first_run, n]))
    count = np.bincount(r_col)[r_col]
    return Crossings(r_y, r_x, z_c, rank, count, (zz, yy, xx), run)


def name_right_runs(frame: LungFrame, c: Crossings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which runs of the right lung are oblique / horizontal, and which lie behind the junction.

    Where a column crosses two fissures the lower is the oblique and the upper the horizontal
    fissure. A single crossing posterior to the junction of its sagittal slice (the most
    posterior double crossing) is oblique. The rest go to the surface, fitted from the named
    runs, that they lie closer to.
    """
    two = c.count >= 2
    obl = two & (c.rank == 0)
    hor = two & (c.rank == c.count - 1)
    single = c.count == 1
    nx = frame.columns.shape[1]
    y_junction = np.full(nx, -1.0)
    for xi in np.unique(c.x[two]):
        y_junction[xi] = c.y[two & (c.x == xi)].max()
    known = y_junction >= 0
    if known.any():  # slices without a double crossing borrow the nearest slice's junction
        idx = np.arange(nx)
        y_junction = np.interp(idx, idx[known], y_junction[known])
        posterior = single & (c.y > y_junction[c.x] + 1)
    else:
        posterior = single.copy()
    obl = obl | posterior
    undecided = single & ~posterior
    if undecided.any() and hor.any() and obl.any():
        grid_v, grid_w = np.linspace(0, 1, GRID_V), np.linspace(0, 1, GRID_W)
        fit_o = kernel_fit(_points(frame, c.y[obl], c.x[obl], c.z[obl], 1.0), grid_v, grid_w)
        fit_h = kernel_fit(_points(frame, c.y[hor], c.x[hor], c.z[hor], 1.0), grid_v, grid_w)
        fits = LobePrior(grid_v, grid_w, {"right_oblique": fit_o, "right_horizontal": fit_h,
                                          "left_oblique": np.zeros_like(fit_o)})
        pu = _points(frame, c.y[undecided], c.x[undecided], c.z[undecided], 1.0)
        d_o = np.abs(pu.t - fits.sample("right_oblique", pu.v, pu.w))
        d_h = np.abs(pu.t - fits.sample("right_horizontal", pu.v, pu.w))
        to_hor = np.zeros_like(undecided)
        to_hor[np.nonzero(undecided)[0]] = d_h < d_o
        hor = hor | to_hor
        obl = obl | (undecided & ~to_hor)
    else:
        obl = obl | undecided
    return obl, hor, posterior


def named_fissure_voxels(lungs: np.ndarray, fissures: np.ndarray) -> dict[str, tuple[np.ndarray, ...]]:
    """Fissure voxels (z, y, x index arrays) per named fissure, for evaluation."""
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for side in (RIGHT_LUNG, LEFT_LUNG):
        m = lungs == side
        if not m.any():
            continue
        frame = lung_frame(m, side)
        c = column_crossings(fissures, frame, m)
        if c.run_of_voxel.size == 0:
            continue
        if side == LEFT_LUNG:
            out["left_oblique"] = c.voxels
            continue
        obl, hor, _ = name_right_runs(frame, c)
        for name, sel in (("right_oblique", obl), ("right_horizontal", hor)):
            keep = sel[c.run_of_voxel]
            if keep.any():
                out[name] = tuple(a[keep] for a in c.voxels)
    return out


def kernel_fit(points: FissurePoints, v_grid: np.ndarray, w_grid: np.ndarray) -> np.ndarray:
    """Kernel regression of ``t`` on the ``(v, w)`` grid: fine kernel, wide kernel as fallback."""
    if len(points) == 0:
        raise ValueError("no fissure points to fit")
    gv, gw = np.meshgrid(v_grid, w_grid, indexing="ij")

    def smooth(bw: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        k = np.exp(
            -0.5 * ((gv.ravel()[:, None] - points.v[None]) / bw[0]) ** 2
            - 0.5 * ((gw.ravel()[:, None] - points.w[None]) / bw[1]) ** 2
        ) * points.weight[None]
        wsum = k.sum(axis=1)
        return (k @ points.t) / np.maximum(wsum, 1e-12), wsum

    fine, wf = smooth(FINE_BW)
    coarse, _ = smooth(COARSE_BW)
    blended = (fine * wf + coarse * FILL_WEIGHT) / (wf + FILL_WEIGHT)
    return np.clip(blended, 0.0, 1.0).reshape(gv.shape)


def _points(frame: LungFrame, y: np.ndarray, x: np.ndarray, z: np.ndarray, weight: float) -> FissurePoints:
    t = frame.t_of(z, y, x)
    return FissurePoints(frame.v[y, x], frame.w[y, x], t, np.full(t.size, weight))


def case_points(case: CaseData) -> dict[str, FissurePoints]:
    """Named fissure crossings of one case (weights sum to 1000 per case and fissure)."""
    out: dict[str, FissurePoints] = {}
    # left lung: every crossing is the oblique fissure; a second crossing in a column is noise
    # or an accessory fissure, so keep the lowest run only.
    left = lung_frame(case.lungs == LEFT_LUNG, LEFT_LUNG)
    c = column_crossings(case.fissures, left, case.lungs == LEFT_LUNG)
    keep = c.rank == 0
    out["left_oblique"] = _points(left, c.y[keep], c.x[keep], c.z[keep], 1.0)

    right = lung_frame(case.lungs == RIGHT_LUNG, RIGHT_LUNG)
    c = column_crossings(case.fissures, right, case.lungs == RIGHT_LUNG)
    obl, hor, posterior = name_right_runs(right, c)
    out["right_oblique"] = _points(right, c.y[obl], c.x[obl], c.z[obl], 1.0)
    p_hor = _points(right, c.y[hor], c.x[hor], c.z[hor], 1.0)
    # no middle lobe behind the junction: the horizontal surface lies on the oblique one there
    behind = _points(right, c.y[posterior], c.x[posterior], c.z[posterior], 1.0)
    out["right_horizontal"] = p_hor.concat(behind)
    for name, pts in out.items():
        if len(pts):
            out[name] = FissurePoints(pts.v, pts.w, pts.t, pts.weight * (1000.0 / pts.weight.sum()))
    return out


def oblique_plane_angles(case: CaseData) -> dict[str, dict[str, float]]:
    """Each oblique fissure of a case as a least-squares plane ``z = a + y tan(rise) + x tan(lateral)``
    through its drawn crossings (mm, canonical grid): the two angles in degrees and the RMS
    distance (mm, along z) of the drawing from the plane."""
    sz, sy, sx = case.spacing
    out = {}
    for side, name in ((RIGHT_LUNG, "right_oblique"), (LEFT_LUNG, "left_oblique")):
        m = case.lungs == side
        if not m.any():
            continue
        frame = lung_frame(m, side)
        c = column_crossings(case.fissures, frame, m)
        keep = (c.rank == 0) if side == LEFT_LUNG else name_right_runs(frame, c)[0]
        if keep.sum() < 20:
            continue
        z, y, x = c.z[keep] * sz, c.y[keep] * sy, c.x[keep] * sx
        design = np.stack([np.ones_like(y), y - y.mean(), x - x.mean()], axis=1)
        coef = np.linalg.lstsq(design, z, rcond=None)[0]
        out[name] = {"rise_deg": float(np.degrees(np.arctan(coef[1]))),
                     "lateral_deg": float(np.degrees(np.arctan(coef[2]))),
                     "rms_mm": float(np.sqrt(np.mean((design @ coef - z) ** 2)))}
    return out


def plane_statistics(per_case: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Mean and spread (standard deviation, floored by ``PLANE_SPREAD_FLOOR_DEG``) of each
    oblique fissure's plane angles over the cases: ``{name: {"rise_deg": [mean, spread], ...}}``."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in ("right_oblique", "left_oblique"):
        rows = [c[name] for c in per_case if name in c]
        if not rows:
            continue
        out[name] = {}
        for key, floor in PLANE_SPREAD_FLOOR_DEG.items():
            vals = np.array([r[key] for r in rows])
            spread = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
            out[name][key] = [round(float(vals.mean()), 2), round(max(spread, floor), 2)]
    return out


def fit_prior(point_sets: list[dict[str, FissurePoints]], version: str = "", meta: dict | None = None) -> LobePrior:
    """Pool the cases' points (equal weight per case) and fit every fissure surface."""
    grid_v, grid_w = np.linspace(0, 1, GRID_V), np.linspace(0, 1, GRID_W)
    surfaces = {}
    for name in SURFACES:
        pooled = FissurePoints.empty()
        for pts in point_sets:
            if name in pts and len(pts[name]):
                pooled = pooled.concat(pts[name])
        surfaces[name] = kernel_fit(pooled, grid_v, grid_w)
    return LobePrior(grid_v, grid_w, surfaces, version=version, meta=meta or {})


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def default_data_dir() -> Path:
    return REPO_ROOT.parent / "shared" / "data" / "masks" / "lidc_lung_fissure_masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of cases, each with pleuralBoundary.nii.gz + fissures.nii.gz "
                             "(default: ../shared/data/masks/lidc_lung_fissure_masks beside the repo)")
    parser.add_argument("--out", type=Path, default=None,
                        help="version folder to write (default: next version under $COVIDTRACK_HOME/models/lobes)")
    parser.add_argument("--version", default=None, help="version name, e.g. v1 (default: next free)")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def model_card_markdown(card: dict) -> str:
    """Human-readable model card from ``card.json``."""
    val = card["validation"]
    lines = [
        f"# Lobe shape prior {card['task']}/{card['version']}",
        "",
        "What: a shape prior for the three lobar fissures (right oblique, right horizontal, left oblique).",
        "Each fissure is stored as its height fraction inside every axial column of the lung, as a function of",
        "the column's antero-posterior fraction (per sagittal slice) and lateral fraction (rib cage -> mediastinum),",
        "on a 21 x 11 grid (`prior.npz`). `covidtrack.segment.lobes` turns it into a five-lobe partition of any",
        "lung mask and refines it with CT fissure evidence where a CT is given.",
        "",
        f"Data: {card['data']['source']}; cases {', '.join(card['data']['cases'])} (full-resolution lung masks",
        "with hand-drawn, partial fissure surfaces; the CTs are not available). Trachea removed from the masks",
        "before fitting; masks brought to a ~2 mm grid.",
        f"Split: {card['split']}. Augmentation: {card['augmentation']}. Epochs: none (kernel regression).",
        f"Wall time: {card['wall_time_s']} s including the leave-one-out study, on {card['hardware']['processor']}",
        f"({card['hardware']['cpu_count']} CPUs, {card['hardware']['note']}). Code commit {card['code_commit']}, {card['date']}.",
        "",
        "## Leave-one-out validation (prior fitted on the two other cases, lung mask only, no CT)",
        "",
        "| case | method | mean fissure distance (mm) | per fissure mean / p95 (mm) | mean lobe Dice vs reference |",
        "|---|---|---|---|---|",
    ]
    for case, res in val["per_case"].items():
        for method in ("prior", "naive_height"):
            r = res[method]
            per = "; ".join(f"{k.replace('_', ' ')} {v['mean_mm']:.1f} / {v['p95_mm']:.1f}"
                            for k, v in r["fissure_distance"].items())
            lines.append(f"| {case} | {method} | {r['mean_distance_mm']:.1f} | {per} | {r['mean_dice']:.3f} |")
    s = val["summary"]
    lines += [
        "",
        f"Mean over cases: prior {s['prior']['mean_distance_mm']:.1f} mm (p95 {s['prior']['mean_p95_mm']:.1f} mm), "
        f"Dice {s['prior']['mean_dice_vs_reference']:.3f}; naive height split {s['naive_height']['mean_distance_mm']:.1f} mm, "
        f"Dice {s['naive_height']['mean_dice_vs_reference']:.3f}.",
        "",
        "Reference partition: the case's lung cut by its own hand-drawn fissures, extended where they are partial",
        "by the same surface model fitted to that case alone (so Dice measures the prior, not the surface model).",
        "Distances: from every hand-drawn fissure voxel to the nearest predicted border between the two lobes that",
        "fissure separates; which drawn voxel belongs to which fissure is decided from the drawing alone.",
        "",
        "## Oblique fissure planes (for the CT's plane start)",
        "",
        "Each drawn oblique fissure fitted by a plane z = a + y tan(rise) + x tan(lateral) (canonical grid: y",
        "anterior -> posterior, x right -> left); with a thin-slice CT, `covidtrack.segment.fissures.plane_start`",
        "searches planes within mean +- 2 spreads of these angles (spreads floored: "
        + ", ".join(f"{k.replace('_deg', '')} {v:.0f} deg" for k, v in PLANE_SPREAD_FLOOR_DEG.items()) + ").",
        "",
        "| case | fissure | rise (deg) | lateral (deg) | RMS of the drawing about its plane (mm) |",
        "|---|---|---|---|---|",
    ]
    for case, fits in card.get("oblique_planes_per_case", {}).items():
        for name, f in fits.items():
            lines.append(f"| {case} | {name.replace('_', ' ')} | {f['rise_deg']:.1f} | {f['lateral_deg']:.1f} | {f['rms_mm']:.1f} |")
    for name, st in card.get("oblique_planes", {}).items():
        lines.append(f"| mean (spread) | {name.replace('_', ' ')} | {st['rise_deg'][0]:.1f} ({st['rise_deg'][1]:.1f}) "
                     f"| {st['lateral_deg'][0]:.1f} ({st['lateral_deg'][1]:.1f}) | |")
    lines += [
        "",
        "Limits: three training cases (one has its apex cut off by the scan), so the prior carries a per-patient",
        "height bias of roughly 0.1 of the column height; the middle lobe is the least certain lobe.",
        "Licence of the training data: CC BY-NC-SA 4.0 + TCIA terms (non-commercial).",
    ]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from covidtrack import modelstore
    from covidtrack.config import settings
    from covidtrack.errors import InputError
    from covidtrack.segment.eval_fissures import leave_one_out

    data = args.data or default_data_dir()
    cases = sorted(p for p in data.iterdir() if (p / "fissures.nii.gz").exists()) if data.is_dir() else []
    if not cases:
        raise InputError(data, "no case folder with pleuralBoundary.nii.gz + fissures.nii.gz",
                         "pass --data pointing at the LIDC fissure-mask folders")
    version = modelstore.check_new_version("lobes", args.version) if args.version else modelstore.next_version("lobes")
    out = args.out or (settings().models_dir / "lobes" / version)
    if (out / "card.json").exists():
        raise InputError(out, "version folder exists and versions are immutable", "choose another --version or --out")
    t0 = time.time()
    loaded = [load_case(c) for c in cases]
    points = [case_points(c) for c in loaded]
    planes = [oblique_plane_angles(c) for c in loaded]
    prior = fit_prior(points, version=f"lobes/{version}",
                      meta={"cases": [c.name for c in loaded], "grid": [GRID_V, GRID_W],
                            "oblique_planes": plane_statistics(planes),
                            "oblique_planes_per_case": {c.name: p for c, p in zip(loaded, planes)}})
    train_s = time.time() - t0
    print(f"fitted prior on {len(loaded)} cases in {train_s:.1f} s; leave-one-out evaluation ...")
    loo = leave_one_out(loaded, points)
    prior.save(out)
    card = {
        "task": "lobes",
        "version": version,
        "kind": "fissure shape prior (kernel regression of fissure height fraction over lung-normalised AP x lateral position) "
                "+ the angles of the oblique fissures as planes",
        "files": ["prior.npz"],
        "data": {"cases": [c.name for c in loaded], "source": "LIDC-IDRI lung + hand-drawn fissure masks "
                 "(UNC-Robotics/Med-MPD @ 6ae6237, CC BY-NC-SA 4.0 + TCIA terms)",
                 "working_spacing_mm": [list(c.spacing) for c in loaded]},
        "split": "all cases for the shipped prior; leave-one-out for the reported metrics",
        "augmentation": "none",
        "epochs": 0,
        "hyperparameters": {"grid": [GRID_V, GRID_W], "fine_bandwidth": FINE_BW, "coarse_bandwidth": COARSE_BW,
                            "fill_weight": FILL_WEIGHT, "train_spacing_mm": TRAIN_SPACING_MM},
        "wall_time_s": round(time.time() - t0, 1),
        "hardware": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "note": "2 CPU cores"},
        "validation": loo,
        "oblique_planes": prior.meta["oblique_planes"],
        "oblique_planes_per_case": prior.meta["oblique_planes_per_case"],
        "code_commit": _git_commit(),
        "date": dt.date.today().isoformat(),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2))
    (out / "MODEL_CARD.md").write_text(model_card_markdown(card))
    print(json.dumps(loo["summary"], indent=2))
    print(f"wrote {out}")
    return 0
