"""Lesions followed from the baseline on the cases a review found wrong (session 9; each failed
before): a lesion the follow-up did not fully image, the 25 % boundary, a lost lobe file, a
follow-up without any lesion."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from covidtrack.change import change_map, lesion_tracks
from covidtrack.labels import CHANGE_NEW, CHANGE_PERSISTENT


# --- 1. a lesion mostly in the slices the follow-up did not image is called "resolved" -------------
def test_lesion_partly_not_imaged_is_not_called_resolved() -> None:
    """Baseline lesion z 0-19 (4.0 mL at 2 mm); the follow-up starts at z 16 and shows no infection
    there. 80 % of the lesion was never seen at the follow-up (change_metrics calls that infection
    'neither resolved nor persistent'), yet the track says 'resolved' with a baseline of 0.8 mL."""
    base = np.zeros((30, 12, 12), np.uint8)
    base[0:20, 3:8, 3:8] = 1  # 500 voxels = 4.0 mL
    lungs = np.ones_like(base)
    imaged = np.zeros(base.shape, bool)
    imaged[16:] = True  # the follow-up stops short of slices 0-15
    cm = change_map(base, np.zeros_like(base), lungs=lungs, imaged=imaged)
    unseen = (base > 0) & (lungs > 0) & (cm == 0)  # what lesion_table passes: baseline infection not imaged
    t = lesion_tracks(cm, None, (2.0, 2.0, 2.0), not_imaged=unseen)
    assert len(t) == 1
    assert t.iloc[0]["status"] == "partly not imaged", t.to_dict("records")
    assert t.iloc[0]["baseline_ml"] == 4.0  # the whole baseline lesion, seen or not


# --- 2. the 25 % rule: "more than" / "beyond" 25 % in the docs, ">=" in the code --------------------
def test_exactly_25_percent_is_not_beyond_25_percent() -> None:
    cm = np.zeros((30, 12, 12), np.uint8)
    cm[0:20, 0:10, 0:10] = CHANGE_PERSISTENT  # 2000 voxels = 2.0 mL at 1 mm
    cm[20:25, 0:10, 0:10] = CHANGE_NEW        # +500 voxels: 2.5 mL, exactly +25 % (and exactly 0.5 mL)
    t = lesion_tracks(cm, None, (1.0, 1.0, 1.0))
    assert (t.iloc[0]["baseline_ml"], t.iloc[0]["followup_ml"]) == (2.0, 2.5)
    # the texts (README, page, PDF): "larger / smaller (by more than 25 % and at least 0.5 mL)"
    assert t.iloc[0]["status"] == "stable"


# --- store helpers ----------------------------------------------------------------------------------
def _store_synthetic(store, key: str, infected: list[bool], shape=(16, 48, 48)) -> list[str]:  # noqa: ANN001
    """Scans of the synthetic series; ``infected[t]`` False: the same scan with no infection."""
    from covidtrack.report import synthetic
    from covidtrack.segment.types import Segmentation
    from covidtrack.volume import ScanMeta, Volume
    from test_register import _store_scan  # the store-flow tests' helper (tests/ is on the path)

    series = synthetic.aligned_series(len(infected), shape, seed=0)
    ids = []
    for t, inf in enumerate(infected):
        date = dt.date.fromisoformat(series.dates[t])
        vol = Volume(array=series.ct[t], spacing=series.spacing, meta=ScanMeta(patient_key=key, study_date=date, source_format="phantom"))
        infection = series.infection[t] if inf else np.zeros_like(series.infection[t])
        ids.append(_store_scan(store, key, date, vol, Segmentation(lungs=series.lungs[t], infection=infection, lobes=series.lobes[t])))
    return ids


# --- 3. a baseline whose lobes file is missing: the viewer copes, the lesion table crashes ----------
def test_missing_baseline_lobes_file_does_not_break_the_report(covidtrack_home: Path) -> None:
    from covidtrack import longitudinal
    from covidtrack.report import load
    from covidtrack.store import Store

    with Store.open() as store:
        ids = _store_synthetic(store, "P1", [True, True])
        res = longitudinal.register_followup(store, ids[1])
        assert res is not None and res.ok
        lobes_path = store.segmentation(ids[0], "active").lobes_path
        Path(lobes_path).unlink()  # lost/removed file: aligned_series logs it and shows the scan without overlay
        load.aligned_series(store, "P1")  # copes
        assert len(load.change_table(store, "P1"))  # copes (rows in the store)
        data = load.patient_report_data(store, "P1")  # Patient page section and PDF: StoreError here
    assert len(data.lesions)  # the tracks need no lobes (lesion_tracks accepts lobes=None)


# --- 4. a current follow-up without any lesion vanishes from the per-follow-up counts --------------
def test_every_current_follow_up_gets_a_row_of_lesion_counts(covidtrack_home: Path) -> None:
    """Baseline clear, follow-up 1 infected, follow-up 2 clear again. Both pairs are current and
    shown in the change summary, but the lesion counts (page and PDF: 'one row per follow-up')
    only list follow-up 1: a reader cannot tell 'no lesions' from 'not analysed'."""
    from covidtrack import longitudinal
    from covidtrack.longitudinal import CURRENT, pair_status
    from covidtrack.report import load
    from covidtrack.report.pdf import _lesion_counts_for_pdf
    from covidtrack.store import Store

    with Store.open() as store:
        ids = _store_synthetic(store, "P1", [False, True, False])
        for sid in ids[1:]:
            assert longitudinal.register_followup(store, sid).ok
        status = pair_status(store, "P1")
        assert [status[s] for s in ids[1:]] == [CURRENT, CURRENT]
        change = load.change_table(store, "P1")
        lesions = load.lesion_table(store, "P1")
    assert change["date"].nunique() == 2  # the change summary shows both follow-ups
    counts = _lesion_counts_for_pdf(lesions)
    assert len(counts) == 2, counts  # one row per follow-up (second: all zeros)
    assert (counts.iloc[1].drop("Follow-up") == "0").all()


def test_patient_page_survives_a_missing_baseline_lobes_file(covidtrack_home: Path) -> None:
    """The same on the dashboard: the viewer shows the baseline without overlay (logged), then the
    lesions section raises and the rest of the Patient page is replaced by the error."""
    pytest.importorskip("streamlit")
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from covidtrack import longitudinal
    from covidtrack.store import Store

    st.cache_resource.clear()
    st.cache_data.clear()
    with Store.open() as store:
        ids = _store_synthetic(store, "P1", [True, True])
        assert longitudinal.register_followup(store, ids[1]).ok
        Path(store.segmentation(ids[0], "active").lobes_path).unlink()
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=60)
        at.query_params["patient"] = "P1"
        at.run()
        at.switch_page("covidtrack/ui/pages/patient.py")
        at.run()
        subheaders = [h.value for h in at.subheader]
        # app.py turns the exception into st.error and stops the page: the lesions section, the
        # metrics table and the CSV download are gone
        assert not at.error and "Metrics per date" in subheaders, ([e.value for e in at.error], subheaders)
    finally:
        st.cache_resource.clear()
