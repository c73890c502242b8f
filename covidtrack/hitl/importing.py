"""Import an infection mask corrected in another tool (3D Slicer, ITK-SNAP, ...) from NIfTI.

The file is read with :func:`covidtrack.io.load_mask` (exact mapping when it is on the scan's own
grid, nearest-neighbour resampling in world coordinates otherwise) and its labels are translated
to covidtrack's numbering (0 none, 1 GGO, 2 consolidation) with one of these tables:

===================  ==========================================================================
``covidtrack``       1 GGO, 2 consolidation (what ``covidtrack export`` writes)
``slicer``           3D Slicer Segment Editor, "Export to labelmap": segments are numbered 1, 2,
                     ... in the order of the segment list. Name segment 1 "GGO" and segment 2
                     "consolidation" (any further segment is ignored).
``itksnap``          ITK-SNAP default label list: "Label 1" (red) = GGO, "Label 2" (green) =
                     consolidation (labels 3-6 are ignored).
``medseg``           MedSeg COVID-19 CT segmentation volumes: 1 GGO, 2 consolidation, 3 pleural
                     effusion (dropped: not lung infection).
``covid19_ct_seg``   COVID-19-CT-Seg (Ma et al.) "Lung_and_Infection_Mask": 1 left lung, 2 right
                     lung, 3 infection (type not given: split by HU, see below).
``binary``           any non-zero value is infection (type not given: split by HU).
===================  ==========================================================================

Slicer and ITK-SNAP share the ordinal numbering, so their tables are equal; they are listed
separately so the UI can name the tool and so a site can change one without the other. A custom
mapping is written ``"5=GGO,7=consolidation"`` (:func:`parse_mapping`).

Where a source gives infection without its type, voxels at or above
:data:`CONSOLIDATION_MIN_HU` become consolidation and the rest GGO: consolidation replaces the air
in the alveoli (soft-tissue density), ground glass only raises the lung density.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidtrack.errors import InputError
from covidtrack.labels import CONSOLIDATION, GGO
from covidtrack.volume import Volume

#: Marker in a table: "infection of unknown type", split into GGO / consolidation by HU.
INFECTION_UNTYPED = 255
#: HU at or above which untyped infection counts as consolidation.
CONSOLIDATION_MIN_HU = -300.0

INFECTION_TABLES: dict[str, dict[int, int]] = {
    "covidtrack": {1: GGO, 2: CONSOLIDATION},
    "slicer": {1: GGO, 2: CONSOLIDATION},
    "itksnap": {1: GGO, 2: CONSOLIDATION},
    "medseg": {1: GGO, 2: CONSOLIDATION, 3: 0},
    "covid19_ct_seg": {1: 0, 2: 0, 3: INFECTION_UNTYPED},
}
#: Human-readable description of each table (shown in the UI next to the choice).
TABLE_NOTES: dict[str, str] = {
    "covidtrack": "1 GGO, 2 consolidation",
    "slicer": "3D Slicer labelmap export: segment 1 = GGO, segment 2 = consolidation",
    "itksnap": "ITK-SNAP: Label 1 (red) = GGO, Label 2 (green) = consolidation",
    "medseg": "MedSeg volumes: 1 GGO, 2 consolidation, 3 pleural effusion (dropped)",
    "covid19_ct_seg": "COVID-19-CT-Seg: 1 left lung, 2 right lung, 3 infection (type by HU)",
    "binary": "any non-zero = infection (type by HU)",
}
_NAMES = {"ggo": GGO, "consolidation": CONSOLIDATION, "cons": CONSOLIDATION, "none": 0, "infection": INFECTION_UNTYPED}


def parse_mapping(text: str) -> dict[int, int]:
    """``"5=GGO,7=consolidation,9=infection"`` -> ``{5: 1, 7: 2, 9: INFECTION_UNTYPED}``.

    Right-hand sides: GGO, consolidation, infection (type by HU), none, or a number 0-2.
    """
    table: dict[int, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise ValueError(f"mapping entry {part!r} needs the form VALUE=CLASS, e.g. 5=GGO")
        src, dst = (s.strip() for s in part.split("=", 1))
        try:
            value = int(src)
        except ValueError:
            raise ValueError(f"mapping entry {part!r}: {src!r} is not an integer label") from None
        target = _NAMES.get(dst.lower())
        if target is None:
            if dst.isdigit() and int(dst) in (0, GGO, CONSOLIDATION):
                target = int(dst)
            else:
                raise ValueError(f"mapping entry {part!r}: class {dst!r} unknown; use GGO, consolidation, infection or none")
        table[value] = target
    if not table:
        raise ValueError("empty mapping; write e.g. 1=GGO,2=consolidation")
    return table


#: Tables whose documentation says that further labels are ignored (other segments of a Slicer
#: labelmap, ITK-SNAP's labels 3-6); every other table refuses a value it does not know.
LENIENT_TABLES = ("slicer", "itksnap")


def _mapping(labels: np.ndarray, table: str | dict[int, int]) -> dict[int, int]:
    if not isinstance(table, str):
        return dict(table)
    if table == "binary":
        return {int(v): INFECTION_UNTYPED for v in np.unique(labels) if v != 0}
    if table in INFECTION_TABLES:
        return INFECTION_TABLES[table]
    raise ValueError(f"label table {table!r} unknown; use one of {sorted([*INFECTION_TABLES, 'binary'])} or a mapping")


def translate(labels: np.ndarray, table: str | dict[int, int], ct_hu: np.ndarray | None = None) -> np.ndarray:
    """Another tool's label values -> 0 none / 1 GGO / 2 consolidation (values not in the table -> 0;
    :func:`import_corrected_mask` refuses them first, except for :data:`LENIENT_TABLES`).

    ``table`` is a name from :data:`INFECTION_TABLES`, ``"binary"``, or a dict. Untyped infection
    needs ``ct_hu`` (same shape) to be split by :data:`CONSOLIDATION_MIN_HU`.
    """
    labels = np.asarray(labels)
    mapping = _mapping(labels, table)
    size = max(int(labels.max(initial=0)), max(mapping, default=0)) + 1
    lut = np.zeros(size, dtype=np.uint8)
    for src, dst in mapping.items():
        if src >= 0:
            lut[src] = dst
    out = lut[labels.astype(np.int64)]
    untyped = out == INFECTION_UNTYPED
    if untyped.any():
        if ct_hu is None or ct_hu.shape != labels.shape:
            raise ValueError("this table gives infection without its type; pass the CT (HU) of the same shape to split it")
        out[untyped] = np.where(ct_hu[untyped] >= CONSOLIDATION_MIN_HU, CONSOLIDATION, GGO)
    return out


def import_corrected_mask(path: str | Path, volume: Volume, table: str | dict[int, int] = "covidtrack") -> np.ndarray:
    """Read a corrected infection mask (NIfTI) onto ``volume``'s canonical grid, in our numbering.

    Raises :class:`~covidtrack.errors.InputError` (naming the file) when it is not a label image
    of this scan, or when nothing in it maps to infection while it holds labels (wrong table).
    """
    from covidtrack.io.files import load_mask

    path = Path(path)
    raw = load_mask(path, volume)
    try:
        mapping = _mapping(raw, table)
        unknown = sorted(int(v) for v in np.unique(raw) if v != 0 and int(v) not in mapping)
        if unknown and not (isinstance(table, str) and table in LENIENT_TABLES):
            # a value the table does not know would silently erase what it marks
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            raise InputError(path, f"holds label value(s) {shown} that table {table!r} does not know",
                             f"pick the tool's table, or write a mapping such as {unknown[0]}=GGO "
                             f"(or {unknown[0]}=none to drop it on purpose)")
        out = translate(raw, mapping, volume.array)
    except ValueError as err:
        raise InputError(path, str(err), "pick the label table of the tool that made the mask") from err
    if raw.any() and not out.any():
        found = ", ".join(str(int(v)) for v in np.unique(raw) if v)
        raise InputError(path, f"holds labels {found} but none maps to infection with table {table!r}",
                         "pick the tool's table or write a mapping such as 5=GGO,7=consolidation")
    return out


def check_not_lung_mask(labels: np.ndarray, lungs: np.ndarray, path: str | Path) -> None:
    """Refuse a "correction" that is the lung mask itself (``lungs.nii.gz`` sits beside
    ``infection.nii.gz`` in an export and has the same values 1 / 2: imported, it would read as
    every lung voxel infected)."""
    if labels.shape == lungs.shape and (lungs > 0).any() and np.array_equal(labels, lungs):
        raise InputError(path, "this is the scan's lung mask (1 right lung, 2 left lung), not an infection mask",
                         "import infection.nii.gz (1 GGO, 2 consolidation), not lungs.nii.gz")
