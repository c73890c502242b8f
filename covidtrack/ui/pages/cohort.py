"""Cohort: per-arm trajectories (mean, 95 % CI, patients faint), change from baseline at the last
follow-up with Mann-Whitney U and rank-biserial effect size, and the responders table."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from covidtrack.report import figures, stats
from covidtrack.report.data import M
from covidtrack.ui import resources, widgets

PLOTLY_CONFIG = {"displaylogo": False}
SAVED = "cohort_saved_choices"


@st.cache_data(show_spinner=False, max_entries=16)
def _filtered(rev: resources.Revision, arms: tuple[str, ...], dates: tuple[object, object] | None,
              sev: tuple[int, int] | None) -> pd.DataFrame:
    return stats.filter_cohort(resources.cohort(rev), list(arms), dates, sev)


def main() -> None:
    st.title("Cohort")
    rev = resources.revision()
    cohort = resources.cohort(rev)
    if cohort.empty:
        widgets.empty_store()
        return
    arms = sorted(cohort["arm"].dropna().unique())
    side = st.sidebar
    # widget state is dropped when another page is shown: the choices live on in SAVED
    saved = st.session_state.get(SAVED, {})
    chosen = side.multiselect("Arms", arms, default=[a for a in saved.get("arms", widgets.default_arms(arms)) if a in arms],
                              key="cohort_arms")
    first, last = cohort["study_date"].min().date(), cohort["study_date"].max().date()
    lo0, hi0 = saved.get("dates") or (first, last)
    lo0, hi0 = max(first, min(lo0, last)), min(last, max(hi0, first))
    dates = side.date_input("Baseline dates", (lo0, hi0), min_value=first, max_value=last, key="cohort_dates",
                            help="Patients whose first scan lies in this range (e.g. an enrolment period). They keep all "
                                 "their scans, so each patient's baseline stays the first scan.")
    lo, hi = (dates if isinstance(dates, (tuple, list)) and len(dates) == 2 else (first, last))
    sev = side.slider("Baseline severity score", 0, 25, saved.get("severity") or (0, 25), key="cohort_severity",
                      help="Total 0-25 score of each patient's first scan. At 0-25 nobody is left out, also not "
                           "patients whose first scan has no score (no lobes).")
    bin_days = side.slider("Day bin width (days)", 1, 7, 4, key="cohort_bin", help="Follow-ups fall on different days; means are taken per bin.")
    filters = {
        "dates": (lo, hi) if (lo, hi) != (first, last) else None,
        "severity": tuple(sev) if tuple(sev) != (0, 25) else None,
    }
    frame = _filtered(rev, tuple(chosen), filters["dates"], filters["severity"])
    st.session_state[widgets.COHORT_FILTERS] = filters
    st.session_state[SAVED] = {**filters, "arms": list(chosen)}
    if frame.empty:
        st.info("No patient matches these filters.")
        return
    counts = frame.groupby("arm")["patient_key"].nunique()
    cols = st.columns(max(1, len(counts)))
    for col, (arm, n) in zip(cols, counts.items()):
        col.metric(f"{arm}", f"{n} patient{'' if n == 1 else 's'}")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.cohort_trajectory_figure(frame, M.POI, bin_days=bin_days), key="cohort_poi", config=PLOTLY_CONFIG, width="stretch")
    c2.plotly_chart(figures.cohort_trajectory_figure(frame, M.INFECTION_ML, bin_days=bin_days), key="cohort_volume", config=PLOTLY_CONFIG, width="stretch")
    st.caption(f"Means per day bin; the 95 % CI band only where a bin holds at least {stats.MIN_CI_N} patients of the arm. "
               f"Hollow points: fewer than {stats.MIN_CI_N} patients (hover a point for n).")
    st.subheader("Change from baseline at the last follow-up")
    changes = stats.change_from_baseline(frame)
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(figures.change_box_figure(changes), key="cohort_change", config=PLOTLY_CONFIG, width="stretch")
    tests = stats.compare_arms(changes)
    with c2:
        if tests:
            st.markdown("**Mann-Whitney U (two-sided) on POI change**")
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "arms": f"{t.arm_a} vs {t.arm_b}", "n": f"{t.n_a} / {t.n_b}",
                            "median Δ (pp)": f"{t.median_a:+.2f} / {t.median_b:+.2f}",
                            "p": f"{t.p_value:.3g}" if t.p_value == t.p_value else "– (needs ≥ 2 per arm)",
                            "r": f"{t.rank_biserial:+.2f}" if t.rank_biserial == t.rank_biserial else "–",
                        }
                        for t in tests
                    ]
                ),
                hide_index=True, key="cohort_tests", width="stretch",
                column_config={"r": st.column_config.TextColumn("r", help="rank-biserial correlation")},
            )
            st.caption("r > 0: the first arm tends to have the larger (worse) change in POI; |r| 0.1 small, 0.3 medium, 0.5 large.")
        else:
            st.info("A test needs two arms with follow-ups.")
    resp = stats.responders(changes)
    st.subheader(f"Responders: POI fell by at least half ({len(resp)} of {len(changes)})")
    by_arm = changes.groupby("arm")["patient_key"].count().rename("with follow-up").to_frame()
    by_arm["responders"] = resp.groupby("arm")["patient_key"].count()
    by_arm["responders"] = by_arm["responders"].fillna(0).astype(int)
    by_arm["rate %"] = (100 * by_arm["responders"] / by_arm["with follow-up"]).round(1)
    st.dataframe(by_arm.reset_index(), hide_index=True, key="responder_rates")
    st.dataframe(
        resp.rename(columns={"label": "patient", "baseline": "baseline POI %", "last": "last POI %", "last_day": "day", "relative": "last / baseline"}),
        hide_index=True, width="stretch", key="responders",
        column_order=("patient", "arm", "baseline POI %", "last POI %", "day", "last / baseline"),
        column_config={c: st.column_config.NumberColumn(format="%.2f") for c in ("baseline POI %", "last POI %", "last / baseline")},
    )
    widgets.disclaimer()


main()
