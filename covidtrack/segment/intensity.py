"""One lung-window intensity normalisation for both kinds of input the infection model sees.

- CT volumes arrive in Hounsfield units (HU). :func:`window_hu` maps the lung window
  ``[center - width/2, center + width/2]`` HU linearly to ``[0, 1]`` and clips outside it.
- The 2D training slices (MedSeg, COVID-19-CT-Seg exports) are 8-bit JPG/PNG images that were
  already windowed by whoever exported them; :func:`unit_from_uint8` maps 0..255 to ``[0, 1]``.

Both land in the same unit range, so one network serves both. The window below was chosen to
match the grey levels of the MedSeg slices (aerated lung about -860 HU near 0.24, soft tissue
about +40 HU near 0.89). The exported slices of other sources use other windows (the
coronacases slices put soft tissue near 0.5), so training augments with random re-windowing
(:func:`rewindow`) instead of trusting any single window.
"""

from __future__ import annotations

import numpy as np

#: Lung window used for HU volumes (HU). Lower edge -1200 HU, upper edge +200 HU.
WINDOW_CENTER_HU: float = -500.0
WINDOW_WIDTH_HU: float = 1400.0


def window_hu(
    hu: np.ndarray, center: float = WINDOW_CENTER_HU, width: float = WINDOW_WIDTH_HU
) -> np.ndarray:
    """HU (any shape, any numeric dtype) -> float32 in [0, 1] through a linear lung window.

    ``center`` and ``width`` are in HU; values below ``center - width/2`` become 0, values
    above ``center + width/2`` become 1.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive (HU), got {width}")
    low = center - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def unit_from_uint8(image: np.ndarray) -> np.ndarray:
    """An 8-bit lung-window image (0..255) -> float32 in [0, 1].

    Raises ``ValueError`` for other dtypes: a 16-bit or HU array passed here by mistake would
    silently saturate, so it must go through :func:`window_hu` instead.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image (uint8), got {image.dtype}; use window_hu for HU data")
    return image.astype(np.float32) / np.float32(255.0)


def hu_from_unit(unit: np.ndarray, center: float = WINDOW_CENTER_HU, width: float = WINDOW_WIDTH_HU) -> np.ndarray:
    """Inverse of :func:`window_hu` inside the window (float32 HU); clipped values stay clipped."""
    low = center - width / 2.0
    return np.asarray(unit, dtype=np.float32) * np.float32(width) + np.float32(low)


def rewindow(unit: np.ndarray, scale: float, offset: float, gamma: float = 1.0) -> np.ndarray:
    """Simulate an image exported with another window, then a display gamma.

    A window ``(low', width')`` applied to the same HU gives ``x' = x * width/width' +
    (low - low')/width'``, i.e. an affine map of the unit image; ``scale`` and ``offset`` are
    those two numbers. Values are clipped to [0, 1] as an exporter would, then raised to
    ``gamma``.
    """
    out = np.clip(np.asarray(unit, dtype=np.float32) * np.float32(scale) + np.float32(offset), 0.0, 1.0)
    if gamma != 1.0:
        out = np.power(out, np.float32(gamma), dtype=np.float32)
    return out
