"""Work the dashboard finishes after a page has returned: bringing a patient's change vs
baseline up to date (registration, 7-23 s per follow-up) after a saved correction or a click.

One worker thread per server process runs the jobs one at a time, in the order they were
submitted, each with its own store connection that it closes when the job ends (so command-line
processes can write between jobs; a job whose store is held by another process waits for it).
The ANTs part of a registration runs in a child process (:func:`covidtrack.longitudinal.isolated_registration`):
ANTsPy holds Python's interpreter lock, and in a thread it would freeze every page of the server.
A page submits a job and returns at once; it shows the jobs' state on later runs. No streamlit
here: the pages use the one :data:`QUEUE` of the process (``covidtrack.ui.resources.jobs``).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from covidtrack.errors import StoreBusyError
from covidtrack.longitudinal import isolated_registration
from covidtrack.store import Store

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
KEEP_FINISHED = 20  # finished jobs kept for display
BUSY_RETRY_S = 5.0  # another process holds the store: seconds between tries


@dataclass
class Job:
    """One job; the worker thread writes ``state``, ``message`` and the times, pages read them."""

    job_id: str
    patient_key: str
    label: str  # what asked for it, e.g. "correction of scan X"
    work: Callable[[Store], str] = field(repr=False)
    state: str = QUEUED
    message: str = ""
    submitted: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)


class JobQueue:
    """Serial background jobs on the store (see module docstring)."""

    def __init__(self, open_store: Callable[[], Store] = Store.open) -> None:
        self._open_store = open_store
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, patient_key: str, label: str, work: Callable[[Store], str]) -> Job:
        """Queue ``work(store) -> message`` for ``patient_key``; returns at once."""
        job = Job(uuid.uuid4().hex[:8], patient_key, label, work)
        with self._lock:  # queued under the lock: an idle worker cannot exit between the check and the put
            self._jobs.append(job)
            finished = [j for j in self._jobs if not j.active]
            for old in finished[:-KEEP_FINISHED]:
                self._jobs.remove(old)
            self._queue.put(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="covidtrack-jobs", daemon=True)
                self._thread.start()
        return job

    def jobs(self, patient_key: str | None = None) -> list[Job]:
        """Jobs, oldest first (of one patient when given)."""
        with self._lock:
            return [j for j in self._jobs if patient_key is None or j.patient_key == patient_key]

    def busy(self, patient_key: str) -> bool:
        """Whether a job for the patient is queued or running."""
        return any(j.active for j in self.jobs(patient_key))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted job has finished (tests, shutdown); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(j.active for j in self.jobs()):
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _open_busy(self) -> Store:
        """The store, waiting as long as another process holds it (a command-line import): a job
        that waits loses nothing, one that gives up loses the update."""
        while True:
            try:
                return self._open_store()
            except StoreBusyError:
                time.sleep(BUSY_RETRY_S)

    def _run(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=60.0)
            except queue.Empty:
                with self._lock:  # idle: end the thread; submit() starts another
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            job.state = RUNNING
            state, message = FAILED, "stopped"
            try:
                store = self._open_busy()
                with store, isolated_registration():
                    message = job.work(store)
                state = DONE
            except BaseException as err:  # noqa: BLE001 - shown on the page; what is stored stays
                message = f"{type(err).__name__}: {err}"
            finally:  # the finish time first: a page that sees the final state also sees when
                job.message = message
                job.finished = time.time()
                job.state = state


def refresh_change(store: Store, scan_id: str) -> str:
    """Re-register the follow-up pairs made stale by a change of ``scan_id``'s segmentation (a
    saved correction) and say what happened, in words for the page."""
    from covidtrack import longitudinal

    return summarise(longitudinal.refresh_after_change(store, scan_id))


def register_patient(store: Store, patient_key: str) -> str:
    """Register the patient's follow-ups that are not up to date (the Patient page's button)."""
    from covidtrack import longitudinal

    return summarise(longitudinal.register_patient(store, patient_key))


def summarise(done: list[Any]) -> str:
    """What a registration run did (``longitudinal.FollowupResult`` list), in one sentence."""
    redone = [r for r in done if not r.reused]
    failed = [r for r in redone if not r.ok]
    if not redone:
        return "The change vs baseline was already up to date."
    text = f"Change vs baseline recomputed for {len(redone) - len(failed)} follow-up(s)." if len(redone) > len(failed) else ""
    if failed:
        text += (f" {len(failed)} follow-up(s) failed the registration quality check; their change is not shown "
                 "(check both lung masks).")
    return text.strip()


QUEUE = JobQueue()  # the process's queue: module level, so clearing Streamlit's caches cannot fork a second one
