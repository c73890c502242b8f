"""Report: trend-report PDFs for a patient or a cohort, built on demand and downloaded."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from covidtrack.config import settings
from covidtrack.errors import CovidtrackError
from covidtrack.report import load, pdf, stats
from covidtrack.ui import resources, uploads, widgets


def _offer(path_key: str, label: str) -> None:
    path = st.session_state.get(path_key)
    if path:
        try:
            data = open(path, "rb").read()
        except OSError:
            st.session_state.pop(path_key, None)
            return
        st.download_button(label, data, file_name=path.rsplit("/", 1)[-1], mime="application/pdf", key=f"dl_{path_key}", type="primary")


def main() -> None:
    st.title("Trend reports")
    rev = resources.revision()
    summary = resources.summary(rev)
    if summary.empty:
        widgets.empty_store()
        return
    out_dir = settings().reports_dir
    st.subheader("Patient report")
    st.caption("Header, trajectories, per-lobe table with severity scores, aligned images with overlays, change summary.")
    key = widgets.current_patient(summary, sidebar=False)
    label = str(summary.loc[summary.patient_key == key, "label"].iloc[0]) if key is not None else ""
    if key is not None and st.button("Build patient PDF", key="build_patient"):
        with st.spinner("Rendering the report ..."):
            try:
                data = load.patient_report_data(resources.store(), key)
                out = out_dir / f"covidtrack-{uploads.safe_name(label)}-{dt.date.today()}.pdf"
                st.session_state["patient_pdf"] = str(pdf.write_patient_pdf(data, out))
            except CovidtrackError as err:
                st.error(f"Report not built: {err}")
    _offer("patient_pdf", "Download patient PDF")

    st.divider()
    st.subheader("Cohort report")
    cohort = resources.cohort(rev)
    arms = sorted(cohort["arm"].dropna().unique())
    cohort_arms = st.session_state.get("cohort_saved_choices", {}).get("arms")  # the Cohort page's choice, if made
    default = [a for a in cohort_arms if a in arms] if cohort_arms else widgets.default_arms(arms)
    chosen = st.multiselect("Arms", arms, default=default, key="report_arms")
    # the Cohort page's baseline-date and baseline-severity filters apply here too, so the PDF shows
    # the same patients as the page
    kept = st.session_state.get(widgets.COHORT_FILTERS, {})
    date_range, severity = kept.get("dates"), kept.get("severity")
    filters = ", ".join(x for x in (f"baselines {date_range[0]} to {date_range[1]}" if date_range else "",
                                    f"baseline severity {severity[0]}-{severity[1]}" if severity else "") if x)
    if filters:
        cohort = stats.filter_cohort(cohort, None, date_range, severity)
    n = cohort[cohort["arm"].isin(chosen)]["patient_key"].nunique()
    st.caption((f"With the Cohort page's filters: {filters}. " if filters else "") + f"{n} patient{'' if n == 1 else 's'} in the chosen arms.")
    if st.button("Build cohort PDF", key="build_cohort", disabled=n == 0):
        with st.spinner("Rendering the report ..."):
            out = out_dir / f"covidtrack-cohort-{dt.date.today()}.pdf"
            st.session_state["cohort_pdf"] = str(pdf.write_cohort_pdf(cohort, out, arms=chosen, filters=filters))
    _offer("cohort_pdf", "Download cohort PDF")
    st.caption(f"PDFs are also kept under {out_dir.name}/ in the data folder. "
               "The command line does the same: `python -m covidtrack report --patient KEY --out FILE.pdf`.")
    widgets.disclaimer()


main()
