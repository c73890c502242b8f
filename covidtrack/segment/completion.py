"""Lung completion: dense infection at the lung border joins the lung mask.

The lung model learns from few scans and still leaves out part of a dense consolidation that
abuts the chest wall, the spine or the mediastinum (lungs/v3 kept 13-22 % of the
paravertebral consolidation). Left out, that consolidation is missing from both the lung volume
and the infection volume, so the percentage of infection is underestimated exactly in the
sickest scans. Threshold-based lung masks fail the same way.

:func:`complete_lungs` lets the infection model look a little beyond the lung border: within
``REACH_MM`` (in-plane) of the lungs, voxels that the infection model labels as infection, that
are dense (HU above ``MIN_HU``: consolidation or effusion-adjacent opacity, not the air of the
lung edge) and that form components touching the lung are added to the lung mask, each on the
side of the lung it touches. The infection labels of the wider region are returned with them,
so the added voxels count as infection too.

Measured with lungs/v3 + infection/v3 on sick phantoms 2000 and 2002: missed infection
95 -> 38 mL and 137 -> 63 mL, 13 and 9 mL added outside the true lung; nothing added on a healthy
phantom; 10.8, 0.3 and 0.7 mL added on the three healthy real CTs (chest4dct, Lung-PET-CT-Dx, CIP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from covidtrack.events import ProgressCallback
    from covidtrack.segment.infection import InfectionModel

REACH_MM = 15.0  # how far beyond the lung border the infection model may add (in-plane)
MIN_HU = -400.0  # added voxels must be at least this dense (consolidation, effusion, not lung edge)


def envelope(lungs: np.ndarray, spacing: Sequence[float], reach_mm: float = REACH_MM) -> np.ndarray:
    """The lungs dilated in-plane (slice by slice) by ``reach_mm``.

    A Euclidean distance transform on the lungs' bounding box (plus the reach) with a huge z
    spacing, so that the nearest lung voxel of every voxel is found in its own slice; far faster
    than a morphological dilation with a disk of ~30 pixels on a 512 x 512 grid. On grids finer
    than reach / 8 the distances are taken between 2 x 2 pixel blocks (the margin is then exact
    to about one pixel, which is all a search region needs).
    """
    inside = lungs > 0
    out = np.zeros(lungs.shape, bool)
    if not inside.any():
        return out
    sy, sx = float(spacing[1]), float(spacing[2])
    zs, ys, xs = (np.nonzero(inside.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    my, mx = int(np.ceil(reach_mm / sy)) + 1, int(np.ceil(reach_mm / sx)) + 1
    box = (slice(zs[0], zs[-1] + 1), slice(max(0, ys[0] - my), ys[-1] + my + 1), slice(max(0, xs[0] - mx), xs[-1] + mx + 1))
    crop = inside[box]
    f = 2 if max(sy, sx) * 8 <= reach_mm else 1  # fine grids: distances on 2 x 2 blocks (4x less work)
    if f == 1:
        out[box] = ndi.distance_transform_edt(~crop, sampling=(1e6, sy, sx)) <= reach_mm
        return out
    ny, nx = crop.shape[1] + crop.shape[1] % 2, crop.shape[2] + crop.shape[2] % 2
    padded = np.zeros((crop.shape[0], ny, nx), bool)
    padded[:, : crop.shape[1], : crop.shape[2]] = crop
    blocks = padded[:, 0::2, 0::2] | padded[:, 1::2, 0::2] | padded[:, 0::2, 1::2] | padded[:, 1::2, 1::2]
    near = ndi.distance_transform_edt(~blocks, sampling=(1e6, 2 * sy, 2 * sx)) <= reach_mm
    near = near.repeat(2, axis=1).repeat(2, axis=2)[:, : crop.shape[1], : crop.shape[2]]
    out[box] = near | crop
    return out


def _box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != d)))[0] for d in range(mask.ndim)]
    return tuple(slice(max(0, i[0] - margin), min(n, i[-1] + margin + 1)) for i, n in zip(idx, mask.shape))


def added_voxels(ct_hu: np.ndarray, lungs: np.ndarray, labels: np.ndarray, min_hu: float = MIN_HU) -> np.ndarray:
    """Infection outside ``lungs`` that is dense and touches the lung (components, 3D)."""
    inside = lungs > 0
    cand = (labels > 0) & ~inside & (ct_hu > min_hu)
    out = np.zeros(lungs.shape, bool)
    if not cand.any():
        return out
    box = _box(cand)  # everything below happens around the candidates only
    comp, _ = ndi.label(cand[box])  # face connectivity, as the lobes and the connectivity checks use
    # a component counts when it shares a face with the lung (a corner or an edge would leave it
    # a separate piece of the lung mask)
    face = ndi.generate_binary_structure(3, 1)
    near = ndi.grey_dilation(comp, footprint=face)
    touching = np.unique(near[inside[box] & (near > 0)])
    out[box] = np.isin(comp, touching[touching > 0])
    return out


def assign_sides(lungs: np.ndarray, added: np.ndarray, margin: int = 8) -> np.ndarray:
    """``lungs`` (0/1/2) with each component of ``added`` labelled as the side it shares most faces
    with (else the nearest lung voxel's side, searched within ``margin`` voxels of its box)."""
    out = lungs.copy()
    if not added.any():
        return out
    comp, _ = ndi.label(added)
    for k, sl in enumerate(ndi.find_objects(comp), start=1):
        if sl is None:
            continue
        box = tuple(slice(max(0, q.start - margin), min(n, q.stop + margin)) for q, n in zip(sl, lungs.shape))
        sub = lungs[box]
        if not (sub > 0).any():
            continue
        mine = comp[box] == k
        # the side of the lung it touches most (one side per component: a piece split between
        # the sides would leave fragments of each)
        face = ndi.binary_dilation(mine, structure=ndi.generate_binary_structure(3, 1)) & ~mine
        sides = np.bincount(sub[face].ravel(), minlength=3)[1:]
        if sides.sum() == 0:
            _, idx = ndi.distance_transform_edt(sub == 0, return_indices=True)
            sides = np.bincount(sub[tuple(idx)][mine].ravel(), minlength=3)[1:]
        out[box][mine] = np.uint8(1 + int(np.argmax(sides)))
    return out


def complete_lungs(
    model: "InfectionModel",
    ct_hu: np.ndarray,
    lungs: np.ndarray,
    spacing: Sequence[float],
    progress: "ProgressCallback | None" = None,
    reach_mm: float = REACH_MM,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Run the infection model on the lungs plus a margin and complete the lung mask.

    Returns ``(lungs, infection, prob, added_voxel_count)``: the completed lung mask (0/1/2),
    infection (0/1/2) and its probability (float16), both zero outside the completed lungs.
    """
    region = envelope(lungs, spacing, reach_mm)
    labels, prob = model.predict(ct_hu, lungs, spacing, progress=progress, region=region)
    added = added_voxels(ct_hu, lungs, labels)
    completed = assign_sides(lungs, added)
    inside = completed > 0
    infection = np.where(inside, labels, 0).astype(np.uint8)
    prob = np.where(inside, prob, 0).astype(np.float16)
    return completed, infection, prob, int(added.sum())
