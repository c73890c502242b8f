"""Source grid <-> canonical grid: an exact permutation / flip of voxel axes.

Any scan (axial, coronal, sagittal, flipped, permuted, or slightly oblique) is brought to the
canonical orientation of :mod:`covidtrack.volume` by permuting and flipping its index axes so
that each one points along the closest of L, P, S. No interpolation happens, so the mapping is
lossless both ways and masks written back land on the exact source voxels. What a permutation
cannot remove (an oblique rotation, e.g. 20 degrees about z) stays in the canonical
``direction`` as a small residual rotation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from covidtrack.volume import Mat3, ScanMeta, SourceGrid, Vec3, Volume


@dataclass(frozen=True)
class AxisMap:
    """How canonical ITK index axis ``j`` (0 = x, 1 = y, 2 = z) is made from the source axes.

    ``src_axis[j]`` is the source ITK index axis that runs along canonical axis ``j``;
    ``flip[j]`` is True when it runs the opposite way (toward R, A or I).
    """

    src_axis: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.src_axis == (0, 1, 2) and not any(self.flip)


@dataclass(frozen=True)
class CanonicalGeometry:
    """Geometry of the canonical grid in ITK terms (x, y, z order)."""

    size: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: Mat3


def _matrix(direction: Mat3 | tuple[float, ...]) -> np.ndarray:
    mat = np.asarray(direction, dtype=float).reshape(3, 3)
    return mat


def axis_map(direction: Mat3 | tuple[float, ...]) -> AxisMap:
    """The permutation / flip that brings a direction matrix closest to identity (LPS).

    ``direction`` is the ITK row-major 3x3 matrix whose columns are the index axes in world
    (LPS) coordinates. Among the 6 permutations we take the one whose matched components have
    the largest total magnitude, which is unambiguous for anything but a 45-degree oblique.
    """
    mat = _matrix(direction)
    best: tuple[int, int, int] = (0, 1, 2)
    best_score = -1.0
    for perm in itertools.permutations(range(3)):
        # perm[j] = source index axis assigned to world axis j
        score = sum(abs(mat[j, perm[j]]) for j in range(3))
        if score > best_score + 1e-9:
            best, best_score = perm, score  # type: ignore[assignment]
    flip = tuple(bool(mat[j, best[j]] < 0) for j in range(3))
    return AxisMap(src_axis=best, flip=flip)  # type: ignore[arg-type]


def _transpose_axes(amap: AxisMap) -> list[int]:
    # numpy axis order is (z, y, x) = ITK axes (2, 1, 0); numpy axis of ITK axis a is 2 - a.
    return [2 - amap.src_axis[2], 2 - amap.src_axis[1], 2 - amap.src_axis[0]]


def canonical_geometry(grid: SourceGrid) -> CanonicalGeometry:
    """Size, spacing, origin and direction of the canonical grid of a source grid."""
    amap = axis_map(grid.direction)
    mat = _matrix(grid.direction)
    size = np.asarray(grid.size, dtype=float)
    spacing = np.asarray(grid.spacing, dtype=float)
    new_dir = np.zeros((3, 3))
    first_index = np.zeros(3)  # source continuous index of canonical voxel (0, 0, 0)
    for j in range(3):
        src = amap.src_axis[j]
        sign = -1.0 if amap.flip[j] else 1.0
        new_dir[:, j] = sign * mat[:, src] + 0.0  # + 0.0 turns -0.0 into 0.0
        if amap.flip[j]:
            first_index[src] = size[src] - 1
    origin = np.asarray(grid.origin, dtype=float) + mat @ (first_index * spacing)
    return CanonicalGeometry(
        size=tuple(int(grid.size[amap.src_axis[j]]) for j in range(3)),  # type: ignore[arg-type]
        spacing=tuple(float(spacing[amap.src_axis[j]]) for j in range(3)),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in new_dir.ravel()),  # type: ignore[arg-type]
    )


def to_canonical(array: np.ndarray, grid: SourceGrid) -> np.ndarray:
    """Source-grid array (numpy z, y, x of the source index axes) -> canonical array (a view)."""
    if tuple(array.shape[::-1]) != tuple(grid.size):
        raise ValueError(f"array shape {array.shape} does not match source size {grid.size} (x, y, z)")
    amap = axis_map(grid.direction)
    out = np.transpose(array, _transpose_axes(amap))
    for j in range(3):
        if amap.flip[j]:
            out = np.flip(out, axis=2 - j)
    return out


def from_canonical(array: np.ndarray, grid: SourceGrid) -> np.ndarray:
    """Canonical array -> array on the source grid (exact inverse of :func:`to_canonical`)."""
    amap = axis_map(grid.direction)
    expected = tuple(int(grid.size[amap.src_axis[j]]) for j in (2, 1, 0))
    if tuple(array.shape) != expected:
        raise ValueError(f"canonical array shape {array.shape} does not match {expected} for this source grid")
    out = array
    for j in range(3):
        if amap.flip[j]:
            out = np.flip(out, axis=2 - j)
    return np.transpose(out, np.argsort(_transpose_axes(amap)))


def residual_rotation_deg(direction: Mat3 | tuple[float, ...]) -> float:
    """Angle (degrees) between a canonical direction matrix and the identity."""
    mat = _matrix(direction)
    cos = (np.trace(mat) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def orientation_code(direction: Mat3 | tuple[float, ...]) -> str:
    """Three letters naming where the index axes x, y, z point (e.g. ``LPS``, ``RAS``, ``LSA``)."""
    amap = axis_map(direction)
    letters = {0: ("L", "R"), 1: ("P", "A"), 2: ("S", "I")}
    code = [""] * 3
    for world in range(3):
        src = amap.src_axis[world]
        code[src] = letters[world][1 if amap.flip[world] else 0]
    return "".join(code)


def canonical_volume(array: np.ndarray, grid: SourceGrid, meta: ScanMeta) -> Volume:
    """Wrap an int16 HU array on its source grid as a canonical :class:`Volume` (keeps ``grid``)."""
    geo = canonical_geometry(grid)
    return Volume(
        array=np.ascontiguousarray(to_canonical(array, grid)),
        spacing=geo.spacing[::-1],  # type: ignore[arg-type]  # (x, y, z) -> (z, y, x)
        origin=geo.origin,
        direction=geo.direction,
        meta=meta,
        source=grid,
    )
