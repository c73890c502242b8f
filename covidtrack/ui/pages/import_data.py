"""Import: upload a zipped DICOM folder or a NIfTI/NRRD/MHA file, or name a server-side folder or
manifest; the pipeline's progress events drive a progress bar; bad files show their error and
nothing of them is stored (the pipeline commits one scan per transaction)."""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import streamlit as st

from covidtrack.config import settings
from covidtrack.errors import CovidtrackError
from covidtrack.events import Progress
from covidtrack.longitudinal import isolated_registration
from covidtrack.ui import resources, uploads, widgets


def _run(events: Generator[Progress, None, Any], label: str) -> Any:
    """Drive a pipeline generator with a progress bar and an event log; return its result.

    The registration's ANTs part runs in a child process (other sessions' pages stay responsive),
    and a run interrupted by a click closes the pipeline, whose worker thread (segmentation,
    registration) then finishes before the run releases the store."""
    bar = st.progress(0.0, text=f"{label}: starting")
    log = st.empty()
    lines: list[str] = []
    fraction = 0.0
    with isolated_registration():
        try:
            while True:
                try:
                    ev = next(events)
                except StopIteration as stop:
                    bar.progress(1.0, text=f"{label}: done")
                    return stop.value
                except CovidtrackError:
                    bar.progress(fraction, text=f"{label}: failed (nothing was stored)")
                    raise
                fraction = min(1.0, ev.fraction)
                bar.progress(fraction, text=f"{label} · {ev.stage}: {ev.message}"[:200])
                if ev.stage in ("failed", "done", "summary") or (not lines or not lines[-1].startswith(ev.stage)):
                    lines.append(f"{ev.stage}: {ev.message}")
                    log.code("\n".join(lines[-12:]), language=None)
        finally:
            events.close()


def _fields(prefix: str) -> tuple[str, str, dt.date | None, str]:
    c1, c2 = st.columns(2)
    patient = c1.text_input("Patient ID", key=f"{prefix}_patient", help="Pseudonymised (salted hash) before it is stored; the raw ID is never kept.")
    alias = c2.text_input("Alias shown in the dashboard (optional)", key=f"{prefix}_alias", max_chars=40, help="e.g. a study number; never a name")
    c3, c4 = st.columns(2)
    # an old scan stored under today's date would distort every trajectory: the file's date by default
    use_file_date = c3.checkbox("Use the study date in the file", value=True, key=f"{prefix}_filedate",
                                help="DICOM files carry it; NIfTI / NRRD / MHA files do not: untick and enter it")
    date = None if use_file_date else c3.date_input("Study date", value=None, key=f"{prefix}_date", max_value=dt.date.today())
    arm = c4.text_input("Arm / group (optional)", key=f"{prefix}_arm")
    return patient, alias, date, arm


def _take_acceptance(prefix: str) -> None:
    """Import button callback: an acceptance is for this one import. The tick is captured for
    the run that imports and the box is cleared (a callback may reset a widget's state)."""
    st.session_state[f"{prefix}_accepted_now"] = bool(st.session_state.get(f"{prefix}_accept", False))
    st.session_state[f"{prefix}_accept"] = False


def _accepted(prefix: str) -> bool:
    return bool(st.session_state.pop(f"{prefix}_accepted_now", False))


def _accept_other_id(prefix: str) -> bool:
    return st.checkbox(
        "Accept a different DICOM identity", value=False, key=f"{prefix}_accept",
        help="A scan whose DICOM patient ID or sex differs from this patient's other scans (or matches another "
             "patient's) is refused: it may be someone else's. Tick only when you know it is this patient's "
             "(records merged, ID corrected); the scan is then stored and flagged on the patient page and in the report.",
    )


def _warnings(results: Any) -> None:
    for result in results:
        for w in result.warnings:
            st.warning(w)


def _not_imported(err: CovidtrackError, scratch: Path | None = None, shown_as: str = "") -> None:
    """The error, with server scratch paths replaced by what the user uploaded, and the date
    hint worded for this page."""
    text = str(err)
    if scratch is not None:
        # a zip is unpacked into scratch/unpacked, a file saved as scratch/<name>
        text = text.replace(str(scratch / "unpacked"), shown_as).replace(str(scratch) + "/", "").replace(str(scratch), shown_as)
    if "no study date given" in text:
        text += " (here: untick 'Use the study date in the file' and enter the date)"
    st.error(f"Not imported: {text}")


def _needs_date(use_file_date_key: str, date: dt.date | None) -> bool:
    if date is None and not st.session_state.get(use_file_date_key, True):
        st.error("Enter the study date, or tick 'Use the study date in the file'.")
        return True
    return False


def _upload_tab() -> None:
    limit = uploads.MAX_UPLOAD_BYTES // uploads.MB
    file = st.file_uploader(
        f"A zipped DICOM folder, or a NIfTI / NRRD / MHA file (at most {limit} MB)",
        type=["zip", "nii", "gz", "nrrd", "mha"], key="upload_file", max_upload_size=limit,
    )
    patient, alias, date, arm = _fields("up")
    _accept_other_id("up")
    if st.button("Import upload", type="primary", key="import_upload", disabled=file is None, on_click=_take_acceptance, args=("up",)):
        accept = _accepted("up")
        if not patient.strip():
            st.error("Enter the patient ID (it is pseudonymised before storing).")
            return
        if _needs_date("up_filedate", date):
            return
        scratch = settings().work_dir / f"upload-{uuid.uuid4().hex[:8]}"
        try:
            source = uploads.prepare_upload(file.name, file, scratch)
            from covidtrack import pipeline

            result = _run(
                pipeline.ingest(source, patient, date, arm=arm or None, alias=alias or None, store=resources.store(),
                                accept_other_id=accept),
                uploads.safe_name(file.name),
            )
            resources.invalidate()
            st.success(("Stored" if result.created else "Already stored") + f" as scan {result.scan_id}.")
            _warnings([result])
            st.session_state[widgets.PATIENT_STATE] = result.patient_key
            st.session_state.pop("patient_select", None)
            st.page_link(widgets.PAGES["patient"], label="Open this patient", icon=":material/timeline:")
        except CovidtrackError as err:
            _not_imported(err, scratch, uploads.safe_name(file.name))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # the store keeps its own canonical copy


def _server_tab() -> None:
    st.caption("A DICOM folder or image file on this server, or a manifest CSV with columns patient, date, path[, arm, alias, series_uid].")
    path = st.text_input("Server path", key="server_path", placeholder="/data/ct/patient01/2020-03-14 or /data/manifest.csv")
    is_manifest = path.lower().endswith(".csv")
    if not is_manifest:
        patient, alias, date, arm = _fields("srv")
    _accept_other_id("srv")
    if st.button("Import from server", type="primary", key="import_server", disabled=not path, on_click=_take_acceptance, args=("srv",)):
        accept = _accepted("srv")
        from covidtrack import pipeline

        p = Path(path).expanduser()
        try:
            uploads.check_server_path(p)
            if is_manifest:
                summary = _run(pipeline.ingest_manifest(p, store=resources.store(), accept_other_id=accept), p.name)
                resources.invalidate()
                text = f"{len(summary.ok)} scan(s) ok, {len(summary.failed)} failed."
                (st.success if not summary.failed else st.error if not summary.ok else st.warning)(text)
                for _, msg in summary.failed:
                    st.error(msg)  # the message names the manifest line and the file
                _warnings(summary.ok)
            else:
                if not patient.strip():
                    st.error("Enter the patient ID (it is pseudonymised before storing).")
                    return
                if _needs_date("srv_filedate", date):
                    return
                result = _run(pipeline.ingest(p, patient, date, arm=arm or None, alias=alias or None, store=resources.store(),
                                              accept_other_id=accept), p.name)
                resources.invalidate()
                st.success(("Stored" if result.created else "Already stored") + f" as scan {result.scan_id}.")
                _warnings([result])
        except CovidtrackError as err:
            _not_imported(err)


def main() -> None:
    st.title("Import")
    st.write("Each scan is loaded, checked, segmented, measured and stored in one step; a follow-up is registered to the "
             "patient's baseline. A file that fails shows why, and nothing of it is stored.")
    from covidtrack.config import DEFAULT_SALT_WARNING, settings

    if settings().salt_is_default:
        st.warning(DEFAULT_SALT_WARNING + " Restart the dashboard with it set.", icon=":material/key:")
    up, srv = st.tabs(["Upload", "Server folder or manifest"])
    with up:
        _upload_tab()
    with srv:
        _server_tab()


main()
