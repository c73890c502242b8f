"""The canonical CT volume every stage of covidtrack takes.

Canonical orientation (documented once, used everywhere):

- ``array`` is int16 Hounsfield units with axes ``(z, y, x)``;
- ``z`` runs from the feet to the head (inferior -> superior),
- ``y`` from anterior to posterior,
- ``x`` from the patient's right to the patient's left.

That is the standard radiological axial stack: ``array[k]`` displayed with ``imshow`` shows the
patient's right on the viewer's left and anterior at the top. In ITK/DICOM world coordinates
(LPS) it is the identity direction: index axis x points to L, y to P, z to S.

Geometry conventions follow ITK so that a Volume converts to SimpleITK without surprises:
``origin`` is the LPS world position (mm) of voxel ``array[0, 0, 0]`` given as ``(x, y, z)``;
``direction`` is the 3x3 ITK direction matrix (row-major, columns are the index axes x, y, z).
``spacing`` is in ``(z, y, x)`` order, the same as ``array``.

``source`` records the grid of the file the volume came from, so masks can be written back onto
it exactly (the canonical grid is a permutation / flip of it, so nearest-neighbour resampling
between the two is lossless).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # SimpleITK is heavy; import it only where a conversion happens
    import SimpleITK as sitk

Vec3 = tuple[float, float, float]
Mat3 = tuple[float, float, float, float, float, float, float, float, float]
IDENTITY: Mat3 = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class ScanMeta:
    """What we keep about a scan. Never a patient name or a raw patient ID."""

    patient_key: str = ""  # salted hash of PatientID, or "" when unknown
    patient_sex: str = ""  # DICOM PatientSex "M" / "F" / "O", or "" when unknown (used to check identity)
    study_date: dt.date | None = None
    series_description: str = ""
    manufacturer: str = ""
    kernel: str = ""
    slice_thickness_mm: float | None = None
    modality: str = "CT"
    source_format: str = ""  # "dicom", "nifti", "nrrd", "mha", "phantom"
    source_name: str = ""  # file or folder name (not the full path)
    notes: tuple[str, ...] = ()  # what was done at the boundary (e.g. "resampled gantry tilt 12 deg")
    identity_note: str = ""  # set when the scan was accepted although its DICOM identity differs (covidtrack.identity)


@dataclass(frozen=True)
class SourceGrid:
    """Geometry of the source image in ITK terms (size and spacing in x, y, z order)."""

    size: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: Mat3


@dataclass(frozen=True, eq=False)
class Volume:
    """An int16 HU volume on the canonical grid. See the module docstring for conventions."""

    array: np.ndarray
    spacing: Vec3  # (z, y, x) mm
    origin: Vec3 = (0.0, 0.0, 0.0)  # LPS (x, y, z) mm of array[0, 0, 0]
    direction: Mat3 = IDENTITY
    meta: ScanMeta = field(default_factory=ScanMeta)
    source: SourceGrid | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3D (z, y, x), got shape {self.array.shape}")
        if self.array.dtype != np.int16:
            raise ValueError(f"Volume array must be int16 HU, got {self.array.dtype}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (z, y, x) mm, got {self.spacing}")
        self.array.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry and metadata, new HU array (must keep the shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from {self.array.shape}")
        return replace(self, array=np.ascontiguousarray(array, dtype=np.int16))

    # --- SimpleITK conversion -------------------------------------------------------------
    def to_sitk(self, array: np.ndarray | None = None) -> "sitk.Image":
        """This volume (or another array on the same grid, e.g. a mask) as a SimpleITK image."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(self.array if array is None else array)
        img.SetSpacing(tuple(float(s) for s in self.spacing[::-1]))
        img.SetOrigin(tuple(float(o) for o in self.origin))
        img.SetDirection(tuple(float(d) for d in self.direction))
        return img

    @classmethod
    def from_canonical_sitk(
        cls, image: "sitk.Image", meta: ScanMeta | None = None, source: SourceGrid | None = None
    ) -> "Volume":
        """Wrap a SimpleITK image that is already in canonical orientation and in HU."""
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(image)
        arr = np.clip(np.rint(arr), -32768, 32767).astype(np.int16) if arr.dtype != np.int16 else arr
        return cls(
            array=np.ascontiguousarray(arr),
            spacing=tuple(float(s) for s in image.GetSpacing()[::-1]),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),  # type: ignore[arg-type]
            meta=meta or ScanMeta(),
            source=source,
        )
