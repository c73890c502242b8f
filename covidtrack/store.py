"""The DuckDB store: schema, migrations and every SQL statement of the product.

One file ``$COVIDTRACK_HOME/covidtrack.duckdb`` (DuckDB allows one read-write process per file);
images live beside it and are referenced by paths relative to the store's folder, so the folder can
be moved as a whole:

- ``scans/<scan_id>-<random>.nii.gz``: the scan on the canonical grid (int16 HU, see ``covidtrack.volume``),
  so registration and the dashboard can reread exactly what was measured;
- ``masks/<seg_id>_<part>.nii.gz``: label maps (``lungs``, ``infection``, ``lobes``) on that same
  canonical grid (``covidtrack.io.save_mask`` writes them back onto a source grid for export).

Atomicity: files are written to a temporary name and renamed (:class:`FileStage`), then all rows of
one scan are inserted in ONE transaction. A crash between the rename and the commit leaves files no
row refers to; :meth:`Store.clean_orphans` removes them (it runs on every read-write open, and the
DuckDB file lock guarantees no other process is mid-ingest at that moment; files being written by
this process are registered as in flight and skipped).

Metrics are long rows (scan, region, metric, value, unit, model_version, seg_id). ``model_version``
is the *model tag* of the segmentation: its model names sorted and joined by commas, e.g.
``infection/v1,lobes/v1,lungs/v1`` (corrected masks: ``corrected``). Re-segmenting with a newer
model adds a segmentation and rows; nothing is overwritten. ``model_version="active"`` (the default
for the dashboard) picks ONE segmentation per scan: the latest human correction if any, else the
latest segmentation made entirely by the currently active models (``covidtrack.modelstore``), else
the latest segmentation.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from covidtrack.config import settings
from covidtrack.errors import ModelError, StoreBusyError, StoreError
from covidtrack.segment.types import Segmentation
from covidtrack.volume import ScanMeta, SourceGrid, Volume

SCHEMA_VERSION = 4
MODEL_TASKS = ("lungs", "infection", "lobes")  # tasks whose active versions define "active" metrics
MASK_PARTS = ("lungs", "infection", "lobes")
CORRECTED_TAG = "corrected"

# Forward migrations: MIGRATIONS[v] takes a store at version v-1 to version v. Never edit a
# released step; add a new one (and bump SCHEMA_VERSION).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # v1: the first shape (DESIGN.md sketch).
    1: (
        """CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE patients (
            patient_key VARCHAR PRIMARY KEY,
            arm VARCHAR,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE scans (
            scan_id VARCHAR PRIMARY KEY,
            patient_key VARCHAR NOT NULL,
            study_date DATE NOT NULL,
            content_hash VARCHAR NOT NULL UNIQUE,
            geometry VARCHAR NOT NULL,
            source_name VARCHAR,
            volume_path VARCHAR NOT NULL,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE segmentations (
            seg_id VARCHAR PRIMARY KEY,
            scan_id VARCHAR NOT NULL,
            model_versions VARCHAR NOT NULL,
            model_tag VARCHAR NOT NULL,
            lungs_path VARCHAR NOT NULL,
            infection_path VARCHAR NOT NULL,
            lobes_path VARCHAR,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE metrics (
            scan_id VARCHAR NOT NULL,
            region VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            value DOUBLE,
            unit VARCHAR NOT NULL,
            model_version VARCHAR NOT NULL,
            seg_id VARCHAR NOT NULL)""",
        """CREATE TABLE registrations (
            reg_id VARCHAR PRIMARY KEY,
            fixed_scan VARCHAR NOT NULL,
            moving_scan VARCHAR NOT NULL,
            transforms VARCHAR NOT NULL,
            qa VARCHAR NOT NULL,
            ok BOOLEAN NOT NULL,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE models (
            task VARCHAR NOT NULL,
            version VARCHAR NOT NULL,
            card VARCHAR NOT NULL,
            metrics VARCHAR,
            active BOOLEAN NOT NULL DEFAULT false,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
    ),
    # v2: human-in-the-loop and longitudinal work (aliases, scan metadata, corrected masks kept
    # apart from model output, change maps and change metrics).
    2: (
        "ALTER TABLE patients ADD COLUMN alias VARCHAR",
        "ALTER TABLE scans ADD COLUMN meta VARCHAR DEFAULT '{}'",
        "ALTER TABLE segmentations ADD COLUMN kind VARCHAR DEFAULT 'model'",
        "ALTER TABLE registrations ADD COLUMN change_map_path VARCHAR",
        """CREATE TABLE change_metrics (
            fixed_scan VARCHAR NOT NULL,
            moving_scan VARCHAR NOT NULL,
            region VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            value DOUBLE,
            unit VARCHAR NOT NULL,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE corrections (
            correction_id VARCHAR PRIMARY KEY,
            scan_id VARCHAR NOT NULL,
            author VARCHAR NOT NULL,
            seconds DOUBLE,
            voxels_changed BIGINT,
            slices_touched INTEGER,
            mask_path VARCHAR NOT NULL,
            original_seg_id VARCHAR,
            seg_id VARCHAR NOT NULL,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
    ),
    # v3: remember which segmentations have metric rows, so picking the "active" numbers does not
    # scan the whole metrics table (a correction may be stored before its metrics are computed).
    3: (
        "ALTER TABLE segmentations ADD COLUMN has_metrics BOOLEAN DEFAULT false",
        "UPDATE segmentations SET has_metrics = true WHERE seg_id IN (SELECT DISTINCT seg_id FROM metrics)",
        # cache of the "active" segmentation per scan (rebuilt when segmentations or the active
        # models change; see Store._active_source)
        "CREATE TABLE active_segs (scan_id VARCHAR NOT NULL, seg_id VARCHAR NOT NULL, kind VARCHAR NOT NULL)",
        "CREATE TABLE active_state (cache_key VARCHAR NOT NULL)",
    ),
    # v4: no file or folder names (exports are often named after the patient): a scan's source is
    # its format only (covidtrack.pipeline._stored_source_name), in the column and in the meta.
    4: (
        r"""UPDATE scans SET source_name = coalesce(nullif(regexp_extract(meta, '"source_format": *"([^"\\]*)"', 1), ''), 'unknown')""",
        r"""UPDATE scans SET meta = regexp_replace(meta, '"source_name": *"(?:[^"\\]|\\.)*"', '"source_name": ""', 'g') WHERE meta IS NOT NULL""",
    ),
}


def model_tag(model_versions: dict[str, str]) -> str:
    """The string stored in ``metrics.model_version``: model names sorted, comma-joined."""
    return ",".join(sorted(str(v) for v in model_versions.values()))


def active_model_names() -> list[str]:
    """``task/version`` of the active model of every task that has one (see modelstore)."""
    from covidtrack import modelstore

    names = []
    for task in MODEL_TASKS:
        try:
            names.append(modelstore.active(task).name)
        except ModelError:
            continue  # a task without any model simply never counts as "active"
    return names


# --- records that travel -----------------------------------------------------------------------
@dataclass(frozen=True)
class ScanRecord:
    """One scan row. ``geometry``/``meta`` are JSON-able dicts; ``volume_path`` is absolute."""

    scan_id: str
    patient_key: str
    study_date: dt.date
    content_hash: str
    volume_path: Path
    geometry: dict[str, Any] = field(default_factory=dict)
    source_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SegRecord:
    """One segmentation row; mask paths are absolute NIfTI files on the scan's canonical grid."""

    seg_id: str
    scan_id: str
    kind: str  # "model" | "corrected"
    model_versions: dict[str, str]
    lungs_path: Path
    infection_path: Path
    lobes_path: Path | None = None
    created_at: dt.datetime | None = None

    @property
    def model_tag(self) -> str:
        return CORRECTED_TAG if self.kind == "corrected" else model_tag(self.model_versions)


def new_scan_id(content_hash: str) -> str:
    """Deterministic scan id from the content hash (re-ingest gives the same id)."""
    import hashlib

    return "scan-" + hashlib.sha256(content_hash.encode()).hexdigest()[:16]


def new_reg_id() -> str:
    return "reg-" + uuid.uuid4().hex[:16]


def new_seg_id() -> str:
    return "seg-" + uuid.uuid4().hex[:16]


# --- files: NIfTI on the canonical grid, written atomically ----------------------------------
_IN_FLIGHT: set[Path] = set()  # files this process is writing and has not committed yet
_IN_FLIGHT_LOCK = threading.Lock()
_ADD_SCAN_LOCK = threading.Lock()  # serialises the check-then-insert of Store.add_scan within a process


def write_canonical(path: Path, volume: Volume, array: np.ndarray | None = None) -> None:
    """Write the volume (or a mask on its grid) as NIfTI with the canonical geometry."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(array), str(path), useCompression=True)


def read_canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, ...], tuple[float, ...]]:
    """(array z,y,x; spacing z,y,x mm; origin; direction) of a NIfTI written by :func:`write_canonical`."""
    import SimpleITK as sitk

    if not path.exists():
        raise StoreError(f"{path}: file referenced by the store is missing; re-ingest the scan")
    img = sitk.ReadImage(str(path))
    spacing = tuple(float(s) for s in img.GetSpacing()[::-1])
    return sitk.GetArrayFromImage(img), spacing, tuple(img.GetOrigin()), tuple(img.GetDirection())  # type: ignore[return-value]


class FileStage:
    """Put files in place atomically; undo them if the surrounding block fails.

    ``put(final, writer)`` calls ``writer(tmp)`` on a temporary name in the same folder, then
    renames it to ``final`` (atomic on one file system). Commit the rows referencing the files
    inside the ``with`` block; on an exception every file put so far is removed.
    """

    def __init__(self) -> None:
        self.placed: list[Path] = []
        self._tracked: list[Path] = []

    def _track(self, path: Path) -> None:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.add(path)
        self._tracked.append(path)

    def put(self, final: Path, writer: Callable[[Path], None]) -> Path:
        if final.exists():
            raise StoreError(f"{final}: already exists; staged files never replace stored ones. Fix: use a fresh name")
        final.parent.mkdir(parents=True, exist_ok=True)
        # the suffix keeps writers that infer the format from the name (".nii.gz") working
        tmp = final.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{final.name}"
        self._track(tmp)
        self._track(final)
        try:
            writer(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self.placed.append(final)
        return final

    def __enter__(self) -> "FileStage":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            for p in self.placed:
                p.unlink(missing_ok=True)
        with _IN_FLIGHT_LOCK:
            for p in self._tracked:
                _IN_FLIGHT.discard(p)


# --- the store -----------------------------------------------------------------------------------
_CONNECTIONS: dict[Path, list[Any]] = {}  # path -> [connection, open count]: one per process
_CONNECTIONS_LOCK = threading.Lock()
OPEN_WAIT_S = 15.0  # how long an open waits for another process to release the file
OPEN_RETRY_S = 0.25


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class Store:
    """The product's database. Use :meth:`open` (a context manager); a cursor per call."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.path = path
        self.home = path.parent
        self._con = con
        self.read_only = read_only
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path | None = None, read_only: bool = False, wait_s: float = OPEN_WAIT_S) -> "Store":
        """Open (creating and migrating when needed) the store at ``path`` (default settings().db_path).

        DuckDB lets one process write a file at a time, and the dashboard holds the store only while
        a page runs; when another process holds it, the open is retried for ``wait_s`` seconds
        before :class:`~covidtrack.errors.StoreBusyError` says who to wait for. Threads of one
        process share one connection; the open that creates it also migrates the schema and
        cleans orphaned files.
        """
        db = Path(path).expanduser().resolve() if path is not None else settings().db_path
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            with _CONNECTIONS_LOCK:
                entry = _CONNECTIONS.get(db)
                if entry is not None:
                    if entry[2] and not read_only:
                        raise StoreError(f"{db}: already open read-only in this process. Fix: close that Store before opening it for writing")
                    entry[1] += 1
                    return cls(db, entry[0], read_only=entry[2])
                if read_only and not db.exists():  # reading creates nothing, not even the folder
                    raise StoreError(f"{db}: no store here yet. Fix: import a scan first (python -m covidtrack ingest PATH --patient ID "
                                     "or the dashboard's Import page), or set COVIDTRACK_HOME to the folder that holds one")
                db.parent.mkdir(parents=True, exist_ok=True)
                try:
                    con = duckdb.connect(str(db), read_only=read_only, config={"threads": settings().threads})
                except duckdb.IOException as err:
                    if "lock" not in str(err).lower():  # unreadable, no permission: waiting will not help
                        raise StoreError(f"{db}: cannot open the store ({err}). Fix: check the file and its folder's "
                                         "permissions, or set COVIDTRACK_HOME to another folder") from err
                    if time.monotonic() >= deadline:
                        raise StoreBusyError(
                            f"{db}: cannot open the store ({err}); waited {wait_s:.0f} s. Fix: another covidtrack process "
                            "is writing to it (DuckDB allows one writer per file): a command-line import or registration, "
                            "a fine-tuning job, or a dashboard that is running a page, building its demo or updating a "
                            "change vs baseline in the background; try again when it has finished"
                        ) from err
                else:
                    # this open creates the process's connection, so no other thread of the process
                    # holds a Store (none is writing files) and the DuckDB lock fences other
                    # processes: the one moment migrating and cleaning orphans is safe. Done before
                    # the connection is published, so a second opener waits on the lock meanwhile.
                    store = cls(db, con, read_only=read_only)
                    try:
                        if not read_only:
                            store.migrate()
                            store.clean_orphans()
                        elif store.schema_version() != SCHEMA_VERSION:
                            raise StoreError(f"{db}: schema version {store.schema_version()} needs migrating (written by an older "
                                             "covidtrack). Fix: run any command that writes once, e.g. `python -m covidtrack register --all`, "
                                             "or open the dashboard")
                    except BaseException:
                        con.close()  # a failed open must not keep the connection (and the file lock)
                        raise
                    _CONNECTIONS[db] = [con, 1, read_only]
                    return store
            time.sleep(OPEN_RETRY_S)
        return store

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _CONNECTIONS_LOCK:
            entry = _CONNECTIONS.get(self.path)
            if entry is not None and entry[0] is self._con:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _CONNECTIONS[self.path]  # first: a close that raises must not leave a dead entry
                    entry[0].close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise StoreError(f"{self.path}: store is closed. Fix: use it inside `with Store.open() as store:`")
        return self._con.cursor()

    def _df(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        """Query -> DataFrame through Arrow (several times faster than ``.df()`` for string
        columns); DATE columns become datetime64 like TIMESTAMP ones."""
        cur = self._cursor()
        try:
            return cur.sql(sql, params=list(params) or None).to_arrow_table().to_pandas(date_as_object=False)
        finally:
            cur.close()

    def _one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        cur = self._cursor()
        try:
            return cur.execute(sql, list(params)).fetchone()
        finally:
            cur.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN ... COMMIT; rolled back on any exception."""
        if self.read_only:
            raise StoreError(f"{self.path}: opened read-only. Fix: open it with read_only=False to write")
        cur = self._cursor()
        cur.begin()
        try:
            yield cur
            cur.commit()
        except BaseException:
            try:
                cur.rollback()
            except duckdb.TransactionException:
                pass  # a failed COMMIT has already rolled back: the original error is the one to report
            raise
        finally:
            cur.close()

    def rel(self, path: str | Path) -> str:
        """How a file is stored: relative to the store folder when inside it, else absolute."""
        p = Path(path).resolve()
        try:
            return p.relative_to(self.home).as_posix()
        except ValueError:
            return str(p)

    def _abs_sql(self, column: str) -> str:
        """SQL making a stored path absolute (vectorised; Path objects per row cost ~10 us each)."""
        home = str(self.home).replace("'", "''")
        return f"CASE WHEN {column} IS NULL OR starts_with({column}, '/') THEN {column} ELSE '{home}/' || {column} END"

    def abs(self, stored: str | None) -> Path | None:
        if stored is None or (isinstance(stored, float) and np.isnan(stored)):
            return None
        p = Path(stored)
        return p if p.is_absolute() else self.home / p

    @property
    def scans_dir(self) -> Path:
        return self.home / "scans"

    @property
    def masks_dir(self) -> Path:
        return self.home / "masks"

    def volume_path_for(self, scan_id: str) -> Path:
        """A fresh file name for the scan's volume (unique, so a failed attempt never touches
        the file of a stored scan with the same id)."""
        return self.scans_dir / f"{scan_id}-{uuid.uuid4().hex[:8]}.nii.gz"

    def mask_path_for(self, seg_id: str, part: str) -> Path:
        return self.masks_dir / f"{seg_id}_{part}.nii.gz"

    # -- schema -----------------------------------------------------------------------------
    def schema_version(self) -> int:
        cur = self._cursor()
        try:
            exists = cur.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
            ).fetchone()[0]
            if not exists:
                return 0
            row = cur.execute("SELECT max(version) FROM schema_version").fetchone()
            return int(row[0] or 0)
        finally:
            cur.close()

    def migrate(self, target: int = SCHEMA_VERSION) -> int:
        """Apply forward migrations up to ``target``, each step in its own transaction."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this covidtrack ({SCHEMA_VERSION}). "
                "Fix: upgrade covidtrack"
            )
        for version in range(current + 1, target + 1):
            with self.transaction() as cur:
                for stmt in MIGRATIONS[version]:
                    cur.execute(stmt)
                cur.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
        return self.schema_version()

    # -- orphans ----------------------------------------------------------------------------
    def referenced_files(self) -> set[Path]:
        refs: set[Path] = set()
        queries = [
            "SELECT volume_path FROM scans",
            "SELECT lungs_path FROM segmentations UNION ALL SELECT infection_path FROM segmentations "
            "UNION ALL SELECT lobes_path FROM segmentations WHERE lobes_path IS NOT NULL",
        ]
        if self.schema_version() >= 2:
            queries.append("SELECT mask_path FROM corrections")
        for q in queries:
            cur = self._cursor()
            try:
                refs |= {self.abs(r[0]).resolve() for r in cur.execute(q).fetchall()}  # type: ignore[union-attr]
            finally:
                cur.close()
        return refs

    def clean_orphans(self) -> list[Path]:
        """Remove files under scans/ and masks/ that no row refers to (left by a killed ingest).

        Only names this module creates are touched (``scan-*``, ``seg-*``, ``.tmp-*``), and files
        this process is still writing are skipped. :meth:`open` runs it only when it creates the
        process's connection (no other thread of the process holds a Store then).
        """
        removed = []
        # under the in-flight lock from before the rows are read until the last deletion: a file
        # staged meanwhile waits (milliseconds) instead of being taken for an orphan
        with _IN_FLIGHT_LOCK:
            busy = {p.resolve() for p in _IN_FLIGHT}
            refs = self.referenced_files()
            for folder, prefix in ((self.scans_dir, "scan-"), (self.masks_dir, "seg-")):
                if not folder.is_dir():
                    continue
                for p in folder.iterdir():
                    if not p.is_file() or not (p.name.startswith(prefix) or p.name.startswith(".tmp-")):
                        continue
                    rp = p.resolve()
                    if rp in refs or rp in busy:
                        continue
                    p.unlink(missing_ok=True)
                    removed.append(p)
        removed += self._clean_scan_folders()
        return removed

    def _clean_scan_folders(self) -> list[Path]:
        """Registration folders (``<fixed>_<moving>``) and viewer-cache files of scans that are no
        longer stored (a process killed between removing a scan's rows and its files)."""
        cur = self._cursor()
        try:
            ids = {r[0] for r in cur.execute("SELECT scan_id FROM scans").fetchall()}
        finally:
            cur.close()
        removed = []
        regs, cache = self.home / "registrations", self.home / "viewer_cache"
        if regs.is_dir():
            for p in regs.iterdir():
                parts = p.name.split("_")
                if p.is_dir() and len(parts) == 2 and all(x.startswith("scan-") for x in parts) and not set(parts) <= ids:
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        if cache.is_dir():
            for p in cache.glob("*.npz"):
                pair = p.name.removeprefix(".tmp-").split("--")[0].split("_")  # ".tmp-": being written
                if len(pair) == 2 and not set(pair) <= ids:
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    # -- patients ---------------------------------------------------------------------------
    def _ensure_patient(self, cur: duckdb.DuckDBPyConnection, patient_key: str) -> None:
        cur.execute(
            "INSERT INTO patients (patient_key) SELECT ? WHERE NOT EXISTS "
            "(SELECT 1 FROM patients WHERE patient_key = ?)",
            [patient_key, patient_key],
        )

    def _update_patient(self, cur: duckdb.DuckDBPyConnection, key: str, arm: str | None, alias: str | None) -> None:
        if arm is not None:
            cur.execute("UPDATE patients SET arm = ? WHERE patient_key = ?", [arm, key])
        if alias is not None:
            cur.execute("UPDATE patients SET alias = ? WHERE patient_key = ?", [alias, key])

    def set_patient(self, patient_key: str, arm: str | None = None, alias: str | None = None) -> None:
        """Create the patient if needed and set arm / alias (``None`` leaves a field unchanged)."""
        with self.transaction() as cur:
            self._ensure_patient(cur, patient_key)
            self._update_patient(cur, patient_key, arm, alias)

    def patients(self) -> pd.DataFrame:
        """patient_key, alias, arm, n_scans, first_date, last_date, created_at."""
        return self._df(
            """SELECT p.patient_key, p.alias, p.arm, count(s.scan_id) AS n_scans,
                      min(s.study_date) AS first_date, max(s.study_date) AS last_date, p.created_at
               FROM patients p LEFT JOIN scans s USING (patient_key)
               GROUP BY p.patient_key, p.alias, p.arm, p.created_at
               ORDER BY coalesce(p.alias, p.patient_key)"""
        )

    # -- scans ------------------------------------------------------------------------------
    def scan_by_hash(self, content_hash: str) -> tuple[str, str] | None:
        """(scan_id, patient_key) of the scan with this content hash, if stored."""
        row = self._one("SELECT scan_id, patient_key FROM scans WHERE content_hash = ?", [content_hash])
        return (row[0], row[1]) if row else None

    def scans(self, patient_key: str | None = None) -> pd.DataFrame:
        """One row per scan with patient alias/arm and ``day`` = days since the patient's first scan.

        ``volume_path`` is the absolute path (str) of the canonical NIfTI; ``geometry`` and
        ``meta`` are JSON text."""
        where, params = ("WHERE s.patient_key = ?", [patient_key]) if patient_key else ("", [])
        return self._df(
            f"""SELECT s.scan_id, s.patient_key, p.alias, p.arm, s.study_date,
                       date_diff('day', min(s.study_date) OVER (PARTITION BY s.patient_key), s.study_date) AS day,
                       s.content_hash, s.source_name, {self._abs_sql("s.volume_path")} AS volume_path,
                       s.geometry, s.meta, s.created_at
                FROM scans s JOIN patients p USING (patient_key) {where}
                ORDER BY s.patient_key, s.study_date, s.created_at""",
            params,
        )

    def identity_candidates(self, patient_key: str, source_patient_key: str) -> pd.DataFrame:
        """Scans that a new scan's identity is checked against (:mod:`covidtrack.identity`): the
        patient's own, and any other patient's whose file carried the same PatientID hash.
        Columns ``scan_id``, ``patient_key``, ``alias``, ``study_date``, ``meta`` (JSON text)."""
        return self._df(
            """SELECT s.scan_id, s.patient_key, p.alias, s.study_date, s.meta
               FROM scans s JOIN patients p USING (patient_key)
               WHERE s.patient_key = ? OR (? <> '' AND json_extract_string(s.meta, '$.source_patient_key') = ?)
               ORDER BY s.study_date, s.created_at""",
            [patient_key, source_patient_key, source_patient_key],
        )

    def baseline_scan(self, patient_key: str) -> str | None:
        """The patient's earliest scan (ties: first stored)."""
        row = self._one(
            "SELECT scan_id FROM scans WHERE patient_key = ? ORDER BY study_date, created_at, scan_id LIMIT 1",
            [patient_key],
        )
        return row[0] if row else None

    def add_scan(
        self,
        scan: ScanRecord,
        seg: SegRecord,
        metrics: pd.DataFrame,
        arm: str | None = None,
        alias: str | None = None,
    ) -> None:
        """Insert a scan with its first segmentation and metrics in ONE transaction.

        The files must already be in place (see :class:`FileStage`). The rules the pipeline checks
        before segmenting (one scan per patient and date, an alias names one patient) are checked
        again here, under a lock shared by every writer of this process: two imports started
        together in the dashboard (one thread each) must not both pass the early check.
        """
        with _ADD_SCAN_LOCK, self.transaction() as cur:
            same_day = cur.execute("SELECT scan_id FROM scans WHERE patient_key = ? AND study_date = ? AND content_hash <> ?",
                                   [scan.patient_key, scan.study_date, scan.content_hash]).fetchall()
            if same_day:
                raise StoreError(f"{self.path}: patient {scan.patient_key} already has scan {same_day[0][0]} dated "
                                 f"{scan.study_date} (stored meanwhile). Fix: one scan per date; remove one with "
                                 f"`python -m covidtrack remove-scan SCAN_ID --yes`")
            if alias is not None:
                taken = cur.execute("SELECT patient_key FROM patients WHERE alias = ? AND patient_key <> ?",
                                    [alias, scan.patient_key]).fetchall()
                if taken:
                    raise StoreError(f"{self.path}: alias {alias!r} already names patient {taken[0][0]}. Fix: pick another alias")
            self._ensure_patient(cur, scan.patient_key)
            self._update_patient(cur, scan.patient_key, arm, alias)
            cur.execute(
                """INSERT INTO scans (scan_id, patient_key, study_date, content_hash, geometry,
                                      source_name, volume_path, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                [scan.scan_id, scan.patient_key, scan.study_date, scan.content_hash, _json(scan.geometry),
                 scan.source_name, self.rel(scan.volume_path), _json(scan.meta)],
            )
            self._insert_seg(cur, seg, metrics)

    def add_segmentation(self, seg: SegRecord, metrics: pd.DataFrame) -> None:
        """Add a (re-)segmentation of a stored scan with its metrics in one transaction."""
        with self.transaction() as cur:
            if not cur.execute("SELECT 1 FROM scans WHERE scan_id = ?", [seg.scan_id]).fetchall():
                raise StoreError(f"{self.path}: scan {seg.scan_id} not found. Fix: ingest the scan first")
            self._insert_seg(cur, seg, metrics)

    def _insert_seg(self, cur: duckdb.DuckDBPyConnection, seg: SegRecord, metrics: pd.DataFrame) -> None:
        cur.execute(
            """INSERT INTO segmentations (seg_id, scan_id, model_versions, model_tag, lungs_path,
                                          infection_path, lobes_path, kind, has_metrics)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, true)""",
            [seg.seg_id, seg.scan_id, _json(seg.model_versions), seg.model_tag, self.rel(seg.lungs_path),
             self.rel(seg.infection_path), self.rel(seg.lobes_path) if seg.lobes_path else None, seg.kind],
        )
        self._insert_metrics(cur, seg, metrics)

    def _insert_metrics(self, cur: duckdb.DuckDBPyConnection, seg: SegRecord, metrics: pd.DataFrame) -> None:
        missing = {"region", "metric", "value", "unit"} - set(metrics.columns)
        if missing:
            raise StoreError(f"metrics of {seg.scan_id}: columns {sorted(missing)} missing. Fix: use metrics.scan_metrics")
        rows = pd.DataFrame(
            {
                "scan_id": seg.scan_id,
                "region": metrics["region"].astype(str).to_numpy(),
                "metric": metrics["metric"].astype(str).to_numpy(),
                "value": metrics["value"].astype("float64").to_numpy(),
                "unit": metrics["unit"].astype(str).to_numpy(),
                "model_version": seg.model_tag,
                "seg_id": seg.seg_id,
            }
        )
        cur.register("_new_metrics", rows)
        try:
            cur.execute(
                "INSERT INTO metrics (scan_id, region, metric, value, unit, model_version, seg_id) "
                "SELECT scan_id, region, metric, value, unit, model_version, seg_id FROM _new_metrics"
            )
        finally:
            cur.unregister("_new_metrics")

    def load_volume(self, scan_id: str) -> Volume:
        """The stored canonical scan as a Volume (int16 HU) with its metadata."""
        row = self._one("SELECT volume_path, meta, geometry, patient_key, study_date FROM scans WHERE scan_id = ?", [scan_id])
        if row is None:
            raise StoreError(f"{self.path}: scan {scan_id} not found. Fix: `python -m covidtrack patients --scans` lists the stored scans")
        arr, spacing, origin, direction = read_canonical(self.abs(row[0]))  # type: ignore[arg-type]
        meta, geometry = json.loads(row[1] or "{}"), json.loads(row[2] or "{}")
        src = geometry.get("source")
        return Volume(
            array=np.ascontiguousarray(arr, dtype=np.int16),
            spacing=spacing,
            origin=origin,  # type: ignore[arg-type]
            direction=direction,  # type: ignore[arg-type]
            meta=ScanMeta(
                patient_key=row[3],
                patient_sex=meta.get("patient_sex", ""),
                study_date=row[4],
                series_description=meta.get("series_description", ""),
                manufacturer=meta.get("manufacturer", ""),
                kernel=meta.get("kernel", ""),
                slice_thickness_mm=meta.get("slice_thickness_mm"),
                modality=meta.get("modality", "CT"),
                source_format=meta.get("source_format", ""),
                source_name=meta.get("source_name", ""),
                notes=tuple(meta.get("notes", ())),
                identity_note=meta.get("identity_note", ""),
            ),
            source=SourceGrid(
                size=tuple(src["size"]), spacing=tuple(src["spacing"]), origin=tuple(src["origin"]),  # type: ignore[arg-type]
                direction=tuple(src["direction"]),  # type: ignore[arg-type]
            ) if src else None,
        )

    # -- segmentations ----------------------------------------------------------------------
    def segmentation(self, scan_id: str, kind: str = "final") -> SegRecord:
        """Mask paths of one segmentation of a scan.

        ``"model"``: the latest model output; ``"corrected"``: the latest human correction;
        ``"final"``: the correction if any, else the latest model output; ``"active"``: the one
        whose numbers the dashboard shows (correction > made only by active models > latest, the
        ranking of :meth:`metrics`), so registration, change and viewer use the same masks.
        """
        kinds = {"model": ["model"], "corrected": ["corrected"], "final": ["corrected", "model"], "active": ["active"]}
        if kind not in kinds:
            raise StoreError(f"segmentation kind {kind!r} unknown. Fix: use one of {sorted(kinds)}")
        cols = "seg_id, scan_id, kind, model_versions, lungs_path, infection_path, lobes_path, created_at"
        for k in kinds[kind]:
            if k == "active":
                row = self._one(
                    f"""SELECT {cols} FROM segmentations g WHERE scan_id = ?
                        ORDER BY g.has_metrics DESC, (g.kind = 'corrected') DESC,
                                 list_contains(?::VARCHAR[], g.model_tag) DESC, g.created_at DESC, g.seg_id DESC
                        LIMIT 1""",
                    [scan_id, self._active_tags()],
                )
            else:
                row = self._one(
                    f"""SELECT {cols} FROM segmentations WHERE scan_id = ? AND kind = ?
                       ORDER BY created_at DESC, seg_id DESC LIMIT 1""",
                    [scan_id, k],
                )
            if row:
                return SegRecord(
                    seg_id=row[0], scan_id=row[1], kind=row[2], model_versions=json.loads(row[3]),
                    lungs_path=self.abs(row[4]), infection_path=self.abs(row[5]),  # type: ignore[arg-type]
                    lobes_path=self.abs(row[6]), created_at=row[7],
                )
        raise StoreError(f"{self.path}: no {kind} segmentation for scan {scan_id}. Fix: ingest or segment it first")

    def segmentations(self, scan_id: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE scan_id = ?", [scan_id]) if scan_id else ("", [])
        df = self._df(
            f"""SELECT seg_id, scan_id, kind, model_tag, model_versions, lungs_path, infection_path,
                       lobes_path, created_at FROM segmentations {where} ORDER BY scan_id, created_at""",
            params,
        )
        for col in ("lungs_path", "infection_path", "lobes_path"):
            df[col] = [self.abs(p) for p in df[col]]
        return df

    def load_segmentation(self, scan_id: str, kind: str = "final") -> Segmentation:
        rec = self.segmentation(scan_id, kind)
        lungs = read_canonical(rec.lungs_path)[0].astype(np.uint8)
        infection = read_canonical(rec.infection_path)[0].astype(np.uint8)
        lobes = read_canonical(rec.lobes_path)[0].astype(np.uint8) if rec.lobes_path else None
        return Segmentation(lungs=lungs, infection=infection, lobes=lobes, model_versions=rec.model_versions)

    # -- metrics ----------------------------------------------------------------------------
    def _metric_rows_sql(self, model_version: str | None) -> tuple[str, list[Any]]:
        """SQL (a subquery) of the metric rows to show, with its parameters."""
        if model_version is None:
            return "SELECT m.*, g.kind FROM metrics m JOIN segmentations g USING (seg_id)", []
        if model_version != "active":
            return ("SELECT m.*, g.kind FROM metrics m JOIN segmentations g USING (seg_id) "
                    "WHERE m.model_version = ?"), [model_version]
        return f"SELECT m.*, c.kind FROM metrics m JOIN ({self._active_source()}) c USING (seg_id)", []

    _CHOSEN_SQL = """
                SELECT scan_id, seg_id, kind FROM (
                    SELECT g.scan_id, g.seg_id, g.kind, row_number() OVER (
                        PARTITION BY g.scan_id ORDER BY (g.kind = 'corrected') DESC,
                        list_contains(?::VARCHAR[], g.model_tag) DESC,
                        g.created_at DESC, g.seg_id DESC) AS rk
                    FROM segmentations g
                    WHERE g.has_metrics
                ) WHERE rk = 1"""

    def _active_source(self) -> str:
        """SQL of (scan_id, seg_id, kind): the one segmentation per scan whose numbers are shown.

        One segmentation per scan: correction > all-active-models > latest (module docstring).
        The choice is cached in ``active_segs`` and rebuilt only when its key (segmentation
        count, how many have metrics, active model tags) changes, so dashboard queries join a
        10,000-row table instead of ranking every segmentation each time.
        """
        tags = self._active_tags()
        cur = self._cursor()
        try:
            n, n_metrics = cur.execute("SELECT count(*), count(*) FILTER (WHERE has_metrics) FROM segmentations").fetchall()[0]
            key = _json([n, n_metrics, sorted(tags)])
            row = cur.execute("SELECT cache_key FROM active_state").fetchall()
            if row and row[0][0] == key:
                return "SELECT scan_id, seg_id, kind FROM active_segs"
            if self.read_only:
                return self._inline_chosen(tags)
            try:
                cur.begin()
                cur.execute("DELETE FROM active_segs")
                cur.execute(f"INSERT INTO active_segs {self._CHOSEN_SQL}", [tags])
                cur.execute("DELETE FROM active_state")
                cur.execute("INSERT INTO active_state VALUES (?)", [key])
                cur.commit()
            except duckdb.TransactionException:
                cur.rollback()  # another thread rebuilt it at the same moment: compute inline
                return self._inline_chosen(tags)
            return "SELECT scan_id, seg_id, kind FROM active_segs"
        finally:
            cur.close()

    def _inline_chosen(self, tags: list[str]) -> str:
        quoted = ", ".join("'" + t.replace("'", "''") + "'" for t in tags)
        return self._CHOSEN_SQL.replace("?::VARCHAR[]", f"[{quoted}]::VARCHAR[]")

    def _active_tags(self) -> list[str]:
        """Stored model tags made only of currently active models (a handful of distinct tags,
        checked here rather than splitting every row's tag in SQL)."""
        active = set(active_model_names())
        cur = self._cursor()
        try:
            tags = [r[0] for r in cur.execute("SELECT DISTINCT model_tag FROM segmentations").fetchall()]
        finally:
            cur.close()
        return [t for t in tags if t and set(t.split(",")) <= active]

    def metrics(
        self, scan_ids: Sequence[str] | None = None, model_version: str | None = "active", wide: bool = False
    ) -> pd.DataFrame:
        """Metric rows: scan_id, region, metric, value, unit, model_version, seg_id, kind.

        ``model_version``: "active" (default, one segmentation per scan, see module doc), a model
        tag (exact match) or ``None`` (every row). ``wide=True``: one row per scan (and
        segmentation when several) with columns ``<region>_<metric>``.
        """
        rows_sql, params = self._metric_rows_sql(model_version)
        where = ""
        if scan_ids is not None:
            where = "WHERE list_contains(?::VARCHAR[], r.scan_id)"
            params = [*params, list(scan_ids)]
        df = self._df(
            f"""SELECT r.scan_id, r.region, r.metric, r.value, r.unit, r.model_version, r.seg_id, r.kind
                FROM ({rows_sql}) r {where} ORDER BY r.scan_id, r.seg_id""",
            params,
        )
        return self._wide(df, ["scan_id", "seg_id", "model_version"]) if wide else df

    @staticmethod
    def _wide(df: pd.DataFrame, index: list[str]) -> pd.DataFrame:
        if df.empty:
            return pd.DataFrame(columns=index)
        df = df.assign(column=df["region"] + "_" + df["metric"])
        # groupby/unstack, not pivot_table: that one builds the cartesian product of index levels
        out = df.groupby([*index, "column"], sort=False)["value"].first().unstack("column")
        out.columns.name = None
        return out.reset_index()

    def cohort_metrics(
        self,
        arms: Sequence[str] | None = None,
        metrics: Sequence[str] | None = None,
        regions: Sequence[str] | None = None,
        model_version: str | None = "active",
        patient_key: str | None = None,
    ) -> pd.DataFrame:
        """Long rows joined with patient_key, alias, arm, study_date and ``day`` since the
        patient's first scan; filter by arms, metric names and regions (``None`` = all)."""
        rows_sql, params = self._metric_rows_sql(model_version)
        conds = []
        for col, values in (("p.arm", arms), ("r.metric", metrics), ("r.region", regions)):
            if values is not None:
                conds.append(f"list_contains(?::VARCHAR[], {col})")
                params.append(list(values))
        if patient_key is not None:
            conds.append("s.patient_key = ?")
            params.append(patient_key)
        where = ("WHERE " + " AND ".join(conds)) if conds else ""
        return self._df(
            f"""WITH sd AS (
                    SELECT scan_id, patient_key, study_date,
                           date_diff('day', min(study_date) OVER (PARTITION BY patient_key), study_date) AS day
                    FROM scans)
                SELECT s.patient_key, p.alias, p.arm, s.scan_id, s.study_date, s.day,
                       r.region, r.metric, r.value, r.unit, r.model_version, r.seg_id, r.kind
                FROM ({rows_sql}) r JOIN sd s USING (scan_id) JOIN patients p USING (patient_key)
                {where}
                ORDER BY p.arm, s.patient_key, s.study_date, r.region, r.metric""",
            params,
        )

    def patient_metrics(self, patient_key: str, model_version: str | None = "active") -> pd.DataFrame:
        """All metric rows of one patient's scans, with dates and ``day`` (see cohort_metrics)."""
        return self.cohort_metrics(model_version=model_version, patient_key=patient_key)

    def latest_per_patient(
        self, region: str = "whole", metrics: Sequence[str] | None = None, model_version: str | None = "active"
    ) -> pd.DataFrame:
        """One row per patient: the latest scan (scan_id, study_date, day, n_scans, alias, arm)
        and the metrics of ``region`` of that scan as columns named by the metric (``metrics``
        None = all stored)."""
        rows_sql, params = self._metric_rows_sql(model_version)
        latest_sql = """
            WITH sd AS (
                SELECT scan_id, patient_key, study_date,
                       date_diff('day', min(study_date) OVER (PARTITION BY patient_key), study_date) AS day,
                       count(*) OVER (PARTITION BY patient_key) AS n_scans,
                       row_number() OVER (PARTITION BY patient_key ORDER BY study_date DESC, created_at DESC) AS rk
                FROM scans)
            SELECT s.patient_key, p.alias, p.arm, s.scan_id, s.study_date, s.day, s.n_scans
            FROM sd s JOIN patients p USING (patient_key) WHERE s.rk = 1"""
        latest = self._df(latest_sql + " ORDER BY p.arm NULLS LAST, s.patient_key")
        where, mparams = "", []
        if metrics is not None:
            where, mparams = "AND list_contains(?::VARCHAR[], r.metric)", [list(metrics)]
        # long rows, pivoted in pandas: measured faster here than SQL PIVOT / FILTER aggregates
        vals = self._df(
            f"""SELECT r.scan_id, r.metric, r.value FROM ({rows_sql}) r
                WHERE r.region = ? {where} AND r.scan_id IN (SELECT scan_id FROM ({latest_sql}))""",
            [*params, region, *mparams],
        )
        if vals.empty:
            return latest
        wide = vals.drop_duplicates(["scan_id", "metric"]).pivot(index="scan_id", columns="metric", values="value")
        wide.columns.name = None
        return latest.join(wide, on="scan_id")

    # -- registrations and change ----------------------------------------------------------
    def add_registration(
        self,
        fixed_scan: str,
        moving_scan: str,
        transforms: dict[str, str | Path] | Sequence[str | Path],
        qa: dict[str, Any],
        ok: bool,
        change_map: str | Path | None = None,
        *,
        change: pd.DataFrame | None = None,
        reg_id: str | None = None,
    ) -> str:
        """Record a registration of ``moving_scan`` onto ``fixed_scan`` (replaces the pair's
        earlier one and, when ``change`` rows are given, its change rows, in the same
        transaction). ``transforms``: paths (dict by role or list in ANTs order); ``qa``: figures
        such as Dice of the warped lung masks. Returns the registration id (``reg_id`` when given,
        so the caller can write it into the pair's files first)."""
        if isinstance(transforms, dict):
            tr: Any = {k: self.rel(v) for k, v in transforms.items()}
        else:
            tr = [self.rel(v) for v in transforms]
        reg_id = reg_id or new_reg_id()
        with self.transaction() as cur:
            for sid in (fixed_scan, moving_scan):
                if not cur.execute("SELECT 1 FROM scans WHERE scan_id = ?", [sid]).fetchall():
                    raise StoreError(f"{self.path}: scan {sid} not found. Fix: ingest it before registering")
            cur.execute("DELETE FROM registrations WHERE fixed_scan = ? AND moving_scan = ?", [fixed_scan, moving_scan])
            cur.execute(
                """INSERT INTO registrations (reg_id, fixed_scan, moving_scan, transforms, qa, ok, change_map_path)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [reg_id, fixed_scan, moving_scan, _json(tr), _json(qa), bool(ok),
                 self.rel(change_map) if change_map else None],
            )
            if change is not None:
                self._write_change(cur, fixed_scan, moving_scan, change)
        return reg_id

    def registrations(self, patient_key: str | None = None) -> pd.DataFrame:
        """reg_id, fixed/moving scan and dates, transforms (absolute paths), qa (dict), ok, change_map_path."""
        where, params = ("WHERE f.patient_key = ?", [patient_key]) if patient_key else ("", [])
        df = self._df(
            f"""SELECT r.reg_id, f.patient_key, r.fixed_scan, f.study_date AS fixed_date, r.moving_scan,
                       m.study_date AS moving_date, r.transforms, r.qa, r.ok, r.change_map_path, r.created_at
                FROM registrations r JOIN scans f ON f.scan_id = r.fixed_scan
                JOIN scans m ON m.scan_id = r.moving_scan {where}
                ORDER BY f.patient_key, m.study_date""",
            params,
        )

        def _paths(text: str) -> Any:
            obj = json.loads(text)
            if isinstance(obj, dict):
                return {k: self.abs(v) for k, v in obj.items()}
            return [self.abs(v) for v in obj]

        df["transforms"] = [_paths(t) for t in df["transforms"]]
        df["qa"] = [json.loads(q) for q in df["qa"]]
        df["change_map_path"] = [self.abs(p) for p in df["change_map_path"]]
        return df

    def add_change_metrics(self, fixed_scan: str, moving_scan: str, df: pd.DataFrame) -> None:
        """Store change rows (region, metric, value, unit) of a pair, replacing earlier ones."""
        with self.transaction() as cur:
            self._write_change(cur, fixed_scan, moving_scan, df)

    def _write_change(self, cur: duckdb.DuckDBPyConnection, fixed_scan: str, moving_scan: str, df: pd.DataFrame) -> None:
        missing = {"region", "metric", "value", "unit"} - set(df.columns)
        if missing:
            raise StoreError(f"change metrics {fixed_scan}->{moving_scan}: columns {sorted(missing)} missing")
        rows = pd.DataFrame(
            {
                "fixed_scan": fixed_scan,
                "moving_scan": moving_scan,
                "region": df["region"].astype(str).to_numpy(),
                "metric": df["metric"].astype(str).to_numpy(),
                "value": df["value"].astype("float64").to_numpy(),
                "unit": df["unit"].astype(str).to_numpy(),
            }
        )
        cur.execute("DELETE FROM change_metrics WHERE fixed_scan = ? AND moving_scan = ?", [fixed_scan, moving_scan])
        cur.register("_new_change", rows)
        try:
            cur.execute(
                "INSERT INTO change_metrics (fixed_scan, moving_scan, region, metric, value, unit) "
                "SELECT fixed_scan, moving_scan, region, metric, value, unit FROM _new_change"
            )
        finally:
            cur.unregister("_new_change")

    def change_metrics(self, patient_key: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE f.patient_key = ?", [patient_key]) if patient_key else ("", [])
        return self._df(
            f"""SELECT f.patient_key, c.fixed_scan, f.study_date AS fixed_date, c.moving_scan,
                       m.study_date AS moving_date, c.region, c.metric, c.value, c.unit, c.created_at
                FROM change_metrics c JOIN scans f ON f.scan_id = c.fixed_scan
                JOIN scans m ON m.scan_id = c.moving_scan {where}
                ORDER BY f.patient_key, m.study_date, c.region, c.metric""",
            params,
        )

    # --- added for covidtrack.longitudinal (issue 6, registration engineer) -------------------
    def remove_registration(self, fixed_scan: str, moving_scan: str) -> None:
        """Delete one pair's registration row and change rows (used when an earlier scan becomes
        the baseline). The pair's files are removed by the caller (covidtrack.longitudinal)."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM registrations WHERE fixed_scan = ? AND moving_scan = ?", [fixed_scan, moving_scan])
            cur.execute("DELETE FROM change_metrics WHERE fixed_scan = ? AND moving_scan = ?", [fixed_scan, moving_scan])
    # --- end of issue-6 block ----------------------------------------------------------------

    def remove_scan(self, scan_id: str) -> dict[str, int]:
        """Delete a scan and everything derived from it, in one transaction: its segmentations,
        metric rows, corrections (training samples), registrations and change rows in which it
        is either scan, and the patient when it was the patient's last scan. Then its files (the
        canonical volume, masks) are removed. Returns the number of rows removed per table.

        Registration folders are the caller's (:func:`covidtrack.longitudinal.forget_scan`); a
        baseline removed this way leaves the follow-ups to be registered to the next baseline.
        """
        row = self._one("SELECT patient_key FROM scans WHERE scan_id = ?", [scan_id])
        if row is None:
            raise StoreError(f"{self.path}: scan {scan_id} not found. Fix: `python -m covidtrack patients --scans` lists the stored scans")
        key = row[0]
        segs = "SELECT seg_id FROM segmentations WHERE scan_id = ?"
        steps = (
            ("metrics", f"DELETE FROM metrics WHERE seg_id IN ({segs}) OR scan_id = ?", 2),
            ("corrections", "DELETE FROM corrections WHERE scan_id = ?", 1),
            ("change_metrics", "DELETE FROM change_metrics WHERE fixed_scan = ? OR moving_scan = ?", 2),
            ("registrations", "DELETE FROM registrations WHERE fixed_scan = ? OR moving_scan = ?", 2),
            ("active_segs", "DELETE FROM active_segs WHERE scan_id = ?", 1),
            ("segmentations", "DELETE FROM segmentations WHERE scan_id = ?", 1),
            ("scans", "DELETE FROM scans WHERE scan_id = ?", 1),
        )
        removed: dict[str, int] = {}
        with self.transaction() as cur:
            for table, sql, n in steps:
                before = cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
                cur.execute(sql, [scan_id] * n)
                removed[table] = int(before - cur.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
            cur.execute("DELETE FROM active_state")  # the active choice is rebuilt on the next query
            left = cur.execute("SELECT count(*) FROM scans WHERE patient_key = ?", [key]).fetchall()[0][0]
            if left == 0:
                cur.execute("DELETE FROM patients WHERE patient_key = ?", [key])
            removed["patients"] = int(left == 0)
        self.clean_orphans()
        return removed

    # -- corrections (HITL) ----------------------------------------------------------------
    def add_correction(
        self,
        scan_id: str,
        author: str,
        seconds: float,
        voxels_changed: int,
        slices_touched: int,
        infection_path: str | Path,
        original_seg_id: str | None = None,
        metrics: pd.DataFrame | None = None,
        lungs_path: str | Path | None = None,
        lobes_path: str | Path | None = None,
    ) -> tuple[str, str]:
        """Record a human correction as a new ``corrected`` segmentation (the model output stays).

        Lung / lobe masks default to those of the original segmentation. ``metrics`` (from
        ``metrics.scan_metrics`` on the corrected masks) become the scan's "active" numbers.
        Returns ``(correction_id, seg_id)``. Write the mask files first (e.g. with FileStage and
        :meth:`mask_path_for`); everything here is one transaction.
        """
        original = (
            self._seg_by_id(original_seg_id) if original_seg_id else self.segmentation(scan_id, "final")
        )
        if original.scan_id != scan_id:
            raise StoreError(f"correction of {scan_id}: segmentation {original.seg_id} belongs to scan "
                             f"{original.scan_id}. Fix: pass a segmentation of the corrected scan")
        seg = SegRecord(
            seg_id=new_seg_id(),
            scan_id=scan_id,
            kind="corrected",
            model_versions=original.model_versions,
            lungs_path=Path(lungs_path) if lungs_path else original.lungs_path,
            infection_path=Path(infection_path),
            lobes_path=Path(lobes_path) if lobes_path else original.lobes_path,
        )
        correction_id = "cor-" + uuid.uuid4().hex[:16]
        with self.transaction() as cur:
            cur.execute(
                """INSERT INTO segmentations (seg_id, scan_id, model_versions, model_tag, lungs_path,
                                              infection_path, lobes_path, kind, has_metrics)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [seg.seg_id, scan_id, _json(seg.model_versions), seg.model_tag, self.rel(seg.lungs_path),
                 self.rel(seg.infection_path), self.rel(seg.lobes_path) if seg.lobes_path else None, seg.kind,
                 metrics is not None],
            )
            if metrics is not None:
                self._insert_metrics(cur, seg, metrics)
            cur.execute(
                """INSERT INTO corrections (correction_id, scan_id, author, seconds, voxels_changed,
                                            slices_touched, mask_path, original_seg_id, seg_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [correction_id, scan_id, author, float(seconds), int(voxels_changed), int(slices_touched),
                 self.rel(infection_path), original.seg_id, seg.seg_id],
            )
        return correction_id, seg.seg_id

    def segmentation_by_id(self, seg_id: str) -> SegRecord:
        """One segmentation row by id (mask paths absolute)."""
        return self._seg_by_id(seg_id)

    def _seg_by_id(self, seg_id: str) -> SegRecord:
        row = self._one(
            """SELECT seg_id, scan_id, kind, model_versions, lungs_path, infection_path, lobes_path, created_at
               FROM segmentations WHERE seg_id = ?""",
            [seg_id],
        )
        if row is None:
            raise StoreError(f"{self.path}: segmentation {seg_id} not found. Fix: pick one from Store.segmentations()")
        return SegRecord(row[0], row[1], row[2], json.loads(row[3]), self.abs(row[4]), self.abs(row[5]),  # type: ignore[arg-type]
                         self.abs(row[6]), row[7])

    def add_metrics(self, seg_id: str, metrics: pd.DataFrame) -> None:
        """Attach metric rows to a stored segmentation that has none yet (e.g. a correction
        recorded before its numbers were computed)."""
        seg = self._seg_by_id(seg_id)
        with self.transaction() as cur:
            if cur.execute("SELECT has_metrics FROM segmentations WHERE seg_id = ?", [seg_id]).fetchall()[0][0]:
                raise StoreError(f"{self.path}: segmentation {seg_id} already has metrics. Fix: metrics are immutable; "
                                 "store a new segmentation instead")
            self._insert_metrics(cur, seg, metrics)
            cur.execute("UPDATE segmentations SET has_metrics = true WHERE seg_id = ?", [seg_id])

    def corrections(self, scan_id: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE c.scan_id = ?", [scan_id]) if scan_id else ("", [])
        df = self._df(
            f"""SELECT c.correction_id, c.scan_id, s.patient_key, c.author, c.seconds, c.voxels_changed,
                       c.slices_touched, c.mask_path, c.original_seg_id, c.seg_id, c.created_at
                FROM corrections c JOIN scans s USING (scan_id) {where} ORDER BY c.created_at""",
            params,
        )
        df["mask_path"] = [self.abs(p) for p in df["mask_path"]]
        return df

    # -- models -----------------------------------------------------------------------------
    def upsert_model(
        self, task: str, version: str, card: dict[str, Any], metrics: dict[str, Any] | None = None, active: bool = False
    ) -> None:
        """Record a model version (card and validation metrics); ``active=True`` clears the flag
        on the task's other versions in the same transaction."""
        with self.transaction() as cur:
            cur.execute("DELETE FROM models WHERE task = ? AND version = ?", [task, version])
            if active:
                cur.execute("UPDATE models SET active = false WHERE task = ?", [task])
            cur.execute(
                "INSERT INTO models (task, version, card, metrics, active) VALUES (?, ?, ?, ?, ?)",
                [task, version, _json(card), _json(metrics or {}), bool(active)],
            )

    def models(self, task: str | None = None) -> pd.DataFrame:
        """task, version, card (dict), metrics (dict), active, created_at."""
        where, params = ("WHERE task = ?", [task]) if task else ("", [])
        df = self._df(f"SELECT task, version, card, metrics, active, created_at FROM models {where} ORDER BY task, created_at", params)
        df["card"] = [json.loads(c) for c in df["card"]]
        df["metrics"] = [json.loads(m) if m else {} for m in df["metrics"]]
        return df

    # -- housekeeping -----------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Row counts per table (for tests, the CLI and health checks)."""
        tables = ("patients", "scans", "segmentations", "metrics", "registrations", "change_metrics", "corrections", "models")
        out = {}
        for t in tables:
            row = self._one(f"SELECT count(*) FROM {t}")
            out[t] = int(row[0]) if row else 0
        return out
