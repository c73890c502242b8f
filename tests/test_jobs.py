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
