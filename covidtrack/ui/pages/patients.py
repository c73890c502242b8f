"""Patients: a searchable list (alias or pseudonymous key, arm, scans, dates, latest POI and
severity, trend); selecting a row opens the patient's timeline."""

from __future__ import annotations

import streamlit as st

from covidtrack.ui import resources, widgets


def main() -> None:
    st.title("Patients")
    table = resources.summary(resources.revision())
    if table.empty:
        widgets.empty_store()
        return
    query = st.text_input("Search", placeholder="alias, key or arm", key="patients_search")
    arms = sorted(table["arm"].dropna().unique())
    known = st.session_state.get("patients_arms_known")
    if known is not None and "patients_arms" in st.session_state:
        # an arm that appeared since (an import, another process) is shown, not silently filtered out;
        # an arm the user deselected stays deselected
        new = [a for a in arms if a not in known]
        st.session_state["patients_arms"] = [a for a in st.session_state["patients_arms"] if a in arms] + new
    st.session_state["patients_arms_known"] = arms
    chosen_arms = st.multiselect("Arms", arms, default=arms, key="patients_arms")
    shown = table[table["arm"].isin(chosen_arms)]
    if query:
        q = query.strip().lower()
        hit = shown["label"].str.lower().str.contains(q, regex=False) | shown["patient_key"].str.lower().str.contains(q, regex=False)
        shown = shown[hit | shown["arm"].str.lower().str.contains(q, regex=False)]
    c1, c2, c3 = st.columns(3)
    c1.metric("Patients", len(shown))
    c2.metric("Scans", int(shown["scans"].sum()))
    worse = int(shown["trend"].astype(str).str.startswith("↑").sum())
    c3.metric("Worse since previous scan", worse)
    st.caption("Select a row to open the patient's timeline. Trend compares the last two scans (±1 POI point); "
               "⚠ checks counts the quality notes shown on the patient's page.")
    event = st.dataframe(
        shown.rename(columns={"label": "patient"}),
        hide_index=True,
        width="stretch",
        on_select="rerun",
        selection_mode="single-row",
        key="patients_table",
        column_order=("patient", "arm", "scans", "first", "last", "latest POI %", "latest score", "trend", "checks", "patient_key"),
        column_config={
            "latest POI %": st.column_config.ProgressColumn("latest POI %", min_value=0.0, max_value=100.0, format="%.1f %%"),
            "latest score": st.column_config.NumberColumn("severity /25", format="%d"),
            "checks": st.column_config.NumberColumn("⚠ checks", format="%d", help="quality notes to read on the patient's "
                                                    "page before trusting the numbers (coarse pixels, cut-off lungs, ...)"),
            "patient_key": st.column_config.TextColumn("pseudonymous key", width="medium"),
            "first": st.column_config.DateColumn("first scan"),
            "last": st.column_config.DateColumn("last scan"),
        },
    )
    rows = event.selection.rows if event is not None and hasattr(event, "selection") else []
    if rows:
        widgets.open_patient(str(shown.iloc[rows[0]]["patient_key"]))
    widgets.disclaimer()


main()
