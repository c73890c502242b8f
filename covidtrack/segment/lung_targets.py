"""Classical lung extraction, used only to build TRAINING targets for the lung network.

Threshold lungs in HU, remove trachea and main bronchi by explosion-controlled region growing,
split right from left (also when the lungs touch at the anterior / posterior junction line) and
fill holes (vessels, intrapulmonary airways). It fails where every HU-threshold method fails:
dense consolidation and effusion-adjacent opacity at the pleura are left out, which is why the
training code inserts such opacities into the CT while keeping this mask as the target.

Product code never calls this module at run time; the network in :mod:`covidtrack.segment.lungs`
does the work there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from covidtrack.labels import LEFT_LUNG, RIGHT_LUNG
from covidtrack.volume import Volume

AIR_HU = -400.0  # lung parenchyma is about -850 HU, soft tissue about +40 HU
BODY_HU = -500.0


@dataclass(frozen=True)
class TargetReport:
    """What the extraction found, for the training log and the model card."""

    airway_threshold_hu: float | None  # None: no trachea seed found, nothing removed
    airway_ml: float
    split: str  # "components" (lungs already separate) or "erosion" (touching lungs cut)
    right_ml: float
    left_ml: float


def body_mask(hu: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Patient body (no table, no outside air): largest component above -500 HU, holes filled per slice."""
    mask = hu > BODY_HU
    # an in-plane opening of ~2 mm detaches the thin table and blanket; on coarse grids (> 2 mm
    # pixels) it would break the thin abdominal wall and the per-slice fill would then miss the lungs
    steps = int(round(2.0 / min(spacing[1], spacing[2])))
    if steps > 0:
        cross2d = ndi.generate_binary_structure(3, 1)
        cross2d[0] = cross2d[2] = False
        mask = ndi.binary_opening(mask, structure=cross2d, iterations=steps)
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (int(np.argmax(sizes)) + 1)
    return _fill_holes_per_slice(mask)


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k])
    return out


def _find_trachea_seed(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]) -> tuple[int, int, int] | None:
    """A voxel inside the trachea: a small round air island near the body midline, high in the scan.

    The scan's top slices show the trachea alone in the neck / upper mediastinum (z index grows
    towards the head). We scan downwards from the top and take the first slice with a 1.0-7 cm^2
    air island within 30 mm of the body's left-right centre.
    """
    sz, sy, sx = spacing
    px_area_cm2 = sy * sx / 100.0
    zs = np.nonzero(body.any(axis=(1, 2)))[0]
    if zs.size == 0:
        return None
    for k in range(int(zs.max()), int(zs.min()) + int(0.3 * (zs.max() - zs.min())), -1):
        inside = body[k] & (hu[k] < -900)
        if not inside.any():
            continue
        xs = np.nonzero(body[k].any(axis=0))[0]
        mid_x = 0.5 * (xs.min() + xs.max())
        lab, n = ndi.label(inside)
        for idx in range(1, n + 1):
            comp = lab == idx
            area = comp.sum() * px_area_cm2
            if not 1.0 <= area <= 7.0:
                continue
            cy, cx = ndi.center_of_mass(comp)
            if abs(cx - mid_x) * sx <= 30.0:
                # the darkest voxel: surely lumen, so region growing at any threshold includes it
                flat = np.where(comp, hu[k], np.inf).argmin()
                iy, ix = np.unravel_index(flat, comp.shape)
                return (k, int(iy), int(ix))
    return None


def airway_mask(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, float | None]:
    """Trachea + bronchi by region growing from a trachea seed, lowering the threshold on leaks.

    Airway lumen is about -1000 HU; parenchyma is -950..-750 HU (lower in emphysema). Growing at
    -900 HU (lightly smoothed) leaks into the lungs on some scans, detected as an "explosion" (> 250 mL), so the
    threshold steps down until the grown volume stays plausible.
    """
    # noisy low-dose lumen spreads -1020..-880 HU; a ~1 mm Gaussian keeps the trachea in one piece
    smooth = ndi.gaussian_filter(hu, sigma=[min(1.0, 1.0 / s) for s in spacing])
    seed = _find_trachea_seed(smooth, body, spacing)
    empty = np.zeros(hu.shape, dtype=bool)
    if seed is None:
        return empty, None
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for thr in (-900.0, -920.0, -940.0, -960.0, -980.0, -1000.0):
        grown = (smooth < thr) & body
        if not grown[seed]:
            continue
        lab, _ = ndi.label(grown)
        comp = lab == lab[seed]
        if comp.sum() * voxel_ml < 250.0:
            # 1-voxel margin: partial-volume wall voxels would otherwise stay in the lung mask
            return ndi.binary_dilation(comp, iterations=1), thr
    return empty, None


def _split_touching(mask: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, str]:
    """Label 1 / 2 by side. Separate lungs: by component; touching lungs: erode until two, then watershed."""
    from skimage.segmentation import watershed

    lab, n = ndi.label(mask)
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1)) if n else np.array([])
    order = np.argsort(sizes)[::-1]
    how = "components"
    if n >= 2 and sizes[order[1]] > 0.2 * sizes[order[0]]:
        markers = np.zeros(mask.shape, dtype=np.int32)
        markers[lab == order[0] + 1] = 1
        markers[lab == order[1] + 1] = 2
    else:
        how = "erosion"
        markers = np.zeros(mask.shape, dtype=np.int32)
        eroded = mask.copy()
        for _ in range(15):  # the junction line is a few voxels thick; 15 steps is plenty
            eroded = ndi.binary_erosion(eroded)
            elab, en = ndi.label(eroded)
            if en >= 2:
                esz = ndi.sum_labels(eroded, elab, index=np.arange(1, en + 1))
                eo = np.argsort(esz)[::-1]
                if esz[eo[1]] > 0.2 * esz[eo[0]]:
                    markers[elab == eo[0] + 1] = 1
                    markers[elab == eo[1] + 1] = 2
                    break
        else:
            # one lung only (or inseparable): the side follows the body midline x
            xs = np.nonzero(mask.any(axis=(0, 1)))[0]
            mid = (xs.min() + xs.max()) // 2 if xs.size else mask.shape[2] // 2
            out = np.zeros(mask.shape, dtype=np.uint8)
            out[mask] = RIGHT_LUNG
            out[:, :, mid:][mask[:, :, mid:]] = LEFT_LUNG
            return out, "midline"
    # dense junction tissue is a ridge in HU, so watershed cuts along it
    ws = watershed(hu.astype(np.float32), markers=markers, mask=mask)
    out = np.zeros(mask.shape, dtype=np.uint8)
    cx = [ndi.center_of_mass(ws == i)[2] for i in (1, 2)]
    right_id = 1 if cx[0] < cx[1] else 2  # canonical x runs patient right -> left
    out[ws == right_id] = RIGHT_LUNG
    out[(ws > 0) & (ws != right_id)] = LEFT_LUNG
    return out, how


def _keep_big_components(mask: np.ndarray, min_fraction: float = 0.05) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = ndi.sum_labels(mask, lab, index=np.arange(1, n + 1))
    keep = np.nonzero(sizes >= min_fraction * sizes.max())[0] + 1
    return np.isin(lab, keep)


def extract_lungs(volume: Volume) -> tuple[np.ndarray, TargetReport]:
    """Right (1) / left (2) lung mask (uint8, on the volume's grid) from HU thresholds.

    Steps: body mask; air (< -400 HU) inside the body; airway removal; keep the big air
    components (drops bowel gas, oesophagus); side split; per side 3D + per-slice hole filling
    and a 1-voxel closing so vessels and bronchi inside the lung count as lung.
    """
    hu = volume.array.astype(np.float32)
    spacing = volume.spacing
    body = body_mask(hu, spacing)
    air = body & (hu < AIR_HU)
    # the body mask's rim can include air outside the skin folds: drop air touching the body edge
    air &= ndi.binary_erosion(body, iterations=2)
    airway, thr = airway_mask(hu, body, spacing)
    lungs = air & ~airway
    lungs = ndi.binary_opening(lungs, iterations=1)  # cuts thin bridges left by the airway margin
    # keep the two biggest plausible pieces: first the big components overall
    lungs = _keep_big_components(lungs, 0.1)
    sides, how = _split_touching(lungs, hu, spacing)
    out = np.zeros_like(sides)
    for side in (RIGHT_LUNG, LEFT_LUNG):
        m = sides == side
        if not m.any():
            continue
        m = _keep_big_components(m, 0.5)
        m = ndi.binary_closing(m, iterations=2) | m
        m = ndi.binary_fill_holes(m)
        m = _fill_holes_per_slice(m)
        out[m & (out == 0)] = side
    voxel_ml = volume.voxel_volume_ml
    report = TargetReport(
        airway_threshold_hu=thr,
        airway_ml=float(airway.sum() * voxel_ml),
        split=how,
        right_ml=float((out == RIGHT_LUNG).sum() * voxel_ml),
        left_ml=float((out == LEFT_LUNG).sum() * voxel_ml),
    )
    return out, report


def read_training_ct(path: Path) -> Volume:
    """Read a real CT (DICOM folder or image file) onto the canonical grid, for training only.

    Uses :func:`covidtrack.io.load_ct` when the io package provides it (the product's reader);
    otherwise a minimal SimpleITK read, reoriented to LPS identity (canonical, see volume.py).
    """
    try:
        from covidtrack.io import load_ct  # type: ignore[attr-defined]
    except ImportError:
        load_ct = None
    if load_ct is not None:
        return load_ct(path)
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    img = sitk.DICOMOrient(img, "LPS")
    return Volume.from_canonical_sitk(img)
