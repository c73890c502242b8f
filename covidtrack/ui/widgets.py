"""Small widgets shared by pages. Patients are shown by alias or pseudonymous key only."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from covidtrack.report.pdf import DISCLAIMER

PATIENT_STATE = "patient_key"
#: the Cohort page's date and baseline-severity filters (not widget state, which Streamlit drops
#: on other pages), so the Report page builds the cohort PDF of the same patients
COHORT_FILTERS = "cohort_filters"
PAGES = {
    "patients": "covidtrack/ui/pages/patients.py",
    "patient": "covidtrack/ui/pages/patient.py",
    "cohort": "covidtrack/ui/pages/cohort.py",
    "import": "covidtrack/ui/pages/import_data.py",
    "report": "covidtrack/ui/pages/report.py",
}


def default_arms(arms: list[str]) -> list[str]:
    """Arms preselected for a comparison (:func:`covidtrack.report.data.default_arms`)."""
    from covidtrack.report.data import default_arms as preselected

    return preselected(arms)


def disclaimer() -> None:
    st.caption(DISCLAIMER)


def empty_store() -> None:
    st.info("The store holds no patients yet. Import a scan on the **Import** page.")
    st.page_link(PAGES["import"], label="Go to Import", icon=":material/upload:")


def current_patient(summary: pd.DataFrame, sidebar: bool = True) -> str | None:
    """The patient to show: ``?patient=KEY`` in the URL, else the last one opened, else the first.

    A selectbox (alias / key labels) lets the user switch; the choice is mirrored to the URL so a
    link opens the same patient (the key is pseudonymous, so the URL carries no identity).
    """
    if summary.empty:
        return None
    keys = summary["patient_key"].tolist()
    labels = dict(zip(summary["patient_key"], summary["label"]))
    linked = st.query_params.get("patient")
    where = st.sidebar if sidebar else st
    if linked and linked not in keys and st.session_state.get("patient_select") is None:
        # a stale or cut-short link must never open somebody else's record
        st.error(f"No patient with key `{linked}` in this store: the link may be old or cut short. "
                 "Choose a patient from the list.")
        index = None
    else:
        wanted = linked or st.session_state.get(PATIENT_STATE)
        index = keys.index(wanted) if wanted in keys else 0
    chosen = where.selectbox(
        "Patient", keys, index=index, format_func=lambda k: f"{labels[k]}" + ("" if labels[k] == k else f" · {k[:10]}"),
        key="patient_select", placeholder="choose a patient",
    )
    if chosen is None:
        return None
    st.session_state[PATIENT_STATE] = chosen
    if st.query_params.get("patient") != chosen:
        st.query_params["patient"] = chosen
    return chosen


def open_patient(patient_key: str) -> None:
    """Go to the patient page for ``patient_key``."""
    st.session_state[PATIENT_STATE] = patient_key
    st.session_state.pop("patient_select", None)  # let the page pick up the new patient
    st.switch_page(PAGES["patient"], query_params={"patient": patient_key})


RECENT_JOB_S = 120.0  # a finished background job is reported on its pages for this long


def background_jobs(patient_key: str | None = None) -> None:
    """Background updates of the change vs baseline (:mod:`covidtrack.ui.jobs`) of one patient, or
    of all when None: what finished in the last two minutes, and what is still running, watched
    every 2 s; when it finishes the page reruns once and shows the new numbers."""
    from covidtrack.ui import jobs, resources

    now = time.time()
    listed = resources.jobs().jobs(patient_key)
    for job in listed:
        if job.finished is not None and now - job.finished < RECENT_JOB_S:
            shown = st.success if job.state == jobs.DONE else st.error
            shown(f"Background update of the change vs baseline ({job.label}): {job.message}")
    if any(job.active for job in listed):
        _watch_jobs(patient_key)


@st.fragment(run_every=2.0)
def _watch_jobs(patient_key: str | None) -> None:
    from covidtrack.ui import resources

    running = [job for job in resources.jobs().jobs(patient_key) if job.active]
    if not running:
        st.rerun(scope="app")  # finished: the whole page again, with the new numbers
    for job in running:
        st.info(f"Updating the change vs baseline in the background ({job.label}): {job.state}. You can go on "
                "working; this page refreshes when it is done.")
