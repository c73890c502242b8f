"""Checks at the boundary: is this a usable 3D CT volume in Hounsfield units?

Everything here is a pure function over numbers that raises a typed
:class:`~covidtrack.errors.InputError` naming the file and the fix.

HU heuristics (documented in README.d/io.md; thresholds are deliberately loose so that any
real chest CT passes and only clearly wrong inputs are refused):

1. 8-bit data (uint8/bool pixels, or DICOM BitsStored <= 8) is a display export, not HU.
2. No negative values at all: raw stored values without RescaleIntercept (if max > 255)
   or 0-255 display values (max <= 255).
3. Value range narrower than 200 HU: a normalised image (0-1, -1..1) or a label map.
4. More than 1 % of voxels below -1200 HU that are not one constant padding value: air has
   been shifted (e.g. the intercept applied twice puts air at -2024).
5. Almost no air: fewer than 0.2 % of voxels between -1150 and -850 HU. A chest CT always
   contains air (outside the body, trachea, lungs around -850); a volume whose "air" sits
   elsewhere (e.g. -2048 after subtracting the intercept twice) is not in HU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidtrack.errors import GeometryError, IntensityError

MIN_SLICES = 10
GAP_FACTOR = 1.5  # a step larger than this times the median spacing means missing slices
SPACING_REL_TOL = 0.1  # each slice within 10 % of the spacing of one uniform grid ...
SPACING_ABS_TOL_MM = 0.06  # ... or 0.06 mm (positions rounded to 0.1 mm in some headers)
HU_FLOOR = -1024  # physical minimum (air); lower values are FOV padding and are clipped to it
AIR_BAND_HU = (-1150.0, -850.0)
MIN_AIR_FRACTION = 0.002
MIN_RANGE_HU = 200.0
FAR_BELOW_AIR_HU = -1200.0
MAX_FAR_BELOW_AIR_FRACTION = 0.01


def sample(array: np.ndarray, max_voxels: int = 2_000_000) -> np.ndarray:
    """A strided subsample (flattened) so that statistics stay cheap on 512x512x600 volumes."""
    step = max(1, int(np.ceil((array.size / max_voxels) ** (1 / 3))))
    return np.asarray(array[::step, ::step, ::step]).ravel()


def check_hu(values: np.ndarray, path: str | Path, stored_dtype: np.dtype | None = None) -> None:
    """Refuse intensities that are not Hounsfield units (see the module docstring)."""
    fix_8bit = (
        "load the original scan (DICOM from the scanner/PACS or a NIfTI exported in HU); "
        "windowed 8-bit images cannot be converted back to HU"
    )
    if stored_dtype is not None and (np.dtype(stored_dtype).itemsize == 1 or np.dtype(stored_dtype) == bool):
        raise IntensityError(path, f"the image is stored as 8-bit values ({np.dtype(stored_dtype)}), not HU", fix_8bit)
    vals = sample(values) if values.ndim > 1 else values
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        raise IntensityError(path, "the image has no finite values", "re-export the scan")
    vmin, vmax = float(vals.min()), float(vals.max())
    if vmin >= 0:
        if vmax <= 255:
            raise IntensityError(path, f"values range {vmin:g}..{vmax:g} look like 0-255 display values, not HU", fix_8bit)
        raise IntensityError(
            path,
            f"values range {vmin:g}..{vmax:g} with no negative value: raw stored values without the rescale "
            "intercept (air should be about -1000 HU)",
            "export the scan with RescaleSlope/RescaleIntercept applied (usually HU = value - 1024), "
            "or load the original DICOM series",
        )
    if vmax - vmin < MIN_RANGE_HU:
        raise IntensityError(
            path,
            f"values span only {vmin:g}..{vmax:g}: a normalised image or a label map, not a CT in HU",
            "load the CT itself in HU (a mask belongs in load_mask / the mask import)",
        )
    below = vals[vals < FAR_BELOW_AIR_HU]
    if below.size:
        # FOV padding is one constant value (-2048, -3024, ...); anything else this low is not HU
        _, counts = np.unique(below, return_counts=True)
        spread = (below.size - counts.max()) / vals.size
        if spread > MAX_FAR_BELOW_AIR_FRACTION:
            raise IntensityError(
                path,
                f"{100 * spread:.1f} % of voxels lie below {FAR_BELOW_AIR_HU:g} HU with varying values (min {vmin:g}); "
                "air is -1000 HU, so the values look shifted (rescale intercept applied twice?)",
                "check that the values are HU (RescaleSlope/Intercept applied once); load the original scan",
            )
    lo, hi = AIR_BAND_HU
    air = float(np.mean((vals >= lo) & (vals <= hi)))
    if air < MIN_AIR_FRACTION:
        raise IntensityError(
            path,
            f"almost no voxels near air (-1000 HU): {100 * air:.3f} % in {lo:g}..{hi:g} HU (range {vmin:g}..{vmax:g}); "
            "a chest CT in HU always shows air",
            "check that the values are HU (RescaleSlope/Intercept applied once); load the original scan",
        )


def check_slice_steps(positions_mm: np.ndarray, path: str | Path, names: list[str] | None = None) -> float:
    """Validate sorted slice positions along the slice normal; return the uniform spacing (mm).

    Raises :class:`GeometryError` for fewer than :data:`MIN_SLICES` slices, duplicate
    positions, missing slices (a gap > 1.5x the median step) and non-uniform spacing.
    ``names`` (same order as ``positions_mm``) lets the message point at the files around a gap.
    """
    n = len(positions_mm)
    if n == 1:
        raise GeometryError(
            path, "a single 2D image, not a 3D CT volume",
            "load the folder that holds the whole series (all slices of the scan)",
        )
    if n < MIN_SLICES:
        raise GeometryError(
            path, f"only {n} slices; covidtrack needs at least {MIN_SLICES} for a chest CT",
            "load the complete series (check that the export did not stop early)",
        )
    steps = np.diff(np.asarray(positions_mm, dtype=float))
    label = (lambda i: f"{names[i]} and {names[i + 1]}") if names else (lambda i: f"slices {i} and {i + 1}")
    dup = np.flatnonzero(np.abs(steps) < 1e-3)
    if dup.size:
        raise GeometryError(
            path, f"{dup.size} duplicate slice position(s), first between {label(int(dup[0]))}; "
            "the folder mixes several acquisitions or phases under one series",
            "export one acquisition/phase per folder, or pass series_uid of a single series",
        )
    median = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * median)
    if gaps.size:
        i = int(gaps[0])
        raise GeometryError(
            path, f"missing slices: {gaps.size} gap{'s' if gaps.size > 1 else ''} larger than {GAP_FACTOR}x the median spacing {median:.3g} mm, "
            f"first a {steps[i]:.3g} mm step between {label(i)}",
            "re-export the complete series; covidtrack does not interpolate missing slices",
        )
    # Uniformity is judged on positions, not steps: headers round positions (sometimes to 0.1 mm),
    # which makes single steps jitter, but every slice must sit close to one uniform grid.
    k = np.arange(n, dtype=float)
    slope, intercept = np.polyfit(k, np.asarray(positions_mm, dtype=float), 1)
    resid = np.asarray(positions_mm, dtype=float) - (intercept + slope * k)
    tol = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * slope)
    worst = int(np.argmax(np.abs(resid)))
    if abs(resid[worst]) > tol:
        where = names[worst] if names else f"slice {worst}"
        raise GeometryError(
            path, f"non-uniform slice spacing: steps from {steps.min():.4g} to {steps.max():.4g} mm "
            f"(median {median:.4g} mm); {where} lies {resid[worst]:+.3g} mm off a uniform stack "
            f"(tolerance {tol:.3g} mm)",
            "reconstruct or resample the series to uniform spacing (e.g. in the scanner console, 3D Slicer "
            "or dcm2niix), then load it again",
        )
    return float(slope)


def as_int16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Round to int16, clipping at the int16 limits; return the array and how many were clipped."""
    if values.dtype == np.int16:
        return values, 0
    if np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    info = np.iinfo(np.int16)
    clipped = int(np.count_nonzero((values < info.min) | (values > info.max)))
    return np.clip(values, info.min, info.max).astype(np.int16), clipped


def apply_hu_floor(array: np.ndarray) -> list[str]:
    """Set values below -1024 HU (padding outside the reconstruction circle) to -1024, in place.

    Air is -1000 HU; scanners fill the corners outside the field of view with -2048 or -3024,
    which would otherwise distort density statistics. Returns a note when anything changed.
    """
    below = 0
    for slab in array:  # slab by slab: no full-size temporary mask on 512x512x600 volumes
        n = int(np.count_nonzero(slab < HU_FLOOR))
        if n:
            below += n
            np.maximum(slab, HU_FLOOR, out=slab)
    if not below:
        return []
    return [f"{below} voxels below {HU_FLOOR} HU (field-of-view padding) set to {HU_FLOOR} HU"]
