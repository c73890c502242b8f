"""The aligned follow-up viewer as pure numpy: slices of every timepoint in baseline space, composed
to RGB with the infection overlay and lobe / lung outlines. The dashboard wraps these images in
plotly figures (:mod:`covidtrack.report.figures`); the PDF embeds them as PNG.

Planes follow the canonical orientation of :mod:`covidtrack.volume`: an axial slice ``array[k]``
shows the patient's right on the viewer's left and anterior at the top; a coronal slice
``array[:, j, :]`` is flipped so the head is at the top. Slices are resampled to square pixels
(mm) so coronal views of thick-slice scans are not squashed.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

Plane = Literal["axial", "coronal"]
Overlay = Literal["lobes", "regions", "change", "none"]

# Lung window (W 1500, L -600 HU): shows GGO and consolidation against aerated lung.
WINDOW_LO_HU, WINDOW_HI_HU = -1350.0, 150.0

# Overlay colours (RGB). GGO and consolidation must differ in hue and lightness so they read in print.
INFECTION_COLOURS = {1: (255, 200, 0), 2: (230, 30, 30)}  # GGO amber, consolidation red
# change map labels (covidtrack.labels.CHANGE_LABELS): 1 new red, 2 resolved green, 3 persistent amber
CHANGE_COLOURS = {1: (230, 30, 30), 2: (40, 180, 70), 3: (255, 200, 0)}
#: the baseline panel of the change view: its infection is the reference, neither new, resolved
#: nor persistent (label 4 of the fill)
BASELINE_REFERENCE = 4
BASELINE_COLOUR = (200, 90, 220)
LOBE_COLOURS = {
    1: (31, 119, 180),  # RUL
    2: (148, 103, 189),  # RML
    3: (23, 190, 207),  # RLL
    4: (44, 160, 44),  # LUL
    5: (255, 127, 14),  # LLL
}
LUNG_COLOURS = {1: (31, 119, 180), 2: (44, 160, 44)}  # right, left
LOBE_LEGEND = "lobe borders: RUL blue, RML purple, RLL cyan, LUL green, LLL orange"
OVERLAY_ALPHA = 0.5


@dataclass(frozen=True, eq=False)
class AlignedSeries:
    """One patient's timepoints resampled into the baseline scan's canonical grid.

    Every array has the baseline's shape ``(z, y, x)``; ``spacing`` is the baseline's (mm).
    ``ct`` int16 HU; ``infection`` uint8 (1 GGO, 2 consolidation); ``lungs`` uint8 (1 right,
    2 left); ``lobes`` uint8 (1-5) or None; ``change`` uint8 (1 new, 2 resolved, 3 persistent
    relative to the baseline) or None for the baseline and unregistered timepoints.
    ``registered[i]`` says whether timepoint ``i`` was warped (False: shown on its own grid
    resampled to the baseline's shape, i.e. not anatomically aligned).
    """

    dates: tuple[str, ...]
    days: tuple[int, ...]
    spacing: tuple[float, float, float]
    ct: tuple[np.ndarray, ...]
    infection: tuple[np.ndarray, ...]
    lungs: tuple[np.ndarray, ...]
    lobes: tuple[np.ndarray | None, ...]
    change: tuple[np.ndarray | None, ...]
    registered: tuple[bool, ...]

    def __post_init__(self) -> None:
        n = len(self.dates)
        for name in ("days", "ct", "infection", "lungs", "lobes", "change", "registered"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"AlignedSeries.{name} has {len(getattr(self, name))} entries, expected {n}")
        shape = self.ct[0].shape if n else None
        for arr in (*self.ct, *self.infection, *self.lungs):
            if arr.shape != shape:
                raise ValueError(f"every array must have the baseline shape {shape}, got {arr.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.ct[0].shape)  # type: ignore[return-value]

    def n_slices(self, plane: Plane) -> int:
        return self.shape[0] if plane == "axial" else self.shape[1]

    def key_slice(self, plane: Plane = "axial") -> int:
        """The slice with the most infection summed over all dates (the middle of the lungs if none)."""
        axes = (1, 2) if plane == "axial" else (0, 2)
        total = sum((inf > 0).sum(axis=axes) for inf in self.infection)
        if np.any(total):
            return int(np.argmax(total))
        lung = (self.lungs[0] > 0).sum(axis=axes)
        idx = np.nonzero(lung)[0]
        return int(idx[len(idx) // 2]) if len(idx) else self.n_slices(plane) // 2


def take_slice(arr: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """A 2D slice in display orientation (see the module docstring)."""
    if plane == "axial":
        return arr[index]
    return arr[:, index, :][::-1]  # z runs feet -> head; put the head at the top


def _square_zoom(plane: Plane, spacing: tuple[float, float, float]) -> tuple[float, float]:
    """Zoom factors (rows, cols) that make pixels square at the finer in-plane spacing."""
    sz, sy, sx = spacing
    rows_mm, cols_mm = (sy, sx) if plane == "axial" else (sz, sx)
    fine = min(rows_mm, cols_mm)
    return rows_mm / fine, cols_mm / fine


def window(ct2d: np.ndarray) -> np.ndarray:
    """HU -> uint8 grey in the lung window."""
    g = (ct2d.astype(np.float32) - WINDOW_LO_HU) / (WINDOW_HI_HU - WINDOW_LO_HU)
    return (np.clip(g, 0.0, 1.0) * 255).astype(np.uint8)


def outline(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of label borders (a pixel whose 4-neighbour has another label), inside labels > 0."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edge & (labels > 0)


def compose(
    ct2d: np.ndarray,
    infection2d: np.ndarray | None = None,
    outline2d: np.ndarray | None = None,
    outline_colours: dict[int, tuple[int, int, int]] | None = None,
    fill2d: np.ndarray | None = None,
    fill_colours: dict[int, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """RGB uint8 image: lung-window grey, a translucent label fill, then label outlines on top."""
    grey = window(ct2d)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    fill = fill2d if fill2d is not None else infection2d
    colours = fill_colours or INFECTION_COLOURS
    if fill is not None:
        for lab, col in colours.items():
            m = fill == lab
            rgb[m] = (1 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * np.asarray(col, np.float32)
    if outline2d is not None and outline_colours:
        edge = outline(outline2d)
        for lab, col in outline_colours.items():
            rgb[edge & (outline2d == lab)] = col
    return rgb.astype(np.uint8)


def render(
    series: AlignedSeries,
    t: int,
    plane: Plane,
    index: int,
    overlay: Overlay = "lobes",
    max_px: int = 320,
    marks: bool = True,
) -> np.ndarray:
    """Timepoint ``t`` at slice ``index`` as RGB (square pixels, longest side at most ``max_px``),
    with the patient directions at the edges unless ``marks=False``.

    ``overlay``: ``lobes`` = infection fill + 5 lobe outlines; ``regions`` = the 4-region view
    (right lung, left lung, infection, background); ``change`` = new / resolved / persistent
    infection relative to the baseline + lobe outlines; ``none`` = CT only.
    """
    ct = take_slice(series.ct[t], plane, index)
    inf = take_slice(series.infection[t], plane, index)
    lungs = take_slice(series.lungs[t], plane, index)
    lobes_arr = series.lobes[t] if series.lobes[t] is not None else series.lobes[0]
    lobes = take_slice(lobes_arr, plane, index) if lobes_arr is not None else None
    if overlay == "regions" or (overlay == "lobes" and lobes is None):
        img = compose(ct, infection2d=inf, outline2d=lungs, outline_colours=LUNG_COLOURS)
    elif overlay == "lobes":
        img = compose(ct, infection2d=inf, outline2d=lobes, outline_colours=LOBE_COLOURS)
    elif overlay == "change":
        change = series.change[t]
        fill = take_slice(change, plane, index) if change is not None else np.zeros_like(inf)
        if change is None and t == 0:
            fill = np.where(inf > 0, BASELINE_REFERENCE, 0).astype(np.uint8)  # baseline: all its infection is the reference
        outline = dict(outline2d=lobes if lobes is not None else lungs,
                       outline_colours=LOBE_COLOURS if lobes is not None else LUNG_COLOURS)
        if change is None and t > 0:
            # no change map (not registered, failed QA, or masks changed since): the follow-up's own
            # infection, never an empty panel that would read as "nothing new, nothing persistent"
            img = compose(ct, infection2d=inf, **outline)
        else:
            img = compose(ct, fill2d=fill, fill_colours={**CHANGE_COLOURS, BASELINE_REFERENCE: BASELINE_COLOUR}, **outline)
    else:
        img = compose(ct)
    zr, zc = _square_zoom(plane, series.spacing)
    h, w = img.shape[0] * zr, img.shape[1] * zc
    scale = min(1.0, max_px / max(h, w))
    zr, zc = zr * scale, zc * scale
    if abs(zr - 1) > 1e-3 or abs(zc - 1) > 1e-3:
        # order 0 keeps overlay colours and outlines crisp; the CT is already windowed to 8 bits
        img = ndimage.zoom(img, (zr, zc, 1), order=0)
    return orientation_marks(img, plane) if marks else img


#: Patient directions at the image edges (left, right, top, bottom) in display orientation:
#: the patient's right on the image's left, as radiologists read.
ORIENTATION = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I")}


def orientation_marks(img: np.ndarray, plane: Plane) -> np.ndarray:
    """``img`` with the patient directions written at the middle of each edge (white on a dark
    outline, so they read on bone and on air)."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape[:2]
    size = int(np.clip(min(h, w) // 18, 9, 18))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    left, right, top, bottom = ORIENTATION[plane]
    pad = 3
    for text, (x, y, anchor) in ((left, (pad, h / 2, "lm")), (right, (w - pad, h / 2, "rm")),
                                 (top, (w / 2, pad, "mt")), (bottom, (w / 2, h - pad, "mb"))):
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(pil)


def strip(series: AlignedSeries, plane: Plane, index: int, overlay: Overlay = "lobes", max_px: int = 320) -> list[np.ndarray]:
    """One rendered slice per timepoint."""
    return [render(series, t, plane, index, overlay, max_px) for t in range(len(series.dates))]


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_uri(rgb: np.ndarray) -> str:
    """A ``data:image/png;base64`` URI: plotly images sent this way are ~10x smaller than raw arrays."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")
