"""Write small synthetic DICOM series with pydicom, for good- and bad-input tests.

``write_series`` takes a canonical array (z, y, x: feet->head, anterior->posterior,
right->left) and stores it as a series with any slice orientation, so tests can check that
loading brings it back to the same canonical array. Keyword switches produce the bad inputs
(wrong modality, 8-bit pixels, missing slice, uneven spacing, gantry tilt, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to L, columns to P; slices stack along S
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # rows to L, columns to I; slices stack along P
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows to P, columns to I; slices stack along L


def phantom_array(shape: tuple[int, int, int] = (12, 24, 20), seed: int = 0) -> np.ndarray:
    """A small asymmetric chest-like int16 HU volume (air, body, two lungs, noise).

    Asymmetric on purpose (a "marker" block on the patient's left, anterior, upper corner)
    so that any flip or transposition shows up.
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    arr = np.full(shape, -1000.0)
    arr[(y / 0.8) ** 2 + (x / 0.9) ** 2 < 1] = 40.0  # body
    arr[((x - 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1] = -850.0  # left lung
    arr[((x + 0.4) / 0.3) ** 2 + (y / 0.5) ** 2 < 1] = -850.0  # right lung
    arr[-max(1, shape[0] // 4):, : shape[1] // 4, -shape[2] // 4:] = 700.0  # marker: superior, anterior, left
    arr += rng.normal(0, 20, shape)
    return np.clip(np.rint(arr), -1024, 3000).astype(np.int16)  # >= -1024 so it survives the HU floor


def _base(series_uid: str, study_uid: str, modality: str, patient_id: str, study_date: str = "20200315",
          patient_sex: str = "") -> Dataset:
    ds = Dataset()
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = patient_id
    if patient_sex:
        ds.PatientSex = patient_sex
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.StudyDate = study_date
    ds.SeriesDescription = f"synthetic {modality}"
    ds.Manufacturer = "covidtrack-tests"
    ds.ConvolutionKernel = "B30f"
    ds.SeriesNumber = 3
    return ds


def write_series(
    folder: str | Path,
    canonical: np.ndarray,
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    *,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-15.0, -20.0, -30.0),
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    bits: int = 16,
    skip_slices: tuple[int, ...] = (),
    position_jitter: dict[int, float] | None = None,
    tilt_deg: float = 0.0,
    override_orientation: dict[int, tuple[float, ...]] | None = None,
    series_uid: str | None = None,
    patient_id: str = "PAT-0001",
    reverse_files: bool = False,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    study_date: str = "20200315",
    patient_sex: str = "",
) -> list[Path]:
    """Write ``canonical`` (z, y, x, HU) as a DICOM series in ``folder``; return the files.

    The volume occupies LPS world space with voxel [0,0,0] at ``origin`` (x, y, z mm) and the
    canonical axes along L, P, S with ``spacing`` (z, y, x) mm; ``orientation`` chooses how it is
    sliced. ``skip_slices`` drops slices; ``position_jitter`` moves slice k along its normal (mm);
    ``tilt_deg`` shears slice positions along the column direction like a tilted gantry;
    ``override_orientation`` gives some slices another ImageOrientationPatient.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    axes = [int(np.argmax(np.abs(v))) for v in (row, col, normal)]  # world axis of row, col, slice
    signs = [float(np.sign(v[a])) for v, a in zip((row, col, normal), axes)]
    sp_xyz = (spacing[2], spacing[1], spacing[0])
    # transpose canonical (z, y, x) -> (slice, row-index j along col, column-index i along row)
    numpy_axis = {0: 2, 1: 1, 2: 0}  # world axis -> canonical numpy axis
    data = np.transpose(canonical, (numpy_axis[axes[2]], numpy_axis[axes[1]], numpy_axis[axes[0]]))
    for dim, sign in zip((2, 1, 0), signs):  # dims of data for row (i), col (j), slice (k)
        if sign < 0:
            data = np.flip(data, axis=dim)
    n_k, n_j, n_i = data.shape
    di, dj, dk = sp_xyz[axes[0]], sp_xyz[axes[1]], sp_xyz[axes[2]]
    # world position of data[0, 0, 0]: the canonical corner that ends up first
    extent = np.array([(canonical.shape[2] - 1) * sp_xyz[0], (canonical.shape[1] - 1) * sp_xyz[1],
                       (canonical.shape[0] - 1) * sp_xyz[2]])
    first = np.asarray(origin, dtype=float).copy()
    for a, sign in zip(axes, signs):
        if sign < 0:
            first[a] += extent[a]
    stored = (data.astype(np.float64) - intercept) / slope
    study_uid, series_uid = generate_uid(), series_uid or generate_uid()
    jitter = position_jitter or {}
    shear = np.tan(np.radians(tilt_deg)) * dk
    files: list[Path] = []
    for k in range(n_k):
        if k in skip_slices:
            continue
        pos = first + (k * dk + jitter.get(k, 0.0)) * normal + k * shear * col
        ds = _base(series_uid, study_uid, modality, patient_id, study_date, patient_sex)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(image_type)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        iop = (override_orientation or {}).get(k, orientation)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{dj:.6f}", f"{di:.6f}"]
        ds.SliceThickness = f"{dk:.4f}"
        if tilt_deg:
            ds.GantryDetectorTilt = f"{tilt_deg:.2f}"
        ds.Rows, ds.Columns = n_j, n_i
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        if bits == 8:
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            pixels = np.clip(np.rint(stored[k]), 0, 255).astype(np.uint8)
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12 if intercept != 0 else 16, 11 if intercept != 0 else 15
            ds.PixelRepresentation = 0 if intercept != 0 else 1
            pixels = np.rint(stored[k]).astype(np.uint16 if intercept != 0 else np.int16)
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        index = n_k - 1 - k if reverse_files else k
        path = folder / f"IM{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_2d(path: str | Path, modality: str = "CT") -> Path:
    """One standalone CT slice (a 2D image)."""
    folder = Path(path).parent
    files = write_series(folder / "_tmp2d", phantom_array((1, 16, 16)), modality=modality)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files[0].replace(path)
    (folder / "_tmp2d").rmdir()
    return Path(path)


def read_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
