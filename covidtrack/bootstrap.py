"""First start: fill an empty store with the demo cohort through the real pipeline.

The demo cohort is synthetic phantom patients over 3-6 dates in two treatment arms
(:func:`covidtrack.phantom.write_demo_cohort`) plus one small real CT shipped in ``data/samples``.
Everything goes through :func:`covidtrack.pipeline.ingest_manifest` (load, segment with the
shipped models, measure, store, register), so the dashboard opens on real pipeline output.

:func:`bootstrap` is a generator of :class:`~covidtrack.events.Progress` events with the overall
fraction; the dashboard shows them as a progress bar; other callers can print them
(``pipeline.drain(bootstrap.bootstrap(), print)``). Phantom files are written to a scratch folder under
``$COVIDTRACK_HOME/work`` and removed afterwards (the store keeps its own canonical copies).
A marker file records that the demo was built, so deleting the demo patients does not bring
them back on the next start. Set ``COVIDTRACK_NO_DEMO=1`` to never build it.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from covidtrack.config import SAMPLES, settings
from covidtrack.events import Progress, ProgressCallback

T = TypeVar("T")

REAL_SAMPLE = SAMPLES / "chest4dct_4mm" / "ct_4mm.nii.gz"
REAL_SAMPLE_PATIENT = "DEMO-REAL-CT"
REAL_SAMPLE_DATE = "2020-03-02"
REAL_SAMPLE_ALIAS = "real CT (no COVID-19)"
# 6 phantom patients (3 per arm, ~28 scans): segmenting ~14-18 CPU-s per scan on 2 cores makes
# 8 patients (~38 scans) too slow for a first start; COVIDTRACK_DEMO_PATIENTS overrides it.
DEMO_PATIENTS = int(os.environ.get("COVIDTRACK_DEMO_PATIENTS", "6"))
MARKER = "demo-bootstrap.json"
PHANTOM_SHARE = 0.2  # of the progress bar: phantom synthesis is ~1/4 of the first start on 2 cores


@dataclass(frozen=True)
class BootstrapResult:
    """What the first start did: scans stored, files that failed (path, message), wall time (s)."""

    stored: int
    failed: tuple[tuple[str, str], ...]
    seconds: float


def marker_path() -> Path:
    return settings().home / MARKER


def demo_disabled() -> bool:
    return os.environ.get("COVIDTRACK_NO_DEMO", "").strip() not in ("", "0", "false", "no")


def needs_bootstrap(store: Any) -> bool:
    """True on a fresh install: no scans stored, no earlier demo build, demo not disabled."""
    return not demo_disabled() and not marker_path().exists() and store.counts()["scans"] == 0


def _with_real_sample(manifest: Path) -> None:
    """Give the phantom patients aliases and append the real CT sample (absolute path)."""
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "alias" not in fields:
        fields.append("alias")
    # readable demo labels; the phantom IDs are synthetic, but the UI shows aliases, not IDs
    order = {p: i + 1 for i, p in enumerate(dict.fromkeys(r["patient"] for r in rows))}
    for r in rows:
        r["alias"] = r.get("alias") or f"phantom {order[r['patient']]}"
    row = {k: "" for k in fields}
    row.update({"patient": REAL_SAMPLE_PATIENT, "date": REAL_SAMPLE_DATE, "path": str(REAL_SAMPLE), "alias": REAL_SAMPLE_ALIAS})
    # no arm: a healthy reference scan is not a treatment group (the Cohort page leaves it out)
    if REAL_SAMPLE.exists():  # a trimmed install without data/samples: the phantoms alone still make a demo
        rows.append(row)
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _live(fn: Callable[[ProgressCallback], T], lo: float, hi: float) -> Generator[Progress, None, T]:
    """Run ``fn(callback)`` in a worker thread and yield its events live, fraction mapped to [lo, hi]."""
    events: queue.Queue[Progress] = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(events.put)
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=target, name="covidtrack-demo-phantoms", daemon=True)
    worker.start()
    while worker.is_alive() or not events.empty():
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        yield Progress("demo", lo + (hi - lo) * ev.fraction, ev.message or "writing phantom patients", ev.item)
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def bootstrap(
    store: Any = None,
    n_patients: int = DEMO_PATIENTS,
    seed: int = 0,
    *,
    shape: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
    segmenter: Any = None,
    register: bool = True,
) -> Generator[Progress, None, BootstrapResult]:
    """Build the demo cohort into ``store`` (default: the configured one), yielding progress.

    ``shape`` / ``spacing`` (phantom grid, mm), ``segmenter`` and ``register`` pass through to the phantom writer
    and the pipeline (tests use a small grid and a fast segmenter). Overall fraction: :data:`PHANTOM_SHARE` writing phantoms, the rest ingesting (segmentation
    dominates).
    """
    from covidtrack import phantom, pipeline

    start = time.perf_counter()
    work = settings().work_dir / f"demo-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        grid = {k: v for k, v in (("shape", shape), ("spacing", spacing)) if v is not None}
        yield Progress("demo", 0.0, f"writing {n_patients} phantom patients", str(work.name))
        manifest = yield from _live(
            lambda cb: Path(phantom.write_demo_cohort(work, n_patients=n_patients, seed=seed, with_truth=False, progress=cb,
                                                      **grid)),
            0.0, PHANTOM_SHARE,
        )
        if manifest.is_dir():
            manifest = manifest / "manifest.csv"
        _with_real_sample(manifest)
        yield Progress("demo", PHANTOM_SHARE, "ingesting the demo cohort through the pipeline", manifest.name)
        events = pipeline.ingest_manifest(manifest, store=store, segmenter=segmenter, register=register)
        while True:
            try:
                ev = next(events)
            except StopIteration as stop:
                summary = stop.value
                break
            yield Progress(ev.stage, PHANTOM_SHARE + (1 - PHANTOM_SHARE) * ev.fraction, ev.message, Path(ev.item).name)
        result = BootstrapResult(stored=len(summary.ok), failed=tuple(summary.failed), seconds=time.perf_counter() - start)
        if result.stored:  # nothing stored (e.g. models missing): try again on the next start
            marker_path().parent.mkdir(parents=True, exist_ok=True)
            marker_path().write_text(json.dumps({"stored": result.stored, "failed": [list(f) for f in result.failed],
                                                 "seconds": round(result.seconds, 1), "n_patients": n_patients}, indent=1))
        yield Progress("done", 1.0, f"demo cohort ready: {result.stored} scans in {result.seconds:.0f} s", "")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def register_all(store: Any) -> Generator[Progress, None, list[str]]:
    """Register every patient's follow-ups to its baseline (``covidtrack.longitudinal``).

    The dashboard builds the demo with ``register=False`` so it opens as soon as the scans are
    measured, then runs this in the background: registration is most of the first-start time on
    2 cores, and the viewer labels unaligned follow-ups until it is done. Returns warnings.
    """
    from covidtrack import longitudinal

    keys = [str(k) for k in store.patients()["patient_key"]]
    warnings: list[str] = []
    for i, key in enumerate(keys):
        yield Progress("register", i / max(1, len(keys)), f"aligning follow-ups of patient {i + 1}/{len(keys)}", key)
        try:
            longitudinal.register_patient(store, key)
        except Exception as err:  # noqa: BLE001 - one patient's failure must not stop the others
            warnings.append(f"{key}: {type(err).__name__}: {err}")
    yield Progress("register", 1.0, "follow-ups aligned", "")
    return warnings
