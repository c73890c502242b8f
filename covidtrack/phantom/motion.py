"""Patient pose and breathing between scans, the true displacement, and warping.

Conventions (all series share one grid: shape, spacing, origin):

- positions are "index mm": ``index * spacing`` with components in (z, y, x) array-axis order;
- a follow-up is rendered by sampling the body (the baseline frame) at ``G(x)`` for each of its
  voxel centres ``x``: ``G(x) = y + w(y)`` with ``y = c + R (x - c) + t`` (rigid pose change
  about the grid centre ``c``) and ``w`` a smooth breathing (inspiration depth) field;
- the truth displacement ``u`` lives on the BASELINE grid: for a baseline voxel centre ``q`` the
  same tissue lies at ``q + u(q)`` in the follow-up, i.e. ``G(q + u(q)) = q``. It is found by
  fixed-point iteration ``u <- u - (G(q + u) - q)``, which converges because ``G`` is close to
  the identity (rotations of a few degrees, breathing gradients of a few percent), and is exact
  to far below a micrometre on the control grid;
- ``value(q) = followup(q + u(q))`` (:func:`warp_to_baseline`) brings a follow-up into baseline
  space, exactly what an ANTs transform with fixed = baseline, moving = follow-up does.

Fields are evaluated analytically on a control grid of about 8 mm and upsampled trilinearly:
the rigid part is linear, so it stays exact; the breathing part varies over centimetres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from covidtrack.phantom.anatomy import AnatomyParams
from covidtrack.phantom.grid import Grid, upsample

CONTROL_SPACING_MM = 8.0


@dataclass(frozen=True)
class PoseChange:
    """Change from the baseline: rotation (degrees about the z, y, x axes), shift (mm, z, y, x),
    and inspiration depth (mm the lung bases move down; negative = shallower breath)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    inspiration_mm: float = 0.0


def sample_pose(rng: np.random.Generator, scale: float = 1.0) -> PoseChange:
    """A small, plausible repositioning: a few degrees, some mm, a deeper or shallower breath."""
    rot = np.clip(rng.normal(0.0, 1.5, 3), -4.0, 4.0)
    shift = np.clip(rng.normal(0.0, 4.0, 3), -10.0, 10.0)
    insp = rng.uniform(-10.0, 10.0) * scale
    return PoseChange(tuple(float(v) for v in rot), tuple(float(v) for v in shift), float(insp))  # type: ignore[arg-type]


def rotation_matrix(deg: tuple[float, float, float]) -> np.ndarray:
    """3x3 rotation acting on (z, y, x) vectors: about z (axial plane), then y, then x."""
    az, ay, ax = np.deg2rad(deg)
    rz = np.array([[1, 0, 0], [0, np.cos(az), -np.sin(az)], [0, np.sin(az), np.cos(az)]])  # turns y, x
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])  # turns z, x
    rx = np.array([[np.cos(ax), -np.sin(ax), 0], [np.sin(ax), np.cos(ax), 0], [0, 0, 1]])  # turns z, y
    return rx @ ry @ rz


class BodyMap:
    """``G``: follow-up voxel centre (index mm) -> body (baseline) position (index mm)."""

    def __init__(self, grid: Grid, anatomy: AnatomyParams, pose: PoseChange) -> None:
        self.grid = grid
        self.p = anatomy
        self.pose = pose
        self.centre = (np.array(grid.shape) - 1) * np.array(grid.spacing) / 2.0
        self.rot = rotation_matrix(pose.rotation_deg)
        self.shift = np.array(pose.translation_mm)

    def breathing(self, y: np.ndarray) -> np.ndarray:
        """Breathing field ``w`` (mm) at body positions ``y`` (..., 3).

        With a deeper breath the diaphragm descends and the anterior chest wall rises, so a
        fixed voxel near the bases sees tissue from higher up and further back: ``w_z > 0``
        at the bases fading to 0 at the apices, ``w_y > 0`` anteriorly.
        """
        p = self.p
        a = y + self.grid.offset  # anatomical mm
        h = (a[..., 0] - p.z_base) / p.lung_height
        base = 0.5 * (1.0 - np.tanh((h - 0.45) / 0.25))
        inplane = np.exp(-0.5 * ((a[..., 2] / (1.5 * p.cavity_half_width)) ** 2 + ((a[..., 1] - p.cavity_y) / (1.8 * p.cavity_half_depth)) ** 2))
        front = 0.5 * (1.0 - np.tanh((a[..., 1] - p.cavity_y) / p.cavity_half_depth))
        w = np.zeros_like(y)
        w[..., 0] = self.pose.inspiration_mm * base * inplane
        w[..., 1] = 0.35 * self.pose.inspiration_mm * (0.5 + 0.5 * base) * inplane * front
        return w

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = (x - self.centre) @ self.rot.T + self.centre + self.shift
        return y + self.breathing(y)

    def inverse(self, q: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Follow-up position of body point ``q``: solves ``G(x) = q`` by fixed-point iteration."""
        x = q.copy()
        for _ in range(iterations):
            residual = self(x) - q
            x -= residual
            if float(np.abs(residual).max()) < 1e-6:
                break
        return x


def control_points(grid: Grid) -> tuple[tuple[int, int, int], np.ndarray]:
    """Control grid (about 8 mm, including both ends of every axis) as index-mm positions."""
    size = tuple(max(2, int(np.ceil((n - 1) * s / CONTROL_SPACING_MM)) + 1) for n, s in zip(grid.shape, grid.spacing))
    axes = [np.linspace(0.0, (n - 1) * s, m) for n, s, m in zip(grid.shape, grid.spacing, size)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return size, pts  # type: ignore[return-value]


def true_displacement(body_map: BodyMap) -> np.ndarray:
    """``u`` (float32, (z, y, x, 3) mm) on the baseline grid; see the module docstring."""
    _, q = control_points(body_map.grid)
    u = body_map.inverse(q) - q
    return upsample(u, body_map.grid.shape)


def render_followup(body_map: BodyMap, hu: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample the body-frame HU (trilinear) and label code (nearest) at ``G(x)``.

    Returns (HU, code, J) on the follow-up grid; ``J = det dG/dx`` is the local volume ratio,
    used to make lung density follow the breath (HU + 1000 scales with J).
    """
    import torch

    grid = body_map.grid
    size, x = control_points(grid)
    g = body_map(x)
    # Jacobian determinant by central differences on the control grid (index-mm units)
    step = 0.5
    jac = np.empty(x.shape[:-1] + (3, 3))
    for k in range(3):
        e = np.zeros(3)
        e[k] = step
        jac[..., :, k] = (body_map(x + e) - body_map(x - e)) / (2 * step)
    det = np.linalg.det(jac)[..., None]
    # one upsampling gives the sampling positions (as voxel indices) and the volume ratio
    fields = upsample(np.concatenate([g / np.array(grid.spacing), det], axis=-1), grid.shape)
    index = fields[..., :3]
    # labels: nearest neighbour by rounding (exact label values, no interpolation)
    flat = np.zeros(grid.shape, dtype=np.int64)
    for k, n in enumerate(grid.shape):
        ik = np.rint(index[..., k]).astype(np.int64)
        np.clip(ik, 0, n - 1, out=ik)
        flat *= n
        flat += ik
    out_code = code.reshape(-1)[flat]
    del flat
    # HU: trilinear, grid_sample wants normalised (x, y, z) in [-1, 1] (align_corners=True)
    scale = (2.0 / np.maximum(np.array(grid.shape) - 1, 1)).astype(np.float32)
    norm = np.empty(grid.shape + (3,), dtype=np.float32)
    for k in range(3):
        np.multiply(index[..., k], scale[k], out=norm[..., 2 - k])
    norm -= 1.0
    hu_t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    out_hu = torch.nn.functional.grid_sample(
        hu_t, torch.from_numpy(norm)[None], mode="bilinear", padding_mode="border", align_corners=True
    )
    return out_hu[0, 0].numpy(), out_code, np.ascontiguousarray(fields[..., 3])


def warp_to_baseline(
    array: np.ndarray,
    displacement: np.ndarray,
    spacing: tuple[float, float, float],
    order: int = 1,
) -> np.ndarray:
    """Pull a follow-up array back onto the baseline grid: ``value(q) = array(q + u(q))``.

    ``displacement`` is a Truth's ``(z, y, x, 3)`` field in mm; ``spacing`` (z, y, x) mm.
    ``order`` 0 (nearest) for label maps, 1 (linear) for HU. Outside the image the nearest
    edge value is used. Returns an array of ``array``'s dtype.
    """
    if displacement.shape != (*array.shape, 3):
        raise ValueError(f"displacement shape {displacement.shape} does not match array {array.shape} + (3,)")
    out = np.empty(array.shape, dtype=array.dtype)
    src = array.astype(np.float32) if order > 0 else array
    ny, nx = array.shape[1:]
    iy, ix = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32), indexing="ij")
    inv = 1.0 / np.asarray(spacing, dtype=np.float32)
    chunk = max(1, int(2_000_000 // (ny * nx)))  # bound the memory of the coordinate arrays
    for z0 in range(0, array.shape[0], chunk):
        z1 = min(z0 + chunk, array.shape[0])
        u = displacement[z0:z1]
        coords = np.empty((3, z1 - z0, ny, nx), dtype=np.float32)
        coords[0] = np.arange(z0, z1, dtype=np.float32)[:, None, None] + u[..., 0] * inv[0]
        coords[1] = iy[None] + u[..., 1] * inv[1]
        coords[2] = ix[None] + u[..., 2] * inv[2]
        vals = ndi.map_coordinates(src, coords, order=order, mode="nearest")
        out[z0:z1] = np.rint(vals).astype(array.dtype) if order > 0 and np.issubdtype(array.dtype, np.integer) else vals
    return out
