"""Five-lobe partition of a lung mask: a learned fissure shape prior, refined by CT evidence.

How it works
------------
Each lung gets a *column frame*: for every axial column ``(y, x)`` that crosses the lung,
``t = (z - z_bottom) / (z_top - z_bottom)`` is the height fraction inside that column (0 at the
diaphragm or the lowest lung voxel, 1 at the top). Every column is also placed by
``v`` (antero-posterior fraction of the lung in its sagittal slice, 0 anterior, 1 posterior) and
``w`` (lateral fraction of the lung's width, 0 at the rib cage, 1 at the mediastinum, mirrored
so both lungs share one convention).

A fissure is a surface ``t = T(v, w)``. The prior (:class:`LobePrior`, learned from hand-drawn
fissures of real lungs by :mod:`covidtrack.segment.train_lobes`) holds ``T`` on a small
``(v, w)`` grid for the right oblique, right horizontal and left oblique fissures. Lobes follow:

- right lung: ``t < T_oblique`` -> RLL; ``T_oblique <= t < T_horizontal`` -> RML; above -> RUL
  (where the horizontal surface lies below the oblique one, which the prior learns for the
  posterior lung, there is no middle lobe in that column);
- left lung: ``t < T_oblique`` -> LLL, else LUL.

Because the frame follows the lung's own diaphragm and apex, the mask alone already gives an
anatomical partition. With a CT of thin slices (at most ``MAX_FISSURE_SLICE_MM``),
:mod:`covidtrack.segment.fissures` moves each surface, column by column, to the plate-like
fissure it can see, keeping the surface smooth and falling back to the prior where the fissure
is not visible. The prior also holds the angles of real oblique fissures as planes, which
let a clearly visible oblique fissure be found as a whole first.

All heavy work happens on a working grid of about 2 mm; the fissure heights (smooth 2D maps)
are interpolated back to the lungs' own columns, so the output is on the input grid with
smooth, not blocky, borders. Finally every lobe is made one connected piece.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from covidtrack.errors import InputError, ModelError
from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG

if TYPE_CHECKING:
    from covidtrack.segment.fissures import PlaneAngles

WORK_SPACING_MM = 2.0  # working grid: fine enough for fissures, coarse enough for 2 CPU cores
MAX_FISSURE_SLICE_MM = 2.5  # thicker slices: the CT step is skipped (on the 5 mm real CT it only flattened the fissures)
SURFACES = ("right_oblique", "right_horizontal", "left_oblique")
PRIOR_FILE = "prior.npz"


# --------------------------------------------------------------------------------------------
# The learned shape prior
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LobePrior:
    """Fissure height fractions ``T(v, w)`` on a regular grid over ``[0, 1] x [0, 1]``.

    ``surfaces[name]`` is a float array of shape ``(len(v), len(w))`` with values in [0, 1]
    (fraction of the column height, unitless). ``version`` names the model (``lobes/v1``).
    """

    v: np.ndarray
    w: np.ndarray
    surfaces: dict[str, np.ndarray]
    version: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SURFACES:
            grid = self.surfaces.get(name)
            if grid is None or grid.shape != (len(self.v), len(self.w)):
                raise ModelError(f"lobe prior {self.version or '(unsaved)'}: surface '{name}' missing or mis-shaped")

    @property
    def planes(self) -> "dict[str, PlaneAngles]":
        """Angles of real oblique fissures as planes (meta ``oblique_planes``, from lobes/v2 on;
        empty for older priors, which then refine as before)."""
        from covidtrack.segment.fissures import PlaneAngles

        stats = self.meta.get("oblique_planes", {})
        return {name: PlaneAngles(float(d["rise_deg"][0]), float(d["rise_deg"][1]),
                                  float(d["lateral_deg"][0]), float(d["lateral_deg"][1]))
                for name, d in stats.items()}

    def sample(self, name: str, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Bilinear ``T(v, w)`` at arbitrary fractions (clamped to the grid)."""
        grid = self.surfaces[name]
        iv = np.clip(np.asarray(v, dtype=float), 0.0, 1.0) * (len(self.v) - 1)
        iw = np.clip(np.asarray(w, dtype=float), 0.0, 1.0) * (len(self.w) - 1)
        return ndi.map_coordinates(grid, [iv.ravel(), iw.ravel()], order=1, mode="nearest").reshape(np.shape(v))

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PRIOR_FILE
        np.savez_compressed(path, v=self.v, w=self.w, **{k: self.surfaces[k] for k in SURFACES},
                            meta=np.array(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, folder: Path, version: str = "") -> "LobePrior":
        path = folder / PRIOR_FILE
        if not path.exists():
            raise ModelError(f"{path}: lobe prior missing; retrain with `python -m covidtrack train lobes`")
        with np.load(path, allow_pickle=False) as data:
            surfaces = {k: np.asarray(data[k], dtype=float) for k in SURFACES}
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            return cls(v=np.asarray(data["v"]), w=np.asarray(data["w"]), surfaces=surfaces, version=version, meta=meta)


def load_prior(version: str | None = None) -> LobePrior:
    """The active (or the named) lobe prior from the model store."""
    from covidtrack import modelstore

    ref = modelstore.active("lobes") if version is None else modelstore.get("lobes", version)
    return LobePrior.load(ref.path, version=ref.name)


# --------------------------------------------------------------------------------------------
# Column frame of one lung
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LungFrame:
    """Per-column geometry of one lung on some grid (arrays of shape ``(ny, nx)``).

    ``z_lo`` / ``z_hi``: first / last lung voxel index along z in the column (NaN where the
    column misses the lung); ``v``: antero-posterior fraction; ``w``: lateral (0) to medial (1)
    fraction; ``columns``: where the column crosses the lung.
    """

    side: int
    z_lo: np.ndarray
    z_hi: np.ndarray
    v: np.ndarray
    w: np.ndarray
    columns: np.ndarray

    def t_of(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Height fraction of voxel indices ``(z, y, x)`` in their columns."""
        lo, hi = self.z_lo[y, x], self.z_hi[y, x]
        return (z - lo) / np.maximum(hi - lo, 1.0)

    def height(self, fraction: np.ndarray) -> np.ndarray:
        """z index (float) of a surface given as height fractions per column."""
        return self.z_lo + fraction * np.maximum(self.z_hi - self.z_lo, 1.0)


def lung_frame(mask: np.ndarray, side: int) -> LungFrame:
    """The column frame of one lung (``mask`` boolean ``(z, y, x)``)."""
    nz = mask.shape[0]
    columns = mask.any(axis=0)
    if not columns.any():
        raise ValueError("empty lung mask")
    z_lo = np.argmax(mask, axis=0).astype(float)
    z_hi = (nz - 1 - np.argmax(mask[::-1], axis=0)).astype(float)
    z_lo[~columns] = np.nan
    z_hi[~columns] = np.nan
    ny, nx = columns.shape
    ys = np.arange(ny, dtype=float)[:, None]
    xs = np.arange(nx, dtype=float)[None, :]
    # AP fraction per sagittal slice: the heart makes medial slices shorter anteriorly, so a
    # global bounding box would put medial fissures in the wrong place.
    has = columns.any(axis=0)
    y_first = np.where(has, np.argmax(columns, axis=0), 0).astype(float)
    y_last = np.where(has, ny - 1 - np.argmax(columns[::-1], axis=0), 1).astype(float)
    v = (ys - y_first[None, :]) / np.maximum(y_last - y_first, 1.0)[None, :]
    x_idx = np.nonzero(has)[0]
    x0, x1 = float(x_idx.min()), float(x_idx.max())
    w = (xs - x0) / max(x1 - x0, 1.0)
    if side == LEFT_LUNG:  # x runs right -> left: the left lung's rib cage is at large x
        w = 1.0 - w
    v = np.clip(np.broadcast_to(v, columns.shape), 0, 1)
    w = np.clip(np.broadcast_to(w, columns.shape), 0, 1)
    return LungFrame(side=side, z_lo=z_lo, z_hi=z_hi, v=v.copy(), w=w.copy(), columns=columns)


def prior_fractions(frame: LungFrame, prior: LobePrior) -> dict[str, np.ndarray]:
    """Prior height fractions of the lung's fissures per column (NaN outside the lung)."""
    names = ("right_oblique", "right_horizontal") if frame.side == RIGHT_LUNG else ("left_oblique",)
    out = {}
    for name in names:
        frac = prior.sample(name, frame.v, frame.w)
        out[name] = np.where(frame.columns, frac, np.nan)
    return out


# --------------------------------------------------------------------------------------------
# Helpers on masks
# --------------------------------------------------------------------------------------------
def split_lungs(mask: np.ndarray) -> np.ndarray:
    """Right (1) / left (2) labels for a binary lung mask in canonical orientation.

    Two large connected pieces are taken as the two lungs (the one at smaller x is the right
    lung). Lungs that touch (anterior junction line, trachea left in the mask) are split per
    axial slice at the thinnest point of the lung's x profile near the middle.
    """
    m = mask > 0
    if not m.any():
        return np.zeros(m.shape, np.uint8)
    lab, n = ndi.label(m)
    sizes = ndi.sum_labels(m, lab, index=np.arange(1, n + 1)) if n else np.array([])
    order = np.argsort(sizes)[::-1]
    out = np.zeros(m.shape, np.uint8)
    if n >= 2 and sizes[order[1]] > 0.2 * sizes[order[0]]:
        a, b = order[0] + 1, order[1] + 1
        xa = ndi.center_of_mass(m, lab, a)[2]
        xb = ndi.center_of_mass(m, lab, b)[2]
        right, left = (a, b) if xa < xb else (b, a)
        out[lab == right] = RIGHT_LUNG
        out[lab == left] = LEFT_LUNG
        rest = m & (out == 0)
        if rest.any():  # small pieces: the side of their position
            xc = (ndi.center_of_mass(m, lab, right)[2] + ndi.center_of_mass(m, lab, left)[2]) / 2
            xx = np.broadcast_to(np.arange(m.shape[2]), m.shape)
            out[rest & (xx < xc)] = RIGHT_LUNG
            out[rest & (xx >= xc)] = LEFT_LUNG
        return out
    xs = np.nonzero(m.any(axis=(0, 1)))[0]
    lo, hi = xs.min(), xs.max()
    c0, c1 = int(lo + 0.3 * (hi - lo)), int(lo + 0.7 * (hi - lo)) + 1
    cut = np.full(m.shape[0], (lo + hi) / 2.0)
    for k in range(m.shape[0]):
        prof = m[k].sum(axis=0)[c0:c1].astype(float)
        if prof.sum() > 0:
            # thinnest point; ties (a gap) -> the middle of the gap
            mins = np.nonzero(prof == prof.min())[0]
            cut[k] = c0 + mins.mean()
    cut = ndi.median_filter(cut, size=5, mode="nearest")
    xx = np.arange(m.shape[2])[None, None, :]
    right = xx < cut[:, None, None]
    out[m & right] = RIGHT_LUNG
    out[m & ~right] = LEFT_LUNG
    return out


def central_airway(lungs: np.ndarray, spacing: tuple[float, float, float], max_area_mm2: float = 600.0) -> np.ndarray:
    """Trachea / main-bronchus voxels that some lung masks include above the lungs.

    Scanning down from the top slice, a small piece of mask (under ``max_area_mm2``, a trachea
    is 2-4 cm^2) in the middle fifth of the lungs' width is airway. The scan stops at the first
    slice where no such piece exists after lung tissue was seen, so nothing inside the lungs
    is touched. Used to keep the column frame honest; those voxels are still labelled.
    """
    m = lungs > 0
    out = np.zeros(m.shape, bool)
    xs = np.nonzero(m.any(axis=(0, 1)))[0]
    if xs.size == 0:
        return out
    mid, half = (xs.min() + xs.max()) / 2.0, 0.1 * (xs.max() - xs.min())
    px_area = float(spacing[1]) * float(spacing[2])
    for k in range(m.shape[0] - 1, -1, -1):
        if not m[k].any():
            continue
        lab, n = ndi.label(m[k])
        found = False
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            piece = lab[sl] == i
            area = piece.sum() * px_area
            cx = sl[1].start + np.nonzero(piece)[1].mean()
            if area <= max_area_mm2 and abs(cx - mid) <= half:
                out[k][sl][piece] = True
                found = True
        if not found:
            break
    return out


def _fill_nan_nearest(arr: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(arr)
    if not bad.any():
        return arr
    if bad.all():
        return np.zeros_like(arr)
    idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return arr[tuple(idx)]


def _stride(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, int(round(target_mm / float(s)))) for s in spacing)  # type: ignore[return-value]


def downsample_labels(labels: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Pick the centre voxel of each ``f`` block (labels stay labels; no averaging)."""
    return np.ascontiguousarray(labels[f[0] // 2 :: f[0], f[1] // 2 :: f[1], f[2] // 2 :: f[2]])


def downsample_mean(arr: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Block mean (HU averages keep faint fissures better than picking one voxel)."""
    nz, ny, nx = (s // k for s, k in zip(arr.shape, f))
    # the centre-voxel grid has ceil(n / f) points; pad so both grids share one shape
    tz, ty, tx = (len(range(k // 2, s, k)) for s, k in zip(arr.shape, f))
    a = arr[: nz * f[0], : ny * f[1], : nx * f[2]].astype(np.float32)
    a = a.reshape(nz, f[0], ny, f[1], nx, f[2]).mean(axis=(1, 3, 5))
    return np.pad(a, ((0, tz - nz), (0, ty - ny), (0, tx - nx)), mode="edge")


# --------------------------------------------------------------------------------------------
# Labelling
# --------------------------------------------------------------------------------------------
def _label_side(lobes: np.ndarray, side_mask: np.ndarray, side: int, heights: dict[str, np.ndarray]) -> None:
    """Write lobe labels of one lung given fissure heights (z index per column, same grid)."""
    z = np.arange(side_mask.shape[0], dtype=np.float32)[:, None, None]
    if side == RIGHT_LUNG:
        obl = heights["right_oblique"][None]
        hor = np.maximum(heights["right_horizontal"], heights["right_oblique"])[None]
        lab = np.where(z < obl, np.uint8(3), np.where(z < hor, np.uint8(2), np.uint8(1)))
    else:
        lab = np.where(z < heights["left_oblique"][None], np.uint8(5), np.uint8(4))
    lobes[side_mask] = lab[side_mask]


def enforce_connectivity(lobes: np.ndarray, lungs: np.ndarray, max_rounds: int = 3) -> np.ndarray:
    """Make each lobe one connected piece (face connectivity).

    All but the largest piece of a lobe are handed to the neighbouring lobes of the same lung,
    growing those into the stray voxels one voxel layer at a time, so each stray voxel joins a
    lobe it touches. A piece of lung cut off from the rest of its lung (no neighbouring lobe to
    join) keeps its label, since no relabelling could connect it.
    """
    out = lobes.copy()
    for side_labels in ((1, 2, 3), (4, 5)):
        side = lungs == (RIGHT_LUNG if side_labels[0] == 1 else LEFT_LUNG)
        boxes = ndi.find_objects(side.astype(np.uint8))
        if not boxes or boxes[0] is None:
            continue
        sl = boxes[0]
        sub = out[sl]  # a view: fixes land in ``out``
        for _ in range(max_rounds):
            stray = np.zeros(sub.shape, bool)
            for lab in side_labels:
                comp, n = ndi.label(sub == lab)
                if n > 1:
                    keep = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
                    stray |= (comp > 0) & (comp != keep)
            if not stray.any() or not _absorb(sub, stray, side_labels):
                break
    return out


def _absorb(out: np.ndarray, stray: np.ndarray, side_labels: tuple[int, ...]) -> bool:
    """Relabel ``stray`` voxels from the touching lobes of the same lung (in place).

    Returns whether anything changed."""
    sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndi.find_objects(stray.astype(np.uint8))[0])
    sub = out[sl]
    todo = stray[sl].copy()
    work = np.where(np.isin(sub, side_labels) & ~todo, sub, 0).astype(np.uint8)
    for _ in range(max(todo.shape)):
        if not todo.any():
            break
        grown = ndi.grey_dilation(work, footprint=ndi.generate_binary_structure(3, 1))  # faces only
        take = todo & (grown > 0)
        if not take.any():
            break  # an isolated fragment: keep its own label
        work[take] = grown[take]
        todo &= ~take
    fill = stray[sl] & ~todo
    sub[fill] = work[fill]
    return bool(fill.any())


def lobes_from_heights(lungs: np.ndarray, heights: dict[str, np.ndarray]) -> np.ndarray:
    """Lobe labels from fissure heights (z index per ``(y, x)`` column, on the lungs' grid)."""
    lobes = np.zeros(lungs.shape, np.uint8)
    boxes = ndi.find_objects((lungs > 0).astype(np.uint8))
    if not boxes or boxes[0] is None:
        return lobes
    box = boxes[0]  # work inside the lungs' bounding box: half the voxels of a chest CT
    sub_lungs = lungs[box]
    sub = np.zeros(sub_lungs.shape, np.uint8)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        m = sub_lungs == side
        if m.any():
            z0 = box[0].start
            h = {k: v[box[1], box[2]] - z0 for k, v in heights.items()}
            _label_side(sub, m, side, h)
    lobes[box] = enforce_connectivity(sub, sub_lungs)
    return lobes


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def fissure_heights(
    lungs: np.ndarray,
    spacing: tuple[float, float, float],
    ct: np.ndarray | None = None,
    *,
    prior: LobePrior | None = None,
    work_spacing_mm: float = WORK_SPACING_MM,
) -> dict[str, np.ndarray]:
    """Fissure surfaces as z indices (float) per ``(y, x)`` column of the lungs' grid.

    The prior gives the heights from the mask; with ``ct`` (HU, same grid) each surface is
    moved to the plate-like fissure seen near it (:func:`covidtrack.segment.fissures.refine`).
    Slices thicker than ``MAX_FISSURE_SLICE_MM`` cannot show a fissure (a sheet under 1 mm thick
    averaged over the slice), so there the CT is not used and the prior stands.
    """
    prior = prior or load_prior()
    if ct is not None and float(spacing[0]) > MAX_FISSURE_SLICE_MM:
        ct = None
    f = _stride(spacing, work_spacing_mm)
    small = downsample_labels(lungs, f)
    ct_small = downsample_mean(ct, f) if ct is not None else None
    work_spacing = tuple(float(s) * k for s, k in zip(spacing, f))
    heights: dict[str, np.ndarray] = {}
    airway = central_airway(small, work_spacing)  # type: ignore[arg-type]
    for side in (RIGHT_LUNG, LEFT_LUNG):
        m = (small == side) & ~airway
        if not m.any():
            if (lungs == side).any():  # a sliver lost on the working grid: the prior on the full grid
                frame = lung_frame(lungs == side, side)
                heights.update({name: frame.height(frac).astype(np.float32) for name, frac in prior_fractions(frame, prior).items()})
            continue
        frame = lung_frame(m, side)
        fracs = prior_fractions(frame, prior)
        coarse = {name: frame.height(frac) for name, frac in fracs.items()}
        if ct_small is not None:
            from covidtrack.segment.fissures import refine

            coarse = refine(ct_small, m, frame, coarse, work_spacing, planes=prior.planes)  # type: ignore[arg-type]
        for name, h in coarse.items():
            heights[name] = _to_full_grid(h, f, lungs.shape)
    return heights


def _to_full_grid(h: np.ndarray, f: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Coarse z-index heights per coarse column -> full z index per full column (bilinear)."""
    h_full_units = _fill_nan_nearest(h) * f[0] + f[0] // 2
    ny, nx = shape[1], shape[2]
    yy = (np.arange(ny, dtype=float) - f[1] // 2) / f[1]
    xx = (np.arange(nx, dtype=float) - f[2] // 2) / f[2]
    gy, gx = np.meshgrid(yy, xx, indexing="ij")
    return ndi.map_coordinates(h_full_units, [gy, gx], order=1, mode="nearest").astype(np.float32)


def lobes_from_lung_mask(
    lungs: np.ndarray,
    spacing: tuple[float, float, float],
    ct: np.ndarray | None = None,
    *,
    prior: LobePrior | None = None,
    work_spacing_mm: float = WORK_SPACING_MM,
    split_binary: bool = False,
) -> np.ndarray:
    """Five-lobe partition of a lung mask (uint8: 1 RUL, 2 RML, 3 RLL, 4 LUL, 5 LLL).

    ``lungs``: uint8 ``(z, y, x)`` in canonical orientation, 0 background, 1 right, 2 left, as in
    ``Segmentation.lungs`` (so a mask holding only 1 is a right lung alone). With
    ``split_binary=True`` a 0/1 mask of both lungs is split into right and left first
    (:func:`split_lungs`). ``spacing``: ``(z, y, x)`` in mm.
    ``ct``: optional HU array on the same grid; where given (and slices are at most
    ``MAX_FISSURE_SLICE_MM`` thick), visible fissures move the borders.
    Every lung voxel gets exactly one lobe, right-lung voxels 1-3 and left-lung voxels 4-5.
    """
    lungs = np.asarray(lungs)
    if lungs.ndim != 3:
        raise InputError("lung mask", f"expected a 3D (z, y, x) mask, got shape {lungs.shape}",
                         "pass Segmentation.lungs or a 3D mask array")
    if ct is not None and ct.shape != lungs.shape:
        raise InputError("CT", f"shape {ct.shape} differs from the lung mask {lungs.shape}",
                         "pass the CT the lung mask was made from (same canonical grid)")
    values = np.unique(lungs)
    if not set(values.tolist()) <= {0, 1, 2}:
        raise InputError("lung mask", f"unexpected labels {values.tolist()}",
                         "use 0 background, 1 right lung, 2 left lung")
    if not (lungs > 0).any():
        return np.zeros(lungs.shape, np.uint8)
    lungs = lungs.astype(np.uint8)
    if split_binary and set(values.tolist()) <= {0, 1}:
        lungs = split_lungs(lungs)
    heights = fissure_heights(lungs, spacing, ct, prior=prior, work_spacing_mm=work_spacing_mm)
    return lobes_from_heights(lungs, heights)
