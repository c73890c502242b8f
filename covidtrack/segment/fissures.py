"""Fissure enhancement (Hessian sheet filters) and prior-guided refinement of fissure surfaces.

A fissure is a thin sheet slightly denser than the lung around it, so inside the lung the
Hessian of the smoothed CT has one large negative eigenvalue (across the sheet) and two small
ones (along it).

- :func:`plate_measure`: orientation-free plate-likeness (eigenvalues) and the sheet normal, the
  classic fissure enhancement filter, for inspection and figures.
- :func:`oriented_plate`: the same plate measure kept only where the sheet's normal lies in a
  cone of angles from the body axis: oblique fissures are steep (normal 30-75 degrees from the
  z axis), the horizontal fissure is nearly flat (under 20 degrees). It needs no guess of the
  surface's local shape, which the shape prior does not give reliably: its surfaces follow the
  dome of the diaphragm and differ from the phantoms' fissure orientation by 39-52 degrees
  (median per fissure, ``bench/lobes_bench.py``).
- :func:`directional_evidence`: sheet evidence for a *given* normal (``-n^T H n`` minus bright
  curvature within the sheet's plane); sharper than the cone once the surface's orientation is
  known.

:func:`refine` moves each prior fissure surface (a height per axial column, see
:mod:`covidtrack.segment.lobes`) within a band around the prior to where the evidence is high.
The offsets are chosen jointly for all columns by semi-global matching (dynamic programming
along 4 directions): neighbouring columns may differ by one voxel at a small cost and by more
at a large cost, and a weak quadratic pull keeps the prior where nothing is visible.

The right lung's fissures go through two stages (:func:`refine_passes`):

1. *search*: wide then narrower bands scored by :func:`oriented_plate`. Columns where the
   fissure was seen keep their height; local planes fitted to them continue the fissure along
   its own slope into unseen columns nearby (within ``EXTEND_REACH_MM``), where the prior's
   shape would otherwise bend it back; far from any seen column the prior returns. The search is
   then run again (narrower bands) from a quadratic fitted to the columns where it saw the
   fissure.
2. *follow*: narrow bands scored by :func:`directional_evidence`, with the normal of a
   quadratic surface fitted to stage 1's result (its overall orientation, without the
   column-to-column wiggle of single vessels).

The left oblique fissure keeps the narrower refinement of :func:`follow_prior` (directional
evidence across the current surface's normal, +-24 then +-10 mm): with the search it came out
worse on the phantoms and flatter on both real CTs (``bench/lobes_bench.py``, README).

Before either, an oblique fissure may get a *plane start* (:func:`plane_start`, lobe priors from
lobes/v2 on): a plane searched over height and two angles within the range of real oblique
fissures (their angles in the hand-drawn LIDC fissures, stored in the prior) and scored by the
oriented plate measure along the whole plane. The prior's curved surface can be 20 degrees off
the visible fissure's slope, more than the narrow passes can turn; a plane fitted to the whole
fissure at once is not. It is used only where the fissure stands out along it clearly
(``PLANE_MIN_CONTRAST`` times the lung's mean evidence); then the narrow passes follow the
fissure's curvature from there. A fissure that the prior's own curved shape, moved up or down,
meets better than any plane keeps the usual refinement.
Elsewhere (a fissure not visible, as on the noisy real 4D CT) nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from scipy import ndimage as ndi

from covidtrack.labels import RIGHT_LUNG

if TYPE_CHECKING:
    from covidtrack.segment.lobes import LungFrame

LUNG_WINDOW_HU = (-1000.0, -500.0)  # clip: vessels and walls must not outshine faint fissures
SIGMA_MM = 1.5  # Hessian scale: fissures are < 1 mm thick; this matches a ~2 mm working grid
PRIOR_SIGMA_MM = 18.0  # default: how far the prior is trusted (mm) when no fissure is seen
PRIOR_WEIGHT = 0.05  # quadratic pull to the prior, in units of one clearly seen fissure voxel
P1, P2 = 0.1, 1.5  # semi-global matching: one-voxel step / larger jump between neighbouring columns
IN_PLANE_PENALTY = 2.0  # 2: a sheet 30 deg off the expected normal keeps 1/4 of its score
EVIDENCE_PERCENTILE = 90.0  # "clearly visible" = this percentile of the evidence in the band
EXTEND_SIGMA = 5.0  # columns (~10 mm): how far a seen shift carries into unseen columns
SEEN_LEVEL = 0.3  # evidence (0..1) above which a column counts as having seen the fissure
FADE_WEIGHT = 0.02  # how fast an unseen column falls back to the prior
SMOOTH_COLUMNS = 2.0  # final smoothing of the offsets (columns, ~4 mm on the working grid)
SEARCH_PASSES = ((40.0, 30.0), (16.0, 12.0), (8.0, 8.0))  # stage 1: (band, prior sigma) in mm per pass
RESTART_PASSES = ((24.0, 18.0), (12.0, 10.0), (6.0, 6.0))  # stage 1 again, from a quadratic fitted to its result
FOLLOW_PASSES = ((12.0, 10.0), (6.0, 6.0))  # stage 2, with the fitted surface's own orientation
PRIOR_FOLLOW_PASSES = ((24.0, 18.0), (10.0, 10.0))  # left oblique: (band, prior sigma) mm, see follow_prior
OBLIQUE_CONE_DEG = (20.0, 30.0, 75.0, 85.0)  # normal's angle from z: ramps 0->1, flat, 1->0
HORIZONTAL_CONE_DEG = (0.0, 0.0, 20.0, 35.0)
EXTEND_REACH_MM = 40.0  # how far a seen fissure is continued into unseen columns
EXTEND_PLANE_MM = 15.0  # window (Gaussian sigma) of the local planes that continue it
EXTEND_MIN_SEEN = 0.15  # fraction of a surface's columns that must be seen to continue it
EDGE_EROSION = 2  # voxels: evidence next to the lung's border is the border's, not a fissure's
PLANE_OFFSET_MM = 40.0  # plane start: heights searched around the prior's own plane (+-, mm) ...
PLANE_OFFSET_STEP_MM = 2.0  # ... in these steps
PLANE_OFFSET_SIGMA_MM = 25.0  # weak pull of the plane's height to the prior's
PLANE_STEP_DEG = (2.5, 5.0)  # angle steps: rise (AP slope), lateral slope
PLANE_SPREADS = 2.0  # angles searched within mean +- this many spreads of the real fissures'
PLANE_PRIOR_WEIGHT = 0.1  # penalty per squared spread, in units of the lung's mean evidence
PLANE_MIN_CONTRAST = 4.0  # evidence along the plane / lung mean: phantoms 4.1-6.3, no fissure <= 3.6
PLANE_MIN_CROSSED = 0.5  # a plane clipping a corner of the lung is judged over half its columns


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


def _plate_at(hess: dict[tuple[int, int], np.ndarray], at: tuple[np.ndarray, ...], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Plate score (HU / mm^2) and unit sheet normal ``(n, 3)`` at voxel indices ``at``.

    With eigenvalues sorted by magnitude ``|l1| <= |l2| <= |l3|``, a bright sheet has
    ``l3 << 0`` and ``l1, l2 ~ 0``: score ``|l3| * exp(-(l2 / (alpha * l3))^2 / 2)``.
    """
    n = at[0].size
    h = np.empty((n, 3, 3), np.float32)
    for (a, b), v in hess.items():
        h[:, a, b] = v[at]
        h[:, b, a] = h[:, a, b]
    vals, vecs = np.linalg.eigh(h)
    order = np.argsort(np.abs(vals), axis=1)
    lam = np.take_along_axis(vals, order, axis=1)
    l2, l3 = lam[:, 1], lam[:, 2]
    score = np.where(l3 < 0, -l3 * np.exp(-0.5 * (l2 / (alpha * np.minimum(l3, -1e-6))) ** 2), 0.0)
    normal = np.take_along_axis(vecs, order[:, None, 2:3].repeat(3, axis=1), axis=2)[:, :, 0]
    return score.astype(np.float32), normal


def plate_measure(
    ct: np.ndarray,
    spacing: tuple[float, float, float],
    region: np.ndarray,
    sigma_mm: float = SIGMA_MM,
    alpha: float = 0.3,
) -> PlateField:
    """Hessian plate-likeness of bright sheets inside ``region``.

    ``ct`` is in HU on a grid with ``spacing`` (z, y, x) mm. The score (see :func:`_plate_at`)
    is normalised by its 99th percentile in the region so the result does not depend on the
    scanner's noise or contrast.
    """
    measure = np.zeros(ct.shape, np.float32)
    normal = np.zeros((3,) + ct.shape, np.float32)
    idx = np.nonzero(region)
    if idx[0].size == 0:
        return PlateField(measure, normal)
    score, big = _plate_at(hessian(ct, spacing, sigma_mm), idx, alpha)
    scale = np.percentile(score, 99) if score.size > 100 else score.max()
    measure[idx] = np.clip(score / max(float(scale), 1e-6), 0.0, 1.0)
    for a in range(3):
        normal[a][idx] = big[:, a]
    return PlateField(measure, normal)


def cone_weight(angle_deg: np.ndarray, cone: tuple[float, float, float, float]) -> np.ndarray:
    """1 inside ``cone[1]..cone[2]`` degrees, ramping to 0 at ``cone[0]`` and ``cone[3]``."""
    a0, a1, a2, a3 = cone
    rise = np.clip((angle_deg - a0) / max(a1 - a0, 1e-6), 0.0, 1.0) if a1 > a0 else np.ones_like(angle_deg)
    fall = np.clip((a3 - angle_deg) / max(a3 - a2, 1e-6), 0.0, 1.0)
    return np.minimum(rise, fall)


def oriented_plate(
    hess: dict[tuple[int, int], np.ndarray], region: np.ndarray, cones: dict[str, tuple[float, float, float, float]], alpha: float = 0.3
) -> dict[str, np.ndarray]:
    """Plate score inside ``region`` kept where the sheet normal's angle from the z axis lies in
    each named cone (HU / mm^2, dense arrays on the region's grid; one eigen decomposition)."""
    idx = np.nonzero(region)
    out = {name: np.zeros(region.shape, np.float32) for name in cones}
    if idx[0].size == 0:
        return out
    score, normal = _plate_at(hess, idx, alpha)
    angle = np.degrees(np.arccos(np.clip(np.abs(normal[:, 0]), 0.0, 1.0)))
    for name, cone in cones.items():
        out[name][idx] = score * cone_weight(angle, cone)
    return out


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


Evidence = Callable[[tuple[np.ndarray, ...], np.ndarray], np.ndarray]
"""Sheet evidence at voxel indices ``(z, y, x)`` given the expected unit normals ``(3, n)``."""


def refine_surface(
    evidence_at: Evidence,
    lung: np.ndarray,
    h0: np.ndarray,
    spacing: tuple[float, float, float],
    scale: float,
    *,
    floor: np.ndarray | None = None,
    band_mm: float = SEARCH_PASSES[0][0],
    prior_sigma_mm: float = PRIOR_SIGMA_MM,
    orientation_from: np.ndarray | None = None,
    seen_out: list | None = None,
    extend_along_slope: bool = True,
) -> np.ndarray:
    """Move one surface (z voxel height per column, NaN outside) to the visible fissure.

    ``evidence_at``: sheet evidence (HU/mm^2) at voxels, given the expected normal, which is
    that of ``orientation_from`` (heights per column) or else of ``h0``. ``scale``: evidence
    that counts as a clearly visible fissure. ``floor``: optional heights the surface must stay
    above (the oblique fissure for the horizontal one). Returns refined heights, NaN where
    ``h0`` is NaN.
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
    # expected orientation (same for every offset of a column)
    shape_src = orientation_from if orientation_from is not None else h0
    nrm = _surface_normal(np.where(np.isfinite(shape_src), shape_src, np.nanmean(shape_src)), spacing)
    nrm = np.broadcast_to(nrm[..., None], (3,) + z.shape)
    sel = np.nonzero(in_lung)
    ev = np.zeros(z.shape, np.float32)
    ev[sel] = evidence_at((zc[sel], yy[sel], xx[sel]), nrm[(slice(None),) + sel])
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
    if seen_out is not None:
        seen_out.append(seen)
    h = np.where(cols, h0 + best, np.nan)
    return _extend_seen(h, seen, spacing) if extend_along_slope else h


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


def quadratic_surface(h: np.ndarray, spacing: tuple[float, float, float], weight: np.ndarray | None = None) -> np.ndarray:
    """Least-squares quadratic ``z(y, x)`` through the finite heights of ``h`` (z voxels), on
    every column; ``weight`` (per column) weights the fit."""
    cols = np.isfinite(h)
    _, sy, sx = spacing
    yy, xx = np.indices(h.shape)
    ym, xm = yy * float(sy), xx * float(sx)
    y = (ym - ym[cols].mean()) / 100.0  # decimetres: a well-conditioned design
    x = (xm - xm[cols].mean()) / 100.0
    design = np.stack([np.ones_like(y), y, x, y * y, x * y, x * x], axis=-1)
    w = np.ones(int(cols.sum())) if weight is None else np.sqrt(np.clip(weight[cols], 0.0, None))
    coef = np.linalg.lstsq(design[cols] * w[:, None], h[cols] * w, rcond=None)[0]
    return design @ coef


def local_plane_fit(h: np.ndarray, weight: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """Weighted local planes: at every column, the plane ``z = a + b y + c x`` that best fits the
    weighted heights around it (Gaussian window of ``sigma_mm``), evaluated at that column.

    Near its data this follows the surface; beyond it, it continues the surface's local slope
    in a straight line (a global polynomial would bend away). NaN where the window holds too
    little weight to fix a plane.
    """
    _, sy, sx = spacing
    w = np.where(np.isfinite(h), np.clip(weight, 0.0, None), 0.0)
    hv = np.where(w > 0, h, 0.0)
    yy, xx = np.indices(h.shape)
    ym, xm = yy * float(sy), xx * float(sx)
    sig = (sigma_mm / float(sy), sigma_mm / float(sx))

    def g(a: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(a, sig, mode="constant")

    # moments about each column's own position: basis (1, y - y0, x - x0)
    s_w = g(w)
    s_y, s_x = g(w * ym) - ym * s_w, g(w * xm) - xm * s_w
    s_yy = g(w * ym * ym) - 2 * ym * g(w * ym) + ym * ym * s_w
    s_xx = g(w * xm * xm) - 2 * xm * g(w * xm) + xm * xm * s_w
    s_xy = g(w * ym * xm) - ym * g(w * xm) - xm * g(w * ym) + ym * xm * s_w
    s_h = g(w * hv)
    s_hy = g(w * hv * ym) - ym * s_h
    s_hx = g(w * hv * xm) - xm * s_h
    a = np.stack([np.stack([s_w, s_y, s_x], -1), np.stack([s_y, s_yy, s_xy], -1), np.stack([s_x, s_xy, s_xx], -1)], -2)
    rhs = np.stack([s_h, s_hy, s_hx], -1)
    ok = s_w > 1e-3 * max(float(s_w.max()), 1e-12)
    det = np.linalg.det(a)
    ok &= np.abs(det) > 1e-9 * np.maximum(s_w, 1e-12) ** 3 * sigma_mm**4
    out = np.full(h.shape, np.nan)
    if ok.any():
        out[ok] = np.linalg.solve(a[ok], rhs[ok][..., None])[..., 0, 0]
    return out


def _extend_seen(h: np.ndarray, seen: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Carry a seen fissure into unseen columns along its own local slope.

    The offsets of :func:`_extend_offsets` fade back to the prior, whose shape follows the
    diaphragm, not the fissure: near the lung's rim that bends the surface 20-30 mm away from a
    fissure seen a few centimetres inwards. Unseen columns within ``EXTEND_REACH_MM`` of seen
    ones take the seen surface continued by :func:`local_plane_fit` instead (fully at the seen
    edge, fading with distance). Where that continuation leaves the lung, the column holds no
    fissure, as over the heart, where the upper lobe rests on the pericardium.
    """
    cols = np.isfinite(h)
    anchor = cols & (seen >= SEEN_LEVEL)
    if anchor.sum() < max(30, EXTEND_MIN_SEEN * cols.sum()):
        return h
    plane = local_plane_fit(np.where(anchor, h, np.nan), np.where(anchor, seen, 0.0), spacing, EXTEND_PLANE_MM)
    dist = ndi.distance_transform_edt(~anchor, sampling=spacing[1:])
    a = np.clip(1.0 - dist / EXTEND_REACH_MM, 0.0, 1.0) * ~anchor
    a = np.where(np.isfinite(plane), ndi.gaussian_filter(a, SMOOTH_COLUMNS), 0.0)
    return np.where(cols, (1.0 - a) * h + a * np.nan_to_num(plane), np.nan)


@dataclass(frozen=True)
class PlaneAngles:
    """Where real oblique fissures lie as planes ``z = a + y tan(rise) + x tan(lateral)`` on the
    canonical grid (mm; y runs anterior -> posterior, x right -> left): mean and spread of each
    angle in degrees, learned from hand-drawn fissures (:mod:`covidtrack.segment.train_lobes`)."""

    rise_deg: float
    rise_spread_deg: float
    lateral_deg: float
    lateral_spread_deg: float


@dataclass(frozen=True)
class PlaneFit:
    """The best plane of :func:`plane_start`: heights per column (z voxels, NaN outside) and
    its angles (degrees). ``contrast``: mean evidence per lung column the plane crosses (at least
    ``PLANE_MIN_CROSSED`` of the columns counted) over the mean evidence of the lung (1 = no
    better than anywhere). ``support`` / ``prior_support``: the search's objective for the plane /
    for the prior's own surface at its best height (evidence summed over all columns, in units
    of the lung's mean per column, less the penalties)."""

    heights: np.ndarray
    rise_deg: float
    lateral_deg: float
    contrast: float
    support: float
    prior_support: float

    at_rise_edge: bool = False

    @property
    def clear(self) -> bool:
        """A fissure stands out along the plane, the plane meets more of it than the prior's
        shape can (a curved fissure is better reached from the curved prior), and its rise is not
        the steepest or flattest searched: a plane pinned there follows something else (on thin
        slices the flattest right "oblique" plane locked onto the horizontal fissure and the
        middle lobe vanished)."""
        return self.contrast >= PLANE_MIN_CONTRAST and self.support > self.prior_support and not self.at_rise_edge


def _capped(evidence: np.ndarray, scale: float) -> np.ndarray:
    """Evidence capped at its "clearly visible" level (0..1), each voxel taking the best of
    +-1 voxel along z (a surface rounded to whole voxels must not miss a one-voxel sheet)."""
    return ndi.maximum_filter1d(np.minimum(evidence / max(scale, 1e-6), 1.0), 3, axis=0)


def plane_start(
    evidence: np.ndarray, scale: float, lung: np.ndarray, h0: np.ndarray, spacing: tuple[float, float, float],
    angles: PlaneAngles,
) -> PlaneFit | None:
    """The plane, among real fissures' orientations, along which ``evidence`` is strongest.

    ``evidence``: oriented plate measure (HU/mm^2) on the lung's grid, ``scale`` its "clearly
    visible" level; ``lung``: boolean mask the plane is scored in; ``h0``: the prior surface (z
    voxel per column, NaN outside), whose least-squares plane centres the height search.
    Every plane is scored by the evidence it meets in the lung (each column's best voxel within
    +-1 of the plane, capped at ``scale``), summed over the lung's columns, minus a weak
    quadratic penalty on its distance from the real fissures' mean angles and from the prior's
    height. None when the prior has no column.
    """
    cols = np.isfinite(h0)
    if cols.sum() < 3:
        return None
    sz, sy, sx = (float(s) for s in spacing)
    ev = _capped(evidence, scale)
    lung_mean = float(ev[lung].mean()) if lung.any() else 0.0
    if lung_mean <= 0.0:
        return None
    yy, xx = np.nonzero(cols)
    ym, xm = (yy - yy.mean()) * sy, (xx - xx.mean()) * sx
    design = np.stack([np.ones_like(ym), ym, xm], axis=1)
    centre = float(np.linalg.lstsq(design, h0[cols] * sz, rcond=None)[0][0])
    heights = centre + np.arange(-PLANE_OFFSET_MM, PLANE_OFFSET_MM + 1e-6, PLANE_OFFSET_STEP_MM)
    rises = np.arange(angles.rise_deg - PLANE_SPREADS * angles.rise_spread_deg,
                      angles.rise_deg + PLANE_SPREADS * angles.rise_spread_deg + 1e-6, PLANE_STEP_DEG[0])
    rises = rises[np.abs(rises) < 80.0]
    laterals = np.arange(angles.lateral_deg - PLANE_SPREADS * angles.lateral_spread_deg,
                         angles.lateral_deg + PLANE_SPREADS * angles.lateral_spread_deg + 1e-6, PLANE_STEP_DEG[1])
    laterals = laterals[np.abs(laterals) < 80.0]
    nz = lung.shape[0]

    def along(z_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Evidence summed and lung columns crossed, per candidate row of heights (mm)."""
        z = np.rint(z_mm / sz).astype(int)
        zc = np.clip(z, 0, nz - 1)
        inside = lung[zc, yy[None], xx[None]] & (z >= 0) & (z < nz)
        return np.where(inside, ev[zc, yy[None], xx[None]], 0.0).sum(axis=1), inside.sum(axis=1)

    score = np.zeros((heights.size, rises.size, laterals.size))
    crossed = np.zeros_like(score)
    for j, rise in enumerate(np.tan(np.radians(rises))):
        for k, lat in enumerate(np.tan(np.radians(laterals))):
            score[:, j, k], crossed[:, j, k] = along(heights[:, None] + (rise * ym + lat * xm)[None, :])
    da, dr, dl = np.meshgrid(heights - centre, rises - angles.rise_deg, laterals - angles.lateral_deg, indexing="ij")
    penalty = 0.5 * ((da / PLANE_OFFSET_SIGMA_MM) ** 2 + (dr / angles.rise_spread_deg) ** 2
                     + (dl / angles.lateral_spread_deg) ** 2)
    norm = yy.size * lung_mean
    objective = score / norm - PLANE_PRIOR_WEIGHT * penalty
    i = np.unravel_index(int(np.argmax(objective)), objective.shape)
    contrast = float(score[i] / max(crossed[i], PLANE_MIN_CROSSED * yy.size) / lung_mean)
    # the prior's own shape at its best height, on the same terms (its height penalised alike)
    offsets = heights - centre
    prior_score, _ = along(h0[cols][None, :] * sz + offsets[:, None])
    prior_objective = prior_score / norm - PLANE_PRIOR_WEIGHT * 0.5 * (offsets / PLANE_OFFSET_SIGMA_MM) ** 2
    rise, lat = float(rises[i[1]]), float(laterals[i[2]])
    out = np.full(h0.shape, np.nan)
    out[cols] = (heights[i[0]] + np.tan(np.radians(rise)) * ym + np.tan(np.radians(lat)) * xm) / sz
    at_edge = rises.size > 1 and i[1] in (0, rises.size - 1)
    return PlaneFit(out, rise, lat, contrast, float(objective[i]), float(prior_objective.max()), at_rise_edge=bool(at_edge))


@dataclass(frozen=True, eq=False)
class FissureEvidence:
    """Everything :func:`refine_passes` reads from the CT of one lung (working grid).

    ``cones``: :func:`oriented_plate` per fissure kind (``"oblique"``, ``"horizontal"``) with
    its "clearly visible" level in ``cone_scale``; ``hess`` and ``hess_scale`` for
    :func:`directional_evidence`.
    """

    cones: dict[str, np.ndarray]
    cone_scale: dict[str, float]
    hess: dict[tuple[int, int], np.ndarray]
    hess_scale: float


def fissure_evidence(
    ct: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float], region: np.ndarray, *, cones: bool = True
) -> FissureEvidence:
    """Hessian, oriented plate measures (unless ``cones=False``: the left lung needs none) and
    their visibility levels inside ``region`` (a part of the eroded lung: the bands the surfaces
    may move in), computed on the lung's box only."""
    box = ndi.find_objects(lung.astype(np.uint8))[0]
    box = tuple(slice(max(sl.start - 4, 0), sl.stop + 4) for sl in box)
    hess_box = hessian(ct[box], spacing)
    kinds = {"oblique": OBLIQUE_CONE_DEG, "horizontal": HORIZONTAL_CONE_DEG} if cones else {}
    cones_box = oriented_plate(hess_box, region[box], kinds) if kinds else {}
    hess = {k: _uncrop(v, box, lung.shape) for k, v in hess_box.items()}
    cone_maps = {k: _uncrop(v, box, lung.shape) for k, v in cones_box.items()}
    inner = np.nonzero(region)

    def level(values: np.ndarray) -> float:
        values = values[values > 0]
        return float(np.percentile(values, EVIDENCE_PERCENTILE)) if values.size > 20 else 1.0

    curvature = -(hess[(0, 0)][inner] + hess[(1, 1)][inner] + hess[(2, 2)][inner])
    return FissureEvidence(cones=cone_maps, cone_scale={k: level(v[inner]) for k, v in cone_maps.items()},
                           hess=hess, hess_scale=level(curvature))


def refine_passes(
    evidence: FissureEvidence,
    kind: str,
    lung: np.ndarray,
    h0: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    floor: np.ndarray | None = None,
) -> np.ndarray:
    """Search (oriented plate measure of ``kind``, wide to narrow bands; again from a quadratic
    fitted to the result), then follow (directional evidence along the normal of a quadratic
    fitted to the search result)."""
    cone = evidence.cones[kind]

    def cone_at(at: tuple[np.ndarray, ...], _normal: np.ndarray) -> np.ndarray:
        return cone[at]

    def directional_at(at: tuple[np.ndarray, ...], normal: np.ndarray) -> np.ndarray:
        return directional_evidence(evidence.hess, at, normal)

    seen: list[np.ndarray] = []

    def search(start: np.ndarray, passes: tuple[tuple[float, float], ...]) -> np.ndarray:
        h = start
        for band, sigma in passes:
            h = refine_surface(cone_at, lung, h, spacing, evidence.cone_scale[kind], floor=floor,
                               band_mm=band, prior_sigma_mm=sigma, seen_out=seen)
        return h

    h = search(h0, SEARCH_PASSES)
    if not seen:  # no column to search (a lung only a few slices thick): the prior stands
        return h
    # restart from the smooth surface that the *seen* part of the fissure implies: columns the
    # first search left on the prior's shape (or on a vessel) start again near it
    anchor = np.isfinite(h) & (seen[-1] >= SEEN_LEVEL)
    if anchor.sum() >= max(30, EXTEND_MIN_SEEN * np.isfinite(h).sum()):
        fit = quadratic_surface(np.where(anchor, h, np.nan), spacing, weight=seen[-1])
        h = search(np.where(np.isfinite(h0), fit, np.nan), RESTART_PASSES)
    for band, sigma in FOLLOW_PASSES:
        h = refine_surface(directional_at, lung, h, spacing, evidence.hess_scale, floor=floor, band_mm=band,
                           prior_sigma_mm=sigma, orientation_from=quadratic_surface(h, spacing))
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
    planes: dict[str, PlaneAngles] | None = None,
) -> dict[str, np.ndarray]:
    """Refine the prior heights of one lung's fissures with the CT (all on the working grid).

    ``planes``: the real oblique fissures' angles per fissure name (from the lobe prior); where
    given, a clearly visible oblique fissure that a plane fits better than the prior's own shape
    gets a plane start (:func:`plane_start`) and the narrow passes of :func:`follow_prior` from it.
    """
    side = frame.side
    planes = planes or {}
    eroded = ndi.binary_erosion(lung, iterations=EDGE_EROSION)  # the pleura is an edge, not a fissure
    D = max(1, int(round(max(band for band, _ in SEARCH_PASSES) / float(spacing[0]))))
    zi = np.arange(lung.shape[0])[:, None, None]
    band = np.zeros(lung.shape, bool)
    for h in heights.values():
        hh = np.where(np.isfinite(h), h, -1e9)[None]
        band |= np.abs(zi - hh) <= D + 1
    oblique = "right_oblique" if side == RIGHT_LUNG else "left_oblique"
    evidence = fissure_evidence(ct, lung, spacing, eroded & band, cones=side == RIGHT_LUNG or oblique in planes)
    plane = None
    if oblique in planes:
        plane = plane_start(evidence.cones["oblique"], evidence.cone_scale["oblique"], eroded, heights[oblique],
                            spacing, planes[oblique])
    out = dict(heights)
    if plane is not None and plane.clear:
        obl = follow_prior(evidence, eroded, plane.heights, spacing)
    elif side == RIGHT_LUNG:
        obl = refine_passes(evidence, "oblique", eroded, heights["right_oblique"], spacing)
    else:
        obl = follow_prior(evidence, eroded, heights["left_oblique"], spacing)
    out[oblique] = obl
    if side == RIGHT_LUNG:
        hor0 = heights["right_horizontal"]
        # the middle lobe exists only where the prior horizontal lies above the oblique
        exists = np.isfinite(hor0) & (hor0 > heights["right_oblique"] + 1.0)
        hor = refine_passes(evidence, "horizontal", eroded, np.where(exists, hor0, np.nan), spacing, floor=obl)
        out["right_horizontal"] = np.where(exists, hor, hor0 - heights["right_oblique"] + obl)
    return out


def follow_prior(evidence: FissureEvidence, lung: np.ndarray, h0: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The narrower refinement: sheets scored across the current surface's own normal in bands
    of +-24 then +-10 mm, no search by orientation. Used for the left oblique fissure, and for
    any oblique fissure from a clear plane start.

    The orientation-gated search (:func:`refine_passes`) placed the left oblique fissure worse on
    the phantoms and flattened it on both real CTs (``bench/lobes_bench.py``): over the heart the
    prior puts a fissure where there is none, and the search carries that part across the lung.
    """

    def directional_at(at: tuple[np.ndarray, ...], normal: np.ndarray) -> np.ndarray:
        return directional_evidence(evidence.hess, at, normal)

    h = h0
    for band, sigma in PRIOR_FOLLOW_PASSES:
        h = refine_surface(directional_at, lung, h, spacing, evidence.hess_scale, band_mm=band,
                           prior_sigma_mm=sigma, extend_along_slope=False)
    return h
