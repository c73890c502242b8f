"""DICOM folders: find the series, check them, read one into a source-grid HU array.

Headers are read with pydicom (fast, ``stop_before_pixels``) so that every check happens before
any pixel is decoded; pixels are decoded with pydicom, or with SimpleITK/GDCM for compressed
transfer syntaxes pydicom cannot decode here. Slices are placed by ImagePositionPatient /
ImageOrientationPatient, never by file name or InstanceNumber.

Gantry tilt is resampled, not refused: the slices of a tilted acquisition are sheared along
the column direction; each slice is shifted in-plane (linear interpolation) onto an orthogonal
grid that covers the whole sheared stack, and a note goes into ``ScanMeta.notes``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidtrack.config import settings
from covidtrack.errors import GeometryError, InputError, NoImageDataError, NotCTError, UnreadableFileError
from covidtrack.io import validate
from covidtrack.volume import ScanMeta, SourceGrid

# Files that are certainly not DICOM: skip them silently instead of calling them corrupt.
_NOT_DICOM_SUFFIXES = {
    ".txt", ".md", ".json", ".csv", ".xml", ".html", ".pdf", ".zip", ".gz", ".nii", ".nrrd", ".nhdr",
    ".mha", ".mhd", ".raw", ".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".py", ".log", ".ini", ".db",
}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ".dic"}
_LOCALIZER_WORDS = {"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW"}
_AXIS_NAMES = ("sagittal", "coronal", "axial")  # slice normal mostly along x, y, z


@dataclass(frozen=True)
class SliceHeader:
    """What covidtrack needs from one DICOM file's header (no pixels)."""

    path: Path
    series_uid: str
    modality: str
    position: tuple[float, float, float] | None  # ImagePositionPatient (mm, LPS)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    n_frames: int
    bits_stored: int
    samples_per_pixel: int
    image_type: tuple[str, ...]
    instance_number: int | None
    sop_uid: str = ""  # SOPInstanceUID: the same image copied twice has the same one


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found under a folder (what ``python -m covidtrack series`` lists)."""

    series_uid: str
    modality: str
    description: str
    n_slices: int  # number of images (files, or frames of a multi-frame file)
    slice_thickness_mm: float | None
    kernel: str
    study_date: dt.date | None
    manufacturer: str = ""
    series_number: int | None = None
    orientation: str = "unknown"  # axial / coronal / sagittal / oblique / mixed / unknown
    rows: int = 0
    columns: int = 0
    is_localizer: bool = False
    files: tuple[Path, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class DicomScan:
    """Result of scanning a folder: the series found and the files that could not be parsed."""

    folder: Path
    series: tuple[SeriesInfo, ...]
    unreadable: tuple[tuple[Path, str], ...]  # (file, reason)
    headers: dict[str, tuple[SliceHeader, ...]] = field(repr=False, default_factory=dict)


# --- scanning -----------------------------------------------------------------------------------
def _text(ds: object, keyword: str) -> str:
    value = getattr(ds, keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "/".join(str(v) for v in value)
    return str(value).strip()


def _float(ds: object, keyword: str) -> float | None:
    try:
        value = getattr(ds, keyword, None)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _int(ds: object, keyword: str) -> int | None:
    try:
        value = getattr(ds, keyword, None)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def parse_date(value: str) -> dt.date | None:
    """DICOM DA (YYYYMMDD) -> date; None when absent or malformed."""
    value = (value or "").strip()
    try:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return None


def patient_key(patient_id: str) -> str:
    """Salted SHA-256 of the PatientID (16 hex characters); "" when there is no ID.

    The salt comes from ``COVIDTRACK_SALT``; the raw ID and the name are never stored.
    """
    patient_id = (patient_id or "").strip()
    if not patient_id:
        return ""
    digest = hashlib.sha256(f"{settings().salt}\x00{patient_id}".encode("utf-8")).hexdigest()
    return digest[:16]


def sex(value: str) -> str:
    """DICOM PatientSex normalised to "M", "F" or "O"; "" when absent or not one of those."""
    value = (value or "").strip().upper()[:1]
    return value if value in ("M", "F", "O") else ""


def _read_header(path: Path) -> tuple[object | None, str]:
    """(dataset, "") for DICOM, (None, "") for a file that is not DICOM, (None, reason) if corrupt."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "SeriesInstanceUID" not in ds:
            # pydicom stops quietly at the end of a truncated file; a real instance always has this
            return None, "DICOM header is incomplete (no SeriesInstanceUID): the file is probably truncated"
        return ds, ""
    except PermissionError as err:
        return None, _os_reason(err, "cannot read this file")
    except InvalidDicomError:
        pass  # no DICM preamble: maybe an old headerless file, maybe not DICOM at all
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on truncated files
        return None, f"cannot parse the DICOM header ({type(err).__name__}: {err})"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "SOPClassUID" in ds and "SeriesInstanceUID" in ds:
            return ds, ""
    except Exception as err:  # noqa: BLE001
        if path.suffix.lower() in _DICOM_SUFFIXES:
            return None, f"cannot parse the DICOM header ({type(err).__name__}: {err})"
        return None, ""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return None, "named like DICOM but has no DICOM header (truncated or not DICOM)"
    return None, ""


def _slice_header(path: Path, ds: object) -> SliceHeader:
    ipp = getattr(ds, "ImagePositionPatient", None)
    iop = getattr(ds, "ImageOrientationPatient", None)
    ps = getattr(ds, "PixelSpacing", None)
    try:
        position = tuple(float(v) for v in ipp) if ipp is not None and len(ipp) == 3 else None
        orientation = tuple(float(v) for v in iop) if iop is not None and len(iop) == 6 else None
        spacing = (float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None
    except (TypeError, ValueError):
        position, orientation, spacing = None, None, None
    return SliceHeader(
        path=path,
        series_uid=_text(ds, "SeriesInstanceUID") or "(no SeriesInstanceUID)",
        modality=_text(ds, "Modality").upper() or "?",
        position=position,  # type: ignore[arg-type]
        orientation=orientation,
        rows=_int(ds, "Rows") or 0,
        columns=_int(ds, "Columns") or 0,
        pixel_spacing=spacing,
        n_frames=_int(ds, "NumberOfFrames") or 1,
        bits_stored=_int(ds, "BitsStored") or 0,
        samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
        image_type=tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ())),
        instance_number=_int(ds, "InstanceNumber"),
        sop_uid=_text(ds, "SOPInstanceUID"),
    )


def _iop_groups(headers: list[SliceHeader] | tuple[SliceHeader, ...], tol: float = 1e-3) -> list[list[SliceHeader]]:
    """Slices grouped by ImageOrientationPatient (cosines equal within ``tol``; rounding differs by scanner)."""
    groups: list[list[SliceHeader]] = []
    for h in headers:
        if h.orientation is None:
            continue
        for group in groups:
            if np.max(np.abs(np.subtract(group[0].orientation, h.orientation))) <= tol:  # type: ignore[arg-type]
                group.append(h)
                break
        else:
            groups.append([h])
    return groups


def _orientation_name(headers: list[SliceHeader]) -> str:
    groups = _iop_groups(headers)
    if not groups:
        return "unknown"
    if len(groups) > 1:
        return "mixed"
    iop = np.array(groups[0][0].orientation)
    normal = np.cross(iop[:3], iop[3:])
    axis = int(np.argmax(np.abs(normal)))
    # within ~10 degrees of a main axis counts as that plane (small obliques are common)
    return _AXIS_NAMES[axis] if abs(normal[axis]) > np.cos(np.radians(10)) else "oblique"


def _candidate_files(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files under ``folder`` that may be DICOM, and the subfolders that could not be listed.

    ``os.walk`` with an error handler rather than ``Path.rglob``: rglob skips a subfolder it
    cannot open without a word, and a series split over ``DICOM/0001`` and ``DICOM/0002`` would
    then load short.
    """
    files: list[Path] = []
    unlisted: list[tuple[Path, str]] = []

    def refused(err: OSError) -> None:
        where = Path(err.filename) if err.filename else folder
        unlisted.append((where, _os_reason(err, "cannot open this folder")))

    for root, dirs, names in os.walk(folder, onerror=refused):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(root)
        for name in names:
            p = base / name
            if name.startswith(".") or not p.is_file():
                continue
            if name.upper() == "DICOMDIR" or p.suffix.lower() in _NOT_DICOM_SUFFIXES:
                continue
            files.append(p)
    return sorted(files), unlisted


def _os_reason(err: OSError, what: str) -> str:
    if isinstance(err, PermissionError):
        return f"{what}: permission denied"
    return f"{what} ({type(err).__name__}: {err.strerror or err})"


def unreadable_fix(reason: str) -> str:
    """What to do about an unreadable file or folder (see :func:`scan_folder`'s reasons)."""
    if "permission denied" in reason:
        return ("give your user read access to it (e.g. chmod -R u+rX on the study folder) or copy the study "
                "somewhere readable, and load it again")
    return "re-export or re-copy the series, or move the broken file out of the folder and load it again"


def _name_shape(name: str) -> str:
    """A file name with every run of digits and dots replaced by ``#``: ``IM000123`` -> ``im#``,
    a UID name ``1.2.840.113619...`` -> ``#``. Files of one export share a shape."""
    return re.sub(r"[0-9.]+", "#", name.lower())


def scan_folder(folder: str | Path) -> DicomScan:
    """Read every DICOM header under ``folder`` (recursively) and group files by series."""
    folder = Path(folder)
    if not folder.exists():
        raise NoImageDataError(folder, "does not exist", "check the path (typo? unmounted drive?)")
    if not folder.is_dir():
        raise NoImageDataError(folder, "is not a folder", "pass the folder that holds the DICOM files")
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    first_ds: dict[str, object] = {}
    files, unlisted = _candidate_files(folder)
    unreadable: list[tuple[Path, str]] = list(unlisted)
    # Unparsable files without a DICOM suffix may be anything (a README, a lock file); they are
    # called broken only when they are named like the DICOM files beside them (IM000014 among
    # IM000001..IM000013): a cut-short first or last slice must not make the scan silently shorter.
    suspects: list[tuple[Path, str]] = []
    for path in files:
        try:
            empty = path.stat().st_size == 0
        except OSError as err:
            unreadable.append((path, _os_reason(err, "cannot read this file")))
            continue
        if empty:
            if path.suffix.lower() in _DICOM_SUFFIXES:
                unreadable.append((path, "empty file (0 bytes)"))
            else:
                suspects.append((path, "empty file (0 bytes)"))
            continue
        ds, reason = _read_header(path)
        if ds is None:
            if reason:
                unreadable.append((path, reason))
            else:
                suspects.append((path, "no readable DICOM header (truncated, or not DICOM)"))
            continue
        header = _slice_header(path, ds)
        groups[header.series_uid].append(header)
        uid = header.series_uid
        if uid not in first_ds or (_is_localizer_ds(first_ds[uid]) and not set(header.image_type) & _LOCALIZER_WORDS):
            first_ds[uid] = ds  # the series' description, kernel, thickness: from an image, not a scout
    if suspects:
        shapes = {(h.path.parent, _name_shape(h.path.name)) for hs in groups.values() for h in hs}
        unreadable += [
            (path, f"{reason}, although it is named like the DICOM files beside it")
            for path, reason in suspects if (path.parent, _name_shape(path.name)) in shapes
        ]
    infos = []
    for uid in list(groups):
        # a scout filed inside the CT series (same SeriesInstanceUID) is not one of its slices:
        # it would make the series "mixed" or, sorting first, mark the whole series a localizer
        images = _unique_images([h for h in groups[uid] if not set(h.image_type) & _LOCALIZER_WORDS])
        headers = images or groups[uid]
        ds = first_ds[uid]
        infos.append(
            SeriesInfo(
                series_uid=uid,
                modality=headers[0].modality,
                description=_text(ds, "SeriesDescription"),
                n_slices=sum(h.n_frames for h in headers),
                slice_thickness_mm=_float(ds, "SliceThickness"),
                kernel=_text(ds, "ConvolutionKernel"),
                study_date=parse_date(_text(ds, "StudyDate") or _text(ds, "SeriesDate")),
                manufacturer=_text(ds, "Manufacturer"),
                series_number=_int(ds, "SeriesNumber"),
                orientation=_orientation_name(headers),
                rows=headers[0].rows,
                columns=headers[0].columns,
                is_localizer=all(set(h.image_type) & _LOCALIZER_WORDS for h in headers),
                files=tuple(h.path for h in headers),
            )
        )
    infos.sort(key=lambda s: (s.study_date or dt.date.min, s.series_number or 0, s.series_uid))
    return DicomScan(
        folder=folder,
        series=tuple(infos),
        unreadable=tuple(unreadable),
        headers={uid: tuple(h) for uid, h in groups.items()},
    )


def _unique_images(headers: list[SliceHeader]) -> list[SliceHeader]:
    """One header per SOPInstanceUID (a folder copied into itself holds every image twice)."""
    seen: set[str] = set()
    out = []
    for h in sorted(headers, key=lambda h: str(h.path)):
        if h.sop_uid and h.sop_uid in seen:
            continue
        seen.add(h.sop_uid)
        out.append(h)
    return out


def _is_localizer_ds(ds: object) -> bool:
    return bool({str(v).upper() for v in (getattr(ds, "ImageType", None) or ())} & _LOCALIZER_WORDS)


def list_series(path: str | Path) -> list[SeriesInfo]:
    """Every DICOM series under a folder (recursively), oldest study first.

    Files that are not DICOM are ignored; corrupt DICOM files do not stop the listing (use
    :func:`scan_folder` to see them; :func:`~covidtrack.io.load_ct` refuses to load next to them).
    """
    return list(scan_folder(path).series)


def choose_series(scan: DicomScan, series_uid: str | None) -> SeriesInfo:
    """The requested series, or the axial CT series with the most slices."""
    if not scan.series:
        if scan.unreadable:
            bad, reason = scan.unreadable[0]
            raise UnreadableFileError(bad, f"{reason}; no readable DICOM file in {scan.folder}", unreadable_fix(reason))
        raise NoImageDataError(
            scan.folder, "no DICOM files found in this folder or its subfolders",
            "pass the folder that holds the .dcm files, or a NIfTI/NRRD/MHA file",
        )
    if series_uid is not None:
        for info in scan.series:
            if info.series_uid == series_uid:
                return info
        known = ", ".join(f"{s.series_uid} ({s.modality}, {s.n_slices} images)" for s in scan.series)
        raise NoImageDataError(
            scan.folder, f"no series with SeriesInstanceUID {series_uid}",
            f"pick one listed by `python -m covidtrack series`: {known}",
        )
    ct = [s for s in scan.series if s.modality == "CT" and not s.is_localizer]
    if not ct:
        found = ", ".join(sorted({s.modality + (" localizer" if s.is_localizer else "") for s in scan.series}))
        raise NotCTError(
            scan.folder, f"no CT series here, only: {found}",
            "covidtrack analyses CT scans; load the CT series of the study",
        )
    dates = sorted({s.study_date for s in ct if s.study_date is not None})
    if len(dates) > 1:
        listing = "; ".join(f"{s.series_uid} ({s.study_date or 'no date'}, {s.n_slices} images"
                            f"{', ' + s.description if s.description else ''})" for s in ct)
        raise InputError(
            scan.folder, f"holds CT series of {len(dates)} different dates ({', '.join(map(str, dates))}): "
            "one folder, one timepoint",
            f"ingest each date on its own: pass --series-uid (see `python -m covidtrack series`): {listing}",
        )
    axial = [s for s in ct if s.orientation == "axial"] or ct
    return max(axial, key=lambda s: (s.n_slices, s.series_uid))


def skipped_series_note(scan: DicomScan, chosen: SeriesInfo) -> str | None:
    """A note naming the other CT series of the folder that were not loaded, if any."""
    others = [s for s in scan.series if s.modality == "CT" and not s.is_localizer and s.series_uid != chosen.series_uid]
    if not others:
        return None
    listed = ", ".join(f"{s.series_uid} ({s.n_slices} images{', ' + s.description if s.description else ''})" for s in others[:3])
    return (f"{len(others)} other CT series in the folder not loaded: {listed}"
            f"{' ...' if len(others) > 3 else ''}; choose one with --series-uid")


def refuse_single_file(path: Path, image_suffixes: tuple[str, ...]) -> None:
    """Explain why a single non-image file cannot be loaded (always raises)."""
    ds, reason = _read_header(path)
    if ds is None:
        if reason:
            raise UnreadableFileError(path, reason, "re-export or re-copy the file")
        raise UnreadableFileError(
            path, "is neither DICOM nor a supported image file",
            f"pass a DICOM folder or a file ending in {', '.join(image_suffixes)}",
        )
    modality = _text(ds, "Modality").upper()
    if modality and modality != "CT":
        raise NotCTError(path, f"modality {modality}, not CT", "covidtrack analyses CT scans; load a CT series")
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise UnreadableFileError(path, f"multi-frame (enhanced) DICOM with {frames} frames is not supported",
                                  "convert it to NIfTI with dcm2niix and load the .nii.gz")
    raise GeometryError(
        path, "a single DICOM file (one 2D slice), not a 3D CT volume",
        f"pass the folder that holds the whole series ({path.parent})",
    )


# --- reading one series -------------------------------------------------------------------------
def _check_series_headers(info: SeriesInfo, headers: tuple[SliceHeader, ...], folder: Path) -> None:
    if info.modality != "CT":
        raise NotCTError(
            folder, f"series {info.series_uid} has modality {info.modality} ({info.description or 'no description'}), not CT",
            "covidtrack analyses CT scans; load the CT series (see `python -m covidtrack series`)",
        )
    multi = [h for h in headers if h.n_frames > 1]
    if multi:
        raise UnreadableFileError(
            multi[0].path, f"multi-frame (enhanced) DICOM with {multi[0].n_frames} frames is not supported",
            "convert the series to NIfTI with dcm2niix and load the .nii.gz",
        )
    if any(h.samples_per_pixel != 1 for h in headers):
        raise UnreadableFileError(
            headers[0].path, "colour (RGB) pixels: a screenshot or secondary capture, not a CT reconstruction",
            "load the original CT series",
        )
    missing = [h for h in headers if h.position is None or h.orientation is None or h.pixel_spacing is None]
    if missing:
        raise GeometryError(
            missing[0].path,
            "no ImagePositionPatient / ImageOrientationPatient / PixelSpacing: the slices cannot be placed in 3D",
            "export the original CT images from the scanner or PACS (not secondary captures)",
        )
    groups = _iop_groups(headers)
    if len(groups) > 1:
        parts = "; ".join(
            f"{len(g)} slices with {[round(v, 3) for v in g[0].orientation]} (e.g. {g[0].path.name})"  # type: ignore[union-attr]
            for g in groups
        )
        raise GeometryError(
            folder, f"mixed slice orientations in one series: {parts}",
            "export each orientation (axial, coronal, ...) as its own series and load the axial one",
        )
    bad = [h for h in headers if min(h.pixel_spacing) <= 0]  # type: ignore[arg-type]
    if bad:
        raise GeometryError(bad[0].path, f"PixelSpacing {list(bad[0].pixel_spacing)} mm (0 or negative)",  # type: ignore[arg-type]
                            "re-export the series from the scanner or PACS; the pixel size is needed for every volume")
    # the same spacing written with different precision (0.683594 vs 0.68359375) is one spacing
    shapes = {(h.rows, h.columns, tuple(round(v, 4) for v in h.pixel_spacing)) for h in headers}  # type: ignore[union-attr]
    if len(shapes) > 1:
        raise GeometryError(
            folder, f"slices of different sizes or pixel spacings in one series: {sorted(shapes)}",
            "export a single reconstruction per series",
        )


def _decode(path: Path) -> tuple[np.ndarray, object]:
    """HU pixels of one file (float or int) and its full dataset."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:  # noqa: BLE001
        raise UnreadableFileError(path, f"cannot read the file ({type(err).__name__}: {err})",
                                  "re-export or re-copy this file, or remove it and reload the series") from err
    meta = getattr(ds, "file_meta", None)
    if getattr(meta, "TransferSyntaxUID", None) is None and "PixelData" in ds:
        # an old file without the Part 10 header: its encoding is what pydicom found when reading
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        if meta is None:
            ds.file_meta = meta = FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - truncated data or a codec pydicom lacks here
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            return _decode_sitk(path, err), ds
        raise UnreadableFileError(
            path, f"pixel data cannot be decoded ({type(err).__name__}: {err}); the file is probably truncated",
            "re-export or re-copy this file (or remove it: covidtrack will then report the missing slice)",
        ) from err
    return apply_modality_lut(pixels, ds), ds


def _decode_sitk(path: Path, first_error: Exception) -> np.ndarray:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))  # GDCM applies RescaleSlope/Intercept itself
    except RuntimeError as err:
        raise UnreadableFileError(
            path, f"compressed pixel data cannot be decoded ({first_error}; GDCM: {str(err).splitlines()[-1]})",
            "re-export the series uncompressed (e.g. dcmdjpeg/gdcmconv --raw) and load it again",
        ) from err
    return sitk.GetArrayFromImage(image)[0]


@dataclass(frozen=True)
class _Stack:
    order: np.ndarray  # file order along the slice normal
    normal_positions: np.ndarray  # mm along the normal, sorted
    spacing: float  # mm between slices
    shear: tuple[float, float]  # in-plane offset per slice (mm along row dir, along column dir)
    tilt_deg: float


def _stack_geometry(headers: tuple[SliceHeader, ...], folder: Path) -> _Stack:
    iop = np.asarray(headers[0].orientation, dtype=float)
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise GeometryError(
            headers[0].path, f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors",
            "re-export the series from the scanner or PACS",
        )
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = np.array([h.position for h in headers], dtype=float)
    along = pos @ normal
    order = np.argsort(along, kind="stable")
    along, pos = along[order], pos[order]
    names = [headers[i].path.name for i in order]
    spacing = validate.check_slice_steps(along, folder, names)
    k = np.arange(len(pos), dtype=float)
    rel = pos - pos[0]
    shear = []
    for axis in (row, col):
        offs = rel @ axis  # in-plane offset of each slice from the first (mm)
        slope = float(np.polyfit(k, offs, 1)[0])
        resid = np.abs(offs - offs[0] - slope * k).max()
        if resid > 0.5:
            raise GeometryError(
                folder, f"slice positions do not form a straight stack (in-plane jumps up to {resid:.2f} mm)",
                "export one reconstruction per series; covidtrack cannot reassemble this stack",
            )
        shear.append(slope)
    tilt = float(np.degrees(np.arctan2(np.hypot(*shear), spacing)))
    return _Stack(order=order, normal_positions=along, spacing=spacing, shear=(shear[0], shear[1]), tilt_deg=tilt)


def _untilt(stack: np.ndarray, shear_px: tuple[float, float], fill: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Shift slice k by k*shear (pixels) onto an orthogonal grid covering every slice.

    Returns the new stack and the (column, row) index of the old first pixel in the new grid,
    i.e. how far the origin moved (negative padding) along the row and column directions.
    """
    from scipy import ndimage

    n = stack.shape[0]
    sx, sy = shear_px  # per slice, along columns (x) and rows (y)
    ends_x, ends_y = (0.0, sx * (n - 1)), (0.0, sy * (n - 1))
    pad_x0, pad_y0 = int(np.ceil(-min(ends_x))), int(np.ceil(-min(ends_y)))
    pad_x1, pad_y1 = int(np.ceil(max(ends_x))), int(np.ceil(max(ends_y)))
    out = np.full((n, stack.shape[1] + pad_y0 + pad_y1, stack.shape[2] + pad_x0 + pad_x1), fill, dtype=np.int16)
    for k in range(n):
        padded = np.full(out.shape[1:], fill, dtype=np.float32)
        padded[pad_y0: pad_y0 + stack.shape[1], pad_x0: pad_x0 + stack.shape[2]] = stack[k]
        # content of slice k sits k*shear further along the row/column directions in the world
        moved = ndimage.shift(padded, (k * sy, k * sx), order=1, mode="constant", cval=fill)
        out[k] = np.rint(moved).astype(np.int16)
    return out, (pad_x0, pad_y0)


def read_series(scan: DicomScan, info: SeriesInfo) -> tuple[np.ndarray, SourceGrid, ScanMeta]:
    """Check and read one series: int16 HU array on its source grid, the grid, and metadata."""
    import pydicom

    folder = scan.folder
    headers = scan.headers[info.series_uid]
    notes: list[str] = []
    images = tuple(h for h in headers if not set(h.image_type) & _LOCALIZER_WORDS)
    if images and len(images) < len(headers):
        # some scanners file the scout in the CT series; it is not part of the volume
        notes.append(f"{len(headers) - len(images)} localizer image(s) in the series ignored")
        headers = images
    unique = _unique_images(list(headers))
    if len(unique) < len(headers):
        notes.append(f"{len(headers) - len(unique)} duplicate file(s) of the same image (same SOPInstanceUID) ignored")
        headers = tuple(unique)
    _check_series_headers(info, headers, folder)
    geo = _stack_geometry(headers, folder)
    first = headers[int(geo.order[0])]
    rows, cols = first.rows, first.columns
    dy, dx = first.pixel_spacing  # type: ignore[misc]  # (between rows = along column dir, between columns)
    if first.bits_stored and first.bits_stored <= 8:
        validate.check_hu(np.zeros(0), first.path, stored_dtype=np.dtype(np.uint8))
    stack = np.empty((len(headers), rows, cols), dtype=np.int16)
    clipped = 0
    for out_k, file_k in enumerate(geo.order):
        path = headers[int(file_k)].path
        hu, _ = _decode(path)
        if hu.shape != (rows, cols):
            raise UnreadableFileError(path, f"pixel array {hu.shape} differs from Rows x Columns {rows}x{cols}",
                                      "re-export this file")
        stack[out_k], n_clip = validate.as_int16(np.asarray(hu))
        clipped += n_clip
    validate.check_hu(stack, folder)
    if clipped:
        notes.append(f"{clipped} voxels outside the int16 range clipped")
    notes += validate.apply_hu_floor(stack)

    iop = np.asarray(first.orientation, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    origin = np.asarray(first.position, dtype=float)
    shear_px = (geo.shear[0] / dx, geo.shear[1] / dy)
    if (len(headers) - 1) * np.hypot(*shear_px) > 0.25:  # more than a quarter pixel over the stack
        stack, (px0, py0) = _untilt(stack, shear_px, validate.HU_FLOOR)
        origin = origin - px0 * dx * row - py0 * dy * col
        notes.append(
            f"gantry tilt {geo.tilt_deg:.1f} deg: slices resampled (linear) onto an orthogonal grid; "
            "masks are written on that grid"
        )
    direction = np.column_stack([row, col, normal])
    grid = SourceGrid(
        size=(int(stack.shape[2]), int(stack.shape[1]), int(stack.shape[0])),
        spacing=(float(dx), float(dy), float(geo.spacing)),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction.ravel()),  # type: ignore[arg-type]
    )
    ds = pydicom.dcmread(first.path, stop_before_pixels=True, force=True)
    date = parse_date(_text(ds, "StudyDate") or _text(ds, "SeriesDate") or _text(ds, "AcquisitionDate"))
    if date is None:
        notes.append("no valid StudyDate in the DICOM header")
    meta = ScanMeta(
        patient_key=patient_key(_text(ds, "PatientID")),
        patient_sex=sex(_text(ds, "PatientSex")),
        study_date=date,
        series_description=info.description,
        manufacturer=info.manufacturer,
        kernel=info.kernel,
        slice_thickness_mm=info.slice_thickness_mm,
        modality="CT",
        source_format="dicom",
        source_name=folder.name,
        notes=tuple(notes),
    )
    return stack, grid, meta
