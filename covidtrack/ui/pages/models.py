"""Models: infection model versions with their validation metrics; agreement of the model with the
reviewers on the corrected scans; fine-tune on the corrections in
a background process (progress polled from its status file); explicit promotion, rollback, and an
offer to re-segment stored scans with the newly active version."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from covidtrack import modelstore
from covidtrack.errors import CovidtrackError
from covidtrack.hitl import agreement, retrain
from covidtrack.ui import resources, widgets

TASK = retrain.TASK


def _fmt(v: object) -> str:
    return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{float(v):.3f}"  # type: ignore[arg-type]


@st.fragment(run_every=2.0)
def _job_panel() -> None:
    """Progress of the latest fine-tuning job, refreshed every 2 s while it runs."""
    job = retrain.latest_job()
    if job is None:
        return
    status = retrain.job_status(job.folder)
    state = status.get("state")
    if state in ("queued", "running"):
        st.progress(float(status.get("fraction", 0.0)), text=f"Fine-tuning ({job.run_id}): {status.get('message', '')}"[:180])
        if st.button("Cancel", key="models_cancel"):
            retrain.cancel(job)
            st.rerun()
    elif state == "done":
        if st.session_state.get("models_synced_job") != job.run_id:  # list the new version: rerun the whole page once
            st.session_state["models_synced_job"] = job.run_id
            st.rerun(scope="app")
        r = status.get("result", {})
        old, new = r.get("old", {}), r.get("new", {})
        reviewed = (f"reviewed hold-out ({r.get('reviewed_scans')} scan(s), {r.get('reviewed_slices')} slices) "
                    f"{_fmt(old.get('dice_reviewed'))} → {_fmt(new.get('dice_reviewed'))}, " if r.get("reviewed_slices") else "")
        st.success(f"Last run {job.run_id}: wrote {TASK}/{r.get('version')} from {r.get('base_version')} in {r.get('wall_s', 0):.0f} s "
                   f"on {r.get('slices')} corrected slices. Validation Dice {reviewed}real {_fmt(old.get('dice_real'))} → "
                   f"{_fmt(new.get('dice_real'))}, phantom {_fmt(old.get('dice_phantom'))} → "
                   f"{_fmt(new.get('dice_phantom'))}. Not active until you promote it.")
        if r.get("real_seen_by_base"):
            st.caption(f"The real validation slices were training data of {r.get('base_version')}, whose weights the new "
                       "version starts from: on them, both numbers show whether fine-tuning keeps what the model "
                       "learned, not how it does on unseen scans. The phantom slices are unseen by both.")
    elif state == "failed":
        st.error(f"Last run {job.run_id} failed: {status.get('error', '')[:1500]}")


def _agreement_section() -> None:
    """Local validation: the model's output against what the reviewers accepted (no inference)."""
    st.subheader("Agreement with your reviewers")
    table = resources.agreement(resources.revision())
    if table.empty:
        st.caption("No corrected scans yet. Once reviewers correct scans (Review page), this shows how far each "
                   "model version's output was from what they accepted: Dice, and the POI bias with its 95 % limits of agreement.")
        return
    summary = agreement.agreement_summary(table)
    st.dataframe(
        summary, hide_index=True, width="stretch", key="models_agreement_summary",
        column_config={
            "model_version": "model", "scans": "scans", "dice_mean": st.column_config.NumberColumn("Dice mean", format="%.3f"),
            "dice_median": st.column_config.NumberColumn("Dice median", format="%.3f"),
            "poi_abs_difference_mean": st.column_config.NumberColumn("mean |ΔPOI| (pp)", format="%.2f"),
            "poi_bias": st.column_config.NumberColumn("POI bias (pp)", format="%+.2f"),
            "poi_loa_low": st.column_config.NumberColumn("limit low (pp)", format="%+.2f"),
            "poi_loa_high": st.column_config.NumberColumn("limit high (pp)", format="%+.2f"),
            "severity_same_share": st.column_config.NumberColumn("same severity score", format="percent"),
            "minutes_median": st.column_config.NumberColumn("review minutes (median)", format="%.1f"),
        },
    )
    if table["poi_difference"].notna().sum() >= 2:
        st.plotly_chart(agreement.bland_altman_figure(table), key="models_agreement_plot")
    st.caption("Per corrected scan, the model segmentation the reviewer started from against the accepted correction. "
               "ΔPOI = model − reviewer (percentage points; negative: the model under-called). Corrected scans are the "
               "ones reviewers chose to fix, so expect them harder than average; scans of patients that trained a "
               "fine-tuned version are not unseen for it (held-out patients are marked).")
    with st.expander(f"Per scan ({len(table)})"):
        st.dataframe(table.drop(columns=["patient_key"]).assign(scan_id=table["scan_id"].str[:12]), hide_index=True,
                     width="stretch", key="models_agreement_table")


def _train_section() -> None:
    st.subheader("Fine-tune on the corrections")
    store = resources.store()
    train_rows, held_rows = retrain.split_corrections(store)
    n = len(train_rows)
    running = retrain.running_job() is not None
    c1, c2 = st.columns([1, 2])
    steps = c1.number_input("Optimiser steps", 20, 2000, retrain.RetrainConfig.iterations, step=10, key="models_steps")
    held = (f"{len(held_rows)} more, of {len({r['patient_key'] for r in held_rows})} held-out patient(s), are never trained on: "
            "they score each run on your own scans. " if held_rows else
            "No corrected scan is held out yet: about one corrected patient in five is kept for validation once another "
            "corrected patient remains to train on, so the first runs are scored on the shipped and phantom slices only. ")
    c2.caption(f"{n} corrected scan(s) to train on. {held}The active model is fine-tuned on their axial slices plus the "
               "original training slices, on the CPU in a background process; the result is a new version that is NOT "
               "active until you promote it.")
    if st.button("Start fine-tuning", type="primary", key="models_train", disabled=running or n == 0):
        try:
            job = retrain.start_retrain(store, retrain.RetrainConfig(iterations=int(steps)))
        except CovidtrackError as err:
            st.error(str(err))
        else:
            st.toast(f"started {job.run_id}")
            st.rerun()
    _job_panel()


def _promote_section(table: pd.DataFrame) -> None:
    st.subheader("Promote, roll back, re-segment")
    store = resources.store()
    candidates = list(table.loc[~table["active"], "version"]) if len(table) else []
    c1, c2 = st.columns(2)
    choice = c1.selectbox("Version", candidates, key="models_version", disabled=not candidates)
    if c1.button("Promote to active", key="models_promote", disabled=not candidates):
        try:
            ref = retrain.promote(store, choice)
        except CovidtrackError as err:
            st.error(str(err))
        else:
            resources.invalidate()
            st.session_state["models_offer_reseg"] = ref.name
            st.rerun()
    if c2.button("Roll back to the previous active version", key="models_rollback"):
        try:
            ref = retrain.rollback(store)
        except CovidtrackError as err:
            st.error(str(err))
        else:
            resources.invalidate()
            st.session_state["models_offer_reseg"] = ref.name
            st.rerun()
    offer = st.session_state.get("models_offer_reseg")
    if offer:
        n_scans = len(store.scans())
        st.info(f"{offer} is now active for new scans. Stored scans keep their numbers (each metric row names its model); "
                f"re-segment them to add numbers from {offer}.")
        if st.button(f"Re-segment the {n_scans} stored scan(s) with {offer}", key="models_reseg", disabled=n_scans == 0):
            bar = st.progress(0.0, text="re-segmenting")
            try:
                added = retrain.resegment(store, progress=lambda i, n, sid: bar.progress(i / n, text=f"{i}/{n}: {sid}"))
            except CovidtrackError as err:
                st.error(str(err))
            else:
                resources.invalidate()
                st.session_state.pop("models_offer_reseg", None)
                st.success(f"Added {len(added)} segmentation(s) with {offer}; earlier ones are kept.")


def main() -> None:
    st.title("Models")
    st.caption("Infection model versions. Versions are immutable folders; promotion is explicit and can be rolled back.")
    store = resources.store()
    try:
        retrain.sync_versions(store)
    except CovidtrackError as err:
        st.warning(str(err))
    table = retrain.versions_frame()
    if table.empty:
        st.info("No infection model installed yet. Train one with `python -m covidtrack train infection`.")
        return
    st.dataframe(
        table, hide_index=True, width="stretch", key="models_table",
        column_config={c: st.column_config.NumberColumn(format="%.3f") for c in table.columns if c.startswith("Dice")},
    )
    with st.expander("Model card"):
        version = st.selectbox("Version", list(table["version"]), index=int(table["active"].to_numpy().argmax()), key="models_card_version")
        ref = modelstore.get(TASK, version)
        md = ref.path / "MODEL_CARD.md"
        st.markdown(md.read_text() if md.exists() else f"```json\n{json.dumps(ref.card(), indent=2)[:6000]}\n```")
    _agreement_section()
    _train_section()
    _promote_section(table)
    widgets.disclaimer()


main()
