"""Cached resources of the dashboard.

The Store is opened on first use in each script run and closed when the run ends
(:func:`release`, called by ``app.py``): DuckDB lets one process write a file at a time, so a
dashboard that kept it open would lock the command line out for as long as it runs. Runs of
several sessions share one connection (:meth:`Store.open` counts them). Tables are cached with
``st.cache_data`` keyed by the store revision (row counts), so a new import, from the dashboard
or the command line, shows up on the next rerun while warm pages cost no queries. Aligned image
series are large, so they are cached as resources (no copy per rerun).
"""

from __future__ import annotations

import logging
import threading

import pandas as pd
import streamlit as st

from covidtrack.report import load
from covidtrack.ui.jobs import QUEUE, JobQueue
from covidtrack.report.data import NO_ARM, patient_summary
from covidtrack.report.viewer import AlignedSeries
from covidtrack.store import Store

Revision = tuple[int, ...]
log = logging.getLogger(__name__)


_RUN = threading.local()  # the store of the script run (or worker thread) on this thread
OPEN_WAIT_S = 2.0  # a page waits this long for another process's write, then says so (startup.gate)


def store() -> Store:
    """The store (``COVIDTRACK_HOME``) for this script run: opened (and migrated if needed) on
    first use, the same object for the rest of the run, closed by :func:`release`."""
    current = getattr(_RUN, "store", None)
    if current is None or current.closed:
        current = _RUN.store = Store.open(wait_s=OPEN_WAIT_S)
    return current


def release() -> None:
    """Close this thread's store (end of a script run, or of a worker thread's job), letting
    other processes write; the next :func:`store` call opens it again."""
    current = getattr(_RUN, "store", None)
    _RUN.store = None
    if current is not None:
        try:
            current.close()
        except Exception as err:  # noqa: BLE001 - runs in app.py's finally: never replace the page's own outcome
            log.warning("closing the store after a page run: %s", err)


def jobs() -> JobQueue:
    """The server's one queue of background jobs (:mod:`covidtrack.ui.jobs`)."""
    return QUEUE


def revision() -> Revision:
    """Changes whenever rows are added (a few count(*) queries: milliseconds)."""
    return load.store_revision(store())


@st.cache_data(show_spinner=False, max_entries=8)
def cohort(rev: Revision) -> pd.DataFrame:
    """The cohort frame (see covidtrack.report.data); ``rev`` is only the cache key."""
    del rev
    return load.cohort_frame(store())


@st.cache_data(show_spinner=False, max_entries=8)
def summary(rev: Revision) -> pd.DataFrame:
    """One row per patient for the Patients page, including patients without metrics yet."""
    table = patient_summary(cohort(rev))
    pats = store().patients()
    missing = pats[~pats["patient_key"].isin(table["patient_key"])]
    if len(missing):
        extra = pd.DataFrame(
            {
                "patient_key": missing["patient_key"],
                "label": [a if isinstance(a, str) and a else k for a, k in zip(missing["alias"], missing["patient_key"])],
                "arm": missing["arm"].fillna(NO_ARM),
                "scans": missing["n_scans"].astype(int),
                "first": pd.to_datetime(missing["first_date"]).dt.date,
                "last": pd.to_datetime(missing["last_date"]).dt.date,
                "trend": "·",
            }
        )
        table = pd.concat([table, extra], ignore_index=True)
    return table


@st.cache_data(show_spinner="Comparing the model with the reviewers' corrections ...", max_entries=4)
def agreement(rev: Revision) -> pd.DataFrame:
    """Model vs reviewers per corrected scan (:func:`covidtrack.hitl.agreement.agreement_table`:
    reads two masks per corrected scan, so it is cached per store revision)."""
    from covidtrack.hitl.agreement import agreement_table

    del rev
    return agreement_table(store())


@st.cache_data(show_spinner=False, max_entries=32)
def patient(patient_key: str, rev: Revision) -> pd.DataFrame:
    del rev
    return load.patient_frame(store(), patient_key)


@st.cache_data(show_spinner=False, max_entries=32)
def change(patient_key: str, rev: Revision) -> pd.DataFrame:
    return load.change_table(store(), patient_key, pair_status(patient_key, rev))


@st.cache_data(show_spinner=False, max_entries=32)
def lesions(patient_key: str, rev: Revision) -> pd.DataFrame:
    """Lesions tracked from the baseline to each current follow-up (:func:`covidtrack.report.load.lesion_table`)."""
    return load.lesion_table(store(), patient_key, pair_status(patient_key, rev))


@st.cache_data(show_spinner=False, max_entries=32)
def pair_status(patient_key: str, rev: Revision) -> dict[str, str]:
    """Each follow-up's change status (:func:`covidtrack.longitudinal.pair_status`)."""
    del rev
    from covidtrack.longitudinal import pair_status as status

    return status(store(), patient_key)


@st.cache_data(show_spinner=False, max_entries=32)
def change_notes(patient_key: str, rev: Revision) -> list[str]:
    """Follow-ups whose change is not shown, worded for the dashboard (no command-line fix)."""
    return load.change_notes(store(), patient_key, pair_status(patient_key, rev), with_fix=False)


@st.cache_resource(show_spinner="Aligning the follow-ups to the baseline ...", max_entries=6)
def aligned(patient_key: str, rev: Revision) -> AlignedSeries:
    """Every timepoint in baseline space (warping costs seconds; done once per patient and revision)."""
    return load.aligned_series(store(), patient_key, pair_status(patient_key, rev))


def invalidate() -> None:
    """Forget cached tables after this process wrote to the store (alias edits, imports)."""
    st.cache_data.clear()
    aligned.clear()
