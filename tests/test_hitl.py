"""Human in the loop: edit operations, corrections as new records, import tables, active learning,
retraining into a new immutable version, promotion, rollback, re-segmentation, and the two pages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from covidtrack import modelstore
from covidtrack.config import settings
from covidtrack.errors import InputError, ModelError, StoreError
from covidtrack.hitl import active, corrections, importing, retrain
from covidtrack.hitl.corrections import EditSession, Effort
from covidtrack.labels import CONSOLIDATION, GGO
from covidtrack.store import Store


# --- helpers -------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_tiny_model(seed: int = 0) -> modelstore.ModelRef:
    """A tiny, randomly initialised infection model version, made active (fast to train and run)."""
    import torch

    from covidtrack.segment.infection import NetSpec, build_network, save_weights, write_card

    torch.manual_seed(seed)
    spec = NetSpec(channels=(4, 8), strides=(2,), num_res_units=0, input_size=32)
    version = modelstore.next_version("infection")
    folder = settings().models_dir / "infection" / version
    sha = save_weights(build_network(spec), spec, folder / "weights.pt")
    write_card(folder, {"task": "infection", "version": version, "weights_sha256": sha,
                        "net": {"kind": "MONAI UNet 2D", **spec.to_json()}, "labels": {"1": "GGO", "2": "consolidation"}})
    return modelstore.set_active("infection", version)


@pytest.fixture
def small_store(covidtrack_home: Path) -> list[str]:
    """Two synthetic scans (16 x 40 x 40 voxels) with model segmentations; returns scan ids."""
    from covidtrack.report import synthetic

    with Store.open() as store:
        synthetic.populate_store(store, n_patients=1, n_scans=2, shape=(16, 40, 40))
        return list(store.scans()["scan_id"])


# --- edit operations -----------------------------------------------------------------------------
def test_brush_paints_and_erases_a_disk() -> None:
    labels = np.zeros((11, 11), np.uint8)
    painted = corrections.brush(labels, (5, 5), 2, GGO)
    assert int((painted == GGO).sum()) == 13  # lattice points with dy^2 + dx^2 <= 4
    assert labels.sum() == 0, "edit operations must not modify their input"
    erased = corrections.brush(painted, (5, 5), 1, 0)
    assert int((erased == GGO).sum()) == 13 - 5
    allowed = np.zeros((11, 11), bool)
    allowed[:, :5] = True
    limited = corrections.brush(labels, (5, 5), 2, CONSOLIDATION, allowed=allowed)
    assert limited[:, 5:].sum() == 0 and int((limited == CONSOLIDATION).sum()) == 4  # columns 3 (1 px) and 4 (3 px)
    dragged = corrections.brush(labels, (2, 2), 1, GGO, end=(2, 8))
    assert dragged[2, 2:9].all() and dragged[0].sum() == 0
    with pytest.raises(ValueError):
        corrections.brush(labels, (5, 5), 2, 7)


def _two_lesions() -> np.ndarray:
    lab = np.zeros((10, 12), np.uint8)
    lab[1:4, 1:4] = GGO
    lab[2, 2] = CONSOLIDATION
    lab[6:9, 7:11] = CONSOLIDATION
    return lab


def test_component_delete_accept_and_relabel() -> None:
    lab = _two_lesions()
    gone = corrections.delete_component(lab, (2, 3))
    assert gone[1:4, 1:4].sum() == 0 and (gone[6:9, 7:11] == CONSOLIDATION).all()
    assert np.array_equal(corrections.delete_component(lab, (0, 11)), lab)  # click on background: no change
    restored = corrections.accept_component(gone, lab, (1, 1))
    assert np.array_equal(restored, lab)
    swapped = corrections.relabel(lab, (1, 1))
    assert swapped[2, 2] == GGO and (swapped[1:4, 1:4][swapped[1:4, 1:4] != GGO] == CONSOLIDATION).all()
    assert int((swapped[1:4, 1:4] == CONSOLIDATION).sum()) == 8
    assert np.array_equal(swapped[6:9, 7:11], lab[6:9, 7:11])  # the other lesion is untouched
    all_ggo = corrections.relabel(lab, (7, 8), new_label=GGO)
    assert (all_ggo[6:9, 7:11] == GGO).all()


def test_region_grow_stays_in_hu_range_lungs_and_4_connectivity() -> None:
    ct = np.full((9, 9), -900.0)
    ct[2:5, 2:5] = -500.0  # a GGO-like patch
    ct[5, 5] = -500.0  # touches the patch only at a corner: must not be reached (4-connectivity)
    ct[3, 7] = -500.0  # separate
    lungs = np.ones((9, 9), bool)
    lungs[4, :] = False  # the lung mask cuts the patch's last row
    grown = corrections.region_grow(np.zeros((9, 9), np.uint8), ct, (3, 3), GGO, (-700, -300), allowed=lungs)
    assert int((grown == GGO).sum()) == 6  # rows 2-3 of the patch
    assert grown[5, 5] == 0 and grown[3, 7] == 0
    outside = corrections.region_grow(np.zeros((9, 9), np.uint8), ct, (0, 0), GGO, (-700, -300))
    assert outside.sum() == 0  # the clicked pixel is out of range


def test_edit_session_undo_and_effort_with_idle_cap() -> None:
    now = [0.0]
    original = np.zeros((4, 10, 10), np.uint8)
    original[1, 2:5, 2:5] = GGO
    session = EditSession(original, clock=lambda: now[0], idle_cap_s=60)
    now[0] = 5.0
    session.edit(1, corrections.delete_component, (3, 3))
    now[0] = 500.0  # a long break counts as 60 s only
    session.edit(2, corrections.brush, (5, 5), 1, CONSOLIDATION)
    assert session.edit(3, corrections.delete_component, (0, 0)) == 0  # no-op: not on the stack
    eff = session.effort()
    assert eff == Effort(seconds=65.0, voxels_changed=9 + 5, slices_touched=2, edits=2, undos=0)
    assert session.undo() == 2
    assert session.effort().voxels_changed == 9 and session.effort().slices_touched == 1
    assert session.undo() == 1 and session.undo() is None
    assert np.array_equal(session.working, original)
    assert not session.original.flags.writeable


# --- corrections are new records -----------------------------------------------------------------
def test_corrections_are_stored_apart_and_never_overwritten(small_store: list[str]) -> None:
    scan = small_store[1]
    with Store.open() as store:
        model_rec = store.segmentation(scan, "model")
        model_sha = _sha(model_rec.infection_path)
        ct, lungs, lobes, infection, seg_id = corrections.load_for_review(store, scan)
        assert seg_id == model_rec.seg_id and infection.any()
        session = EditSession(infection)
        z = int(np.nonzero(infection.any(axis=(1, 2)))[0][0])
        y, x = (int(v) for v in np.argwhere(infection[z])[0])
        session.edit(z, corrections.delete_component, (y, x))
        first = corrections.save_correction(store, scan, session.working, session.effort(), author="AB")
        # a second, different correction of the same scan: another record, the first stays
        session.edit(z, corrections.brush, (y, x), 2, CONSOLIDATION, allowed=lungs[z] > 0)
        second = corrections.save_correction(store, scan, session.working, session.effort(), author="CD")
        assert first[1] != second[1]
        rows = store.corrections(scan)
        assert list(rows["author"]) == ["AB", "CD"]
        assert (rows["original_seg_id"] == model_rec.seg_id).all()
        assert rows["voxels_changed"].iloc[0] > 0 and rows["slices_touched"].iloc[0] == 1
        paths = list(rows["mask_path"])
        assert paths[0] != paths[1] and all(Path(p).exists() for p in paths)
        # the model output is untouched and still the "model" segmentation
        assert _sha(model_rec.infection_path) == model_sha
        assert store.segmentation(scan, "model").seg_id == model_rec.seg_id
        assert np.array_equal(store.load_segmentation(scan, "model").infection, infection)
        final = store.load_segmentation(scan, "final").infection
        assert np.array_equal(final, np.where(lungs > 0, session.working, 0))
        shown = store.metrics([scan])
        assert set(shown["model_version"]) == {"corrected"}
        with pytest.raises(StoreError):
            corrections.save_correction(store, scan, session.working, session.effort(), author="  ")


# --- import of masks made elsewhere --------------------------------------------------------------
def test_label_tables_for_imported_masks() -> None:
    raw = np.array([[0, 1, 2, 3, 4]])
    assert importing.translate(raw, "itksnap").tolist() == [[0, GGO, CONSOLIDATION, 0, 0]]
    assert importing.translate(raw, "slicer").tolist() == [[0, GGO, CONSOLIDATION, 0, 0]]
    assert importing.translate(raw, "medseg").tolist() == [[0, GGO, CONSOLIDATION, 0, 0]]  # 3 = effusion dropped
    hu = np.array([[-900, -600, -100, -500, 20]])
    assert importing.translate(raw, "covid19_ct_seg", hu).tolist() == [[0, 0, 0, GGO, 0]]  # 1/2 lungs, 3 infection
    assert importing.translate(raw, "binary", hu).tolist() == [[0, GGO, CONSOLIDATION, GGO, CONSOLIDATION]]
    assert importing.translate(raw, importing.parse_mapping("4=GGO,3=consolidation")).tolist() == [[0, 0, 0, CONSOLIDATION, GGO]]
    with pytest.raises(ValueError):
        importing.translate(raw, "binary")  # untyped infection needs the CT
    with pytest.raises(ValueError):
        importing.parse_mapping("5:GGO")


def test_import_corrected_nifti_from_itksnap_numbering(tmp_path: Path) -> None:
    from covidtrack.io import save_mask
    from covidtrack.volume import Volume

    ct = np.full((6, 20, 24), -850, np.int16)
    vol = Volume(array=ct, spacing=(3.0, 1.5, 1.5))
    theirs = np.zeros(ct.shape, np.uint8)
    theirs[2, 5:9, 5:9] = 1
    theirs[3, 10:12, 10:14] = 2
    theirs[4, 1:3, 1:3] = 5  # a label the table does not know: ignored
    path = save_mask(theirs, vol, tmp_path / "corrected.nii.gz")
    ours = importing.import_corrected_mask(path, vol, "itksnap")
    assert int((ours == GGO).sum()) == 16 and int((ours == CONSOLIDATION).sum()) == 8 and ours[4].sum() == 0
    only_five = save_mask(np.where(theirs == 5, 5, 0).astype(np.uint8), vol, tmp_path / "five.nii.gz")
    with pytest.raises(InputError, match="none maps to infection"):
        importing.import_corrected_mask(only_five, vol, "itksnap")
    # a strict table refuses a value it does not know: dropping it would silently erase a lesion
    with pytest.raises(InputError, match=r"label value\(s\) 5 that table 'covidtrack' does not know.*5=GGO"):
        importing.import_corrected_mask(path, vol, "covidtrack")
    assert int((importing.import_corrected_mask(path, vol, importing.parse_mapping("1=GGO,2=consolidation,5=none")) > 0).sum()) == 24


# --- active learning -----------------------------------------------------------------------------
def test_entropy_score_orders_the_uncertain_case_first() -> None:
    lungs = np.zeros((4, 16, 16), bool)
    lungs[:, 2:14, 2:14] = True
    confident = np.where(lungs, 0.02, 0.0)
    confident[:, 4:8, 4:8] = 0.97
    uncertain = confident.copy()
    uncertain[:, 8:13, 8:13] = 0.5  # a region the model cannot decide
    outside_noise = confident.copy()
    outside_noise[:, 0:2, :] = 0.5  # hesitation OUTSIDE the lungs must not count
    scores = {"confident": active.entropy_score(confident, lungs), "uncertain": active.entropy_score(uncertain, lungs),
              "outside": active.entropy_score(outside_noise, lungs)}
    assert active.rank(scores)[0] == "uncertain"
    assert scores["outside"] == pytest.approx(scores["confident"])
    assert active.binary_entropy(np.array([0.5]))[0] == pytest.approx(1.0)


class _FixedProbModel:
    """Stands in for InfectionModel.predict: a fixed infection probability inside the lungs per scan."""

    version = "infection/vtest"

    def __init__(self, prob_by_shape_call: list[float]) -> None:
        self.probs = list(prob_by_shape_call)

    def predict(self, ct_hu, lungs, spacing, progress=None):  # noqa: ANN001 - same signature as InfectionModel
        p = self.probs.pop(0)
        prob = np.where(lungs > 0, p, 0.0).astype(np.float16)
        return (prob >= 0.5).astype(np.uint8), prob


def test_review_queue_by_score_and_by_date(small_store: list[str]) -> None:
    with Store.open() as store:
        scans = list(store.scans().sort_values("study_date")["scan_id"])
        model = _FixedProbModel([0.03, 0.45])  # the later scan is the deliberately uncertain one
        scores = active.score_scans(store, scans, model=model)
        assert scores[scans[1]] > scores[scans[0]]
        assert active.cached_scores(model.version) == pytest.approx(scores)
        by_score = active.review_queue(store, "score", model_version=model.version)
        assert list(by_score["scan_id"]) == [scans[1], scans[0]]
        assert list(active.review_queue(store, "date", model_version=model.version)["scan_id"]) == scans
        # a reviewed scan leaves the queue
        _, _, _, inf, _ = corrections.load_for_review(store, scans[1])
        corrections.save_correction(store, scans[1], inf, corrections.effort_between(inf, inf), author="AB")
        assert list(active.review_queue(store, "score", model_version=model.version)["scan_id"]) == [scans[0]]


# --- retrain, version, promote, rollback, re-segment ----------------------------------------------
@pytest.fixture
def fast_phantoms(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Three of the real validation slices and one small phantom for validation and replay (the
    product uses eight real slices and three / four phantoms)."""
    import shutil

    real = tmp_path / "validation"
    for sub, suffix in (("Imgs", ".jpg"), ("GT", ".png"), ("GT_multiclass", ".png")):
        (real / sub).mkdir(parents=True)
        for name in ("2", "20", "26"):
            shutil.copy(retrain.VALIDATION_DIR / sub / f"{name}{suffix}", real / sub)
    monkeypatch.setattr(retrain, "VALIDATION_DIR", real)
    monkeypatch.setattr(retrain, "PHANTOM_SEEDS", (9101,))
    monkeypatch.setattr(retrain, "PHANTOM_SLICES", 2)
    monkeypatch.setattr(retrain, "PHANTOM_SHAPE", (16, 64, 64))
    monkeypatch.setattr(retrain, "PHANTOM_SPACING", (12.0, 3.0, 3.0))
    monkeypatch.setattr(retrain, "REPLAY_SEEDS", (9101,))
    monkeypatch.setattr(retrain, "REPLAY_SLICES", 3)


def _correct_one(store: Store, scan: str) -> None:
    _, lungs, _, inf, _ = corrections.load_for_review(store, scan)
    session = EditSession(inf)
    z = int(np.nonzero(lungs.any(axis=(1, 2)))[0][len(np.nonzero(lungs.any(axis=(1, 2)))[0]) // 2])
    ys, xs = np.nonzero(lungs[z])
    session.edit(z, corrections.brush, (int(ys.mean()), int(xs.mean())), 3, GGO, allowed=lungs[z] > 0)
    corrections.save_correction(store, scan, session.working, session.effort(), author="AB")


def test_retrain_makes_a_new_version_and_promotion_is_explicit(small_store: list[str], fast_phantoms: None) -> None:
    base = make_tiny_model()
    with Store.open() as store:
        with pytest.raises(StoreError, match="no corrected scans"):
            retrain.prepare_job(store, retrain.RetrainConfig())
        _correct_one(store, small_store[0])
        job = retrain.prepare_job(store, retrain.RetrainConfig(iterations=3, batch_size=4, use_original=False))
        assert retrain.job_status(job.folder)["state"] == "queued"
        result = retrain.run_job(job.folder, echo=False)
        status = retrain.job_status(job.folder)
        assert status["state"] == "done" and status["fraction"] == 1.0
        assert not (job.folder / "samples.npz").exists(), "patient image copies must not stay in the job folder"
        new = modelstore.get("infection", result["version"])
        assert new.version != base.version and not new.shipped
        card = new.card()
        ev = card["hitl"]["evaluation"]
        assert ev["old"]["model"] == base.name and ev["new"]["model"] == new.name
        assert ev["new"]["n"] == 3 + 2  # 3 real held-out slices + 2 phantom slices
        assert set(ev["new"]["per_item"]) >= {"real-2", "real-20", "real-26"}
        assert card["hitl"]["corrected_scans"] == [small_store[0]]
        assert card["weights_sha256"] == _sha(new.weights)
        assert "Human-in-the-loop" in (new.path / "MODEL_CARD.md").read_text()
        assert (new.path.stat().st_mode & 0o777) == 0o755  # shared like any version, not private to its maker
        # its comparison is on the HITL set; it never had a cross-validation of its own
        row = retrain.versions_frame().set_index("version").loc[new.version]
        assert pd.isna(row["Dice held-out / CV"]) and row["Dice real (HITL set)"] == pytest.approx(ev["new_headline"]["dice_real"])
        # nothing changed for users until promotion
        assert modelstore.active("infection").version == base.version
        retrain.sync_versions(store)
        listed = store.models("infection")
        assert set(listed["version"]) >= {base.version, new.version}
        assert not listed[listed["version"] == new.version]["active"].iloc[0]

        retrain.promote(store, new.version)
        assert modelstore.active("infection").version == new.version
        listed = store.models("infection")
        assert listed[listed["active"]]["version"].tolist() == [new.version]

        # re-segmenting adds segmentations whose metric rows carry the new version; old rows stay
        n_metrics = store.counts()["metrics"]
        added = retrain.resegment(store)
        assert len(added) == 2
        assert retrain.resegment(store) == []  # already done with this version
        tags = set(store.metrics(model_version=None)["model_version"])
        new_tags = {t for t in tags if new.name in t.split(",")}
        assert new_tags and tags - new_tags - {"corrected"}, "the earlier model rows must stay beside the new ones"
        assert store.counts()["metrics"] > n_metrics

        back = retrain.rollback(store)
        assert back.version == base.version == modelstore.active("infection").version
        shipped = [r for r in modelstore.list_versions("infection") if r.shipped]
        if shipped:  # before the tiny model, the newest shipped version was active
            assert retrain.rollback(store).version == shipped[-1].version
        else:
            with pytest.raises(ModelError):
                retrain.rollback(store)  # nothing older to go back to


def test_version_names_are_checked_before_training(small_store: list[str]) -> None:
    base = make_tiny_model()
    with pytest.raises(InputError, match=f"infection/{base.version} exists already"):
        modelstore.check_new_version("infection", base.version)
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(InputError, match="not a version name"):
            modelstore.check_new_version("infection", bad)
    assert modelstore.check_new_version("infection", "v99") == "v99"
    from covidtrack.__main__ import main

    assert main(["train", "infection", "--from-corrections", "--finetune-iterations", "-1"]) == 2
    assert main(["train", "infection", "--from-corrections", "--finetune-iterations", "0"]) == 2
    assert main(["train", "infection", "--from-corrections", "--version", base.version]) == 2


def test_background_job_reports_failure_in_status(small_store: list[str], fast_phantoms: None) -> None:
    """The background process writes its fate into status.json (here: weights removed under it)."""
    base = make_tiny_model()
    with Store.open() as store:
        _correct_one(store, small_store[0])
        job = retrain.start_retrain(store, retrain.RetrainConfig(iterations=2, batch_size=2, use_original=False))
    assert job.pid
    base.weights.unlink()  # the job must fail cleanly, not hang or write a version
    import time

    deadline = time.time() + 120
    while retrain.job_status(job.folder)["state"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    status = retrain.job_status(job.folder)
    assert status["state"] == "failed" and "weights" in status["error"]
    assert [r.version for r in modelstore.list_versions("infection") if not r.shipped] == [base.version]
    assert retrain.running_job() is None


# --- the two dashboard pages (AppTest, no browser) -------------------------------------------------
APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def ui_store(small_store: list[str]):
    import streamlit as st

    st.cache_resource.clear()  # the cached Store belongs to the previous test's home
    st.cache_data.clear()
    yield small_store
    st.cache_resource.clear()


def _page(name: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    at.switch_page(f"covidtrack/ui/pages/{name}.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _delete_a_lesion(at) -> None:  # noqa: ANN001 - a streamlit AppTest on the Review page
    """Click 'delete lesion' on the first infected pixel of the slice shown."""
    session = at.session_state["hitl_review"]["session"]
    z = at.session_state["review_z"]
    ys, xs = np.nonzero(session.working[z])
    at.radio(key="review_tool").set_value("Delete lesion (click)")
    at.number_input(key="review_y").set_value(int(ys[0]))
    at.number_input(key="review_x").set_value(int(xs[0]))
    at.button(key="review_apply").click().run()


def test_review_page_edits_and_saves_a_correction(ui_store: list[str]) -> None:
    make_tiny_model()
    at = _page("review")
    assert any("Review" in t.value for t in at.title)
    assert len(at.dataframe[0].value) == 2  # both scans are in the queue
    scan = at.session_state["hitl_review"]["scan_id"]
    _delete_a_lesion(at)
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["hitl_review"]["session"].effort().voxels_changed > 0
    at.button(key="review_undo").click().run()
    assert at.session_state["hitl_review"]["session"].effort().voxels_changed == 0
    at.button(key="review_apply").click().run()
    at.text_input(key="review_author").set_value("AB")
    at.button(key="review_save").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Saved correction" in s.value and "in the background" in s.value for s in at.success)
    with Store.open() as store:
        rows = store.corrections(scan)
    assert len(rows) == 1 and rows["author"].iloc[0] == "AB" and rows["voxels_changed"].iloc[0] > 0
    # the change vs baseline is redone in the background; the page reports it when done
    from covidtrack.ui import jobs, resources

    queue = resources.jobs()
    assert [j.label for j in queue.jobs()][-1] == f"correction of scan {scan}"
    assert queue.wait(timeout=300)
    assert queue.jobs()[-1].state == jobs.DONE, queue.jobs()[-1].message
    at.run()
    assert any("Background update of the change vs baseline" in s.value for s in at.success)


def test_models_page_lists_versions_and_promotes(ui_store: list[str]) -> None:
    base = make_tiny_model()
    other = make_tiny_model(seed=1)  # a second version, made active by the helper: roll back to base
    at = _page("models")
    table = at.dataframe[0].value
    assert set(table["version"]) >= {base.version, other.version}  # + any shipped versions
    assert table.loc[table["active"], "version"].tolist() == [other.version]
    at.button(key="models_rollback").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert modelstore.active("infection").version == base.version
    assert any("re-segment" in i.value for i in at.info)
    at.selectbox(key="models_version").set_value(other.version)
    at.button(key="models_promote").click().run()
    assert modelstore.active("infection").version == other.version
    at.button(key="models_reseg").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Added 2 segmentation" in s.value for s in at.success)


def test_cli_imports_a_corrected_mask_and_lists_versions(small_store: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from covidtrack.__main__ import main
    from covidtrack.io import save_mask

    scan = small_store[0]
    with Store.open() as store:
        volume = store.load_volume(scan)
        model = store.load_segmentation(scan, "model")
    theirs = np.where(model.infection > 0, 1, 0).astype(np.uint8)  # Slicer segment 1 = GGO everywhere
    path = save_mask(theirs, volume, tmp_path / "from_slicer.nii.gz")
    assert main(["hitl", "import", scan, str(path), "--table", "slicer", "--author", "AB", "--minutes", "3"]) == 0
    with Store.open() as store:
        rows = store.corrections(scan)
        final = store.load_segmentation(scan, "final").infection
    assert rows["seconds"].iloc[0] == pytest.approx(180.0)
    assert rows["voxels_changed"].iloc[0] == int((model.infection == CONSOLIDATION).sum())  # only the type changed
    assert set(np.unique(final)) <= {0, GGO}
    base = make_tiny_model()
    assert main(["hitl", "versions"]) == 0
    assert base.version in capsys.readouterr().out
    # a malformed mapping and negative minutes are errors with a fix, not tracebacks
    assert main(["hitl", "import", scan, str(path), "--table", "1=foo", "--author", "AB"]) == 2
    assert main(["hitl", "import", scan, str(path), "--table", "slicer", "--author", "AB", "--minutes", "-5"]) == 2
    err = capsys.readouterr().err
    assert "class 'foo' unknown" in err and "is negative" in err and "Traceback" not in err


@pytest.mark.skipif(not (__import__("shutil").which("chromium") and __import__("shutil").which("chromedriver")
                         and __import__("os").environ.get("COVIDTRACK_BROWSER_TESTS") == "1"),
                    reason="real-browser check: set COVIDTRACK_BROWSER_TESTS=1 (needs Debian chromium + chromium-driver; ~40 s)")
def test_review_click_paints_in_a_real_browser(small_store: list[str], covidtrack_home: Path) -> None:
    """The click component works offline with the pinned Streamlit: a click in the right lung with
    the default tool (paint GGO) changes voxels."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    make_tiny_model()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=Path(APP).parent, env={**os.environ, "COVIDTRACK_HOME": str(covidtrack_home), "COVIDTRACK_NO_DEMO": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    profile = tempfile.mkdtemp(prefix="covidtrack-chromium-")
    driver = None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1400,2200",
                    f"--user-data-dir={profile}"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
        driver.get(f"{url}/review")
        wait = WebDriverWait(driver, 90)

        def voxels_changed() -> str:
            metrics = [m.text for m in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stMetric']") if "Voxels changed" in m.text]
            return metrics[0].split("\n")[-1] if metrics else ""

        wait.until(lambda d: voxels_changed() == "0")
        frame = wait.until(lambda d: [f for f in d.find_elements(By.CSS_SELECTOR, "iframe") if "image_coordinates" in (f.get_attribute("src") or "")])[0]
        driver.switch_to.frame(frame)
        img = wait.until(lambda d: d.find_element(By.ID, "image"))
        wait.until(lambda d: d.find_element(By.ID, "image").size["width"] > 50)
        w = img.size["width"]
        ActionChains(driver).move_to_element_with_offset(img, int(-w / 2 + 0.3 * w), 0).click().perform()  # right lung
        driver.switch_to.default_content()
        wait.until(lambda d: voxels_changed() not in ("", "0"))
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_publish_in_progress_is_not_a_version() -> None:
    from covidtrack import modelstore
    from covidtrack.config import settings

    half = settings().models_dir / "infection" / ".v9.x1y2z3"  # a publish killed before its rename
    half.mkdir(parents=True)
    (half / "card.json").write_text("{}")
    assert ".v9.x1y2z3" not in [r.version for r in modelstore.list_versions("infection")]
    with pytest.raises(Exception, match="not found"):
        modelstore.get("infection", ".v9.x1y2z3")


# --- defects found by a review (session 8) -------------------------------------------------------
def test_correction_refuses_a_segmentation_of_another_scan(small_store: list[str]) -> None:
    a, b = small_store
    with Store.open() as store:
        _, _, _, inf_a, _ = corrections.load_for_review(store, a)
        seg_b = store.segmentation(b, "model")
        before = store.counts()
        with pytest.raises(StoreError, match=f"belongs to scan {b}"):
            corrections.save_correction(store, a, inf_a, corrections.effort_between(inf_a, inf_a), "AB",
                                        original_seg_id=seg_b.seg_id)
        with pytest.raises(StoreError, match="belongs to scan"):  # the store's own check
            store.add_correction("no-such-scan", "AB", 1.0, 0, 0, seg_b.infection_path, original_seg_id=seg_b.seg_id)
        assert store.counts() == before


@pytest.mark.parametrize("dtype,value", [(np.int16, 256), (np.int16, 257), (np.int16, -1), (np.float32, 0.9),
                                         (np.float32, 2.6), (np.float32, np.nan)])
def test_correction_labels_are_checked_before_any_cast(small_store: list[str], dtype: type, value: float) -> None:
    a, _ = small_store
    with Store.open() as store:
        _, lungs, _, inf, _ = corrections.load_for_review(store, a)
        bad = inf.astype(dtype)
        bad[lungs > 0] = value
        before = store.counts()
        with pytest.raises(StoreError, match="other than 0, 1, 2"):
            corrections.save_correction(store, a, bad, corrections.effort_between(inf, inf), "AB")
        assert store.counts() == before
        ok = inf.astype(np.float32)  # exact 0/1/2 in another dtype is fine
        corrections.save_correction(store, a, ok, corrections.effort_between(inf, inf), "AB")


def test_lesion_painted_beyond_the_lung_mask_extends_lungs_and_lobes(small_store: list[str]) -> None:
    a, _ = small_store
    with Store.open() as store:
        _, lungs, lobes, inf, seg_id = corrections.load_for_review(store, a)
        session = corrections.EditSession(inf)
        z = int(np.nonzero(lungs.any(axis=(1, 2)))[0][len(np.nonzero(lungs.any(axis=(1, 2)))[0]) // 2])
        dist = ndimage.distance_transform_edt(lungs[z] == 0)
        ys, xs = np.nonzero((dist > 0) & (dist <= 2))  # just outside the lung border
        session.edit(z, corrections.brush, (int(ys[0]), int(xs[0])), 2, CONSOLIDATION, allowed=None)
        painted_out = (session.working > 0) & (lungs == 0)
        assert painted_out.any()
        corrections.save_correction(store, a, session.working, session.effort(), "AB", seg_id)
        seg = store.load_segmentation(a, "corrected")
        assert (seg.infection == session.working).all(), "the saved edit is what was painted"
        assert (seg.lungs[painted_out] > 0).all() and (seg.lungs[lungs > 0] == lungs[lungs > 0]).all()
        if lobes is not None:
            assert (seg.lobes[seg.lungs > 0] > 0).all() and ((seg.lobes[seg.lungs == 1] <= 3)).all()
        assert store.load_segmentation(a, "model").lungs.sum() == lungs.sum(), "the model output is unchanged"
        # far from the lungs: refused, nothing stored
        before = store.counts()
        far = inf.copy()
        dz = np.nonzero(dist > 12)
        assert dz[0].size
        far[z, dz[0][0], dz[1][0]] = GGO
        with pytest.raises(StoreError, match="away from the lungs"):
            corrections.save_correction(store, a, far, corrections.effort_between(inf, far), "AB", seg_id)
        assert store.counts() == before


def test_concurrent_promote_and_rollback_keep_a_serial_order(small_store: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    make_tiny_model(0)
    v5 = make_tiny_model(1).version
    v6 = make_tiny_model(2).version
    modelstore.rollback("infection")  # active v5, with the two before it in the history
    history = modelstore._read_pointer()["infection"]["history"]
    real_write = modelstore._write_pointer
    entered = threading.Event()

    def slow_write(data: dict) -> None:  # the first writer waits long enough for the other to read
        if not entered.is_set():
            entered.set()
            import time

            time.sleep(0.5)
        real_write(data)

    monkeypatch.setattr(modelstore, "_write_pointer", slow_write)
    with Store.open() as store:
        ta = threading.Thread(target=lambda: retrain.promote(store, v6))
        tb = threading.Thread(target=lambda: retrain.rollback(store))
        ta.start()
        entered.wait(5)
        tb.start()
        ta.join()
        tb.join()
        after = modelstore._read_pointer()["infection"]
        assert after in ({"active": v5, "history": history}, {"active": history[-1], "history": history[:-1] + [v5]}), after
        active_rows = store.models("infection").query("active")
        assert active_rows.version.tolist() == [after["active"]]


def test_failed_cli_finetune_leaves_no_patient_slices(small_store: list[str], fast_phantoms: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    make_tiny_model()
    with Store.open() as store:
        _correct_one(store, small_store[0])
    real_eval, calls = retrain.evaluate, []

    def evaluate(model, items):  # Ctrl-C while the new model is scored (after training)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(model, items)

    monkeypatch.setattr(retrain, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        retrain.run_cli(argparse.Namespace(finetune_iterations=2, version=None, seed=0, notes=""))
    job = retrain.latest_job()
    assert retrain.job_status(job.folder)["state"] == "failed"
    assert not (job.folder / "samples.npz").exists() and not (job.folder / "staging").exists()


def test_a_job_killed_before_it_could_clean_up_loses_its_copies(small_store: list[str]) -> None:
    import os
    import signal
    import subprocess
    import sys

    make_tiny_model()
    with Store.open() as store:
        _correct_one(store, small_store[0])
        job = retrain.prepare_job(store, retrain.RetrainConfig(iterations=2, batch_size=2, use_original=False))
    assert (job.folder / "samples.npz").exists()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for a starting job
    retrain._update_status(job.folder, state="running", pid=proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs (a cancel during start-up, kill -9)
    proc.wait()
    assert retrain.job_status(job.folder)["state"] == "failed"
    assert not (job.folder / "samples.npz").exists()


def test_real_validation_slices_seen_by_the_base_are_said_so(shared_data: Path, tmp_path: Path) -> None:
    import json

    base = modelstore.active("infection")
    names = retrain.real_validation_names()
    images = retrain.default_original_data()
    # the shipped model was trained on all MedSeg slices, these included
    assert all((images / f"{n}.jpg").exists() for n in names) and not base.card()["training_data"]["held_out"]
    assert retrain.real_validation_seen(base, names)

    def ref(version: str, card: dict) -> modelstore.ModelRef:
        folder = tmp_path / version
        folder.mkdir()
        (folder / "card.json").write_text(json.dumps(card))
        return modelstore.ModelRef(task="infection", version=version, path=folder, shipped=False)

    held = ref("h1", {"training_data": {"labelled_slices": 42, "held_out": names}})
    assert not retrain.real_validation_seen(held, names)
    assert retrain.real_validation_seen(ref("h2", {"training_data": {"labelled_slices": 42, "held_out": names[:-1]}}), names)
    assert not retrain.real_validation_seen(ref("h3", {"training_data": {"labelled_slices": 0}}), names)
    # a fine-tuned version inherits its base's answer (its lineage is followed through the card)
    tuned = ref("t1", {"hitl": {"base_version": f"infection/{base.version}"}, "training_data": {"labelled_slices": 50, "held_out": names}})
    assert retrain.real_validation_seen(tuned, names)


# --- reviewed hold-out: corrected scans that no fine-tuning run trains on --------------------------
def test_holdout_patients_are_a_fixed_share_that_never_takes_every_patient() -> None:
    keys = [f"patient-{i}" for i in range(2000)]
    held = retrain.holdout_patients(keys)
    assert 0.19 < len(held) / len(keys) < 0.24  # about one in five
    below = {k for k in keys if retrain._holdout_bucket(k) < retrain.REVIEWED_HOLDOUT}
    assert below <= held
    # a patient below the threshold is held out whoever else was corrected
    for i, k in enumerate(sorted(below)[:60]):
        subset = [k] + keys[1000 + 3 * i: 1003 + 3 * i]
        if not set(subset) <= below:  # (when all would be held out, none is: checked below)
            assert k in retrain.holdout_patients(subset)
    # chance cannot leave a store of ten corrected patients without any held out
    for start in range(0, 1000, 10):
        assert len(retrain.holdout_patients(keys[start:start + 10])) >= 2
    assert retrain.holdout_patients(keys, fraction=0.0) == set()
    assert retrain.holdout_patients(sorted(below)[:3]) == set(), "a run needs at least one corrected patient to learn from"


def _bucket_fraction_holding_out(keys: list[str], n_held: int) -> float:
    """A hold-out fraction under which exactly the ``n_held`` lowest-hash patients are held out."""
    buckets = sorted(retrain._holdout_bucket(k) for k in keys)
    return (buckets[n_held - 1] + buckets[n_held]) / 2


def test_held_out_corrected_scans_score_the_run_and_are_never_trained_on(covidtrack_home: Path, fast_phantoms: None) -> None:
    from covidtrack.report import synthetic

    make_tiny_model()
    with Store.open() as store:
        synthetic.populate_store(store, n_patients=3, n_scans=1, shape=(16, 40, 40))
        scans = store.scans()
        for scan in scans["scan_id"]:
            _correct_one(store, scan)
        keys = list(scans["patient_key"])
        fraction = _bucket_fraction_holding_out(keys, 1)
        held_key = min(keys, key=retrain._holdout_bucket)
        held_scan = scans.loc[scans["patient_key"] == held_key, "scan_id"].item()
        train_rows, held_rows = retrain.split_corrections(store, fraction)
        assert [r["scan_id"] for r in held_rows] == [held_scan] and len(train_rows) == 2

        job = retrain.prepare_job(store, retrain.RetrainConfig(iterations=2, batch_size=4, use_original=False, holdout_fraction=fraction))
        trained_on = set(np.load(job.folder / "samples.npz")["scan"])
        assert held_scan not in trained_on and len(trained_on) == 2
        assert set(np.load(job.folder / "validation.npz")["scan"]) == {held_scan}
        result = retrain.run_job(job.folder, echo=False)
        assert not (job.folder / "validation.npz").exists(), "validation copies of patient images must not stay"
        card = modelstore.get("infection", result["version"]).card()
        h = card["hitl"]
        assert held_scan not in h["corrected_scans"] and len(h["corrected_scans"]) == 2
        assert h["reviewed_validation"]["scans"] == [held_scan] and h["reviewed_validation"]["slices"] == result["reviewed_slices"] > 0
        new_eval = h["evaluation"]["new"]
        assert new_eval["reviewed"]["dice"]["n"] >= 1
        assert any(name.startswith("reviewed-") for name in new_eval["per_item"])
        assert h["evaluation"]["new_headline"]["dice_reviewed"] is not None
        assert "reviewed hold-out slices" in (modelstore.get("infection", result["version"]).path / "MODEL_CARD.md").read_text()
        row = retrain.versions_frame().set_index("version").loc[result["version"]]
        assert row["Dice reviewed (held-out scans)"] == pytest.approx(h["evaluation"]["new_headline"]["dice_reviewed"])

        # a later run from that version holds out a patient the version trained on: that scan is
        # neither trained on again nor counted as unseen validation
        retrain.promote(store, result["version"])
        second_key = sorted(keys, key=retrain._holdout_bucket)[1]
        second_scan = scans.loc[scans["patient_key"] == second_key, "scan_id"].item()
        wider = _bucket_fraction_holding_out(keys, 2)
        job2 = retrain.prepare_job(store, retrain.RetrainConfig(iterations=2, batch_size=4, use_original=False, holdout_fraction=wider))
        result2 = retrain.run_job(job2.folder, echo=False)
        h2 = modelstore.get("infection", result2["version"]).card()["hitl"]
        assert h2["reviewed_validation"]["left_out_seen_by_base"] == [second_scan]
        assert h2["reviewed_validation"]["scans"] == [held_scan]
        assert not any(second_scan[:12] in name for name in h2["evaluation"]["new"]["per_item"])
        assert retrain.scans_seen_by(modelstore.get("infection", result2["version"])) >= set(h["corrected_scans"])


# --- local validation: the model against what the reviewers accepted ------------------------------
def test_agreement_compares_the_model_output_with_the_accepted_correction(small_store: list[str], capsys: pytest.CaptureFixture,
                                                                           tmp_path: Path) -> None:
    from covidtrack.__main__ import main as cli_main
    from covidtrack.hitl import agreement

    with Store.open() as store:
        assert agreement.agreement_table(store).empty
        _, lungs, _, model_inf, model_seg = corrections.load_for_review(store, small_store[0])
        added = np.zeros_like(model_inf)
        z = int(np.nonzero(lungs.any(axis=(1, 2)))[0].mean())
        added[z][(lungs[z] > 0) & (model_inf[z] == 0)] = CONSOLIDATION  # the reviewer adds a whole slice of consolidation
        first = np.where(added > 0, added, model_inf).astype(np.uint8)
        corrections.save_correction(store, small_store[0], first, Effort(60.0, 0, 0, 0, 0), author="AB", original_seg_id=model_seg)
        # a second reviewer corrects the correction: agreement still starts from the model's output
        first_seg = store.corrections(small_store[0])["seg_id"].iloc[-1]
        second = first.copy()
        second[z - 1][lungs[z - 1] > 0] = GGO
        corrections.save_correction(store, small_store[0], second, Effort(120.0, 0, 0, 0, 0), author="CD", original_seg_id=first_seg)
        _correct_one(store, small_store[1])
        table = agreement.agreement_table(store).set_index("scan_id")
        summary = agreement.agreement_summary(table.reset_index())
        metric_rows = store.metrics(model_version=None)

    row = table.loc[small_store[0]]
    m, c = model_inf > 0, second > 0
    assert row["dice"] == pytest.approx(2 * (m & c).sum() / (m.sum() + c.sum()))
    assert row["dice_consolidation"] == pytest.approx(
        2 * ((model_inf == 2) & (second == 2)).sum() / ((model_inf == 2).sum() + (second == 2).sum()))
    assert row["voxels_changed"] == int((model_inf != second).sum())
    assert row["minutes"] == pytest.approx(3.0)  # both reviewers' time on the scan
    poi = metric_rows[(metric_rows["region"] == "whole") & (metric_rows["metric"] == "poi")].set_index("seg_id")["value"]
    assert row["poi_model"] == pytest.approx(poi[model_seg])
    assert row["poi_model"] < row["poi_reviewer"] and row["poi_difference"] == pytest.approx(row["poi_model"] - row["poi_reviewer"])
    assert row["model_version"] != "corrected" and not row["held_out"]  # one patient: nothing held out

    diffs = table["poi_difference"].to_numpy(float)
    s = summary.set_index("model_version").iloc[0]
    assert s["scans"] == 2 and s["poi_bias"] == pytest.approx(diffs.mean())
    assert s["poi_loa_high"] - s["poi_bias"] == pytest.approx(1.96 * diffs.std(ddof=1))

    out = tmp_path / "agreement.json"
    assert cli_main(["hitl", "agreement", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "limits of agreement" in printed and small_store[0][:12] in printed
    payload = __import__("json").loads(out.read_text())
    assert len(payload["scans"]) == 2 and payload["summary"][0]["scans"] == 2


def test_models_page_shows_agreement_with_the_reviewers(ui_store: list[str]) -> None:
    make_tiny_model()
    at = _page("models")
    assert any("No corrected scans yet" in c.value for c in at.caption)
    with Store.open() as store:
        for scan in ui_store:
            _correct_one(store, scan)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    summary = next(d.value for d in at.dataframe if "poi_bias" in d.value.columns)
    assert summary["scans"].sum() == 2
    assert any("model − reviewer" in c.value for c in at.caption)


def test_agreement_summary_per_version_and_its_bland_altman_plot() -> None:
    from covidtrack.hitl import agreement

    rows = []
    for version, diffs in (("infection/v3", [-2.0, -1.0, 0.0]), ("infection/v4", [0.5])):
        for i, d in enumerate(diffs):
            rows.append({"scan_id": f"s{version[-1]}{i}", "patient_key": f"p{i}", "alias": None, "study_date": "2020-03-01",
                         "model_version": version, "author": "AB", "held_out": False, "dice": 0.5 + 0.1 * i, "dice_ggo": np.nan,
                         "dice_consolidation": np.nan, "poi_model": 10.0 + d, "poi_reviewer": 10.0, "poi_difference": d,
                         "severity_model": 3.0, "severity_reviewer": 3.0 if i else 4.0, "voxels_changed": 10, "minutes": 2.0})
    table = pd.DataFrame(rows, columns=list(agreement.COLUMNS))
    summary = agreement.agreement_summary(table).set_index("model_version")
    v3 = summary.loc["infection/v3"]
    assert v3["scans"] == 3 and v3["poi_bias"] == pytest.approx(-1.0) and v3["poi_abs_difference_mean"] == pytest.approx(1.0)
    assert v3["poi_loa_low"] == pytest.approx(-1.0 - 1.96) and v3["poi_loa_high"] == pytest.approx(-1.0 + 1.96)
    assert v3["severity_same_share"] == pytest.approx(2 / 3) and v3["dice_median"] == pytest.approx(0.6)
    v4 = summary.loc["infection/v4"]
    assert v4["poi_bias"] == pytest.approx(0.5) and np.isnan(v4["poi_loa_low"])  # one scan: no spread
    fig = agreement.bland_altman_figure(table)
    assert [t.name for t in fig.data] == ["infection/v3", "infection/v4"]
    assert len(fig.layout.shapes) == 3 + 1 + 1  # v3 bias and two limits, v4 bias, the zero line


# --- round trip with 3D Slicer / ITK-SNAP ---------------------------------------------------------
def test_export_for_slicer_and_import_back_is_a_round_trip(small_store: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import zipfile

    from covidtrack.__main__ import main
    from covidtrack.hitl import exporting
    from covidtrack.io import load_mask

    scan = small_store[0]
    out = tmp_path / "for_slicer"
    assert main(["hitl", "export", scan, str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"ct.nii.gz", "infection.nii.gz", "lungs.nii.gz", "lobes.nii.gz", "infection.ctbl", "infection.itksnap.txt",
            "lobes.ctbl", "README.txt"} <= names
    with Store.open() as store:
        volume = store.load_volume(scan)
        model = store.load_segmentation(scan, "model")
        patient = store.scans().set_index("scan_id").loc[scan]
    # the files overlay the scan exactly (same grid, same values)
    assert np.array_equal(load_mask(out / "infection.nii.gz", volume), model.infection)
    assert np.array_equal(load_mask(out / "lobes.nii.gz", volume), model.lobes)
    assert "1 GGO 255 200 0 255" in (out / "infection.ctbl").read_text()
    assert '"consolidation"' in (out / "infection.itksnap.txt").read_text()
    readme = (out / "README.txt").read_text()
    assert f"hitl import {scan} infection.nii.gz --table covidtrack" in readme
    # nothing that names the patient or the date
    blob = b"".join(p.read_bytes() for p in out.iterdir())
    assert str(patient["patient_key"]).encode() not in blob and str(patient["study_date"])[:10].encode() not in blob

    # the reviewer adds consolidation in the other tool and brings it back
    edited = model.infection.copy()
    z = int(np.nonzero(model.lungs.any(axis=(1, 2)))[0].mean())
    edited[z][(model.lungs[z] > 0) & (edited[z] == 0)] = CONSOLIDATION
    from covidtrack.io import save_mask

    save_mask(edited, volume, out / "infection.nii.gz")
    assert main(["hitl", "import", scan, str(out / "infection.nii.gz"), "--table", "covidtrack", "--author", "AB"]) == 0
    with Store.open() as store:
        assert np.array_equal(store.load_segmentation(scan, "active").infection, edited)
        # the next export is of the correction; --model still gives the model output
        exporting.export_scan(store, scan, tmp_path / "again")
        exporting.export_scan(store, scan, tmp_path / "model", kind="model")
        with zipfile.ZipFile(__import__("io").BytesIO(exporting.export_zip(store, scan))) as zf:
            assert f"{scan}/infection.nii.gz" in zf.namelist()
    assert np.array_equal(load_mask(tmp_path / "again" / "infection.nii.gz", volume), edited)
    assert np.array_equal(load_mask(tmp_path / "model" / "infection.nii.gz", volume), model.infection)
    assert "corrected segmentation" in (tmp_path / "again" / "README.txt").read_text()
    with pytest.raises(StoreError, match="no scan"):
        with Store.open() as store:
            exporting.export_scan(store, "scan-unknown", tmp_path / "x")


def test_review_page_offers_the_scan_for_slicer(ui_store: list[str]) -> None:
    import io
    import zipfile

    make_tiny_model()
    at = _page("review")
    scan = at.session_state["hitl_review"]["scan_id"]
    at.button(key="review_export").click().run()
    assert not at.exception, [e.value for e in at.exception]
    (ready_scan, _seg), data = at.session_state["review_export_zip"]
    assert ready_scan == scan
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {f"{scan}/ct.nii.gz", f"{scan}/infection.nii.gz", f"{scan}/README.txt"} <= set(zf.namelist())


def test_review_download_is_not_the_pre_correction_masks_after_saving(ui_store: list[str]) -> None:
    """Prepare the Slicer download, then edit and save a correction of the same scan: the page
    used to keep offering the zip prepared before the save (keyed by scan id only), i.e. the
    masks the reviewer had just replaced. The zip is now keyed by the active segmentation too."""
    import io
    import tempfile
    import zipfile

    from covidtrack.io import load_mask
    from covidtrack.ui import resources

    make_tiny_model()
    at = _page("review")
    scan = at.session_state["hitl_review"]["scan_id"]
    at.button(key="review_export").click().run()
    assert at.session_state["review_export_zip"][0][0] == scan
    _delete_a_lesion(at)
    at.text_input(key="review_author").set_value("AB")
    at.button(key="review_save").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert resources.jobs().wait(timeout=300)
    at.run()
    # the reviewer reopens the scan just corrected (reviewed scans included in the queue)
    at.checkbox(key="review_include").check().run()
    at.selectbox(key="review_scan").set_value(scan).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["hitl_review"]["scan_id"] == scan
    assert "review_export_zip" not in at.session_state, "the zip of the masks before the save is still offered"
    at.button(key="review_export").click().run()  # prepared again: the correction's masks
    (ready_scan, _seg), data = at.session_state["review_export_zip"]
    with Store.open() as store:
        volume = store.load_volume(scan)
        active_inf = store.load_segmentation(scan, "active").infection
    tmp = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extract(f"{scan}/infection.nii.gz", tmp)
    assert ready_scan == scan and np.array_equal(load_mask(tmp / scan / "infection.nii.gz", volume), active_inf)
