"""Image files (NIfTI, NRRD, MHA/MHD): read CT volumes, write and read label masks.

SimpleITK does the format work, including the RAS (NIfTI) <-> LPS (ITK/DICOM) conversion and
NIfTI scl_slope/scl_inter, so every file arrives in LPS world coordinates.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from covidtrack.config import settings
from covidtrack.errors import GeometryError, InputError, IntensityError, NoImageDataError, UnreadableFileError
from covidtrack.io import orient, validate
from covidtrack.volume import ScanMeta, SourceGrid, Volume

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_FORMAT = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}
MASK_SUFFIXES = (".nii.gz", ".nii")


def image_suffix(path: Path) -> str:
    """The format suffix (".nii.gz" counts as one), lower case; "" when not an image format."""
    name = path.name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def read_image(path: Path, what: str = "image") -> "sitk.Image":  # noqa: F821 - lazy import
    """Read any ITK-readable file, with a typed error instead of ITK's RuntimeError."""
    import SimpleITK as sitk

    if not path.exists():
        raise NoImageDataError(path, "does not exist", "check the path (typo? unmounted drive?)")
    if path.is_file() and path.stat().st_size == 0:
        raise NoImageDataError(path, "is an empty file (0 bytes)", f"re-export or re-copy the {what}")
    require_readable(path)
    # ITK pads missing voxel data of a cut-short NIfTI with zeros and reports a cut-short
    # MetaImage with an unrelated reason: check both against their headers first
    name = path.name.lower()
    if path.is_file() and name.endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    elif path.is_file() and name.endswith((".mha", ".mhd")):
        _check_metaimage_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        detail = [line for line in str(err).splitlines() if line.strip()]
        if "orthonormal" in str(err):
            raise GeometryError(
                path, "its orientation matrix (NIfTI sform/qform) is not orthonormal: a shear, or rounding by the tool "
                "that wrote it, which ITK refuses to guess around",
                "re-save it with an orthonormal orientation (e.g. convert the original DICOM series with dcm2niix)",
            ) from err
        raise UnreadableFileError(
            path, f"cannot be read as {'an' if what[:1] in 'aeiou' else 'a'} {what} "
            f"({detail[-1].strip() if detail else 'unknown ITK error'})",
            f"check that the file is complete and really a {'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} file; "
            "re-export or re-copy it",
        ) from err


def require_readable(path: Path) -> None:
    """Refuse a file this process may not read with a typed error that says so (ITK and the
    header checks would report it as missing, truncated or "not a NIfTI")."""
    if not path.is_file():
        return
    try:
        with path.open("rb") as fh:
            fh.read(1)
    except PermissionError as err:
        raise UnreadableFileError(
            path, "cannot be read: permission denied",
            "give your user read access to the file (e.g. chmod u+r) or copy it somewhere readable, and load it again",
        ) from err
    except OSError as err:
        raise UnreadableFileError(path, f"cannot be read ({type(err).__name__}: {err.strerror or err})",
                                  "check the disk or network share it is on, or copy the file somewhere local") from err


def source_grid(image: "sitk.Image") -> SourceGrid:  # noqa: F821
    """The ITK geometry of an image as a :class:`SourceGrid`."""
    return SourceGrid(
        size=tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in image.GetDirection()),  # type: ignore[arg-type]
    )


def _geometry_checks(image: "sitk.Image", path: Path) -> None:  # noqa: F821
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise IntensityError(
            path, f"{image.GetNumberOfComponentsPerPixel()} values per voxel (colour or vector image), not a CT",
            "load a single-channel CT volume in HU",
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 2 or (dim == 3 and min(size) == 1 and sorted(size)[1] > 1):
        raise GeometryError(path, f"a single 2D image ({'x'.join(map(str, size))}), not a 3D CT volume",
                            "load the whole 3D scan (a DICOM series folder or a 3D NIfTI/NRRD)")
    if dim != 3:
        raise GeometryError(path, f"a {dim}D image of size {size}; covidtrack needs one 3D volume",
                            "split 4D files (e.g. 4D-CT phases) and load one 3D phase")


def read_volume_file(path: Path) -> Volume:
    """A NIfTI / NRRD / MHA CT volume -> canonical :class:`Volume` (checks as for DICOM)."""
    import SimpleITK as sitk

    image = read_image(path, "image")
    _geometry_checks(image, path)
    notes: list[str] = []
    if path.name.lower().endswith((".nii", ".nii.gz")):
        reader_codes = _nifti_codes(path)
        if reader_codes == (0, 0):
            notes.append("NIfTI header has no qform/sform: orientation assumed by ITK, check left/right")
        _check_nifti_geometry(path, image.GetSize())
    grid = source_grid(image)
    n_slices = int(grid.size[orient.axis_map(grid.direction).src_axis[2]])
    if n_slices < validate.MIN_SLICES:
        raise GeometryError(path, f"only {n_slices} slices along the feet-head axis; covidtrack needs at least "
                            f"{validate.MIN_SLICES}", "load the complete scan")
    stored = sitk.GetArrayViewFromImage(image)
    if stored.dtype == np.uint8 or stored.dtype == bool:
        validate.check_hu(np.zeros(0), path, stored_dtype=stored.dtype)
    validate.check_hu(stored, path)
    raw = sitk.GetArrayFromImage(image)
    if np.issubdtype(raw.dtype, np.floating):
        not_finite = ~np.isfinite(raw)
        if path.name.lower().endswith((".nii", ".nii.gz")):
            not_finite |= _nifti_nan_mask(path, raw.shape)
        n_nan = int(np.count_nonzero(not_finite))
        if n_nan:
            raw[not_finite] = np.nan
            # NaN/inf appear where a resampler had no data (outside the scanned field): call it air
            np.nan_to_num(raw, copy=False, nan=validate.HU_FLOOR, posinf=validate.HU_FLOOR, neginf=validate.HU_FLOOR)
            notes.append(f"{n_nan} NaN/inf voxels set to {validate.HU_FLOOR} HU")
    array, clipped = validate.as_int16(raw)
    if clipped:
        notes.append(f"{clipped} voxels outside the int16 range clipped")
    notes += validate.apply_hu_floor(array)
    suffix = image_suffix(path)
    meta = ScanMeta(source_format=_FORMAT.get(suffix, suffix.lstrip(".")), source_name=path.name, notes=tuple(notes))
    return orient.canonical_volume(array, grid, meta)


def _check_nifti_complete(path: Path) -> None:
    """Refuse a truncated NIfTI: ITK pads missing voxel data silently instead of failing.

    The header says how many bytes of voxel data follow ``vox_offset``; for .nii.gz the whole
    gzip stream is read (and its CRC checked) to count them.
    """
    import gzip
    import zlib

    import nibabel as nib

    fix = "re-export or re-copy the file (the transfer or the export was cut short)"
    try:
        header = nib.load(str(path)).header
        expected = int(header.get_data_offset()) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception as err:  # noqa: BLE001 - nibabel raises many types on garbage
        if path.stat().st_size == 0:
            raise NoImageDataError(path, "is an empty file (0 bytes)", fix) from err
        raise UnreadableFileError(path, f"is not a readable NIfTI file ({type(err).__name__}: {err})",
                                  "check that this really is a NIfTI file (.nii / .nii.gz); re-export it, or re-copy it "
                                  "if the copy was cut short") from err
    if path.name.lower().endswith(".gz"):
        total = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as err:
            raise UnreadableFileError(path, f"the compressed data is truncated or corrupt ({err})", fix) from err
    else:
        total = path.stat().st_size
    if total < expected:
        raise UnreadableFileError(path, f"holds {total} bytes but its header needs {expected}: the file is truncated", fix)


_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage_complete(path: Path) -> None:
    """Refuse a MetaImage (.mha / .mhd) whose voxel data is missing or shorter than its header
    says (ITK reports that as an unrelated "No such file or directory")."""
    fix = "re-export or re-copy the file (the transfer or the export was cut short)"
    header: dict[str, str] = {}
    offset = 0
    with path.open("rb") as fh:
        for _ in range(200):  # the header is a few dozen "Key = Value" lines ending with ElementDataFile
            line = fh.readline()
            if not line:
                break
            offset += len(line)
            key, sep, value = line.decode("latin-1").partition("=")
            if not sep:
                return  # not a MetaImage header: let ITK say what it is
            header[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                break
    data_file = header.get("ElementDataFile")
    if data_file is None:
        return
    compressed = header.get("CompressedData", "False").lower() == "true"
    try:
        dims = [int(v) for v in header.get("DimSize", "").split()]
        raw_bytes = int(np.prod(dims)) * _MET_BYTES[header.get("ElementType", "")] * int(header.get("ElementNumberOfChannels", "1"))
        n_bytes = int(header["CompressedDataSize"]) if compressed else raw_bytes
    except KeyError:
        if not compressed:
            return  # unusual header: ITK decides
        n_bytes = -1  # compressed without its size: the stream itself is checked below
    except ValueError:
        return
    if data_file == "LOCAL":
        have = path.stat().st_size - offset
        source = path
    elif any(ch in data_file for ch in "%*") or data_file.startswith("LIST"):
        return  # a file list / pattern: ITK decides
    else:
        source = path.parent / data_file
        if not source.is_file():
            raise UnreadableFileError(path, f"its voxel data file {data_file} is missing (expected beside it)",
                                      f"copy {data_file} into the same folder as {path.name}")
        require_readable(source)
        have = source.stat().st_size
    if have < n_bytes:
        raise UnreadableFileError(source, f"holds {have} bytes of voxel data but the header of {path.name} needs "
                                  f"{n_bytes}: the file is truncated", fix)
    if compressed and n_bytes < 0:
        # no CompressedDataSize: inflate the stream (in chunks) and compare with the voxel count
        import zlib

        inflater, got = zlib.decompressobj(), 0
        with source.open("rb") as fh:
            fh.seek(offset if data_file == "LOCAL" else 0)
            while chunk := fh.read(1 << 20):
                try:
                    got += len(inflater.decompress(chunk))
                except zlib.error:
                    return  # not a zlib stream ITK would read either: let ITK say what it is
                if inflater.eof:
                    break
        if not inflater.eof or got < raw_bytes:
            raise UnreadableFileError(source, f"its compressed voxel data ends early ({got} of {raw_bytes} bytes after "
                                      "decompression): the file is truncated", fix)


def _nifti_nan_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """NaN/inf voxels of a float NIfTI in ITK array order (ITK's reader turns NaN into 0 silently)."""
    import nibabel as nib

    img = nib.load(str(path))
    if img.header.get_data_dtype().kind != "f":
        return np.zeros(shape, dtype=bool)
    data = np.asanyarray(img.dataobj)
    mask = ~np.isfinite(data.reshape(data.shape[:3]))
    return np.ascontiguousarray(mask.T)  # nibabel (i, j, k) -> ITK numpy (k, j, i)


FORMS_AGREE_MM = 0.5  # qform and sform may differ by rounding, not by a flip or a shift


def _check_nifti_geometry(path: Path, size: tuple[int, ...]) -> None:
    """Refuse NIfTI geometry that readers disagree on or that ITK silently replaces.

    - A voxel size of 0 or less: ITK substitutes 1 mm, so every volume would be off by the real
      spacing.
    - A qform and an sform that both claim a space but place the volume differently (e.g. a
      mirror left-right after an edit that updated only one): ITK follows the qform, nibabel and
      FSL the sform; which one is right cannot be told from the file.
    """
    try:
        import gzip

        import nibabel as nib

        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:  # the raw header: nib.load would already have replaced a 0 voxel size by 1
            raw = nib.Nifti1Header.from_fileobj(fh, check=False)
        pixdim = [float(v) for v in raw["pixdim"][1:4]]
        header = nib.load(str(path)).header
        codes = int(header["qform_code"]), int(header["sform_code"])
        qform, sform = header.get_qform(), header.get_sform()
    except Exception:  # noqa: BLE001 - ITK already read the file; nibabel is only a second opinion
        return
    if min(pixdim) <= 0:
        raise GeometryError(path, f"voxel size {pixdim[0]:g} x {pixdim[1]:g} x {pixdim[2]:g} mm in the header (0 or negative)",
                            "re-export the scan with its voxel spacing (e.g. from the DICOM series with dcm2niix)")
    if min(codes) > 0:
        corners = np.array(np.meshgrid(*[[0, max(int(n) - 1, 0)] for n in size[:3]], indexing="ij")).reshape(3, -1)
        corners = np.vstack([corners, np.ones(corners.shape[1])])
        gap = float(np.abs((qform - sform) @ corners)[:3].max())
        if gap > FORMS_AGREE_MM:
            raise GeometryError(
                path, f"its qform and sform place the volume up to {gap:.1f} mm apart (possibly mirrored); ITK would follow "
                "the qform, nibabel and FSL the sform, so left and right cannot be trusted",
                "re-save it with one orientation (e.g. nibabel: img.set_qform(img.get_sform()) if the sform is right), "
                "or load the original DICOM series",
            )


def _nifti_codes(path: Path) -> tuple[int, int] | None:
    """(qform_code, sform_code) of a NIfTI header, or None when nibabel cannot tell."""
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
        return int(header["qform_code"]), int(header["sform_code"])
    except Exception:  # noqa: BLE001 - ITK already read the file; this is only a warning
        return None


# --- masks -------------------------------------------------------------------------------------------
def _label_array(mask: np.ndarray, volume: Volume) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's canonical shape {volume.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must hold integer labels, got {mask.dtype}")
    if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 255):
        raise ValueError(f"labels must be in 0..255, got {int(mask.min())}..{int(mask.max())}")
    return mask.astype(np.uint8, copy=False)


def save_mask(mask: np.ndarray, volume: Volume, path: str | Path) -> Path:
    """Write a canonical-grid label array as NIfTI on the volume's SOURCE grid.

    The file then overlays the original scan in 3D Slicer / ITK-SNAP voxel for voxel (the
    canonical grid is a permutation/flip of the source grid, so nothing is interpolated).
    A volume without a source grid (e.g. a phantom) is written on its canonical grid.
    ``path`` must end in .nii or .nii.gz; the file is written atomically. Returns the path.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith(MASK_SUFFIXES):
        raise InputError(path, "masks are written as NIfTI", "give the file name a .nii.gz suffix")
    labels = _label_array(mask, volume)
    if volume.source is None:
        image = volume.to_sitk(np.ascontiguousarray(labels))
    else:
        grid = volume.source
        image = sitk.GetImageFromArray(np.ascontiguousarray(orient.from_canonical(labels, grid)))
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, useCompression=suffix == ".nii.gz")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _same_grid(a: orient.CanonicalGeometry, volume: Volume, tol_mm: float = 1e-3) -> bool:
    return (
        tuple(a.size) == tuple(volume.shape[::-1])
        and np.allclose(a.spacing, volume.spacing[::-1], atol=tol_mm)
        and np.allclose(a.origin, volume.origin, atol=tol_mm * 10)
        and np.allclose(a.direction, volume.direction, atol=1e-4)
    )


def load_mask(path: str | Path, volume: Volume) -> np.ndarray:
    """A label image (ours, 3D Slicer, ITK-SNAP, ...) on the volume's canonical grid, as uint8.

    A mask on the scan's own grid (any axis order/flip) is mapped exactly; any other grid is
    resampled with nearest neighbour in world coordinates. Raises :class:`InputError` when the
    mask is not a label image (fractional or out-of-range values) or does not cover the volume.
    """
    import SimpleITK as sitk

    path = Path(path)
    image = read_image(path, "label image")
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        raise GeometryError(path, f"a label image must be one 3D channel, got {image.GetDimension()}D with "
                            f"{image.GetNumberOfComponentsPerPixel()} component(s)", "export the segmentation as a 3D label map")
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.rint(values)):
        raise UnreadableFileError(path, "holds fractional values, not integer labels (a probability map?)",
                                  "export a label map (threshold it first)")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise UnreadableFileError(path, f"labels range {lo:g}..{hi:g}; covidtrack label maps use 0..255",
                                  "map the labels to 0..255 (see covidtrack.labels for lobe tables)")
    grid = source_grid(image)
    geo = orient.canonical_geometry(grid)
    if _same_grid(geo, volume):
        return np.ascontiguousarray(orient.to_canonical(sitk.GetArrayFromImage(image), grid)).astype(np.uint8)
    _check_covers(image, volume, path)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings().threads)
    reference = volume.to_sitk(np.zeros(volume.shape, dtype=np.uint8))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled).astype(np.uint8)


def _check_covers(image: "sitk.Image", volume: Volume, path: Path) -> None:  # noqa: F821
    """Every corner voxel centre of the volume must fall inside the mask's extent (half a voxel slack)."""
    nz, ny, nx = volume.shape
    spacing = np.asarray(volume.spacing[::-1], dtype=float)
    direction = np.asarray(volume.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(volume.origin, dtype=float)
    size = np.asarray(image.GetSize(), dtype=float)
    worst = 0.0
    for cx in (0, nx - 1):
        for cy in (0, ny - 1):
            for cz in (0, nz - 1):
                world = origin + direction @ (np.array([cx, cy, cz], dtype=float) * spacing)
                idx = np.asarray(image.TransformPhysicalPointToContinuousIndex(tuple(world)))
                outside = np.maximum(-0.5 - idx, idx - (size - 0.5))
                worst = max(worst, float(outside.max()))
    if worst > 1e-3:
        raise GeometryError(
            path, f"the label image does not cover the scan (a corner of the scan lies {worst:.1f} voxels outside it)",
            "load the mask that was made on this scan (same patient and series), or export it on the full scan grid",
        )
