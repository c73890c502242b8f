"""Real CT: the CIP sample (data/samples, always present) and the shared development data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from covidtrack.config import SAMPLES
from covidtrack.errors import GeometryError, UnreadableFileError
from covidtrack.io import list_series, load_ct, load_mask, save_mask, volume_hash
from covidtrack.volume import Volume

CIP = SAMPLES / "cip_copdgene_ct64"


@pytest.fixture(scope="module")
def dicom_volume() -> Volume:
    return load_ct(CIP / "dicom")


@pytest.fixture(scope="module")
def nrrd_volume() -> Volume:
    return load_ct(CIP / "ct-64.nrrd")


def _same_geometry(a: Volume, b: Volume, tol: float = 1e-3) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


def test_cip_dicom_and_nrrd_load_to_the_same_volume(dicom_volume: Volume, nrrd_volume: Volume) -> None:
    np.testing.assert_array_equal(dicom_volume.array, nrrd_volume.array)
    _same_geometry(dicom_volume, nrrd_volume)
    assert dicom_volume.shape == (79, 64, 64)
    np.testing.assert_allclose(dicom_volume.spacing, (3.987, 4.172, 4.172), atol=1e-3)
    assert volume_hash(dicom_volume) == volume_hash(nrrd_volume)
    assert dicom_volume.meta.source_format == "dicom" and nrrd_volume.meta.source_format == "nrrd"
    assert dicom_volume.meta.study_date is not None and dicom_volume.meta.patient_key


def test_cip_series_listing() -> None:
    (info,) = list_series(CIP)
    assert info.modality == "CT" and info.n_slices == 79 and info.orientation == "axial"
    assert info.slice_thickness_mm == pytest.approx(3.987, abs=1e-3)


def test_canonical_orientation_is_anatomical(dicom_volume: Volume) -> None:
    """z to the head, y to the back, x to the patient's left: checks the convention, not only consistency."""
    arr = dicom_volume.array
    lungs = load_mask(CIP / "wholeLung-64.nrrd", dicom_volume).astype(bool)
    z = np.arange(arr.shape[0])
    lung_z = np.average(z, weights=lungs.sum(axis=(1, 2)))
    nz, ny, nx = arr.shape
    midline_air = (arr[:, ny // 4: 2 * ny // 3, nx // 2 - 4: nx // 2 + 4] < -900).sum(axis=(1, 2))
    assert np.average(z, weights=midline_air) > lung_z + 5  # the trachea is above (toward the head of) the lungs
    assert lungs[:, :, : nx // 2].sum() > lungs[:, :, nx // 2:].sum()  # the right lung is the larger one
    bone_y = np.argwhere(arr > 300)[:, 1]
    assert np.median(bone_y) > ny / 2  # spine and posterior ribs: bone is mostly posterior


def _variant(image: sitk.Image, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same physical image stored with permuted/flipped index axes and a matching header.

    New index axis i is old axis perm[i], reversed when flips[i]. Written independently of the
    covidtrack.io code on purpose.
    """
    arr = sitk.GetArrayFromImage(image)  # (z, y, x) = ITK axes (2, 1, 0)
    arr = np.transpose(arr, [2 - perm[2], 2 - perm[1], 2 - perm[0]])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing, size = np.asarray(image.GetSpacing()), np.asarray(image.GetSize())
    origin = np.asarray(image.GetOrigin(), dtype=float)
    new_dir = np.zeros((3, 3))
    for i in range(3):
        new_dir[:, i] = direction[:, perm[i]] * (-1 if flips[i] else 1)
        if flips[i]:
            arr = np.flip(arr, axis=2 - i)
            origin = origin + direction[:, perm[i]] * (size[perm[i]] - 1) * spacing[perm[i]]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    out.SetSpacing(tuple(float(spacing[p]) for p in perm))
    out.SetOrigin(tuple(origin))
    out.SetDirection(tuple(new_dir.ravel()))
    return out


VARIANTS = [
    ((0, 1, 2), (True, False, False), ".nii.gz"),  # x flipped (RPS), NIfTI
    ((0, 1, 2), (False, True, True), ".nrrd"),  # LAI
    ((2, 0, 1), (False, False, False), ".mha"),  # stored as sagittal-like stack
    ((1, 2, 0), (True, False, True), ".nii.gz"),  # permuted and flipped
]


@pytest.mark.parametrize("perm, flips, suffix", VARIANTS)
def test_orientation_invariance_on_real_ct(
    tmp_path: Path, nrrd_volume: Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool], suffix: str
) -> None:
    source = sitk.ReadImage(str(CIP / "ct-64.nrrd"))
    variant = _variant(source, perm, flips)
    # the variant header describes the same physical voxels (sanity check of the test itself)
    idx_old = (5, 17, 40)
    idx_new = tuple(
        (source.GetSize()[perm[i]] - 1 - idx_old[perm[i]]) if flips[i] else idx_old[perm[i]] for i in range(3)
    )
    np.testing.assert_allclose(variant.TransformIndexToPhysicalPoint(idx_new),
                               source.TransformIndexToPhysicalPoint(idx_old), atol=1e-4)
    assert variant[idx_new] == source[idx_old]
    path = tmp_path / f"variant{suffix}"
    sitk.WriteImage(variant, str(path))
    vol = load_ct(path)
    np.testing.assert_array_equal(vol.array, nrrd_volume.array)
    _same_geometry(vol, nrrd_volume)


def test_oblique_header_keeps_a_residual_rotation(nrrd_volume: Volume) -> None:
    vol = load_ct(CIP / "ct-64-transformed.nrrd")
    np.testing.assert_array_equal(vol.array, nrrd_volume.array)  # same voxels, rotated header
    rot = np.asarray(vol.direction).reshape(3, 3)
    angle = np.degrees(np.arctan2(rot[1, 0], rot[0, 0]))
    assert abs(abs(angle) - 20.0) < 0.5


def test_save_mask_round_trips_exactly_onto_the_source_grid(tmp_path: Path, nrrd_volume: Volume) -> None:
    source = sitk.ReadImage(str(CIP / "ct-64.nrrd"))
    variant = _variant(source, (1, 2, 0), (True, False, True))
    src_path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(variant, str(src_path))
    vol = load_ct(src_path)
    lung = load_mask(CIP / "wholeLung-64.nrrd", vol)  # ships on the ct-64.nrrd grid
    assert lung.dtype == np.uint8 and 1000 < int(lung.sum()) < lung.size // 2
    labels = lung.copy()
    labels[: vol.shape[0] // 2] *= 2  # two labels, so a flip in z would show
    out = save_mask(labels, vol, tmp_path / "masks" / "lung.nii.gz")
    written = sitk.ReadImage(str(out))
    original = sitk.ReadImage(str(src_path))
    assert written.GetSize() == original.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
    # voxel for voxel: the written mask equals the lung mask moved onto the variant grid by the test's own math
    ref_mask = sitk.ReadImage(str(CIP / "wholeLung-64.nrrd"))
    ref_labels = sitk.GetArrayFromImage(ref_mask).astype(np.uint8)
    ref_labels[: ref_labels.shape[0] // 2] *= 2  # canonical == NRRD layout here (identity direction)
    ref_img = sitk.GetImageFromArray(ref_labels)
    ref_img.CopyInformation(ref_mask)
    expected = sitk.GetArrayFromImage(_variant(ref_img, (1, 2, 0), (True, False, True)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), expected)
    np.testing.assert_array_equal(load_mask(out, vol), labels)  # and back
    assert not list((tmp_path / "masks").glob(".tmp-*"))  # atomic write leaves no temp file


def test_load_mask_resamples_other_grids_and_refuses_partial_ones(tmp_path: Path, nrrd_volume: Volume) -> None:
    ref = sitk.ReadImage(str(CIP / "wholeLung-64.nrrd"))
    expected = sitk.GetArrayFromImage(ref).astype(np.uint8)
    # a bigger grid (3 voxels of margin on every side), stored with permuted axes
    padded = sitk.ConstantPad(sitk.Cast(ref, sitk.sitkUInt8), (3, 3, 3), (3, 3, 3), 0)
    path = tmp_path / "padded.nii.gz"
    sitk.WriteImage(_variant(padded, (2, 0, 1), (False, True, False)), str(path))
    np.testing.assert_array_equal(load_mask(path, nrrd_volume), expected)
    # a cropped grid does not cover the scan
    cropped = sitk.Crop(ref, (0, 0, 5), (0, 0, 5))
    sitk.WriteImage(cropped, str(tmp_path / "cropped.nii.gz"))
    with pytest.raises(GeometryError, match="does not cover"):
        load_mask(tmp_path / "cropped.nii.gz", nrrd_volume)


def test_load_mask_refuses_non_label_images(tmp_path: Path, nrrd_volume: Volume) -> None:
    ref = sitk.ReadImage(str(CIP / "wholeLung-64.nrrd"))
    prob = sitk.Cast(ref, sitk.sitkFloat32) * 0.7
    sitk.WriteImage(prob, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(UnreadableFileError, match="fractional"):
        load_mask(tmp_path / "prob.nii.gz", nrrd_volume)
    big = sitk.Cast(ref, sitk.sitkUInt16) * 300
    sitk.WriteImage(big, str(tmp_path / "big.nii.gz"))
    with pytest.raises(UnreadableFileError, match="0..255"):
        load_mask(tmp_path / "big.nii.gz", nrrd_volume)


# --- shared development data (skipped in a fresh clone) --------------------------------------------
def _plausible_chest_ct(vol: Volume) -> None:
    arr = vol.array
    assert arr.dtype == np.int16 and arr.min() >= -1024
    p = np.percentile(arr[::2, ::4, ::4], [1, 50, 99.9])
    assert p[0] <= -950  # air
    assert p[2] > 300  # bone
    body = arr[:, arr.shape[1] // 3: 2 * arr.shape[1] // 3, arr.shape[2] // 2]
    assert np.mean((body > -200) & (body < 200)) > 0.2  # soft tissue along the midline


def test_chest4dct_series_loads_with_plausible_hu_and_spacing(shared_data: Path) -> None:
    vol = load_ct(shared_data / "ct" / "chest4dct_phase00" / "dicom")
    assert vol.shape == (141, 512, 512)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-4)
    np.testing.assert_allclose(vol.direction, np.eye(3).ravel(), atol=1e-6)
    _plausible_chest_ct(vol)
    # its derived 4 mm NIfTI covers the same physical box (same origin corner)
    small = load_ct(shared_data / "ct" / "chest4dct_phase00" / "ct_4mm.nii.gz")
    np.testing.assert_allclose(small.origin, vol.origin, atol=1e-3)


def test_lung_pet_ct_dx_series_loads_with_plausible_hu_and_spacing(shared_data: Path) -> None:
    vol = load_ct(shared_data / "ct" / "lung-pet-ct-dx_A0001" / "dicom")
    assert vol.shape == (64, 512, 512)
    np.testing.assert_allclose(vol.spacing, (5.0, 0.841796875, 0.841796875), atol=1e-4)
    _plausible_chest_ct(vol)
    assert vol.meta.patient_key and "A0001" not in repr(vol.meta)
