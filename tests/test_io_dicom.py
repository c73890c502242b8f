"""DICOM series from synthetic data: orientation invariance, series choice, metadata, tilt."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from covidtrack.io import list_series, load_ct, patient_key, volume_hash
try:
    from tests import dicomgen as gen
except ImportError:  # pytest run without the repo root on sys.path
    import dicomgen as gen  # type: ignore[no-redef]

ORIENTATIONS = {
    "axial": gen.AXIAL,
    "axial_flipped_rows_cols": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "axial_transposed": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
    "coronal": gen.CORONAL,
    "sagittal": gen.SAGITTAL,
}


@pytest.fixture(scope="module")
def canonical() -> np.ndarray:
    return gen.phantom_array((12, 24, 20))


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_any_slice_orientation_loads_to_the_same_canonical_array(tmp_path: Path, canonical: np.ndarray, name: str) -> None:
    gen.write_series(tmp_path / name, canonical, spacing=(2.5, 1.5, 1.25), orientation=ORIENTATIONS[name],
                     origin=(-15.0, -20.0, -30.0), reverse_files=True)
    vol = load_ct(tmp_path / name)
    np.testing.assert_array_equal(vol.array, canonical)
    assert vol.array.dtype == np.int16
    np.testing.assert_allclose(vol.spacing, (2.5, 1.5, 1.25), atol=1e-4)
    np.testing.assert_allclose(vol.origin, (-15.0, -20.0, -30.0), atol=1e-4)
    np.testing.assert_allclose(vol.direction, np.eye(3).ravel(), atol=1e-6)
    # the marker block (superior, anterior, patient's left) is where the canonical convention says
    assert vol.array[-1, 0, -1] > 500 and vol.array[0, 0, -1] < 500 and vol.array[-1, 0, 0] < 500


def test_rescale_slope_and_intercept_give_hu(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path / "s", canonical, slope=0.5, intercept=-1024.0)
    vol = load_ct(tmp_path / "s")
    # stored = (HU + 1024) / 0.5 is rounded to an integer, so HU comes back within 0.5 HU -> exact after rounding
    assert np.abs(vol.array.astype(int) - canonical).max() <= 1


def test_metadata_is_pseudonymous(tmp_path: Path, canonical: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    gen.write_series(tmp_path / "s", canonical, patient_id="PAT-0001")
    vol = load_ct(tmp_path / "s")
    meta = vol.meta
    assert meta.study_date == dt.date(2020, 3, 15)
    assert meta.kernel == "B30f" and meta.manufacturer == "covidtrack-tests" and meta.source_format == "dicom"
    assert meta.slice_thickness_mm == pytest.approx(2.5)
    assert meta.patient_key == patient_key("PAT-0001") and len(meta.patient_key) == 16
    assert "PAT-0001" not in repr(meta) and "Synthetic" not in repr(meta)
    monkeypatch.setenv("COVIDTRACK_SALT", "another-site")
    assert patient_key("PAT-0001") != meta.patient_key  # the salt matters
    assert patient_key("") == ""


def test_list_series_and_default_choice(tmp_path: Path, canonical: np.ndarray) -> None:
    study = tmp_path / "study"
    gen.write_series(study / "thin", canonical, spacing=(2.5, 1.5, 1.5))
    gen.write_series(study / "thick", canonical[::2], spacing=(5.0, 1.5, 1.5))  # 6 slices: too few, but listed
    gen.write_series(study / "cor", canonical, orientation=gen.CORONAL)  # 24 coronal images
    gen.write_series(study / "mr", canonical, modality="MR")
    (study / "notes.txt").write_text("not DICOM")
    (study / "DICOMDIR").write_bytes(b"\0" * 10)
    series = list_series(study)
    assert len(series) == 4
    by_mod = {(s.modality, s.orientation, s.n_slices) for s in series}
    assert ("CT", "axial", 12) in by_mod and ("CT", "coronal", 24) in by_mod and ("MR", "axial", 12) in by_mod
    assert all(s.study_date == dt.date(2020, 3, 15) and s.kernel == "B30f" for s in series)
    # default: the axial CT series with the most slices, even though the coronal one has more images
    vol = load_ct(study)
    assert vol.shape == canonical.shape and vol.spacing[0] == pytest.approx(2.5)
    cor_uid = next(s.series_uid for s in series if s.orientation == "coronal")
    np.testing.assert_array_equal(load_ct(study, series_uid=cor_uid).array, canonical)


def test_volume_hash_is_format_and_orientation_independent(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path / "a", canonical, orientation=gen.AXIAL)
    gen.write_series(tmp_path / "b", canonical, orientation=gen.SAGITTAL)
    a, b = load_ct(tmp_path / "a"), load_ct(tmp_path / "b")
    assert volume_hash(a) == volume_hash(b)
    changed = canonical.copy()
    changed[3, 4, 5] += 1
    assert volume_hash(a.with_array(changed)) != volume_hash(a)


def test_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    # a vertical rod in the world: in a tilted acquisition it drifts one row per slice
    n, rows, cols = 12, 20, 16
    upright = np.full((n, rows, cols), -1000, dtype=np.int16)
    upright[:, 14:17, 6:9] = 300  # stays inside every rolled slice (no wrap-around)
    upright[:, :, :2] = 40  # some body so the HU check sees more than air
    dk, dj = 2.5, 1.5
    tilt = float(np.degrees(np.arctan(dj / dk)))  # exactly one row of shear per slice
    sheared = np.stack([np.roll(upright[k], -k, axis=0) for k in range(n)])
    gen.write_series(tmp_path / "t", sheared, spacing=(dk, dj, 1.5), tilt_deg=tilt)
    vol = load_ct(tmp_path / "t")
    assert any("gantry tilt" in note for note in vol.meta.notes)
    assert vol.shape == (n, rows + n - 1, cols)  # the grid grows to hold the whole sheared stack
    rod_rows = [np.flatnonzero(vol.array[k, :, 7] > 100) for k in range(n)]
    assert all(np.array_equal(r, rod_rows[0]) for r in rod_rows)  # the rod is upright again
    assert len(rod_rows[0]) == 3
    # world position of the rod equals where the tilted slices put it
    row0 = int(rod_rows[0][0])
    y_world = vol.origin[1] + row0 * vol.spacing[1]
    assert y_world == pytest.approx(-20.0 + 14 * dj, abs=1e-3)


def test_localizer_in_the_ct_series_is_ignored(tmp_path: Path, canonical: np.ndarray) -> None:
    uid = "1.2.826.0.1.3680043.8.498.77"
    gen.write_series(tmp_path / "axial", canonical, series_uid=uid)
    scout = gen.write_series(tmp_path / "scout", canonical, series_uid=uid, orientation=gen.CORONAL,
                             image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), skip_slices=tuple(range(1, 24)))
    assert len(scout) == 1
    vol = load_ct(tmp_path)
    np.testing.assert_array_equal(vol.array, canonical)
    assert any("localizer" in note for note in vol.meta.notes)


def test_save_mask_lands_on_the_dicom_slices(tmp_path: Path, canonical: np.ndarray) -> None:
    """A mask saved for a coronal series overlays the DICOM pixels as stored, slice by slice."""
    import pydicom
    import SimpleITK as sitk

    from covidtrack.io import load_mask, save_mask

    files = gen.write_series(tmp_path / "cor", canonical, orientation=gen.CORONAL, reverse_files=True)
    vol = load_ct(tmp_path / "cor")
    marker = (vol.array > 500).astype(np.uint8)
    out = save_mask(marker, vol, tmp_path / "marker.nii.gz")
    written = sitk.ReadImage(str(out))
    # the DICOM slices as stored, ordered along their normal (anterior -> posterior for this IOP)
    datasets = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[1]))
    stored = np.stack([d.pixel_array.astype(int) + int(d.RescaleIntercept) for d in datasets])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (stored > 500).astype(np.uint8))
    iop = np.asarray(gen.CORONAL)
    np.testing.assert_allclose(np.asarray(written.GetDirection()).reshape(3, 3)[:, 0], iop[:3], atol=1e-6)
    np.testing.assert_allclose(np.asarray(written.GetDirection()).reshape(3, 3)[:, 1], iop[3:], atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), [float(v) for v in datasets[0].ImagePositionPatient], atol=1e-4)
    np.testing.assert_array_equal(load_mask(out, vol), marker)


def test_save_mask_without_source_grid_uses_the_canonical_grid(tmp_path: Path, canonical: np.ndarray) -> None:
    import SimpleITK as sitk

    from covidtrack.io import load_mask, save_mask
    from covidtrack.volume import Volume

    vol = Volume(array=canonical.copy(), spacing=(2.0, 1.0, 1.5), origin=(1.0, 2.0, 3.0))  # e.g. a phantom
    labels = (canonical > -500).astype(np.uint8)
    out = save_mask(labels, vol, tmp_path / "m.nii")
    written = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), labels)
    np.testing.assert_allclose(written.GetSpacing(), (1.5, 1.0, 2.0))
    np.testing.assert_allclose(written.GetOrigin(), (1.0, 2.0, 3.0), atol=1e-5)
    np.testing.assert_array_equal(load_mask(out, vol), labels)
    with pytest.raises(ValueError, match="shape"):
        save_mask(labels[:-1], vol, tmp_path / "bad.nii.gz")
    from covidtrack.errors import InputError

    with pytest.raises(InputError, match="nii"):
        save_mask(labels, vol, tmp_path / "m.png")
