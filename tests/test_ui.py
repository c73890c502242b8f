"""Streamlit AppTest smoke test of every dashboard page on a small store (no browser)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import streamlit as st
from streamlit.testing.v1 import AppTest

from covidtrack.errors import InputError
from covidtrack.report import synthetic
from covidtrack.store import Store
from covidtrack.ui import uploads

REPO = Path(__file__).resolve().parent.parent
APP = str(REPO / "app.py")
PAGES = ["patients", "patient", "cohort", "import_data", "report"]


@pytest.fixture
def small_store(covidtrack_home: Path) -> list[str]:
    st.cache_resource.clear()  # the cached Store belongs to the previous test's home
    st.cache_data.clear()
    with Store.open() as store:
        keys = synthetic.populate_store(store, n_patients=4, n_scans=3, shape=(16, 48, 48))
        store.set_patient(keys[0], alias="bed 12")
    yield keys
    st.cache_resource.clear()


def _open(page: str, **query: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page != "patients":
        at.switch_page(f"covidtrack/ui/pages/{page}.py")
        at.run()
    return at


def _texts(at: AppTest) -> str:
    parts = [e.value for e in (*at.title, *at.subheader, *at.markdown, *at.caption, *at.info, *at.success, *at.error)]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders(small_store: list[str], page: str) -> None:
    at = _open(page)
    assert not at.exception, [e.value for e in at.exception]
    titles = [t.value for t in at.title]
    expected = {"patients": "Patients", "patient": "Patient", "cohort": "Cohort", "import_data": "Import", "report": "Trend reports"}[page]
    assert any(expected in t for t in titles), titles


def test_patients_lists_alias_and_no_raw_ids(small_store: list[str]) -> None:
    at = _open("patients")
    table = at.dataframe[0].value
    assert len(table) == 4
    assert "bed 12" in set(table["patient"])
    assert {"arm A", "arm B"} <= set(table["arm"])
    assert set(table["scans"]) == {3}


def test_patient_page_shows_trajectory_viewer_and_table(small_store: list[str]) -> None:
    at = _open("patient", patient=small_store[1])
    assert not at.exception
    assert f"Patient {small_store[1]}" in [t.value for t in at.title]
    keys = {e.proto.id for e in at.get("plotly_chart")}
    assert len(keys) >= 3  # trajectory, heatmap, viewer (+ animation)
    assert at.get("download_button"), "metrics CSV download missing"
    table = at.dataframe[-1].value
    assert set(table["region"]) >= {"whole", "RUL", "LLL"}
    # the 4-region view hides lobe rows
    at.sidebar.radio(key="region_view").set_value("4-region view").run()
    assert not at.exception
    assert not set(at.dataframe[-1].value["region"]) & {"RUL", "LLL"}
    # coronal plane and change overlay render too
    at.radio(key="viewer_plane").set_value("coronal").run()
    at.radio(key="viewer_overlay").set_value("change vs baseline").run()
    n_charts = len(at.get("plotly_chart"))
    at.toggle(key="viewer_play").set_value(True).run()
    assert not at.exception
    assert len(at.get("plotly_chart")) == n_charts + 1  # the follow-up animation is added on request


def test_a_stale_patient_link_opens_nobody_else(small_store: list[str]) -> None:
    at = _open("patient", patient=small_store[1][:-1])  # a key cut short
    assert not at.exception
    assert any("No patient with key" in e.value for e in at.error)
    assert [t.value for t in at.title] == ["Patient timeline"]
    assert not at.get("plotly_chart")
    at.sidebar.selectbox(key="patient_select").set_value(small_store[2]).run()
    assert f"Patient {small_store[2]}" in [t.value for t in at.title]


def test_cohort_page_has_test_and_responders(small_store: list[str]) -> None:
    at = _open("cohort")
    assert not at.exception
    text = _texts(at)
    assert "Mann-Whitney" in text
    assert "Responders" in text
    tests = next(d.value for d in at.dataframe if "arms" in d.value.columns)
    assert "median Δ (pp)" in tests.columns  # a change of POI is in percentage points
    at.sidebar.multiselect(key="cohort_arms").set_value(["arm A"]).run()
    assert not at.exception


def test_report_page_uses_the_cohort_pages_filters(small_store: list[str]) -> None:
    at = _open("cohort")
    at.sidebar.slider(key="cohort_severity").set_value((20, 25)).run()
    assert not at.exception
    at.switch_page("covidtrack/ui/pages/report.py").run()
    assert not at.exception
    assert any("Cohort page's filters" in c.value and "baseline severity 20-25" in c.value for c in at.caption)


def test_empty_store_with_demo_disabled_points_to_import(covidtrack_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDTRACK_NO_DEMO", "1")
    st.cache_resource.clear()
    st.cache_data.clear()
    at = _open("patients")
    assert not at.exception
    assert any("no patients" in i.value for i in at.info)
    st.cache_resource.clear()


# --- uploads: size limits and safe unpacking ---------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_is_unpacked_inside_the_folder(tmp_path: Path) -> None:
    data = _zip({"series/IMG1.dcm": b"a" * 10, "series/IMG2.dcm": b"b" * 10})
    out = uploads.prepare_upload("../../evil name.zip", io.BytesIO(data), tmp_path / "scratch")
    assert out == tmp_path / "scratch" / "unpacked"
    assert sorted(p.name for p in out.rglob("*.dcm")) == ["IMG1.dcm", "IMG2.dcm"]
    assert not (tmp_path / "scratch" / "evil_name.zip").exists()  # only one copy is kept


@pytest.mark.parametrize("name", ["../outside.dcm", "/etc/passwd", "a/../../outside.dcm", "C:/windows.dcm"])
def test_zip_path_traversal_is_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip({"ok.dcm": b"x", name: b"y"}))
    with pytest.raises(InputError, match="outside|escapes"):
        uploads.safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path / "outside.dcm").exists()


def test_zip_limits(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    archive.write_bytes(_zip({f"f{i}.dcm": b"x" for i in range(20)}))
    with pytest.raises(InputError, match="20 files"):
        uploads.safe_extract(archive, tmp_path / "d1", max_files=10)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (3 * uploads.MB))
    with pytest.raises(InputError, match="MB"):
        uploads.safe_extract(bomb, tmp_path / "d2", max_bytes=1 * uploads.MB)


def test_long_upload_names_keep_their_suffix() -> None:
    name = "dcm2niix_" + "x" * 140 + "_3.nii.gz"
    short = uploads.safe_name(name)
    assert len(short) <= 120 and short.endswith("_3.nii.gz"[-7:]) and short.startswith("dcm2niix_")
    assert uploads.safe_name("p" * 200 + ".zip").endswith(".zip")


def test_a_zipped_nifti_upload_loads_the_file(tmp_path: Path) -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("export/scan.nii.gz", b"not really")
        zf.writestr("__MACOSX/export/._scan.nii.gz", b"")
    out = uploads.prepare_upload("scan.zip", io.BytesIO(buf.getvalue()), tmp_path / "s")
    assert out.name == "scan.nii.gz" and out.is_file()


def test_upload_size_limit_and_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="larger than"):
        uploads.save_upload("x.nii.gz", io.BytesIO(b"0" * (2 * uploads.MB + 1)), tmp_path, max_bytes=2 * uploads.MB)
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="unsupported"):
        uploads.prepare_upload("notes.txt", io.BytesIO(b"hello"), tmp_path / "s")


# --- first start: the demo cohort through the real pipeline ------------------------------------


def _threshold_segmenter(volume, callback=None):  # type: ignore[no-untyped-def]
    """A fast stand-in for the networks: air-like voxels inside the body are lung, split at the midline."""
    import numpy as np
    from scipy import ndimage

    from covidtrack.segment.types import Segmentation

    hu = volume.array
    air = hu < -400
    outside, _ = ndimage.label(air)
    border = set(np.unique(np.concatenate([outside[:, 0].ravel(), outside[:, -1].ravel(), outside[:, :, 0].ravel(), outside[:, :, -1].ravel()])))
    lung = air & ~np.isin(outside, list(border - {0}))
    lungs = np.zeros(hu.shape, np.uint8)
    half = hu.shape[2] // 2
    lungs[:, :, :half][lung[:, :, :half]] = 1
    lungs[:, :, half:][lung[:, :, half:]] = 2
    infection = np.where(lung & (hu > -750) & (hu < -300), 1, 0).astype(np.uint8)
    infection[lung & (hu >= -300)] = 2
    return Segmentation(lungs=lungs, infection=infection, model_versions={"lungs": "test/threshold", "infection": "test/threshold"})


def test_bootstrap_builds_demo_through_pipeline(covidtrack_home: Path) -> None:
    from covidtrack import bootstrap

    with Store.open() as store:
        assert bootstrap.needs_bootstrap(store)
        events = bootstrap.bootstrap(store, n_patients=2, shape=(36, 48, 48), spacing=(5.0, 4.2, 4.2), segmenter=_threshold_segmenter, register=False)
        fractions = []
        while True:
            try:
                fractions.append(next(events).fraction)
            except StopIteration as stop:
                result = stop.value
                break
        assert not result.failed, result.failed
        assert fractions[-1] == 1.0 and max(fractions[:-1]) <= 1.0
        pats = store.patients()
        assert len(pats) == 3  # two phantom patients + the real CT sample
        assert pats.loc[pats["alias"] == bootstrap.REAL_SAMPLE_ALIAS, "arm"].isna().all()  # no treatment arm
        assert set(pats["alias"]) == {"phantom 1", "phantom 2", bootstrap.REAL_SAMPLE_ALIAS}
        assert (pats["n_scans"] >= 1).all() and pats["n_scans"].sum() == result.stored
        assert not bootstrap.needs_bootstrap(store)  # the marker prevents a second build
    assert not list((covidtrack_home / "work").glob("demo-*"))  # scratch phantoms removed


def test_import_bad_file_shows_error_and_stores_nothing(small_store: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    with Store.open() as store:
        before = store.counts()
    at = _open("import_data")
    at.text_input(key="server_path").input(str(bad)).run()
    at.text_input(key="srv_patient").input("HOSP-12345").run()
    at.button(key="import_server").click().run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and "broken.nii.gz" in errors[0] and "Fix:" in errors[0]
    st.cache_resource.clear()  # release the app's store before reopening it here
    with Store.open() as store:
        assert store.counts() == before
        assert "HOSP-12345" not in set(store.patients()["patient_key"])  # raw IDs never stored


def test_import_without_a_date_asks_for_one_and_a_failed_manifest_is_not_green(small_store: list[str], tmp_path: Path) -> None:
    at = _open("import_data")
    at.text_input(key="server_path").input(str(tmp_path / "scan.nii.gz")).run()
    at.text_input(key="srv_patient").input("HOSP-1").run()
    assert at.checkbox(key="srv_filedate").value  # the file's own date by default, never today
    at.checkbox(key="srv_filedate").uncheck().run()
    (tmp_path / "scan.nii.gz").write_bytes(b"x")
    at.button(key="import_server").click().run()
    assert any("Enter the study date" in e.value for e in at.error)
    manifest = tmp_path / "m.csv"
    manifest.write_text("patient,date,path\nP1,2020-03-01,missing.nii.gz\n")
    at.text_input(key="server_path").input(str(manifest)).run()
    at.checkbox(key="srv_accept").check().run()
    at.button(key="import_server").click().run()
    assert not at.checkbox(key="srv_accept").value  # an acceptance is for one import only
    assert not at.exception and not at.success
    errors = [e.value for e in at.error]
    assert errors[0] == "0 scan(s) ok, 1 failed." and errors[1].startswith("line 2: ")
    assert errors[1].count("missing.nii.gz") == 1  # the path once, not twice


def test_import_root_restricts_server_paths(small_store: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COVIDTRACK_IMPORT_ROOT", str(tmp_path / "incoming"))
    with pytest.raises(InputError, match="outside the import folder"):
        uploads.check_server_path(REPO / "data" / "samples")


def test_a_page_holds_the_store_only_while_it_runs(small_store: list[str]) -> None:
    """After a page has run, the dashboard has closed the store, so a command-line process can
    write (DuckDB allows one writer per file); the next run opens it again."""
    import os
    import subprocess
    import sys

    from covidtrack import store as S
    from covidtrack.config import settings

    at = _open("patient", patient=small_store[1])
    assert not at.exception
    assert settings().db_path not in S._CONNECTIONS
    script = "from covidtrack.store import Store\nwith Store.open(wait_s=0) as s:\n    s.set_patient(%r, arm='cli-arm')\n" % small_store[2]
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    at.run()  # the page opens the store again and sees the other process's write
    assert not at.exception
    with Store.open() as store:
        assert store.patients().set_index("patient_key").loc[small_store[2], "arm"] == "cli-arm"


def test_update_change_button_registers_in_the_background(small_store: list[str]) -> None:
    """The Patient page's button queues the registration and returns at once; while it runs the
    button is disabled, and the page reports the result when it is done."""
    from covidtrack.ui import jobs, resources

    key = small_store[1]
    at = _open("patient", patient=key)
    buttons = [b for b in at.button if b.key == "register_now"]
    assert buttons, "the synthetic store has unregistered follow-ups: the button is offered"
    buttons[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    queue = resources.jobs()
    mine = queue.jobs(key)
    assert mine and mine[-1].label == "requested on this page"
    if queue.busy(key):
        assert [b for b in at.button if b.key == "register_now"][0].disabled
    assert queue.wait(timeout=600)
    assert mine[-1].state == jobs.DONE, mine[-1].message
    at.run()
    assert any("Background update of the change vs baseline" in s.value for s in at.success)


def test_gate_does_not_call_a_permanent_error_busy(covidtrack_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a store held by another process is 'busy' (and retried); a newer schema is an error
    with its fix, shown once."""
    import streamlit

    from covidtrack.ui import startup

    with Store.open() as s, s.transaction() as cur:
        cur.execute("INSERT INTO schema_version (version) VALUES (99)")  # written by a newer covidtrack
    monkeypatch.setattr(startup, "BUSY_RETRY_S", 0.0)
    monkeypatch.setattr(streamlit, "rerun", streamlit.stop)  # one run, not a retry loop
    at = AppTest.from_file(APP, default_timeout=30).run()
    assert not any("busy" in i.value for i in at.info), [i.value for i in at.info]
    assert any("newer" in e.value for e in at.error), [e.value for e in at.error]


def test_a_command_line_alias_change_shows_up_on_the_dashboard(small_store: list[str]) -> None:
    """A write from another process that changes no row count (an arm/alias update) reaches the
    dashboard on its next run: the cache key covers the patients' alias and arm."""
    import os
    import subprocess
    import sys

    at = _open("patients")
    assert not at.exception
    script = f"from covidtrack.store import Store\nwith Store.open(wait_s=0) as s:\n    s.set_patient({small_store[1]!r}, alias='bed 7', arm='cli-arm')\n"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    at.run()  # the user refreshes the page
    shown = at.dataframe[0].value.to_string()
    assert "bed 7" in shown and "cli-arm" in shown, shown  # a new arm is shown, not filtered out
    assert "cli-arm" in at.multiselect(key="patients_arms").value
    assert not at.warning, [w.value for w in at.warning]
