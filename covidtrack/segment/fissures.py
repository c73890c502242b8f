"""Fissure enhancement (Hessian sheet filters) and prior-guided refinement of fissure surfaces.

A fissure is a thin sheet slightly denser than the lung around it, so inside the lung the
Hessian of the smoothed CT has one large negative eigenvalue (across the sheet) and two small
ones (along it).

- :func:`plate_measure`: orientation-free plate-likeness (eigenvalues) and the sheet normal, the
  classic fissure enhancement filter, for inspection and figures.
- :func:`directional_evidence`: sheet evidence for a *given* normal (``-n^T H n`` minus bright
  curvature within the sheet's plane); used by the refinement because it needs no eigen
  decomposition and rejects the other fissure (a horizontal sheet when looking for the oblique).

:func:`refine` moves each prior fissure surface (a height per axial column, see
:mod:`covidtrack.segment.lobes`) within a band around the prior to where the evidence is high.
The offsets are chosen jointly for all columns by semi-global matching (dynamic programming
along 4 directions): neighbouring columns may differ by one voxel at a small cost and by more
at a large cost, and a weak quadratic pull keeps the prior where nothing is visible. A second,
narrower pass uses the first result's own orientation. Where the fissure is seen the surface
follows it; the shift fades out smoothly where it is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

from covidtrack.labels import RIGHT_LUNG

if TYPE_CHECKING:
    from covidtrack.segment.lobes import LungFrame

LUNG_WINDOW_HU = (-1000.0, -500.0)  # clip: vessels and walls must not outshine faint fissures
SIGMA_MM = 1.5  # Hessian scale: fissures are < 1 mm thick; this matches a ~2 mm working grid
BAND_MM = 24.0  # first-pass search band around the prior surface (mm, along z)
PRIOR_SIGMA_MM = 18.0  # how far the prior is trusted (mm) when no fissure is seen
PRIOR_WEIGHT = 0.05  # quadratic pull to the prior, in units of one clearly seen fissure voxel
P1, P2 = 0.1, 1.5  # semi-global matching: one-voxel step / larger jump between neighbouring columns
IN_PLANE_PENALTY = 2.0  # 2: a sheet 30 deg off the expected normal keeps 1/4 of its score
EVIDENCE_PERCENTILE = 90.0  # "clearly visible" = this percentile of the evidence in the band
EXTEND_SIGMA = 5.0  # columns (~10 mm): how far a seen shift carries into unseen columns
SEEN_LEVEL = 0.3  # evidence (0..1) above which a column counts as having seen the fissure
FADE_WEIGHT = 0.02  # how fast an unseen column falls back to the prior
SMOOTH_COLUMNS = 2.0  # final smoothing of the offsets (columns, ~4 mm on the working grid)
REFINE_PASSES = ((BAND_MM, PRIOR_SIGMA_MM), (10.0, 10.0))  # (band, prior sigma) in mm per pass


@dataclass(frozen=True, eq=False)
class PlateField:
    """Plate measure (0..1, unitless) and unit sheet normals ``(z, y, x)`` in mm space.

    Both are dense on the CT grid; outside the evaluated region the measure is 0.
    """

    measure: np.ndarray
    normal: np.ndarray  # (3,) + shape, float32


def hessian(ct: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float = SIGMA_MM) -> dict[tuple[int, int], np.ndarray]:
    """Gaussian-smoothed Hessian of the lung-windowed CT in HU / mm^2, keyed by axis pair."""
    sp = np.asarray(spacing, dtype=float)
    img = np.clip(ct.astype(np.float32), *LUNG_WINDOW_HU)
    sig = np.maximum(sigma_mm, 0.6 * sp) / sp  # never below ~half a voxel: thin plates alias
    out = {}
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            out[(a, b)] = ndi.gaussian_filter(img, sig, order=order, truncate=3.0) / np.float32(sp[a] * sp[b])
    return out


def directional_evidence(hess: dict[tuple[int, int], np.ndarray], at: tuple[np.ndarray, ...], normal: np.ndarray) -> np.ndarray:
    """Bright-sheet evidence with a given normal, at voxel indices ``at`` (HU / mm^2, >= 0).

    ``-n^T H n`` is large across a bright sheet with normal ``n``; bright curvature *within*
    the sheet's plane (``n^T H n - trace H``: vessels, nodules, a sheet of another
    orientation) is subtracted, so only sheets of the expected orientation score.
    """
    h = {k: v[at] for k, v in hess.items()}
    n = normal
    across = sum(n[a] * n[b] * h[(min(a, b), max(a, b))] for a in range(3) for b in range(3))
    trace = h[(0, 0)] + h[(1, 1)] + h[(2, 2)]
    inplane = trace - across
    return np.maximum(-across - IN_PLANE_PENALTY * np.maximum(-inplane, 0.0), 0.0)


def plate_measure(
    ct: np.ndarray,
    spacing: tuple[float, float, float],
    region: np.ndarray,
    sigma_mm: float = SIGMA_MM,
    alpha: float = 0.3,
) -> PlateField:
    """Hessian plate-likeness of bright sheets inside ``region``.

    ``ct`` is in HU on a grid with ``spacing`` (z, y, x) mm. With eigenvalues sorted by
    magnitude ``|l1| <= |l2| <= |l3|``, a bright sheet has ``l3 << 0`` and ``l1, l2 ~ 0``:
    score ``|l3| * exp(-(l2 / (alpha * l3))^2 / 2)``, normalised by its 99th percentile in the
    region so the result does not depend on the scanner's noise or contrast.
    """
    sp = np.asarray(spacing, dtype=float)
    img = np.clip(ct.astype(np.float32), *LUNG_WINDOW_HU)
    sig = sigma_mm / sp
    idx = np.nonzero(region)
    n = idx[0].size
    measure = np.zeros(ct.shape, np.float32)
    normal = np.zeros((3,) + ct.shape, np.float32)
    if n == 0:
        return PlateField(measure, normal)
    hess = np.empty((n, 3, 3), np.float32)
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndi.gaussian_filter(img, sig, order=order, truncate=3.0)[idx] / (sp[a] * sp[b])
            hess[:, a, b] = d
            hess[:, b, a] = d
    vals, vecs = np.linalg.eigh(hess)
    order_ = np.argsort(np.abs(vals), axis=1)
    lam = np.take_along_axis(vals, order_, axis=1)
    l2, l3 = lam[:, 1], lam[:, 2]
    score = np.where(l3 < 0, -l3 * np.exp(-0.5 * (l2 / (alpha * np.minimum(l3, -1e-6))) ** 2), 0.0)
    scale = np.percentile(score, 99) if score.size > 100 else score.max()
    measure[idx] = np.clip(score / max(float(scale), 1e-6), 0.0, 1.0)
    big = np.take_along_axis(vecs, order_[:, None, 2:3].repeat(3, axis=1), axis=2)[:, :, 0]
    for a in range(3):
        normal[a][idx] = big[:, a]
    return PlateField(measure, normal)


def _surface_normal(h: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Unit normal ``(z, y, x)`` of the height field ``z = h(y, x)`` (h in z voxels)."""
    sz, sy, sx = spacing
    hm = h * sz
    gy, gx = np.gradient(hm, sy, sx)
    nrm = np.stack([np.ones_like(hm), -gy, -gx])
    return nrm / np.linalg.norm(nrm, axis=0, keepdims=True)


def _sgm(cost: np.ndarray, p1: float, p2: float) -> np.ndarray:
    """Semi-global matching over a ``(ny, nx, nd)`` cost volume; returns the summed paths."""
    total = np.zeros_like(cost)
    for axis in (0, 1):
        for reverse in (False, True):
            c = np.moveaxis(cost, axis, 0)
            if reverse:
                c = c[::-1]
            agg = np.empty_like(c)
            agg[0] = c[0]
            for i in range(1, c.shape[0]):
                prev = agg[i - 1]
                pmin = prev.min(axis=-1, keepdims=True)
                step = np.minimum(np.roll(prev, 1, axis=-1), np.roll(prev, -1, axis=-1))
                step[..., 0] = prev[..., 1]
                step[..., -1] = prev[..., -2]
                best = np.minimum(np.minimum(prev, step + p1), pmin + p2)
                agg[i] = c[i] + best - pmin
            if reverse:
                agg = agg[::-1]
            total += np.moveaxis(agg, 0, axis)
    return total


def refine_surface(
    hess: dict[tuple[int, int], np.ndarray],
    lung: np.ndarray,
    h0: np.ndarray,
    spacing: tuple[float, float, float],
    scale: float,
    *,
    floor: np.ndarray | None = None,
    band_mm: float = BAND_MM,
    prior_sigma_mm: float = PRIOR_SIGMA_MM,
) -> np.ndarray:
    """Move one surface (z voxel height per column, NaN outside) to the visible fissure.

    ``scale``: evidence (HU/mm^2) that counts as a clearly visible fissure. ``floor``: optional
    heights the surface must stay above (the oblique fissure for the horizontal one). Returns
    refined heights, NaN where ``h0`` is NaN.
    """
    sz = float(spacing[0])
    nz = lung.shape[0]
    cols = np.isfinite(h0)
    if not cols.any():
        return h0
    D = max(1, int(round(band_mm / sz)))
    offsets = np.arange(-D, D + 1)
    base = np.where(cols, h0, 0.0)
    z = np.rint(base[..., None] + offsets).astype(int)  # (ny, nx, nd)
    zc = np.clip(z, 0, nz - 1)
    yy, xx = np.indices(h0.shape)
    yy, xx = np.broadcast_to(yy[..., None], z.shape), np.broadcast_to(xx[..., None], z.shape)
    in_lung = lung[zc, yy, xx] & (z >= 0) & (z < nz) & cols[..., None]
    # expected orientation: the prior surface's normal (same for every offset of a column)
    nrm = _surface_normal(np.where(cols, h0, np.nanmean(h0)), spacing)
    nrm = np.broadcast_to(nrm[..., None], (3,) + z.shape)
    sel = np.nonzero(in_lung)
    ev = np.zeros(z.shape, np.float32)
    ev[sel] = directional_evidence(hess, (zc[sel], yy[sel], xx[sel]), nrm[(slice(None),) + sel])
    # saturate: a clearly visible fissure counts fully, whatever its contrast. The scale is set
    # by the band itself (its strongest sheets), floored by the lung-wide level so that pure
    # noise in a band without any fissure does not get promoted to "clearly visible".
    pos = ev[ev > 0]
    band_scale = float(np.percentile(pos, EVIDENCE_PERCENTILE)) if pos.size > 20 else scale
    evidence = np.minimum(ev / max(band_scale, scale, 1e-6), 1.0)
    prior_cost = PRIOR_WEIGHT * ((offsets * sz) / prior_sigma_mm) ** 2
    cost = -evidence + prior_cost[None, None, :]
    if floor is not None:
        below = z <= np.where(np.isfinite(floor), floor, -np.inf)[..., None] + 1
        cost = np.where(below, 1.0, cost)  # a horizontal fissure under the oblique is impossible
    cost = np.where(cols[..., None], cost, prior_cost[None, None, :]).astype(np.float32)
    total = _sgm(cost, P1, P2)
    choice = np.argmin(total, axis=-1)
    best = ndi.median_filter(offsets[choice].astype(float), size=3)
    seen = np.take_along_axis(evidence, choice[..., None], axis=-1)[..., 0] * cols
    best = _extend_offsets(best, seen)
    return np.where(cols, h0 + best, np.nan)


def _extend_offsets(offset: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Keep offsets where the fissure was seen, carry them smoothly to where it was not.

    Normalised convolution: columns without evidence take the evidence-weighted mean offset of
    their surroundings (``EXTEND_SIGMA`` columns), fading back to the prior (offset 0) with
    distance. A fissure that is visible in the back of the lung thus also shifts its unseen
    anterior end, instead of snapping back to the prior at the edge of visibility.
    """
    w = np.clip(seen, 0.0, 1.0)
    anchor = w >= SEEN_LEVEL
    num = ndi.gaussian_filter(offset * w, EXTEND_SIGMA)
    den = ndi.gaussian_filter(w, EXTEND_SIGMA)
    fill = num / (den + FADE_WEIGHT)
    out = np.where(anchor, offset, fill)
    return ndi.gaussian_filter(out, SMOOTH_COLUMNS)  # no staircase, no wiggle around single vessels


def refine_passes(
    hess: dict[tuple[int, int], np.ndarray],
    lung: np.ndarray,
    h0: np.ndarray,
    spacing: tuple[float, float, float],
    scale: float,
    *,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """Coarse-to-fine: a wide band around the prior, then a narrow one around that result,
    whose own orientation now defines which sheets count."""
    h = h0
    for band, sigma in REFINE_PASSES:
        h = refine_surface(hess, lung, h, spacing, scale, floor=floor, band_mm=band, prior_sigma_mm=sigma)
    return h


def _uncrop(arr: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, arr.dtype)
    out[box] = arr
    return out


def refine(
    ct: np.ndarray,
    lung: np.ndarray,
    frame: "LungFrame",
    heights: dict[str, np.ndarray],
    spacing: tuple[float, float, float],
) -> dict[str, np.ndarray]:
    """Refine the prior heights of one lung's fissures with the CT (all on the working grid)."""
    side = frame.side
    eroded = ndi.binary_erosion(lung, iterations=1)  # the pleura is an edge, not a fissure
    sz = float(spacing[0])
    D = max(1, int(round(BAND_MM / sz)))
    zi = np.arange(lung.shape[0])[:, None, None]
    band = np.zeros(lung.shape, bool)
    for h in heights.values():
        hh = np.where(np.isfinite(h), h, -1e9)[None]
        band |= np.abs(zi - hh) <= D + 1
    # crop to the lung's box: the Hessian is the costly part
    box = ndi.find_objects(lung.astype(np.uint8))[0]
    box = tuple(slice(max(sl.start - 4, 0), sl.stop + 4) for sl in box)
    hess_box = hessian(ct[box], spacing)
    hess = {k: _uncrop(v, box, lung.shape) for k, v in hess_box.items()}
    # "clearly visible": the 97th percentile of the across-sheet curvature in the lung
    inner = np.nonzero(eroded & band)
    sample = -(hess[(0, 0)][inner] + hess[(1, 1)][inner] + hess[(2, 2)][inner])
    scale = float(np.percentile(np.maximum(sample, 0), EVIDENCE_PERCENTILE)) if sample.size else 1.0
    out = dict(heights)
    if side == RIGHT_LUNG:
        obl = refine_passes(hess, eroded, heights["right_oblique"], spacing, scale)
        out["right_oblique"] = obl
        hor0 = heights["right_horizontal"]
        # the middle lobe exists only where the prior horizontal lies above the oblique
        exists = np.isfinite(hor0) & (hor0 > heights["right_oblique"] + 1.0)
        hor = refine_passes(hess, eroded, np.where(exists, hor0, np.nan), spacing, scale, floor=obl)
        out["right_horizontal"] = np.where(exists, hor, hor0 - heights["right_oblique"] + obl)
    else:
        out["left_oblique"] = refine_passes(hess, eroded, heights["left_oblique"], spacing, scale)
    return out
