"""Reading 2D CT slices in the MedSeg folder layout, and putting them in canonical orientation.

Layout (the one MedSeg / Inf-Net use)::

    Imgs/            8-bit lung-window slices, .jpg/.jpeg/.png
    GT/              binary infection masks, 0 / 255 (any value > 127 counts as infection)
    GT_multiclass/   0 background, 1 GGO, 2 consolidation (palette or grey PNG)

Files are matched by name without suffix (``Imgs/12.jpg`` <-> ``GT/12.png``).

Orientation: these exports are rotated 90 degrees from the usual axial display. Canonical here is
the display of :mod:`covidtrack.volume` (``array[k]`` of a Volume): anterior at the top, spine at
the bottom, the patient's right on the image's left. Checked by eye on the anatomy (descending
aorta left of the spine, longer left main bronchus, heart apex to the patient's left):

- spine at the RIGHT edge (MedSeg slices, Radiopaedia slices of COVID-19-CT-Seg): the image is
  the transpose of the canonical slice;
- spine at the LEFT edge (coronacases slices of COVID-19-CT-Seg): transpose, then flip top/bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from covidtrack.errors import GeometryError, InputError, NoImageDataError, UnreadableFileError

SpineEdge = Literal["right", "left", "bottom"]
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def spine_edge_for(name: str) -> SpineEdge:
    """Where the spine lies in a raw exported slice, from its file name.

    COVID-19-CT-Seg "coronacases" exports put the spine at the left edge; MedSeg and Radiopaedia
    exports put it at the right edge (see the module docstring).
    """
    return "left" if "coronacases" in name.lower() else "right"


def to_canonical(image: np.ndarray, spine_edge: SpineEdge) -> np.ndarray:
    """A raw 2D slice (rows, cols) -> canonical axial display (anterior top, patient right left).

    ``spine_edge="bottom"`` means the slice is already canonical.
    """
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {image.shape}")
    if spine_edge == "bottom":
        out = image
    elif spine_edge == "right":
        out = image.T
    elif spine_edge == "left":
        out = image.T[::-1]
    else:
        raise ValueError(f"spine_edge must be 'right', 'left' or 'bottom', got {spine_edge!r}")
    return np.ascontiguousarray(out)


def from_canonical(image: np.ndarray, spine_edge: SpineEdge) -> np.ndarray:
    """Inverse of :func:`to_canonical` (to write a predicted mask back in the file's orientation)."""
    if spine_edge == "bottom":
        out = image
    elif spine_edge == "right":
        out = image.T
    elif spine_edge == "left":
        out = image[::-1].T
    else:
        raise ValueError(f"spine_edge must be 'right', 'left' or 'bottom', got {spine_edge!r}")
    return np.ascontiguousarray(out)


@dataclass(frozen=True, eq=False)
class SliceSample:
    """One slice in canonical orientation.

    ``image`` is the 8-bit lung-window image (uint8); ``infection`` is 0/1 (uint8) or None when
    no mask exists; ``classes`` is 0 background / 1 GGO / 2 consolidation (uint8) or None.
    ``spine_edge`` records the raw orientation so masks can be written back with
    :func:`from_canonical`.
    """

    name: str
    image: np.ndarray
    infection: np.ndarray | None = None
    classes: np.ndarray | None = None
    spine_edge: SpineEdge = "right"


def read_gray(path: Path) -> np.ndarray:
    """Any JPG/PNG -> 2D uint8 array (RGB exports are converted to grey; palette indices kept)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode == "P":
                return np.asarray(im, dtype=np.uint8).copy()  # palette index == class label
            arr = np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise UnreadableFileError(path, f"cannot read image ({err})", "replace it with a valid JPG or PNG") from err
    return arr


def list_images(folder: Path) -> dict[str, Path]:
    """``{stem: path}`` of the JPG/PNG files in ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder not found", "pass an existing folder of JPG/PNG slices")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    if not files:
        raise NoImageDataError(folder, "no .jpg/.jpeg/.png files", "point to the Imgs/ folder of a MedSeg-layout dataset")
    return files


def _check_shape(path: Path, mask: np.ndarray, image_shape: tuple[int, ...]) -> None:
    if mask.shape != image_shape:
        raise GeometryError(
            path, f"mask shape {mask.shape} differs from its image {image_shape}", "use masks made on these exact images"
        )


def read_medseg_folder(
    images: Path,
    masks: Path | None = None,
    multiclass: Path | None = None,
    spine_edge: SpineEdge | Literal["auto"] = "auto",
) -> list[SliceSample]:
    """Read a MedSeg-layout dataset into canonical :class:`SliceSample` objects.

    ``masks`` (0/255) and ``multiclass`` (0/1/2) are optional; when only ``multiclass`` is given
    the infection mask is ``classes > 0``. With masks, every image needs its mask (matched by
    name), otherwise an :class:`InputError` names the first image without one.
    ``spine_edge="auto"`` guesses per file with :func:`spine_edge_for`.
    """
    image_files = list_images(Path(images))
    mask_files = list_images(Path(masks)) if masks is not None else {}
    multi_files = list_images(Path(multiclass)) if multiclass is not None else {}
    samples: list[SliceSample] = []
    for stem, path in image_files.items():
        raw = read_gray(path)
        edge: SpineEdge = spine_edge_for(path.name) if spine_edge == "auto" else spine_edge
        infection = classes = None
        if masks is not None:
            if stem not in mask_files:
                raise InputError(path, f"no mask named {stem}.* in {masks}", "add the mask or remove the image")
            m = read_gray(mask_files[stem])
            _check_shape(mask_files[stem], m, raw.shape)
            infection = (m > 127).astype(np.uint8)
        if multiclass is not None:
            if stem not in multi_files:
                raise InputError(path, f"no multiclass mask named {stem}.* in {multiclass}", "add it or omit --multiclass")
            c = read_gray(multi_files[stem])
            _check_shape(multi_files[stem], c, raw.shape)
            if c.max(initial=0) > 2:
                raise InputError(
                    multi_files[stem],
                    f"multiclass mask has value {int(c.max())}; expected 0 background, 1 GGO, 2 consolidation",
                    "pass the GT_multiclass folder (values 0/1/2), not a 0/255 mask",
                )
            classes = c.astype(np.uint8)
            if infection is None:
                infection = (classes > 0).astype(np.uint8)
        samples.append(
            SliceSample(
                name=stem,
                image=to_canonical(raw, edge),
                infection=None if infection is None else to_canonical(infection, edge),
                classes=None if classes is None else to_canonical(classes, edge),
                spine_edge=edge,
            )
        )
    return samples


def read_unlabeled(folder: Path, limit: int | None = None, stride: int = 1) -> list[SliceSample]:
    """Unlabelled slices (e.g. COVID-19-CT-Seg exports), canonical, orientation guessed by name.

    ``stride`` keeps every n-th file (neighbouring slices of one volume are near duplicates).
    """
    files = list(list_images(Path(folder)).items())[:: max(1, stride)]
    if limit is not None:
        files = files[:limit]
    return [
        SliceSample(name=stem, image=to_canonical(read_gray(p), spine_edge_for(p.name)), spine_edge=spine_edge_for(p.name))
        for stem, p in files
    ]
