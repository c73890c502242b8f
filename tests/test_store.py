"""Store round trips, active-version selection, migrations and orphan cleanup."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from covidtrack import store as S
from covidtrack.errors import StoreError
from covidtrack.volume import ScanMeta, Volume


def _metrics(poi: float, lung: float = 4000.0) -> pd.DataFrame:
    return pd.DataFrame(
        [("whole", "poi", poi, "%"), ("whole", "lung_volume", lung, "mL"), ("RUL", "poi", poi * 2, "%")],
        columns=["region", "metric", "value", "unit"],
    )


def _add(store: S.Store, patient: str, date: str, poi: float, tag: str = "lungs/v1", arm: str | None = None) -> tuple[str, str]:
    """A scan + segmentation + metrics with real (tiny) files written through FileStage."""
    h = f"hash-{patient}-{date}"
    scan_id = S.new_scan_id(h)
    seg_id = S.new_seg_id()
    vol = Volume(array=np.full((4, 5, 6), -800, np.int16), spacing=(2.0, 1.0, 1.0), meta=ScanMeta(kernel="B30f"))
    mask = np.ones((4, 5, 6), np.uint8)
    with S.FileStage() as stage:
        vpath = stage.put(store.volume_path_for(scan_id), lambda p: S.write_canonical(p, vol))
        paths = {part: stage.put(store.mask_path_for(seg_id, part), lambda p: S.write_canonical(p, vol, mask)) for part in ("lungs", "infection")}
        store.add_scan(
            S.ScanRecord(scan_id, patient, dt.date.fromisoformat(date), h, vpath, {"shape": [4, 5, 6]}, "x.nii.gz", {"kernel": "B30f"}),
            S.SegRecord(seg_id, scan_id, "model", {"lungs": tag}, paths["lungs"], paths["infection"]),
            _metrics(poi),
            arm=arm,
        )
    return scan_id, seg_id


def test_round_trip_and_queries() -> None:
    with S.Store.open() as store:
        assert store.schema_version() == S.SCHEMA_VERSION
        a1, _ = _add(store, "pA", "2020-03-01", 10.0, arm="treated")
        a2, _ = _add(store, "pA", "2020-03-08", 20.0)
        b1, _ = _add(store, "pB", "2020-03-02", 5.0, arm="control")
        store.set_patient("pB", alias="Bob")

        pats = store.patients()
        assert set(pats.patient_key) == {"pA", "pB"}
        assert pats.set_index("patient_key").loc["pA", "n_scans"] == 2
        assert pats.set_index("patient_key").loc["pB", "alias"] == "Bob"

        scans = store.scans("pA")
        assert list(scans.scan_id) == [a1, a2] and list(scans.day) == [0, 7]
        assert Path(scans.volume_path.iloc[0]).exists()
        assert json.loads(scans.geometry.iloc[0]) == {"shape": [4, 5, 6]}

        long = store.metrics([a1])
        assert len(long) == 3 and set(long.model_version) == {"lungs/v1"}
        wide = store.metrics(wide=True)
        assert len(wide) == 3 and wide.set_index("scan_id").loc[a2, "whole_poi"] == 20.0

        coh = store.cohort_metrics(arms=["treated"], metrics=["poi"], regions=["whole"])
        assert list(coh.value) == [10.0, 20.0] and list(coh.day) == [0, 7]
        assert set(store.patient_metrics("pB").scan_id) == {b1}

        latest = store.latest_per_patient().set_index("patient_key")
        assert latest.loc["pA", "scan_id"] == a2 and latest.loc["pA", "poi"] == 20.0
        assert latest.loc["pA", "n_scans"] == 2 and latest.loc["pB", "alias"] == "Bob"

        vol = store.load_volume(a1)
        assert vol.shape == (4, 5, 6) and vol.spacing == (2.0, 1.0, 1.0) and vol.meta.kernel == "B30f"
        assert int(vol.array[0, 0, 0]) == -800
        seg = store.load_segmentation(a1)
        assert seg.lungs.sum() == 120 and seg.lobes is None and seg.model_versions == {"lungs": "lungs/v1"}


def test_resegmentation_adds_rows_and_active_prefers_corrections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "active_model_names", lambda: [])  # independent of the shipped models
    with S.Store.open() as store:
        scan_id, seg1 = _add(store, "pA", "2020-03-01", 10.0, tag="lungs/v1")
        seg2 = S.new_seg_id()
        store.add_segmentation(S.SegRecord(seg2, scan_id, "model", {"lungs": "lungs/v9"}, tmp_path / "l", tmp_path / "i"), _metrics(12.0))
        all_rows = store.metrics(model_version=None)
        assert set(all_rows.model_version) == {"lungs/v1", "lungs/v9"} and len(all_rows) == 6
        assert set(store.metrics(model_version="lungs/v1").value) == {10.0, 20.0, 4000.0}
        # neither version is active: "active" falls back to the latest
        active = store.metrics(model_version="active")
        assert set(active.seg_id) == {seg2}

        cid, seg3 = store.add_correction(scan_id, "dr. x", 42.0, 1234, 7, tmp_path / "c.nii.gz", seg1, metrics=_metrics(15.0))
        assert store.segmentation_by_id(seg3).kind == "corrected"
        active = store.metrics()
        assert set(active.seg_id) == {seg3} and set(active.kind) == {"corrected"}
        assert active.query("region == 'whole' and metric == 'poi'").value.item() == 15.0
        cor = store.corrections(scan_id)
        assert cor.correction_id.item() == cid and cor.original_seg_id.item() == seg1
        assert store.segmentation(scan_id, "final").seg_id == seg3
        assert store.segmentation(scan_id, "model").seg_id == seg2
        fin = store.segmentation(scan_id, "corrected")
        # lungs come from the original segmentation named in the correction; the model output stays
        assert fin.infection_path == tmp_path / "c.nii.gz"
        assert fin.lungs_path == Path(store.scans().volume_path.item()).parent.parent / "masks" / f"{seg1}_lungs.nii.gz"
        assert store.counts()["segmentations"] == 3


def test_active_uses_modelstore(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An older segmentation made by the active models wins over a newer non-active one."""
    with S.Store.open() as store:
        scan_id, seg1 = _add(store, "pA", "2020-03-01", 10.0, tag="lungs/v1")
        seg2 = S.new_seg_id()
        store.add_segmentation(S.SegRecord(seg2, scan_id, "model", {"lungs": "lungs/v2"}, tmp_path / "l", tmp_path / "i"), _metrics(12.0))
        monkeypatch.setattr(S, "active_model_names", lambda: ["lungs/v1", "infection/v3"])
        assert set(store.metrics().seg_id) == {seg1}
        monkeypatch.setattr(S, "active_model_names", lambda: ["lungs/v2"])
        assert set(store.metrics().seg_id) == {seg2}


def test_registrations_change_models(tmp_path: Path) -> None:
    with S.Store.open() as store:
        a, _ = _add(store, "pA", "2020-03-01", 10.0)
        b, _ = _add(store, "pA", "2020-03-09", 5.0)
        t = store.home / "registrations" / "x0GenericAffine.mat"
        store.add_registration(a, b, {"affine": t}, {"lung_dice": 0.97}, True, change_map=store.home / "registrations" / "c.nii.gz")
        rid = store.add_registration(a, b, [t], {"lung_dice": 0.98}, True)  # replaces the pair
        regs = store.registrations("pA")
        assert len(regs) == 1 and regs.reg_id.item() == rid
        assert regs.transforms.item() == [t] and regs.qa.item() == {"lung_dice": 0.98} and bool(regs.ok.item())
        with pytest.raises(StoreError):
            store.add_registration(a, "scan-nope", [], {}, False)

        change = pd.DataFrame([("whole", "poi_change", -5.0, "pp")], columns=["region", "metric", "value", "unit"])
        store.add_change_metrics(a, b, change)
        store.add_change_metrics(a, b, change)  # replaces, no duplicates
        cm = store.change_metrics("pA")
        assert len(cm) == 1 and cm.value.item() == -5.0 and cm.moving_scan.item() == b

        store.upsert_model("infection", "v1", {"epochs": 3}, {"dice": 0.8}, active=True)
        store.upsert_model("infection", "v2", {"epochs": 5}, {"dice": 0.85}, active=True)
        store.upsert_model("infection", "v2", {"epochs": 5}, {"dice": 0.86}, active=True)
        m = store.models("infection").set_index("version")
        assert len(m) == 2 and not m.loc["v1", "active"] and m.loc["v2", "active"]
        assert m.loc["v2", "metrics"] == {"dice": 0.86}


def test_unique_content_hash_and_transaction_rollback() -> None:
    with S.Store.open() as store:
        _add(store, "pA", "2020-03-01", 10.0)
        before = store.counts()
        with pytest.raises(duckdb.ConstraintException):
            _add(store, "pA", "2020-03-01", 10.0)  # same content hash
        assert store.counts() == before  # nothing half-inserted
        # FileStage removed the files of the failed attempt; only referenced files remain
        files = {p.resolve() for p in (store.home / "scans").iterdir()} | {p.resolve() for p in (store.home / "masks").iterdir()}
        assert files == store.referenced_files()


def test_orphans_cleaned_on_open() -> None:
    with S.Store.open() as store:
        _add(store, "pA", "2020-03-01", 10.0)
        home = store.home
    orphan = home / "masks" / "seg-deadbeef_lungs.nii.gz"
    tmp = home / "scans" / ".tmp-1-ab-scan-x.nii.gz"
    foreign = home / "masks" / "notes.txt"  # not a name the store creates: left alone
    for p in (orphan, tmp, foreign):
        p.write_bytes(b"x")
    with S.Store.open() as store:
        assert not orphan.exists() and not tmp.exists() and foreign.exists()
        assert store.counts()["scans"] == 1


def test_migration_from_v1_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    for stmt in S.MIGRATIONS[1]:
        con.execute(stmt)
    con.execute("INSERT INTO schema_version (version) VALUES (1)")
    con.execute("INSERT INTO patients (patient_key, arm) VALUES ('p1', 'control')")
    con.execute(
        "INSERT INTO scans (scan_id, patient_key, study_date, content_hash, geometry, source_name, volume_path) "
        "VALUES ('scan-1', 'p1', DATE '2020-04-01', 'h1', '{}', 'a.nii', 'scans/scan-1.nii.gz')"
    )
    con.execute(
        "INSERT INTO segmentations (seg_id, scan_id, model_versions, model_tag, lungs_path, infection_path) "
        "VALUES ('seg-1', 'scan-1', '{\"lungs\": \"lungs/v1\"}', 'lungs/v1', 'masks/seg-1_lungs.nii.gz', 'masks/seg-1_infection.nii.gz')"
    )
    con.execute("INSERT INTO metrics VALUES ('scan-1', 'whole', 'poi', 3.5, '%', 'lungs/v1', 'seg-1')")
    con.close()
    with S.Store.open(db) as store:
        assert store.schema_version() == S.SCHEMA_VERSION
        assert store.patients().alias.isna().all()
        assert store.segmentation("scan-1", "final").kind == "model"  # default filled by the migration
        assert store.metrics().value.item() == 3.5
        assert store.counts()["corrections"] == 0
        store.set_patient("p1", alias="first")
        assert store.patients().alias.item() == "first"
    with S.Store.open(db) as store:  # reopening does not re-apply anything
        assert store.schema_version() == S.SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "future.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    con.execute(f"INSERT INTO schema_version VALUES ({S.SCHEMA_VERSION + 1}, now())")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        S.Store.open(db)


def test_one_connection_per_process() -> None:
    with S.Store.open() as a, S.Store.open() as b:
        assert a._con is b._con
        a.set_patient("p", arm="x")
        assert b.patients().arm.item() == "x"
    with pytest.raises(StoreError, match="closed"):
        a.patients()


def test_correction_without_metrics_waits_for_them(tmp_path: Path) -> None:
    with S.Store.open() as store:
        scan_id, seg1 = _add(store, "pA", "2020-03-01", 10.0)
        _, seg2 = store.add_correction(scan_id, "dr. y", 10.0, 5, 1, tmp_path / "c.nii.gz")
        assert set(store.metrics().seg_id) == {seg1}  # no numbers yet: the model's stay shown
        assert store.segmentation(scan_id).seg_id == seg2  # but the final masks are the correction
        store.add_metrics(seg2, _metrics(11.0))
        assert set(store.metrics().seg_id) == {seg2}
        with pytest.raises(StoreError, match="already has metrics"):
            store.add_metrics(seg2, _metrics(12.0))


def test_read_only_open_reads_and_refuses_writes() -> None:
    with S.Store.open() as store:
        scan_id, seg1 = _add(store, "pA", "2020-03-01", 10.0)
        path = store.path
    with S.Store.open(path, read_only=True) as ro:
        assert set(ro.metrics().seg_id) == {seg1}
        assert ro.latest_per_patient().scan_id.item() == scan_id
        with pytest.raises(StoreError, match="read-only"):
            ro.set_patient("pA", arm="x")
        with pytest.raises(StoreError, match="read-only"):
            S.Store.open(path)


def test_failed_open_releases_the_store_and_says_what_to_do(tmp_path: Path) -> None:
    db = tmp_path / "v2.duckdb"
    con = duckdb.connect(str(db))
    for v in (1, 2):
        for stmt in S.MIGRATIONS[v]:
            con.execute(stmt)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [v])
    con.close()
    with pytest.raises(StoreError, match="needs migrating.*register --all"):
        S.Store.open(db, read_only=True)
    assert db.resolve() not in S._CONNECTIONS  # the failed open left no connection (and no file lock) behind
    with S.Store.open(db) as store:  # so a read-write open in the same process works and migrates
        assert store.schema_version() == S.SCHEMA_VERSION
    with pytest.raises(StoreError, match="no store here yet"):
        S.Store.open(tmp_path / "none" / "covidtrack.duckdb", read_only=True)


def test_files_of_removed_scans_are_cleaned_on_open() -> None:
    with S.Store.open() as store:
        kept, _ = _add(store, "pA", "2020-03-01", 10.0)
        later, _ = _add(store, "pA", "2020-03-09", 8.0)
        home = store.home
    gone = "scan-00000000deadbeef"
    for name in (f"{kept}_{gone}", f"{kept}_{later}", "notes"):
        (home / "registrations" / name).mkdir(parents=True)
    (home / "viewer_cache").mkdir()
    stale = home / "viewer_cache" / f"{kept}_{gone}--reg-1--seg-1.npz"
    stale.write_bytes(b"x")
    with S.Store.open():
        assert not (home / "registrations" / f"{kept}_{gone}").exists() and not stale.exists()
        assert (home / "registrations" / f"{kept}_{later}").exists() and (home / "registrations" / "notes").exists()


def test_two_imports_at_once_cannot_both_take_one_date(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from covidtrack.pipeline import drain, ingest
    from tests.test_pipeline import synthetic_chest, truth_segmenter

    gate = threading.Barrier(2)

    def slow(vol, progress=None):  # both imports pass the early checks before either stores
        gate.wait(timeout=30)
        return truth_segmenter(vol, progress)

    results: list[object] = []

    def run(shift: int) -> None:
        vol, _ = synthetic_chest(lesion_shift=shift)
        try:
            results.append(drain(ingest(vol, "P1", "2020-03-01", segmenter=slow, register=False)))
        except Exception as err:  # noqa: BLE001 - the loser's error is what is checked
            results.append(err)

    with S.Store.open():  # one store shared by both threads, as in the dashboard
        threads = [threading.Thread(target=run, args=(s,)) for s in (0, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 2 and len(errors) == 1 and isinstance(errors[0], StoreError)
    assert "already has scan" in str(errors[0])
    with S.Store.open() as store:
        assert store.counts()["scans"] == 1


def test_register_all_goes_on_past_a_patient_that_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from covidtrack import longitudinal
    from covidtrack.__main__ import main as cli

    with S.Store.open() as store:
        _add(store, "pA", "2020-03-01", 10.0)
        _add(store, "pB", "2020-03-01", 12.0)
    seen = []

    def register_patient(store, key, progress=None, force=False):
        seen.append(key)
        if key == "pA":
            raise RuntimeError("empty lung mask")
        return []

    monkeypatch.setattr(longitudinal, "register_patient", register_patient)
    assert cli(["register", "--all"]) == 1
    assert seen == ["pA", "pB"] and "pA: RuntimeError: empty lung mask" in capsys.readouterr().err


def test_open_waits_while_another_process_writes(tmp_path: Path) -> None:
    """DuckDB lets one process write a file: an open that finds it held retries until the other
    process lets go (so a command and a dashboard page can take turns), and one that gives up
    says who to wait for."""
    import os
    import subprocess
    import sys
    import time

    db = tmp_path / "store" / "covidtrack.duckdb"
    S.Store.open(db).close()
    marker = tmp_path / "holding"
    script = (
        "import sys, time, pathlib\n"
        "from covidtrack.store import Store\n"
        f"with Store.open({str(db)!r}) as s:\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        "    time.sleep(3.0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the holding process never opened the store"
            time.sleep(0.05)
        with pytest.raises(StoreError, match="another covidtrack process is writing"):
            S.Store.open(db, wait_s=0.0)
        t0 = time.monotonic()
        with S.Store.open(db, wait_s=60.0) as store:  # opens as soon as the other process closes
            assert time.monotonic() - t0 > 0.5
            store.set_patient("p", arm="x")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_page_runs_keep_the_files_of_a_concurrent_ingest(covidtrack_home: Path) -> None:
    """One thread ingests (holding its Store, as the Import page or the demo worker does) while
    another opens and closes the store as every dashboard page run does: no committed file may be
    taken for an orphan (only the open that creates the process's connection cleans)."""
    import threading

    from covidtrack.report import synthetic

    S.Store.open().close()
    stop = threading.Event()

    def writer() -> None:
        try:
            with S.Store.open() as s:
                synthetic.populate_store(s, n_patients=6, n_scans=4, shape=(16, 48, 48))
        finally:
            stop.set()

    def page_runs() -> None:
        while not stop.is_set():
            S.Store.open(wait_s=2.0).close()

    threads = [threading.Thread(target=page_runs), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with S.Store.open() as s:
        missing = [p for p in s.referenced_files() if not p.exists()]
        assert len(s.scans()) == 24
    assert not missing, f"{len(missing)} files of committed rows deleted, e.g. {missing[:2]}"


def test_two_sessions_open_a_fresh_store_at_once(covidtrack_home: Path) -> None:
    import threading

    barrier, errors = threading.Barrier(2), []

    def session() -> None:
        barrier.wait()
        try:
            S.Store.open().close()
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=session) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_open_keeps_a_viewer_cache_file_being_written_for_a_stored_pair(covidtrack_home: Path) -> None:
    from covidtrack.report import synthetic

    with S.Store.open() as s:
        key = synthetic.populate_store(s, n_patients=1, n_scans=2, shape=(16, 48, 48))[0]
        a, b = list(s.scans(key).sort_values("study_date")["scan_id"])
    tmp = covidtrack_home / "viewer_cache" / f".tmp-{a}_{b}--reg-0123--seg-4567.npz"  # load._write_cached's name
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"being written by another session")
    S.Store.open().close()  # another session's page run, creating the connection: it cleans
    assert tmp.exists()
    gone = covidtrack_home / "viewer_cache" / ".tmp-scan-0000_scan-1111--reg-0--seg-0.npz"  # a pair never stored
    gone.write_bytes(b"x")
    S.Store.open().close()
    assert not gone.exists() and tmp.exists()


def test_migration_to_v4_drops_stored_file_names(tmp_path: Path) -> None:
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    for version in (1, 2, 3):
        for stmt in S.MIGRATIONS[version]:
            con.execute(stmt)
        con.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
    con.execute("INSERT INTO patients (patient_key, arm) VALUES ('p1', 'control')")
    for i, (name, meta) in enumerate([
        ("MRN1_SMITH.nii.gz", '{"source_format": "nifti", "source_name": "MRN1 \\"Bob\\" SMITH.nii.gz", "notes": []}'),
        ("DOE_JOHN", '{"source_format": "dicom", "source_name": "DOE_JOHN"}'),
        ("old.nii", "{}"),
    ]):
        con.execute(
            "INSERT INTO scans (scan_id, patient_key, study_date, content_hash, geometry, source_name, volume_path, meta) "
            f"VALUES ('scan-{i}', 'p1', DATE '2020-04-0{i + 1}', 'h{i}', '{{}}', ?, 'scans/scan-{i}.nii.gz', ?)", [name, meta])
    con.close()
    with S.Store.open(db) as store:
        scans = store.scans().sort_values("scan_id")
        assert scans.source_name.tolist() == ["nifti", "dicom", "unknown"]
        text = " ".join(scans.meta.astype(str))
        assert "SMITH" not in text and "DOE" not in text and "Bob" not in text
        assert json.loads(scans.meta.iloc[0])["source_format"] == "nifti"
