"""The phantom's voxel grid and its anatomical millimetre coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A (z, y, x) voxel grid with spacing in mm.

    Anatomical coordinates (mm), used to describe the anatomy independently of the grid:
    ``z`` from the bottom slice upwards (feet -> head), ``y`` from the FOV centre towards the
    patient's back (anterior -> posterior), ``x`` from the FOV centre towards the patient's left
    (so the right lung has negative x, i.e. low x indices, as in the canonical orientation).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    @property
    def offset(self) -> np.ndarray:
        """Anatomical coordinate (mm) of voxel index 0 along each axis."""
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        return np.array([0.0, -(ny - 1) * sy / 2.0, -(nx - 1) * sx / 2.0])

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable float32 coordinate arrays Z (nz,1,1), Y (1,ny,1), X (1,1,nx) in mm."""
        off = self.offset
        z, y, x = (off[i] + np.arange(n, dtype=np.float64) * s for i, (n, s) in enumerate(zip(self.shape, self.spacing)))
        return (
            z.astype(np.float32)[:, None, None],
            y.astype(np.float32)[None, :, None],
            x.astype(np.float32)[None, None, :],
        )

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Anatomical mm (..., 3) -> fractional voxel index (..., 3)."""
        return (np.asarray(points, dtype=np.float64) - self.offset) / np.array(self.spacing)

    def to_mm(self, index: np.ndarray) -> np.ndarray:
        """Fractional voxel index (..., 3) -> anatomical mm (..., 3)."""
        return np.asarray(index, dtype=np.float64) * np.array(self.spacing) + self.offset


def _linear_weights(n_out: int, n_in: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbours and weights for linear interpolation from ``n_in`` to ``n_out`` samples.

    Ends aligned by default; with ``stride`` the coarse samples sit at every ``stride``-th
    output position (as from ``a[::stride]``), and positions past the last one are held.
    """
    if stride is None:
        pos = np.linspace(0.0, n_in - 1, n_out)
    else:
        pos = np.minimum(np.arange(n_out) / stride, n_in - 1)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(n_in - 2, 0))
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def upsample(field: np.ndarray, shape: tuple[int, int, int], stride: tuple[int, int, int] | None = None) -> np.ndarray:
    """Trilinear upsampling of a control-grid field (cz, cy, cx, C) to (nz, ny, nx, C), float32.

    The control grid spans the full grid end to end, or, with ``stride``, was sampled as
    ``full[::sz, ::sy, ::sx]``.

    Separable (x, then y on the small grid, then z slice by slice): a few multiply-adds per
    output value, cheaper than torch's interpolate plus a channels-last copy.
    """
    f = np.asarray(field, dtype=np.float32)
    for axis in (2, 1):
        i0, i1, w = _linear_weights(shape[axis], f.shape[axis], None if stride is None else stride[axis])
        a, b = np.take(f, i0, axis=axis), np.take(f, i1, axis=axis)
        bshape = [1] * f.ndim
        bshape[axis] = shape[axis]
        f = a + (b - a) * w.reshape(bshape)
    i0, i1, w = _linear_weights(shape[0], f.shape[0], None if stride is None else stride[0])
    out = np.empty((shape[0],) + f.shape[1:], dtype=np.float32)
    for z in range(shape[0]):
        np.subtract(f[i1[z]], f[i0[z]], out=out[z])
        out[z] *= w[z]
        out[z] += f[i0[z]]
    return out
