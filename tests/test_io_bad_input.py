"""Every kind of bad input gives a typed InputError that names the file and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from covidtrack.errors import (
    GeometryError,
    InputError,
    IntensityError,
    NoImageDataError,
    NotCTError,
    UnreadableFileError,
)
from covidtrack.io import list_series, load_ct, scan_folder

try:
    from tests import dicomgen as gen
except ImportError:  # pytest run without the repo root on sys.path
    import dicomgen as gen  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def canonical() -> np.ndarray:
    return gen.phantom_array((12, 16, 16))


def _raises(kind: type[InputError], path: Path, *words: str, series_uid: str | None = None) -> InputError:
    with pytest.raises(kind) as info:
        load_ct(path, series_uid=series_uid)
    err = info.value
    text = str(err).lower()
    assert err.fix and "fix:" in text, "every error must say what to do"
    for word in words:
        assert word.lower() in text, f"{word!r} not in {err}"
    return err


def test_nonexistent_path(tmp_path: Path) -> None:
    err = _raises(NoImageDataError, tmp_path / "nope", "does not exist")
    assert err.path.endswith("nope")


def test_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "data.bin").write_bytes(b"not dicom at all" * 20)
    _raises(NoImageDataError, tmp_path, "no DICOM files")


def test_one_truncated_file_among_good_ones_is_named(tmp_path: Path, canonical: np.ndarray) -> None:
    files = gen.write_series(tmp_path, canonical)
    bad = files[5]
    bad.write_bytes(bad.read_bytes()[:-200])  # pixel data cut short
    err = _raises(UnreadableFileError, tmp_path, bad.name, "truncated")
    assert err.path == str(bad)


def test_corrupt_header_file_is_named(tmp_path: Path, canonical: np.ndarray) -> None:
    files = gen.write_series(tmp_path, canonical)
    bad = files[3]
    bad.write_bytes(bad.read_bytes()[:300])  # cut inside the header
    err = _raises(UnreadableFileError, tmp_path, bad.name)
    assert err.path == str(bad)
    # listing still works and shows the rest; the scan reports the broken file
    assert list_series(tmp_path)[0].n_slices == len(files) - 1
    assert [p for p, _ in scan_folder(tmp_path).unreadable] == [bad]


def test_garbage_with_dicom_suffix_is_corrupt(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, canonical)
    (tmp_path / "IMXXXX.dcm").write_bytes(b"\x00garbage" * 50)
    _raises(UnreadableFileError, tmp_path, "IMXXXX.dcm")


@pytest.mark.parametrize("modality", ["MR", "PT", "SEG"])
def test_non_ct_modality(tmp_path: Path, canonical: np.ndarray, modality: str) -> None:
    gen.write_series(tmp_path, canonical, modality=modality)
    _raises(NotCTError, tmp_path, modality, "CT")
    uid = list_series(tmp_path)[0].series_uid
    _raises(NotCTError, tmp_path, modality, series_uid=uid)  # also when asked for explicitly


def test_unknown_series_uid(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, canonical)
    _raises(NoImageDataError, tmp_path, "1.2.3.4", series_uid="1.2.3.4")


def test_several_series_of_one_date_load_the_largest_and_name_the_others(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path / "long", canonical, series_uid="1.2.826.0.1.111")
    gen.write_series(tmp_path / "short", canonical[:10].copy(), series_uid="1.2.826.0.1.222")
    vol = load_ct(tmp_path)
    assert vol.shape[0] == canonical.shape[0]
    assert any("1.2.826.0.1.222" in n and "--series-uid" in n for n in vol.meta.notes)
    picked = load_ct(tmp_path, series_uid="1.2.826.0.1.222")
    assert picked.shape[0] == 10 and not any("--series-uid" in n for n in picked.meta.notes)


def test_series_of_different_dates_in_one_folder_are_refused(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path / "a", canonical, series_uid="1.2.826.0.1.1", study_date="20060101")
    gen.write_series(tmp_path / "b", canonical, series_uid="1.2.826.0.1.2", study_date="20070101")
    _raises(InputError, tmp_path, "2 different dates", "2006-01-01", "2007-01-01", "--series-uid", "1.2.826.0.1.2")
    assert load_ct(tmp_path, series_uid="1.2.826.0.1.2").meta.study_date.year == 2007


def test_single_2d_image(tmp_path: Path) -> None:
    one = gen.write_2d(tmp_path / "folder" / "slice.dcm")
    _raises(GeometryError, tmp_path / "folder", "single 2D image")
    _raises(GeometryError, one, "single DICOM file", "folder")  # the file itself


def test_single_2d_image_file_format(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16), -1000, dtype=np.int16)), str(path))
    _raises(GeometryError, path, "2D")


def test_fewer_than_ten_slices(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, canonical[:7])
    _raises(GeometryError, tmp_path, "only 7 slices")


def test_missing_slice(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, canonical, skip_slices=(6,))
    err = _raises(GeometryError, tmp_path, "missing slices", "IM0005.dcm", "IM0007.dcm")
    assert "5 mm" in str(err)  # the gap size is reported


def test_non_uniform_spacing(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, canonical, position_jitter={4: 0.6})  # 2.5 mm steps, one 3.1 / 1.9
    _raises(GeometryError, tmp_path, "non-uniform slice spacing")


def test_non_uniform_spacing_partway(tmp_path: Path, canonical: np.ndarray) -> None:
    # the pitch changes from 2.5 to 3.0 mm halfway: every step is below the gap limit
    gen.write_series(tmp_path, canonical, position_jitter={k: 0.5 * (k - 5) for k in range(6, 12)})
    _raises(GeometryError, tmp_path, "non-uniform slice spacing")


def test_positions_rounded_to_a_tenth_of_a_mm_are_accepted(tmp_path: Path, canonical: np.ndarray) -> None:
    spacing = 0.625  # thin slices whose header positions were rounded to 0.1 mm
    jitter = {k: round(k * spacing, 1) - k * spacing for k in range(canonical.shape[0])}
    gen.write_series(tmp_path, canonical, spacing=(spacing, 1.5, 1.5), position_jitter=jitter)
    vol = load_ct(tmp_path)
    assert vol.shape == canonical.shape and vol.spacing[0] == pytest.approx(spacing, abs=0.01)


def test_duplicate_positions(tmp_path: Path, canonical: np.ndarray) -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"
    gen.write_series(tmp_path / "a", canonical, series_uid=uid)
    gen.write_series(tmp_path / "b", canonical, series_uid=uid)  # a second phase under the same UID
    _raises(GeometryError, tmp_path, "duplicate slice position")


def test_mixed_orientations(tmp_path: Path, canonical: np.ndarray) -> None:
    oblique = (1.0, 0.0, 0.0, 0.0, float(np.cos(0.3)), float(np.sin(0.3)))
    gen.write_series(tmp_path, canonical, override_orientation={2: oblique, 3: oblique})
    err = _raises(GeometryError, tmp_path, "mixed slice orientations")
    assert "2 slices" in str(err)


def test_not_hu_8bit_dicom(tmp_path: Path, canonical: np.ndarray) -> None:
    display = np.clip((canonical.astype(float) + 1000) / 8, 0, 255).astype(np.int16)
    gen.write_series(tmp_path, display, bits=8, intercept=0.0)
    _raises(IntensityError, tmp_path, "8-bit")


def test_not_hu_raw_values_without_intercept(tmp_path: Path, canonical: np.ndarray) -> None:
    gen.write_series(tmp_path, (canonical.astype(np.int32) + 1024).astype(np.int16), intercept=0.0)
    _raises(IntensityError, tmp_path, "no negative value", "intercept")


@pytest.mark.parametrize(
    "values, words",
    [
        ("uint8", ("8-bit",)),
        ("display", ("0-255",)),
        ("normalised", ("normalised",)),
        ("shifted", ("air",)),
    ],
)
def test_not_hu_files(tmp_path: Path, canonical: np.ndarray, values: str, words: tuple[str, ...]) -> None:
    hu = canonical.astype(np.float32)
    arr = {
        "uint8": np.clip((hu + 1000) / 8, 0, 255).astype(np.uint8),
        "display": np.clip((hu + 1000) / 8, 0, 255).astype(np.int16),  # 0-255 in a 16-bit container
        "normalised": ((hu - hu.min()) / (hu.max() - hu.min())).astype(np.float32),
        "shifted": (hu - 1024).astype(np.int16),  # intercept applied twice: air at -2024
    }[values]
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    _raises(IntensityError, path, *words)


@pytest.mark.parametrize("content", [b"", b"this is not a nifti file" * 10, "truncated"])
def test_unreadable_nifti(tmp_path: Path, canonical: np.ndarray, content: bytes | str) -> None:
    path = tmp_path / "scan.nii.gz"
    if content == "truncated":
        good = tmp_path / "good.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(canonical), str(good))
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(InputError) as info:
        load_ct(path)
    assert "scan.nii.gz" in str(info.value) and info.value.fix
    assert isinstance(info.value, (UnreadableFileError, NoImageDataError))


@pytest.mark.parametrize("form", ["mha", "mha-compressed", "mhd", "mhd-no-raw"])
def test_cut_short_metaimage_names_the_file_and_says_truncated(tmp_path: Path, canonical: np.ndarray, form: str) -> None:
    img = sitk.GetImageFromArray(canonical)
    if form.startswith("mha"):
        path = tmp_path / "scan.mha"
        sitk.WriteImage(img, str(path), useCompression=form == "mha-compressed")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 200])
        _raises(UnreadableFileError, path, "scan.mha", "truncated")
    else:
        path = tmp_path / "scan.mhd"
        sitk.WriteImage(img, str(path))
        raw = tmp_path / "scan.raw"
        if form == "mhd-no-raw":
            raw.unlink()
            _raises(UnreadableFileError, path, "scan.mhd", "scan.raw", "missing")
        else:
            raw.write_bytes(raw.read_bytes()[:100])
            _raises(UnreadableFileError, path, "scan.raw", "truncated")


def test_truncated_mask_is_refused(tmp_path: Path, canonical: np.ndarray) -> None:
    from covidtrack.io.files import load_mask

    vol_path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(canonical), str(vol_path))
    volume = load_ct(vol_path)
    mask = tmp_path / "mask.nii"
    sitk.WriteImage(sitk.GetImageFromArray((canonical > 0).astype(np.uint8)), str(mask))
    data = mask.read_bytes()
    mask.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match="mask.nii.*truncated"):
        load_mask(mask, volume)


def test_4d_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fourd.nii.gz"
    img = sitk.JoinSeries([sitk.GetImageFromArray(gen.phantom_array((12, 16, 16)))] * 2)
    sitk.WriteImage(img, str(path))
    _raises(GeometryError, path, "4D")


def test_enhanced_multiframe_is_refused_with_a_conversion_hint(tmp_path: Path, canonical: np.ndarray) -> None:
    import pydicom

    files = gen.write_series(tmp_path / "src", canonical)
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    (tmp_path / "mf").mkdir()
    ds.save_as(tmp_path / "mf" / "enhanced.dcm", enforce_file_format=True)
    _raises(UnreadableFileError, tmp_path / "mf", "multi-frame", "dcm2niix")


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "picture.jpg"
    path.write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    _raises(UnreadableFileError, path, "neither DICOM nor a supported image")


def test_cli_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from covidtrack.__main__ import main

    assert main(["series", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_nan_voxels_in_a_float_file_become_air_with_a_note(tmp_path: Path, canonical: np.ndarray) -> None:
    arr = canonical.astype(np.float32)
    arr[0, :2, :2] = np.nan
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    vol = load_ct(path)
    assert (vol.array[0, :2, :2] == -1024).all()
    assert any("NaN" in note for note in vol.meta.notes)


def test_cli_names_unwritable_outputs_and_bad_settings_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidtrack.__main__ import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["export", str(afile)]) == 2  # an existing file, not a folder
    assert "is a file" in capsys.readouterr().err
    assert main(["export", str(afile / "sub")]) == 2  # below a file: the OS refuses, the CLI says where
    err = capsys.readouterr().err
    assert "afile" in err and "Fix:" in err and "Traceback" not in err
    monkeypatch.setenv("COVIDTRACK_THREADS", "abc")
    assert main(["export", str(tmp_path / "out")]) == 2
    assert "COVIDTRACK_THREADS" in capsys.readouterr().err
    monkeypatch.setenv("COVIDTRACK_THREADS", "1")
    monkeypatch.setenv("COVIDTRACK_HOME", str(afile))
    assert main(["export", str(tmp_path / "out")]) == 2
    assert "names a file" in capsys.readouterr().err


def test_the_same_images_copied_twice_load_once_with_a_note(tmp_path: Path, canonical: np.ndarray) -> None:
    import shutil

    gen.write_series(tmp_path / "a", canonical)
    shutil.copytree(tmp_path / "a", tmp_path / "a (copy)")
    vol = load_ct(tmp_path)
    assert np.array_equal(vol.array, canonical) and any("duplicate file" in n for n in vol.meta.notes)


def test_a_scout_filed_in_the_ct_series_is_ignored_whatever_the_file_order(tmp_path: Path, canonical: np.ndarray) -> None:
    import pydicom

    files = gen.write_series(tmp_path, canonical)
    ds = pydicom.dcmread(files[0])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal scout
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "000_scout.dcm", enforce_file_format=True)  # sorts before the slices
    assert [(s.is_localizer, s.orientation, s.n_slices) for s in list_series(tmp_path)] == [(False, "axial", len(files))]
    vol = load_ct(tmp_path)
    assert np.array_equal(vol.array, canonical) and any("localizer" in n for n in vol.meta.notes)


def test_dicom_without_the_file_meta_header_loads(tmp_path: Path, canonical: np.ndarray) -> None:
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for f in gen.write_series(tmp_path, canonical):  # re-written as old "raw" implicit-VR files
        plain = pydicom.dataset.Dataset()
        plain.update(pydicom.dcmread(f))
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, plain)
        f.write_bytes(buf.getvalue())
    assert np.array_equal(load_ct(tmp_path).array, canonical)


def test_zero_pixel_spacing_is_refused_and_rounded_spacing_is_one_spacing(tmp_path: Path, canonical: np.ndarray) -> None:
    import pydicom

    for name, values in (("zero", ["0", "0"]), ("mixed", None)):
        files = gen.write_series(tmp_path / name, canonical, spacing=(2.5, 0.68359375, 0.68359375))
        for i, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.PixelSpacing = values or (["0.683594", "0.683594"] if i % 2 else ["0.68359375", "0.68359375"])
            ds.save_as(f, enforce_file_format=True)
    _raises(GeometryError, tmp_path / "zero", "PixelSpacing", "0 or negative")
    assert load_ct(tmp_path / "mixed").spacing[1] == pytest.approx(0.68359375, abs=1e-5)


def test_nifti_with_disagreeing_qform_and_sform_or_no_voxel_size_is_refused(tmp_path: Path, canonical: np.ndarray) -> None:
    import nibabel as nib

    data = np.ascontiguousarray(canonical.transpose(2, 1, 0))
    affine = np.diag([-1.5, -1.5, 2.5, 1.0])
    mirrored = affine.copy()
    mirrored[0, 0] = 1.5
    img = nib.Nifti1Image(data, affine)
    img.set_qform(mirrored, 1)
    img.set_sform(affine, 2)
    nib.save(img, tmp_path / "forms.nii.gz")
    _raises(GeometryError, tmp_path / "forms.nii.gz", "qform and sform", "left and right")
    img = nib.Nifti1Image(data, affine)
    nib.save(img, tmp_path / "ok.nii.gz")
    import gzip

    header = bytearray(gzip.decompress((tmp_path / "ok.nii.gz").read_bytes()))
    header[76 + 3 * 4: 76 + 4 * 4] = np.float32(0.0).tobytes()  # pixdim[3] (slice spacing) = 0
    (tmp_path / "nopixdim.nii.gz").write_bytes(gzip.compress(bytes(header)))
    _raises(GeometryError, tmp_path / "nopixdim.nii.gz", "voxel size", "0 or negative")
    assert load_ct(tmp_path / "ok.nii.gz").shape == canonical.shape


def test_enhanced_multiframe_file_passed_directly_gets_the_conversion_hint(tmp_path: Path, canonical: np.ndarray) -> None:
    import pydicom

    files = gen.write_series(tmp_path / "src", canonical)
    ds = pydicom.dcmread(files[0])
    ds.NumberOfFrames = len(files)
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in files)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    _raises(UnreadableFileError, tmp_path / "enhanced.dcm", "multi-frame", "dcm2niix")


def test_a_sheared_nifti_orientation_gets_a_geometry_error_with_the_fix(tmp_path: Path, canonical: np.ndarray) -> None:
    import nibabel as nib

    affine = np.diag([-1.5, -1.5, 2.5, 1.0])
    affine[0, 1] = 2.5e-3  # a slight shear: ITK finds no orthonormal direction
    nib.save(nib.Nifti1Image(np.ascontiguousarray(canonical.transpose(2, 1, 0)), affine), tmp_path / "shear.nii.gz")
    _raises(GeometryError, tmp_path / "shear.nii.gz", "not orthonormal", "dcm2niix")


def test_cut_short_compressed_metaimage_without_its_size_is_named(tmp_path: Path, canonical: np.ndarray) -> None:
    img = sitk.GetImageFromArray(np.ascontiguousarray(canonical))
    img.SetSpacing((1.5, 1.5, 2.5))
    sitk.WriteImage(img, str(tmp_path / "c.mha"), useCompression=True)
    data = (tmp_path / "c.mha").read_bytes()
    key = b"ElementDataFile = LOCAL\n"
    end = data.index(key) + len(key)
    header = b"".join(line for line in data[:end].splitlines(keepends=True) if not line.startswith(b"CompressedDataSize"))
    from covidtrack.io.files import _check_metaimage_complete

    (tmp_path / "whole.mha").write_bytes(header + data[end:])
    _check_metaimage_complete(tmp_path / "whole.mha")  # an intact stream passes the check (what ITK then reads is ITK's)
    (tmp_path / "cut.mha").write_bytes(header + data[end: end + int((len(data) - end) * 0.9)])
    _raises(UnreadableFileError, tmp_path / "cut.mha", "cut.mha", "truncated")


def _suffixless_series(folder: Path, canonical: np.ndarray) -> list[Path]:
    """A series named like CD / storescp exports: no file extension (IM0001, UIDs)."""
    out = []
    for f in gen.write_series(folder, canonical):
        g = f.with_suffix("")
        f.rename(g)
        out.append(g)
    return sorted(out)


@pytest.mark.parametrize("damage", ["empty", "cut before the preamble"])
@pytest.mark.parametrize("which", [0, -1, 5])
def test_broken_slice_without_suffix_is_named(tmp_path: Path, canonical: np.ndarray, damage: str, which: int) -> None:
    # a cut-short first or last slice would otherwise make the scan one slice shorter, silently
    files = _suffixless_series(tmp_path / "s", canonical)
    bad = files[which]
    bad.write_bytes(b"" if damage == "empty" else bad.read_bytes()[:100])
    _raises(UnreadableFileError, tmp_path / "s", bad.name, "named like the DICOM files", "re-export")


def test_unrelated_suffixless_file_is_still_ignored(tmp_path: Path, canonical: np.ndarray) -> None:
    files = _suffixless_series(tmp_path / "s", canonical)
    (tmp_path / "s" / "LOCKFILE").write_bytes(b"")
    (tmp_path / "s" / "README").write_text("exported by a viewer")
    assert load_ct(tmp_path / "s").shape[0] == len(files)


def test_unlistable_subfolder_is_named(tmp_path: Path, canonical: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    files = gen.write_series(tmp_path / "study" / "DICOM" / "0001", canonical)
    second = tmp_path / "study" / "DICOM" / "0002"
    second.mkdir()
    for f in files[8:]:  # the export split the series over two folders
        f.rename(second / f.name)
    real = os.scandir

    def scandir(path):  # what a folder without read permission does (also as root, where chmod would not)
        if Path(path) == second:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    err = _raises(UnreadableFileError, tmp_path / "study", "0002", "permission denied", "read access")
    assert Path(err.path) == second


def test_unreadable_volume_file_says_permission(tmp_path: Path, canonical: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for name in ("scan.mha", "scan.nrrd", "scan.nii.gz"):
        p = tmp_path / name
        sitk.WriteImage(sitk.GetImageFromArray(canonical), str(p))
        paths.append(p)
    real = Path.open

    def refuse(self, *args, **kwargs):
        if self in paths:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    for p in paths:
        _raises(UnreadableFileError, p, p.name, "permission denied", "read access")


def test_unreadable_dicom_file_says_permission(tmp_path: Path, canonical: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom

    files = gen.write_series(tmp_path / "s", canonical)
    real = pydicom.dcmread

    def dcmread(path, *args, **kwargs):
        if Path(path) == files[3]:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread)
    _raises(UnreadableFileError, tmp_path / "s", files[3].name, "permission denied", "read access")
