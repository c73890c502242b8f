"""First-start gate: on an empty store, build the demo cohort with a visible progress bar.

The build runs in ONE background thread per server process (a cached resource), so a browser
refresh or a second visitor watches the same job instead of starting another one; each session
polls the job's latest event and reruns until it is done, then the dashboard opens on the data.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import streamlit as st

from covidtrack import bootstrap
from covidtrack.errors import StoreBusyError, StoreError
from covidtrack.events import Progress
from covidtrack.longitudinal import isolated_registration
from covidtrack.ui import resources


log = logging.getLogger(__name__)
_RUNNING = threading.Event()
_JOB_STARTED = threading.Event()  # so sessions only look at a job that exists
BUSY_RETRY_S = 5.0  # the store is held by another process: seconds between tries


@dataclass
class BootstrapJob:
    """Mutable job state shared by sessions (read-only for them; the worker thread writes)."""

    latest: Progress = field(default_factory=lambda: Progress("demo", 0.0, "starting"))
    failures: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""
    done: bool = False
    started: float = field(default_factory=time.perf_counter)
    thread: threading.Thread | None = None

    aligning: str = ""  # background phase after the dashboard opened ("" when idle)

    def run(self) -> None:
        _RUNNING.set()
        try:
            # registration is most of the first start on 2 cores: open the dashboard first
            events = bootstrap.bootstrap(store=resources.store(), register=False)
            while True:
                try:
                    self.latest = next(events)
                except StopIteration as stop:
                    self.failures = list(stop.value.failed)
                    break
        except Exception as err:  # shown on the page with what to do; the app stays usable
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.done = True
            _RUNNING.clear()
        if self.error:
            resources.release()
        else:
            self._align()

    def _align(self) -> None:
        try:
            events = bootstrap.register_all(resources.store())
            with isolated_registration():  # ANTs in a child process: the open pages stay responsive
                while True:
                    try:
                        ev = next(events)
                    except StopIteration:
                        break
                    self.aligning = ev.message
            self.aligning = "caching aligned images"
            _warm_viewer_cache()
        except Exception as err:  # noqa: BLE001 - the dashboard works without alignment
            log.warning("background alignment stopped: %s", err)
        finally:
            self.aligning = ""
            resources.release()  # this worker thread's store: let other processes write again


def _warm_viewer_cache() -> None:
    """After the demo is built (the dashboard is already open), warp every patient's follow-ups
    into baseline space once, so opening a patient does not wait for ANTs (results go to the
    on-disk viewer cache). Best effort: a failure here only costs speed later."""
    from covidtrack.report import load

    store = resources.store()
    for key in store.patients()["patient_key"]:
        try:
            load.aligned_series(store, str(key))
        except Exception as err:  # noqa: BLE001 - the page warps again (and reports) if needed
            log.info("viewer cache warm-up skipped %s: %s", key, err)


@st.cache_resource(show_spinner=False)
def _job() -> BootstrapJob:
    _JOB_STARTED.set()
    job = BootstrapJob()
    job.thread = threading.Thread(target=job.run, name="covidtrack-demo-bootstrap", daemon=True)
    job.thread.start()
    return job


def gate() -> bool:
    """Show the bootstrap progress and return False while the demo is being built.

    Returns True when the dashboard can render (data present, demo disabled, or build finished).
    """
    try:
        store = resources.store()
    except StoreBusyError as err:  # another process is writing (e.g. a command-line import): wait for it
        st.title("covidtrack")
        st.info("The store is busy: another covidtrack process is writing to it (DuckDB allows one writer at a "
                f"time). This page tries again every {BUSY_RETRY_S:.0f} s and opens as soon as it is free.")
        st.caption(str(err))
        time.sleep(BUSY_RETRY_S)
        st.rerun()
    except StoreError as err:  # waiting will not help (a newer schema, permissions): say what to do
        st.error(str(err))
        st.stop()
    if "bootstrap_checked" in st.session_state:
        _aligning_note()
        return True
    if not bootstrap.needs_bootstrap(store) and not _job_running():
        st.session_state["bootstrap_checked"] = True
        return True
    job = _job()
    st.title("covidtrack")
    st.subheader("First start: building the demo cohort")
    st.write(
        f"{bootstrap.DEMO_PATIENTS} synthetic patients over 3-6 dates in two treatment arms, plus one real CT, "
        "go through the real pipeline (segmentation, metrics, registration). This runs once; "
        "the dashboard opens by itself when it is done."
    )
    elapsed = time.perf_counter() - job.started
    ev = job.latest
    st.progress(min(1.0, ev.fraction), text=f"{ev.fraction:.0%} · {ev.stage}: {ev.message} · {elapsed:.0f} s")
    if job.done:
        if job.error:
            st.error(f"The demo cohort could not be built: {job.error}. Import your own scans on the Import page.")
        if job.failures:
            first = job.failures[0][1]
            st.warning(f"{len(job.failures)} demo file(s) failed, e.g.: {first}")
        resources.invalidate()
        st.session_state["bootstrap_checked"] = True
        if not job.error:
            st.rerun()
        return True
    time.sleep(1.0)
    st.rerun()
    return False


def _aligning_note() -> None:
    """A sidebar line while the demo's follow-ups are registered in the background."""
    job = _job() if _JOB_STARTED.is_set() else None
    if job is not None and job.aligning:
        st.sidebar.caption(f":material/sync: Demo: {job.aligning}. Follow-ups show as 'not aligned' until then.")


def _job_running() -> bool:
    """True while a build started by another session is still running in this process (the
    store is no longer empty then, but the demo is not complete)."""
    return _RUNNING.is_set()
