"""Rasterising tubes (vessels, airways, ribs, great vessels) and growing branching trees.

Tubes are stamped as balls along densely resampled centre lines; this is vectorised numpy
and much cheaper than a distance transform of the whole volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from covidtrack.phantom.grid import Grid


@dataclass(frozen=True)
class Segment:
    """A straight tube piece in anatomical mm (z, y, x) with radii (mm) at both ends."""

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    r_start: float
    r_end: float


def polyline_segments(points: list[tuple[float, float, float]], radii: list[float]) -> list[Segment]:
    """Consecutive segments of a polyline with a radius at every vertex (mm)."""
    return [
        Segment(tuple(points[i]), tuple(points[i + 1]), float(radii[i]), float(radii[i + 1]))  # type: ignore[arg-type]
        for i in range(len(points) - 1)
    ]


def sample_segments(segments: list[Segment], min_spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points (n, 3) mm and radii (n,) mm, dense enough for gap-free stamping."""
    if not segments:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.float32)
    starts = np.array([s.start for s in segments], dtype=np.float64)
    ends = np.array([s.end for s in segments], dtype=np.float64)
    r0 = np.array([s.r_start for s in segments])
    r1 = np.array([s.r_end for s in segments])
    length = np.linalg.norm(ends - starts, axis=1)
    # thin tubes need half-voxel steps; thick ones can step a quarter of their radius
    step = np.maximum(0.5 * min_spacing, 0.25 * np.minimum(r0, r1))
    counts = np.maximum(2, np.ceil(length / step).astype(int) + 1)
    seg_id = np.repeat(np.arange(len(segments)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    t = (np.arange(seg_id.size) - first) / np.repeat(counts - 1, counts)
    pts = starts[seg_id] + (ends - starts)[seg_id] * t[:, None]
    radii = r0[seg_id] + (r1 - r0)[seg_id] * t
    return pts.astype(np.float32), radii.astype(np.float32)


@lru_cache(maxsize=256)
def _ball(r_q: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Integer voxel offsets (k, 3) of a ball of radius ``r_q`` mm; at least the centre."""
    ext = [int(np.ceil(r_q / s)) for s in spacing]
    axes = [np.arange(-e, e + 1) for e in ext]
    oz, oy, ox = np.meshgrid(*axes, indexing="ij")
    d2 = (oz * spacing[0]) ** 2 + (oy * spacing[1]) ** 2 + (ox * spacing[2]) ** 2
    keep = d2 <= r_q**2
    keep[ext[0], ext[1], ext[2]] = True
    return np.stack([oz[keep], oy[keep], ox[keep]], axis=1).astype(np.int64)


def stamp(grid: Grid, points: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxels covered by balls along a centre line.

    Returns flat voxel indices and, per index, the fraction of the voxel the tube fills:
    1 for tubes at least a voxel wide, ``pi r^2 / (in-plane voxel area)`` for thinner ones, so
    the finest vessels appear with partial-volume contrast as on a real scan.
    Indices are sorted by increasing fraction, so ``a[idx] = f(frac)`` lets the fullest win.
    """
    if points.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    spacing = grid.spacing
    centre = np.rint(grid.to_index(points)).astype(np.int64)
    r_q = np.round(radii / 0.25) * 0.25
    pix_area = spacing[1] * spacing[2]
    all_idx, all_frac = [], []
    for r in np.unique(r_q):
        sel = r_q == r
        offs = _ball(float(r), spacing)
        vox = centre[sel][:, None, :] + offs[None, :, :]
        vox = vox.reshape(-1, 3)
        inside = np.all((vox >= 0) & (vox < np.array(grid.shape)), axis=1)
        vox = vox[inside]
        frac = 1.0 if len(offs) > 1 else min(1.0, float(np.pi * max(r, 0.25) ** 2 / pix_area))
        all_idx.append(np.ravel_multi_index(vox.T, grid.shape))
        all_frac.append(np.full(vox.shape[0], frac, np.float32))
    idx = np.concatenate(all_idx)
    frac_arr = np.concatenate(all_frac)
    order = np.argsort(frac_arr, kind="stable")
    return idx[order], frac_arr[order]


def grow_tree(
    root: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
    r_leaf: float,
    r_max: float,
    min_radius: float = 0.0,
) -> list[Segment]:
    """A branching tree from ``root`` (mm) to every target point (mm), thinning to the periphery.

    Recursive bisection of the target set: each branch heads for the centroid of the targets
    it supplies and splits them in two along their widest axis. Radii follow a Murray-like
    law ``r = r_leaf * n**0.4`` (n = targets supplied), capped at ``r_max``; branches thinner
    than ``min_radius`` are dropped (for airways, which end earlier than vessels).
    """
    segments: list[Segment] = []
    stack: list[tuple[np.ndarray, np.ndarray, float]] = [(root.astype(np.float64), targets.astype(np.float64), r_max)]
    while stack:
        start, pts, r_parent = stack.pop()
        n = len(pts)
        r = min(r_parent, r_leaf * n**0.4, r_max)
        if r < min_radius:
            continue
        if n <= 1:
            segments.append(Segment(tuple(start), tuple(pts.mean(0)), r, r_leaf))  # type: ignore[arg-type]
            continue
        centroid = pts.mean(axis=0)
        # the branch point lies part of the way to the centroid: long trunks, short twigs
        bp = start + (centroid - start) * rng.uniform(0.35, 0.6)
        segments.append(Segment(tuple(start), tuple(bp), r, r))  # type: ignore[arg-type]
        axis = int(np.argmax(pts.var(axis=0)))
        order = np.argsort(pts[:, axis])
        cut = int(np.clip(round(n * rng.uniform(0.35, 0.65)), 1, n - 1))
        stack.append((bp, pts[order[:cut]], r))
        stack.append((bp, pts[order[cut:]], r))
    return segments
