"""Patient timeline: trajectories, lobe heatmap, the aligned follow-up viewer with change map,
and the per-date metrics table (CSV download)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from covidtrack.report import figures
from covidtrack.report.viewer import LOBE_LEGEND
from covidtrack.report.data import LOBES, M, flag_lines, metric_label, poi_text, select, wide_by_date
from covidtrack.ui import jobs, resources, widgets

# Columns of the on-screen table (the CSV download has every metric).
TABLE_METRICS = (M.POI, M.POI_GGO, M.POI_CONS, M.INFECTION_ML, M.GGO_ML, M.CONS_ML, M.LUNG_ML, M.SEVERITY, M.MEAN_HU, M.LESIONS)

PLOTLY_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def _lesions(key: str, rev: object) -> None:
    """Lesions vs baseline per follow-up: counts by status, and every lesion in an expander."""
    from covidtrack.change import lesion_count_rows

    table = resources.lesions(key, rev)
    pairs = table.attrs.get("pairs", [])
    if not pairs:
        return
    st.subheader("Lesions vs baseline")
    st.dataframe(lesion_count_rows(table, pairs), hide_index=True, width="stretch", key="lesion_counts")
    st.caption("Each lesion (a connected piece of infection of at least 0.1 mL) followed from the baseline to the "
               "follow-up registered onto it: new, resolved, or still there and larger / smaller (by more than 25 % "
               "and at least 0.5 mL) / stable; 'partly not imaged' when the follow-up did not cover all of it. Lesions "
               "that merged or split are one track. In brackets: how many are at least 1 mL (the smallest new ones are "
               "often specks of the model's noise at one date). 'slice' is the baseline axial slice through the "
               "lesion, as in the aligned viewer.")
    with st.expander(f"Every lesion ({len(table)})"):
        st.dataframe(table.drop(columns=["scan_id"]), hide_index=True, width="stretch", key="lesion_table",
                     column_config={"baseline_ml": st.column_config.NumberColumn("baseline mL", format="%.2f"),
                                    "followup_ml": st.column_config.NumberColumn("follow-up mL", format="%.2f"),
                                    "change_ml": st.column_config.NumberColumn("change mL", format="%+.2f")})


def _delta(value: float, unit: str, fmt: str = "+.1f") -> str | None:
    text = f"{value:{fmt}}"
    # "-0.0" or "+0" is no change: show no arrow rather than a misleading direction
    return None if float(text) == 0 else f"{text} {unit} vs baseline".replace("  ", " ")


def _tiles(frame: pd.DataFrame) -> None:
    poi = select(frame, M.POI).drop_duplicates("study_date")["value"].to_numpy()
    inf = select(frame, M.INFECTION_ML).drop_duplicates("study_date")["value"].to_numpy()
    sev = select(frame, M.SEVERITY).drop_duplicates("study_date")["value"].to_numpy()
    cols = st.columns(4)
    if len(poi):
        last = f"{poi[-1]:.1f} %" if np.isfinite(poi[-1]) else "–"
        change = _delta(poi[-1] - poi[0], "pts") if np.isfinite(poi[-1]) and np.isfinite(poi[0]) else None
        cols[0].metric("Latest POI", last, change, delta_color="inverse")
    if len(inf):
        cols[1].metric("Infection volume", f"{inf[-1]:.0f} mL", _delta(inf[-1] - inf[0], "mL", "+.0f"), delta_color="inverse")
    if len(sev):
        # a scan without a total (a lobe missing from the lobe map) is "not scored", not nan
        last = f"{sev[-1]:.0f} / 25" if np.isfinite(sev[-1]) else "not scored"
        change = _delta(sev[-1] - sev[0], "", "+.0f") if np.isfinite(sev[-1]) and np.isfinite(sev[0]) else None
        cols[2].metric("Severity score", last, change, delta_color="inverse")
    if np.isfinite(poi).any():
        cols[3].metric("Peak POI", f"{np.nanmax(poi):.1f} %")


def _alias_editor(patient_key: str, label: str) -> None:
    with st.sidebar.expander("Alias"):
        st.caption("A label you choose (e.g. bed number). Never type a name or a hospital ID.")
        new = st.text_input("Alias", value="" if label == patient_key else label, key=f"alias_{patient_key}", max_chars=40)
        if st.button("Save alias", key="save_alias"):
            resources.store().set_patient(patient_key, alias=new.strip() or None)
            resources.invalidate()
            st.rerun()


@st.cache_data(show_spinner=False, max_entries=64)
def _viewer_fig(patient_key: str, rev: resources.Revision, plane: str, index: int, overlay: str) -> go.Figure:
    """Side-by-side figure, cached per slice: moving back to a slice costs no re-encoding."""
    return figures.viewer_figure(resources.aligned(patient_key, rev), plane, index, overlay)  # type: ignore[arg-type]


@st.cache_data(show_spinner=False, max_entries=16)
def _animation_fig(patient_key: str, rev: resources.Revision, plane: str, index: int, overlay: str) -> go.Figure:
    return figures.viewer_animation(resources.aligned(patient_key, rev), plane, index, overlay)  # type: ignore[arg-type]


@st.cache_data(show_spinner=False, max_entries=32)
def _trajectory_figs(patient_key: str, rev: resources.Revision, x: str, lobe_view: bool) -> tuple[go.Figure, go.Figure | None]:
    frame = resources.patient(patient_key, rev)
    heat = figures.lobe_heatmap(frame, x=x) if lobe_view and frame["region"].isin(LOBES).any() else None  # type: ignore[arg-type]
    return figures.trajectory_figure(frame, x=x, lobe_view=lobe_view), heat  # type: ignore[arg-type]


def _viewer(patient_key: str, rev: resources.Revision, lobe_view: bool) -> None:
    st.subheader("Aligned follow-up viewer")
    series = resources.aligned(patient_key, rev)
    c1, c2, c3 = st.columns([1, 2, 3])
    plane = c1.radio("Plane", ["axial", "coronal"], horizontal=True, key="viewer_plane")
    overlay_names = {"infection + lobes" if lobe_view else "infection + lungs": "lobes" if lobe_view else "regions", "change vs baseline": "change", "CT only": "none"}
    overlay = overlay_names[c2.radio("Overlay", list(overlay_names), horizontal=True, key="viewer_overlay")]
    n = series.n_slices(plane)
    default = series.key_slice(plane)
    step_mm = series.spacing[0] if plane == "axial" else series.spacing[1]
    index = c3.slider(f"Baseline {plane} slice (0-{n - 1}, {step_mm:.3g} mm apart; "
                      + ("0 = feet end)" if plane == "axial" else "0 = front)"), 0, n - 1, default, key=f"viewer_slice_{plane}")
    if not all(series.registered):
        st.warning("Some follow-ups have no usable registration yet; they are shown resized, not anatomically aligned.")
    legend = {"lobes": f"GGO amber, consolidation red; {LOBE_LEGEND}.", "regions": "GGO amber, consolidation red; right lung blue, left lung green.",
              "change": "New infection red, resolved green, persistent amber (vs the baseline); the baseline panel shows "
                        "its own infection, the reference, in violet.", "none": ""}[overlay]
    st.plotly_chart(_viewer_fig(patient_key, rev, plane, index, overlay), key="viewer", config=PLOTLY_CONFIG, width="stretch")
    if legend:
        st.caption(legend)
    # opt-in: the animation sends every date's image again, larger; most visits do not need it
    if st.toggle("Follow-up sequence: play through the dates", key="viewer_play"):
        st.plotly_chart(_animation_fig(patient_key, rev, plane, index, overlay), key="viewer_animation", config=PLOTLY_CONFIG, width="content")


def _change_notes(key: str, rev: resources.Revision, notes: list[str]) -> None:
    """Which follow-ups have no change vs baseline shown, and a button that registers them in the
    background (the same as ``python -m covidtrack register``, without leaving the page)."""
    from covidtrack import longitudinal

    st.info("\n".join(f"- {line}" for line in notes))
    fixable = {longitudinal.STALE, longitudinal.MISSING} & set(resources.pair_status(key, rev).values())
    queue = resources.jobs()
    if fixable and st.button("Update the change vs baseline now", key="register_now", disabled=queue.busy(key),
                             help="Registers the listed follow-ups to the baseline in the background (one registration "
                                  "each; 7-23 s per pair on an idle 2-core machine in bench/results/register.json)."):
        queue.submit(key, "requested on this page", lambda store: jobs.register_patient(store, key))
        st.rerun()


def main() -> None:
    rev = resources.revision()
    summary = resources.summary(rev)
    if summary.empty:
        st.title("Patient timeline")
        widgets.empty_store()
        return
    key = widgets.current_patient(summary)
    if key is None:
        st.title("Patient timeline")
        return
    row = summary[summary["patient_key"] == key].iloc[0]
    frame = resources.patient(key, rev)
    st.title(f"Patient {row['label']}")
    dates = sorted(pd.to_datetime(frame["study_date"]).dt.date.unique()) if len(frame) else []
    versions = ", ".join(sorted(frame["model_version"].dropna().unique())) if len(frame) else "–"
    st.caption(
        f"Key `{key}` · arm **{row['arm']}** · {row['scans']} scan{'' if row['scans'] == 1 else 's'}"
        + ((f" from {dates[0]} to {dates[-1]}" if len(dates) > 1 else f" on {dates[0]}") if dates else "")
        + f" · models: {versions}"
    )
    _alias_editor(key, str(row["label"]))
    x = "date" if st.sidebar.radio("Time axis", ["study date", "days since baseline"], key="x_axis") == "study date" else "day"
    lobe_view = st.sidebar.radio("Regions", ["5-lobe view", "4-region view"], key="region_view") == "5-lobe view"
    if frame.empty:
        st.info("No metrics for this patient yet.")
        return
    _tiles(frame)
    flags = flag_lines(frame)
    if flags:
        st.warning("Check before reading these numbers:\n" + "\n".join(f"- {line}" for line in flags))
    st.subheader("Trajectories")
    trajectory, heatmap = _trajectory_figs(key, rev, x, lobe_view)
    st.plotly_chart(trajectory, key="trajectory", config=PLOTLY_CONFIG, width="stretch")
    if heatmap is not None:
        st.plotly_chart(heatmap, key="lobe_heatmap", config=PLOTLY_CONFIG, width="stretch")
    widgets.background_jobs(key)
    notes = resources.change_notes(key, rev)
    if notes:
        _change_notes(key, rev, notes)
    _viewer(key, rev, lobe_view)
    change = resources.change(key, rev)
    if len(change):
        st.plotly_chart(figures.change_bar_figure(change), key="change_bars", config=PLOTLY_CONFIG, width="stretch")
    _lesions(key, rev)
    st.subheader("Metrics per date")
    table = wide_by_date(frame)
    if not lobe_view:
        table = table[~table["region"].isin(LOBES)]
    shown = [c for c in ("study_date", "day", "region", *TABLE_METRICS) if c in table.columns]
    view = table[shown].copy()
    if M.POI in view:  # the shared POI wording: never reads as the next severity band (4.96, not 5.00)
        view[M.POI] = [poi_text(v, unit=False) for v in view[M.POI]]
    whole = {M.SEVERITY, M.LESIONS}
    st.dataframe(
        view.rename(columns={"study_date": "Study date", "day": "Day", **{m: metric_label(m) for m in TABLE_METRICS}}),
        hide_index=True, width="stretch", key="metrics_table",
        column_config={metric_label(m): (st.column_config.TextColumn() if m == M.POI else
                                         st.column_config.NumberColumn(format="%d" if m in whole else "%.2f"))
                       for m in TABLE_METRICS},
    )
    st.download_button(
        "Download CSV (all metrics)", table.to_csv(index=False).encode("utf-8"), file_name=f"covidtrack-{row['label']}-metrics.csv",
        mime="text/csv", key="download_csv",
    )
    widgets.disclaimer()


main()
