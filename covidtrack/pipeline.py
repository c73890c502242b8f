"""The one orchestrator: load -> validate -> segment -> measure -> store -> register.

Every step is a generator of :class:`~covidtrack.events.Progress` events so the CLI progress bar
and the UI show the same thing. The generator's return value (``StopIteration.value``, or use
:func:`drain`) is an :class:`IngestResult` / :class:`ManifestSummary`; the last event of
:func:`ingest` is ``stage="done"`` with ``item=<scan_id>``.

Guarantees:

- Idempotent: the content hash (``covidtrack.io.volume_hash``) identifies a scan; ingesting the
  same pixels again returns the stored scan and adds nothing.
- Atomic: files are written under temporary names and renamed, then all rows of the scan go in
  one transaction (:meth:`covidtrack.store.Store.add_scan`). A kill at any moment leaves the
  store as it was before the scan; files left behind are removed on the next open.
- Pseudonymous: patient IDs typed by the user go through ``covidtrack.io.patient_key`` (the salted
  hash also used for DICOM PatientID) before they reach the store; an alias may be shown instead.
"""

from __future__ import annotations

import contextvars
import csv
import datetime as dt
import importlib
import os
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, replace
from io import StringIO
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from covidtrack.errors import CovidtrackError, InputError, ModelError, StoreError
from covidtrack.events import Progress, ProgressCallback
from covidtrack.segment.types import Segmentation
from covidtrack.volume import Volume

Segmenter = Callable[[Volume, ProgressCallback | None], Segmentation]
T = TypeVar("T")

MANIFEST_COLUMNS = ("patient", "date", "path")  # required; "arm" and "alias" optional

# Fractions of one scan's progress bar given to each stage (segmentation dominates on CPU).
_SEGMENT = (0.05, 0.80)
_REGISTER = (0.88, 0.99)
REOPEN_WAIT_S = 120.0  # after segmenting, the store is reopened: wait longer rather than waste the work


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did. ``created`` is False when the scan was already stored."""

    scan_id: str
    patient_key: str
    created: bool
    seg_id: str | None = None
    registered: tuple[str, ...] = ()  # follow-up scans registered to their baseline
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ManifestSummary:
    """Per-file outcome of :func:`ingest_manifest`; ``failed`` holds (path, message)."""

    ok: tuple[IngestResult, ...]
    failed: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        new = sum(r.created for r in self.ok)
        lines = [f"{len(self.ok)} scan(s) ok ({new} new, {len(self.ok) - new} already stored), {len(self.failed)} failed"]
        lines += [f"  FAILED {path}: {msg}" for path, msg in self.failed]
        lines += [f"  warning {r.scan_id}: {w}" for r in self.ok for w in r.warnings]
        return "\n".join(lines)


def drain(events: Generator[Progress, None, T], callback: ProgressCallback | None = None) -> T:
    """Run a pipeline generator to the end (forwarding events) and return its result."""
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)


def _in_thread(fn: Callable[[ProgressCallback], T], stage: str, lo: float, hi: float, item: str) -> Generator[Progress, None, T]:
    """Run ``fn(callback)`` in a worker thread and yield its callback events live, with the
    fraction mapped into [lo, hi] of the item's bar (a callback API inside a generator)."""
    events: queue.Queue[Progress] = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(events.put)
        except BaseException as err:  # re-raised in the caller's thread below
            box["error"] = err

    # the caller's context travels along (e.g. longitudinal.isolated_registration in the dashboard)
    worker = threading.Thread(target=contextvars.copy_context().run, args=(target,), name=f"covidtrack-{stage}", daemon=True)
    worker.start()
    try:
        while worker.is_alive() or not events.empty():
            try:
                ev = events.get(timeout=0.05)
            except queue.Empty:
                continue
            yield Progress(stage=ev.stage or stage, fraction=lo + (hi - lo) * ev.fraction, message=ev.message, item=item)
    finally:
        # also when the consumer abandons the generator (a dashboard page interrupted by a click
        # closes it): the worker uses the caller's store, which must outlive it
        worker.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


EARLIEST_CT_DATE = dt.date(1971, 10, 1)  # the first clinical CT scan: anything earlier is a typo


def _given_date(value: str | dt.date | None, where: str) -> dt.date | None:
    """The date the user passed (checked: YYYY-MM-DD, not before CT existed, not in the future),
    or None when none was given."""
    if value is None or str(value).strip() == "":
        return None
    if isinstance(value, dt.date):
        day = value
    else:
        try:
            day = dt.date.fromisoformat(str(value).strip())
        except ValueError:
            raise InputError(where, f"date {value!r} is not YYYY-MM-DD", "write the date as e.g. 2020-03-14") from None
    if day < EARLIEST_CT_DATE or day > dt.date.today():
        raise InputError(where, f"date {day.isoformat()} is implausible for a CT scan (before 1971 or in the future)",
                         "check the year; write the date as YYYY-MM-DD")
    return day


def _parse_date(value: str | dt.date | None, volume: Volume, where: str) -> dt.date:
    given = _given_date(value, where)
    if given is not None:
        return given
    day = volume.meta.study_date
    if day is not None:
        if day < EARLIEST_CT_DATE or day > dt.date.today():
            # anonymisers write 19000101 or shift dates into the future: such a date would pick
            # the wrong baseline and the wrong days between scans
            raise InputError(where, f"the study date in the file, {day.isoformat()}, is implausible for a CT scan "
                             "(before 1971 or in the future; an anonymised date?)", "pass the real date: --date YYYY-MM-DD")
        return day
    raise InputError(where, "no study date given and none in the file", "pass --date YYYY-MM-DD")


def _default_segmenter() -> Segmenter:
    from covidtrack.segment import segment

    return segment  # type: ignore[no-any-return]


def _geometry(volume: Volume) -> dict[str, Any]:
    return {
        "shape_zyx": list(volume.shape),
        "spacing_zyx_mm": list(volume.spacing),
        "origin_xyz_mm": list(volume.origin),
        "direction": list(volume.direction),
        "source": asdict(volume.source) if volume.source is not None else None,
    }


def _stored_source_name(volume: Volume) -> str:
    """What the store keeps of where a scan came from: its format, never the file or folder name.

    Exports are often named after the patient (``MRN445566_SMITH_2020-03-14.nii.gz``, a PACS folder
    per patient, the demo's own ``DEMO01/DEMO01_2020-06-14.nii.gz``), and the store keeps no
    identifying text; the scan's content hash identifies it.
    """
    return volume.meta.source_format or "unknown"


def _meta(volume: Volume) -> dict[str, Any]:
    meta = asdict(volume.meta)
    meta["source_name"] = ""  # see _stored_source_name
    # the store keeps the patient's key in its own column; the file's own (DICOM PatientID) key
    # stays in the meta so later scans can be checked against it (covidtrack.identity)
    meta["source_patient_key"] = meta.pop("patient_key", "")
    meta.pop("study_date", None)
    return meta


def ingest(
    source: str | Path | Volume,
    patient: str,
    date: str | dt.date | None = None,
    arm: str | None = None,
    store: Any = None,
    segmenter: Segmenter | None = None,
    register: bool = True,
    *,
    alias: str | None = None,
    patient_is_key: bool = False,
    series_uid: str | None = None,
    accept_other_id: bool = False,
) -> Generator[Progress, None, IngestResult]:
    """Ingest one scan (a path or a Volume) for ``patient`` (a raw ID, pseudonymised here, or a
    key already when ``patient_is_key``). ``date`` defaults to the study date in the file.
    ``series_uid`` picks one series of a DICOM folder that holds several.

    A scan whose DICOM PatientID or sex contradicts the stored scans (:mod:`covidtrack.identity`)
    is refused unless ``accept_other_id``; then it is stored with an identity note and flagged.

    Raises :class:`~covidtrack.errors.InputError` for bad input (nothing is stored then).
    """
    from covidtrack import identity, io
    from covidtrack.store import Store

    item = (source.meta.source_name or "volume") if isinstance(source, Volume) else str(source)
    own_store = store is None
    if own_store:
        store = Store.open()  # opened before any file is written: the DuckDB lock fences other writers
    try:
        yield Progress("load", 0.0, "reading scan", item)
        volume = source if isinstance(source, Volume) else io.load_ct(source, series_uid=series_uid)
        for note in volume.meta.notes:
            yield Progress("load", 0.01, f"note: {note}", item)
        key = patient.strip() if patient_is_key else io.patient_key(patient)
        if not key:
            raise InputError(item, "no patient ID given", "pass --patient ID (it is pseudonymised before storing)")
        if not patient_is_key:
            _check_not_an_alias(store, patient.strip(), key, item)
        given_date = _given_date(date, item)  # a bad date is refused before anything else
        _check_alias(store, key, alias, item)
        content_hash = io.volume_hash(volume)
        existing = store.scan_by_hash(content_hash)
        if existing is not None:
            scan_id, owner = existing
            if owner != key:
                raise InputError(
                    item, f"the same scan is already stored as {scan_id} for another patient",
                    "check the patient ID; one scan belongs to one patient",
                )
            stored = store.scans(key).set_index("scan_id").loc[scan_id, "study_date"]
            stored_date = pd.Timestamp(stored).date()
            if given_date is not None and given_date != stored_date:
                raise InputError(
                    item, f"the same scan is already stored as {scan_id} dated {stored_date}, not {given_date}",
                    "drop --date (or the manifest's date) to keep the stored one; a scan has one date",
                )
            note = ""
            if arm is not None or alias is not None:
                store.set_patient(key, arm=arm, alias=alias)
                changed = [f"{k} set to {v!r}" for k, v in (("arm", arm), ("alias", alias)) if v is not None]
                note = "; patient's " + ", ".join(changed)
            yield Progress("done", 1.0, f"already stored as {scan_id}{note}", scan_id)
            return IngestResult(scan_id=scan_id, patient_key=key, created=False)
        study_date = _parse_date(given_date, volume, item)
        _check_one_scan_per_date(store, key, study_date, item)
        conflicts = identity.conflicts(store, key, volume.meta)
        if conflicts and not accept_other_id:
            raise InputError(item, "; ".join(conflicts), identity.FIX)
        if conflicts:
            note = "accepted at import although " + "; ".join(conflicts)
            volume = replace(volume, meta=replace(volume.meta, identity_note=note))
            yield Progress("load", 0.02, f"note: {note}", item)

        seg_fn = segmenter or _default_segmenter()
        if own_store:  # segmenting takes longest: other processes (the dashboard) may use the store meanwhile
            store.close()
            store = None
        yield Progress("segment", _SEGMENT[0], "segmenting lungs, lobes and infection", item)
        seg = yield from _in_thread(lambda cb: seg_fn(volume, cb), "segment", *_SEGMENT, item)
        if seg.shape != volume.shape:
            raise CovidtrackError(f"{item}: segmenter returned shape {seg.shape} for a {volume.shape} scan")

        from covidtrack import metrics

        yield Progress("metrics", 0.82, "measuring", item)
        table = metrics.scan_metrics(volume, seg)
        if own_store:
            store = Store.open(wait_s=REOPEN_WAIT_S)
            existing = _recheck(store, key, content_hash, study_date, volume, alias, item, accept_other_id)
            if existing is not None:  # the same scan was stored meanwhile (another import of the file)
                yield Progress("done", 1.0, f"already stored as {existing[0]}", existing[0])
                return IngestResult(scan_id=existing[0], patient_key=existing[1], created=False)

        yield Progress("store", 0.85, "writing masks and rows", item)
        try:
            scan_id, seg_id = _store_scan(store, volume, seg, table, key, study_date, content_hash, arm, alias)
        except duckdb.ConstraintException:
            # the same scan was stored meanwhile (two ingests of one file at once): ours rolled
            # back with its files, theirs stands
            existing = store.scan_by_hash(content_hash)
            if existing is None:
                raise
            yield Progress("done", 1.0, f"already stored as {existing[0]}", existing[0])
            return IngestResult(scan_id=existing[0], patient_key=existing[1], created=False)

        registered: list[str] = []
        warnings: list[str] = []
        if register:
            registered, warnings = yield from _register_hook(store, key, scan_id, item)
        yield Progress("done", 1.0, f"stored as {scan_id}", scan_id)
        if volume.meta.identity_note:
            warnings.insert(0, f"{item}: {volume.meta.identity_note} (the scan is flagged)")
        return IngestResult(scan_id, key, True, seg_id, tuple(registered), tuple(warnings))
    finally:
        if own_store and store is not None:
            store.close()


def _recheck(store: Any, key: str, content_hash: str, study_date: dt.date, volume: Volume, alias: str | None,
             item: str, accept_other_id: bool) -> tuple[str, str] | None:
    """The checks made before segmenting, again, after the store was reopened (another process may
    have written meanwhile). Returns the stored scan when this very scan was stored meanwhile
    (for this patient); raises :class:`InputError` as the first checks would."""
    from covidtrack import identity

    existing = store.scan_by_hash(content_hash)
    if existing is not None:
        if existing[1] != key:
            raise InputError(item, f"the same scan was stored meanwhile as {existing[0]} for another patient",
                             "check the patient ID; one scan belongs to one patient")
        return existing
    _check_one_scan_per_date(store, key, study_date, item)
    _check_alias(store, key, alias, item)
    conflicts = identity.conflicts(store, key, volume.meta)
    if conflicts and not accept_other_id:
        raise InputError(item, "; ".join(conflicts), identity.FIX)
    return None


def _check_alias(store: Any, key: str, alias: str | None, item: str) -> None:
    """An alias names one patient: refuse one that already names another."""
    if not alias:
        return
    pats = store.patients()
    taken = pats[(pats["alias"] == alias) & (pats["patient_key"] != key)]
    if len(taken):
        raise InputError(item, f"alias {alias!r} already names patient {taken['patient_key'].iloc[0]}",
                         "pick another --alias (an alias must name one patient)")


def _check_one_scan_per_date(store: Any, key: str, study_date: dt.date, item: str) -> None:
    """A timepoint is one scan: a second, different scan of the patient on a stored date is
    refused (two series of one study, e.g. a lung and a soft-tissue kernel, would otherwise both
    enter the trajectory and the change table as the same date)."""
    scans = store.scans(key)
    same = scans[pd.to_datetime(scans["study_date"]).dt.date == study_date]
    if len(same):
        sid = str(same["scan_id"].iloc[0])
        raise InputError(
            item, f"the patient already has scan {sid} dated {study_date}; a date is one timepoint, one scan",
            "ingest one series per date (`series` lists them, --series-uid picks one); to replace the stored scan, "
            f"remove it first: python -m covidtrack remove-scan {sid} --yes",
        )


def _store_scan(
    store: Any, volume: Volume, seg: Segmentation, table: pd.DataFrame, key: str, study_date: dt.date,
    content_hash: str, arm: str | None, alias: str | None,
) -> tuple[str, str]:
    from covidtrack import store as st

    scan_id = st.new_scan_id(content_hash)
    seg_id = st.new_seg_id()
    with st.FileStage() as stage:
        vpath = stage.put(store.volume_path_for(scan_id), lambda p: st.write_canonical(p, volume))
        masks: dict[str, Path] = {}
        for part in st.MASK_PARTS:
            arr = getattr(seg, part)
            if arr is not None:
                masks[part] = stage.put(store.mask_path_for(seg_id, part), lambda p, a=arr: st.write_canonical(p, volume, a))
        store.add_scan(
            st.ScanRecord(
                scan_id=scan_id, patient_key=key, study_date=study_date, content_hash=content_hash,
                volume_path=vpath, geometry=_geometry(volume), source_name=_stored_source_name(volume), meta=_meta(volume),
            ),
            st.SegRecord(
                seg_id=seg_id, scan_id=scan_id, kind="model", model_versions=dict(seg.model_versions),
                lungs_path=masks["lungs"], infection_path=masks["infection"], lobes_path=masks.get("lobes"),
            ),
            table, arm=arm, alias=alias,
        )
    return scan_id, seg_id


def _register_hook(store: Any, key: str, scan_id: str, item: str) -> Generator[Progress, None, tuple[list[str], list[str]]]:
    """Register follow-ups to the patient's baseline when ``covidtrack.longitudinal`` exists.

    A new scan that is not the baseline is registered; a new scan that becomes the baseline (an
    earlier date ingested late) makes every other scan of the patient a follow-up to redo. A
    failed registration does not undo the stored scan: it becomes a warning in the result.
    """
    try:
        longitudinal = importlib.import_module("covidtrack.longitudinal")
    except ModuleNotFoundError as err:
        if err.name != "covidtrack.longitudinal":
            raise
        return [], []  # registration not installed: the scan is complete without it
    scans = store.scans(key)
    if len(scans) < 2:
        return [], []
    baseline = store.baseline_scan(key)
    todo = [scan_id] if scan_id != baseline else [s for s in scans.scan_id if s != baseline]
    done, warnings = [], []
    lo, hi = _REGISTER
    for i, follow in enumerate(todo):
        a = lo + (hi - lo) * i / len(todo)
        b = lo + (hi - lo) * (i + 1) / len(todo)
        yield Progress("register", a, f"registering {follow} to baseline {baseline}", item)
        try:
            res = yield from _in_thread(lambda cb, f=follow: longitudinal.register_followup(store, f, progress=cb), "register", a, b, item)
            done.append(follow)
            if res is not None and not res.ok:
                warnings.append(f"the registration of {follow} to the baseline failed its quality check: its change vs baseline "
                                "is not shown; check both lung masks (Review page)")
                yield Progress("register", b, warnings[-1], item)
        except Exception as err:  # noqa: BLE001 - the scan is stored; report, don't lose it
            warnings.append(f"registration of {follow} failed: {type(err).__name__}: {err}")
            yield Progress("register", b, warnings[-1], item)
    return done, warnings


def _manifest_text(path: Path) -> str:
    """The manifest's text: UTF-8 (with or without a BOM) or UTF-16 with its BOM (Excel's
    "Unicode text"); anything else is refused, not guessed."""
    data = path.read_bytes()
    try:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(path, f"not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})",
                         "save the manifest as 'CSV UTF-8' (Excel) or re-encode it as UTF-8") from err


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of a manifest CSV (columns patient, date, path; optional arm, alias, series_uid). Relative
    paths are resolved against the manifest's folder. The whole manifest is checked before
    anything is ingested: a row without a patient or a path is refused with its line number."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder, not a manifest", "pass the CSV file itself (columns patient,date,path)")
    if not path.is_file():
        raise InputError(path, "manifest not found", "check the path to the CSV file")
    reader = csv.DictReader(StringIO(_manifest_text(path), newline=""))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise InputError(path, f"manifest lacks column(s) {', '.join(missing)} (has {', '.join(header) or 'none'})",
                         "write a header line: patient,date,path,arm")
    rows, empty = [], []
    for raw in reader:
        row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not any(row.values()):
            continue  # a blank line
        line = reader.line_num
        for col in ("patient", "path"):
            if not row.get(col):
                empty.append(f"line {line}: {col} is empty")
        if not row.get("path"):
            continue
        p = Path(row["path"])
        row["path"] = os.path.normpath(p if p.is_absolute() else (path.parent / p))
        row["line"] = str(line)
        rows.append(row)
    if empty:
        raise InputError(path, "; ".join(empty[:5]) + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""),
                         "fill in every row's patient and path (nothing was ingested)")
    return rows


def ingest_manifest(
    manifest: str | Path, store: Any = None, segmenter: Segmenter | None = None, register: bool = True,
    accept_other_id: bool = False,
) -> Generator[Progress, None, ManifestSummary]:
    """Ingest every row of a manifest; a bad file is reported and skipped, never fatal.
    ``accept_other_id`` applies to every row (see :func:`ingest`).

    Events carry the file in ``item`` and overall progress in ``fraction``; the last event is
    ``stage="summary"`` whose message lists what failed and why.
    Without ``store`` every row opens the store for itself (:func:`ingest`), so other processes,
    such as the dashboard, can use it between rows and while each scan is segmented.
    """
    rows = read_manifest(manifest)
    ok: list[IngestResult] = []
    failed: list[tuple[str, str]] = []
    n = max(len(rows), 1)
    for i, row in enumerate(rows):
        events = ingest(
            row["path"], row["patient"], row["date"] or None, arm=row.get("arm") or None, store=store,
            segmenter=segmenter, register=register, alias=row.get("alias") or None,
            series_uid=row.get("series_uid") or None, accept_other_id=accept_other_id,
        )
        try:
            while True:
                try:
                    ev = next(events)
                except StopIteration as stop:
                    ok.append(stop.value)
                    break
                yield Progress(ev.stage, (i + ev.fraction) / n, f"[{i + 1}/{len(rows)}] {ev.message}", row["path"])
        except ModelError:
            raise  # a missing/corrupt model fails every file: stop and say so once
        except (InputError, StoreError) as err:
            failed.append((row["path"], f"line {row['line']}: {err}"))
            yield Progress("failed", (i + 1) / n, failed[-1][1], row["path"])
        except Exception as err:  # noqa: BLE001 - one odd file must not stop the others
            failed.append((row["path"], f"line {row['line']}: {type(err).__name__}: {err}"))
            yield Progress("failed", (i + 1) / n, failed[-1][1], row["path"])
    summary = ManifestSummary(tuple(ok), tuple(failed))
    yield Progress("summary", 1.0, summary.describe(), str(manifest))
    return summary


def export_metrics(out_dir: str | Path, fmt: str = "csv", all_versions: bool = False, store: Any = None,
                   lesions: bool = False, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``metrics_long``, ``metrics_wide``, ``metrics_units`` and ``change_vs_baseline``
    (csv or parquet) into ``out_dir``, and ``lesions`` when asked.

    Long: one row per (scan, region, metric, model version) with patient key, alias, arm, date,
    day since baseline. Wide: one row per scan (and segmentation) with ``<region>_<metric>``
    columns. By default only the numbers the dashboard shows (active version / corrections);
    ``all_versions`` exports every stored row. ``change_vs_baseline``: new / resolved /
    persistent mL per current follow-up and region (:func:`covidtrack.report.load.change_table`);
    ``lesions``: every lesion followed from the baseline (:func:`covidtrack.report.load.lesion_table`;
    it reads and labels every change map, hence optional). ``warn`` receives one line per
    follow-up whose change is left out (out of date, failed, not registered) and how to fix it.
    """
    from covidtrack.store import Store

    if fmt not in ("csv", "parquet"):
        raise InputError(str(out_dir), f"format {fmt!r} unknown", "use --format csv or --format parquet")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "is a file; export writes two tables into a folder", "name a folder (it is created when missing)")
    out.mkdir(parents=True, exist_ok=True)
    own_store = store is None
    if own_store:
        store = Store.open(read_only=True)
    try:
        long = store.cohort_metrics(model_version=None if all_versions else "active")
        change, lesion_rows, left_out = _change_tables(store, lesions)
        for line in left_out:
            if warn is not None:
                warn(line)
    finally:
        if own_store:
            store.close()
    index = ["patient_key", "alias", "arm", "scan_id", "study_date", "day", "model_version", "seg_id", "kind"]
    if long.empty:
        wide = pd.DataFrame(columns=index)
        units = pd.DataFrame(columns=["column", "region", "metric", "unit"])
    else:
        # groupby drops missing keys: group on "" and give the missing alias / arm back afterwards,
        # so both tables mark "none" the same way
        keyed = long.assign(column=long["region"] + "_" + long["metric"], alias=long["alias"].fillna(_NONE),
                            arm=long["arm"].fillna(_NONE))
        wide = keyed.groupby([*index, "column"], sort=False)["value"].first().unstack("column").reset_index()
        wide.columns.name = None
        wide[["alias", "arm"]] = wide[["alias", "arm"]].replace(_NONE, None)
        # the wide table's column names carry no unit: this small table says which is which
        units = keyed[["column", "region", "metric", "unit"]].drop_duplicates("column").reset_index(drop=True)
    tables = [("metrics_long", long), ("metrics_wide", wide), ("metrics_units", units), ("change_vs_baseline", change)]
    if lesions:
        tables.append(("lesions", lesion_rows))
    written = []
    for name, df in tables:
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            _spreadsheet_safe(df).to_csv(path, index=False)
        else:
            df.to_parquet(path, index=False)
        written.append(path)
    return written


def _change_tables(store: Any, with_lesions: bool) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Every patient's change vs baseline (and lesions) for the pairs the dashboard shows as
    current, and a line per follow-up left out (why, and the fix)."""
    from covidtrack.change import LESION_COLUMNS
    from covidtrack.longitudinal import pair_status
    from covidtrack.report import load

    who = ["patient_key", "alias", "arm"]
    changes, lesions, left_out = [], [], []
    for pat in store.patients().itertuples():
        status = pair_status(store, pat.patient_key)
        if not status:
            continue
        who_label = pat.alias if isinstance(pat.alias, str) and pat.alias else pat.patient_key
        left_out += [f"patient {who_label}: {note}" for note in load.change_notes(store, pat.patient_key, status)]
        ident = {"patient_key": pat.patient_key, "alias": pat.alias, "arm": pat.arm}
        changes.append(load.change_table(store, pat.patient_key, status).assign(**ident))
        if with_lesions:
            lesions.append(load.lesion_table(store, pat.patient_key, status).assign(**ident))
    change_cols = [*who, "date", "scan_id", "region", "new_ml", "resolved_ml", "persistent_ml"]
    change = pd.concat(changes, ignore_index=True)[change_cols] if changes else pd.DataFrame(columns=change_cols)
    lesion_cols = [*who, "date", "scan_id", *LESION_COLUMNS]
    lesion = pd.concat(lesions, ignore_index=True)[lesion_cols] if lesions else pd.DataFrame(columns=lesion_cols)
    return change, lesion, left_out


def _check_not_an_alias(store: Any, typed: str, key: str, item: str) -> None:
    """``--patient`` takes the patient's own ID: a stored alias or pseudonymous key typed there would
    hash to a new key and silently start a second, anonymous patient."""
    pats = store.patients()
    if pats.empty or key in set(pats["patient_key"]):
        return
    by_alias = pats[pats["alias"] == typed]
    if len(by_alias) or typed in set(pats["patient_key"]):
        owner = by_alias["patient_key"].iloc[0] if len(by_alias) else typed
        what = f"the alias of patient {owner}" if len(by_alias) else "a stored pseudonymous key"
        raise InputError(item, f"--patient {typed!r} is {what}; --patient takes the patient's own ID (the one on the "
                               "scans, stored only as a salted hash), so this would start a new, separate patient",
                         "give the patient's own ID (with the same COVIDTRACK_SALT as before)")


_NONE = "\x00none"  # stands for a missing alias / arm while grouping (no typed text contains NUL)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Text cells that a spreadsheet would evaluate as a formula (an alias ``=HYPERLINK(...)``,
    an arm ``+cmd|...``) get a leading apostrophe, which spreadsheets show as plain text (the
    OWASP advice against CSV injection). Only text columns are touched; numbers stay numbers."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_object_dtype(out[col]) or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v)
    return out

