"""Where CT data enters covidtrack: DICOM folders and NIfTI/NRRD/MHA files -> canonical Volume.

Public interface (other stages and outside checks call exactly these names):

- :func:`list_series` (path) -> list[:class:`SeriesInfo`]
- :func:`load_ct` (path, series_uid=None) -> :class:`~covidtrack.volume.Volume`
- :func:`save_mask` (mask, volume, path): NIfTI on the scan's source grid
- :func:`load_mask` (path, volume) -> uint8 array on the canonical grid
- :func:`volume_hash` (volume) -> sha256 hex of the canonical array + spacing

Every bad input raises a subclass of :class:`covidtrack.errors.InputError` whose message names
the file and the fix; see README.d/io.md for the full list of checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from covidtrack.errors import NoImageDataError, UnreadableFileError
from covidtrack.io import orient
from covidtrack.io.dicom import DicomScan, SeriesInfo, list_series, patient_key, scan_folder
from covidtrack.io.files import IMAGE_SUFFIXES, image_suffix, load_mask, read_volume_file, save_mask
from covidtrack.volume import Volume

__all__ = [
    "DicomScan",
    "SeriesInfo",
    "list_series",
    "load_ct",
    "load_mask",
    "patient_key",
    "save_mask",
    "scan_folder",
    "volume_hash",
]


def load_ct(path: str | Path, series_uid: str | None = None) -> Volume:
    """Load a CT scan as a canonical int16 HU :class:`Volume`.

    ``path`` is a DICOM folder (searched recursively; with several series, the axial CT series
    with the most slices unless ``series_uid`` is given, and a note names the others; CT series
    of different dates in one folder are refused) or a NIfTI / NRRD / MHA file. A single
    DICOM file is refused (a 2D slice): pass its folder.
    """
    from covidtrack.io import dicom

    path = Path(path)
    if not path.exists():
        raise NoImageDataError(path, "does not exist", "check the path (typo? unmounted drive?)")
    if path.is_file():
        if image_suffix(path):
            return read_volume_file(path)
        dicom.refuse_single_file(path, IMAGE_SUFFIXES)
    scan = dicom.scan_folder(path)
    if scan.unreadable:
        bad, reason = scan.unreadable[0]
        more = f" (and {len(scan.unreadable) - 1} more unreadable file(s))" if len(scan.unreadable) > 1 else ""
        raise UnreadableFileError(bad, f"{reason}{more}; it may belong to the series being loaded",
                                  dicom.unreadable_fix(reason))
    info = dicom.choose_series(scan, series_uid)
    array, grid, meta = dicom.read_series(scan, info)
    note = dicom.skipped_series_note(scan, info) if series_uid is None else None
    if note:
        meta = dataclasses.replace(meta, notes=meta.notes + (note,))
    return orient.canonical_volume(array, grid, meta)


def volume_hash(volume: Volume) -> str:
    """SHA-256 (hex) of the canonical int16 array, its shape and spacing (mm, rounded to 1 um).

    Identical scans hash identically however they were stored (DICOM, NIfTI, flipped axes),
    which makes ingest idempotent. Rounding the spacing avoids float noise between formats.
    """
    digest = hashlib.sha256()
    digest.update(repr(tuple(int(s) for s in volume.shape)).encode())
    digest.update(repr(tuple(round(float(s), 3) for s in volume.spacing)).encode())
    digest.update(np.ascontiguousarray(volume.array, dtype="<i2").tobytes())
    return digest.hexdigest()
