"""Registration (covidtrack.register), change (covidtrack.change) and the longitudinal store flow.

Known answers: phantom follow-ups carry the true displacement (covidtrack.phantom), the real CIP
pair differs by a known header rotation. Volumes are small (4 mm) so the file runs in well under
a minute on 2 CPU cores.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest

from covidtrack.change import change_map, change_metrics
from covidtrack.config import SAMPLES
from covidtrack.labels import CHANGE_NEW, CHANGE_PERSISTENT, CHANGE_RESOLVED
from covidtrack.register import QA_MIN_LUNG_DICE, Grid, Registration, register
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

# Small phantom grid (z, y, x): 192 x 196 x 196 mm, the smallest chest the phantom draws.
SHAPE, SPACING = (48, 56, 56), (4.0, 3.5, 3.5)
FAST = (40, 20)  # SyN iterations per level for tests (the product default is finer)


def _seg(truth) -> Segmentation:  # noqa: ANN001 - phantom Truth
    return Segmentation(lungs=truth.lungs, infection=truth.infection, lobes=truth.lobes)


def _true_moving_points(grid: Grid, displacement: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Baseline voxel indices -> where the phantom says the tissue is in the follow-up (LPS mm)."""
    p = grid.physical_points(idx)
    u_zyx = displacement[tuple(idx.T)].astype(np.float64)
    return p + u_zyx[:, ::-1] @ grid.matrix.T


@pytest.fixture(scope="module")
def series():
    from covidtrack.phantom import make_series

    return make_series(3, n_timepoints=2, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def reg_pair(series, tmp_path_factory):
    (v0, t0), (v1, t1) = series
    work = tmp_path_factory.mktemp("reg") / "pair"
    return register(v0, _seg(t0), v1, _seg(t1), work, syn_iterations=FAST)


def test_recovers_known_phantom_motion(series, reg_pair):
    (v0, t0), (_, t1) = series
    grid = Grid.of(v0)
    idx = np.argwhere(t0.lungs > 0)
    truth = _true_moving_points(grid, t1.displacement, idx)
    before = np.linalg.norm(grid.physical_points(idx) - truth, axis=1)
    err = np.linalg.norm(reg_pair.map_points(grid.physical_points(idx)) - truth, axis=1)
    voxel = max(SPACING)
    assert before.mean() > 2 * voxel, "the phantom pair must start misaligned for this test to mean anything"
    assert err.mean() < 0.5 * voxel
    assert np.percentile(err, 95) < 1.5 * voxel
    assert reg_pair.ok, reg_pair.qa.problems
    assert reg_pair.qa.lung_dice > reg_pair.qa.lung_dice_before


def test_map_points_agrees_with_image_warping(series, reg_pair):
    """map_points (fixed -> moving) and warp_image (pull moving onto fixed) are one mapping:
    warping an image whose value is its own LPS x coordinate gives T(p).x at every p."""
    (v0, t0), (v1, _) = series
    mgrid = Grid.of(v1)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in v1.shape], indexing="ij")
    idx_all = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
    coord_x = mgrid.physical_points(idx_all)[:, 0].reshape(v1.shape)
    warped_x = reg_pair.warp_image(np.rint(coord_x).astype(np.int16))
    idx = np.argwhere(t0.lungs > 0)[::7]
    mapped = reg_pair.map_points(Grid.of(v0).physical_points(idx))
    assert np.abs(warped_x[tuple(idx.T)] - mapped[:, 0]).mean() < 1.0  # mm (int16 rounding: 0.5)


def test_warp_labels_keeps_label_values(series, reg_pair):
    (_, t0), (_, t1) = series
    labels = t1.lobes.astype(np.uint8) * 40 + 7 * (t1.lobes > 0)  # 47, 87, ...: interpolation would invent values
    warped = reg_pair.warp_labels(labels)
    assert warped.dtype == np.uint8 and warped.shape == t0.lobes.shape
    assert set(np.unique(warped)) <= set(np.unique(labels))
    # lobes land on the baseline's lobes
    w = reg_pair.warp_labels(t1.lobes)
    agree = (w == t0.lobes)[t0.lobes > 0].mean()
    assert agree > 0.85


def test_save_and_load_round_trip(reg_pair, series):
    (_, _), (_, t1) = series
    again = Registration.load(reg_pair.folder)
    assert again.transforms == reg_pair.transforms and again.qa == reg_pair.qa
    assert all(p.exists() and p.parent == reg_pair.folder for p in again.transform_paths)
    np.testing.assert_array_equal(again.warp_labels(t1.lungs), reg_pair.warp_labels(t1.lungs))
    # only the final transforms and registration.json are left in the work folder
    names = {p.name for p in reg_pair.folder.iterdir()}
    assert names == {"registration.json", *reg_pair.transforms, *reg_pair.inverse_transforms}


def test_flipped_followup_fails_qa_and_leaves_no_temp_files(series, tmp_path, monkeypatch):
    """A left-right mirrored follow-up (pixels and their lung labels) cannot be aligned by a
    proper transform: right lung lands on left lung, so QA must say no. Nothing may be written
    to the system temp folder (ANTs' default) - only under the workdir."""
    sys_tmp = tmp_path / "system-tmp"
    sys_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(sys_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(sys_tmp))
    (v0, t0), (v1, t1) = series
    flipped = v1.with_array(v1.array[:, :, ::-1])
    seg = Segmentation(lungs=np.ascontiguousarray(t1.lungs[:, :, ::-1]), infection=np.zeros_like(t1.lungs))
    reg = register(v0, _seg(t0), flipped, seg, tmp_path / "work", syn_iterations=FAST)
    assert not reg.ok
    assert reg.qa.lung_dice < QA_MIN_LUNG_DICE
    assert any("Dice" in p for p in reg.qa.problems)
    assert list(sys_tmp.iterdir()) == []
    assert all(p.is_relative_to(tmp_path / "work") for p in (tmp_path / "work").rglob("*"))


def test_empty_lung_mask_is_a_typed_error(series, tmp_path):
    from covidtrack.errors import InputError

    (v0, t0), (v1, t1) = series
    empty = Segmentation(lungs=np.zeros_like(t1.lungs), infection=np.zeros_like(t1.lungs))
    with pytest.raises(InputError, match="empty lung mask"):
        register(v0, _seg(t0), v1, empty, tmp_path / "w")


def test_real_cip_pair_header_rotation(tmp_path):
    """Real CT (data/samples): the same voxels with the header rotated ~20 degrees about z. Every
    lung voxel must map to its own voxel in the rotated scan within one voxel (4.2 mm)."""
    import SimpleITK as sitk

    from covidtrack.io import load_ct

    folder = SAMPLES / "cip_copdgene_ct64"
    fixed, moving = load_ct(folder / "ct-64.nrrd"), load_ct(folder / "ct-64-transformed.nrrd")
    mask_img = sitk.ReadImage(str(folder / "wholeLung-64.nrrd"))
    # same voxels: the mask of the rotated scan is the same array with the rotated header
    fixed_lungs = _sides(_canonical_mask(mask_img, fixed))
    mask_img_m = sitk.Image(mask_img)
    ref = sitk.ReadImage(str(folder / "ct-64-transformed.nrrd"))
    mask_img_m.CopyInformation(ref)
    moving_lungs = _sides(_canonical_mask(mask_img_m, moving))
    reg = register(fixed, Segmentation(fixed_lungs, np.zeros_like(fixed_lungs)), moving,
                   Segmentation(moving_lungs, np.zeros_like(moving_lungs)), tmp_path / "cip", syn_iterations=FAST)
    # truth: source voxel (i, j, k) of one file is the same tissue as (i, j, k) of the other
    arr = sitk.GetArrayFromImage(mask_img)
    idx_src = np.argwhere(arr > 0)[::5]
    p_fixed = np.array([mask_img.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx_src])
    p_true = np.array([ref.TransformIndexToPhysicalPoint([int(v) for v in i[::-1]]) for i in idx_src])
    err = np.linalg.norm(reg.map_points(p_fixed) - p_true, axis=1)
    assert np.linalg.norm(p_fixed - p_true, axis=1).mean() > 20  # really misaligned before
    assert err.mean() < 2.0 and np.percentile(err, 95) < 4.2
    assert reg.ok, reg.qa.problems


def _canonical_mask(img, volume: Volume) -> np.ndarray:  # noqa: ANN001 - SimpleITK image
    import SimpleITK as sitk

    out = sitk.Resample(img, volume.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out) > 0


def _sides(mask: np.ndarray) -> np.ndarray:
    """Right (1) / left (2) by the two largest components (x from patient right to left)."""
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    a, b = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    xa, xb = np.argwhere(lab == a)[:, 2].mean(), np.argwhere(lab == b)[:, 2].mean()
    right, left = (a, b) if xa < xb else (b, a)
    out = np.zeros(mask.shape, np.uint8)
    out[lab == right], out[lab == left] = 1, 2
    return out


# --- change -----------------------------------------------------------------------------------
def test_change_map_labels():
    base = np.zeros((2, 3, 4), np.uint8)
    follow = np.zeros_like(base)
    base[0, 0, :2] = 1  # GGO resolves in (0,0,0), persists as consolidation in (0,0,1)
    follow[0, 0, 1] = 2
    follow[1, 2, 3] = 1  # new
    cm = change_map(base, follow)
    assert cm[0, 0, 0] == CHANGE_RESOLVED and cm[0, 0, 1] == CHANGE_PERSISTENT and cm[1, 2, 3] == CHANGE_NEW
    assert (cm > 0).sum() == 3 and cm.dtype == np.uint8
    lungs = np.ones_like(base)
    lungs[1] = 0
    assert change_map(base, follow, lungs=lungs)[1, 2, 3] == 0  # outside the baseline lungs
    with pytest.raises(ValueError, match="baseline grid"):
        change_map(base, follow[:1])


def test_change_metrics_volumes_per_region():
    spacing = (2.0, 1.0, 0.5)  # 1 voxel = 1 mm^3 = 0.001 mL
    lobes = np.zeros((10, 10, 10), np.uint8)
    lobes[:, :, :5] = 1  # RUL on the right half
    lobes[:, :, 5:] = 4  # LUL on the left half
    cm = np.zeros_like(lobes)
    cm[0, :, :3] = CHANGE_NEW  # 30 voxels right
    cm[1, :2, 6:] = CHANGE_RESOLVED  # 8 voxels left
    cm[2, :, 4:6] = CHANGE_PERSISTENT  # 10 right, 10 left
    df = change_metrics(cm, lobes, spacing)
    v = df.set_index(["region", "metric"])["value"]
    assert set(df["unit"]) == {"mL"}
    assert v["RUL", "new_ml"] == pytest.approx(0.030) and v["right", "new_ml"] == pytest.approx(0.030)
    assert v["LUL", "resolved_ml"] == pytest.approx(0.008)
    assert v["whole", "persistent_ml"] == pytest.approx(0.020)
    assert v["whole", "baseline_infection_ml"] == pytest.approx(0.028)
    assert v["whole", "followup_infection_ml"] == pytest.approx(0.050)
    assert v["whole", "net_change_ml"] == pytest.approx(0.022)
    assert v["RML", "new_ml"] == 0.0
    for metric in ("new_ml", "resolved_ml", "persistent_ml"):
        assert v["right", metric] + v["left", metric] == pytest.approx(v["whole", metric])
    assert set(df["region"]) == {"whole", "right", "left", "RUL", "RML", "RLL", "LUL", "LLL"}


# --- longitudinal: store flow -----------------------------------------------------------------
def _store_scan(store, key: str, date: dt.date, vol: Volume, seg: Segmentation) -> str:  # noqa: ANN001
    from covidtrack.metrics import scan_metrics
    from covidtrack.store import FileStage, ScanRecord, SegRecord, new_scan_id, new_seg_id, write_canonical

    content = hashlib.sha256(vol.array.tobytes() + str(date).encode()).hexdigest()
    scan_id, seg_id = new_scan_id(content), new_seg_id()
    versions = {"lungs": "test/v0", "infection": "test/v0", "lobes": "test/v0"}
    with FileStage() as stage:
        vpath = stage.put(store.volume_path_for(scan_id), lambda p: write_canonical(p, vol))
        paths = {part: stage.put(store.mask_path_for(seg_id, part), lambda p, a=getattr(seg, part): write_canonical(p, vol, a))
                 for part in ("lungs", "infection", "lobes")}
        store.add_scan(
            ScanRecord(scan_id=scan_id, patient_key=key, study_date=date, content_hash=content, volume_path=vpath),
            SegRecord(seg_id=seg_id, scan_id=scan_id, kind="model", model_versions=versions,
                      lungs_path=paths["lungs"], infection_path=paths["infection"], lobes_path=paths["lobes"]),
            scan_metrics(vol, seg),
        )
    return scan_id


def test_register_followup_stores_idempotently_and_follows_a_new_baseline(series, covidtrack_home, monkeypatch):
    from covidtrack.longitudinal import register_followup, register_patient
    from covidtrack.store import Store

    (v0, t0), (v1, t1) = series
    d = dt.date(2026, 3, 10)
    with Store.open() as store:
        s1 = _store_scan(store, "P1", d, v0, _seg(t0))
        s2 = _store_scan(store, "P1", d + dt.timedelta(days=5), v1, _seg(t1))
        events = []
        res = register_followup(store, s2, progress=events.append)
        assert res is not None and not res.reused and res.fixed_scan == s1 and res.ok
        assert res.folder == covidtrack_home / "registrations" / f"{s1}_{s2}"
        assert (res.folder / "change_map.nii.gz").exists() and events[-1].fraction == 1.0
        regs, change = store.registrations("P1"), store.change_metrics("P1")
        assert len(regs) == 1 and bool(regs["ok"].iloc[0])
        assert regs["qa"].iloc[0]["lung_dice"] >= QA_MIN_LUNG_DICE
        # change rows agree with the truth: follow-up infection warped into the baseline
        v = change.set_index(["region", "metric"])["value"]
        from covidtrack.phantom import warp_to_baseline

        truth = warp_to_baseline(t1.infection, t1.displacement, v0.spacing, order=0)
        true_follow_ml = float(((truth > 0) & (t0.lungs > 0)).sum()) * np.prod(SPACING) / 1000
        assert v["whole", "followup_infection_ml"] == pytest.approx(true_follow_ml, rel=0.2)
        true_new_ml = float(((truth > 0) & (t0.infection == 0) & (t0.lungs > 0)).sum()) * np.prod(SPACING) / 1000
        assert v["whole", "new_ml"] == pytest.approx(true_new_ml, rel=0.3, abs=0.3)
        assert register_followup(store, s1) is None  # the baseline itself
        # idempotent: nothing recomputed, nothing duplicated
        again = register_followup(store, s2)
        assert again is not None and again.reused and again.reg_id == res.reg_id
        assert len(store.registrations("P1")) == 1 and len(store.change_metrics("P1")) == len(change)
        # an earlier scan arrives: it becomes the baseline, both others are registered to it
        s0 = _store_scan(store, "P1", d - dt.timedelta(days=4), _shifted(v0), _seg(t0))
        results = register_patient(store, "P1")
        assert {r.moving_scan for r in results} == {s1, s2} and {r.fixed_scan for r in results} == {s0}
        regs = store.registrations("P1")
        if hasattr(store, "remove_registration"):
            assert set(regs["fixed_scan"]) == {s0}
            assert not (covidtrack_home / "registrations" / f"{s1}_{s2}").exists()
        assert not list((covidtrack_home / "registrations").glob(".tmp-*"))
        # the dashboard/report reread the stored registrations: every follow-up aligned
        from covidtrack.report.load import aligned_series

        aligned = aligned_series(store, "P1")
        assert all(aligned.registered) and all(c is not None for c in aligned.change[1:])
        assert all(ct.shape == v0.shape for ct in aligned.ct)
    # the CLI re-run finds everything up to date (idempotent, exit 0 = all QA ok)
    from covidtrack.__main__ import main as cli_main

    assert cli_main(["register", "--patient", "P1"]) == 0
    assert cli_main(["register", "--all"]) == 0  # every patient; nothing out of date, nothing recomputed
    # a pair failing QA keeps its registration row (ok = False) but no change numbers or map
    import covidtrack.register as reg_mod

    monkeypatch.setattr(reg_mod, "QA_MIN_LUNG_DICE", 1.01)  # nothing can pass
    with Store.open() as store:
        bad = register_followup(store, s2, force=True)
        assert bad is not None and not bad.ok and not bad.reused
        row = store.registrations("P1").set_index("moving_scan").loc[s2]
        assert not bool(row["ok"]) and row["change_map_path"] is None
        assert s2 not in set(store.change_metrics("P1")["moving_scan"])
        assert s1 in set(store.change_metrics("P1")["moving_scan"])


def _shifted(volume: Volume) -> Volume:
    """The same anatomy, different pixels (a new content hash): +5 HU everywhere."""
    return volume.with_array(np.clip(volume.array.astype(np.int32) + 5, -32768, 32767))


def test_downsampled_label_maps_stay_labels():
    """Preparing a fine scan (1 mm) for the 2.5 mm working grid must keep lung labels exact
    (interpolated labels would make generic-label warping and the QA meaningless and slow)."""
    from covidtrack.register import _prepare

    arr = np.full((60, 60, 60), -50, np.int16)
    lungs = np.zeros(arr.shape, np.uint8)
    lungs[10:50, 10:50, 8:28], lungs[10:50, 10:50, 32:52] = 1, 2
    arr[lungs > 0] = -850
    vol = Volume(array=arr, spacing=(1.0, 0.9, 0.9))
    prep = _prepare(vol, lungs, np.zeros_like(lungs), 10.0)
    assert set(np.unique(prep.lungs.numpy())) == {0.0, 1.0, 2.0}
    assert max(prep.image.spacing) >= 2.5


def test_change_follows_corrections_and_hides_stale_pairs(series, covidtrack_home, monkeypatch):
    """The change shown always comes from the masks shown: a correction makes the pair stale (not
    shown, with a note) until it is redone; a redone pair reflects the correction; a registration
    interrupted before its rows landed is redone, not reused; the same pair twice gives the same
    numbers (seeded)."""
    from covidtrack import longitudinal
    from covidtrack.hitl import corrections
    from covidtrack.report.load import aligned_series, change_notes, change_table
    from covidtrack.store import Store

    (v0, t0), (v1, t1) = series
    d = dt.date(2026, 3, 10)
    with Store.open() as store:
        s1 = _store_scan(store, "P1", d, v0, _seg(t0))
        s2 = _store_scan(store, "P1", d + dt.timedelta(days=5), v1, _seg(t1))
        longitudinal.register_followup(store, s2)
        table = change_table(store, "P1")
        assert set(table["scan_id"]) == {s2} and change_notes(store, "P1") == []
        whole = table.set_index("region").loc["whole"]
        assert whole["resolved_ml"] + whole["persistent_ml"] > 0
        longitudinal.register_followup(store, s2, force=True)
        assert np.allclose(change_table(store, "P1")[["new_ml", "resolved_ml", "persistent_ml"]].to_numpy(),
                           table[["new_ml", "resolved_ml", "persistent_ml"]].to_numpy())

        cleared = np.zeros_like(t0.infection)
        corrections.save_correction(store, s1, cleared, corrections.effort_between(t0.infection, cleared), "tester")
        assert longitudinal.pair_status(store, "P1") == {s2: longitudinal.STALE}
        assert change_table(store, "P1").empty
        assert "changed since it was registered" in change_notes(store, "P1")[0]
        assert aligned_series(store, "P1").change[1] is None  # no change map that contradicts the masks

        done = longitudinal.refresh_after_change(store, s1)
        assert [r.moving_scan for r in done] == [s2] and not done[0].reused
        whole = change_table(store, "P1").set_index("region").loc["whole"]
        assert whole["resolved_ml"] == 0 and whole["persistent_ml"] == 0 and whole["new_ml"] > 0
        assert longitudinal.refresh_after_change(store, s1)[0].reused  # up to date now

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(Store, "add_registration", interrupted)
        with pytest.raises(KeyboardInterrupt):
            longitudinal.register_followup(store, s2, force=True)
        monkeypatch.undo()
        assert not longitudinal.register_followup(store, s2).reused

        # a pair measured by an older covidtrack (before the field-of-view rule) reads as stale
        from dataclasses import replace

        reg = Registration.load(store.registrations("P1").iloc[0]["transforms"]["registration"])
        replace(reg, params={k: v for k, v in reg.params.items() if k != "change_version"}).save()
        assert longitudinal.pair_status(store, "P1") == {s2: longitudinal.STALE}
        assert "an older covidtrack" in change_notes(store, "P1")[0]
        assert not longitudinal.register_followup(store, s2).reused

        # an earlier scan stored without registering: pairs of the former baseline are not shown
        s0 = _store_scan(store, "P1", d - dt.timedelta(days=4), _shifted(v0), _seg(t0))
        assert change_table(store, "P1").empty
        assert sorted(n.split(":")[0] for n in change_notes(store, "P1")) == [str(d), str(d + dt.timedelta(days=5))]

        # removing that scan again: s1 is the baseline once more, its pair still current
        out = longitudinal.forget_scan(store, s0)
        assert out["was_baseline"] and out["removed"]["scans"] == 1 and out["removed"]["patients"] == 0
        assert set(change_table(store, "P1")["scan_id"]) == {s2}
        assert not any(s0 in p.name for p in (covidtrack_home / "registrations").iterdir())
        assert not any(s0 in p.name for d_ in ("scans", "masks") for p in (covidtrack_home / d_).iterdir())
        # removing the baseline: the follow-up is all that is left, nothing to register
        out = longitudinal.forget_scan(store, s1)
        assert out["removed"]["registrations"] == 1 and out["removed"]["corrections"] == 1
        assert store.change_metrics("P1").empty and store.baseline_scan("P1") == s2
        longitudinal.forget_scan(store, s2)
        assert store.patients().empty and store.counts()["scans"] == 0


def test_a_failed_pair_is_not_redone_from_the_same_masks(series, covidtrack_home, monkeypatch):
    import covidtrack.register as reg_mod
    from covidtrack import longitudinal
    from covidtrack.store import Store

    (v0, t0), (v1, t1) = series
    monkeypatch.setattr(reg_mod, "QA_MIN_LUNG_DICE", 1.01)  # nothing can pass
    calls = []
    real = reg_mod.register
    monkeypatch.setattr(reg_mod, "register", lambda *a, **k: calls.append(1) or real(*a, syn_iterations=FAST, **k))
    with Store.open() as store:
        _store_scan(store, "P1", dt.date(2026, 3, 10), v0, _seg(t0))
        s2 = _store_scan(store, "P1", dt.date(2026, 3, 15), v1, _seg(t1))
        first = longitudinal.register_patient(store, "P1")
        again = longitudinal.register_patient(store, "P1")
        assert not first[0].ok and again[0].reused and not again[0].ok and len(calls) == 1
        assert longitudinal.pair_status(store, "P1") == {s2: longitudinal.FAILED}
        assert not longitudinal.register_followup(store, s2, force=True).reused and len(calls) == 2


def test_a_redone_registration_changes_the_dashboard_revision(covidtrack_home: Path) -> None:
    """The dashboard's cache key must change when a pair is registered again, even if the clock
    reads earlier than when another pair was registered (a time-zone or daylight-saving change):
    each redo has a new row id, and the key hashes the ids."""
    from covidtrack import longitudinal
    from covidtrack.report import load, synthetic
    from covidtrack.store import Store

    with Store.open() as store:
        key = synthetic.populate_store(store, n_patients=1, n_scans=3, shape=(16, 48, 48))[0]
        longitudinal.register_patient(store, key)
        with store.transaction() as cur:  # both pairs seem to have been registered a day later
            cur.execute("UPDATE registrations SET created_at = created_at + INTERVAL 1 DAY")
        before = load.store_revision(store)
        regs = store._df("SELECT moving_scan FROM registrations ORDER BY created_at")
        first = str(regs["moving_scan"].iloc[0])  # not the latest row: the latest time stays as it was
        assert not longitudinal.register_followup(store, first, force=True).reused
        assert load.store_revision(store) != before


def test_change_leaves_out_what_the_follow_up_did_not_image() -> None:
    from covidtrack.change import NOT_IMAGED, warped_followup

    base = np.zeros((6, 4, 4), np.uint8)
    lungs = np.ones_like(base)
    lobes = np.ones_like(base)
    lobes[:, :, 2:] = 4
    base[0:3] = 1  # infection in the top half at baseline
    warped = np.zeros_like(base)
    warped[2] = 2  # persistent in slice 2, nothing else
    warped[0:2] = NOT_IMAGED  # the follow-up stops short of slices 0-1
    inf, imaged = warped_followup(warped)
    assert imaged.sum() == 4 * 16 and inf.max() == 2
    cm = change_map(base, inf, lungs=lungs, imaged=imaged)
    assert (cm[0:2] == 0).all() and (cm[2] == CHANGE_PERSISTENT).all()
    rows = change_metrics(cm, lobes, (1.0, 10.0, 10.0), lungs=lungs, imaged=imaged, baseline_infection=base)
    v = rows.set_index(["region", "metric"])["value"]
    assert v["whole", "resolved_ml"] == 0 and v["whole", "persistent_ml"] == pytest.approx(1.6)
    assert v["whole", "not_imaged_lung_ml"] == pytest.approx(3.2) and v["whole", "not_imaged_infection_ml"] == pytest.approx(3.2)
    assert v["RUL", "not_imaged_infection_ml"] + v["LUL", "not_imaged_infection_ml"] == pytest.approx(3.2)


def test_short_follow_up_is_not_read_as_resolution(tmp_path: Path) -> None:
    """The same scan as follow-up, cut 5 slices short of the apex: nothing changed, so nothing may
    be called resolved (it used to report ~11 mL resolved, all in the slices not imaged)."""
    from covidtrack.change import NOT_IMAGED, warped_followup
    from covidtrack.phantom.series import make_phantom

    v0, t0 = make_phantom(3, shape=(48, 56, 56), spacing=(4.0, 3.5, 3.5), severity=0.8)
    k = 37
    v1 = Volume(np.array(v0.array[:k]), v0.spacing, v0.origin, v0.direction, v0.meta)
    s0 = Segmentation(t0.lungs, t0.infection, t0.lobes)
    s1 = Segmentation(*(np.ascontiguousarray(a[:k]) for a in (t0.lungs, t0.infection, t0.lobes)))
    reg = register(v0, s0, v1, s1, tmp_path / "pair", syn_iterations=(40, 20))
    assert reg.ok
    inf, imaged = warped_followup(reg.warp_labels(s1.infection, outside=NOT_IMAGED))
    assert not imaged.all() and imaged[k // 2].all()
    cm = change_map(s0.infection, inf, lungs=s0.lungs, imaged=imaged)
    v = change_metrics(cm, s0.lobes, v0.spacing, lungs=s0.lungs, imaged=imaged,
                       baseline_infection=s0.infection).set_index(["region", "metric"])["value"]
    assert v["whole", "resolved_ml"] < 1.0 and v["whole", "new_ml"] < 1.0
    assert v["whole", "not_imaged_infection_ml"] > 5.0


def test_coverage_note_names_the_follow_up_and_the_unknown_infection(series, covidtrack_home) -> None:
    import pandas as pd

    from covidtrack.report.load import coverage_notes
    from covidtrack.store import Store

    (v0, t0), (v1, t1) = series
    d = dt.date(2026, 3, 10)
    with Store.open() as store:
        s1 = _store_scan(store, "P1", d, v0, _seg(t0))
        s2 = _store_scan(store, "P1", d + dt.timedelta(days=5), v1, _seg(t1))
        s3 = _store_scan(store, "P1", d + dt.timedelta(days=9), _shifted(v1), _seg(t1))
        for sid, lung in ((s2, 42.0), (s3, 4.0)):  # s3: below the 5 mL note threshold
            store.add_change_metrics(s1, sid, pd.DataFrame({
                "region": ["whole"] * 3, "metric": ["resolved_ml", "not_imaged_lung_ml", "not_imaged_infection_ml"],
                "value": [1.0, lung, 3.25], "unit": ["mL"] * 3}))
        dates = {s2: str(d + dt.timedelta(days=5)), s3: str(d + dt.timedelta(days=9))}
        notes = coverage_notes(store, "P1", [s2, s3], dates)
        assert notes == [f"{d + dt.timedelta(days=5)}: this follow-up does not cover 42 mL of the baseline lung; "
                         "the baseline infection there (3.2 mL) is counted as neither resolved nor persistent"]
        assert coverage_notes(store, "P1", [s3], dates) == []  # only pairs that are shown


# --- lesions followed from the baseline -----------------------------------------------------------
def test_lesion_tracks_from_a_change_map() -> None:
    from covidtrack.change import lesion_counts, lesion_tracks

    cm = np.zeros((20, 40, 40), np.uint8)
    cm[2:6, 2:8, 2:8] = CHANGE_RESOLVED                     # gone: 144 voxels = 1.15 mL at 2 mm
    cm[10:14, 10:16, 10:16] = CHANGE_PERSISTENT             # still there ...
    cm[10:14, 16:22, 10:16] = CHANGE_NEW                    # ... and twice as large
    cm[2:5, 30:35, 30:35] = CHANGE_NEW                      # appeared, in the left upper lobe
    cm[15:18, 30:34, 2:6] = CHANGE_PERSISTENT               # unchanged
    cm[15:18, 30:34, 7:10] = CHANGE_RESOLVED                # a separate lesion one voxel away: resolved
    cm[0, 39, 39] = CHANGE_NEW                              # a speck under 0.1 mL: not a lesion
    # one baseline lesion that split in two at the follow-up (its middle resolved)
    cm[10:13, 30:33, 2:4] = CHANGE_PERSISTENT
    cm[10:13, 30:33, 4:6] = CHANGE_RESOLVED
    cm[10:13, 30:33, 6:8] = CHANGE_PERSISTENT
    lobes = np.ones_like(cm)
    lobes[:, :, 20:] = 4
    t = lesion_tracks(cm, lobes, (2.0, 2.0, 2.0))
    assert lesion_counts(t) == {"new": 1, "resolved": 2, "larger": 1, "smaller": 0, "stable": 2, "partly not imaged": 0}
    grown = t[t["status"] == "larger"].iloc[0]
    assert grown["baseline_ml"] == pytest.approx(144 * 0.008, abs=0.01) and grown["followup_ml"] == pytest.approx(288 * 0.008, abs=0.01)
    assert grown["lobe"] == "RUL" and grown["slice"] == 12
    assert t[t["status"] == "new"].iloc[0]["lobe"] == "LUL"
    split = t[(t["baseline_pieces"] == 1) & (t["followup_pieces"] == 2)]
    assert len(split) == 1 and split.iloc[0]["status"] == "stable"  # 0.22 -> 0.14 mL: under 0.5 mL of change
    assert list(t["lesion"]) == list(range(1, len(t) + 1))
    # the same map without lobes: no lobe names, the same tracks
    assert lesion_tracks(cm, None, (2.0, 2.0, 2.0))["lobe"].isna().all()
    assert lesion_tracks(np.zeros_like(cm), lobes, (2.0, 2.0, 2.0)).empty
    # the slice is the scan's, wherever the infection starts (5 empty slices below it: +5)
    cm[0, 39, 39] = 0
    shifted = lesion_tracks(np.concatenate([np.zeros((5, 40, 40), np.uint8), cm]),
                            np.concatenate([np.ones((5, 40, 40), np.uint8), lobes]), (2.0, 2.0, 2.0))
    assert shifted[shifted["status"] == "larger"].iloc[0]["slice"] == 17
    # counted apart: tracks of at least 1 mL (the grown and the resolved 1.15 mL ones)
    from covidtrack.change import lesion_count_text

    assert lesion_counts(t, min_ml=1.0) == {"new": 0, "resolved": 1, "larger": 1, "smaller": 0, "stable": 0, "partly not imaged": 0}
    assert lesion_count_text(t)["new"] == "1 (0 ≥ 1 mL)" and lesion_count_text(t)["larger"] == "1"
