"""Synthetic phantoms: exact truth, HU per tissue, disease course, true displacement, demo cohort."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from covidtrack.labels import LOBE_LABELS
from covidtrack.phantom import (
    TISSUE_IDS,
    make_phantom,
    make_series,
    read_manifest,
    volume_ml,
    warp_to_baseline,
)

# small grids keep the tests fast; the chest still fits (288 x 346 x 346 mm)
SHAPE = (48, 96, 96)
SPACING = (6.0, 3.6, 3.6)


@pytest.fixture(scope="module")
def series() -> list:
    return make_series(7, 3, (64, 128, 128), (4.5, 2.7, 2.7), days=[0, 5, 10], severity=0.8)


@pytest.fixture(scope="module")
def sick() -> tuple:
    return make_phantom(11, (80, 160, 160), (3.6, 2.16, 2.16), severity=0.9)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_volume_and_truth_share_grid(series: list) -> None:
    for vol, truth in series:
        assert vol.array.dtype == np.int16 and vol.array.shape == truth.lungs.shape == (64, 128, 128)
        assert vol.spacing == truth.spacing == (4.5, 2.7, 2.7)
        assert vol.origin == series[0][0].origin  # one grid for the whole series
        assert vol.meta.source_format == "phantom" and vol.meta.study_date is not None
    dates = [v.meta.study_date for v, _ in series]
    assert [(d - dates[0]).days for d in dates] == [0, 5, 10]


def test_truth_volumes_match_voxel_counts(series: list) -> None:
    _, truth = series[2]
    voxel_ml = 4.5 * 2.7 * 2.7 / 1000.0
    lobes = truth.lobe_ml()
    for lab, name in LOBE_LABELS.items():
        assert lobes[name] == pytest.approx(int((truth.lobes == lab).sum()) * voxel_ml)
        assert lobes[name] > 50.0, f"{name} implausibly small"
    assert truth.lung_ml() == pytest.approx(sum(lobes.values()))
    assert truth.lung_ml(1) == pytest.approx(lobes["RUL"] + lobes["RML"] + lobes["RLL"])
    assert 2500.0 < truth.lung_ml() < 7500.0  # adult lungs at inspiration, mL
    ggo, cons = truth.infection_ml(1), truth.infection_ml(2)
    assert ggo == pytest.approx(int((truth.infection == 1).sum()) * voxel_ml)
    assert cons == pytest.approx(volume_ml(truth.infection, 2, truth.spacing))
    assert truth.infection_ml() == pytest.approx(ggo + cons)
    assert ggo > 0 and cons > 0
    per_lobe = sum(truth.infection_ml(lobe=lab) for lab in LOBE_LABELS)
    assert per_lobe == pytest.approx(truth.infection_ml())
    assert not np.any((truth.infection > 0) & (truth.lungs == 0)), "infection outside the lungs"


def test_every_lung_voxel_has_one_lobe_on_its_side(series: list) -> None:
    for _, truth in series:
        np.testing.assert_array_equal(truth.lungs > 0, truth.lobes > 0)
        assert set(np.unique(truth.lobes[truth.lungs == 1])) == {1, 2, 3}
        assert set(np.unique(truth.lobes[truth.lungs == 2])) == {4, 5}


def test_canonical_orientation(series: list) -> None:
    _, truth = series[0]
    z, y, x = (np.asarray(c, float) for c in np.nonzero(truth.lungs == 1))
    zl, yl, xl = (np.asarray(c, float) for c in np.nonzero(truth.lungs == 2))
    assert x.max() < 64 <= xl.min() + 8 and x.mean() < xl.mean(), "right lung must be at low x"
    com = {lab: np.mean(np.nonzero(truth.lobes == lab), axis=1) for lab in LOBE_LABELS}
    assert com[1][0] > com[3][0] and com[4][0] > com[5][0], "upper lobes above lower lobes (head at high z)"
    assert com[2][1] < com[3][1], "middle lobe anterior (low y) to the lower lobe"
    assert com[3][1] > com[1][1] and com[5][1] > com[4][1], "lower lobes posterior"
    bone_y = np.nonzero((truth.tissue == TISSUE_IDS["bone"])[:, :, 60:68])[1]
    assert np.median(bone_y) > 64, "spine posterior (high y)"
    airway_z = np.nonzero(truth.tissue == TISSUE_IDS["airway"])[0]
    assert airway_z.max() >= 60, "trachea reaches the top slices"


def test_hu_ranges_per_tissue(sick: tuple) -> None:
    vol, truth = sick
    hu = vol.array.astype(float)

    def interior(mask: np.ndarray, it: int = 2) -> np.ndarray:
        return ndi.binary_erosion(mask, iterations=it)

    t = truth.tissue
    lung_par = interior((t == TISSUE_IDS["lung"]) & (truth.infection == 0))
    assert -900 <= np.median(hu[lung_par]) <= -800
    assert -130 <= np.median(hu[interior(t == TISSUE_IDS["fat"])]) <= -70
    assert 10 <= np.median(hu[interior(t == TISSUE_IDS["soft"])]) <= 70
    bone = hu[t == TISSUE_IDS["bone"]]
    assert np.percentile(bone, 90) >= 400 and np.median(bone) >= 250
    assert np.median(hu[interior(t == TISSUE_IDS["outside"], 3)]) <= -990
    ggo = interior(truth.infection == 1, 1) & (t == TISSUE_IDS["lung"])
    cons = interior(truth.infection == 2, 1)
    assert ggo.sum() > 50 and cons.sum() > 20
    assert -750 <= np.median(hu[ggo]) <= -300
    assert -100 <= np.median(hu[cons]) <= 50
    # noise: std of the difference to a noise-free rendering, in soft tissue (no clipping there)
    clean, _ = make_phantom(11, (80, 160, 160), (3.6, 2.16, 2.16), severity=0.9, noise_hu=0.0)
    diff = hu - clean.array
    assert 15.0 <= diff[interior(t == TISSUE_IDS["soft"])].std() <= 25.0


def test_fissures_are_thin_dense_plates(sick: tuple) -> None:
    vol, truth = sick
    clean, _ = make_phantom(11, (80, 160, 160), (3.6, 2.16, 2.16), severity=0.0, noise_hu=0.0, blur_sigma_vox=0.0)
    lobes = truth.lobes
    # voxels on a lobe border inside one lung, away from vessels
    border = np.zeros_like(lobes, dtype=bool)
    for axis in range(3):
        a, b = np.swapaxes(lobes, 0, axis)[1:], np.swapaxes(lobes, 0, axis)[:-1]
        d = (a != b) & (a > 0) & (b > 0)
        np.swapaxes(border, 0, axis)[1:] |= d
    par = truth.tissue == TISSUE_IDS["lung"]
    fissure_hu = np.median(clean.array[border & par])
    assert -720 <= fissure_hu <= -560, fissure_hu
    assert np.median(clean.array[par & ~ndi.binary_dilation(border, iterations=2)]) < -800


def test_disease_course_rises_peaks_and_resolves() -> None:
    days = list(range(0, 36, 2))
    s = make_series(3, shape=SHAPE, spacing=SPACING, days=days, severity=0.7, motion=False, noise_hu=0.0)
    total = np.array([t.infection_ml() for _, t in s])
    peak = days[int(np.argmax(total))]
    assert 7 <= peak <= 15, (peak, total.round())
    assert total[0] < total.max() and total[-1] < 0.5 * total.max()
    i_peak = int(np.argmax(total))
    assert np.all(np.diff(total[: i_peak + 1]) >= -0.1 * total.max()), "mostly rising before the peak"
    lower = sum(t.infection_ml(lobe=3) + t.infection_ml(lobe=5) for _, t in s)
    upper = sum(t.infection_ml(lobe=1) + t.infection_ml(lobe=4) for _, t in s)
    assert lower > upper, "lower-lobe predominance"
    cons = np.array([t.infection_ml(2) for _, t in s])
    assert cons.max() > 0 and abs(days[int(np.argmax(cons))] - peak) <= 6
    # lobes differ in their course: share of the lower lobes is not constant over time
    share = np.array([(t.infection_ml(lobe=3) + t.infection_ml(lobe=5)) / max(t.infection_ml(), 1e-9) for _, t in s])
    assert np.ptp(share[total > 0.1 * total.max()]) > 0.02


def test_treatment_resolves_faster() -> None:
    days = [0, 10, 20, 28]
    slow = make_series(5, shape=SHAPE, spacing=SPACING, days=days, severity=0.7, motion=False, noise_hu=0.0)
    fast = make_series(5, shape=SHAPE, spacing=SPACING, days=days, severity=0.7, motion=False, noise_hu=0.0, resolution_rate=1.3)
    a = [t.infection_ml() for _, t in slow]
    b = [t.infection_ml() for _, t in fast]
    assert a[0] == pytest.approx(b[0])  # same patient before the peak
    assert b[2] < a[2] and b[3] < a[3]


def test_healthy_scan_has_no_disease() -> None:
    vol, truth = make_phantom(2, SHAPE, SPACING, healthy=True)
    assert truth.infection.max() == 0 and truth.lung_ml() > 2000
    _, truth0 = make_phantom(2, SHAPE, SPACING, severity=0.0)
    assert truth0.infection.max() == 0
    _, sick = make_phantom(2, SHAPE, SPACING, severity=0.8)
    assert sick.infection_ml() > 20


def test_true_displacement_overlays_baseline(series: list) -> None:
    base = series[0][1]
    assert base.displacement is None
    for vol, truth in series[1:]:
        u = truth.displacement
        assert u is not None and u.shape == (64, 128, 128, 3) and u.dtype == np.float32
        assert float(np.abs(u).max()) > 2.0  # the patient did move
        warped = warp_to_baseline(truth.lungs, u, truth.spacing, order=0)
        for side in (1, 2):
            before = _dice(truth.lungs == side, base.lungs == side)
            after = _dice(warped == side, base.lungs == side)
            assert after > 0.95, (side, after)
            assert after > before
        # image intensities agree too, after pulling the follow-up back
        hu = warp_to_baseline(vol.array, u, truth.spacing, order=1)
        body = ndi.binary_erosion(base.tissue == TISSUE_IDS["soft"], iterations=2)
        assert np.median(np.abs(hu[body].astype(float) - series[0][0].array[body])) < 40
        # a deeper breath gives larger lungs (mass conserved, volume from the Jacobian)
        if abs(truth.inspiration_mm) > 4:
            assert np.sign(truth.lung_ml() - base.lung_ml()) == np.sign(truth.inspiration_mm)


def test_warp_to_baseline_translation() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 5, (10, 12, 14)).astype(np.uint8)
    u = np.zeros((10, 12, 14, 3), np.float32)
    u[..., 2] = 2 * 1.5  # tissue sits two voxels further along x in the follow-up
    out = warp_to_baseline(arr, u, (2.0, 1.0, 1.5), order=0)
    np.testing.assert_array_equal(out[:, :, :-2], arr[:, :, 2:])
    np.testing.assert_array_equal(warp_to_baseline(arr, np.zeros_like(u), (2.0, 1.0, 1.5), order=0), arr)
    with pytest.raises(ValueError):
        warp_to_baseline(arr, u[:-1], (2.0, 1.0, 1.5))


def test_deterministic_for_a_seed() -> None:
    a = make_series(9, 2, SHAPE, SPACING)
    b = make_series(9, 2, SHAPE, SPACING)
    for (va, ta), (vb, tb) in zip(a, b):
        np.testing.assert_array_equal(va.array, vb.array)
        np.testing.assert_array_equal(ta.infection, tb.infection)
        assert ta.day == tb.day
    np.testing.assert_array_equal(a[1][1].displacement, b[1][1].displacement)
    c, _ = make_phantom(10, SHAPE, SPACING)
    assert not np.array_equal(c.array, make_phantom(9, SHAPE, SPACING)[0].array)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="too small"):
        make_phantom(0, (32, 32, 32), (2.0, 1.4, 1.4))
    with pytest.raises(ValueError):
        make_series(0, shape=SHAPE, spacing=SPACING, days=[1, 3])
    with pytest.raises(ValueError):
        make_phantom(0, SHAPE, SPACING, severity=1.5)


def test_demo_command_writes_readable_cohort(tmp_path: Path) -> None:
    from covidtrack.__main__ import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--patients", "2", "--seed", "4"]) == 0
    with (out / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["patient", "arm", "date", "path"]
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], []).append(r)
    assert len(by_patient) == 2
    assert {r[0]["arm"] for r in by_patient.values()} == {"A", "B"}
    schedules = []
    for scans in by_patient.values():
        assert 3 <= len(scans) <= 6
        dates = [dt.date.fromisoformat(r["date"]) for r in scans]
        assert all(3 <= (b - a).days <= 5 for a, b in zip(dates, dates[1:]))
        schedules.append([(d - dates[0]).days for d in dates])
    assert schedules[0] == schedules[1], "a matched pair shares its follow-up schedule"
    scans = read_manifest(out / "manifest.csv")
    assert all(s.path.is_file() for s in scans)
    import SimpleITK as sitk

    from covidtrack.io import load_ct

    vol = load_ct(scans[0].path)
    # the canonical grid of the phantom is LPS identity, so loading changes nothing
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(sitk.ReadImage(str(scans[0].path))))
    assert vol.shape == (72, 128, 128)
    assert vol.spacing == pytest.approx((4.5, 2.7, 2.7))
    assert vol.array.min() >= -1024 and vol.array.max() > 300
    # the right lung (about -850 HU) is at low x after loading
    mid = vol.array[vol.shape[0] // 2]
    inner = (mid < -600) & ndi.binary_fill_holes(mid > -400)  # air inside the body: lungs
    assert inner.sum() > 500
    assert inner[:, :60].sum() > 0.3 * inner.sum() and inner[:, 68:].sum() > 0.3 * inner.sum()
    (tmp_path / "a_file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "a_file"), "--patients", "1"]) == 2  # typed error, no traceback
    with (out / "truth.csv").open() as fh:
        truth_rows = list(csv.DictReader(fh))
    assert len(truth_rows) == len(rows) and float(truth_rows[0]["lungs_ml"]) > 1000


def test_infection_labels_exactly_where_hu_changed() -> None:
    from covidtrack.phantom.series import PhantomPatient

    patient = PhantomPatient(4, SHAPE, SPACING, severity=0.9)
    hu, code = patient.body_frame(patient.course.peak_day)
    infection = (code >> 3) & 3
    tissue = code >> 5
    changed = hu != patient.atlas.hu
    assert changed.any()
    assert not np.any(changed & (infection == 0)), "HU changed outside the infection labels"
    parenchyma = infection.astype(bool) & (tissue == TISSUE_IDS["lung"])
    assert np.all(changed[parenchyma]), "labelled parenchyma whose HU did not change"
    # vessels crossing ground glass stay visible (and labelled); consolidation hides them
    vessel_in_ggo = (infection == 1) & (tissue == TISSUE_IDS["vessel"]) & (patient.atlas.hu >= 40.0)
    assert np.all(hu[vessel_in_ggo] == patient.atlas.hu[vessel_in_ggo])
    assert hu[infection == 2].max() <= 50.0


def test_consolidation_touches_the_pleura_and_stays_in_the_lung_truth(sick: tuple) -> None:
    _, truth = sick
    cons = truth.infection == 2
    outside = truth.lungs == 0
    touching = np.zeros_like(cons)
    for axis in range(3):
        for shift in (1, -1):
            touching |= cons & np.roll(outside, shift, axis=axis)
    assert touching.sum() > 5, "no dense consolidation against the pleura"
    assert np.all(truth.lungs[cons] > 0)


def test_vessels_thin_towards_the_periphery(sick: tuple) -> None:
    _, truth = sick
    depth = ndi.distance_transform_edt(truth.lungs > 0, sampling=truth.spacing)
    vessel = truth.tissue == TISSUE_IDS["vessel"]
    lung = truth.lungs > 0
    central = lung & (depth > 25.0)
    peripheral = lung & (depth > 0) & (depth < 8.0)
    assert vessel[central].mean() > 2.0 * vessel[peripheral].mean() > 0


def test_course_offset_shifts_the_illness() -> None:
    late = make_series(6, shape=SHAPE, spacing=SPACING, days=[0], severity=0.7, course_offset_days=4.0)
    early = make_series(6, shape=SHAPE, spacing=SPACING, days=[0, 4], severity=0.7, motion=False)
    assert early[1][1].infection_ml() > 0
    np.testing.assert_array_equal(late[0][1].infection, early[1][1].infection)
    assert late[0][1].day == 0.0
