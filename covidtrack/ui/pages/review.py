"""Review: the queue of scans to review (most uncertain first, or by date) and a per-slice editor
of the model's infection mask -- brush / erase, delete or accept a lesion with one click, region
growing in an HU range inside the lungs, relabel GGO <-> consolidation, undo -- plus the import of
a mask corrected in 3D Slicer / ITK-SNAP. Saving stores a NEW correction; the model output stays.

Clicks on the slice come from ``streamlit-image-coordinates`` (a small offline component); the
"Apply at" coordinate fields do the same without a mouse (and when the component is missing).
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import streamlit as st

from covidtrack.config import settings
from covidtrack.errors import CovidtrackError
from covidtrack.hitl import active, corrections, exporting, importing
from covidtrack.labels import CONSOLIDATION, GGO
from covidtrack.report.viewer import INFECTION_COLOURS, LOBE_COLOURS, LOBE_LEGEND
from covidtrack.segment.intensity import window_hu
from covidtrack.ui import jobs, resources, uploads, widgets

try:  # optional: without it the coordinate fields are the way to click
    from streamlit_image_coordinates import streamlit_image_coordinates
except ImportError:  # pragma: no cover - depends on the installation
    streamlit_image_coordinates = None

TOOLS = {
    "Paint GGO": "paint_ggo",
    "Paint consolidation": "paint_cons",
    "Erase": "erase",
    "Delete lesion (click)": "delete",
    "Accept model lesion (click)": "accept",
    "Region grow (click)": "grow",
    "Relabel GGO ↔ consolidation (click)": "relabel",
}
# the same colours as the patient viewer and the PDF (covidtrack.report.viewer)
GGO_RGB = np.array(INFECTION_COLOURS[1], np.float32)
CONS_RGB = np.array(INFECTION_COLOURS[2], np.float32)
LUNG_EDGE_RGB = np.array([60, 160, 255], np.float32)
#: Lobe outline colours: RUL, RML, RLL, LUL, LLL (labels.LOBE_LABELS).
LOBE_RGB = {lab: np.array(rgb, np.float32) for lab, rgb in LOBE_COLOURS.items()}
DISPLAY_PX = 560  # the slice is shown about this wide (integer nearest-neighbour zoom)
STATE = "hitl_review"


def render_slice(ct: np.ndarray, labels: np.ndarray, lungs: np.ndarray | None, zoom: int, alpha: float = 0.45,
                 lobes: np.ndarray | None = None) -> np.ndarray:
    """CT slice (HU) in the lung window with GGO (yellow) / consolidation (red), the lung outline
    (blue) or, with ``lobes``, each lobe's outline in its own colour; zoomed by an integer factor
    -> uint8 RGB."""
    from scipy import ndimage

    grey = (window_hu(ct) * 255.0)[..., None].repeat(3, axis=2)
    out = grey.copy()
    for lab, rgb in ((GGO, GGO_RGB), (CONSOLIDATION, CONS_RGB)):
        m = labels == lab
        out[m] = (1 - alpha) * grey[m] + alpha * rgb
    if lobes is not None and lobes.any():
        for lab, rgb in LOBE_RGB.items():
            m = lobes == lab
            out[m & ~ndimage.binary_erosion(m)] = rgb
    elif lungs is not None and lungs.any():
        edge = (lungs > 0) & ~ndimage.binary_erosion(lungs > 0)
        out[edge] = LUNG_EDGE_RGB
    img = np.clip(out, 0, 255).astype(np.uint8)
    return img.repeat(zoom, axis=0).repeat(zoom, axis=1) if zoom > 1 else img


def _state() -> dict[str, Any]:
    return st.session_state.setdefault(STATE, {})


def _open_scan(scan_id: str) -> dict[str, Any]:
    """The editing state of ``scan_id`` (loaded once per scan; switching scans drops the edits)."""
    state = _state()
    if state.get("scan_id") != scan_id:
        ct, lungs, lobes, infection, seg_id = corrections.load_for_review(resources.store(), scan_id)
        state.clear()
        state.update(scan_id=scan_id, ct=ct, lungs=lungs, lobes=lobes, seg_id=seg_id, session=corrections.EditSession(infection),
                     extra_seconds=0.0)
        zs = np.nonzero(infection.any(axis=(1, 2)))[0]
        lz = np.nonzero(lungs.any(axis=(1, 2)))[0]
        st.session_state["review_z"] = int(zs[len(zs) // 2]) if zs.size else int(lz[len(lz) // 2]) if lz.size else 0
    return state


def _queue() -> str | None:
    store = resources.store()
    st.sidebar.subheader("Review queue")
    order = st.sidebar.radio("Order", ["uncertainty (active learning)", "study date"], key="review_order")
    include = st.sidebar.checkbox("Include reviewed scans", value=False, key="review_include")
    try:
        from covidtrack import modelstore

        version = modelstore.active("infection").name
    except CovidtrackError:
        version = ""
    queue = active.review_queue(store, "score" if order.startswith("uncertainty") else "date", model_version=version or None,
                                include_reviewed=include)
    unscored = int(queue["score"].isna().sum()) if len(queue) else 0
    if version and unscored and st.sidebar.button(f"Score {unscored} unscored scan(s) with {version}", key="review_score"):
        bar = st.sidebar.progress(0.0, text="scoring")
        try:
            active.score_scans(store, list(queue.loc[queue["score"].isna(), "scan_id"]),
                               progress=lambda i, n, sid: bar.progress(i / n, text=f"scored {i}/{n}"))
        except CovidtrackError as err:
            st.sidebar.error(str(err))
        st.rerun()
    if queue.empty:
        st.info("Nothing to review: every stored scan has a correction." if len(store.scans()) else "No scans stored yet.")
        if not len(store.scans()):
            widgets.empty_store()
        return None
    if order.startswith("uncertainty") and unscored == len(queue):
        st.info(f"No scan in the queue has an uncertainty score yet, so this order means nothing: press **Score {unscored} "
                "unscored scan(s)** in the sidebar (one forward pass of the infection model per scan).")
    elif order.startswith("uncertainty") and unscored:
        st.caption(f"{unscored} scan(s) not scored yet are listed last.")
    shown = queue.assign(label=[a if isinstance(a, str) and a else k for a, k in zip(queue["alias"], queue["patient_key"])])
    st.dataframe(
        shown[["label", "study_date", "score", "n_corrections", "scan_id"]].rename(
            columns={"label": "patient", "score": "uncertainty (bits)", "n_corrections": "corrections"}),
        hide_index=True, width="stretch", key="review_queue", height=min(240, 38 + 35 * len(shown)),
        column_config={"uncertainty (bits)": st.column_config.NumberColumn(format="%.4f")},
    )
    ids = list(shown["scan_id"])
    labels = dict(zip(shown["scan_id"], shown["label"].astype(str) + " · " + shown["study_date"].astype(str)))
    current = _state().get("scan_id")
    return st.selectbox("Scan to review", ids, index=ids.index(current) if current in ids else 0,
                        format_func=lambda s: labels[s], key="review_scan")


def _apply(state: dict[str, Any], z: int, tool: str, point: tuple[int, int], end: tuple[int, int] | None, opts: dict[str, Any]) -> int:
    session: corrections.EditSession = state["session"]
    lung = state["lungs"][z] > 0
    if tool in ("paint_ggo", "paint_cons", "erase"):
        label = {"paint_ggo": GGO, "paint_cons": CONSOLIDATION, "erase": 0}[tool]
        return session.edit(z, corrections.brush, point, opts["radius"], label, allowed=lung if opts["lung_only"] else None, end=end, name=tool)
    if tool == "delete":
        return session.edit(z, corrections.delete_component, point, name=tool)
    if tool == "accept":
        return session.edit(z, corrections.accept_component, session.original[z], point, name=tool)
    if tool == "grow":
        return session.edit(z, corrections.region_grow, state["ct"][z], point, opts["grow_label"], opts["hu_range"],
                            allowed=lung, max_radius=opts["grow_radius"], name=tool)
    if tool == "relabel":
        return session.edit(z, corrections.relabel, point, name=tool)
    raise ValueError(tool)


def _navigation(state: dict[str, Any]) -> int:
    session: corrections.EditSession = state["session"]
    n = session.working.shape[0]
    infected = np.nonzero(session.working.any(axis=(1, 2)))[0]
    if "goto_z" in state:  # set by Undo below the slider (a widget's value can only change before it is drawn)
        st.session_state["review_z"] = int(state.pop("goto_z"))
    z = int(st.session_state.get("review_z", 0))
    c = st.columns([1, 1, 1, 1, 4])
    if c[0].button("◀ slice", key="review_prev"):
        z = max(0, z - 1)
    if c[1].button("slice ▶", key="review_next"):
        z = min(n - 1, z + 1)
    if c[2].button("◀ lesion", key="review_prev_lesion", disabled=not infected.size):
        before = infected[infected < z]
        z = int(before[-1]) if before.size else z
    if c[3].button("lesion ▶", key="review_next_lesion", disabled=not infected.size):
        after = infected[infected > z]
        z = int(after[0]) if after.size else z
    st.session_state["review_z"] = z
    return int(c[4].slider("Axial slice (feet → head)", 0, n - 1, key="review_z"))


def _editor(state: dict[str, Any]) -> None:
    session: corrections.EditSession = state["session"]
    left, right = st.columns([3, 1])
    with right:
        tool = TOOLS[st.radio("Tool", list(TOOLS), key="review_tool")]
        opts = {
            "radius": st.slider("Brush radius (px)", 1, 25, 4, key="review_radius"),
            "lung_only": st.checkbox("Paint inside the lungs only", value=True, key="review_lung_only",
                                     help="Untick to paint a lesion the lung mask left out (e.g. a consolidation at "
                                          "the pleura): on saving, it joins this correction's lung mask and the "
                                          "nearest lobe. Painting far from the lungs is refused."),
            "hu_range": st.slider("Region grow HU range", -1000, 200, (-750, 100), step=10, key="review_hu"),
            "grow_label": GGO if st.radio("Grow as", ["GGO", "consolidation"], horizontal=True, key="review_grow_label") == "GGO" else CONSOLIDATION,
            "grow_radius": float(st.slider("Grow at most (px from the click)", 5, 200, 60, key="review_grow_radius")),
        }
        show_lobes = st.checkbox("Show lobe outlines", value=state["lobes"] is not None, key="review_lobes",
                                 disabled=state["lobes"] is None)
        drag = tool in ("paint_ggo", "paint_cons", "erase") and st.checkbox("Drag to paint a stroke", value=False, key="review_drag")
    with left:
        z = _navigation(state)
        h, w = session.working.shape[1:]
        zoom = max(1, DISPLAY_PX // max(h, w))
        img = render_slice(state["ct"][z], session.working[z], state["lungs"][z], zoom,
                           lobes=state["lobes"][z] if show_lobes and state["lobes"] is not None else None)
        click = None
        if streamlit_image_coordinates is not None:
            click = streamlit_image_coordinates(img, key=f"review_img_{drag}", click_and_drag=drag)
        else:
            st.image(img, clamp=True)
        st.caption(f"slice {z}: GGO {int((session.working[z] == GGO).sum())} px, consolidation "
                   f"{int((session.working[z] == CONSOLIDATION).sum())} px · amber GGO, red consolidation; "
                   + (LOBE_LEGEND if show_lobes else "blue: lung outline"))
        # the component returns its last click on every rerun: apply each click once. Kept outside
        # the per-scan state, so discarding edits or opening another scan never replays a click.
        if click and click.get("unix_time") != st.session_state.get("review_last_click"):
            st.session_state["review_last_click"] = click.get("unix_time")
            sy, sx = h / click.get("height", h * zoom), w / click.get("width", w * zoom)
            if "x1" in click:
                point, end = (int(click["y1"] * sy), int(click["x1"] * sx)), (int(click["y2"] * sy), int(click["x2"] * sx))
            else:
                point, end = (int(click["y"] * sy), int(click["x"] * sx)), None
            if _apply(state, z, tool, point, end, opts):
                st.rerun()
        with st.expander("Apply at coordinates (keyboard)"):
            c1, c2, c3 = st.columns(3)
            y = c1.number_input("row y", 0, h - 1, h // 2, key="review_y")
            x = c2.number_input("column x", 0, w - 1, w // 2, key="review_x")
            if c3.button("Apply tool", key="review_apply"):
                changed = _apply(state, z, tool, (int(y), int(x)), None, opts)
                st.toast(f"{changed} px changed" if changed else "nothing changed at that point")
                st.rerun()


def _save_bar(state: dict[str, Any]) -> None:
    session: corrections.EditSession = state["session"]
    eff = session.effort()
    c = st.columns(5)
    c[0].metric("Active time", f"{eff.seconds + state['extra_seconds']:.0f} s")
    c[1].metric("Voxels changed", f"{eff.voxels_changed:,}")
    c[2].metric("Slices touched", eff.slices_touched)
    c[3].metric("Edits", eff.edits)
    if c[4].button("Undo", key="review_undo", disabled=not session.history):
        z = session.undo()
        if z is not None:
            state["goto_z"] = z
        st.rerun()
    name = st.text_input("Reviewer (name or initials)", key="review_author", max_chars=60)
    b1, b2 = st.columns(2)
    if b1.button("Save correction", type="primary", key="review_save"):
        try:
            effort = replace(eff, seconds=eff.seconds + state["extra_seconds"])
            cid, seg_id = corrections.save_correction(resources.store(), state["scan_id"], session.working, effort, name, state["seg_id"])
        except CovidtrackError as err:
            st.error(str(err))
        else:
            scan_id = state["scan_id"]
            resources.invalidate()
            _state().clear()
            # the change vs baseline of the affected follow-ups is redone in the background
            # (registration, 7-23 s per follow-up): the reviewer can go on to the next scan
            scans = resources.store().scans()
            key = str(scans.loc[scans["scan_id"] == scan_id, "patient_key"].iloc[0])
            resources.jobs().submit(key, f"correction of scan {scan_id}",
                                    lambda store, sid=scan_id: jobs.refresh_change(store, sid))
            st.session_state["review_saved"] = (f"Saved correction {cid} (segmentation {seg_id}); the model output is kept "
                                                "unchanged. The change vs baseline is being updated in the background.")
            st.rerun()
    if b2.button("Discard edits (back to the model output)", key="review_reset"):
        _state().clear()
        st.rerun()


def _export(state: dict[str, Any]) -> None:
    with st.expander("Open this scan in 3D Slicer / ITK-SNAP"):
        st.caption("The CT and the masks shown here as NIfTI on the scan's grid, with colour tables for both tools and a "
                   "README; no patient name, ID or date is in the files. Correct infection.nii.gz there and import it below.")
        store = resources.store()
        try:  # the zip belongs to the masks it was made from: a saved correction makes it outdated
            current = (state["scan_id"], store.segmentation(state["scan_id"], "active").seg_id)
        except CovidtrackError as err:
            st.error(str(err))
            return
        if st.button("Prepare the download", key="review_export"):
            try:
                st.session_state["review_export_zip"] = (current, exporting.export_zip(store, state["scan_id"]))
            except CovidtrackError as err:
                st.error(str(err))
        ready = st.session_state.get("review_export_zip")
        if ready and ready[0] != current:
            st.session_state.pop("review_export_zip", None)  # another scan, or masks saved since: prepare it again
            ready = None
        if ready:
            st.download_button(f"Download {state['scan_id']}.zip", ready[1], file_name=f"{state['scan_id']}.zip",
                               mime="application/zip", key="review_export_download")


def _import(state: dict[str, Any]) -> None:
    with st.expander("Import a mask corrected in 3D Slicer / ITK-SNAP (NIfTI)"):
        file = st.file_uploader("Label map on this scan (.nii / .nii.gz)", type=["nii", "gz"], key="review_upload")
        names = [*importing.INFECTION_TABLES, "binary", "custom"]
        table = st.selectbox("Label numbering", names, format_func=lambda n: f"{n}: {importing.TABLE_NOTES.get(n, 'VALUE=CLASS list')}",
                             key="review_table")
        mapping = st.text_input("Custom mapping", value="1=GGO,2=consolidation", key="review_mapping") if table == "custom" else ""
        minutes = st.number_input("Minutes spent in the other tool", 0.0, 600.0, 0.0, step=1.0, key="review_minutes")
        if st.button("Load into the editor", key="review_import", disabled=file is None):
            work = settings().work_dir / f"review-{uuid.uuid4().hex[:8]}"
            try:
                path = uploads.save_upload(file.name, file, work)
                from covidtrack.volume import Volume

                vol: Volume = resources.store().load_volume(state["scan_id"])
                labels = importing.import_corrected_mask(path, vol, importing.parse_mapping(mapping) if table == "custom" else table)
            except (CovidtrackError, ValueError) as err:
                st.error(str(err))
                return
            finally:
                shutil.rmtree(work, ignore_errors=True)
            session: corrections.EditSession = state["session"]
            for z in np.nonzero((labels != session.working).any(axis=(1, 2)))[0]:
                session.apply(int(z), labels[z], "import")
            state["extra_seconds"] = float(minutes) * 60.0
            st.success(f"Imported: {int((labels > 0).sum()):,} infected voxels. Review, then save.")


def main() -> None:
    st.title("Review and correct")
    st.caption("Correct the model's infection contours; every saved correction is a new record and a training sample "
               "for the next model version (Models page).")
    if "review_saved" in st.session_state:
        st.success(st.session_state.pop("review_saved"))
    widgets.background_jobs()
    scan_id = _queue()
    if scan_id is None:
        return
    try:
        state = _open_scan(scan_id)
    except CovidtrackError as err:
        st.error(str(err))
        return
    _editor(state)
    _save_bar(state)
    _export(state)
    _import(state)
    widgets.disclaimer()


main()
