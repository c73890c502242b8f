"""Background jobs of the dashboard (covidtrack.ui.jobs): serial, each with its own store
connection closed afterwards, failures reported, registration serialised per patient."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from covidtrack import store as S
from covidtrack.config import settings
from covidtrack.ui.jobs import DONE, FAILED, JobQueue, summarise


def test_jobs_run_in_order_one_at_a_time_and_release_the_store(covidtrack_home: Path) -> None:
    S.Store.open().close()
    q = JobQueue()
    running = []
    order = []

    def work(name: str):
        def run(store: S.Store) -> str:
            running.append(name)
            assert len(running) == 1, "two jobs ran at once"
            store.set_patient(name, arm="x")  # a real write through the job's own connection
            time.sleep(0.2)
            order.append(name)
            running.remove(name)
            return f"{name} done"
        return run

    jobs = [q.submit(f"p{i}", "test", work(f"p{i}")) for i in range(3)]
    assert q.busy("p2")
    assert q.wait(timeout=30)
    assert order == ["p0", "p1", "p2"]
    assert [j.state for j in jobs] == [DONE] * 3 and jobs[0].message == "p0 done"
    assert not q.busy("p2")
    assert settings().db_path not in S._CONNECTIONS  # closed after the job: other processes can write
    with S.Store.open() as store:
        assert set(store.patients()["patient_key"]) == {"p0", "p1", "p2"}


def test_a_failing_job_is_reported_and_the_next_one_runs(covidtrack_home: Path) -> None:
    S.Store.open().close()
    q = JobQueue()

    def boom(store: S.Store) -> str:
        raise RuntimeError("registration exploded")

    bad = q.submit("p", "test", boom)
    good = q.submit("p", "test", lambda store: "fine")
    assert q.wait(timeout=30)
    assert bad.state == FAILED and "registration exploded" in bad.message
    assert good.state == DONE and good.message == "fine"


def test_registration_runs_of_one_patient_do_not_overlap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard can register one patient from two threads (a background update and an
    import): the runs take turns."""
    from covidtrack import longitudinal as L

    inside = []
    overlap = []

    def slow(store, key, progress, force):
        inside.append(key)
        overlap.append(len(inside))
        time.sleep(0.2)
        inside.remove(key)
        return []

    monkeypatch.setattr(L, "_register_patient", slow)
    threads = [threading.Thread(target=L.register_patient, args=(None, "same")) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert overlap == [1, 1, 1]


def test_summary_sentence() -> None:
    from types import SimpleNamespace as R

    assert "already up to date" in summarise([R(reused=True, ok=True)])
    text = summarise([R(reused=False, ok=True), R(reused=False, ok=False), R(reused=True, ok=True)])
    assert text.startswith("Change vs baseline recomputed for 1 follow-up(s).") and "1 follow-up(s) failed" in text


class _IdleThenPreemptedQueue:
    """A queue whose get() reports 'idle for 60 s' at once and whose put() is slow: the timing in
    which an idle worker exits while a job is being submitted."""

    def __init__(self) -> None:
        import queue as q

        self._q = q.Queue()
        self.timed_out = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None):
        import queue as q

        if self._q.empty():
            self.timed_out.set()
            raise q.Empty
        return self._q.get(block, timeout)

    def put(self, item) -> None:
        time.sleep(0.2)
        self._q.put(item)

    def empty(self) -> bool:
        return self._q.empty()


def test_a_job_submitted_while_the_idle_worker_exits_still_runs() -> None:
    q = JobQueue(open_store=lambda: _NullStore())
    fake = _IdleThenPreemptedQueue()
    q._queue = fake  # type: ignore[assignment]
    with q._lock:  # the worker times out and waits for the lock, as submit() holds it
        q._thread = threading.Thread(target=q._run, daemon=True)
        q._thread.start()
        assert fake.timed_out.wait(5)
    job = q.submit("P1", "correction", lambda store: "done")
    assert q.wait(timeout=10), f"stranded: {job.state}"
    assert job.state == DONE


class _NullStore:
    def __enter__(self) -> "_NullStore":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_job_waits_while_another_process_holds_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting loses nothing; giving up would lose the update of the change vs baseline."""
    from covidtrack.errors import StoreBusyError
    from covidtrack.ui import jobs as J

    monkeypatch.setattr(J, "BUSY_RETRY_S", 0.01)
    tries = []

    def opener():
        tries.append(1)
        if len(tries) < 3:
            raise StoreBusyError("held by a command-line import")
        return _NullStore()

    q = JobQueue(open_store=opener)
    job = q.submit("P1", "correction", lambda store: "done")
    assert q.wait(timeout=10) and job.state == DONE and len(tries) == 3


def test_isolated_registration_keeps_other_threads_running(covidtrack_home: Path) -> None:
    """ANTsPy holds the interpreter lock during a registration; inside isolated_registration its
    part runs in a child process, so the server's other threads (every page) keep running, and
    the registration is stored as usual."""
    from covidtrack import longitudinal as L
    from covidtrack.report import synthetic

    with S.Store.open() as store:
        key = synthetic.populate_store(store, n_patients=1, n_scans=2, shape=(48, 128, 128))[0]
    done: list = []

    def job() -> None:
        with S.Store.open() as store, L.isolated_registration():
            done.extend(L.register_patient(store, key, force=True))

    worker = threading.Thread(target=job)
    worker.start()
    gap, last = 0.0, time.perf_counter()
    while worker.is_alive():
        time.sleep(0.01)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    worker.join()
    assert len(done) == 1 and not done[0].reused
    assert gap < 1.0, f"the main thread stalled {gap:.1f} s"
    with S.Store.open() as store:
        assert len(store.registrations(key)) == 1
