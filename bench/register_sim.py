"""Simulated follow-ups with a known deformation, for the registration benchmark and tests.

``simulate_followup`` deforms a real (or phantom) CT with a smooth known mapping
``T(p) = R (p - c) + c + t + sum_k a_k exp(-|p - c_k|^2 / (2 s^2))`` (LPS mm): the tissue at
baseline point ``p`` sits at ``T(p)`` in the follow-up. That is the same fixed -> moving mapping
an ANTs registration with fixed = baseline recovers, so the error of a registration is
``|T_hat(p) - T(p)|`` over baseline lung voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidtrack.register import Grid
from covidtrack.volume import Volume


@dataclass(frozen=True)
class KnownMap:
    """Smooth fixed -> moving mapping in LPS (x, y, z) mm (see the module docstring)."""

    center: np.ndarray  # (3,) mm, rotation centre
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) mm
    bump_centers: np.ndarray  # (K, 3) mm
    bump_amplitudes: np.ndarray  # (K, 3) mm
    bump_sigma_mm: float

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        return (p - self.center) @ self.rotation.T + self.center + self.translation + self._bumps(p)

    def _bumps(self, p: np.ndarray) -> np.ndarray:
        out = np.zeros_like(p)
        for c, a in zip(self.bump_centers, self.bump_amplitudes):
            w = np.exp(-((p - c) ** 2).sum(axis=1) / (2 * self.bump_sigma_mm**2))
            out += w[:, None] * a
        return out

    def inverse(self, q: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Baseline points for follow-up points ``q`` (fixed-point iteration; the bumps have
        gradients well below 1, so it converges to << 0.01 mm)."""
        q = np.asarray(q, dtype=np.float64)
        rinv = self.rotation.T
        x = (q - self.center - self.translation) @ rinv.T + self.center
        for _ in range(iterations):
            x = (q - self.center - self.translation - self._bumps(x)) @ rinv.T + self.center
        return x


def rotation_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def random_map(grid: Grid, lungs: np.ndarray, seed: int, rotation_deg: float = 4.0, shift_mm: float = 8.0,
               bump_mm: float = 6.0, n_bumps: int = 6, sigma_mm: float = 40.0) -> KnownMap:
    """A rotation about z (plus a small tilt), a shift and smooth bumps centred in the lungs."""
    rng = np.random.default_rng(seed)
    idx = np.argwhere(lungs > 0)
    pts = grid.physical_points(idx[rng.choice(len(idx), size=n_bumps, replace=False)])
    centre = grid.physical_points(idx.mean(axis=0)[None, :])[0]
    tilt = np.deg2rad(rng.uniform(-1.5, 1.5))
    rx = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    direction = rng.normal(size=3)
    return KnownMap(
        center=centre,
        rotation=rotation_z(rotation_deg * rng.choice([-1, 1])) @ rx,
        translation=shift_mm * direction / np.linalg.norm(direction),
        bump_centers=pts,
        bump_amplitudes=rng.uniform(-bump_mm, bump_mm, size=(n_bumps, 3)),
        bump_sigma_mm=sigma_mm,
    )


def warp_with_map(volume: Volume, lungs: np.ndarray, known: KnownMap, coarse_mm: float = 8.0) -> tuple[Volume, np.ndarray]:
    """The follow-up on the baseline's grid: ``moving(q) = fixed(T^-1(q))`` (CT linear, lungs
    nearest). ``T^-1`` is evaluated every ``coarse_mm`` and interpolated (it is smooth)."""
    import SimpleITK as sitk

    grid = Grid.of(volume)
    step = np.maximum(1, np.round(coarse_mm / np.asarray(volume.spacing)).astype(int))
    cshape = tuple(int(np.ceil(s / st)) + 1 for s, st in zip(volume.shape, step))
    zz, yy, xx = np.meshgrid(*[np.arange(n) * st for n, st in zip(cshape, step)], indexing="ij")
    idx = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    q = grid.physical_points(idx)
    disp = (known.inverse(q) - q).reshape(*cshape, 3)
    field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
    field.SetSpacing(tuple(float(s * st) for s, st in zip(volume.spacing[::-1], step[::-1])))
    field.SetOrigin(volume.origin)
    field.SetDirection(volume.direction)
    # ITK interpolates the coarse field linearly at every output voxel (no dense field in memory).
    tx = sitk.DisplacementFieldTransform(field)
    ref = volume.to_sitk()
    ct = sitk.Resample(ref, ref, tx, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    lab = sitk.Resample(volume.to_sitk(lungs), ref, tx, sitk.sitkNearestNeighbor, 0)
    moved = volume.with_array(sitk.GetArrayFromImage(ct))
    return moved, sitk.GetArrayFromImage(lab).astype(np.uint8)


def lung_errors_mm(reg_map_points, grid: Grid, lungs: np.ndarray, known_fn, max_points: int = 20000,
                   seed: int = 0) -> np.ndarray:
    """|T_hat(p) - T(p)| (mm) at up to ``max_points`` random baseline lung voxels."""
    rng = np.random.default_rng(seed)
    idx = np.argwhere(lungs > 0)
    if len(idx) > max_points:
        idx = idx[rng.choice(len(idx), size=max_points, replace=False)]
    p = grid.physical_points(idx)
    return np.linalg.norm(reg_map_points(p) - known_fn(p), axis=1)
